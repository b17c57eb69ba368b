//! The key-management endpoints: parse and validate the request, apply the delegation ceiling,
//! write to the store, refresh the local cache at once, answer in Appwrite's shapes.

use chrono::{DateTime, TimeZone, Utc};
use http::{Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde::Deserialize;
use serde_json::Value;

use super::ceiling::Ceiling;
use super::query::ListQuery;
use super::Endpoint;
use crate::auth::Principal;
use crate::config::Snapshot;
use crate::error::Rejection;
use crate::gateway::Gateway;
use crate::keys::ephemeral::{DURATION_MAX, DURATION_MIN};
use crate::keys::input::{self, KeyInput};
use crate::keys::scopes::ScopeSet;
use crate::keys::store::{Actor, KeyUpdate, NewKey, Rotation, StoreError};
use crate::keys::{KeyKind, KeyRateLimit, KeyRecord, Secret};
use crate::proxy::{full_body, Body};

/// Request bodies of the key API are small; anything larger is refused unread.
pub const BODY_LIMIT: usize = 64 * 1024;
/// The longest grace period a rotation may ask for.
pub const GRACE_MAX_SECONDS: i64 = 30 * 24 * 3600;

/// An authorized call to the key API.
pub struct AdminCall {
    pub endpoint: Endpoint,
    pub principal: Principal,
    /// The caller's scopes, implicit ones included.
    pub scopes: ScopeSet,
    pub project: String,
    pub key_id: Option<String>,
    pub query: Option<String>,
}

/// Serves one call; every failure is a [`Rejection`] the caller renders.
pub async fn handle(
    gateway: &Gateway,
    snapshot: &Snapshot,
    call: AdminCall,
    body: Incoming,
) -> Result<Response<Body>, Rejection> {
    let actor = match call.principal.key_id() {
        Some(id) => id.to_owned(),
        None => {
            return Err(Rejection::MissingScope {
                principal: "a guest (no API key)",
                needed: "keys.read, keys.write".into(),
            })
        }
    };
    let ceiling = Ceiling {
        scopes: call.scopes,
        expire: call.principal.expire(),
        rate_limit: match &call.principal {
            Principal::Key(key) => key.rate_limit,
            _ => None,
        },
    };
    let store = gateway.store();
    let project = call.project.as_str();
    let now = Utc::now();

    let dev_keys_allowed = || -> Result<(), Rejection> {
        match snapshot.project(project) {
            Some(settings) if settings.dev_keys => Ok(()),
            _ => Err(Rejection::FeatureDisabled("dev keys")),
        }
    };

    match call.endpoint {
        Endpoint::ListKeys | Endpoint::ListDevKeys => {
            let kind = endpoint_kind(call.endpoint);
            let query = ListQuery::from_url_query(call.query.as_deref())?;
            let keys = store.list(project, kind).await.map_err(store_error)?;
            let (page, total) = query.apply(keys)?;
            let list = match kind {
                KeyKind::Standard => serde_json::json!({
                    "total": total,
                    "keys": page.iter().map(|k| k.to_model(None)).collect::<Vec<_>>(),
                }),
                KeyKind::Dev => serde_json::json!({
                    "total": total,
                    "devKeys": page.iter().map(|k| k.to_dev_model(None)).collect::<Vec<_>>(),
                }),
            };
            json(StatusCode::OK, &list)
        }
        Endpoint::GetKey => {
            let key = existing(gateway, project, KeyKind::Standard, call.key_id.as_deref()).await?;
            json(StatusCode::OK, &key.to_model(None))
        }
        Endpoint::GetDevKey => {
            let key = existing(gateway, project, KeyKind::Dev, call.key_id.as_deref()).await?;
            json(StatusCode::OK, &key.to_dev_model(None))
        }
        Endpoint::CreateKey => {
            let body: CreateBody = read_json(body).await?;
            let id = input::key_id(body.key_id.as_deref()).map_err(invalid)?;
            let (input, rate_limit) = granted_fields(snapshot, &ceiling, body.fields, false)?;
            let secret = Secret::generate();
            let record = store
                .create(
                    NewKey {
                        id,
                        project: project.to_owned(),
                        kind: KeyKind::Standard,
                        name: input.name,
                        description: input.description,
                        scopes: input.scopes,
                        expire: input.expire,
                        digest: secret.digest(),
                        rate_limit,
                    },
                    Actor(&actor),
                )
                .await
                .map_err(store_error)?;
            gateway.keys().upsert(&record, &snapshot.scopes);
            json(StatusCode::CREATED, &record.to_model(Some(&secret)))
        }
        Endpoint::CreateDevKey => {
            dev_keys_allowed()?;
            let body: DevKeyBody = read_json(body).await?;
            let id = input::key_id(body.key_id.as_deref()).map_err(invalid)?;
            let (name, expire) = dev_key_fields(snapshot, body, now)?;
            ceiling.check_grant(&snapshot.scopes, &[], Some(expire.timestamp()))?;
            let secret = Secret::generate_for(KeyKind::Dev);
            let record = store
                .create(
                    NewKey {
                        id,
                        project: project.to_owned(),
                        kind: KeyKind::Dev,
                        name,
                        description: String::new(),
                        scopes: Vec::new(),
                        expire: Some(expire),
                        digest: secret.digest(),
                        rate_limit: None,
                    },
                    Actor(&actor),
                )
                .await
                .map_err(store_error)?;
            gateway.keys().upsert(&record, &snapshot.scopes);
            json(StatusCode::CREATED, &record.to_dev_model(Some(&secret)))
        }
        Endpoint::UpdateKey => {
            let body: KeyFields = read_json(body).await?;
            let target =
                existing(gateway, project, KeyKind::Standard, call.key_id.as_deref()).await?;
            ceiling.check_target(&snapshot.scopes, &target)?;
            let (input, rate_limit) = granted_fields(snapshot, &ceiling, body, true)?;
            let record = store
                .update(
                    project,
                    &target.id,
                    KeyUpdate {
                        name: input.name,
                        description: input.description,
                        scopes: input.scopes,
                        expire: input.expire,
                        rate_limit,
                    },
                    Actor(&actor),
                )
                .await
                .map_err(store_error)?;
            gateway.keys().upsert(&record, &snapshot.scopes);
            json(StatusCode::OK, &record.to_model(None))
        }
        Endpoint::UpdateDevKey => {
            dev_keys_allowed()?;
            let body: DevKeyBody = read_json(body).await?;
            let target = existing(gateway, project, KeyKind::Dev, call.key_id.as_deref()).await?;
            let (name, expire) = dev_key_fields(snapshot, body, now)?;
            ceiling.check_grant(&snapshot.scopes, &[], Some(expire.timestamp()))?;
            let record = store
                .update(
                    project,
                    &target.id,
                    KeyUpdate {
                        name,
                        description: String::new(),
                        scopes: Vec::new(),
                        expire: Some(expire),
                        rate_limit: None,
                    },
                    Actor(&actor),
                )
                .await
                .map_err(store_error)?;
            gateway.keys().upsert(&record, &snapshot.scopes);
            json(StatusCode::OK, &record.to_dev_model(None))
        }
        Endpoint::DeleteKey | Endpoint::DeleteDevKey => {
            let kind = endpoint_kind(call.endpoint);
            let target = existing(gateway, project, kind, call.key_id.as_deref()).await?;
            ceiling.check_target(&snapshot.scopes, &target)?;
            store
                .delete(project, &target.id, Actor(&actor))
                .await
                .map_err(store_error)?;
            gateway.keys().remove(project, &target.id);
            let mut response = Response::new(full_body(""));
            *response.status_mut() = StatusCode::NO_CONTENT;
            // Appwrite's SDKs read Content-Type on every response, 204 included.
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            Ok(response)
        }
        Endpoint::RotateKey => {
            let body: RotateBody = read_json_or_empty(body).await?;
            let target =
                existing(gateway, project, KeyKind::Standard, call.key_id.as_deref()).await?;
            ceiling.check_rotate(&snapshot.scopes, &target)?;
            let grace = body.grace.unwrap_or(0);
            if !(0..=GRACE_MAX_SECONDS).contains(&grace) {
                return Err(invalid(format!(
                    "grace must be 0-{GRACE_MAX_SECONDS} seconds"
                )));
            }
            // The old secret never outlives the key itself.
            let grace_until = (grace > 0)
                .then(|| now + chrono::Duration::seconds(grace))
                .map(|until| target.expire.map_or(until, |expire| until.min(expire)));
            let secret = Secret::generate();
            let record = store
                .rotate(
                    project,
                    &target.id,
                    Rotation {
                        digest: secret.digest(),
                        grace_until,
                    },
                    Actor(&actor),
                )
                .await
                .map_err(store_error)?;
            gateway.keys().upsert(&record, &snapshot.scopes);
            json(StatusCode::OK, &record.to_model(Some(&secret)))
        }
        Endpoint::CreateEphemeralKey => {
            let signer = snapshot
                .ephemeral
                .as_ref()
                .ok_or(Rejection::FeatureDisabled("ephemeral keys"))?;
            let body: EphemeralBody = read_json(body).await?;
            let duration = whole_seconds(&body.duration)
                .filter(|d| (DURATION_MIN..=DURATION_MAX).contains(d))
                .ok_or_else(|| {
                    invalid(format!(
                        "duration must be {DURATION_MIN}-{DURATION_MAX} seconds"
                    ))
                })?;
            let scopes = KeyInput {
                name: "ephemeral".into(),
                description: String::new(),
                scopes: body.scopes,
                expire: None,
            }
            .validate(snapshot)
            .map_err(invalid)?
            .scopes;
            let exp = now.timestamp() + duration;
            ceiling.check_grant(&snapshot.scopes, &scopes, Some(exp))?;
            // Ephemeral keys carry no rate limit of their own.
            ceiling.check_rate(None)?;
            let secret = signer.mint(project, &scopes, exp);
            let expire = Utc.timestamp_opt(exp, 0).single().unwrap_or(now);
            let model = KeyRecord {
                id: String::new(),
                project: project.to_owned(),
                kind: KeyKind::Standard,
                name: String::new(),
                description: String::new(),
                scopes,
                expire: Some(expire),
                created_at: now,
                updated_at: now,
                accessed_at: None,
                sdks: Vec::new(),
                digest: secret.digest(),
                previous: None,
                rate_limit: None,
            }
            .to_model(Some(&secret));
            json(StatusCode::CREATED, &model)
        }
    }
}

fn endpoint_kind(endpoint: Endpoint) -> KeyKind {
    match endpoint {
        Endpoint::ListDevKeys
        | Endpoint::CreateDevKey
        | Endpoint::GetDevKey
        | Endpoint::UpdateDevKey
        | Endpoint::DeleteDevKey => KeyKind::Dev,
        _ => KeyKind::Standard,
    }
}

/// The longest window a key's own rate limit may have.
pub const KEY_RATE_WINDOW_MAX: u32 = 30 * 24 * 3600;

fn check_rate_limit(requested: Option<KeyRateLimit>) -> Result<Option<KeyRateLimit>, Rejection> {
    match requested {
        Some(r) if r.limit == 0 || r.window_secs == 0 || r.window_secs > KEY_RATE_WINDOW_MAX => {
            Err(invalid(format!(
                "rateLimit needs limit >= 1 and window 1-{KEY_RATE_WINDOW_MAX} seconds"
            )))
        }
        other => Ok(other),
    }
}

/// A dev key's name and mandatory expiry, within `dev_keys.max_duration`.
fn dev_key_fields(
    snapshot: &Snapshot,
    body: DevKeyBody,
    now: DateTime<Utc>,
) -> Result<(String, DateTime<Utc>), Rejection> {
    let name_len = body.name.chars().count();
    if name_len == 0 || name_len > input::NAME_MAX {
        return Err(invalid(format!(
            "name must be 1-{} characters",
            input::NAME_MAX
        )));
    }
    let expire = parse_expire(body.expire.as_deref())?
        .ok_or_else(|| invalid("a dev key needs an expire date"))?;
    let max =
        chrono::Duration::from_std(snapshot.dev_keys.max_duration).unwrap_or(chrono::Duration::MAX);
    if expire <= now || expire > now + max {
        return Err(invalid(format!(
            "expire must be in the future and at most {} away",
            humantime::format_duration(snapshot.dev_keys.max_duration)
        )));
    }
    Ok((body.name, expire))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct DevKeyBody {
    #[serde(default)]
    key_id: Option<String>,
    name: String,
    #[serde(default)]
    expire: Option<String>,
}

/// The editable fields of an API key, as create and update (a full replace) take them.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct KeyFields {
    name: String,
    #[serde(default)]
    description: Option<String>,
    /// Optional on create (no scopes), required on update (Appwrite's PUT).
    #[serde(default)]
    scopes: Option<Vec<String>>,
    #[serde(default)]
    expire: Option<String>,
    #[serde(default)]
    rate_limit: Option<KeyRateLimit>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CreateBody {
    #[serde(default)]
    key_id: Option<String>,
    #[serde(flatten)]
    fields: KeyFields,
}

/// Validates an API key's fields and holds them to the caller's ceiling.
fn granted_fields(
    snapshot: &Snapshot,
    ceiling: &Ceiling,
    fields: KeyFields,
    scopes_required: bool,
) -> Result<(KeyInput, Option<KeyRateLimit>), Rejection> {
    let scopes = match fields.scopes {
        Some(scopes) => scopes,
        None if scopes_required => return Err(invalid("request body: missing field `scopes`")),
        None => Vec::new(),
    };
    let input = KeyInput {
        name: fields.name,
        description: fields.description.unwrap_or_default(),
        scopes,
        expire: parse_expire(fields.expire.as_deref())?,
    }
    .validate(snapshot)
    .map_err(invalid)?;
    let rate_limit = check_rate_limit(fields.rate_limit)?;
    ceiling.check_grant(
        &snapshot.scopes,
        &input.scopes,
        input.expire.map(|e| e.timestamp()),
    )?;
    ceiling.check_rate(rate_limit)?;
    Ok((input, rate_limit))
}

#[derive(Deserialize, Default)]
struct RotateBody {
    /// Seconds the previous secret stays valid.
    #[serde(default)]
    grace: Option<i64>,
}

#[derive(Deserialize)]
struct EphemeralBody {
    scopes: Vec<String>,
    duration: Value,
}

fn invalid(message: impl ToString) -> Rejection {
    Rejection::InvalidArgument(message.to_string())
}

fn store_error(err: StoreError) -> Rejection {
    match err {
        StoreError::AlreadyExists => Rejection::KeyAlreadyExists,
        StoreError::NotFound => Rejection::KeyNotFound,
        StoreError::DuplicateSecret => Rejection::Internal,
        StoreError::Unavailable(reason) => {
            tracing::error!(%reason, "key store write failed");
            Rejection::StoreUnavailable
        }
    }
}

/// A key of this project and kind: API keys and dev keys never see each other.
async fn existing(
    gateway: &Gateway,
    project: &str,
    kind: KeyKind,
    id: Option<&str>,
) -> Result<KeyRecord, Rejection> {
    let id = id.ok_or(Rejection::KeyNotFound)?;
    match gateway
        .store()
        .get(project, id)
        .await
        .map_err(store_error)?
    {
        Some(key) if key.kind == kind => Ok(key),
        _ => Err(Rejection::KeyNotFound),
    }
}

fn parse_expire(value: Option<&str>) -> Result<Option<DateTime<Utc>>, Rejection> {
    match value {
        None | Some("") => Ok(None),
        Some(value) => input::parse_expire(value).map(Some).map_err(invalid),
    }
}

/// A JSON number with no fractional part (the SDKs send durations as floats).
fn whole_seconds(value: &Value) -> Option<i64> {
    value.as_i64().or_else(|| {
        value
            .as_f64()
            .filter(|f| f.fract() == 0.0 && f.abs() < 1e12)
            .map(|f| f as i64)
    })
}

async fn read_bytes(body: Incoming) -> Result<bytes::Bytes, Rejection> {
    match Limited::new(body, BODY_LIMIT).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(err)
            if err
                .downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(Rejection::PayloadTooLarge)
        }
        Err(_) => Err(invalid("the request body could not be read")),
    }
}

async fn read_json<T: for<'de> Deserialize<'de>>(body: Incoming) -> Result<T, Rejection> {
    let bytes = read_bytes(body).await?;
    serde_json::from_slice(&bytes).map_err(|e| invalid(format!("request body: {e}")))
}

async fn read_json_or_empty<T: for<'de> Deserialize<'de> + Default>(
    body: Incoming,
) -> Result<T, Rejection> {
    let bytes = read_bytes(body).await?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(&bytes).map_err(|e| invalid(format!("request body: {e}")))
}

fn json(status: StatusCode, value: &impl serde::Serialize) -> Result<Response<Body>, Rejection> {
    let bytes = serde_json::to_vec(value).map_err(|_| Rejection::Internal)?;
    let mut response = Response::new(full_body(bytes));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response.headers_mut().insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    Ok(response)
}

//! The authorization decision: request head + snapshot + key cache → allow with a
//! [`Principal`], or a typed [`Rejection`]. Pure apart from the cache read: the clock is an
//! argument, nothing is written, and the allow path does not allocate for a normalized path.
//!
//! Steps, in order (DESIGN "request pipeline" 1–5): normalize the target, find the route, read
//! the credential headers, resolve the key, check the project, the expiry and the scopes.

use std::borrow::Cow;
use std::sync::Arc;

use http::{header, HeaderMap, HeaderName, Method, Uri};

use crate::config::Snapshot;
use crate::error::Rejection;
use crate::keys::cache::{CachedKey, KeyCache};
use crate::keys::ephemeral::EphemeralKey;
use crate::keys::scopes::ScopeSet;
use crate::keys::{Digest, KeyKind, EPHEMERAL_PREFIX};
use crate::routes::normalize::normalize_path;
use crate::routes::Route;

pub const KEY_HEADER: &str = "x-appwrite-key";
pub const DEV_KEY_HEADER: &str = "x-appwrite-dev-key";
pub const PROJECT_HEADER: &str = "x-appwrite-project";

const KEY: HeaderName = HeaderName::from_static(KEY_HEADER);
const DEV_KEY: HeaderName = HeaderName::from_static(DEV_KEY_HEADER);
const PROJECT: HeaderName = HeaderName::from_static(PROJECT_HEADER);

/// Who is calling.
#[derive(Debug, Clone)]
pub enum Principal {
    /// No key: Appwrite's `guests` role, holding the configured guest scopes.
    Guest,
    /// A valid, unexpired API key of the project the request names.
    Key(Arc<CachedKey>),
    /// A valid, unexpired ephemeral key (stateless; never stored).
    Ephemeral(Arc<EphemeralKey>),
}

impl Principal {
    /// The key id for logs and audit: the stored key's id, `ephemeral`, or nothing for guests.
    pub fn key_id(&self) -> Option<&str> {
        match self {
            Principal::Guest => None,
            Principal::Key(key) => Some(&key.id),
            Principal::Ephemeral(_) => Some("ephemeral"),
        }
    }

    pub fn project(&self) -> Option<&str> {
        match self {
            Principal::Guest => None,
            Principal::Key(key) => Some(&key.project),
            Principal::Ephemeral(key) => Some(&key.project),
        }
    }

    /// The principal's own expiry, Unix seconds (`None`: never, or a guest).
    pub fn expire(&self) -> Option<i64> {
        match self {
            Principal::Guest => None,
            Principal::Key(key) => key.expire(),
            Principal::Ephemeral(key) => Some(key.exp),
        }
    }

    /// A short label for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Principal::Guest => "guest",
            Principal::Key(_) => "key",
            Principal::Ephemeral(_) => "ephemeral",
        }
    }
}

/// An allowed request.
#[derive(Debug)]
pub struct Decision<'s, 'r> {
    pub route: &'s Route,
    pub principal: Principal,
    /// The scopes the caller holds (key scopes plus implicit ones, or the guest scopes).
    pub scopes: ScopeSet,
    /// The normalized path: what was authorized, and exactly what must be forwarded.
    pub path: Cow<'r, str>,
    /// The project the request is for (from the path of `/v1/projects/{projectId}/…` routes,
    /// else from `X-Appwrite-Project`), when it names one.
    pub project: Option<Cow<'r, str>>,
    /// A valid dev key sent in `X-Appwrite-Dev-Key`. It grants no scope; it only exempts the
    /// request from abuse limits and the origin check.
    pub dev_key: Option<Arc<CachedKey>>,
    /// The request's `Origin`, when it sent one and passed the origin check.
    pub origin: Option<&'r http::HeaderValue>,
}

impl Decision<'_, '_> {
    /// API keys (standard and ephemeral) and valid dev keys are exempt from route abuse limits,
    /// as in Appwrite.
    pub fn exempt_from_route_limits(&self) -> bool {
        self.dev_key.is_some() || !matches!(self.principal, Principal::Guest)
    }
}

/// Decides one request. `now` is the current time in Unix seconds.
pub fn decide<'s, 'r>(
    snapshot: &'s Snapshot,
    keys: &KeyCache,
    method: &Method,
    uri: &'r Uri,
    headers: &'r HeaderMap,
    now: i64,
) -> Result<Decision<'s, 'r>, Rejection> {
    check_authority(uri, headers)?;
    let path = normalize_path(uri.path())?;
    let route = snapshot
        .routes
        .find(method, &path)
        .ok_or(Rejection::RouteNotFound)?;

    let key = single_header(headers, &KEY, "X-Appwrite-Key")?;
    let header_project = single_header(headers, &PROJECT, "X-Appwrite-Project")?
        .map(|v| {
            v.to_str()
                .map_err(|_| Rejection::BadHeader("X-Appwrite-Project"))
        })
        .transpose()?;
    let project: Option<Cow<'r, str>> = match route.path_project(&path) {
        Some(in_path) => {
            if header_project.is_some_and(|h| h != in_path) {
                return Err(Rejection::ProjectMismatch);
            }
            Some(match &path {
                Cow::Borrowed(p) => Cow::Borrowed(route.path_project(p).unwrap_or_default()),
                Cow::Owned(_) => Cow::Owned(in_path.to_owned()),
            })
        }
        None => header_project.map(Cow::Borrowed),
    };

    let principal = match key {
        None => {
            if let Some(project) = &project {
                snapshot.project(project).ok_or(Rejection::UnknownProject)?;
            }
            Principal::Guest
        }
        Some(value) => {
            let secret =
                std::str::from_utf8(value.as_bytes()).map_err(|_| Rejection::UnknownKey)?;
            let principal = resolve(snapshot, keys, secret, now)?;
            let key_project = principal.project().unwrap_or_default();
            if project.as_deref() != Some(key_project) {
                return Err(Rejection::ProjectMismatch);
            }
            if snapshot.project(key_project).is_none() {
                return Err(Rejection::UnknownProject);
            }
            if principal.expire().is_some_and(|expire| expire <= now) {
                return Err(Rejection::KeyExpired);
            }
            principal
        }
    };

    let dev_key = match single_header(headers, &DEV_KEY, "X-Appwrite-Dev-Key")? {
        None => None,
        Some(value) => Some(resolve_dev_key(
            snapshot,
            keys,
            value.as_bytes(),
            project.as_deref(),
            now,
        )?),
    };

    // Browsers name their origin; API keys and dev keys skip the check, as in Appwrite.
    let origin = single_header(headers, &header::ORIGIN, "Origin")?;
    if let Some(origin) = origin {
        let checked = matches!(principal, Principal::Guest) && dev_key.is_none();
        if checked && !origin_allowed(snapshot, project.as_deref(), origin.as_bytes()) {
            return Err(Rejection::UnknownOrigin);
        }
    }

    let scopes = match &principal {
        Principal::Guest => snapshot.guest_scopes,
        Principal::Key(key) => key.scopes().union(&snapshot.implicit_scopes),
        Principal::Ephemeral(key) => key.scopes.union(&snapshot.implicit_scopes),
    };
    if !route.public && !route.scopes.intersects(&scopes) {
        return Err(Rejection::MissingScope {
            principal: match (&principal, &dev_key) {
                (Principal::Guest, None) => "a guest (no API key)",
                (Principal::Guest, Some(_)) => "a dev key (which grants no scope)",
                _ => "the API key",
            },
            needed: route.scope_names.clone(),
        });
    }
    Ok(Decision {
        route,
        principal,
        scopes,
        path,
        project,
        dev_key,
        origin,
    })
}

/// Whether a browser origin may call for `project` (for any configured project when the request
/// names none).
pub fn origin_allowed(snapshot: &Snapshot, project: Option<&str>, origin: &[u8]) -> bool {
    match project {
        Some(project) => snapshot
            .project(project)
            .is_some_and(|p| p.allows_origin(origin)),
        None => snapshot.projects.values().any(|p| p.allows_origin(origin)),
    }
}

/// A dev key: a `dev` kind key of the request's project, dev keys enabled there, not expired.
/// An API key sent here is simply unknown.
fn resolve_dev_key(
    snapshot: &Snapshot,
    keys: &KeyCache,
    secret: &[u8],
    project: Option<&str>,
    now: i64,
) -> Result<Arc<CachedKey>, Rejection> {
    let secret = std::str::from_utf8(secret).map_err(|_| Rejection::UnknownKey)?;
    if secret.is_empty() {
        return Err(Rejection::UnknownKey);
    }
    let key = keys
        .lookup(&Digest::of(secret))
        .ok_or(Rejection::UnknownKey)?;
    // Dev keys are not rotated today; a previous secret past its deadline is refused all the
    // same, as for API keys.
    if key.kind != KeyKind::Dev || key.secret_valid_until().is_some_and(|until| until <= now) {
        return Err(Rejection::UnknownKey);
    }
    if project != Some(&*key.project) {
        return Err(Rejection::ProjectMismatch);
    }
    if !snapshot.project(&key.project).is_some_and(|p| p.dev_keys) {
        return Err(Rejection::FeatureDisabled("dev keys"));
    }
    if key.expire().is_none_or(|expire| expire <= now) {
        return Err(Rejection::DevKeyExpired);
    }
    Ok(key)
}

/// An absolute-form target (or an HTTP/2 `:authority`) must agree with `Host` when both exist.
fn check_authority(uri: &Uri, headers: &HeaderMap) -> Result<(), Rejection> {
    let Some(authority) = uri.authority() else {
        return Ok(());
    };
    let mut hosts = headers.get_all(header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (None, _) => Ok(()),
        (Some(host), None)
            if host
                .as_bytes()
                .eq_ignore_ascii_case(authority.as_str().as_bytes()) =>
        {
            Ok(())
        }
        (Some(_), None) => Err(Rejection::BadTarget(
            "the target's authority disagrees with Host",
        )),
        (Some(_), Some(_)) => Err(Rejection::RepeatedHeader("Host")),
    }
}

fn single_header<'h>(
    headers: &'h HeaderMap,
    name: &HeaderName,
    display: &'static str,
) -> Result<Option<&'h http::HeaderValue>, Rejection> {
    let mut values = headers.get_all(name).iter();
    match (values.next(), values.next()) {
        (Some(_), Some(_)) => Err(Rejection::RepeatedHeader(display)),
        (first, _) => Ok(first),
    }
}

/// Secret → principal. A malformed or unknown secret is an unknown key; nothing is compared as
/// a string: standard keys are looked up by digest, ephemeral keys verified by signature. A dev
/// key sent as an API key is unknown, as is a rotated-out secret past its grace period.
fn resolve(
    snapshot: &Snapshot,
    keys: &KeyCache,
    secret: &str,
    now: i64,
) -> Result<Principal, Rejection> {
    if secret.is_empty() {
        return Err(Rejection::UnknownKey);
    }
    if secret.starts_with(EPHEMERAL_PREFIX) {
        let signer = snapshot.ephemeral.as_ref().ok_or(Rejection::UnknownKey)?;
        return Ok(Principal::Ephemeral(Arc::new(signer.verify(
            secret,
            &snapshot.scopes,
            now,
        )?)));
    }
    let key = keys
        .lookup(&Digest::of(secret))
        .ok_or(Rejection::UnknownKey)?;
    if key.kind != KeyKind::Standard || key.secret_valid_until().is_some_and(|until| until <= now) {
        return Err(Rejection::UnknownKey);
    }
    Ok(Principal::Key(key))
}

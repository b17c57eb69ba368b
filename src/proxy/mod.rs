//! The request lifecycle on the public listener, in named phases:
//!
//! 1. `preflight` — CORS preflights are answered here;
//! 2. `decide` — normalize, route, credentials, project, origin, scopes ([`crate::auth`]);
//! 3. `limit` — abuse limits for guests, and a key's own limit;
//! 4. `dispatch` — keygate's key API, or the upstream with rewritten headers and streamed bodies;
//! 5. `record` — metrics and one access-log line (never a secret).

pub mod cors;
mod forward;
pub mod headers;
pub mod upstream;

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, Request, Response};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;

use crate::admin::{self, handler::AdminCall};
use crate::auth::{decide, Decision, Principal};
use crate::config::Snapshot;
use crate::error::Rejection;
use crate::gateway::Gateway;
use crate::limits::counter::Verdict;
use crate::limits::{counter_key, RequestFacts};
use crate::metrics as m;
use crate::routes::RouteTarget;
use headers::{Forwarding, REQUEST_ID};
use upstream::RequestTarget;

/// The header Appwrite SDKs name themselves in.
const SDK_NAME: HeaderName = HeaderName::from_static("x-sdk-name");

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body of every response keygate sends.
pub type Body = BoxBody<Bytes, BoxError>;

pub fn full_body(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// Where a connection came from.
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    pub https: bool,
    /// The address as `X-Forwarded-For` carries it, made once per connection.
    pub forwarded_for: HeaderValue,
}

impl Peer {
    pub fn new(addr: SocketAddr, https: bool) -> Peer {
        Peer {
            addr,
            https,
            forwarded_for: HeaderValue::from_str(&addr.ip().to_string())
                .expect("an IP address is a valid header value"),
        }
    }
}

/// What the record phase needs to know about a request.
#[derive(Default)]
struct Outcome {
    route: Option<usize>,
    principal: &'static str,
    key_id: Option<String>,
    project: Option<String>,
    /// `allowed`, or the Appwrite error type of the rejection.
    result: &'static str,
    /// What the authorization decision alone said (`allowed` or its refusal), when it ran.
    decision: Option<&'static str>,
    /// The origin to grant CORS access to on the response.
    cors: Option<HeaderValue>,
    upstream: Option<(String, Duration)>,
}

/// Handles one request on the public listener.
pub async fn handle(gateway: &Gateway, req: Request<Incoming>, peer: &Peer) -> Response<Body> {
    let started = Instant::now();
    let request_id = request_id(req.headers().get(REQUEST_ID));
    let method = req.method().clone();

    let (mut response, outcome) = if cors::is_preflight(&req) {
        let outcome = Outcome {
            result: "preflight",
            ..Outcome::default()
        };
        (cors::preflight(req.headers()), outcome)
    } else {
        let snapshot = gateway.snapshot();
        process(gateway, &snapshot, req, peer, &request_id).await
    };

    let headers = response.headers_mut();
    headers.insert(REQUEST_ID, request_id.clone());
    if let Some(origin) = &outcome.cors {
        cors::grant(headers, origin);
    }
    record(
        &method,
        &request_id,
        response.status().as_u16(),
        &outcome,
        started,
    );
    response
}

async fn process(
    gateway: &Gateway,
    snapshot: &Snapshot,
    mut req: Request<Incoming>,
    peer: &Peer,
    request_id: &HeaderValue,
) -> (Response<Body>, Outcome) {
    let client_upgrade = forward::is_upgrade(&req).then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    let now = gateway.now();

    let decision = match decide(
        snapshot,
        gateway.keys(),
        &parts.method,
        &parts.uri,
        &parts.headers,
        now,
    ) {
        Ok(decision) => decision,
        Err(rejection) => {
            // Label the refusal with its route when it has one (refusals are the rare path).
            let route = crate::routes::normalize::normalize_path(parts.uri.path())
                .ok()
                .and_then(|path| snapshot.routes.find(&parts.method, &path).map(|r| r.index));
            let outcome = Outcome {
                route,
                result: rejection.outcome(),
                decision: Some(rejection.outcome()),
                cors: cors::origin_for_rejection(snapshot, &parts.headers, &rejection),
                ..Outcome::default()
            };
            return (reject(&rejection), outcome);
        }
    };
    let route = decision.route;
    let mut outcome = Outcome {
        route: Some(route.index),
        principal: decision.principal.kind(),
        key_id: decision.principal.key_id().map(str::to_owned),
        project: decision.project.as_deref().map(str::to_owned),
        result: "allowed",
        decision: Some("allowed"),
        cors: decision.origin.cloned(),
        upstream: None,
    };
    if let Principal::Key(key) = &decision.principal {
        gateway.usage().observe(
            gateway.keys(),
            key,
            parts.headers.get(SDK_NAME).map(HeaderValue::as_bytes),
            now,
            snapshot.usage_interval,
        );
    }

    // The counting future is large (Redis round trips); box it only when a limit applies, so
    // the common request's future stays small.
    let verdict = if limits_apply(&decision) {
        Box::pin(limit(
            gateway,
            snapshot,
            &decision,
            &parts.method,
            &parts.uri,
            &parts.headers,
            peer,
            now,
        ))
        .await
    } else {
        None
    };
    if let Some(verdict) = verdict.filter(|v| !v.allowed) {
        metrics::counter!(m::RATE_LIMITED_TOTAL, "route" => route.index.to_string()).increment(1);
        outcome.result = Rejection::RateLimited.outcome();
        let mut response = reject(&Rejection::RateLimited);
        rate_limit_headers(response.headers_mut(), &verdict, now, true);
        return (response, outcome);
    }

    let upstream_index = match route.target {
        RouteTarget::Admin(endpoint) => {
            let call = AdminCall {
                endpoint,
                principal: decision.principal.clone(),
                scopes: decision.scopes,
                project: outcome.project.clone().unwrap_or_default(),
                key_id: snapshot
                    .routes
                    .params(route, &decision.path)
                    .into_iter()
                    .find(|(name, _)| name == "keyId")
                    .map(|(_, value)| value.to_owned()),
                query: parts.uri.query().map(str::to_owned),
            };
            drop(decision);
            let mut response = match Box::pin(admin::handle(gateway, snapshot, call, body)).await {
                Ok(response) => response,
                Err(rejection) => {
                    outcome.result = rejection.outcome();
                    reject(&rejection)
                }
            };
            if let Some(verdict) = &verdict {
                rate_limit_headers(response.headers_mut(), verdict, now, false);
            }
            return (response, outcome);
        }
        RouteTarget::Upstream(index) => decision
            .project
            .as_deref()
            .and_then(|p| snapshot.project(p))
            .and_then(|p| p.upstream)
            .unwrap_or(index),
    };
    let upstream = &snapshot.upstreams[upstream_index];
    let scopes = if upstream.forward_key() {
        None
    } else {
        headers::scopes_header(&snapshot.scopes, &decision.scopes)
    };
    let authority = parts.uri.authority().map(|a| a.as_str().to_owned());
    // The upstream gets the path that was authorized; when normalization left it as sent, the
    // client's request target is passed on as it is.
    let asked = match (decision.path, parts.uri.path_and_query()) {
        (Cow::Borrowed(_), Some(sent)) => RequestTarget::AsSent(sent.clone()),
        (path, _) => RequestTarget::Normalized {
            path: path.into_owned(),
            query: parts.uri.query(),
        },
    };
    let max_body = route.max_body;
    headers::to_upstream(
        &mut parts.headers,
        &Forwarding {
            peer: &peer.forwarded_for,
            https: peer.https,
            request_id,
            forward_key: upstream.forward_key(),
            key_id: outcome.key_id.as_deref(),
            project: outcome.project.as_deref(),
            scopes: scopes.as_ref(),
            authority: authority.as_deref(),
            upgrade: client_upgrade.is_some(),
        },
    );
    let (result, forwarded) = forward::forward(
        upstream,
        parts.method,
        &asked,
        parts.headers,
        body,
        max_body,
        client_upgrade,
    )
    .await;
    m::upstream_done(upstream.name(), forwarded.elapsed);
    outcome.upstream = Some((upstream.name().to_owned(), forwarded.elapsed));
    match result {
        Ok(mut response) => {
            if let Some(verdict) = &verdict {
                rate_limit_headers(response.headers_mut(), verdict, now, false);
            }
            (response, outcome)
        }
        Err(rejection) => {
            outcome.result = rejection.outcome();
            (reject(&rejection), outcome)
        }
    }
}

/// Whether the route's abuse limit (guests only: API keys and dev keys are exempt) or the key's
/// own limit applies to the request.
fn limits_apply(decision: &Decision<'_, '_>) -> bool {
    route_limit(decision).is_some() || own_limit(decision).is_some()
}

fn route_limit<'a>(decision: &Decision<'a, '_>) -> Option<&'a crate::limits::RateLimit> {
    decision
        .route
        .rate_limit
        .as_ref()
        .filter(|_| !decision.exempt_from_route_limits())
}

fn own_limit(decision: &Decision<'_, '_>) -> Option<crate::keys::KeyRateLimit> {
    match &decision.principal {
        Principal::Key(key) => key.rate_limit,
        _ => None,
    }
}

/// Counts the request against the limits that apply to it; returns the tightest verdict, if any
/// limit applies.
#[allow(clippy::too_many_arguments)]
async fn limit(
    gateway: &Gateway,
    snapshot: &Snapshot,
    decision: &Decision<'_, '_>,
    method: &Method,
    uri: &http::Uri,
    headers: &http::HeaderMap,
    peer: &Peer,
    now: i64,
) -> Option<Verdict> {
    let mut verdict: Option<Verdict> = None;
    let mut tighten = |v: Verdict| verdict = Some(verdict.map_or(v, |p| p.tighter(v)));
    let counters = gateway.limits();
    if let Some(limit) = route_limit(decision) {
        let params = snapshot.routes.params(decision.route, &decision.path);
        let facts = RequestFacts {
            ip: peer.addr.ip(),
            method,
            route: decision.route,
            params: &params,
            query: uri.query(),
            headers,
            key_id: decision.principal.key_id().unwrap_or(""),
            project: decision.project.as_deref().unwrap_or(""),
        };
        for template in &limit.keys {
            let key = counter_key(template, &facts);
            tighten(counters.hit(&key, limit.limit, limit.window, now).await);
        }
    }
    if let (Some(own), Principal::Key(key)) = (own_limit(decision), &decision.principal) {
        let counter = format!("key:{}:{}", key.project, key.id);
        let window = Duration::from_secs(own.window_secs.into());
        tighten(counters.hit(&counter, own.limit, window, now).await);
    }
    verdict
}

fn rate_limit_headers(headers: &mut http::HeaderMap, verdict: &Verdict, now: i64, refused: bool) {
    headers.insert("x-ratelimit-limit", verdict.limit.into());
    headers.insert("x-ratelimit-remaining", verdict.remaining.into());
    headers.insert("x-ratelimit-reset", verdict.reset.into());
    if refused {
        headers.insert(
            http::header::RETRY_AFTER,
            (verdict.reset - now).max(1).into(),
        );
    }
}

fn record(
    method: &Method,
    request_id: &HeaderValue,
    status: u16,
    outcome: &Outcome,
    started: Instant,
) {
    let elapsed = started.elapsed();
    let method_label = match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    };
    m::request_done(
        m::RequestLabels {
            route: outcome.route,
            method: method_label,
            status: m::status_class(status),
            outcome: outcome.result,
        },
        outcome.decision,
        elapsed,
    );
    tracing::info!(
        target: "keygate::access",
        request_id = request_id.to_str().unwrap_or(""),
        method = %method,
        route = outcome.route,
        principal = outcome.principal,
        key_id = outcome.key_id.as_deref().unwrap_or(""),
        project = outcome.project.as_deref().unwrap_or(""),
        status,
        outcome = outcome.result,
        upstream = outcome.upstream.as_ref().map(|(name, _)| name.as_str()),
        upstream_us = outcome.upstream.as_ref().map(|(_, d)| d.as_micros() as u64),
        duration_us = elapsed.as_micros() as u64,
    );
}

/// An Appwrite error response for a rejection.
pub fn reject(rejection: &Rejection) -> Response<Body> {
    let response: Response<Full<Bytes>> = rejection.to_body().into_response();
    response.map(|b| b.map_err(|never| match never {}).boxed())
}

/// Keeps a client's request id when it is short and plain, else makes one: a per-process
/// random prefix and a counter, unique without a syscall per request.
fn request_id(sent: Option<&HeaderValue>) -> HeaderValue {
    if let Some(value) = sent {
        let bytes = value.as_bytes();
        if !bytes.is_empty()
            && bytes.len() <= 128
            && bytes
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
        {
            return value.clone();
        }
    }
    static PREFIX: OnceLock<[u8; 12]> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let prefix = PREFIX.get_or_init(|| {
        let mut random = [0u8; 6];
        getrandom::fill(&mut random).expect("the operating system's random source failed");
        let mut prefix = [0u8; 12];
        hex::encode_to_slice(random, &mut prefix).expect("12 bytes hold 6 in hex");
        prefix
    });
    generated_id(prefix, COUNTER.fetch_add(1, Ordering::Relaxed))
}

/// `<prefix>-<n in lower-case hex>`, written on the stack (no formatting machinery).
fn generated_id(prefix: &[u8; 12], n: u64) -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digits = (64 - (n | 1).leading_zeros() as usize).div_ceil(4);
    let mut id = [0u8; 29];
    id[..12].copy_from_slice(prefix);
    id[12] = b'-';
    let len = 13 + digits;
    for (i, slot) in id[13..len].iter_mut().rev().enumerate() {
        *slot = HEX[((n >> (4 * i)) & 0xf) as usize];
    }
    HeaderValue::from_bytes(&id[..len]).expect("hex is a valid header value")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_are_the_prefix_and_the_counter_in_hex() {
        let prefix = *b"0a1b2c3d4e5f";
        let values: [u64; 8] = [0, 1, 9, 15, 16, 0xdead_beef, u64::MAX >> 4, u64::MAX];
        for n in values {
            assert_eq!(
                generated_id(&prefix, n).to_str().unwrap(),
                format!("0a1b2c3d4e5f-{n:x}")
            );
        }
    }

    #[test]
    fn a_plain_client_id_is_kept_and_anything_else_replaced() {
        let kept = HeaderValue::from_static("req-42_a.b:c");
        assert_eq!(request_id(Some(&kept)), kept);
        let odd = HeaderValue::from_static("has space");
        let made = request_id(Some(&odd));
        assert_ne!(made, odd);
        let made = made.to_str().unwrap();
        let (prefix, counter) = made.split_once('-').unwrap();
        assert_eq!(prefix.len(), 12);
        let hex = |s: &str| s.bytes().all(|b| b.is_ascii_hexdigit());
        assert!(hex(prefix) && hex(counter));
        assert_ne!(request_id(None), request_id(None), "two made ids differ");
    }
}

//! The proxy phase: one request in, one response out. Decide, then forward to the route's
//! upstream with rewritten headers and streamed bodies, or answer with an Appwrite error.

pub mod headers;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;

use crate::admin::{self, handler::AdminCall};
use crate::auth::{decide, Principal};
use crate::error::Rejection;
use crate::gateway::Gateway;
use crate::routes::RouteTarget;
use headers::{Forwarding, REQUEST_ID};

/// The header Appwrite SDKs name themselves in.
const SDK_NAME: &str = "x-sdk-name";

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body of every response keygate sends.
pub type Body = BoxBody<Bytes, BoxError>;

pub fn full_body(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// Where a connection came from.
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    pub addr: SocketAddr,
    pub https: bool,
}

/// Handles one request on the public listener.
pub async fn handle(gateway: &Gateway, req: Request<Incoming>, peer: Peer) -> Response<Body> {
    let started = Instant::now();
    let request_id = request_id(req.headers().get(REQUEST_ID));
    let snapshot = gateway.snapshot();
    let (mut parts, body) = req.into_parts();
    let now = chrono::Utc::now().timestamp();

    let decision = decide(
        &snapshot,
        gateway.keys(),
        &parts.method,
        &parts.uri,
        &parts.headers,
        now,
    );
    let decision = match decision {
        Ok(decision) => decision,
        Err(rejection) => {
            tracing::info!(
                target: "keygate::access",
                request_id = request_id.to_str().unwrap_or(""),
                method = %parts.method,
                status = rejection.status_and_type().0.as_u16(),
                outcome = rejection.outcome(),
                duration_us = started.elapsed().as_micros() as u64,
                "rejected"
            );
            return reject(&rejection, &request_id);
        }
    };
    if let Principal::Key(key) = &decision.principal {
        gateway.usage().observe(
            key,
            parts.headers.get(SDK_NAME).map(HeaderValue::as_bytes),
            now,
            snapshot.usage_interval,
        );
    }

    let route = decision.route;
    let key_id = decision.principal.key_id().map(str::to_owned);
    let project = decision.project.as_deref().map(str::to_owned);
    let principal_kind = decision.principal.kind();
    let upstream = match route.target {
        RouteTarget::Upstream(index) => &snapshot.upstreams[index],
        RouteTarget::Admin(endpoint) => {
            let call = AdminCall {
                endpoint,
                principal: decision.principal.clone(),
                scopes: decision.scopes,
                project: project.clone().unwrap_or_default(),
                key_id: snapshot
                    .routes
                    .params(route, &decision.path)
                    .into_iter()
                    .find(|(name, _)| name == "keyId")
                    .map(|(_, value)| value.to_owned()),
                query: parts.uri.query().map(str::to_owned),
            };
            drop(decision);
            let mut response = admin::handle(gateway, &snapshot, call, body)
                .await
                .unwrap_or_else(|rejection| reject(&rejection, &request_id));
            response
                .headers_mut()
                .insert(REQUEST_ID, request_id.clone());
            tracing::info!(
                target: "keygate::access",
                request_id = request_id.to_str().unwrap_or(""),
                route = route.index,
                principal = principal_kind,
                key_id = key_id.as_deref().unwrap_or(""),
                project = project.as_deref().unwrap_or(""),
                status = response.status().as_u16(),
                duration_us = started.elapsed().as_micros() as u64,
                "served"
            );
            return response;
        }
    };
    let uri = match upstream.uri_for(&decision.path, parts.uri.query()) {
        Ok(uri) => uri,
        Err(_) => {
            return reject(
                &Rejection::BadTarget("cannot build the upstream target"),
                &request_id,
            )
        }
    };
    let scope_names = if upstream.forward_key {
        String::new()
    } else {
        snapshot.scopes.names_of(&decision.scopes).join(",")
    };
    let authority = parts.uri.authority().map(|a| a.as_str().to_owned());
    drop(decision);
    headers::to_upstream(
        &mut parts.headers,
        &Forwarding {
            peer: peer.addr.ip(),
            https: peer.https,
            request_id: &request_id,
            forward_key: upstream.forward_key,
            key_id: key_id.as_deref(),
            project: project.as_deref(),
            scopes: &scope_names,
            authority: authority.as_deref(),
        },
    );
    let route_index = route.index;

    parts.uri = uri;
    // The upstream connection's protocol is the client pool's choice, not the client's.
    parts.version = http::Version::HTTP_11;
    let upstream_req = Request::from_parts(parts, body);
    let upstream_started = Instant::now();
    let result =
        tokio::time::timeout(upstream.timeout, upstream.client().request(upstream_req)).await;
    let response = match result {
        Ok(Ok(response)) => response,
        Ok(Err(err)) => {
            tracing::warn!(
                request_id = request_id.to_str().unwrap_or(""),
                upstream = %upstream.name,
                error = %err,
                connect = err.is_connect(),
                "upstream request failed"
            );
            return reject(&Rejection::UpstreamUnavailable, &request_id);
        }
        Err(_) => {
            tracing::warn!(
                request_id = request_id.to_str().unwrap_or(""),
                upstream = %upstream.name,
                timeout_ms = upstream.timeout.as_millis() as u64,
                "upstream timed out"
            );
            return reject(&Rejection::UpstreamTimeout, &request_id);
        }
    };
    let (mut parts, body) = response.into_parts();
    headers::to_client(&mut parts.headers, &request_id);
    tracing::info!(
        target: "keygate::access",
        request_id = request_id.to_str().unwrap_or(""),
        route = route_index,
        principal = principal_kind,
        key_id = key_id.as_deref().unwrap_or(""),
        project = project.as_deref().unwrap_or(""),
        status = parts.status.as_u16(),
        upstream_us = upstream_started.elapsed().as_micros() as u64,
        duration_us = started.elapsed().as_micros() as u64,
        "forwarded"
    );
    Response::from_parts(parts, body.map_err(BoxError::from).boxed())
}

/// An Appwrite error response for a rejection.
pub fn reject(rejection: &Rejection, request_id: &HeaderValue) -> Response<Body> {
    let mut response: Response<Full<Bytes>> = rejection.to_body().into_response();
    response
        .headers_mut()
        .insert(REQUEST_ID, request_id.clone());
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
    static PREFIX: OnceLock<String> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let prefix = PREFIX.get_or_init(|| {
        let mut random = [0u8; 6];
        getrandom::fill(&mut random).expect("the operating system's random source failed");
        hex::encode(random)
    });
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    HeaderValue::from_str(&format!("{prefix}-{n:x}")).expect("hex is a valid header value")
}

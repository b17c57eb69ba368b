//! The forward phase: pick an address, send, and stream the answer back. Bodiless idempotent
//! requests that fail before an answer are retried on another address; failures feed passive
//! health. HTTP/1.1 upgrades (WebSocket: Appwrite realtime) are spliced through after the
//! upstream agrees to switch protocols.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, Entry, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::{Body as _, Incoming};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

use super::upstream::{RequestTarget, SendError, Upstream};
use super::{headers, Body, BoxError};
use crate::error::Rejection;
use crate::metrics as m;

/// The most addresses one request is tried on.
const MAX_TRIES: usize = 8;

/// What the forward phase reports besides the response.
pub struct Forwarded {
    pub elapsed: Duration,
}

/// True for an HTTP/1.1 request asking to switch protocols.
pub fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == http::Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|token| token.trim().eq_ignore_ascii_case("upgrade"))
}

fn idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

/// Sends the request to `upstream`. `headers` are already rewritten for the upstream.
#[allow(clippy::too_many_arguments)]
pub async fn forward(
    upstream: &Upstream,
    method: Method,
    asked: &RequestTarget<'_>,
    mut headers: HeaderMap,
    body: Incoming,
    max_body: Option<u64>,
    client_upgrade: Option<OnUpgrade>,
) -> (Result<Response<Body>, Rejection>, Forwarded) {
    let started = Instant::now();
    let done = |result| {
        (
            result,
            Forwarded {
                elapsed: started.elapsed(),
            },
        )
    };

    if let Some(max) = max_body {
        let declared = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|len| len > max) {
            return done(Err(Rejection::PayloadTooLarge));
        }
    }
    let upgrade = client_upgrade.is_some();
    if upgrade {
        // The switch is negotiated end to end: keep the two headers that ask for it.
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }

    // Worth keeping a copy of the head only when there is another address to try.
    let replayable =
        upstream.targets().len() > 1 && idempotent(&method) && body.is_end_stream() && !upgrade;
    let mut body: Option<Body> = Some(match max_body {
        Some(max) => Limited::new(body, usize::try_from(max).unwrap_or(usize::MAX))
            .map_err(BoxError::from)
            .boxed(),
        None => body.map_err(BoxError::from).boxed(),
    });
    let mut headers = Some(headers);
    let most_tries = upstream.targets().len().min(MAX_TRIES);
    let mut tried = [0usize; MAX_TRIES];
    let mut tries = 0;
    loop {
        let Some((index, _in_flight)) = upstream.pick(&tried[..tries]) else {
            return done(Err(Rejection::UpstreamUnavailable));
        };
        tried[tries] = index;
        tries += 1;
        let target = &upstream.targets()[index];
        let Ok(uri) = target.uri_for(asked) else {
            return done(Err(Rejection::BadTarget(
                "cannot build the upstream target",
            )));
        };
        let mut request = Request::new(body.take().unwrap_or_else(|| {
            Empty::<Bytes>::new()
                .map_err(|never| match never {})
                .boxed()
        }));
        *request.method_mut() = method.clone();
        *request.uri_mut() = uri;
        // The upstream connection's protocol is the pool's choice, not the client's.
        *request.version_mut() = http::Version::HTTP_11;
        *request.headers_mut() = if replayable {
            headers.clone().unwrap_or_default()
        } else {
            headers.take().unwrap_or_default()
        };
        if let Entry::Vacant(host) = request.headers_mut().entry(header::HOST) {
            // An HTTP/1.0 client may send none; HTTP/1.1 requires one.
            if let Ok(value) = HeaderValue::from_str(target.authority().as_str()) {
                host.insert(value);
            }
        }

        let result = tokio::time::timeout(upstream.timeout(), upstream.send(target, request)).await;
        match result {
            Ok(Ok(mut response)) => {
                upstream.report(index, true);
                if response.status() == StatusCode::SWITCHING_PROTOCOLS {
                    if let Some(client_upgrade) = client_upgrade {
                        splice(client_upgrade, hyper::upgrade::on(&mut response));
                    }
                    let (mut parts, _) = response.into_parts();
                    let connection = parts.headers.get(header::CONNECTION).cloned();
                    let protocol = parts.headers.get(header::UPGRADE).cloned();
                    headers::to_client(&mut parts.headers);
                    if let (Some(connection), Some(protocol)) = (connection, protocol) {
                        parts.headers.insert(header::CONNECTION, connection);
                        parts.headers.insert(header::UPGRADE, protocol);
                    }
                    return done(Ok(Response::from_parts(parts, super::full_body(""))));
                }
                let (mut parts, body) = response.into_parts();
                headers::to_client(&mut parts.headers);
                return done(Ok(Response::from_parts(
                    parts,
                    body.map_err(BoxError::from).boxed(),
                )));
            }
            Ok(Err(err)) => {
                if too_large(&err) {
                    return done(Err(Rejection::PayloadTooLarge));
                }
                let kind = if err.is_connect() { "connect" } else { "other" };
                metrics::counter!(m::UPSTREAM_ERRORS_TOTAL, "upstream" => upstream.name().to_owned(), "kind" => kind)
                    .increment(1);
                tracing::warn!(upstream = upstream.name(), address = %target.authority(), error = %err, kind, "upstream request failed");
                eject_if_due(upstream, index);
                if replayable && tries < most_tries {
                    continue;
                }
                return done(Err(Rejection::UpstreamUnavailable));
            }
            Err(_) => {
                metrics::counter!(m::UPSTREAM_ERRORS_TOTAL, "upstream" => upstream.name().to_owned(), "kind" => "timeout")
                    .increment(1);
                tracing::warn!(upstream = upstream.name(), address = %target.authority(), timeout_ms = upstream.timeout().as_millis() as u64, "upstream timed out");
                eject_if_due(upstream, index);
                return done(Err(Rejection::UpstreamTimeout));
            }
        }
    }
}

fn eject_if_due(upstream: &Upstream, index: usize) {
    if upstream.report(index, false) {
        tracing::warn!(
            upstream = upstream.name(),
            address = %upstream.targets()[index].authority(),
            rest_ms = upstream.settings.eject_for.as_millis() as u64,
            "address ejected after consecutive failures"
        );
        metrics::counter!(m::UPSTREAM_EJECTIONS_TOTAL, "upstream" => upstream.name().to_owned())
            .increment(1);
    }
}

/// Whether a client error came from the request body exceeding the route's limit.
fn too_large(err: &SendError) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = source {
        if e.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = e.source();
    }
    false
}

/// Copies bytes both ways between the client and the upstream once both have switched.
fn splice(client: OnUpgrade, upstream: OnUpgrade) {
    tokio::spawn(async move {
        let (client, upstream) = match tokio::try_join!(client, upstream) {
            Ok(pair) => pair,
            Err(err) => {
                tracing::debug!(error = %err, "upgrade did not complete");
                return;
            }
        };
        let mut client = TokioIo::new(client);
        let mut upstream = TokioIo::new(upstream);
        if let Err(err) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
            tracing::debug!(error = %err, "upgraded connection ended with an error");
        }
    });
}

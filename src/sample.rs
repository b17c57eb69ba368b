//! The bundled sample upstream: an HTTP echo service that answers every request with a JSON
//! description of what it received (method, target, headers, body). The default config points
//! at it, and the tests use it to see exactly what keygate forwarded.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;

use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use tokio::net::TcpListener;

use crate::proxy::{full_body, Body};

/// Bodies up to this size are echoed back; larger ones are only counted and hashed.
const ECHO_LIMIT: usize = 64 * 1024;

/// What the sample upstream saw.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Echo {
    pub method: String,
    /// Path and query, exactly as received.
    pub target: String,
    pub headers: BTreeMap<String, Vec<String>>,
    pub body_length: u64,
    pub body_sha256: String,
    /// The body, when it is UTF-8 and at most 64 KiB.
    pub body: Option<String>,
}

impl Echo {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(name)
            .and_then(|v| v.first())
            .map(String::as_str)
    }
}

/// Serves the echo service on `listener` until `shutdown` resolves.
pub async fn run(listener: TcpListener, shutdown: impl Future<Output = ()>) -> std::io::Result<()> {
    let builder = auto::Builder::new(TokioExecutor::new());
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = accepted?;
                let builder = builder.clone();
                tokio::spawn(async move {
                    let service = service_fn(|req| async { Ok::<_, Infallible>(echo(req).await) });
                    let _ = builder.serve_connection(TokioIo::new(stream), service).await;
                });
            }
            () = &mut shutdown => return Ok(()),
        }
    }
}

async fn echo(req: Request<Incoming>) -> Response<Body> {
    let (parts, mut body) = req.into_parts();
    let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, value) in &parts.headers {
        headers
            .entry(name.as_str().to_owned())
            .or_default()
            .push(String::from_utf8_lossy(value.as_bytes()).into_owned());
    }
    let mut hasher = Sha256::new();
    let mut length = 0u64;
    let mut kept = Vec::new();
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else { break };
        if let Ok(data) = frame.into_data() {
            length += data.len() as u64;
            hasher.update(&data);
            if kept.len() + data.len() <= ECHO_LIMIT {
                kept.extend_from_slice(&data);
            }
        }
    }
    let echo = Echo {
        method: parts.method.to_string(),
        target: parts
            .uri
            .path_and_query()
            .map_or_else(|| parts.uri.path().to_owned(), |pq| pq.as_str().to_owned()),
        headers,
        body_length: length,
        body_sha256: hex::encode(hasher.finalize()),
        body: (length as usize == kept.len())
            .then(|| String::from_utf8(kept).ok())
            .flatten(),
    };
    let mut response = Response::new(full_body(serde_json::to_vec(&echo).unwrap_or_default()));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

//! Listeners: accept connections and serve them with hyper (HTTP/1.1 and cleartext HTTP/2 on
//! one port), until the shutdown future resolves; then stop accepting and let open connections
//! finish their requests.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

use crate::gateway::Gateway;
use crate::proxy::{self, full_body, Body, Peer};

/// How long in-flight requests may run after shutdown begins.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

fn connection_builder() -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(64 * 1024);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(256)
        .max_header_list_size(64 * 1024);
    builder
}

/// Serves the public (proxy) listener.
pub async fn run(
    listener: TcpListener,
    gateway: Arc<Gateway>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    serve(listener, shutdown, move |peer| {
        let gateway = Arc::clone(&gateway);
        service_fn(move |req: Request<Incoming>| {
            let gateway = Arc::clone(&gateway);
            async move { Ok::<_, Infallible>(proxy::handle(&gateway, req, peer).await) }
        })
    })
    .await
}

/// Serves the ops listener: `/healthz` (the process is alive), `/readyz` (config loaded and
/// the store reachable) and `/metrics` (Prometheus).
pub async fn run_ops(
    listener: TcpListener,
    gateway: Arc<Gateway>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    serve(listener, shutdown, move |_peer| {
        let gateway = Arc::clone(&gateway);
        service_fn(move |req: Request<Incoming>| {
            let gateway = Arc::clone(&gateway);
            async move { Ok::<_, Infallible>(ops(&gateway, req).await) }
        })
    })
    .await
}

async fn ops(gateway: &Gateway, req: Request<Incoming>) -> Response<Body> {
    let json = |status: StatusCode, value: serde_json::Value| {
        let mut response = Response::new(full_body(value.to_string()));
        *response.status_mut() = status;
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        response
    };
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => json(StatusCode::OK, serde_json::json!({"status": "ok"})),
        (&Method::GET, "/metrics") => {
            let mut response = Response::new(full_body(crate::metrics::install().render()));
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            response
        }
        (&Method::GET, "/readyz") => match gateway.store().ping().await {
            Ok(()) => json(
                StatusCode::OK,
                serde_json::json!({"status": "ready", "store": "ok", "keys": gateway.keys().len()}),
            ),
            Err(err) => json(
                StatusCode::SERVICE_UNAVAILABLE,
                serde_json::json!({"status": "not ready", "store": err.to_string()}),
            ),
        },
        _ => json(
            StatusCode::NOT_FOUND,
            serde_json::json!({"status": "not found"}),
        ),
    }
}

async fn serve<S, F>(
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
    make_service: F,
) -> std::io::Result<()>
where
    F: Fn(Peer) -> S,
    S: hyper::service::Service<Request<Incoming>, Response = Response<Body>, Error = Infallible>
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let builder = connection_builder();
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, addr) = match accepted {
                    Ok(accepted) => accepted,
                    Err(err) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %err, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let service = make_service(Peer { addr, https: false });
                let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                let connection = graceful.watch(connection.into_owned());
                tokio::spawn(async move {
                    if let Err(err) = connection.await {
                        tracing::debug!(error = %err, "connection ended with an error");
                    }
                });
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(SHUTDOWN_GRACE) => {
            tracing::warn!("shutdown grace period over; closing remaining connections");
        }
    }
    Ok(())
}

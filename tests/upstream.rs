//! Upstream failures and streaming: 502 when the upstream is down, 504 when it is slower than its
//! timeout, and a 1 GiB upload that passes through in bounded memory.

mod common;

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};

use std::task::{Context, Poll};

use bytes::Bytes;
use common::{Harness, ServeProcess};
use http::{Method, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

const ONE_ROUTE: &str = r#"
server: { listen: "127.0.0.1:0" }
store: { url: "sqlite://{db}" }
projects: { demo: {} }
upstreams:
  slow: { url: "http://{upstream}", timeout: 300ms, connect_timeout: 1s }
routes:
  - { methods: [GET, POST, PUT], path: "/v1/**", public: true }
"#;

#[tokio::test]
async fn upstream_down_is_a_502_in_appwrite_shape() {
    // A port that was just free: nothing listens there.
    let port = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let (stop, _) = oneshot::channel();
    let h = Harness::start_in_front_of(ONE_ROUTE, port, stop).await;
    h.request(Method::GET, "/v1/anything", &[], "")
        .await
        .assert_error(502, "general_bad_gateway");
}

#[tokio::test]
async fn upstream_slower_than_its_timeout_is_a_504() {
    // An upstream that reads requests and never answers.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut buf = [0u8; 1024];
            let _ = stream.read(&mut buf).await;
            held.push(stream);
        }
    });
    let (stop, _) = oneshot::channel();
    let h = Harness::start_in_front_of(ONE_ROUTE, addr, stop).await;
    let response = h.request(Method::GET, "/v1/slow", &[], "").await;
    response.assert_error(504, "general_gateway_timeout");
    assert!(response.headers.contains_key("x-request-id"));
}

/// A request body of `remaining` bytes, produced chunk by chunk, never held whole.
struct Generated {
    chunk: Bytes,
    remaining: u64,
}

impl Body for Generated {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        let n = self.remaining.min(self.chunk.len() as u64);
        self.remaining -= n;
        Poll::Ready(Some(Ok(Frame::data(self.chunk.slice(..n as usize)))))
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::SizeHint::with_exact(self.remaining)
    }
}

/// An upstream that counts body bytes as they stream past and answers with the count.
async fn start_counting_upstream() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = service_fn(|req: Request<Incoming>| async move {
                    let counted = AtomicU64::new(0);
                    let mut body = req.into_body();
                    while let Some(Ok(frame)) = body.frame().await {
                        if let Some(data) = frame.data_ref() {
                            counted.fetch_add(data.len() as u64, Ordering::Relaxed);
                        }
                    }
                    let n = counted.load(Ordering::Relaxed);
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(n.to_string()))))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_1_gib_upload_streams_through_in_bounded_memory() {
    const SIZE: u64 = 1 << 30;
    let upstream = start_counting_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("keygate.yaml");
    let text =
        common::fill(ONE_ROUTE, upstream, &dir.path().join("keys.db")).replace("300ms", "120s");
    std::fs::write(&config, text).unwrap();
    let gateway = ServeProcess::start(&config).await;

    let client =
        hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http::<Generated>();
    let request = Request::builder()
        .method(Method::PUT)
        .uri(format!("http://{}/v1/upload", gateway.addr))
        .body(Generated {
            chunk: Bytes::from(vec![0x5a; 256 * 1024]),
            remaining: SIZE,
        })
        .unwrap();
    let response = client.request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(String::from_utf8_lossy(&body), SIZE.to_string());

    let peak = gateway.peak_rss();
    eprintln!("gateway peak RSS during a 1 GiB upload: {} MiB", peak >> 20);
    assert!(peak < 100 << 20, "peak RSS {} MiB", peak >> 20);
}

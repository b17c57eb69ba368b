//! Graceful shutdown: on SIGTERM keygate stops accepting at once, lets a slow streamed response
//! in flight finish inside the grace period, then exits cleanly.

mod common;

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use common::{eventually, ServeProcess};
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::Frame;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};

const CHUNKS: usize = 6;

/// An upstream that streams `CHUNKS` chunks, 150 ms apart: the slow response of the test.
async fn start_slow_upstream() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = service_fn(|_req: Request<hyper::body::Incoming>| async {
                    let chunks = futures_util::stream::unfold(0usize, |n| async move {
                        if n == CHUNKS {
                            return None;
                        }
                        if n > 0 {
                            tokio::time::sleep(Duration::from_millis(150)).await;
                        }
                        Some((
                            Ok::<_, Infallible>(Frame::data(Bytes::from(format!("chunk-{n};")))),
                            n + 1,
                        ))
                    });
                    Ok::<_, Infallible>(Response::new(StreamBody::new(chunks)))
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
async fn sigterm_lets_a_slow_stream_finish_and_refuses_new_connections() {
    let upstream = start_slow_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("keygate.yaml");
    std::fs::write(
        &config,
        common::fill(
            r#"
server: { listen: "127.0.0.1:0", shutdown_grace: 10s }
store: { url: "sqlite://{db}" }
upstreams: { slow: { url: "http://{upstream}" } }
routes:
  - { methods: [GET], path: "/v1/stream", public: true }
"#,
            upstream,
            &dir.path().join("keys.db"),
        ),
    )
    .unwrap();
    let mut gateway = ServeProcess::start(&config).await;
    let addr = gateway.addr;

    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    let request = Request::get(format!("http://{addr}/v1/stream"))
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(&first[..], b"chunk-0;");

    // SIGTERM while the response is still streaming.
    let pid = gateway.child.id().unwrap().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());

    let refused = eventually(Duration::from_secs(3), || async {
        TcpStream::connect(addr).await.is_err()
    })
    .await;
    assert!(
        refused.is_some(),
        "new connections were still accepted after SIGTERM"
    );

    let mut rest = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            rest.extend_from_slice(&data);
        }
    }
    let expected: String = (1..CHUNKS).map(|n| format!("chunk-{n};")).collect();
    assert_eq!(
        String::from_utf8(rest).unwrap(),
        expected,
        "the stream in flight was cut"
    );

    let status = tokio::time::timeout(Duration::from_secs(10), gateway.child.wait())
        .await
        .expect("keygate did not exit after the in-flight request finished")
        .unwrap();
    assert!(status.success(), "{status:?}");
}

//! Request limits: oversized or too many headers get 431, bodies over a route's `max_body` get
//! 413 (declared or streamed), and a slow client is cut off by the header-read timeout.

mod common;

use std::time::Duration;

use common::{raw_request, Harness};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CONFIG: &str = r#"
server: { listen: "127.0.0.1:0", max_header_bytes: 16KiB, max_headers: 40, header_read_timeout: 1s }
store: { url: "sqlite://{db}" }
upstreams: { echo: { url: "http://{upstream}" } }
routes:
  - { methods: [POST], path: /v1/small, public: true, max_body: 1KiB }
  - { methods: [GET, POST], path: "/v1/open/**", public: true }
"#;

#[tokio::test]
async fn oversized_and_too_many_headers_get_431() {
    let h = Harness::start_with(CONFIG).await;
    let big = format!(
        "GET /v1/open/x HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
        "a".repeat(32 * 1024)
    );
    let (status, _) = raw_request(h.addr, big.as_bytes()).await;
    assert_eq!(status, 431);

    let many: String = (0..60).map(|i| format!("X-H{i}: v\r\n")).collect();
    let request = format!("GET /v1/open/x HTTP/1.1\r\nHost: x\r\n{many}Connection: close\r\n\r\n");
    let (status, _) = raw_request(h.addr, request.as_bytes()).await;
    assert_eq!(status, 431);

    let fine: String = (0..20).map(|i| format!("X-H{i}: v\r\n")).collect();
    let request = format!("GET /v1/open/x HTTP/1.1\r\nHost: x\r\n{fine}Connection: close\r\n\r\n");
    assert_eq!(raw_request(h.addr, request.as_bytes()).await.0, 200);
}

#[tokio::test]
async fn bodies_over_the_route_limit_get_413() {
    let h = Harness::start_with(CONFIG).await;
    let declared = format!(
        "POST /v1/small HTTP/1.1\r\nHost: x\r\nContent-Length: 2048\r\nConnection: close\r\n\r\n{}",
        "b".repeat(2048)
    );
    let (status, body) = raw_request(h.addr, declared.as_bytes()).await;
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("general_payload_too_large"), "{body}");

    // Chunked: the size is only known while streaming.
    let chunk = "c".repeat(512);
    let chunked = format!(
        "POST /v1/small HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{n:x}\r\n{chunk}\r\n{n:x}\r\n{chunk}\r\n{n:x}\r\n{chunk}\r\n0\r\n\r\n",
        n = chunk.len()
    );
    let (status, body) = raw_request(h.addr, chunked.as_bytes()).await;
    assert_eq!(status, 413, "{body}");

    // Within the limit, and on a route without one, bodies pass.
    let ok = format!(
        "POST /v1/small HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\nConnection: close\r\n\r\n{}",
        "d".repeat(1000)
    );
    assert_eq!(raw_request(h.addr, ok.as_bytes()).await.0, 200);
    let open = format!("POST /v1/open/x HTTP/1.1\r\nHost: x\r\nContent-Length: 4096\r\nConnection: close\r\n\r\n{}", "e".repeat(4096));
    assert_eq!(raw_request(h.addr, open.as_bytes()).await.0, 200);
}

#[tokio::test]
async fn a_client_that_never_finishes_its_head_is_cut_off() {
    let h = Harness::start_with(CONFIG).await;
    let mut stream = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    stream
        .write_all(b"GET /v1/open/x HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    // The head is never completed: keygate closes the connection after header_read_timeout.
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "the connection was still open after 10 s");
    let text = String::from_utf8_lossy(&buf);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 408"),
        "{text}"
    );
}

//! The upstream connection pool, judged by what a raw HTTP/1.1 upstream sees: connections are
//! reused once an exchange is complete (bodiless answers included), a connection the upstream
//! closed while idle is never sent on, and a connection whose response was abandoned half-read
//! is never handed to another request, and one left idle past `idle_timeout` is closed.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::Harness;
use http::Method;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};

const ONE_ROUTE: &str = r#"
server: { listen: "127.0.0.1:0" }
store: { url: "sqlite://{db}" }
projects: { demo: {} }
upstreams:
  up: { url: "http://{upstream}", timeout: 5s }
routes:
  - { methods: [GET, HEAD], path: "/v1/**", public: true }
"#;

/// What the upstream does after writing an answer.
#[derive(Clone, Copy)]
enum After {
    /// Keep the connection for the next request.
    KeepOpen,
    /// Close it, without having announced `Connection: close`.
    Close,
    /// Keep it open but never write or read again.
    Hold,
}

type Script = fn(connection: usize, method: &str, path: &str) -> (&'static str, After);

/// A raw HTTP/1.1 upstream for bodiless requests: `script` answers each request, given the
/// number of the connection it came on (0 for the first accepted). Returns its address and the
/// count of connections accepted.
async fn scripted_upstream(script: Script) -> (SocketAddr, Arc<AtomicUsize>) {
    let (addr, accepted, _) = scripted_upstream_watching_closes(script).await;
    (addr, accepted)
}

/// [`scripted_upstream`], also telling (by connection number) each connection keygate closed.
async fn scripted_upstream_watching_closes(
    script: Script,
) -> (SocketAddr, Arc<AtomicUsize>, mpsc::UnboundedReceiver<usize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    let (closed_tx, closed) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let connection = count.fetch_add(1, Ordering::SeqCst);
            let closed = closed_tx.clone();
            tokio::spawn(async move {
                if serve(stream, connection, script).await {
                    let _ = closed.send(connection);
                }
            });
        }
    });
    (addr, accepted, closed)
}

/// Serves one connection as the script says; true when keygate closed it.
async fn serve(mut stream: TcpStream, connection: usize, script: Script) -> bool {
    let mut pending = Vec::new();
    loop {
        let head_end = loop {
            if let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
            let mut buf = [0u8; 4096];
            match stream.read(&mut buf).await {
                Ok(0) => return true,
                Err(_) => return false,
                Ok(n) => pending.extend_from_slice(&buf[..n]),
            }
        };
        let head = String::from_utf8_lossy(&pending[..head_end]).into_owned();
        pending.drain(..head_end);
        let mut line = head.split(' ');
        let (method, path) = (line.next().unwrap_or(""), line.next().unwrap_or(""));
        let (answer, after) = script(connection, method, path);
        if stream.write_all(answer.as_bytes()).await.is_err() {
            return false;
        }
        match after {
            After::KeepOpen => continue,
            After::Close => return false,
            After::Hold => {
                // Keeps the connection open, silent, for as long as the test runs.
                std::future::pending::<()>().await;
            }
        }
    }
}

const OK: &str = "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";

async fn gateway_in_front_of(upstream: SocketAddr) -> Harness {
    let (stop, _) = oneshot::channel();
    Harness::start_in_front_of(ONE_ROUTE, upstream, stop).await
}

#[tokio::test]
async fn completed_exchanges_reuse_one_upstream_connection() {
    let (upstream, accepted) = scripted_upstream(|_, method, path| {
        let answer = match (method, path) {
            // A HEAD answer and a 204 carry no body: nothing is left to read on the connection.
            ("HEAD", _) => "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n",
            (_, "/v1/empty") => "HTTP/1.1 204 No Content\r\n\r\n",
            (_, "/v1/chunked") => {
                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
            }
            _ => OK,
        };
        (answer, After::KeepOpen)
    })
    .await;
    let h = gateway_in_front_of(upstream).await;

    for round in 0..5 {
        for (method, path, status, body) in [
            (Method::GET, "/v1/a", 200, "ok"),
            (Method::HEAD, "/v1/a", 200, ""),
            (Method::GET, "/v1/empty", 204, ""),
            (Method::GET, "/v1/chunked", 200, "ok"),
        ] {
            let response = h.request(method.clone(), path, &[], "").await;
            assert_eq!(response.status, status, "round {round}: {method} {path}");
            assert_eq!(response.body, body, "round {round}: {method} {path}");
        }
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "20 sequential exchanges should share one upstream connection"
    );
}

#[tokio::test]
async fn a_connection_the_upstream_closed_is_not_sent_on() {
    let (upstream, accepted) = scripted_upstream(|_, _, _| (OK, After::Close)).await;
    let h = gateway_in_front_of(upstream).await;
    for i in 0..10 {
        let response = h.request(Method::GET, "/v1/a", &[], "").await;
        assert_eq!(
            response.status,
            200,
            "request {i}: {}",
            String::from_utf8_lossy(&response.body)
        );
        assert_eq!(response.body, "ok");
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 10);
}

#[tokio::test]
async fn a_response_abandoned_half_read_does_not_reach_the_next_request() {
    let (upstream, accepted) = scripted_upstream(|connection, _, _| match connection {
        // The first answer starts a chunked body and never finishes it.
        0 => (
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n",
            After::Hold,
        ),
        _ => (
            "HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nsecond",
            After::KeepOpen,
        ),
    })
    .await;
    let h = gateway_in_front_of(upstream).await;

    let mut client = TcpStream::connect(h.addr).await.unwrap();
    client
        .write_all(b"GET /v1/stream HTTP/1.1\r\nhost: keygate\r\n\r\n")
        .await
        .unwrap();
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("first") {
        let mut buf = [0u8; 1024];
        let n = tokio::time::timeout(Duration::from_secs(5), client.read(&mut buf))
            .await
            .expect("the first chunk arrives")
            .unwrap();
        assert!(n > 0, "closed before the first chunk");
        seen.extend_from_slice(&buf[..n]);
    }
    drop(client);

    for _ in 0..3 {
        let response = h.request(Method::GET, "/v1/next", &[], "").await;
        assert_eq!(response.status, 200);
        assert_eq!(response.body, "second");
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        2,
        "the half-read connection is never reused; the next requests share a new one"
    );
}

#[tokio::test]
async fn a_connection_idle_past_idle_timeout_is_closed() {
    let (upstream, accepted, mut closed) =
        scripted_upstream_watching_closes(|_, _, _| (OK, After::KeepOpen)).await;
    let (stop, _) = oneshot::channel();
    let config = ONE_ROUTE.replace("timeout: 5s", "timeout: 5s, idle_timeout: 300ms");
    let h = Harness::start_in_front_of(&config, upstream, stop).await;

    let response = h.request(Method::GET, "/v1/a", &[], "").await;
    assert_eq!(response.status, 200);
    // No further request comes; keygate closes the idle connection on its own.
    let gone = tokio::time::timeout(Duration::from_secs(5), closed.recv())
        .await
        .expect("the idle connection is closed within 5 s");
    assert_eq!(gone, Some(0));

    // The next request opens a new connection and succeeds.
    let response = h.request(Method::GET, "/v1/a", &[], "").await;
    assert_eq!(response.status, 200);
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}

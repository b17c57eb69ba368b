//! WebSocket upgrades through keygate (Appwrite realtime): the handshake is authorized like any
//! request, then the upgraded connection is spliced to the upstream and messages flow both ways.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::Harness;
use futures_util::{SinkExt, StreamExt};
use http::{Method, StatusCode};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::{Error, Message};

const REALTIME: &str = r#"
server: { listen: "127.0.0.1:0" }
store: { url: "sqlite://{db}" }
projects: { demo: {} }
scopes: [users.read]
upstreams:
  realtime: { url: "http://{upstream}", timeout: 5s }
routes:
  - { methods: [GET], path: /v1/realtime, scopes: [realtime.read] }
"#;

/// What the upstream saw of an accepted handshake.
#[derive(Debug)]
struct Handshake {
    target: String,
    key_id: Option<String>,
    api_key: Option<String>,
}

struct WsEcho {
    addr: SocketAddr,
    /// TCP connections accepted, handshake or not.
    connections: Arc<AtomicUsize>,
    handshakes: mpsc::UnboundedReceiver<Handshake>,
    stop: oneshot::Sender<()>,
}

/// A WebSocket upstream that echoes text and binary messages.
async fn start_ws_echo() -> WsEcho {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let (seen, handshakes) = mpsc::unbounded_channel();
    let (stop, mut stopped) = oneshot::channel::<()>();
    let counter = connections.clone();
    tokio::spawn(async move {
        loop {
            let stream = tokio::select! {
                accepted = listener.accept() => accepted.unwrap().0,
                _ = &mut stopped => return,
            };
            counter.fetch_add(1, Ordering::SeqCst);
            let seen = seen.clone();
            tokio::spawn(async move {
                // The callback's error type is tungstenite's, large or not.
                #[allow(clippy::result_large_err)]
                let record = |req: &Request, res: Response| {
                    let header = |name: &str| {
                        req.headers()
                            .get(name)
                            .map(|v| v.to_str().unwrap().to_owned())
                    };
                    let _ = seen.send(Handshake {
                        target: req.uri().to_string(),
                        key_id: header("x-keygate-key-id"),
                        api_key: header("x-appwrite-key"),
                    });
                    Ok(res)
                };
                let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(stream, record).await else {
                    return;
                };
                while let Some(Ok(message)) = ws.next().await {
                    if message.is_close() {
                        return;
                    }
                    let echo = message.is_text() || message.is_binary();
                    if echo && ws.send(message).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    WsEcho {
        addr,
        connections,
        handshakes,
        stop,
    }
}

async fn next_text<S>(ws: &mut S) -> String
where
    S: StreamExt<Item = Result<Message, Error>> + Unpin,
{
    let message = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .expect("an echo in time")
        .expect("the connection is open")
        .expect("a message");
    message.into_text().expect("a text message").to_string()
}

#[tokio::test]
async fn websocket_with_the_scope_echoes_through_keygate() {
    let upstream = start_ws_echo().await;
    let (addr, stop) = (upstream.addr, upstream.stop);
    let mut handshakes = upstream.handshakes;
    let h = Harness::start_in_front_of(REALTIME, addr, stop).await;
    let (id, secret) = h.create_key("demo", &["realtime.read"], None).await;

    let target = format!("ws://{}/v1/realtime?project=demo&channels=files", h.addr);
    let mut request = target.as_str().into_client_request().unwrap();
    request
        .headers_mut()
        .insert("x-appwrite-key", secret.expose().parse().unwrap());
    request
        .headers_mut()
        .insert("x-appwrite-project", "demo".parse().unwrap());
    let (mut ws, response) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::connect_async(request),
    )
    .await
    .expect("the handshake finishes in time")
    .expect("the handshake succeeds with realtime.read");
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    assert!(response.headers().contains_key("sec-websocket-accept"));

    ws.send(Message::text("hello")).await.unwrap();
    assert_eq!(next_text(&mut ws).await, "hello");
    ws.send(Message::text("second message")).await.unwrap();
    assert_eq!(next_text(&mut ws).await, "second message");
    ws.send(Message::binary(vec![0u8, 1, 2, 255]))
        .await
        .unwrap();
    let echoed = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(echoed, Message::binary(vec![0u8, 1, 2, 255]));

    // The upstream got the target intact and keygate's identity headers, not the key.
    let seen = handshakes.recv().await.unwrap();
    assert_eq!(seen.target, "/v1/realtime?project=demo&channels=files");
    assert_eq!(seen.key_id.as_deref(), Some(id.as_str()));
    assert_eq!(seen.api_key, None);
    ws.close(None).await.unwrap();
}

#[tokio::test]
async fn websocket_without_the_scope_is_refused_before_the_upstream() {
    let upstream = start_ws_echo().await;
    let connections = upstream.connections.clone();
    let h = Harness::start_in_front_of(REALTIME, upstream.addr, upstream.stop).await;
    let (_, reader) = h.create_key("demo", &["users.read"], None).await;
    let url = format!("ws://{}/v1/realtime", h.addr);

    let without_key = url.as_str().into_client_request().unwrap();
    let mut wrong_scope = url.as_str().into_client_request().unwrap();
    wrong_scope
        .headers_mut()
        .insert("x-appwrite-key", reader.expose().parse().unwrap());
    wrong_scope
        .headers_mut()
        .insert("x-appwrite-project", "demo".parse().unwrap());

    for request in [without_key, wrong_scope] {
        let refused = tokio::time::timeout(
            Duration::from_secs(10),
            tokio_tungstenite::connect_async(request),
        )
        .await
        .expect("an answer in time");
        let response = match refused {
            Err(Error::Http(response)) => response,
            Err(other) => panic!("not an HTTP refusal: {other}"),
            Ok(_) => panic!("the handshake succeeded without realtime.read"),
        };
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        // The body arrives with the head when it fits in the same read.
        if let Some(body) = response.body().as_deref().filter(|b| !b.is_empty()) {
            let json: serde_json::Value = serde_json::from_slice(body)
                .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(body)));
            assert_eq!(json["type"], "general_unauthorized_scope", "{json}");
            assert!(
                json["message"].as_str().unwrap().contains("realtime.read"),
                "{json}"
            );
        }
    }
    // The same decision as a plain request, with the whole body.
    h.request(Method::GET, "/v1/realtime", &[], "")
        .await
        .assert_error(401, "general_unauthorized_scope");
    assert_eq!(
        connections.load(Ordering::SeqCst),
        0,
        "a refused handshake reached the upstream"
    );
}

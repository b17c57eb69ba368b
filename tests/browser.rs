//! A real browser against keygate's origin check and CORS grants: headless Chromium (Debian's
//! `chromium`, driven by `playwright-core` from `tests/browser/`) opens pages on two origins and
//! fetches keygate from them. The allowed origin reads a guest route; another origin is blocked
//! by CORS; a dev key takes it through the origin check but grants no scope. `.ci/run` installs
//! Chromium and the npm package and sets `KEYGATE_REQUIRE_BROWSER=1`, which turns a missing
//! browser into a failure instead of a skip.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::Utc;
use common::Harness;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

const CHROMIUM: &str = "/usr/bin/chromium";
const PAGE: &str = "<html><body>ok</body></html>";

fn browser_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("browser")
}

fn required() -> bool {
    std::env::var("KEYGATE_REQUIRE_BROWSER").is_ok_and(|v| v == "1")
}

/// Returns false (and says so) when `what` is not installed and not required.
fn available(what: &str, present: bool) -> bool {
    if !present {
        assert!(!required(), "{what} is not installed (see .ci/run)");
        eprintln!("SKIPPED: {what} is not installed; run .ci/run to install it");
    }
    present
}

/// A static page server: answers every request with [`PAGE`] and closes the connection.
async fn start_page_server() -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(serve_page(stream));
        }
    });
    (addr, task)
}

async fn serve_page(mut stream: TcpStream) {
    let mut head = Vec::new();
    let mut buf = [0u8; 2048];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => head.extend_from_slice(&buf[..n]),
            _ => return,
        }
    }
    let response = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\n\
         Cache-Control: no-store\r\nConnection: close\r\n\r\n{PAGE}",
        PAGE.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// Whether `localhost` resolves to 127.0.0.1 here, so `http://localhost:PORT` reaches a server
/// bound there while being a different origin from `http://127.0.0.1:PORT`.
async fn localhost_is_loopback_v4() -> bool {
    tokio::net::lookup_host("localhost:80")
        .await
        .is_ok_and(|mut addrs| addrs.any(|a| a.ip() == std::net::Ipv4Addr::LOCALHOST))
}

#[tokio::test]
async fn chromium_sees_origins_cors_and_dev_keys() {
    let chromium = available("Chromium (/usr/bin/chromium)", Path::new(CHROMIUM).exists());
    let driver = available(
        "playwright-core (tests/browser/node_modules)",
        browser_dir().join("node_modules/playwright-core").exists(),
    );
    if !(chromium && driver) {
        return;
    }

    let (allowed_addr, allowed_task) = start_page_server().await;
    let (other_addr, other_task) = start_page_server().await;
    let allowed = format!("http://{allowed_addr}");
    // Another host name for the same loopback is another origin; failing that, the other
    // server's own port is.
    let other = if localhost_is_loopback_v4().await {
        format!("http://localhost:{}", other_addr.port())
    } else {
        format!("http://{other_addr}")
    };

    let config = r#"
server: { listen: "127.0.0.1:0" }
store: { url: "sqlite://{db}" }
projects:
  demo: { origins: ["ALLOWED"] }
guest_scopes: [locale.read]
upstreams:
  echo: { url: "http://{upstream}" }
routes:
  - { methods: [GET], path: /v1/locale, scopes: [locale.read] }
  - { methods: [GET], path: /v1/users, scopes: [users.read] }
"#
    .replace("ALLOWED", &allowed);
    let h = Harness::start_with(&config).await;
    let (_, dev_key) = h
        .create_dev_key("demo", Utc::now() + chrono::Duration::days(1))
        .await;

    let started = std::time::Instant::now();
    let run = tokio::process::Command::new("node")
        .arg(browser_dir().join("cors.mjs"))
        .current_dir(browser_dir())
        .env("KEYGATE", format!("http://{}", h.addr))
        .env("ALLOWED", &allowed)
        .env("OTHER", &other)
        .env("DEV_KEY", dev_key.expose())
        .env("PROJECT", "demo")
        .env("CHROMIUM", CHROMIUM)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(180), run)
        .await
        .expect("the browser script did not finish within 180 s")
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    eprintln!(
        "cors.mjs ({:.1} s, allowed {allowed}, other {other}):\n{stdout}{stderr}",
        started.elapsed().as_secs_f64()
    );
    assert!(
        output.status.success(),
        "cors.mjs failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    assert!(
        stdout.lines().any(|l| l == "browser: ok"),
        "no `browser: ok` line:\n{stdout}"
    );

    allowed_task.abort();
    other_task.abort();
}

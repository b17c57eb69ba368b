//! Test harness: a keygate on port 0 in front of the sample echo upstream, a real SQLite file in
//! a temporary directory, and clients that speak through real sockets.
#![allow(dead_code)]

pub mod pg;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

use keygate::config::Snapshot;
use keygate::gateway::{Clock, Gateway};
use keygate::keys::store::{Actor, NewKey};
use keygate::keys::{KeyKind, KeyRateLimit, Secret};
use keygate::sample::Echo;
use std::sync::atomic::AtomicI64;

/// The config most tests run on. `{upstream}` and `{db}` are filled in.
pub const TEST_CONFIG: &str = r#"
server: { listen: "127.0.0.1:0" }
store: { url: "sqlite://{db}" }
projects: { demo: {}, other: {} }
keys:
  implicit_scopes: [global, health.read, graphql]
  ephemeral_secret: "test-only-ephemeral-signing-secret-0123456789"
  usage_interval: 1h
guest_scopes: [locale.read]
scopes: [unused.scope, global, health.read]
upstreams:
  echo: { url: "http://{upstream}", forward_key: false, timeout: 5s }
  appwrite: { url: "http://{upstream}", forward_key: true, timeout: 5s }
routes:
  - { methods: [GET], path: /v1/users, scopes: [users.read], upstream: echo }
  - { methods: [POST, PUT, PATCH], path: "/v1/users/{userId}", scopes: [users.write], upstream: echo }
  - { methods: [GET, POST], path: "/v1/databases/{databaseId}/collections/{collectionId}/documents",
      scopes: [documents.read, rows.read], upstream: echo }
  - { methods: [GET], path: /v1/graphql, scopes: [graphql], upstream: echo }
  - { methods: [GET], path: /v1/locale, scopes: [locale.read], upstream: echo }
  - { methods: [GET], path: "/v1/health/**", public: true, upstream: echo }
  - { methods: [GET], path: "/v1/appwrite/**", scopes: [users.read], upstream: appwrite }
  - { methods: [GET, POST], path: "/v1/public/**", public: true, upstream: echo }
  - { methods: ["*"], path: "/v1/admin/**", scopes: [admin.all], upstream: echo }
"#;

pub fn fill(template: &str, upstream: SocketAddr, db: &Path) -> String {
    template
        .replace("{upstream}", &upstream.to_string())
        .replace("{db}", &db.display().to_string())
}

/// Starts the sample echo upstream on port 0; it stops when the sender is dropped.
pub async fn start_echo() -> (SocketAddr, oneshot::Sender<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    tokio::spawn(keygate::sample::run(listener, async {
        let _ = rx.await;
    }));
    (addr, tx)
}

pub struct Harness {
    pub addr: SocketAddr,
    pub upstream: SocketAddr,
    pub gateway: Arc<Gateway>,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    pub db: PathBuf,
    _stop_upstream: oneshot::Sender<()>,
    stop: Option<oneshot::Sender<()>>,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Harness {
    pub async fn start() -> Harness {
        Harness::start_with(TEST_CONFIG).await
    }

    /// Starts keygate in-process on `template` (see [`fill`]), with the change feed running.
    pub async fn start_with(template: &str) -> Harness {
        let (upstream, stop_upstream) = start_echo().await;
        Harness::start_in_front_of(template, upstream, stop_upstream).await
    }

    pub async fn start_in_front_of(
        template: &str,
        upstream: SocketAddr,
        stop_upstream: oneshot::Sender<()>,
    ) -> Harness {
        Harness::start_full(template, upstream, stop_upstream, Clock::System).await
    }

    /// Starts keygate on a clock the test sets (Unix seconds).
    pub async fn start_with_clock(template: &str, now: Arc<AtomicI64>) -> Harness {
        let (upstream, stop_upstream) = start_echo().await;
        Harness::start_full(template, upstream, stop_upstream, Clock::Manual(now)).await
    }

    async fn start_full(
        template: &str,
        upstream: SocketAddr,
        stop_upstream: oneshot::Sender<()>,
        clock: Clock,
    ) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("keys.db");
        let config_path = dir.path().join("keygate.yaml");
        std::fs::write(&config_path, fill(template, upstream, &db)).unwrap();
        let snapshot = Snapshot::load(&config_path).unwrap();
        let store = keygate::keys::store::open(&snapshot.store).await.unwrap();
        let gateway = Gateway::with_store_and_clock(snapshot, store, clock)
            .await
            .unwrap();
        gateway.spawn_sync();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(keygate::server::run(listener, gateway.clone(), async {
            let _ = stopped.await;
        }));
        Harness {
            addr,
            upstream,
            gateway,
            dir,
            config_path,
            db,
            _stop_upstream: stop_upstream,
            stop: Some(stop),
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    /// Creates a key in the store and applies the change feed, so it is live on return.
    pub async fn create_key(
        &self,
        project: &str,
        scopes: &[&str],
        expire: Option<DateTime<Utc>>,
    ) -> (String, Secret) {
        self.insert_key(KeyKind::Standard, project, scopes, expire, None)
            .await
    }

    /// Creates a dev key expiring at `expire`, live on return.
    pub async fn create_dev_key(&self, project: &str, expire: DateTime<Utc>) -> (String, Secret) {
        self.insert_key(KeyKind::Dev, project, &[], Some(expire), None)
            .await
    }

    pub async fn insert_key(
        &self,
        kind: KeyKind,
        project: &str,
        scopes: &[&str],
        expire: Option<DateTime<Utc>>,
        rate_limit: Option<KeyRateLimit>,
    ) -> (String, Secret) {
        let secret = Secret::generate_for(kind);
        let id = keygate::keys::unique_id();
        self.gateway
            .store()
            .create(
                NewKey {
                    id: id.clone(),
                    project: project.into(),
                    kind,
                    name: "test".into(),
                    description: String::new(),
                    scopes: scopes.iter().map(|s| s.to_string()).collect(),
                    expire,
                    digest: secret.digest(),
                    rate_limit,
                },
                Actor::CLI,
            )
            .await
            .unwrap();
        self.gateway.sync_once().await.unwrap();
        (id, secret)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub async fn request(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> TestResponse {
        let mut builder = Request::builder().method(method).uri(self.url(path));
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        let response = self
            .client
            .request(
                builder
                    .body(Full::new(Bytes::from(body.to_owned())))
                    .unwrap(),
            )
            .await
            .unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        TestResponse {
            status,
            headers,
            body,
        }
    }

    /// A key API call with a key and project; `body` is sent as JSON unless it is null.
    pub async fn api(
        &self,
        method: Method,
        path: &str,
        secret: &Secret,
        project: &str,
        body: serde_json::Value,
    ) -> TestResponse {
        let body = if body.is_null() {
            String::new()
        } else {
            body.to_string()
        };
        self.request(
            method,
            path,
            &[
                ("x-appwrite-key", secret.expose()),
                ("x-appwrite-project", project),
                ("content-type", "application/json"),
            ],
            &body,
        )
        .await
    }

    /// GET with a key and project.
    pub async fn get_as(&self, path: &str, secret: &Secret, project: &str) -> TestResponse {
        self.request(
            Method::GET,
            path,
            &[
                ("x-appwrite-key", secret.expose()),
                ("x-appwrite-project", project),
            ],
            "",
        )
        .await
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

#[derive(Debug)]
pub struct TestResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl TestResponse {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    /// What the echo upstream received; panics if the request was not forwarded.
    pub fn echo(&self) -> Echo {
        assert_eq!(
            self.status,
            StatusCode::OK,
            "not forwarded: {}",
            String::from_utf8_lossy(&self.body)
        );
        serde_json::from_slice(&self.body).expect("an echo body")
    }

    /// Asserts an Appwrite error body with this status and type.
    #[track_caller]
    pub fn assert_error(&self, status: u16, kind: &str) {
        assert_eq!(
            self.status.as_u16(),
            status,
            "body: {}",
            String::from_utf8_lossy(&self.body)
        );
        let json = self.json();
        assert_eq!(json["type"], kind, "{json}");
        assert_eq!(json["code"], status, "{json}");
        assert!(
            json["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{json}"
        );
        assert!(json["version"].is_string(), "{json}");
        assert_eq!(self.headers["content-type"], "application/json");
        assert_eq!(self.headers["cache-control"], "no-store");
    }
}

/// Sends raw bytes and reads the whole response (the request should ask for `Connection: close`).
pub async fn raw_request(addr: SocketAddr, request: &[u8]) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut response = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut response)).await;
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// Polls `check` until it returns true or `within` passes; returns how long it took.
pub async fn eventually<F, Fut>(within: Duration, mut check: F) -> Option<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while started.elapsed() < within {
        if check().await {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

/// The keygate binary built for these tests.
pub fn keygate_bin() -> &'static str {
    env!("CARGO_BIN_EXE_keygate")
}

/// A `keygate serve --config FILE` child process; its address is read from its log.
pub struct ServeProcess {
    pub child: tokio::process::Child,
    pub addr: SocketAddr,
    /// The ops listener's address, when the config has one (read from its log line).
    pub ops_addr: Option<SocketAddr>,
}

impl ServeProcess {
    pub async fn start(config: &Path) -> ServeProcess {
        let mut child = tokio::process::Command::new(keygate_bin())
            .args(["serve", "--config"])
            .arg(config)
            .env("KEYGATE_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let mut lines = BufReader::new(stderr).lines();
        let addr_in = |line: &str| -> SocketAddr {
            let at = line.find("addr=").expect("addr in the listening line") + 5;
            let addr = line[at..].split_whitespace().next().unwrap();
            addr.parse::<SocketAddr>().unwrap()
        };
        let mut ops_addr = None;
        let addr = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = lines.next_line().await.unwrap() {
                if line.contains("ops listener ready") {
                    ops_addr = Some(addr_in(&line));
                }
                if line.contains("keygate listening") {
                    return addr_in(&line);
                }
            }
            panic!("keygate exited before listening");
        })
        .await
        .expect("keygate did not start in time");
        // Keep draining the log so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        ServeProcess {
            child,
            addr,
            ops_addr,
        }
    }

    /// The process id (panics once the child has been waited for).
    pub fn pid(&self) -> u32 {
        self.child.id().expect("keygate is still running")
    }

    /// Peak resident set size of the process, in bytes (Linux `VmHWM`).
    pub fn peak_rss(&self) -> u64 {
        let pid = self.child.id().unwrap();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
        let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        kb * 1024
    }
}

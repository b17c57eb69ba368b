//! `server.workers`: the public listener served by that many threads (`keygate-worker-N`), each
//! with its own runtime, all accepting from one socket under one shared `max_connections`; a
//! re-bind on reload replaces the threads, and SIGTERM stops them all with idle connections open.
//! Upstream connection pools are per thread: a request of a new thread never rides on an upstream
//! connection that an old thread's runtime drives and takes down when it ends.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use common::{eventually, ServeProcess, TestResponse};
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use keygate::sample::Echo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

/// `{server}` is the inside of the `server:` map; `{upstream}` and `{db}` as in [`common::fill`].
const CONFIG: &str = r#"
server: { {server} }
ops: { listen: "127.0.0.1:0" }
store: { url: "sqlite://{db}" }
projects: { demo: {} }
upstreams:
  echo: { url: "http://{upstream}", timeout: 5s }
routes:
  - { methods: [GET], path: /v1/users, scopes: [users.read], upstream: echo }
"#;

const WORKER_PREFIX: &str = "keygate-worker-";

/// A config file, its store with one `users.read` key, and the echo upstream behind it.
struct Setup {
    dir: tempfile::TempDir,
    config: PathBuf,
    upstream: SocketAddr,
    secret: String,
    _stop_upstream: oneshot::Sender<()>,
}

impl Setup {
    async fn new(server: &str) -> Setup {
        let (upstream, stop_upstream) = common::start_echo().await;
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("keygate.yaml");
        let setup = Setup {
            config,
            upstream,
            secret: String::new(),
            _stop_upstream: stop_upstream,
            dir,
        };
        setup.write_config(server);
        let created = std::process::Command::new(common::keygate_bin())
            .args(["keys", "create", "--config"])
            .arg(&setup.config)
            .args([
                "--project",
                "demo",
                "--name",
                "workers",
                "--scopes",
                "users.read",
            ])
            .output()
            .unwrap();
        assert!(
            created.status.success(),
            "{}",
            String::from_utf8_lossy(&created.stderr)
        );
        let created: serde_json::Value = serde_json::from_slice(&created.stdout).unwrap();
        Setup {
            secret: created["secret"].as_str().unwrap().to_owned(),
            ..setup
        }
    }

    /// Writes the config with this `server:` map, atomically (the server polls the file).
    fn write_config(&self, server: &str) {
        let text = common::fill(
            &CONFIG.replace("{server}", server),
            self.upstream,
            &self.dir.path().join("keys.db"),
        );
        let staging = self.dir.path().join("keygate.yaml.new");
        std::fs::write(&staging, text).unwrap();
        std::fs::rename(&staging, &self.config).unwrap();
    }

    async fn start(&self) -> ServeProcess {
        ServeProcess::start(&self.config).await
    }
}

/// Waits until the process has exactly `n` worker threads; fails, naming `what`, after `within`.
async fn expect_worker_threads(pid: u32, n: usize, within: Duration, what: &str) {
    let reached = eventually(within, || async { worker_threads(pid) == n }).await;
    assert!(
        reached.is_some(),
        "{what}: expected {n} {WORKER_PREFIX}* threads, found {}",
        worker_threads(pid)
    );
}

/// The process's threads whose name starts with `keygate-worker-` (Linux truncates thread
/// names to 15 bytes, so `keygate-worker-0` reads as `keygate-worker-`).
fn worker_threads(pid: u32) -> usize {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.trim_end().starts_with(WORKER_PREFIX))
        .count()
}

/// One HTTP/1.1 keep-alive client connection.
struct Conn {
    sender: SendRequest<Empty<Bytes>>,
    /// Ends when the connection closes.
    task: JoinHandle<()>,
}

impl Conn {
    async fn open(addr: SocketAddr) -> Conn {
        let stream = TcpStream::connect(addr).await.unwrap();
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        let task = tokio::spawn(async move {
            let _ = connection.await;
        });
        Conn { sender, task }
    }

    /// GET `target` (origin form) with the key, or with none.
    fn get(
        &mut self,
        target: &str,
        key: Option<&str>,
    ) -> impl std::future::Future<Output = TestResponse> + Send + 'static {
        let mut request = Request::get(target)
            .header("host", "keygate.test")
            .header("x-appwrite-project", "demo");
        if let Some(key) = key {
            request = request.header("x-appwrite-key", key);
        }
        let sent = self
            .sender
            .send_request(request.body(Empty::new()).unwrap());
        async move {
            let response = sent.await.expect("the connection failed");
            let status = response.status();
            let headers = response.headers().clone();
            let body = response.into_body().collect().await.unwrap().to_bytes();
            TestResponse {
                status,
                headers,
                body,
            }
        }
    }

    /// Closes the connection from the client side and waits until it is closed.
    async fn close(self) {
        drop(self.sender);
        self.task.await.unwrap();
    }
}

/// Asserts a 200 carrying the echo upstream's account of exactly this request.
#[track_caller]
fn assert_echoed(response: &TestResponse, target: &str) {
    let echo: Echo = response.echo();
    assert_eq!(echo.method, "GET");
    assert_eq!(echo.target, target);
}

async fn post_reload(ops: SocketAddr) -> (u16, serde_json::Value) {
    let (status, body) = common::raw_request(
        ops,
        b"POST /reload HTTP/1.1\r\nHost: ops\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .await;
    let json = serde_json::from_str(&body)
        .unwrap_or_else(|e| panic!("POST /reload: not JSON ({e}): {body}"));
    (status, json)
}

/// `keygate_connections_open{listener="public"}` from the ops listener's `/metrics`.
async fn public_connections_open(ops: SocketAddr) -> Option<f64> {
    let (status, body) = common::raw_request(
        ops,
        b"GET /metrics HTTP/1.1\r\nHost: ops\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    body.lines()
        .find_map(|line| line.strip_prefix(r#"keygate_connections_open{listener="public"} "#))
        .map(|value| value.trim().parse().unwrap())
}

fn signal(pid: u32, name: &str) {
    assert!(std::process::Command::new("kill")
        .args([name, &pid.to_string()])
        .status()
        .unwrap()
        .success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_serve_48_keep_alive_clients() {
    let setup = Setup::new(r#"listen: "127.0.0.1:0", workers: 3"#).await;
    let gateway = setup.start().await;
    let pid = gateway.pid();
    // The threads are spawned right after the listening line is logged.
    expect_worker_threads(pid, 3, Duration::from_secs(5), "at start").await;

    let mut clients = Vec::new();
    for client in 0..48 {
        let (addr, key) = (gateway.addr, setup.secret.clone());
        clients.push(tokio::spawn(async move {
            let mut conn = Conn::open(addr).await;
            for n in 0..20 {
                // Each request tagged, so an answer meant for another request would show.
                let target = format!("/v1/users?client={client}&n={n}");
                let response = conn.get(&target, Some(&key)).await;
                assert_echoed(&response, &target);
            }
            conn.close().await;
        }));
    }
    for client in clients {
        client.await.unwrap();
    }

    let mut conn = Conn::open(gateway.addr).await;
    conn.get("/v1/users", None)
        .await
        .assert_error(401, "general_unauthorized_scope");
    conn.close().await;
    assert_eq!(
        worker_threads(pid),
        3,
        "the number of {WORKER_PREFIX}* threads changed under load"
    );
}

#[tokio::test]
async fn the_connection_limit_is_shared_by_all_workers() {
    let setup = Setup::new(r#"listen: "127.0.0.1:0", workers: 2, max_connections: 2"#).await;
    let gateway = setup.start().await;
    let pid = gateway.pid();
    expect_worker_threads(pid, 2, Duration::from_secs(5), "at start").await;
    let key = Some(setup.secret.as_str());

    // Two connections that were answered: they hold both permits, whichever threads took them.
    let mut first = Conn::open(gateway.addr).await;
    assert_echoed(&first.get("/v1/users?c=1", key).await, "/v1/users?c=1");
    let mut second = Conn::open(gateway.addr).await;
    assert_echoed(&second.get("/v1/users?c=2", key).await, "/v1/users?c=2");

    // A third connection waits in the backlog: no thread may accept it.
    let mut third = Conn::open(gateway.addr).await;
    let mut waiting = tokio::spawn(third.get("/v1/users?c=3", key));
    assert!(
        tokio::time::timeout(Duration::from_millis(500), &mut waiting)
            .await
            .is_err(),
        "a third connection was served while two held max_connections: 2"
    );

    // One of the first two closes: the third is accepted and answered.
    first.close().await;
    let response = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the third connection was not served after a permit was released")
        .unwrap();
    assert_echoed(&response, "/v1/users?c=3");
    // The two open connections keep working.
    assert_echoed(&second.get("/v1/users?c=2b", key).await, "/v1/users?c=2b");
    assert_echoed(&third.get("/v1/users?c=3b", key).await, "/v1/users?c=3b");
    second.close().await;
    third.close().await;
}

#[tokio::test]
async fn a_reload_that_changes_the_address_rebinds_the_workers() {
    let setup = Setup::new(r#"listen: "127.0.0.1:0", workers: 2"#).await;
    let gateway = setup.start().await;
    let pid = gateway.pid();
    let old = gateway.addr;
    let ops = gateway
        .ops_addr
        .expect("the ops listener's address in the log");
    let key = setup.secret.clone();
    expect_worker_threads(pid, 2, Duration::from_secs(5), "at start").await;
    // The first threads serve, and proxy: they hold upstream connections when the re-bind comes.
    let mut conn = Conn::open(old).await;
    conn.get("/v1/users", None)
        .await
        .assert_error(401, "general_unauthorized_scope");
    assert_echoed(
        &conn.get("/v1/users?before=0", Some(&key)).await,
        "/v1/users?before=0",
    );
    conn.close().await;

    // A port that was just free.
    let new = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    assert_ne!(new, old);
    setup.write_config(&format!(r#"listen: "{new}", workers: 2"#));
    let (status, body) = post_reload(ops).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "applied", "{body}");

    let served = eventually(Duration::from_secs(10), || {
        let key = key.clone();
        async move {
            let Ok(stream) = TcpStream::connect(new).await else {
                return false;
            };
            drop(stream);
            let mut conn = Conn::open(new).await;
            let response = conn.get("/v1/users?after=0", Some(&key)).await;
            conn.close().await;
            assert_echoed(&response, "/v1/users?after=0");
            true
        }
    })
    .await;
    assert!(
        served.is_some(),
        "nothing answered on the new address {new}"
    );

    let refused = eventually(Duration::from_secs(10), || async {
        TcpStream::connect(old).await.is_err()
    })
    .await;
    assert!(
        refused.is_some(),
        "the old address {old} still accepts connections"
    );
    // The old listener's threads end; the new listener's two remain.
    expect_worker_threads(pid, 2, Duration::from_secs(10), "after the re-bind").await;
    // The new threads keep proxying once the old threads (and what ran on them) are gone.
    for n in 1..=8 {
        let mut conn = Conn::open(new).await;
        let target = format!("/v1/users?after={n}");
        assert_echoed(&conn.get(&target, Some(&key)).await, &target);
        conn.close().await;
    }
}

#[tokio::test]
async fn sigterm_stops_every_worker_with_idle_connections_open() {
    let setup = Setup::new(r#"listen: "127.0.0.1:0", workers: 2, shutdown_grace: 30s"#).await;
    let mut gateway = setup.start().await;
    let pid = gateway.pid();
    expect_worker_threads(pid, 2, Duration::from_secs(5), "at start").await;

    // Idle keep-alive connections, each answered once.
    let mut idle = Vec::new();
    for n in 0..6 {
        let mut conn = Conn::open(gateway.addr).await;
        let target = format!("/v1/users?idle={n}");
        assert_echoed(&conn.get(&target, Some(&setup.secret)).await, &target);
        idle.push(conn);
    }

    // And connections that never sent a byte.
    let mut silent = Vec::new();
    for _ in 0..3 {
        silent.push(TcpStream::connect(gateway.addr).await.unwrap());
    }

    // Wait until keygate has accepted all nine.
    let ops = gateway
        .ops_addr
        .expect("the ops listener's address in the log");
    assert!(
        eventually(Duration::from_secs(5), || async {
            public_connections_open(ops).await == Some(9.0)
        })
        .await
        .is_some(),
        "open public connections: {:?}, expected 9",
        public_connections_open(ops).await
    );

    let signalled = std::time::Instant::now();
    signal(pid, "-TERM");
    let status = tokio::time::timeout(Duration::from_secs(10), gateway.child.wait())
        .await
        .expect("keygate did not exit within 10 s of SIGTERM (grace period 30 s)")
        .unwrap();
    assert!(status.success(), "{status:?}");
    eprintln!(
        "exited {:?} after SIGTERM with 9 idle connections open",
        signalled.elapsed()
    );
    drop((idle, silent));
}

/// A request the held upstream has received and answers (200, the target as body) on `release`.
struct Held {
    target: String,
    release: oneshot::Sender<()>,
}

/// An upstream that reports each request it receives and holds it until the test releases it.
async fn start_holding_upstream() -> (SocketAddr, mpsc::UnboundedReceiver<Held>) {
    use hyper::service::service_fn;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (report, received) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let report = report.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                    let report = report.clone();
                    async move {
                        let target = req.uri().to_string();
                        let (release, released) = oneshot::channel();
                        let _ = report.send(Held {
                            target: target.clone(),
                            release,
                        });
                        let _ = released.await;
                        Ok::<_, std::convert::Infallible>(http::Response::new(
                            http_body_util::Full::new(Bytes::from(target)),
                        ))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(TokioIo::new(stream), service)
                .await;
            });
        }
    });
    (addr, received)
}

const HELD_CONFIG: &str = r#"
server: { listen: "{listen}", workers: 1 }
ops: { listen: "127.0.0.1:0" }
store: { url: "sqlite://{db}" }
projects: { demo: {} }
upstreams:
  held: { url: "http://{upstream}", timeout: 30s }
routes:
  - { methods: [GET], path: "/v1/**", public: true }
"#;

/// Upstream pools outlive a re-bind (the config keeps them), but each thread has its own: a
/// request of a new thread must not ride on an idle upstream connection whose task runs on an
/// old thread's runtime, which is dropped when that thread finishes draining (it would fail with
/// 502, "client error (SendRequest)").
#[tokio::test]
async fn a_request_on_the_rebound_listener_survives_the_old_thread_ending() {
    let (upstream, mut held) = start_holding_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("keygate.yaml");
    let write = |listen: &str| {
        let text = common::fill(
            &HELD_CONFIG.replace("{listen}", listen),
            upstream,
            &dir.path().join("keys.db"),
        );
        let staging = dir.path().join("keygate.yaml.new");
        std::fs::write(&staging, text).unwrap();
        std::fs::rename(&staging, &config).unwrap();
    };
    write("127.0.0.1:0");
    let gateway = ServeProcess::start(&config).await;
    let (pid, old) = (gateway.pid(), gateway.addr);
    let ops = gateway
        .ops_addr
        .expect("the ops listener's address in the log");

    // Two requests upstream at once: two upstream connections, driven by the first thread.
    let mut first = Conn::open(old).await;
    let mut second = Conn::open(old).await;
    let a = tokio::spawn(first.get("/v1/warm-a", None));
    let b = tokio::spawn(second.get("/v1/warm-b", None));
    let warm = [held.recv().await.unwrap(), held.recv().await.unwrap()];
    for request in warm {
        let _ = request.release.send(());
    }
    assert_eq!(a.await.unwrap().status, 200);
    assert_eq!(b.await.unwrap().status, 200);
    second.close().await;
    // A request held upstream keeps the first thread draining after the re-bind.
    let in_flight = tokio::spawn(first.get("/v1/old-in-flight", None));
    let old_request = held.recv().await.unwrap();
    assert_eq!(old_request.target, "/v1/old-in-flight");

    let new = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    write(&new.to_string());
    let (status, body) = post_reload(ops).await;
    assert_eq!(status, 200, "{body}");
    expect_worker_threads(
        pid,
        2,
        Duration::from_secs(10),
        "the new listener's thread did not start",
    )
    .await;
    // On the new listener: sent on the idle upstream connection the first thread drives.
    let mut third = Conn::open(new).await;
    let sent = tokio::spawn(third.get("/v1/new", None));
    let new_request = held.recv().await.unwrap();
    assert_eq!(new_request.target, "/v1/new");

    // The old request is answered: the first thread finishes draining and ends.
    let _ = old_request.release.send(());
    assert_eq!(in_flight.await.unwrap().status, 200);
    expect_worker_threads(
        pid,
        1,
        Duration::from_secs(10),
        "the old listener's thread did not end",
    )
    .await;
    let _ = new_request.release.send(());
    let response = tokio::time::timeout(Duration::from_secs(10), sent)
        .await
        .expect("no answer on the new listener")
        .unwrap();
    assert_eq!(
        response.status,
        200,
        "{}",
        String::from_utf8_lossy(&response.body)
    );
    assert_eq!(&response.body[..], b"/v1/new");
    third.close().await;
}

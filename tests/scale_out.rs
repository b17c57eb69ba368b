//! Three `keygate serve` processes on one PostgreSQL database: a key written through any node is
//! live on every node within a second, bulk writes land everywhere, and dropped database
//! connections (or a PostgreSQL restart) never fail a proxied request.
//!
//! PostgreSQL is expected on 127.0.0.1:5432 (`KEYGATE_TEST_PG_PORT` to change the port) with
//! trust authentication for `postgres` or `root`. Without it these tests print "SKIPPED: …" and
//! pass, unless `KEYGATE_REQUIRE_SERVICES=1`. `survives_a_postgresql_restart` restarts the
//! server, so it runs only with `KEYGATE_TEST_PG_RESTART=1` (the command is
//! `pg_ctlcluster <version> main restart`, or `KEYGATE_TEST_PG_RESTART_CMD`).

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::pg::PgDb;
use common::ServeProcess;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use keygate::keys::store::{KeyStore, PostgresStore};
use keygate::keys::KeyKind;
use serde_json::{json, Value};
use tokio::sync::{oneshot, Semaphore};

// ---------------------------------------------------------------------------------------------
// A PostgreSQL database per test

// ---------------------------------------------------------------------------------------------
// Three nodes

struct Cluster {
    nodes: Vec<ServeProcess>,
    /// Each node's own admin key (keys.read, keys.write, users.read), created with the CLI.
    admins: Vec<String>,
    client: Client<HttpConnector, Full<Bytes>>,
    _dir: tempfile::TempDir,
    _stop_echo: oneshot::Sender<()>,
    // Dropped last: the nodes are gone before their database is.
    db: PgDb,
}

struct Reply {
    status: StatusCode,
    body: Value,
}

impl Cluster {
    async fn start() -> Option<Cluster> {
        let db = PgDb::fresh().await?;
        let dir = tempfile::tempdir().unwrap();
        let (upstream, stop_echo) = common::start_echo().await;
        let sqlite = dir.path().join("unused.db");
        let config = common::fill(common::TEST_CONFIG, upstream, &sqlite)
            .replace(&format!("sqlite://{}", sqlite.display()), &db.url());
        assert!(config.contains("postgres://"), "{config}");
        let mut paths = Vec::new();
        let mut admins = Vec::new();
        for n in 0..3 {
            let path = dir.path().join(format!("node{n}.yaml"));
            std::fs::write(&path, &config).unwrap();
            let out = tokio::process::Command::new(common::keygate_bin())
                .args(["keys", "create", "--config"])
                .arg(&path)
                .args(["--project", "demo", "--name", &format!("admin-{n}")])
                .args(["--scopes", "keys.read,keys.write,users.read"])
                .output()
                .await
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let model: Value = serde_json::from_slice(&out.stdout).unwrap();
            admins.push(model["secret"].as_str().unwrap().to_owned());
            paths.push(path);
        }
        let mut nodes = Vec::new();
        for path in &paths {
            nodes.push(ServeProcess::start(path).await);
        }
        assert!(!sqlite.exists(), "a node used SQLite");
        Some(Cluster {
            nodes,
            admins,
            client: Client::builder(TokioExecutor::new()).build_http(),
            _dir: dir,
            _stop_echo: stop_echo,
            db,
        })
    }

    fn addr(&self, node: usize) -> SocketAddr {
        self.nodes[node].addr
    }

    /// Creates an API key (users.read) through `node`'s key API.
    async fn create_key(&self, node: usize, id: &str) -> Reply {
        send(
            &self.client,
            self.addr(node),
            Method::POST,
            "/v1/project/keys",
            &self.admins[node],
            Some(json!({"keyId": id, "name": id, "scopes": ["users.read"]})),
        )
        .await
    }

    /// Creates a key through `node`, retrying until it is acknowledged; returns its secret.
    async fn create_key_retrying(&self, node: usize, id: &str, within: Duration) -> String {
        let started = Instant::now();
        loop {
            let reply = self.create_key(node, id).await;
            if reply.status == StatusCode::CREATED {
                return reply.body["secret"].as_str().unwrap().to_owned();
            }
            assert_service_unavailable(&reply);
            assert!(started.elapsed() < within, "{id} never created");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A proxied request with `secret`.
    async fn users(&self, node: usize, secret: &str) -> Reply {
        send(
            &self.client,
            self.addr(node),
            Method::GET,
            "/v1/users",
            secret,
            None,
        )
        .await
    }

    async fn accepted_on(&self, node: usize, secret: &str, within: Duration) -> Option<Duration> {
        common::eventually(within, || async {
            self.users(node, secret).await.status == StatusCode::OK
        })
        .await
    }
}

async fn send(
    client: &Client<HttpConnector, Full<Bytes>>,
    addr: SocketAddr,
    method: Method,
    path: &str,
    secret: &str,
    body: Option<Value>,
) -> Reply {
    let request = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .header("x-appwrite-key", secret)
        .header("x-appwrite-project", "demo")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(
            body.map(|b| b.to_string()).unwrap_or_default(),
        )))
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(10), client.request(request))
        .await
        .expect("no answer within 10 s")
        .expect("the request failed");
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    Reply {
        status,
        body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    }
}

/// A write refused during an outage: 503 with an Appwrite error body.
#[track_caller]
fn assert_service_unavailable(reply: &Reply) {
    assert_eq!(
        reply.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        reply.body
    );
    assert_eq!(
        reply.body["type"], "general_service_unavailable",
        "{}",
        reply.body
    );
    assert_eq!(reply.body["code"], 503, "{}", reply.body);
    assert!(reply.body["message"].is_string(), "{}", reply.body);
    assert!(reply.body["version"].is_string(), "{}", reply.body);
}

// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_written_on_one_node_is_live_on_the_others_within_a_second() {
    let Some(cluster) = Cluster::start().await else {
        return;
    };
    let created = cluster.create_key(0, "shared").await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
    let secret = created.body["secret"].as_str().unwrap().to_owned();
    assert_eq!(cluster.users(0, &secret).await.status, StatusCode::OK);
    for node in [1, 2] {
        let took = cluster
            .accepted_on(node, &secret, Duration::from_secs(1))
            .await;
        assert!(
            took.is_some(),
            "the key is not accepted on node {node} within 1 s"
        );
        eprintln!(
            "created on A: accepted on node {node} after {:?}",
            took.unwrap()
        );
    }

    let deleted = send(
        &cluster.client,
        cluster.addr(1),
        Method::DELETE,
        "/v1/project/keys/shared",
        &cluster.admins[1],
        None,
    )
    .await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT, "{}", deleted.body);
    for node in [0, 2] {
        let took = common::eventually(Duration::from_secs(1), || async {
            let reply = cluster.users(node, &secret).await;
            reply.status == StatusCode::UNAUTHORIZED && reply.body["type"] == "user_unauthorized"
        })
        .await;
        assert!(
            took.is_some(),
            "the key still works on node {node} 1 s after its deletion"
        );
        eprintln!(
            "deleted on B: refused on node {node} after {:?}",
            took.unwrap()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_concurrent_creates_across_nodes_land_everywhere() {
    let Some(cluster) = Cluster::start().await else {
        return;
    };
    let cluster = Arc::new(cluster);
    let permits = Arc::new(Semaphore::new(16));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for n in 0..1000 {
        let (cluster, permits) = (cluster.clone(), permits.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = permits.acquire().await.unwrap();
            let node = n % 3;
            let reply = cluster.create_key(node, &format!("bulk{n}")).await;
            assert_eq!(reply.status, StatusCode::CREATED, "bulk{n}: {}", reply.body);
            (n, reply.body["secret"].as_str().unwrap().to_owned())
        }));
    }
    let mut secrets = vec![String::new(); 1000];
    for task in tasks {
        let (n, secret) = task.await.unwrap();
        secrets[n] = secret;
    }
    eprintln!("1000 creates across 3 nodes in {:?}", started.elapsed());

    let store = PostgresStore::open(&cluster.db.url()).await.unwrap();
    let stored = store.list("demo", KeyKind::Standard).await.unwrap();
    assert_eq!(stored.len(), 1000 + 3);
    for n in 0..1000 {
        assert!(
            stored.iter().any(|k| k.id == format!("bulk{n}")),
            "bulk{n} missing"
        );
    }
    // The key API on each node sees them too.
    for node in 0..3 {
        let listed = send(
            &cluster.client,
            cluster.addr(node),
            Method::GET,
            "/v1/project/keys",
            &cluster.admins[node],
            None,
        )
        .await;
        assert_eq!(listed.status, StatusCode::OK, "{}", listed.body);
        assert_eq!(listed.body["total"], 1003, "node {node}");
    }
    // Every node accepts a sample of 60 keys, most of them created through another node.
    for node in 0..3 {
        let sample: Vec<&String> = secrets.iter().skip(node * 7).step_by(16).take(60).collect();
        assert!(sample.len() >= 50);
        let refused = Mutex::new(String::new());
        let took = common::eventually(Duration::from_secs(2), || async {
            for (i, secret) in sample.iter().enumerate() {
                let reply = cluster.users(node, secret).await;
                if reply.status != StatusCode::OK {
                    *refused.lock().unwrap() =
                        format!("sample {i}: {} {}", reply.status, reply.body);
                    return false;
                }
            }
            true
        })
        .await;
        assert!(
            took.is_some(),
            "node {node} refuses some of the new keys: {}",
            refused.lock().unwrap()
        );
    }
}

/// Proxied requests from a loop over all three nodes: counts sent and failed.
struct Traffic {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicUsize>,
    failures: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Traffic {
    fn start(cluster: &Arc<Cluster>, secret: String) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicUsize::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let (c, st, se, f) = (
            cluster.clone(),
            stop.clone(),
            sent.clone(),
            failures.clone(),
        );
        let task = tokio::spawn(async move {
            while !st.load(Ordering::SeqCst) {
                for node in 0..3 {
                    let reply = c.users(node, &secret).await;
                    se.fetch_add(1, Ordering::SeqCst);
                    if reply.status != StatusCode::OK {
                        f.lock()
                            .unwrap()
                            .push(format!("node {node}: {} {}", reply.status, reply.body));
                    }
                }
            }
        });
        Traffic {
            stop,
            sent,
            failures,
            task,
        }
    }

    async fn finish(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.unwrap();
        let failures = self.failures.lock().unwrap().clone();
        (self.sent.load(Ordering::SeqCst), failures)
    }
}

/// Admin writes from a loop over all three nodes: how many were refused (each must be a 503
/// with an Appwrite body; anything else is recorded as wrong).
struct Writes {
    stop: Arc<AtomicBool>,
    refused: Arc<AtomicUsize>,
    wrong: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<usize>,
}

impl Writes {
    fn start(cluster: &Arc<Cluster>, prefix: &'static str) -> Writes {
        let stop = Arc::new(AtomicBool::new(false));
        let refused = Arc::new(AtomicUsize::new(0));
        let wrong = Arc::new(Mutex::new(Vec::new()));
        let (c, st, r, w) = (
            cluster.clone(),
            stop.clone(),
            refused.clone(),
            wrong.clone(),
        );
        let task = tokio::spawn(async move {
            let mut n = 0;
            while !st.load(Ordering::SeqCst) {
                let node = n % 3;
                let reply = c.create_key(node, &format!("{prefix}{n}")).await;
                n += 1;
                match reply.status {
                    StatusCode::CREATED => {}
                    StatusCode::SERVICE_UNAVAILABLE
                        if reply.body["type"] == "general_service_unavailable"
                            && reply.body["code"] == 503
                            && reply.body["message"].is_string() =>
                    {
                        r.fetch_add(1, Ordering::SeqCst);
                    }
                    // Anything but a 201 or an Appwrite 503 is wrong.
                    other => w.lock().unwrap().push(format!("{other} {}", reply.body)),
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            n
        });
        Writes {
            stop,
            refused,
            wrong,
            task,
        }
    }

    async fn finish(self) -> (usize, usize, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        let attempted = self.task.await.unwrap();
        let wrong = self.wrong.lock().unwrap().clone();
        (attempted, self.refused.load(Ordering::SeqCst), wrong)
    }
}

/// What both outage tests check once the outage is over.
async fn after_the_outage(cluster: &Cluster, id: &str) {
    let started = Instant::now();
    let secret = cluster
        .create_key_retrying(0, id, Duration::from_secs(20))
        .await;
    let created_after = started.elapsed();
    for node in [1, 2] {
        let took = cluster
            .accepted_on(node, &secret, Duration::from_secs(5))
            .await;
        assert!(
            took.is_some(),
            "{id}, created on A after the outage, is not accepted on node {node}"
        );
        eprintln!(
            "{id} created on A after {created_after:?}; accepted on node {node} after {:?}",
            took.unwrap()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn proxied_requests_never_fail_while_database_connections_are_terminated() {
    let Some(cluster) = Cluster::start().await else {
        return;
    };
    let cluster = Arc::new(cluster);
    let created = cluster.create_key(0, "steady").await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
    let secret = created.body["secret"].as_str().unwrap().to_owned();
    for node in 0..3 {
        assert!(cluster
            .accepted_on(node, &secret, Duration::from_secs(1))
            .await
            .is_some());
    }

    let traffic = Traffic::start(&cluster, secret);
    let writes = Writes::start(&cluster, "w");
    tokio::time::sleep(Duration::from_millis(300)).await;
    for round in 0..4 {
        let killed = cluster.db.terminate_connections().await;
        assert!(
            killed >= 3,
            "round {round}: only {killed} connections terminated"
        );
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
    let (attempted, refused, wrong) = writes.finish().await;
    let (sent, failures) = traffic.finish().await;
    assert!(
        failures.is_empty(),
        "{} of {sent} proxied requests failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(sent > 100, "only {sent} proxied requests");
    assert!(wrong.is_empty(), "admin writes answered wrongly: {wrong:?}");
    eprintln!(
        "{sent} proxied requests, none failed; {attempted} admin writes, {refused} refused with 503"
    );

    after_the_outage(&cluster, "after-terminations").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn survives_a_postgresql_restart() {
    if std::env::var("KEYGATE_TEST_PG_RESTART").as_deref() != Ok("1") {
        eprintln!("SKIPPED: set KEYGATE_TEST_PG_RESTART=1 to restart PostgreSQL in this test");
        return;
    }
    let Some(cluster) = Cluster::start().await else {
        return;
    };
    let cluster = Arc::new(cluster);
    let created = cluster.create_key(0, "steady").await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
    let secret = created.body["secret"].as_str().unwrap().to_owned();
    for node in 0..3 {
        assert!(cluster
            .accepted_on(node, &secret, Duration::from_secs(1))
            .await
            .is_some());
    }

    let traffic = Traffic::start(&cluster, secret);
    let writes = Writes::start(&cluster, "w");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let command = std::env::var("KEYGATE_TEST_PG_RESTART_CMD").unwrap_or_else(|_| {
        let version = std::fs::read_dir("/etc/postgresql")
            .expect("/etc/postgresql (or set KEYGATE_TEST_PG_RESTART_CMD)")
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .max_by_key(|v| v.parse::<u32>().unwrap_or(0))
            .unwrap();
        format!("pg_ctlcluster {version} main restart")
    });
    let started = Instant::now();
    let status = tokio::process::Command::new("sh")
        .args(["-c", &command])
        .status()
        .await
        .unwrap();
    assert!(status.success(), "`{command}` failed");
    eprintln!("`{command}` took {:?}", started.elapsed());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (attempted, refused, wrong) = writes.finish().await;
    let (sent, failures) = traffic.finish().await;
    assert!(
        failures.is_empty(),
        "{} of {sent} proxied requests failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(wrong.is_empty(), "admin writes answered wrongly: {wrong:?}");
    // The restart takes long enough that some writes meet it, and each of those got a 503.
    assert!(
        refused > 0,
        "no admin write met the restart ({attempted} attempted)"
    );
    eprintln!(
        "{sent} proxied requests, none failed; {attempted} admin writes, {refused} refused with 503"
    );

    after_the_outage(&cluster, "after-restart").await;
}

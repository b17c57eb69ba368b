//! The request path never waits for the store, and acknowledged writes survive a kill -9.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Harness, ServeProcess};
use http::Method;
use serde_json::{json, Value};
use tokio::sync::Semaphore;

#[tokio::test]
async fn proxied_requests_succeed_while_store_writes_are_blocked() {
    let h = Harness::start().await;
    let (id, key) = h
        .create_key("demo", &["users.read", "keys.read"], None)
        .await;

    // Another connection takes SQLite's write lock and keeps it: no store write can happen.
    let blocker = rusqlite::Connection::open(&h.db).unwrap();
    blocker.execute_batch("BEGIN EXCLUSIVE").unwrap();

    // Every request brings usage to write (a new SDK name each time); none may wait for it.
    let served = tokio::time::timeout(Duration::from_secs(20), async {
        for i in 0..300 {
            let sdk = format!("sdk-{i}");
            let response = h
                .request(
                    Method::GET,
                    "/v1/users",
                    &[
                        ("x-appwrite-key", key.expose()),
                        ("x-appwrite-project", "demo"),
                        ("x-sdk-name", &sdk),
                    ],
                    "",
                )
                .await;
            assert_eq!(response.status, 200);
        }
    })
    .await;
    assert!(
        served.is_ok(),
        "proxied requests waited on the blocked store"
    );

    // Once writes are possible again, the usage that was queued lands.
    blocker.execute_batch("COMMIT").unwrap();
    drop(blocker);
    let written = common::eventually(Duration::from_secs(15), || async {
        let model = h
            .api(
                Method::GET,
                &format!("/v1/project/keys/{id}"),
                &key,
                "demo",
                Value::Null,
            )
            .await
            .json();
        model["accessedAt"] != ""
    })
    .await;
    assert!(written.is_some());
}

#[tokio::test]
async fn acknowledged_creates_survive_kill_9_of_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("keys.db");
    let config = dir.path().join("keygate.yaml");
    let (upstream, _stop) = common::start_echo().await;
    std::fs::write(&config, common::fill(common::TEST_CONFIG, upstream, &db)).unwrap();
    let admin = std::process::Command::new(common::keygate_bin())
        .args(["keys", "create", "--config"])
        .arg(&config)
        .args([
            "--project",
            "demo",
            "--name",
            "admin",
            "--scopes",
            "keys.read,keys.write,users.read",
        ])
        .output()
        .unwrap();
    assert!(admin.status.success());
    let admin: Value = serde_json::from_slice(&admin.stdout).unwrap();
    let secret = admin["secret"].as_str().unwrap().to_owned();

    let mut server = ServeProcess::start(&config).await;
    let url = format!("http://{}/v1/project/keys", server.addr);
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let (acked_tx, mut acked_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let permits = Arc::new(Semaphore::new(16));
    let mut tasks = Vec::new();
    for n in 0..600 {
        let (client, url, secret, acked_tx, permits) = (
            client.clone(),
            url.clone(),
            secret.clone(),
            acked_tx.clone(),
            permits.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let _permit = permits.acquire().await.unwrap();
            let id = format!("c{n}");
            let body = json!({"keyId": id, "name": "crash", "scopes": ["users.read"]}).to_string();
            let request = http::Request::post(&url)
                .header("x-appwrite-key", &secret)
                .header("x-appwrite-project", "demo")
                .header("content-type", "application/json")
                .body(http_body_util::Full::new(bytes::Bytes::from(body)))
                .unwrap();
            if let Ok(response) = client.request(request).await {
                if response.status() == 201 {
                    let _ = acked_tx.send(id);
                }
            }
        }));
    }
    drop(acked_tx);
    let mut acked = Vec::new();
    while acked.len() < 150 {
        acked.push(
            acked_rx
                .recv()
                .await
                .expect("the server acknowledged fewer than 150 creates"),
        );
    }
    // Creates are still in flight: kill -9 now.
    server.child.start_kill().unwrap();
    server.child.wait().await.unwrap();
    for task in tasks {
        let _ = task.await;
    }
    while let Ok(id) = acked_rx.try_recv() {
        acked.push(id);
    }
    assert!(
        acked.len() < 600,
        "the kill came after every create had finished"
    );

    let store = keygate::keys::store::SqliteStore::open(&db).await.unwrap();
    let stored =
        keygate::keys::store::KeyStore::list(&store, "demo", keygate::keys::KeyKind::Standard)
            .await
            .unwrap();
    for id in &acked {
        assert!(
            stored.iter().any(|k| &k.id == id),
            "acknowledged key {id} was lost"
        );
    }
    eprintln!(
        "{} creates acknowledged before and around the kill; all {} present",
        acked.len(),
        acked.len()
    );
}

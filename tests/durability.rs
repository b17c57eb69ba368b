//! kill -9 in the middle of CLI writes loses no key whose create had returned, and the store
//! opens cleanly afterwards.

mod common;

use std::collections::HashMap;
use std::process::Stdio;
use std::time::Duration;

use common::keygate_bin;
use keygate::keys::store::{KeyStore, SqliteStore};
use keygate::keys::Digest;

#[tokio::test]
async fn killed_writers_lose_no_acknowledged_key() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("keys.db");
    let config = dir.path().join("keygate.yaml");
    std::fs::write(
        &config,
        keygate::config::EMBEDDED_DEFAULT.replace(
            "sqlite://data/keygate.db",
            &format!("sqlite://{}", db.display()),
        ),
    )
    .unwrap();

    let mut acknowledged: HashMap<String, String> = HashMap::new();
    let mut killed = 0;
    for round in 0..25u64 {
        let mut children = Vec::new();
        for n in 0..4 {
            let id = format!("k{round}-{n}");
            let child = tokio::process::Command::new(keygate_bin())
                .args(["keys", "create", "--config"])
                .arg(&config)
                .args([
                    "--project",
                    "demo",
                    "--name",
                    "durable",
                    "--scopes",
                    "users.read",
                    "--id",
                    &id,
                ])
                .env("KEYGATE_LOG", "off")
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            children.push((id, child));
        }
        // Fault injection, not synchronisation: kill two writers at staggered moments.
        for (i, (_, child)) in children.iter_mut().enumerate().take(2) {
            tokio::time::sleep(Duration::from_micros(1500 * (round % 8) + 700 * i as u64)).await;
            if child.start_kill().is_ok() {
                killed += 1;
            }
        }
        for (id, child) in children {
            let output = child.wait_with_output().await.unwrap();
            if output.status.success() {
                let model: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
                assert_eq!(model["$id"], id.as_str());
                acknowledged.insert(id, model["secret"].as_str().unwrap().to_owned());
            }
        }
    }
    eprintln!(
        "{} creates acknowledged, {killed} writers killed",
        acknowledged.len()
    );
    assert!(killed > 0);
    assert!(
        acknowledged.len() >= 50,
        "too few creates returned: {}",
        acknowledged.len()
    );

    let store = SqliteStore::open(&db)
        .await
        .expect("the store opens cleanly");
    store.ping().await.unwrap();
    let stored = store
        .list("demo", keygate::keys::KeyKind::Standard)
        .await
        .unwrap();
    for (id, secret) in &acknowledged {
        let record = stored
            .iter()
            .find(|r| &r.id == id)
            .unwrap_or_else(|| panic!("acknowledged key {id} was lost"));
        assert_eq!(record.digest, Digest::of(secret), "{id}: digest mismatch");
    }
    // Writes still work after the crashes.
    let output = std::process::Command::new(keygate_bin())
        .args(["keys", "list", "--config"])
        .arg(&config)
        .args(["--project", "demo"])
        .output()
        .unwrap();
    assert!(output.status.success());
}

//! The `keygate` binary: key commands on the store, config check, routes explain, and changes
//! made by the CLI reaching a running server.

mod common;

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use common::{eventually, keygate_bin, Harness};
use keygate::keys::Secret;

fn keygate(args: &[&str]) -> Output {
    std::process::Command::new(keygate_bin())
        .args(args)
        .env("KEYGATE_LOG", "warn")
        .output()
        .unwrap()
}

fn json(output: &Output) -> serde_json::Value {
    assert!(
        output.status.success(),
        "exit {:?}: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

/// A failure: non-zero exit and exactly one line on stderr, which is returned.
#[track_caller]
fn one_line_error(output: &Output) -> String {
    assert!(!output.status.success(), "expected a failure");
    let stderr = String::from_utf8_lossy(&output.stderr)
        .trim_end()
        .to_owned();
    assert_eq!(stderr.lines().count(), 1, "not one line: {stderr:?}");
    assert!(output.stdout.is_empty());
    stderr
}

fn keys(config: &Path, verb: &str, rest: &[&str]) -> Output {
    let config = config.to_str().unwrap();
    let mut args = vec!["keys", verb, "--config", config, "--project", "demo"];
    args.extend_from_slice(rest);
    keygate(&args)
}

#[tokio::test]
async fn key_lifecycle_and_secret_shown_once() {
    let h = Harness::start().await;
    let config = h.config_path.clone();
    let created = json(&keys(
        &config,
        "create",
        &[
            "--name",
            "CI",
            "--scopes",
            "users.read,documents.read",
            "--expire",
            "2099-01-01T00:00:00Z",
            "--id",
            "ci-key",
        ],
    ));
    assert_eq!(created["$id"], "ci-key");
    assert_eq!(created["name"], "CI");
    assert_eq!(
        created["scopes"],
        serde_json::json!(["users.read", "documents.read"])
    );
    assert_eq!(created["expire"], "2099-01-01T00:00:00.000+00:00");
    let secret = created["secret"].as_str().unwrap();
    assert!(
        secret.starts_with("standard_") && secret.len() == 9 + 256,
        "{secret}"
    );
    for field in [
        "$createdAt",
        "$updatedAt",
        "description",
        "accessedAt",
        "sdks",
    ] {
        assert!(created.get(field).is_some(), "{field}");
    }

    let listed = json(&keys(&config, "list", &[]));
    assert_eq!(listed["total"], 1);
    assert_eq!(listed["keys"][0]["$id"], "ci-key");
    assert_eq!(listed["keys"][0]["secret"], "");
    let got = json(&keys(&config, "get", &["ci-key"]));
    assert_eq!(got["secret"], "");
    assert!(!String::from_utf8_lossy(&keys(&config, "list", &[]).stdout).contains(secret));

    let updated = json(&keys(
        &config,
        "update",
        &["ci-key", "--scopes", "users.read", "--no-expire"],
    ));
    assert_eq!(updated["scopes"], serde_json::json!(["users.read"]));
    assert_eq!(updated["expire"], "");
    assert_eq!(updated["name"], "CI");
    assert_eq!(updated["secret"], "");

    json(&keys(&config, "delete", &["ci-key"]));
    let missing = one_line_error(&keys(&config, "get", &["ci-key"]));
    assert!(missing.contains("ci-key"), "{missing}");
    one_line_error(&keys(&config, "delete", &["ci-key"]));
}

#[tokio::test]
async fn bad_arguments_give_one_line_errors() {
    let h = Harness::start().await;
    let config = h.config_path.clone();
    let e = one_line_error(&keys(
        &config,
        "create",
        &["--name", "x", "--scopes", "users.raed"],
    ));
    assert!(e.contains("users.raed"), "{e}");
    let e = one_line_error(&keys(
        &config,
        "create",
        &["--name", "x", "--expire", "tomorrow"],
    ));
    assert!(e.contains("tomorrow"), "{e}");
    one_line_error(&keys(
        &config,
        "create",
        &["--name", "", "--scopes", "users.read"],
    ));
    one_line_error(&keys(&config, "create", &["--name", "x", "--id", "_bad"]));
    one_line_error(&keys(&config, "create", &["--scopes", "users.read"]));
    one_line_error(&keys(&config, "get", &[]));
    let e = one_line_error(&keygate(&[
        "keys",
        "create",
        "--config",
        config.to_str().unwrap(),
        "--project",
        "nope",
        "--name",
        "x",
    ]));
    assert!(e.contains("nope"), "{e}");
    one_line_error(&keygate(&[
        "keys",
        "list",
        "--config",
        "/nonexistent/keygate.yaml",
        "--project",
        "demo",
    ]));
    one_line_error(&keygate(&["frobnicate"]));

    json(&keys(&config, "create", &["--name", "x", "--id", "dup"]));
    let e = one_line_error(&keys(&config, "create", &["--name", "x", "--id", "dup"]));
    assert!(e.contains("already exists"), "{e}");
}

#[tokio::test]
async fn cli_changes_reach_the_running_server_within_a_second() {
    let h = Harness::start().await;
    let created = json(&keys(
        &h.config_path,
        "create",
        &["--name", "live", "--scopes", "users.read"],
    ));
    let secret = Secret::from_plaintext(created["secret"].as_str().unwrap().to_owned());
    let id = created["$id"].as_str().unwrap().to_owned();

    let took = eventually(Duration::from_secs(1), || async {
        h.get_as("/v1/users", &secret, "demo").await.status == 200
    })
    .await;
    assert!(took.is_some(), "created key not accepted within 1 s");

    json(&keys(
        &h.config_path,
        "update",
        &[&id, "--scopes", "documents.read"],
    ));
    let took = eventually(Duration::from_secs(1), || async {
        h.get_as("/v1/users", &secret, "demo").await.status == 401
    })
    .await;
    assert!(took.is_some(), "narrowed key still accepted after 1 s");

    json(&keys(&h.config_path, "delete", &[&id]));
    let took = eventually(Duration::from_secs(1), || async {
        let response = h
            .get_as("/v1/databases/d/collections/c/documents", &secret, "demo")
            .await;
        response.status == 401 && response.json()["type"] == "user_unauthorized"
    })
    .await;
    assert!(took.is_some(), "deleted key still accepted after 1 s");
}

#[test]
fn config_check_names_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.yaml");
    std::fs::write(&good, keygate::config::EMBEDDED_DEFAULT).unwrap();
    let output = keygate(&["config", "check", good.to_str().unwrap()]);
    assert!(output.status.success());
    assert!(String::from_utf8_lossy(&output.stdout).contains("ok"));

    let bad = dir.path().join("bad.yaml");
    let text = keygate::config::EMBEDDED_DEFAULT.replace(
        "path: /v1/locale, scopes: [locale.read] }",
        "path: /v1/locale, scopes: [locale.read], upstream: nowhere }",
    );
    std::fs::write(&bad, &text).unwrap();
    let line = text.lines().position(|l| l.contains("nowhere")).unwrap() + 1;
    let e = one_line_error(&keygate(&["config", "check", bad.to_str().unwrap()]));
    assert!(e.contains(&format!("bad.yaml:{line}:")), "{e}");
    assert!(e.contains("upstream") && e.contains("nowhere"), "{e}");

    std::fs::write(
        &bad,
        "server: { listen: \"127.0.0.1:1\" }\nstore: {url: x}\nbogus: 1\n",
    )
    .unwrap();
    let e = one_line_error(&keygate(&["config", "check", bad.to_str().unwrap()]));
    assert!(e.contains("bogus"), "{e}");
}

#[test]
fn routes_explain_prints_the_match_as_json() {
    let out = keygate(&[
        "routes",
        "explain",
        "GET",
        "/v1/databases/x/collections/y/documents",
    ]);
    let explained: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(explained["matched"], true);
    assert_eq!(
        explained["path"],
        "/v1/databases/{databaseId}/collections/{collectionId}/documents"
    );
    assert_eq!(
        explained["scopes"],
        serde_json::json!(["documents.read", "rows.read"])
    );
    assert_eq!(explained["public"], false);
    assert!(explained["index"].is_u64());

    let out = keygate(&["routes", "explain", "GET", "/v1/health/version"]);
    let explained: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(explained["public"], true);

    let out = keygate(&["routes", "explain", "DELETE", "/nowhere"]);
    let explained: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(explained["matched"], false);
}

#[tokio::test]
async fn rotate_audit_import_and_export() {
    let h = Harness::start().await;
    let config = h.config_path.clone();
    let created = json(&keys(
        &config,
        "create",
        &["--name", "r", "--scopes", "users.read", "--id", "r1"],
    ));
    let first = Secret::from_plaintext(created["secret"].as_str().unwrap().to_owned());
    let rotated = json(&keys(&config, "rotate", &["r1", "--grace", "1h"]));
    let second = Secret::from_plaintext(rotated["secret"].as_str().unwrap().to_owned());
    assert_ne!(first, second);
    // Both secrets work during the grace period.
    for secret in [&first, &second] {
        let ok = eventually(Duration::from_secs(1), || async {
            h.get_as("/v1/users", secret, "demo").await.status == 200
        })
        .await;
        assert!(ok.is_some());
    }

    // Appwrite's list-keys JSON, with a standard and a legacy (unprefixed) secret.
    let legacy = "a".repeat(40) + "legacysecret";
    let standard = Secret::generate();
    let export = serde_json::json!({"total": 2, "keys": [
        {"$id": "imp1", "name": "Imported", "expire": "", "scopes": ["users.read"], "secret": standard.expose(), "accessedAt": "", "sdks": []},
        {"$id": "imp2", "name": "Legacy", "expire": "2099-01-01T00:00:00.000+00:00", "scopes": ["users.read"], "secret": legacy}
    ]});
    let file = h.dir.path().join("appwrite-keys.json");
    std::fs::write(&file, export.to_string()).unwrap();
    let imported = json(&keys(&config, "import", &[file.to_str().unwrap()]));
    assert_eq!(imported["imported"], serde_json::json!(["imp1", "imp2"]));
    for secret in [standard.clone(), Secret::from_plaintext(legacy.clone())] {
        let ok = eventually(Duration::from_secs(1), || async {
            h.get_as("/v1/users", &secret, "demo").await.status == 200
        })
        .await;
        assert!(ok.is_some(), "imported key not accepted");
    }
    // Importing again is idempotent; a file with an unknown scope is refused whole.
    let again = json(&keys(&config, "import", &[file.to_str().unwrap()]));
    assert_eq!(again["skipped"], serde_json::json!(["imp1", "imp2"]));
    std::fs::write(
        &file,
        serde_json::json!({"keys": [
            {"$id": "ok1", "name": "fine", "scopes": [], "secret": "standard_x1"},
            {"$id": "bad1", "name": "bad", "scopes": ["nope.read"], "secret": "standard_x2"}
        ]})
        .to_string(),
    )
    .unwrap();
    one_line_error(&keys(&config, "import", &[file.to_str().unwrap()]));
    assert!(!String::from_utf8_lossy(&keys(&config, "list", &[]).stdout).contains("ok1"));

    let exported = json(&keys(&config, "export", &[]));
    let text = exported.to_string();
    assert!(exported["keys"]
        .as_array()
        .unwrap()
        .iter()
        .all(|k| k["secret"] == ""));
    for secret in [
        first.expose(),
        second.expose(),
        standard.expose(),
        legacy.as_str(),
    ] {
        assert!(!text.contains(secret));
    }

    json(&keys(&config, "delete", &["r1"]));
    let audit = keygate(&["audit", "--config", config.to_str().unwrap(), "--key", "r1"]);
    let audit = json(&audit);
    let actions: Vec<&str> = audit["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, vec!["create", "rotate", "delete"]);
    assert!(audit["events"]
        .as_array()
        .unwrap()
        .iter()
        .all(|e| e["actor"] == "cli"));
    let all =
        String::from_utf8_lossy(&keygate(&["audit", "--config", config.to_str().unwrap()]).stdout)
            .into_owned();
    assert!(all.contains("imp2"));
    for secret in [
        first.expose(),
        second.expose(),
        standard.expose(),
        legacy.as_str(),
    ] {
        assert!(!all.contains(secret));
    }
}

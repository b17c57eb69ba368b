//! The real Appwrite SDKs (`appwrite` 27 from PyPI, `node-appwrite` 27 from npm) drive the key
//! API against a running keygate: list, get, update, delete, an ephemeral key used on a proxied
//! route, and an escalation refused. `.ci/run` installs the SDKs into `tests/sdk/` and sets
//! `KEYGATE_REQUIRE_SDKS=1`, which turns a missing SDK into a failure instead of a skip.

mod common;

use std::path::{Path, PathBuf};

use common::Harness;
use http::Method;
use serde_json::json;

fn sdk_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("sdk")
}

fn required() -> bool {
    std::env::var("KEYGATE_REQUIRE_SDKS").is_ok_and(|v| v == "1")
}

/// Returns false (and says so) when the SDK is not installed and not required.
fn available(what: &str, present: bool) -> bool {
    if !present {
        assert!(!required(), "{what} is not installed (see .ci/run)");
        eprintln!("SKIPPED: {what} is not installed; run .ci/run or see README to install it");
    }
    present
}

async fn run_script(program: &Path, script: &str) {
    let h = Harness::start().await;
    let (_, manager) = h
        .create_key("demo", &["keys.read", "keys.write", "users.read"], None)
        .await;
    let created = h
        .api(
            Method::POST,
            "/v1/project/keys",
            &manager,
            "demo",
            json!({"keyId": "sdk-target", "name": "sdk-target", "scopes": ["users.read"]}),
        )
        .await;
    assert_eq!(created.status, 201);
    let output = tokio::process::Command::new(program)
        .arg(sdk_dir().join(script))
        .current_dir(sdk_dir())
        .env("KEYGATE_ENDPOINT", format!("http://{}/v1", h.addr))
        .env("KEYGATE_PROJECT", "demo")
        .env("KEYGATE_KEY", manager.expose())
        .env("KEYGATE_TARGET", "sdk-target")
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{script} failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("sdk: ok"), "{stdout}");
}

#[tokio::test]
async fn python_sdk_drives_the_key_api() {
    let python = sdk_dir().join(".venv/bin/python");
    if available("the Python SDK (tests/sdk/.venv)", python.exists()) {
        run_script(&python, "keys_sdk.py").await;
    }
}

#[tokio::test]
async fn node_sdk_drives_the_key_api() {
    let installed = sdk_dir().join("node_modules/node-appwrite").exists();
    if available("node-appwrite (tests/sdk/node_modules)", installed) {
        run_script(Path::new("node"), "keys_sdk.mjs").await;
    }
}

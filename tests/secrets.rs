//! No secret appears in logs at any level, in audit rows, in list/get responses or in `Debug`
//! output. Logs are captured at TRACE from every target while keys are created, rotated, listed,
//! minted and used, then searched for every secret.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};

use common::Harness;
use http::Method;
use keygate::keys::Secret;
use serde_json::{json, Value};

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn secrets_never_reach_logs_audit_responses_or_debug() {
    let capture = Capture::default();
    let writer = capture.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .init();

    let h = Harness::start().await;
    let (_, admin) = h
        .create_key("demo", &["keys.read", "keys.write", "users.read"], None)
        .await;
    let mut secrets: Vec<String> = vec![admin.expose().to_owned()];

    let created = h
        .api(
            Method::POST,
            "/v1/project/keys",
            &admin,
            "demo",
            json!({"keyId": "s1", "name": "s1", "scopes": ["users.read"]}),
        )
        .await
        .json();
    secrets.push(created["secret"].as_str().unwrap().to_owned());
    let rotated = h
        .api(
            Method::POST,
            "/v1/project/keys/s1/rotate",
            &admin,
            "demo",
            json!({"grace": 60}),
        )
        .await
        .json();
    secrets.push(rotated["secret"].as_str().unwrap().to_owned());
    let ephemeral = h
        .api(
            Method::POST,
            "/v1/project/keys/ephemeral",
            &admin,
            "demo",
            json!({"scopes": ["users.read"], "duration": 60}),
        )
        .await
        .json();
    secrets.push(ephemeral["secret"].as_str().unwrap().to_owned());

    let mut bodies = String::new();
    for secret in &secrets {
        let secret = Secret::from_plaintext(secret.clone());
        h.get_as("/v1/users", &secret, "demo").await.echo();
        // Refused requests log too: a wrong project, a missing scope, an unknown variant.
        h.get_as("/v1/users", &secret, "other").await;
        h.get_as("/v1/graphql/nope", &secret, "demo").await;
        let mut unknown = secret.expose().to_owned();
        unknown.push('0');
        h.get_as("/v1/users", &Secret::from_plaintext(unknown), "demo")
            .await;
    }
    for path in ["/v1/project/keys", "/v1/project/keys/s1"] {
        let response = h.api(Method::GET, path, &admin, "demo", Value::Null).await;
        bodies.push_str(&String::from_utf8_lossy(&response.body));
    }
    h.api(
        Method::PUT,
        "/v1/project/keys/s1",
        &admin,
        "demo",
        json!({"name": "s1", "scopes": []}),
    )
    .await;
    h.api(
        Method::DELETE,
        "/v1/project/keys/s1",
        &admin,
        "demo",
        Value::Null,
    )
    .await;

    let audit = serde_json::to_string(&h.gateway.store().audit(None).await.unwrap()).unwrap();
    assert!(
        audit.contains("rotate") && audit.contains("delete"),
        "{audit}"
    );
    let records = h
        .gateway
        .store()
        .list("demo", keygate::keys::KeyKind::Standard)
        .await
        .unwrap();
    let snapshot = h.gateway.snapshot();
    let debug = format!(
        "{records:?} {snapshot:?} {:?} {:?}",
        Secret::from_plaintext(secrets[1].clone()),
        h.gateway.keys().lookup(&admin.digest())
    );

    let logs = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    assert!(
        logs.contains("keygate::access"),
        "access log was not captured"
    );
    for secret in &secrets {
        // The tail of the secret (random hex, or a JWT's signature) is what must never show.
        let core = secret
            .split_once('_')
            .map_or(secret.as_str(), |(_, rest)| rest);
        assert!(core.len() > 40);
        let probe = &core[core.len() - 40..];
        for (name, haystack) in [
            ("logs", &logs),
            ("audit", &audit),
            ("responses", &bodies),
            ("debug", &debug),
        ] {
            assert!(!haystack.contains(probe), "a secret leaked into the {name}");
        }
    }
}

//! The key-management API through real sockets: Appwrite's endpoints and shapes, secrets shown
//! once, the delegation ceiling, rotation, ephemeral keys and usage tracking.

mod common;

use std::time::Duration;

use chrono::{Duration as Span, Utc};
use common::{eventually, Harness};
use http::Method;
use keygate::keys::Secret;
use serde_json::{json, Value};

fn secret_of(created: &Value) -> Secret {
    Secret::from_plaintext(created["secret"].as_str().unwrap().to_owned())
}

fn in_days(days: i64) -> String {
    (Utc::now() + Span::days(days)).to_rfc3339()
}

#[tokio::test]
async fn crud_in_appwrite_shapes_with_secrets_shown_once() {
    let h = Harness::start().await;
    let (_, admin) = h
        .create_key(
            "demo",
            &["keys.read", "keys.write", "users.read", "users.write"],
            None,
        )
        .await;

    let created = h
        .api(
            Method::POST,
            "/v1/project/keys",
            &admin,
            "demo",
            json!({
                "keyId": "ci", "name": "CI", "scopes": ["users.read"], "expire": in_days(30)
            }),
        )
        .await;
    assert_eq!(
        created.status,
        201,
        "{}",
        String::from_utf8_lossy(&created.body)
    );
    let model = created.json();
    for field in [
        "$id",
        "$createdAt",
        "$updatedAt",
        "name",
        "description",
        "expire",
        "scopes",
        "secret",
        "accessedAt",
        "sdks",
    ] {
        assert!(model.get(field).is_some(), "{field} missing in {model}");
    }
    assert_eq!(model["$id"], "ci");
    let secret = secret_of(&model);
    assert!(secret.expose().starts_with("standard_"));
    // The new key works at once on this node.
    h.get_as("/v1/users", &secret, "demo").await.echo();

    let got = h
        .api(
            Method::GET,
            "/v1/project/keys/ci",
            &admin,
            "demo",
            Value::Null,
        )
        .await
        .json();
    assert_eq!(got["secret"], "");
    assert_eq!(got["scopes"], json!(["users.read"]));
    let list = h
        .api(Method::GET, "/v1/project/keys", &admin, "demo", Value::Null)
        .await;
    assert_eq!(list.status, 200);
    let list = list.json();
    assert_eq!(list["total"], 2);
    assert!(list["keys"]
        .as_array()
        .unwrap()
        .iter()
        .all(|k| k["secret"] == ""));
    assert!(!String::from_utf8_lossy(
        &h.api(Method::GET, "/v1/project/keys", &admin, "demo", Value::Null)
            .await
            .body
    )
    .contains(secret.expose()));

    // PUT is a full replace: omitting expire clears it, omitting description empties it.
    let updated = h
        .api(
            Method::PUT,
            "/v1/project/keys/ci",
            &admin,
            "demo",
            json!({"name": "CI 2", "scopes": ["users.write"]}),
        )
        .await;
    assert_eq!(updated.status, 200);
    let updated = updated.json();
    assert_eq!(updated["expire"], "");
    assert_eq!(updated["name"], "CI 2");
    assert_eq!(updated["secret"], "");
    h.get_as("/v1/users", &secret, "demo")
        .await
        .assert_error(401, "general_unauthorized_scope");

    // Alias paths, where the path's project must agree with the header.
    let via_alias = h
        .api(
            Method::GET,
            "/v1/projects/demo/keys/ci",
            &admin,
            "demo",
            Value::Null,
        )
        .await;
    assert_eq!(via_alias.json()["$id"], "ci");
    let no_header = h
        .request(
            Method::GET,
            "/v1/projects/demo/keys",
            &[("x-appwrite-key", admin.expose())],
            "",
        )
        .await;
    assert_eq!(no_header.status, 200);

    let deleted = h
        .api(
            Method::DELETE,
            "/v1/project/keys/ci",
            &admin,
            "demo",
            Value::Null,
        )
        .await;
    assert_eq!(deleted.status, 204);
    assert!(deleted.body.is_empty());
    h.get_as("/v1/users", &secret, "demo")
        .await
        .assert_error(401, "user_unauthorized");
    h.api(
        Method::GET,
        "/v1/project/keys/ci",
        &admin,
        "demo",
        Value::Null,
    )
    .await
    .assert_error(404, "key_not_found");
    h.api(
        Method::DELETE,
        "/v1/project/keys/ci",
        &admin,
        "demo",
        Value::Null,
    )
    .await
    .assert_error(404, "key_not_found");

    // Conflicts and invalid arguments.
    let body = json!({"keyId": "dup", "name": "x", "scopes": []});
    assert_eq!(
        h.api(
            Method::POST,
            "/v1/project/keys",
            &admin,
            "demo",
            body.clone()
        )
        .await
        .status,
        201
    );
    h.api(Method::POST, "/v1/project/keys", &admin, "demo", body)
        .await
        .assert_error(409, "key_already_exists");
    let too_many: Vec<String> = (0..201).map(|_| "users.read".to_owned()).collect();
    for bad in [
        json!({"name": "", "scopes": []}),
        json!({"name": "x".repeat(129), "scopes": []}),
        json!({"keyId": "-bad", "name": "x", "scopes": []}),
        json!({"keyId": "x".repeat(37), "name": "x", "scopes": []}),
        json!({"name": "x", "scopes": ["users.raed"]}),
        json!({"name": "x", "scopes": too_many}),
        json!({"name": "x", "scopes": [], "expire": "next tuesday"}),
        json!({"scopes": []}),
        json!("not an object"),
    ] {
        h.api(
            Method::POST,
            "/v1/project/keys",
            &admin,
            "demo",
            bad.clone(),
        )
        .await
        .assert_error(400, "general_argument_invalid");
    }
    let unique = h
        .api(
            Method::POST,
            "/v1/project/keys",
            &admin,
            "demo",
            json!({"keyId": "unique()", "name": "u", "scopes": []}),
        )
        .await
        .json();
    assert_eq!(unique["$id"].as_str().unwrap().len(), 20);

    // Without keys.read / keys.write.
    let (_, reader) = h.create_key("demo", &["users.read"], None).await;
    h.api(
        Method::GET,
        "/v1/project/keys",
        &reader,
        "demo",
        Value::Null,
    )
    .await
    .assert_error(401, "general_unauthorized_scope");
    h.request(
        Method::GET,
        "/v1/project/keys",
        &[("x-appwrite-project", "demo")],
        "",
    )
    .await
    .assert_error(401, "general_unauthorized_scope");
}

#[tokio::test]
async fn list_queries() {
    let h = Harness::start().await;
    let (_, admin) = h
        .create_key("demo", &["keys.read", "keys.write"], None)
        .await;
    for name in ["alpha", "beta", "alphabet"] {
        let r = h
            .api(
                Method::POST,
                "/v1/project/keys",
                &admin,
                "demo",
                json!({"keyId": name, "name": name, "scopes": []}),
            )
            .await;
        assert_eq!(r.status, 201);
    }
    let query = |qs: &[&str]| {
        let mut url = String::from("/v1/project/keys?");
        let encoded: String = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(
                qs.iter()
                    .enumerate()
                    .map(|(i, q)| (format!("queries[{i}]"), *q)),
            )
            .finish();
        url.push_str(&encoded);
        url
    };
    let r = h
        .api(
            Method::GET,
            &query(&[
                r#"{"method":"startsWith","attribute":"name","values":["alpha"]}"#,
                r#"{"method":"orderDesc","attribute":"name"}"#,
            ]),
            &admin,
            "demo",
            Value::Null,
        )
        .await
        .json();
    assert_eq!(r["total"], 2);
    let names: Vec<&str> = r["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["alphabet", "alpha"]);
    let r = h
        .api(
            Method::GET,
            &format!(
                "{}&total=false",
                query(&[r#"{"method":"limit","values":[1]}"#])
            ),
            &admin,
            "demo",
            Value::Null,
        )
        .await
        .json();
    assert_eq!(r["total"], 0);
    assert_eq!(r["keys"].as_array().unwrap().len(), 1);
    h.api(
        Method::GET,
        &query(&[r#"{"method":"between","attribute":"name","values":["a","b"]}"#]),
        &admin,
        "demo",
        Value::Null,
    )
    .await
    .assert_error(400, "general_query_invalid");
    h.api(
        Method::GET,
        &query(&[r#"{"method":"equal","attribute":"secret","values":["x"]}"#]),
        &admin,
        "demo",
        Value::Null,
    )
    .await
    .assert_error(400, "general_query_invalid");
    let many: Vec<&str> = vec![r#"{"method":"limit","values":[5]}"#; 101];
    h.api(Method::GET, &query(&many), &admin, "demo", Value::Null)
        .await
        .assert_error(400, "general_query_invalid");
}

/// What was tried, method, path, caller, project header, body, expected status and type.
type Attempt<'a> = (
    &'static str,
    Method,
    String,
    &'a Secret,
    &'static str,
    Value,
    u16,
    &'static str,
);

/// Each attempt is refused whole with 403 (or 400 for out-of-range arguments), and leaves the
/// store as it was; the same operations within the ceiling succeed.
#[tokio::test]
async fn delegation_ceiling() {
    let h = Harness::start().await;
    let manager_expiry = Utc::now() + Span::days(1);
    let (manager_id, manager) = h
        .create_key(
            "demo",
            &["keys.read", "keys.write", "users.read"],
            Some(manager_expiry),
        )
        .await;
    let (strong_id, _) = h
        .create_key("demo", &["users.read", "users.write"], None)
        .await;
    let (forever_id, _) = h.create_key("demo", &["users.read"], None).await;
    let (weak_id, _) = h
        .create_key("demo", &["users.read"], Some(Utc::now() + Span::hours(1)))
        .await;
    let (_, other_admin) = h
        .create_key(
            "other",
            &["keys.read", "keys.write", "users.read", "users.write"],
            None,
        )
        .await;
    let later = (manager_expiry + Span::hours(1)).to_rfc3339();
    let sooner = (manager_expiry - Span::hours(1)).to_rfc3339();
    let before = h
        .gateway
        .store()
        .list("demo", keygate::keys::KeyKind::Standard)
        .await
        .unwrap();

    let ephemeral_reader = h
        .api(
            Method::POST,
            "/v1/project/keys/ephemeral",
            &manager,
            "demo",
            json!({"scopes": ["users.read"], "duration": 60}),
        )
        .await;
    assert_eq!(ephemeral_reader.status, 201);
    let ephemeral_reader = secret_of(&ephemeral_reader.json());
    let ephemeral_writer = secret_of(
        &h.api(
            Method::POST,
            "/v1/project/keys/ephemeral",
            &manager,
            "demo",
            json!({"scopes": ["keys.write", "users.read"], "duration": 60}),
        )
        .await
        .json(),
    );

    let key_path = |id: &str| format!("/v1/project/keys/{id}");
    let attempts: Vec<Attempt<'_>> = vec![
        (
            "create with a scope not held",
            Method::POST,
            "/v1/project/keys".into(),
            &manager,
            "demo",
            json!({"name": "x", "scopes": ["users.write"], "expire": sooner}),
            403,
            "key_scopes_exceeded",
        ),
        (
            "create without expiry",
            Method::POST,
            "/v1/project/keys".into(),
            &manager,
            "demo",
            json!({"name": "x", "scopes": ["users.read"]}),
            403,
            "key_expire_exceeded",
        ),
        (
            "create with a null expiry",
            Method::POST,
            "/v1/project/keys".into(),
            &manager,
            "demo",
            json!({"name": "x", "scopes": [], "expire": null}),
            403,
            "key_expire_exceeded",
        ),
        (
            "create expiring later",
            Method::POST,
            "/v1/project/keys".into(),
            &manager,
            "demo",
            json!({"name": "x", "scopes": [], "expire": later}),
            403,
            "key_expire_exceeded",
        ),
        (
            "widen own scopes",
            Method::PUT,
            key_path(&manager_id),
            &manager,
            "demo",
            json!({"name": "m", "scopes": ["keys.read", "keys.write", "users.read", "users.write"], "expire": sooner}),
            403,
            "key_scopes_exceeded",
        ),
        (
            "lift own expiry",
            Method::PUT,
            key_path(&manager_id),
            &manager,
            "demo",
            json!({"name": "m", "scopes": ["keys.read", "keys.write", "users.read"]}),
            403,
            "key_expire_exceeded",
        ),
        (
            "update a stronger key",
            Method::PUT,
            key_path(&strong_id),
            &manager,
            "demo",
            json!({"name": "s", "scopes": ["users.read"], "expire": sooner}),
            403,
            "key_target_forbidden",
        ),
        (
            "delete a stronger key",
            Method::DELETE,
            key_path(&strong_id),
            &manager,
            "demo",
            Value::Null,
            403,
            "key_target_forbidden",
        ),
        (
            "rotate a stronger key",
            Method::POST,
            format!("{}/rotate", key_path(&strong_id)),
            &manager,
            "demo",
            json!({}),
            403,
            "key_target_forbidden",
        ),
        (
            "rotate a longer-lived key",
            Method::POST,
            format!("{}/rotate", key_path(&forever_id)),
            &manager,
            "demo",
            json!({}),
            403,
            "key_target_forbidden",
        ),
        (
            "grant a weaker key a scope not held",
            Method::PUT,
            key_path(&weak_id),
            &manager,
            "demo",
            json!({"name": "w", "scopes": ["users.write"], "expire": sooner}),
            403,
            "key_scopes_exceeded",
        ),
        (
            "ephemeral with extra scopes",
            Method::POST,
            "/v1/project/keys/ephemeral".into(),
            &manager,
            "demo",
            json!({"scopes": ["users.write"], "duration": 60}),
            403,
            "key_scopes_exceeded",
        ),
        (
            "ephemeral of duration 0",
            Method::POST,
            "/v1/project/keys/ephemeral".into(),
            &manager,
            "demo",
            json!({"scopes": [], "duration": 0}),
            400,
            "general_argument_invalid",
        ),
        (
            "ephemeral of duration 3601",
            Method::POST,
            "/v1/project/keys/ephemeral".into(),
            &manager,
            "demo",
            json!({"scopes": [], "duration": 3601}),
            400,
            "general_argument_invalid",
        ),
        (
            "other project through the header",
            Method::GET,
            "/v1/project/keys".into(),
            &manager,
            "other",
            Value::Null,
            403,
            "project_id_missing",
        ),
        (
            "other project through the alias",
            Method::POST,
            "/v1/projects/other/keys".into(),
            &manager,
            "other",
            json!({"name": "x", "scopes": [], "expire": sooner}),
            403,
            "project_id_missing",
        ),
        (
            "alias disagreeing with the header",
            Method::GET,
            "/v1/projects/other/keys".into(),
            &manager,
            "demo",
            Value::Null,
            403,
            "project_id_missing",
        ),
        (
            "another project's admin on this project",
            Method::DELETE,
            key_path(&weak_id),
            &other_admin,
            "demo",
            Value::Null,
            403,
            "project_id_missing",
        ),
        (
            "ephemeral key without keys.write",
            Method::POST,
            "/v1/project/keys".into(),
            &ephemeral_reader,
            "demo",
            json!({"name": "x", "scopes": []}),
            401,
            "general_unauthorized_scope",
        ),
        (
            "ephemeral key minting a longer-lived key",
            Method::POST,
            "/v1/project/keys".into(),
            &ephemeral_writer,
            "demo",
            json!({"name": "x", "scopes": [], "expire": sooner}),
            403,
            "key_expire_exceeded",
        ),
        (
            "ephemeral key widening through a new key",
            Method::POST,
            "/v1/project/keys/ephemeral".into(),
            &ephemeral_writer,
            "demo",
            json!({"scopes": ["keys.read"], "duration": 30}),
            403,
            "key_scopes_exceeded",
        ),
    ];
    assert!(attempts.len() >= 15);
    for (what, method, path, key, project, body, status, kind) in attempts {
        let response = h.api(method, &path, key, project, body).await;
        assert_eq!(
            response.status.as_u16(),
            status,
            "{what}: {}",
            String::from_utf8_lossy(&response.body)
        );
        assert_eq!(response.json()["type"], kind, "{what}");
    }
    let after = h
        .gateway
        .store()
        .list("demo", keygate::keys::KeyKind::Standard)
        .await
        .unwrap();
    assert_eq!(before, after, "a refused request changed the store");

    // Within the ceiling, the same operations succeed.
    let created = h
        .api(
            Method::POST,
            "/v1/project/keys",
            &manager,
            "demo",
            json!({"keyId": "sub", "name": "sub", "scopes": ["users.read"], "expire": sooner}),
        )
        .await;
    assert_eq!(created.status, 201);
    let ok = |r: &common::TestResponse, what: &str| {
        assert!(
            r.status.is_success(),
            "{what}: {}",
            String::from_utf8_lossy(&r.body)
        )
    };
    ok(
        &h.api(
            Method::PUT,
            &key_path(&weak_id),
            &manager,
            "demo",
            json!({"name": "w", "scopes": ["users.read"], "expire": sooner}),
        )
        .await,
        "update weaker",
    );
    ok(&h.api(Method::PUT, &key_path(&manager_id), &manager, "demo", json!({"name": "m", "scopes": ["keys.read", "keys.write", "users.read"], "expire": sooner})).await, "narrow own expiry");
    ok(
        &h.api(
            Method::POST,
            &format!("{}/rotate", key_path("sub")),
            &manager,
            "demo",
            json!({}),
        )
        .await,
        "rotate weaker",
    );
    ok(
        &h.api(
            Method::POST,
            "/v1/project/keys/ephemeral",
            &manager,
            "demo",
            json!({"scopes": ["users.read"], "duration": 3600}),
        )
        .await,
        "ephemeral within",
    );
    ok(&h.api(Method::POST, "/v1/project/keys", &ephemeral_writer, "demo", json!({"name": "short", "scopes": ["users.read"], "expire": (Utc::now() + Span::seconds(30)).to_rfc3339()})).await, "ephemeral-made key");
    ok(
        &h.api(
            Method::DELETE,
            &key_path(&weak_id),
            &manager,
            "demo",
            Value::Null,
        )
        .await,
        "delete weaker",
    );
    ok(
        &h.api(
            Method::GET,
            "/v1/projects/demo/keys",
            &manager,
            "demo",
            Value::Null,
        )
        .await,
        "alias agreeing",
    );
}

#[tokio::test]
async fn rotation_grace_and_ephemeral_expiry_reach_the_proxy() {
    let h = Harness::start().await;
    let (_, admin) = h
        .create_key("demo", &["keys.read", "keys.write", "users.read"], None)
        .await;
    let created = h
        .api(
            Method::POST,
            "/v1/project/keys",
            &admin,
            "demo",
            json!({"keyId": "rot", "name": "rot", "scopes": ["users.read"]}),
        )
        .await
        .json();
    let old = secret_of(&created);

    let rotated = h
        .api(
            Method::POST,
            "/v1/project/keys/rot/rotate",
            &admin,
            "demo",
            json!({"grace": 1}),
        )
        .await;
    assert_eq!(rotated.status, 200);
    let rotated = rotated.json();
    assert_eq!(rotated["$id"], "rot");
    let new = secret_of(&rotated);
    assert_ne!(new, old);
    h.get_as("/v1/users", &new, "demo").await.echo();
    let old_refused = eventually(Duration::from_secs(3), || async {
        let response = h.get_as("/v1/users", &old, "demo").await;
        response.status == 401 && response.json()["type"] == "user_unauthorized"
    })
    .await;
    assert!(
        old_refused.is_some(),
        "the old secret still works after its grace"
    );
    h.get_as("/v1/users", &new, "demo").await.echo();

    // Rotation without grace: the old secret stops at once.
    let newer = secret_of(
        &h.api(
            Method::POST,
            "/v1/project/keys/rot/rotate",
            &admin,
            "demo",
            Value::Null,
        )
        .await
        .json(),
    );
    h.get_as("/v1/users", &new, "demo")
        .await
        .assert_error(401, "user_unauthorized");
    h.get_as("/v1/users", &newer, "demo").await.echo();

    // An ephemeral key works on the proxy, statelessly, and is refused from its exp on.
    let ephemeral = h
        .api(
            Method::POST,
            "/v1/project/keys/ephemeral",
            &admin,
            "demo",
            json!({"scopes": ["users.read"], "duration": 1.0}),
        )
        .await;
    assert_eq!(ephemeral.status, 201);
    let ephemeral = ephemeral.json();
    let token = secret_of(&ephemeral);
    assert!(token.expose().starts_with("ephemeral_"));
    assert!(!ephemeral["expire"].as_str().unwrap().is_empty());
    let echo = h.get_as("/v1/users", &token, "demo").await.echo();
    assert_eq!(echo.header("x-keygate-key-id"), Some("ephemeral"));
    h.get_as("/v1/users", &token, "other")
        .await
        .assert_error(403, "project_id_missing");
    let expired = eventually(Duration::from_secs(3), || async {
        let response = h.get_as("/v1/users", &token, "demo").await;
        response.status == 401 && response.json()["type"] == "project_key_expired"
    })
    .await;
    assert!(expired.is_some());
    let mut forged = token.expose().to_owned();
    forged.pop();
    h.get_as("/v1/users", &Secret::from_plaintext(forged), "demo")
        .await
        .assert_error(401, "user_unauthorized");
}

#[tokio::test]
async fn usage_is_recorded_behind_requests() {
    let h = Harness::start().await;
    let (id, key) = h
        .create_key("demo", &["users.read", "keys.read"], None)
        .await;
    for sdk in ["Python", "Node.js", "Python"] {
        let response = h
            .request(
                Method::GET,
                "/v1/users",
                &[
                    ("x-appwrite-key", key.expose()),
                    ("x-appwrite-project", "demo"),
                    ("x-sdk-name", sdk),
                ],
                "",
            )
            .await;
        assert_eq!(response.status, 200);
    }
    let recorded = eventually(Duration::from_secs(5), || async {
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
        model["accessedAt"] != "" && model["sdks"] == json!(["Python", "Node.js"])
    })
    .await;
    assert!(recorded.is_some(), "usage not written");
}

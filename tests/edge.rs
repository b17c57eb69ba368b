//! Appwrite semantics at the edge: abuse limits, origins and CORS, dev keys, project settings.

mod common;

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use chrono::{Duration, Utc};
use common::{Harness, TestResponse};
use http::Method;
use keygate::keys::{KeyKind, KeyRateLimit, Secret};
use serde_json::{json, Value};

const EDGE_CONFIG: &str = r#"
server: { listen: "127.0.0.1:0" }
store: { url: "sqlite://{db}" }
projects:
  demo: { origins: ["https://app.example.com"] }
  other: { origins: ["*"], upstream: alt }
  closed: { origins: ["https://closed.example.com"], dev_keys: false }
keys: { implicit_scopes: [global] }
scopes: [global]
guest_scopes: [locale.read]
upstreams:
  echo: { url: "http://{upstream}" }
  alt: { url: "http://{upstream}/alt" }
default_upstream: echo
routes:
  - { methods: [GET], path: /v1/locale, scopes: [locale.read],
      rate_limit: { limit: 3, window: 60s, key: "url:{url},ip:{ip}" } }
  - { methods: [GET], path: "/v1/avatars/{name}", scopes: [locale.read],
      rate_limit: { limit: 2, window: 60s, key: "ip,param-name" } }
  - { methods: [GET], path: "/v1/users/{userId}", scopes: [users.read],
      rate_limit: { limit: 2, window: 60s, key: "ip,param-userId" } }
  - { methods: [GET], path: /v1/users, scopes: [users.read] }
  - { methods: [GET, POST], path: "/v1/health/**", public: true }
"#;

fn header<'a>(r: &'a TestResponse, name: &str) -> Option<&'a str> {
    r.headers.get(name).and_then(|v| v.to_str().ok())
}

async fn guest(h: &Harness, path: &str) -> TestResponse {
    h.request(Method::GET, path, &[("x-appwrite-project", "demo")], "")
        .await
}

#[tokio::test]
async fn abuse_limits_count_in_fixed_windows_with_appwrite_headers() {
    let start = 1_800_000_040; // 40 s into a 60 s window
    let clock = Arc::new(AtomicI64::new(start));
    let h = Harness::start_with_clock(EDGE_CONFIG, clock.clone()).await;
    let reset = start - start % 60 + 60;

    for remaining in [2, 1, 0] {
        let r = guest(&h, "/v1/locale").await;
        assert_eq!(r.status, 200);
        assert_eq!(header(&r, "x-ratelimit-limit"), Some("3"));
        assert_eq!(
            header(&r, "x-ratelimit-remaining"),
            Some(remaining.to_string().as_str())
        );
        assert_eq!(
            header(&r, "x-ratelimit-reset"),
            Some(reset.to_string().as_str())
        );
    }
    clock.store(start + 5, Ordering::Relaxed);
    let refused = guest(&h, "/v1/locale").await;
    refused.assert_error(429, "general_rate_limit_exceeded");
    assert_eq!(header(&refused, "x-ratelimit-remaining"), Some("0"));
    assert_eq!(
        header(&refused, "retry-after"),
        Some((reset - start - 5).to_string().as_str())
    );

    // The next window starts afresh.
    clock.store(reset, Ordering::Relaxed);
    let r = guest(&h, "/v1/locale").await;
    assert_eq!(r.status, 200);
    assert_eq!(header(&r, "x-ratelimit-remaining"), Some("2"));

    // `param-name`: each value of the path parameter has its own budget.
    for _ in 0..2 {
        assert_eq!(guest(&h, "/v1/avatars/a").await.status, 200);
    }
    guest(&h, "/v1/avatars/a")
        .await
        .assert_error(429, "general_rate_limit_exceeded");
    assert_eq!(guest(&h, "/v1/avatars/b").await.status, 200);

    // Requests the decision refuses are not counted: the guest lacks users.read, and stays a
    // 401 rather than becoming a 429.
    for _ in 0..3 {
        h.request(Method::GET, "/v1/users/a", &[], "")
            .await
            .assert_error(401, "general_unauthorized_scope");
    }
}

#[tokio::test]
async fn api_keys_and_dev_keys_are_exempt_and_keys_may_carry_their_own_limit() {
    let clock = Arc::new(AtomicI64::new(Utc::now().timestamp()));
    let h = Harness::start_with_clock(EDGE_CONFIG, clock.clone()).await;
    let (_, key) = h
        .create_key("demo", &["locale.read", "users.read"], None)
        .await;
    let (_, dev) = h
        .create_dev_key("demo", Utc::now() + Duration::days(1))
        .await;
    for _ in 0..10 {
        let r = h.get_as("/v1/locale", &key, "demo").await;
        assert_eq!(r.status, 200);
        assert_eq!(header(&r, "x-ratelimit-limit"), None);
        let r = h
            .request(
                Method::GET,
                "/v1/locale",
                &[
                    ("x-appwrite-project", "demo"),
                    ("x-appwrite-dev-key", dev.expose()),
                ],
                "",
            )
            .await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    }
    // A guest on the same route is still limited.
    for _ in 0..3 {
        assert_eq!(guest(&h, "/v1/locale").await.status, 200);
    }
    guest(&h, "/v1/locale")
        .await
        .assert_error(429, "general_rate_limit_exceeded");

    // A key's own limit applies on every route.
    let (_, limited) = h
        .insert_key(
            KeyKind::Standard,
            "demo",
            &["users.read"],
            None,
            Some(KeyRateLimit {
                limit: 2,
                window_secs: 60,
            }),
        )
        .await;
    for remaining in ["1", "0"] {
        let r = h.get_as("/v1/users", &limited, "demo").await;
        assert_eq!(r.status, 200);
        assert_eq!(header(&r, "x-ratelimit-remaining"), Some(remaining));
    }
    h.get_as("/v1/users", &limited, "demo")
        .await
        .assert_error(429, "general_rate_limit_exceeded");
    clock.fetch_add(60, Ordering::Relaxed);
    assert_eq!(h.get_as("/v1/users", &limited, "demo").await.status, 200);
}

#[tokio::test]
async fn origins_and_cors() {
    let h = Harness::start_with(EDGE_CONFIG).await;
    let (_, key) = h.create_key("demo", &["users.read"], None).await;
    let (_, dev) = h
        .create_dev_key("demo", Utc::now() + Duration::days(1))
        .await;

    // Preflight: answered by keygate for any origin, with what the web SDK sends and reads.
    let pre = h
        .request(
            Method::OPTIONS,
            "/v1/users",
            &[
                ("origin", "https://anywhere.example"),
                ("access-control-request-method", "GET"),
                (
                    "access-control-request-headers",
                    "x-appwrite-project,x-appwrite-dev-key",
                ),
            ],
            "",
        )
        .await;
    assert_eq!(pre.status, 204);
    assert_eq!(
        header(&pre, "access-control-allow-origin"),
        Some("https://anywhere.example")
    );
    let allowed = header(&pre, "access-control-allow-headers").unwrap();
    for needed in [
        "X-Appwrite-Project",
        "X-Appwrite-Key",
        "X-Appwrite-Dev-Key",
        "X-SDK-Name",
        "Content-Type",
    ] {
        assert!(allowed.contains(needed), "{needed}");
    }
    assert!(header(&pre, "access-control-allow-methods")
        .unwrap()
        .contains("PATCH"));

    let from = |origin: &'static str| vec![("x-appwrite-project", "demo"), ("origin", origin)];
    // An allowed origin gets the grant and the exposed headers.
    let ok = h
        .request(
            Method::GET,
            "/v1/locale",
            &from("https://app.example.com"),
            "",
        )
        .await;
    assert_eq!(ok.status, 200);
    assert_eq!(
        header(&ok, "access-control-allow-origin"),
        Some("https://app.example.com")
    );
    assert!(header(&ok, "access-control-expose-headers")
        .unwrap()
        .contains("X-RateLimit-Remaining"));
    // An unknown origin is refused, without a grant.
    let refused = h
        .request(Method::GET, "/v1/locale", &from("https://evil.example"), "")
        .await;
    refused.assert_error(403, "general_unknown_origin");
    assert_eq!(header(&refused, "access-control-allow-origin"), None);
    // An allowed origin can read its errors.
    let denied = h
        .request(
            Method::GET,
            "/v1/users",
            &from("https://app.example.com"),
            "",
        )
        .await;
    denied.assert_error(401, "general_unauthorized_scope");
    assert_eq!(
        header(&denied, "access-control-allow-origin"),
        Some("https://app.example.com")
    );

    // API keys skip the origin check.
    let mut with_key = from("https://evil.example");
    with_key.push(("x-appwrite-key", key.expose()));
    assert_eq!(
        h.request(Method::GET, "/v1/users", &with_key, "")
            .await
            .status,
        200
    );
    // Dev keys pass the origin check, but grant no scope.
    let mut with_dev = from("https://evil.example");
    with_dev.push(("x-appwrite-dev-key", dev.expose()));
    let passed = h.request(Method::GET, "/v1/locale", &with_dev, "").await;
    assert_eq!(passed.status, 200);
    assert_eq!(
        header(&passed, "access-control-allow-origin"),
        Some("https://evil.example")
    );
    let scoped = h.request(Method::GET, "/v1/users", &with_dev, "").await;
    scoped.assert_error(401, "general_unauthorized_scope");
    // The page may read that refusal: the dev key passed, the scope check refused.
    assert_eq!(
        header(&scoped, "access-control-allow-origin"),
        Some("https://evil.example")
    );
    // `*` allows every origin for that project; requests without Origin are not browser calls.
    let other = h
        .request(
            Method::GET,
            "/v1/locale",
            &[
                ("x-appwrite-project", "other"),
                ("origin", "https://x.example"),
            ],
            "",
        )
        .await;
    assert_eq!(other.status, 200);
    assert_eq!(guest(&h, "/v1/locale").await.status, 200);
}

#[tokio::test]
async fn dev_keys_are_never_api_keys_and_api_keys_never_dev_keys() {
    let h = Harness::start_with(EDGE_CONFIG).await;
    let (_, key) = h.create_key("demo", &["users.read"], None).await;
    let (_, dev) = h
        .create_dev_key("demo", Utc::now() + Duration::days(1))
        .await;
    assert!(dev.expose().starts_with("dev_"));

    // A dev key in X-Appwrite-Key is unknown, even on a public route.
    h.get_as("/v1/users", &dev, "demo")
        .await
        .assert_error(401, "user_unauthorized");
    h.get_as("/v1/health/x", &dev, "demo")
        .await
        .assert_error(401, "user_unauthorized");
    // An API key in X-Appwrite-Dev-Key is unknown.
    h.request(
        Method::GET,
        "/v1/health/x",
        &[
            ("x-appwrite-project", "demo"),
            ("x-appwrite-dev-key", key.expose()),
        ],
        "",
    )
    .await
    .assert_error(401, "user_unauthorized");
    // A dev key never authorizes a scoped route, alone or beside a guest.
    h.request(
        Method::GET,
        "/v1/users",
        &[
            ("x-appwrite-project", "demo"),
            ("x-appwrite-dev-key", dev.expose()),
        ],
        "",
    )
    .await
    .assert_error(401, "general_unauthorized_scope");
    // Of another project; expired; switched off for the project.
    h.request(
        Method::GET,
        "/v1/health/x",
        &[
            ("x-appwrite-project", "other"),
            ("x-appwrite-dev-key", dev.expose()),
        ],
        "",
    )
    .await
    .assert_error(403, "project_id_missing");
    let (_, expired) = h
        .create_dev_key("demo", Utc::now() - Duration::seconds(1))
        .await;
    h.request(
        Method::GET,
        "/v1/health/x",
        &[
            ("x-appwrite-project", "demo"),
            ("x-appwrite-dev-key", expired.expose()),
        ],
        "",
    )
    .await
    .assert_error(410, "dev_key_gone");
    let (_, closed) = h
        .create_dev_key("closed", Utc::now() + Duration::days(1))
        .await;
    h.request(
        Method::GET,
        "/v1/health/x",
        &[
            ("x-appwrite-project", "closed"),
            ("x-appwrite-dev-key", closed.expose()),
        ],
        "",
    )
    .await
    .assert_error(403, "general_service_disabled");
    // With both an API key and a dev key, the API key decides the scopes.
    let both = h
        .request(
            Method::GET,
            "/v1/users",
            &[
                ("x-appwrite-project", "demo"),
                ("x-appwrite-key", key.expose()),
                ("x-appwrite-dev-key", dev.expose()),
            ],
            "",
        )
        .await;
    assert_eq!(both.status, 200);
}

#[tokio::test]
async fn dev_key_management_api() {
    let h = Harness::start_with(EDGE_CONFIG).await;
    let manager_expiry = Utc::now() + Duration::days(10);
    let (_, manager) = h
        .create_key(
            "demo",
            &["devKeys.read", "devKeys.write", "keys.read"],
            Some(manager_expiry),
        )
        .await;
    let base = "/v1/projects/demo/dev-keys";
    let in_days = |d: i64| (Utc::now() + Duration::days(d)).to_rfc3339();

    let created = h
        .api(
            Method::POST,
            base,
            &manager,
            "demo",
            json!({"name": "laptop", "expire": in_days(7)}),
        )
        .await;
    assert_eq!(
        created.status,
        201,
        "{}",
        String::from_utf8_lossy(&created.body)
    );
    let created = created.json();
    let id = created["$id"].as_str().unwrap().to_owned();
    let secret = Secret::from_plaintext(created["secret"].as_str().unwrap().to_owned());
    assert!(secret.expose().starts_with("dev_"));
    assert!(created.get("scopes").is_none());
    let usable = h
        .request(
            Method::GET,
            "/v1/health/x",
            &[
                ("x-appwrite-project", "demo"),
                ("x-appwrite-dev-key", secret.expose()),
            ],
            "",
        )
        .await;
    assert_eq!(usable.status, 200);

    let list = h
        .api(Method::GET, base, &manager, "demo", Value::Null)
        .await
        .json();
    assert_eq!(list["total"], 1);
    assert_eq!(list["devKeys"][0]["secret"], "");
    let got = h
        .api(
            Method::GET,
            &format!("{base}/{id}"),
            &manager,
            "demo",
            Value::Null,
        )
        .await
        .json();
    assert_eq!(got["secret"], "");
    // Dev keys and API keys do not see each other through the APIs either.
    h.api(
        Method::GET,
        &format!("/v1/project/keys/{id}"),
        &manager,
        "demo",
        Value::Null,
    )
    .await
    .assert_error(404, "key_not_found");

    // Expiry is mandatory, at most dev_keys.max_duration (30 days), and within the caller's.
    for bad in [
        json!({"name": "x"}),
        json!({"name": "x", "expire": in_days(31)}),
        json!({"name": "x", "expire": in_days(-1)}),
    ] {
        h.api(Method::POST, base, &manager, "demo", bad)
            .await
            .assert_error(400, "general_argument_invalid");
    }
    h.api(
        Method::POST,
        base,
        &manager,
        "demo",
        json!({"name": "x", "expire": in_days(20)}),
    )
    .await
    .assert_error(403, "key_expire_exceeded");
    let updated = h
        .api(
            Method::PUT,
            &format!("{base}/{id}"),
            &manager,
            "demo",
            json!({"name": "renamed", "expire": in_days(1)}),
        )
        .await;
    assert_eq!(updated.json()["name"], "renamed");
    // Without devKeys.* scopes; on a project with dev keys off; another project.
    let (_, plain) = h
        .create_key("demo", &["keys.read", "keys.write"], None)
        .await;
    h.api(Method::GET, base, &plain, "demo", Value::Null)
        .await
        .assert_error(401, "general_unauthorized_scope");
    let (_, closed_manager) = h.create_key("closed", &["devKeys.write"], None).await;
    h.api(
        Method::POST,
        "/v1/projects/closed/dev-keys",
        &closed_manager,
        "closed",
        json!({"name": "x", "expire": in_days(1)}),
    )
    .await
    .assert_error(403, "general_service_disabled");
    h.api(
        Method::GET,
        "/v1/projects/other/dev-keys",
        &manager,
        "demo",
        Value::Null,
    )
    .await
    .assert_error(403, "project_id_missing");

    let deleted = h
        .api(
            Method::DELETE,
            &format!("{base}/{id}"),
            &manager,
            "demo",
            Value::Null,
        )
        .await;
    assert_eq!(deleted.status, 204);
    h.request(
        Method::GET,
        "/v1/health/x",
        &[
            ("x-appwrite-project", "demo"),
            ("x-appwrite-dev-key", secret.expose()),
        ],
        "",
    )
    .await
    .assert_error(401, "user_unauthorized");
}

#[tokio::test]
async fn a_project_may_override_the_upstream() {
    let h = Harness::start_with(EDGE_CONFIG).await;
    let (_, demo) = h.create_key("demo", &["users.read"], None).await;
    let (_, other) = h.create_key("other", &["users.read"], None).await;
    assert_eq!(
        h.get_as("/v1/users", &demo, "demo").await.echo().target,
        "/v1/users"
    );
    assert_eq!(
        h.get_as("/v1/users", &other, "other").await.echo().target,
        "/alt/v1/users"
    );
}

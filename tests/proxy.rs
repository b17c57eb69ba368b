//! The proxy's decisions, end to end through real sockets: what is forwarded arrives intact,
//! what is refused gets the right Appwrite error.

mod common;

use chrono::{Duration, Utc};
use common::{raw_request, Harness};
use http::Method;

#[tokio::test]
async fn allowed_key_reaches_upstream_with_request_intact() {
    let h = Harness::start().await;
    let (id, secret) = h.create_key("demo", &["users.write"], None).await;
    let body = r#"{"name":"Ada","bytes":"ünïcødé"}"#;
    let response = h
        .request(
            Method::PUT,
            "/v1/users/ada?queries[]=x%3D1&flag",
            &[
                ("x-appwrite-key", secret.expose()),
                ("x-appwrite-project", "demo"),
                ("content-type", "application/json"),
                ("x-custom", "kept"),
            ],
            body,
        )
        .await;
    let echo = response.echo();
    assert_eq!(echo.method, "PUT");
    assert_eq!(echo.target, "/v1/users/ada?queries[]=x%3D1&flag");
    assert_eq!(echo.body.as_deref(), Some(body));
    assert_eq!(echo.header("content-type"), Some("application/json"));
    assert_eq!(echo.header("x-custom"), Some("kept"));
    // forward_key: false → the key is replaced by identity headers.
    assert_eq!(echo.header("x-appwrite-key"), None);
    assert_eq!(echo.header("x-keygate-key-id"), Some(id.as_str()));
    assert_eq!(echo.header("x-keygate-project"), Some("demo"));
    let scopes = echo.header("x-keygate-scopes").unwrap();
    assert!(scopes.split(',').any(|s| s == "users.write"), "{scopes}");
    assert_eq!(echo.header("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(echo.header("x-forwarded-proto"), Some("http"));
    assert_eq!(
        echo.header("x-forwarded-host"),
        Some(h.addr.to_string().as_str())
    );
    let request_id = echo.header("x-request-id").unwrap();
    assert_eq!(response.headers["x-request-id"], request_id);
}

#[tokio::test]
async fn every_rejection_is_appwrite_shaped() {
    let h = Harness::start().await;
    let (_, reader) = h.create_key("demo", &["users.read"], None).await;
    let (_, expired) = h
        .create_key(
            "demo",
            &["users.read"],
            Some(Utc::now() - Duration::seconds(1)),
        )
        .await;

    // No key on a scoped route: a guest without the scope.
    h.request(
        Method::GET,
        "/v1/users",
        &[("x-appwrite-project", "demo")],
        "",
    )
    .await
    .assert_error(401, "general_unauthorized_scope");
    // Unknown key, malformed key, empty key.
    for bad in ["standard_0123", "not-a-key", "", "ephemeral_abc.def.ghi"] {
        h.request(
            Method::GET,
            "/v1/users",
            &[("x-appwrite-key", bad), ("x-appwrite-project", "demo")],
            "",
        )
        .await
        .assert_error(401, "user_unauthorized");
    }
    h.get_as("/v1/users", &expired, "demo")
        .await
        .assert_error(401, "project_key_expired");
    // Missing project, other project.
    h.request(
        Method::GET,
        "/v1/users",
        &[("x-appwrite-key", reader.expose())],
        "",
    )
    .await
    .assert_error(403, "project_id_missing");
    h.get_as("/v1/users", &reader, "other")
        .await
        .assert_error(403, "project_id_missing");
    // Missing scope: the message names the scope the route needs.
    let response = h
        .request(
            Method::POST,
            "/v1/users/ada",
            &[
                ("x-appwrite-key", reader.expose()),
                ("x-appwrite-project", "demo"),
            ],
            "{}",
        )
        .await;
    response.assert_error(401, "general_unauthorized_scope");
    assert!(response.json()["message"]
        .as_str()
        .unwrap()
        .contains("users.write"));
    // Unknown route, and a known path with another method.
    h.get_as("/v1/nothing-here", &reader, "demo")
        .await
        .assert_error(404, "general_route_not_found");
    h.request(Method::DELETE, "/v1/users", &[], "")
        .await
        .assert_error(404, "general_route_not_found");
    // Several X-Appwrite-Key headers.
    h.request(
        Method::GET,
        "/v1/users",
        &[
            ("x-appwrite-key", reader.expose()),
            ("x-appwrite-key", reader.expose()),
            ("x-appwrite-project", "demo"),
        ],
        "",
    )
    .await
    .assert_error(400, "general_argument_invalid");
    // A guest naming a project keygate does not know.
    h.request(
        Method::GET,
        "/v1/locale",
        &[("x-appwrite-project", "nope")],
        "",
    )
    .await
    .assert_error(404, "project_not_found");
}

#[tokio::test]
async fn any_of_implicit_guest_and_public_scopes() {
    let h = Harness::start().await;
    let (_, rows) = h.create_key("demo", &["rows.read"], None).await;
    let (_, documents) = h.create_key("demo", &["documents.read"], None).await;
    let (_, nothing) = h.create_key("demo", &[], None).await;
    let path = "/v1/databases/db/collections/c/documents";

    // Any one of the route's scopes suffices.
    h.get_as(path, &rows, "demo").await.echo();
    h.get_as(path, &documents, "demo").await.echo();
    h.get_as(path, &nothing, "demo")
        .await
        .assert_error(401, "general_unauthorized_scope");

    // Implicit key scopes: every key holds `graphql`; guests do not.
    h.get_as("/v1/graphql", &nothing, "demo").await.echo();
    h.request(Method::GET, "/v1/graphql", &[], "")
        .await
        .assert_error(401, "general_unauthorized_scope");

    // Guests get exactly the guest scopes.
    let guest = h.request(Method::GET, "/v1/locale", &[], "").await.echo();
    assert_eq!(guest.header("x-keygate-scopes"), Some("locale.read"));
    assert_eq!(guest.header("x-keygate-key-id"), None);
    h.request(Method::GET, "/v1/users", &[], "")
        .await
        .assert_error(401, "general_unauthorized_scope");

    // Public routes pass without a key, but a key that is sent must still be valid.
    h.request(Method::GET, "/v1/health/version", &[], "")
        .await
        .echo();
    let head = h.request(Method::HEAD, "/v1/health/version", &[], "").await;
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());
    h.request(
        Method::GET,
        "/v1/health/version",
        &[
            ("x-appwrite-key", "standard_bogus"),
            ("x-appwrite-project", "demo"),
        ],
        "",
    )
    .await
    .assert_error(401, "user_unauthorized");
}

#[tokio::test]
async fn forward_key_upstreams_see_the_key_and_no_identity_headers() {
    let h = Harness::start().await;
    let (_, secret) = h.create_key("demo", &["users.read"], None).await;
    let echo = h
        .request(
            Method::GET,
            "/v1/appwrite/users",
            &[
                ("x-appwrite-key", secret.expose()),
                ("x-appwrite-project", "demo"),
                ("x-keygate-key-id", "spoofed-admin"),
            ],
            "",
        )
        .await
        .echo();
    assert_eq!(echo.header("x-appwrite-key"), Some(secret.expose()));
    assert_eq!(echo.header("x-keygate-key-id"), None);
}

#[tokio::test]
async fn client_sent_identity_and_hop_by_hop_headers_are_removed() {
    let h = Harness::start().await;
    let (id, secret) = h.create_key("demo", &["users.read"], None).await;
    let echo = h
        .request(
            Method::GET,
            "/v1/users",
            &[
                ("x-appwrite-key", secret.expose()),
                ("x-appwrite-project", "demo"),
                ("x-keygate-key-id", "admin"),
                ("x-keygate-scopes", "admin.all"),
                ("x-keygate-project", "other"),
                ("x-forwarded-for", "6.6.6.6"),
                ("forwarded", "for=6.6.6.6"),
                ("connection", "x-hop"),
                ("x-hop", "1"),
                ("proxy-authorization", "Basic Zm9vOmJhcg=="),
            ],
            "",
        )
        .await
        .echo();
    assert_eq!(echo.header("x-keygate-key-id"), Some(id.as_str()));
    assert_eq!(echo.header("x-keygate-project"), Some("demo"));
    assert!(!echo
        .header("x-keygate-scopes")
        .unwrap()
        .contains("admin.all"));
    assert_eq!(echo.header("x-forwarded-for"), Some("127.0.0.1"));
    for gone in ["forwarded", "x-hop", "proxy-authorization"] {
        assert_eq!(echo.header(gone), None, "{gone}");
    }
    // A guest's spoofed identity is removed too.
    let guest = h
        .request(
            Method::GET,
            "/v1/public/x",
            &[("x-keygate-key-id", "admin")],
            "",
        )
        .await
        .echo();
    assert_eq!(guest.header("x-keygate-key-id"), None);
}

#[tokio::test]
async fn cleartext_http2_is_served() {
    let h = Harness::start().await;
    let (_, secret) = h.create_key("demo", &["users.read"], None).await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let request = http::Request::get(h.url("/v1/users?x=1"))
        .header("x-appwrite-key", secret.expose())
        .header("x-appwrite-project", "demo")
        .body(http_body_util::Empty::new())
        .unwrap();
    let response = client.request(request).await.unwrap();
    assert_eq!(response.version(), http::Version::HTTP_2);
    assert_eq!(response.status(), 200);
    let body = http_body_util::BodyExt::collect(response.into_body())
        .await
        .unwrap()
        .to_bytes();
    let echo: keygate::sample::Echo = serde_json::from_slice(&body).unwrap();
    assert_eq!(echo.target, "/v1/users?x=1");
    // HTTP/2 has no Host header; the upstream still gets one.
    assert_eq!(echo.header("host"), Some(h.addr.to_string().as_str()));
}

#[tokio::test]
async fn absolute_form_must_agree_with_host() {
    let h = Harness::start().await;
    let (status, body) = raw_request(
        h.addr,
        b"GET http://evil.example/v1/public/x HTTP/1.1\r\nHost: good.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("general_argument_invalid"), "{body}");
    let (status, body) = raw_request(
        h.addr,
        b"GET http://good.example/v1/public/x HTTP/1.1\r\nHost: good.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"target\":\"/v1/public/x\""), "{body}");
}

//! Crafted request targets: none may reach a route whose scope the key lacks, judged by what the
//! upstream receives as a lenient server would read it (decoding repeatedly, treating `\` as `/`,
//! dropping `;` parameters and resolving dot segments).

mod common;

use common::{raw_request, Harness};
use http::Method;
use keygate::sample::Echo;

/// Reads a path the way a careless upstream might.
fn lenient_view(path: &str) -> String {
    let mut decoded = path.to_owned();
    for _ in 0..3 {
        decoded = percent_decode(&decoded);
    }
    let decoded = decoded.replace('\\', "/");
    let mut segments: Vec<&str> = Vec::new();
    for segment in decoded.split('/') {
        let segment = segment.split(';').next().unwrap_or("");
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    format!("/{}", segments.join("/"))
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    // Overlong forms, as a non-validating decoder would read them.
    let text = String::from_utf8_lossy(&out).into_owned();
    text.replace("\u{FFFD}\u{FFFD}", ".")
}

const TARGETS: &[&str] = &[
    "/v1/public/../admin/x",
    "/v1/public/%2e%2e/admin/x",
    "/v1/public/%2E%2E/admin/x",
    "/v1/public/.%2e/admin/x",
    "/v1/public/%2e./admin/x",
    "/v1/public/%252e%252e/admin/x",
    "/v1/public/%25252e%25252e/admin/x",
    "/v1/public%2F..%2Fadmin/x",
    "/v1/public/..%2Fadmin/x",
    "/v1/public/%2fadmin",
    "/v1/public/%2e%2e%2fadmin",
    "/v1/public/..\\admin\\x",
    "/v1/public\\..\\admin",
    "/v1/public/%5c..%5cadmin",
    "/v1/public/%5C%2E%2E%5Cadmin",
    "/v1/public/;/../admin/x",
    "/v1/public;/../admin/x",
    "/v1/public/..;/admin/x",
    "/v1/public/x;/../../admin",
    "/v1/public/x%3b/../../admin",
    "/v1/public/x%00/../../admin",
    "/v1/public/%00",
    "/v1/public/%0d%0aX-Injected:%201",
    "/v1/public/%C0%AE%C0%AE/admin",
    "/v1/public/%C0%AF..%C0%AFadmin",
    "/v1/public/%E0%80%AE%E0%80%AE/admin",
    "/v1/public/%u002e%u002e/admin",
    "//v1/admin/x",
    "/v1//public/../admin",
    "/v1/public/./../admin",
    "/v1/./admin/x",
    "/v1/%61dmin/x",
    "/v1/%2561dmin/x",
    "/v1/public/x/..",
    "/v1/public/..",
    "/v1/public/%2e",
    "/v1/users/../admin/x",
    "/V1/ADMIN/x",
    "/v1/public/x#/../../admin",
    "/v1/public/x?/../../admin",
    "/v1/public/\tx/../../admin",
    "/v1/public/x\x7f/../../admin",
    "/v1/public/\u{e9}/../../admin",
    "*",
    "v1/admin/x",
    "http://127.0.0.1/v1/public/../admin/x",
    "http://evil.example/v1/admin/x",
    "/v1/publi%63/x",
    "/v1/public/a%20b",
    "/v1/public/%7e",
];

#[tokio::test]
async fn crafted_targets_never_reach_a_route_the_key_lacks() {
    let h = Harness::start().await;
    let (_, secret) = h.create_key("demo", &["users.read"], None).await;
    let snapshot = h.gateway.snapshot();
    let allowed = |path: &str| match snapshot.routes.find(&Method::GET, path) {
        None => true, // the upstream would answer 404 itself
        Some(route) => route.public || route.pattern == "/v1/users",
    };

    let mut forwarded = 0;
    for target in TARGETS {
        let request = format!(
            "GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Appwrite-Key: {}\r\nX-Appwrite-Project: demo\r\nConnection: close\r\n\r\n",
            secret.expose()
        );
        let (status, body) = raw_request(h.addr, request.as_bytes()).await;
        match status {
            200 => {
                let echo: Echo = serde_json::from_str(&body)
                    .unwrap_or_else(|e| panic!("{target:?}: forwarded but no echo ({e}): {body}"));
                let path = echo.target.split('?').next().unwrap();
                let view = lenient_view(path);
                assert!(
                    allowed(&view),
                    "{target:?} reached {path:?}, which a lenient upstream reads as {view:?}"
                );
                assert!(
                    !view.to_ascii_lowercase().contains("admin"),
                    "{target:?} → {view:?}"
                );
                assert!(!body.contains("x-injected"), "{target:?}: header injection");
                forwarded += 1;
            }
            400 | 401 | 404 => {
                // keygate's own rejections are Appwrite-shaped; hyper answers unparseable
                // request lines with a bare 400 before keygate sees them.
                if !body.is_empty() {
                    let json: serde_json::Value = serde_json::from_str(&body).unwrap_or_else(|e| {
                        panic!("{target:?}: {status} without JSON ({e}): {body}")
                    });
                    assert_eq!(json["code"], status, "{target:?}");
                }
            }
            other => panic!("{target:?}: unexpected status {other}: {body}"),
        }
    }
    // The benign targets at the end must have gone through, normalized.
    assert!(forwarded >= 3, "only {forwarded} targets were forwarded");
    let echo = h.get_as("/v1/publi%63/x", &secret, "demo").await.echo();
    assert_eq!(echo.target, "/v1/public/x");
    let echo = h.get_as("/v1/public/%7e", &secret, "demo").await.echo();
    assert_eq!(echo.target, "/v1/public/~");
    // A path that needs no normalization goes on as sent, query and all.
    let echo = h
        .get_as("/v1/public/x?a=%2e%2e&b=/../1", &secret, "demo")
        .await
        .echo();
    assert_eq!(echo.target, "/v1/public/x?a=%2e%2e&b=/../1");
}

#[test]
fn lenient_view_is_lenient() {
    assert_eq!(lenient_view("/v1/public/%252e%252e/admin"), "/v1/admin");
    assert_eq!(lenient_view("/v1/public\\..\\admin"), "/v1/admin");
    assert_eq!(lenient_view("/v1/public/..;/admin"), "/v1/admin");
    assert_eq!(lenient_view("/v1/public/%C0%AE%C0%AE/admin"), "/v1/admin");
}

//! The ops listener: `/metrics` parsed as Prometheus text while requests flow, `/readyz` and
//! `POST /reload` reporting the generation, refused reloads counted.

mod common;

use std::collections::HashMap;

use common::Harness;
use http::Method;
use tokio::net::TcpListener;

/// `name{labels} value` lines → value, keyed by the whole series text.
fn parse(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// The sum of every series of `name` whose labels include all of `labels`.
fn sum(metrics: &HashMap<String, f64>, name: &str, labels: &[(&str, &str)]) -> f64 {
    metrics
        .iter()
        .filter(|(series, _)| {
            series.split('{').next() == Some(name)
                && labels
                    .iter()
                    .all(|(k, v)| series.contains(&format!("{k}=\"{v}\"")))
        })
        .map(|(_, v)| v)
        .sum()
}

async fn ops_get(
    client: &Client,
    addr: std::net::SocketAddr,
    method: Method,
    path: &str,
) -> (u16, String) {
    let request = http::Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let response = client.request(request).await.unwrap();
    let status = response.status().as_u16();
    let body = http_body_util::BodyExt::collect(response.into_body())
        .await
        .unwrap()
        .to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

type Client = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    http_body_util::Empty<bytes::Bytes>,
>;

#[tokio::test]
async fn metrics_move_as_requests_flow() {
    let h = Harness::start().await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ops = listener.local_addr().unwrap();
    tokio::spawn(keygate::server::run_ops(
        listener,
        h.gateway.clone(),
        std::future::pending(),
    ));
    let client: Client =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let (_, key) = h.create_key("demo", &["users.read"], None).await;
    let users_route = h
        .gateway
        .snapshot()
        .routes
        .find(&Method::GET, "/v1/users")
        .unwrap()
        .index
        .to_string();

    let (status, text) = ops_get(&client, ops, Method::GET, "/metrics").await;
    assert_eq!(status, 200);
    let before = parse(&text);
    for _ in 0..7 {
        h.get_as("/v1/users", &key, "demo").await.echo();
    }
    for _ in 0..3 {
        h.request(Method::GET, "/v1/users", &[], "").await;
    }
    h.request(Method::GET, "/nowhere", &[], "").await;

    let (_, text) = ops_get(&client, ops, Method::GET, "/metrics").await;
    let after = parse(&text);
    let delta = |name: &str, labels: &[(&str, &str)]| {
        sum(&after, name, labels) - sum(&before, name, labels)
    };
    let allowed = [
        ("route", users_route.as_str()),
        ("status", "2xx"),
        ("outcome", "allowed"),
        ("method", "GET"),
    ];
    assert_eq!(delta("keygate_requests_total", &allowed), 7.0, "{text}");
    assert_eq!(
        delta(
            "keygate_requests_total",
            &[
                ("route", users_route.as_str()),
                ("outcome", "general_unauthorized_scope"),
                ("status", "4xx")
            ]
        ),
        3.0
    );
    assert_eq!(
        delta(
            "keygate_requests_total",
            &[("route", "none"), ("outcome", "general_route_not_found")]
        ),
        1.0
    );
    assert_eq!(
        delta("keygate_auth_decisions_total", &[("outcome", "allowed")]),
        7.0
    );
    assert_eq!(
        delta(
            "keygate_request_duration_seconds_count",
            &[("route", users_route.as_str())]
        ),
        10.0
    );
    assert_eq!(
        delta(
            "keygate_upstream_duration_seconds_count",
            &[("upstream", "echo")]
        ),
        7.0
    );
    assert!(sum(&after, "keygate_key_cache_keys", &[]) >= 1.0);
    // Labels stay bounded: no path and no key id or secret ever appears.
    assert!(
        !text.contains("/v1/users") && !text.contains(key.expose()) && !text.contains("nowhere")
    );

    // Reloads: the generation moves, refusals are counted.
    let (status, body) = ops_get(&client, ops, Method::GET, "/readyz").await;
    assert_eq!(status, 200);
    let ready: serde_json::Value = serde_json::from_str(&body).unwrap();
    let generation = ready["generation"].as_u64().unwrap();
    let (status, body) = ops_get(&client, ops, Method::POST, "/reload").await;
    assert_eq!(status, 200, "{body}");
    let applied: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(applied["status"], "applied");
    assert_eq!(applied["generation"], generation + 1);
    let config = std::fs::read_to_string(&h.config_path).unwrap();
    std::fs::write(&h.config_path, format!("{config}\nnot_a_key: 1\n")).unwrap();
    let (status, body) = ops_get(&client, ops, Method::POST, "/reload").await;
    assert_eq!(status, 422, "{body}");
    let refused: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(refused["generation"], generation + 1);
    assert!(refused["error"].as_str().unwrap().contains("not_a_key"));
    let (_, text) = ops_get(&client, ops, Method::GET, "/metrics").await;
    let latest = parse(&text);
    assert!(sum(&latest, "keygate_config_reload_failures_total", &[]) >= 1.0);
    assert_eq!(
        sum(&latest, "keygate_config_generation", &[]),
        (generation + 1) as f64
    );
    let (_, body) = ops_get(&client, ops, Method::GET, "/healthz").await;
    assert!(body.contains("ok"));
}

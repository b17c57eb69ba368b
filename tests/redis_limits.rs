//! Abuse-limit counters shared through Redis: two keygate processes enforce one limit together,
//! and an unreachable Redis falls back to local counting, said in logs and metrics.
//!
//! Needs Redis on 127.0.0.1:6379. Without it the shared-limit test is skipped with a message,
//! unless `KEYGATE_REQUIRE_SERVICES=1` (set by `.ci/run`), which makes it a failure.

mod common;

use common::{Harness, ServeProcess};
use http::Method;

const REDIS: &str = "127.0.0.1:6379";

fn limited_config(backend: &str, prefix: &str) -> String {
    format!(
        r#"
server: {{ listen: "127.0.0.1:0" }}
store: {{ url: "sqlite://{{db}}" }}
projects: {{ demo: {{}} }}
guest_scopes: [locale.read]
rate_limits: {{ backend: "{backend}", prefix: "{prefix}" }}
upstreams: {{ echo: {{ url: "http://{{upstream}}" }} }}
routes:
  - {{ methods: [GET], path: /v1/locale, scopes: [locale.read],
      rate_limit: {{ limit: 5, window: 1d, key: "url:{{url}},ip:{{ip}}" }} }}
"#
    )
}

async fn get(
    client: &hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        http_body_util::Empty<bytes::Bytes>,
    >,
    addr: std::net::SocketAddr,
) -> (u16, String, String) {
    let request = http::Request::get(format!("http://{addr}/v1/locale"))
        .header("x-appwrite-project", "demo")
        .body(http_body_util::Empty::new())
        .unwrap();
    let response = client.request(request).await.unwrap();
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    (
        response.status().as_u16(),
        header("x-ratelimit-remaining"),
        header("x-ratelimit-reset"),
    )
}

#[tokio::test]
async fn two_processes_enforce_one_limit_through_redis() {
    if tokio::net::TcpStream::connect(REDIS).await.is_err() {
        assert!(
            std::env::var("KEYGATE_REQUIRE_SERVICES").as_deref() != Ok("1"),
            "Redis is not reachable on {REDIS}"
        );
        eprintln!("SKIPPED: Redis is not reachable on {REDIS}");
        return;
    }
    let prefix = format!("keygate-test-{}", keygate::keys::unique_id());
    let (upstream, _stop) = common::start_echo().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("keygate.yaml");
    let text = common::fill(
        &limited_config("redis://127.0.0.1:6379/", &prefix),
        upstream,
        &dir.path().join("keys.db"),
    );
    std::fs::write(&config, text).unwrap();
    let a = ServeProcess::start(&config).await;
    let b = ServeProcess::start(&config).await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();

    let mut seen = Vec::new();
    for (i, addr) in [a.addr, b.addr, a.addr, b.addr, a.addr]
        .into_iter()
        .enumerate()
    {
        let (status, remaining, reset) = get(&client, addr).await;
        assert_eq!(status, 200, "request {i}");
        seen.push((remaining, reset));
    }
    let remaining: Vec<&str> = seen.iter().map(|(r, _)| r.as_str()).collect();
    assert_eq!(
        remaining,
        vec!["4", "3", "2", "1", "0"],
        "the nodes did not share one counter"
    );
    assert!(
        seen.iter().all(|(_, reset)| *reset == seen[0].1),
        "a window boundary passed mid-test"
    );
    for addr in [b.addr, a.addr] {
        let (status, remaining, _) = get(&client, addr).await;
        assert_eq!(status, 429);
        assert_eq!(remaining, "0");
    }
}

#[tokio::test]
async fn unreachable_redis_falls_back_to_local_counters() {
    // Port 1 on loopback: connection refused.
    let h = Harness::start_with(&limited_config("redis://127.0.0.1:1/", "unreachable")).await;
    for _ in 0..5 {
        let r = h
            .request(
                Method::GET,
                "/v1/locale",
                &[("x-appwrite-project", "demo")],
                "",
            )
            .await;
        assert_eq!(r.status, 200);
    }
    h.request(
        Method::GET,
        "/v1/locale",
        &[("x-appwrite-project", "demo")],
        "",
    )
    .await
    .assert_error(429, "general_rate_limit_exceeded");
    let metrics = keygate::metrics::install().render();
    let fallback = metrics
        .lines()
        .find(|l| l.starts_with(keygate::metrics::RATE_LIMIT_FALLBACK_TOTAL))
        .unwrap_or_else(|| panic!("no fallback counter in:\n{metrics}"));
    let count: f64 = fallback.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(count >= 6.0, "{fallback}");
    assert!(
        metrics.contains(&format!("{} 0", keygate::metrics::RATE_LIMIT_BACKEND_UP)),
        "{metrics}"
    );
}

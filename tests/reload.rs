//! Hot reload: alternating route maps under load never mix decisions, each applied reload is
//! seen by the next request, and broken configs are refused with their file and line while the
//! running config keeps serving.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use common::Harness;
use http::Method;
use keygate::sample::Echo;

/// Map A: /v1/x is public and goes to /A; /v1/y needs y.read. Map B: the reverse, via /B.
const MAP_A: &str = r#"
server: { listen: "127.0.0.1:0" }
store: { url: "sqlite://{db}" }
projects: { demo: {} }
upstreams:
  a: { url: "http://{upstream}/A" }
  b: { url: "http://{upstream}/B" }
routes:
  - { methods: [GET], path: /v1/x, public: true, upstream: a }
  - { methods: [GET], path: /v1/y, scopes: [y.read], upstream: a }
"#;

fn map_b() -> String {
    MAP_A
        .replace(
            "/v1/x, public: true, upstream: a",
            "/v1/x, scopes: [y.read], upstream: b",
        )
        .replace(
            "/v1/y, scopes: [y.read], upstream: a",
            "/v1/y, public: true, upstream: b",
        )
}

/// Which map decided a response, or why it fits neither.
fn decided_by(path: &str, status: u16, body: &[u8]) -> Result<char, String> {
    match (path, status) {
        ("/v1/x", 200) | ("/v1/y", 200) => {
            let echo: Echo = serde_json::from_slice(body).map_err(|e| e.to_string())?;
            match (path, &echo.target[..2]) {
                ("/v1/x", "/A") => Ok('A'),
                ("/v1/y", "/B") => Ok('B'),
                _ => Err(format!(
                    "{path} allowed by one map but forwarded by the other: {}",
                    echo.target
                )),
            }
        }
        ("/v1/x", 401) => Ok('B'),
        ("/v1/y", 401) => Ok('A'),
        _ => Err(format!(
            "{path}: unexpected {status}: {}",
            String::from_utf8_lossy(body)
        )),
    }
}

#[tokio::test]
async fn a_hundred_reloads_under_load() {
    let h = Arc::new(Harness::start_with(MAP_A).await);
    let texts = [
        common::fill(MAP_A, h.upstream, &h.db),
        common::fill(&map_b(), h.upstream, &h.db),
    ];
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for worker in 0..3 {
        let (h, stop, served) = (h.clone(), stop.clone(), served.clone());
        clients.push(tokio::spawn(async move {
            let path = if worker % 2 == 0 { "/v1/x" } else { "/v1/y" };
            while !stop.load(Ordering::Relaxed) {
                let r = h.request(Method::GET, path, &[], "").await;
                decided_by(path, r.status.as_u16(), &r.body)?;
                served.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<(), String>(())
        }));
    }

    let start = h.gateway.generation();
    for i in 1..=100u64 {
        let map = if i % 2 == 1 { 'B' } else { 'A' };
        std::fs::write(&h.config_path, &texts[(i % 2) as usize]).unwrap();
        let generation = h.gateway.reload().await.unwrap();
        assert_eq!(generation, start + i);
        // Applied means applied: the very next request sees the new map.
        for path in ["/v1/x", "/v1/y"] {
            let r = h.request(Method::GET, path, &[], "").await;
            assert_eq!(
                decided_by(path, r.status.as_u16(), &r.body),
                Ok(map),
                "after reload {i}"
            );
        }
    }
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.await.unwrap().unwrap();
    }
    assert!(served.load(Ordering::Relaxed) > 0);
}

#[tokio::test]
async fn broken_configs_are_refused_and_the_running_one_keeps_serving() {
    let h = Harness::start_with(MAP_A).await;
    let good = common::fill(MAP_A, h.upstream, &h.db);
    let generation = h.gateway.generation();
    let line_of =
        |text: &str, needle: &str| text.lines().position(|l| l.contains(needle)).unwrap() + 1;

    let cases: Vec<(&str, String, &str)> = vec![
        ("YAML syntax error", good.replace("routes:", "routes: [\n  oops"), ""),
        ("unknown key", good.replace("projects:", "bogus: 1\nprojects:"), "bogus"),
        ("unknown upstream", good.replace("upstream: a }\n  - { methods: [GET], path: /v1/y", "upstream: nope }\n  - { methods: [GET], path: /v1/y"), "nope"),
        ("scope typo", good.replace("projects:", "guest_scopes: [y.raed]\nprojects:"), "y.raed"),
        (
            "missing certificate file",
            good.replace("server: { listen: \"127.0.0.1:0\" }", "server:\n  listen: \"127.0.0.1:0\"\n  tls: { cert: missing.pem, key: missing.key }"),
            "missing.pem",
        ),
    ];
    for (what, text, needle) in cases {
        std::fs::write(&h.config_path, &text).unwrap();
        let err = h.gateway.reload().await.expect_err(what);
        assert_eq!(err.file, h.config_path, "{what}: {err}");
        let line = err
            .line
            .unwrap_or_else(|| panic!("{what}: no line in {err}"));
        if !needle.is_empty() {
            assert_eq!(line, line_of(&text, needle), "{what}: {err}");
            assert!(err.to_string().contains(needle), "{what}: {err}");
        }
        assert!(
            err.to_string()
                .starts_with(&format!("{}:{line}", h.config_path.display())),
            "{err}"
        );
        assert_eq!(
            h.gateway.generation(),
            generation,
            "{what} changed the generation"
        );
        let r = h.request(Method::GET, "/v1/x", &[], "").await;
        assert_eq!(
            decided_by("/v1/x", r.status.as_u16(), &r.body),
            Ok('A'),
            "{what}: the old map stopped serving"
        );
    }
    // A good file is applied again.
    std::fs::write(&h.config_path, common::fill(&map_b(), h.upstream, &h.db)).unwrap();
    assert_eq!(h.gateway.reload().await.unwrap(), generation + 1);
}

//! keygate as a plugin: the authorization decision inside a plain hyper service, with no proxy.
//!
//! `cargo run --example embed` starts a service on 127.0.0.1:0 that answers allowed requests
//! itself and refused ones with keygate's Appwrite error body, then prints curl lines to try.

use std::convert::Infallible;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use chrono::Utc;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use keygate::auth::{decide, Principal};
use keygate::config::Snapshot;
use keygate::keys::cache::KeyCache;
use keygate::keys::{KeyKind, KeyRecord, Secret};

// The upstream and store are never used by this service; only routes, scopes and projects are.
const CONFIG: &str = r#"
server: { listen: "127.0.0.1:0" }
store: { url: "sqlite://unused.db" }
projects: { demo: {} }
upstreams: { none: { url: "http://127.0.0.1:9" } }
routes:
  - { methods: [GET], path: "/reports/{reportId}", scopes: [reports.read] }
  - { methods: [GET], path: /status, public: true }
"#;

struct App {
    snapshot: Snapshot,
    keys: KeyCache,
}

async fn handle(app: &App, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let now = Utc::now().timestamp();
    match decide(
        &app.snapshot,
        &app.keys,
        req.method(),
        req.uri(),
        req.headers(),
        now,
    ) {
        Ok(decision) => {
            let who = match &decision.principal {
                Principal::Guest => "a guest".to_owned(),
                principal => format!("{} {}", principal.kind(), principal.key_id().unwrap_or("")),
            };
            Response::new(Full::new(Bytes::from(format!(
                "{} {} allowed for {who} (route {})\n",
                req.method(),
                decision.path,
                decision.route.pattern
            ))))
        }
        Err(rejection) => rejection.to_body().into_response(),
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let snapshot = Snapshot::parse(Path::new("embed.yaml"), CONFIG)?;
    let keys = KeyCache::new();
    let secret = Secret::generate();
    let now = Utc::now();
    keys.upsert(
        &KeyRecord {
            id: "reporter".into(),
            project: "demo".into(),
            kind: KeyKind::Standard,
            name: "Reporter".into(),
            description: String::new(),
            scopes: vec!["reports.read".into()],
            expire: None,
            created_at: now,
            updated_at: now,
            accessed_at: None,
            sdks: Vec::new(),
            digest: secret.digest(),
            previous: None,
            rate_limit: None,
        },
        &snapshot.scopes,
    );
    let app = Arc::new(App { snapshot, keys });

    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    println!("embedded keygate decision on http://{addr}");
    println!(
        "curl -s http://{addr}/reports/42 -H 'X-Appwrite-Project: demo' -H 'X-Appwrite-Key: {}'",
        secret.expose()
    );
    println!("curl -s http://{addr}/reports/42");
    println!("curl -s http://{addr}/status");
    loop {
        let (stream, _) = listener.accept().await?;
        let app = Arc::clone(&app);
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let app = Arc::clone(&app);
                async move { Ok::<_, Infallible>(handle(&app, req).await) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

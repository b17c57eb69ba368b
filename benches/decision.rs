//! The authorization decision and its parts: on the embedded default config (12 routes) and on
//! a config that includes the whole Appwrite route map (`config/appwrite.yaml`, ~720 routes).
//!
//! Run: `cargo bench --bench decision`. Results, machine and date: `benches/README.md`.
//! Setup (config parse, key generation, cache fill, ephemeral minting) happens outside every
//! timed closure.

mod common;

use std::hint::black_box;
use std::path::Path;

use chrono::Utc;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use http::{HeaderMap, HeaderValue, Method, Uri};

use keygate::auth::decide;

use keygate::config::Snapshot;
use keygate::keys::cache::KeyCache;
use keygate::keys::{Digest, KeyKind, KeyRecord, Secret};
use keygate::routes::normalize::normalize_path;

/// Cache sizes every decision bench runs at.
const SIZES: [usize; 3] = [1_000, 100_000, 1_000_000];

fn record(id: String, digest: Digest, scopes: &[&str]) -> KeyRecord {
    let now = Utc::now();
    KeyRecord {
        id,
        project: "demo".into(),
        kind: KeyKind::Standard,
        name: "bench".into(),
        description: String::new(),
        scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
        expire: None,
        created_at: now,
        updated_at: now,
        accessed_at: None,
        sdks: Vec::new(),
        digest,
        previous: None,
        rate_limit: None,
    }
}

/// A cache of `n` keys; the returned secret is one of them.
fn cache_with(n: usize, snapshot: &Snapshot, scopes: &[&str]) -> (KeyCache, Secret) {
    let cache = KeyCache::new();
    for i in 0..n - 1 {
        // Digests of distinct strings: as random as real secrets, cheaper to make.
        cache.upsert(
            &record(
                format!("k{i}"),
                Digest::of(&format!("standard_{i:0>64}")),
                scopes,
            ),
            &snapshot.scopes,
        );
    }
    let secret = Secret::generate();
    cache.upsert(
        &record("probe".into(), secret.digest(), scopes),
        &snapshot.scopes,
    );
    (cache, secret)
}

fn key_headers(secret: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert("x-appwrite-key", HeaderValue::from_str(secret).unwrap());
    headers.insert("x-appwrite-project", HeaderValue::from_static("demo"));
    // What SDKs send besides the credential; decide() skips over them.
    headers.insert(
        "user-agent",
        HeaderValue::from_static("AppwriteNodeJSSDK/17.0.0"),
    );
    headers.insert("x-sdk-name", HeaderValue::from_static("Node.js"));
    headers.insert("content-type", HeaderValue::from_static("application/json"));
    headers
}

/// The Appwrite gateway shape: one project, one upstream, the whole Appwrite route map included.
/// The temp dir is returned so it outlives the snapshot's use.
fn appwrite_snapshot() -> (tempfile::TempDir, Snapshot) {
    let dir = tempfile::tempdir().unwrap();
    let config = common::write_appwrite_config(
        dir.path(),
        &dir.path().join("keys.db"),
        "127.0.0.1:0".parse().unwrap(),
        None,
    );
    let snapshot = Snapshot::load(&config).unwrap();
    assert!(
        snapshot.routes.len() > 700,
        "the Appwrite map was not included"
    );
    (dir, snapshot)
}

/// Scopes of a typical server key of an Appwrite app.
const APPWRITE_KEY_SCOPES: [&str; 6] = [
    "documents.read",
    "documents.write",
    "rows.read",
    "files.read",
    "users.read",
    "databases.read",
];

fn decision(c: &mut Criterion) {
    let snapshot = Snapshot::parse(Path::new("bench"), keygate::config::EMBEDDED_DEFAULT).unwrap();
    let uri: Uri = "/v1/databases/db1/collections/c1/documents?limit=25"
        .parse()
        .unwrap();
    let now = Utc::now().timestamp();
    let mut group = c.benchmark_group("decide");
    for n in SIZES {
        let (cache, secret) = cache_with(n, &snapshot, &["documents.read"]);
        let headers = key_headers(secret.expose());
        group.bench_with_input(BenchmarkId::new("allowed", n), &n, |b, _| {
            b.iter(|| {
                let d = decide(
                    &snapshot,
                    &cache,
                    &Method::GET,
                    black_box(&uri),
                    black_box(&headers),
                    now,
                );
                black_box(d.is_ok())
            })
        });
    }
    group.finish();
}

/// The whole decision on the full Appwrite map with 1 k, 100 k and 1 M keys cached.
fn decision_appwrite(c: &mut Criterion) {
    let (_dir, snapshot) = appwrite_snapshot();
    let now = Utc::now().timestamp();
    let list: Uri = "/v1/databases/6650f0e2a1/collections/orders/documents?queries[]=limit(25)"
        .parse()
        .unwrap();
    let deep: Uri =
        "/v1/databases/6650f0e2a1/collections/orders/documents/66a1b2c3d4/total/increment"
            .parse()
            .unwrap();
    let forbidden: Uri = "/v1/users".parse().unwrap();
    let mut group = c.benchmark_group("decide_appwrite");
    for n in SIZES {
        let (cache, secret) = cache_with(n, &snapshot, &APPWRITE_KEY_SCOPES);
        let headers = key_headers(secret.expose());
        let unknown = key_headers(Secret::generate().expose());
        let case = |name: &str, method: &Method, uri: &Uri, headers: &HeaderMap, ok: bool| {
            assert_eq!(
                decide(&snapshot, &cache, method, uri, headers, now).is_ok(),
                ok,
                "{name}"
            );
        };
        case("list", &Method::GET, &list, &headers, true);
        case("deep", &Method::PATCH, &deep, &headers, true);
        case("unknown", &Method::GET, &list, &unknown, false);
        case("scope", &Method::POST, &forbidden, &headers, false);
        let mut run = |name: &str, method: Method, uri: &Uri, headers: &HeaderMap| {
            group.bench_with_input(BenchmarkId::new(name, n), &n, |b, _| {
                b.iter(|| {
                    let d = decide(
                        &snapshot,
                        &cache,
                        &method,
                        black_box(uri),
                        black_box(headers),
                        now,
                    );
                    black_box(d.is_ok())
                })
            });
        };
        // GET documents list: the common call of an Appwrite server SDK.
        run("allowed_list", Method::GET, &list, &headers);
        if n == 1_000_000 {
            // The deepest Appwrite pattern (8 segments, 4 params), and two refusals.
            run("allowed_deep", Method::PATCH, &deep, &headers);
            run("unknown_key", Method::GET, &list, &unknown);
            run("missing_scope", Method::POST, &forbidden, &headers);
        }
    }
    group.finish();

    // An ephemeral key through the whole decision (no cache lookup: JWT verification).
    let signer = snapshot
        .ephemeral
        .as_ref()
        .expect("ephemeral_secret is set");
    let scopes: Vec<String> = APPWRITE_KEY_SCOPES
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    let ephemeral = signer.mint("demo", &scopes, now + 3600);
    let headers = key_headers(ephemeral.expose());
    let cache = KeyCache::new();
    assert!(decide(&snapshot, &cache, &Method::GET, &list, &headers, now).is_ok());
    c.bench_function("decide_appwrite/ephemeral", |b| {
        b.iter(|| {
            let d = decide(
                &snapshot,
                &cache,
                &Method::GET,
                black_box(&list),
                black_box(&headers),
                now,
            );
            black_box(d.is_ok())
        })
    });
}

fn parts(c: &mut Criterion) {
    let snapshot = Snapshot::parse(Path::new("bench"), keygate::config::EMBEDDED_DEFAULT).unwrap();
    c.bench_function("route_match", |b| {
        b.iter(|| {
            snapshot
                .routes
                .find(
                    &Method::GET,
                    black_box("/v1/databases/db1/collections/c1/documents"),
                )
                .is_some()
        })
    });
    c.bench_function("normalize/plain", |b| {
        b.iter(|| normalize_path(black_box("/v1/databases/db1/collections/c1/documents")).is_ok())
    });
    c.bench_function("normalize/encoded", |b| {
        b.iter(|| {
            normalize_path(black_box("/v1/databases/db%31/collections//c1/documents/")).is_ok()
        })
    });
    c.bench_function("normalize/deep", |b| {
        b.iter(|| {
            normalize_path(black_box(
                "/v1/databases/6650f0e2a1/collections/orders/documents/66a1b2c3d4/total/increment",
            ))
            .is_ok()
        })
    });
    let secret = Secret::generate();
    c.bench_function("digest", |b| {
        b.iter(|| Digest::of(black_box(secret.expose())))
    });
}

/// Route matching alone on the full Appwrite map.
fn routes_appwrite(c: &mut Criterion) {
    let (_dir, snapshot) = appwrite_snapshot();
    let cases: [(&str, Method, &str, bool); 6] = [
        ("short", Method::GET, "/v1/users", true),
        (
            "documents",
            Method::GET,
            "/v1/databases/6650f0e2a1/collections/orders/documents",
            true,
        ),
        (
            "deep",
            Method::PATCH,
            "/v1/databases/6650f0e2a1/collections/orders/documents/66a1b2c3d4/total/increment",
            true,
        ),
        (
            "tablesdb_row",
            Method::GET,
            "/v1/tablesdb/6650f0e2a1/tables/orders/rows/66a1b2c3d4",
            true,
        ),
        // A miss that walks 6 levels and backtracks through the parameter branches.
        (
            "miss_deep",
            Method::GET,
            "/v1/databases/6650f0e2a1/collections/orders/nothing/here",
            false,
        ),
        ("miss_root", Method::GET, "/v2/users", false),
    ];
    let mut group = c.benchmark_group("route_match_appwrite");
    for (name, method, path, hit) in cases {
        assert_eq!(
            snapshot.routes.find(&method, path).is_some(),
            hit,
            "{name}: {path}"
        );
        group.bench_function(name, |b| {
            b.iter(|| {
                snapshot
                    .routes
                    .find(black_box(&method), black_box(path))
                    .is_some()
            })
        });
    }
    group.finish();
}

/// Ephemeral key verification alone (HS256 JWT + claims + scope compilation).
fn ephemeral(c: &mut Criterion) {
    let (_dir, snapshot) = appwrite_snapshot();
    let signer = snapshot
        .ephemeral
        .as_ref()
        .expect("ephemeral_secret is set");
    let now = Utc::now().timestamp();
    let scopes: Vec<String> = APPWRITE_KEY_SCOPES
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    let key = signer.mint("demo", &scopes, now + 3600);
    assert!(signer.verify(key.expose(), &snapshot.scopes, now).is_ok());
    c.bench_function("ephemeral_verify", |b| {
        b.iter(|| {
            signer
                .verify(black_box(key.expose()), &snapshot.scopes, now)
                .is_ok()
        })
    });
}

criterion_group!(
    benches,
    decision,
    decision_appwrite,
    parts,
    routes_appwrite,
    ephemeral
);
criterion_main!(benches);

//! The authorization decision and its parts, on the embedded default config.
//!
//! Run: `cargo bench --bench decision`. Results, machine and date: `benches/README.md`.
//! Setup (config parse, key generation, cache fill) happens outside every timed closure.

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

fn record(id: String, digest: Digest) -> KeyRecord {
    let now = Utc::now();
    KeyRecord {
        id,
        project: "demo".into(),
        kind: KeyKind::Standard,
        name: "bench".into(),
        description: String::new(),
        scopes: vec!["documents.read".into()],
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
fn cache_with(n: usize, snapshot: &Snapshot) -> (KeyCache, Secret) {
    let cache = KeyCache::new();
    for i in 0..n - 1 {
        // Digests of distinct strings: as random as real secrets, cheaper to make.
        cache.upsert(
            &record(format!("k{i}"), Digest::of(&format!("standard_{i:0>64}"))),
            &snapshot.scopes,
        );
    }
    let secret = Secret::generate();
    cache.upsert(&record("probe".into(), secret.digest()), &snapshot.scopes);
    (cache, secret)
}

fn decision(c: &mut Criterion) {
    let snapshot = Snapshot::parse(Path::new("bench"), keygate::config::EMBEDDED_DEFAULT).unwrap();
    let uri: Uri = "/v1/databases/db1/collections/c1/documents?limit=25"
        .parse()
        .unwrap();
    let now = Utc::now().timestamp();
    let mut group = c.benchmark_group("decide");
    for n in [1_000usize, 100_000, 1_000_000] {
        let (cache, secret) = cache_with(n, &snapshot);
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-appwrite-key",
            HeaderValue::from_str(secret.expose()).unwrap(),
        );
        headers.insert("x-appwrite-project", HeaderValue::from_static("demo"));
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
    let secret = Secret::generate();
    c.bench_function("digest", |b| {
        b.iter(|| Digest::of(black_box(secret.expose())))
    });
}

criterion_group!(benches, decision, parts);
criterion_main!(benches);

//! Start-up and memory with one million keys (a plain `main`, not criterion).
//!
//! Run: `cargo bench --bench startup`. Results, machine and date: `benches/README.md`.
//!
//! 1. RSS of a `KeyCache` holding 1 M keys, filled in this process (VmRSS before and after).
//! 2. A SQLite store with 1 M keys (schema made by `SqliteStore::open`, rows bulk-inserted with
//!    rusqlite in one transaction, same columns as `src/keys/store/sqlite.rs`), then:
//!    - in process: time of `Gateway::start(snapshot)` (opens the store, streams every key into
//!      the cache), then of `Gateway::resync()` with nothing changed; the store read alone and
//!      the read streamed into a cache, timed apart;
//!    - the binary: `keygate serve --config …` spawned, timed until `/readyz` on its ops
//!      listener answers 200; its VmRSS and VmHWM (peak) read at that moment.
//!
//! Targets: RSS <= 300 MB with 1 M keys; ready <= 3 s with 1 M keys in the store.
//! `KEYS=n` in the environment changes the key count (default 1 000 000); `STARTUP_DB=path`
//! keeps the store file there and reuses it on the next run (for profiling the binary).

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use chrono::Utc;
use keygate::config::Snapshot;
use keygate::gateway::Gateway;
use keygate::keys::cache::KeyCache;
use keygate::keys::store::{KeyStore, SqliteStore};
use keygate::keys::{Digest, KeyKind, KeyRecord};

const RSS_TARGET_MB: f64 = 300.0;
const READY_TARGET_S: f64 = 3.0;
const BINARY_RUNS: usize = 3;

/// Realistic scope lists, a few per key, cycled over the keys.
const SCOPE_SETS: [&[&str]; 4] = [
    &["documents.read", "documents.write", "files.read"],
    &["users.read", "users.write"],
    &[
        "databases.read",
        "collections.read",
        "documents.read",
        "rows.read",
        "tables.read",
    ],
    &[
        "functions.read",
        "execution.write",
        "buckets.read",
        "files.write",
    ],
];

/// `(kB)` field of /proc/<pid>/status, e.g. `VmRSS`.
fn status_kb(pid: &str, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn mb(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

/// The secret of key `i` is `standard_` + 256 hex digits; its digest is what is stored.
fn digest_of(i: usize) -> Digest {
    Digest::of(&format!("standard_{i:0>256x}"))
}

/// An Appwrite `unique()`-shaped id: 20 lowercase hex characters.
fn key_id(i: usize) -> String {
    format!("{:020x}", 0x6650_f0e2_0000_0000u64 + i as u64)
}

fn record(i: usize) -> KeyRecord {
    let now = Utc::now();
    KeyRecord {
        id: key_id(i),
        project: "demo".into(),
        kind: KeyKind::Standard,
        name: format!("server key {i}"),
        description: String::new(),
        scopes: SCOPE_SETS[i % SCOPE_SETS.len()]
            .iter()
            .map(|s| (*s).to_owned())
            .collect(),
        expire: None,
        created_at: now,
        updated_at: now,
        accessed_at: None,
        sdks: Vec::new(),
        digest: digest_of(i),
        previous: None,
        rate_limit: None,
    }
}

/// A free loopback port (bound, read, released).
fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Creates the store's schema through the library, then writes `n` keys in one transaction.
fn build_store(runtime: &tokio::runtime::Runtime, db: &Path, n: usize) {
    runtime.block_on(async {
        SqliteStore::open(db).await.expect("open the store");
    });
    let mut conn = rusqlite::Connection::open(db).unwrap();
    conn.pragma_update(None, "synchronous", "OFF").unwrap();
    let tx = conn.transaction().unwrap();
    {
        let mut insert = tx
            .prepare(
                "INSERT INTO keys (project, id, kind, name, description, scopes, expire, \
                 created_at, updated_at, accessed_at, sdks, digest, previous_digest, \
                 previous_until, rate_limit, rate_window) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, NULL, ?7, ?7, NULL, '[]', ?8, NULL, NULL, NULL, NULL)",
            )
            .unwrap();
        let now = Utc::now().timestamp_millis();
        let scope_json: Vec<String> = SCOPE_SETS
            .iter()
            .map(|s| serde_json::to_string(s).unwrap())
            .collect();
        for i in 0..n {
            insert
                .execute(rusqlite::params![
                    "demo",
                    key_id(i),
                    "standard",
                    format!("server key {i}"),
                    "",
                    scope_json[i % SCOPE_SETS.len()],
                    now,
                    &digest_of(i).0[..],
                ])
                .unwrap();
        }
    }
    tx.commit().unwrap();
    conn.pragma_update(None, "wal_checkpoint", "TRUNCATE").ok();
}

/// One HTTP/1.1 GET; the status code, or None when the listener is not there yet.
fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut head = [0u8; 64];
    let read = stream.read(&mut head).ok()?;
    let line = std::str::from_utf8(&head[..read]).ok()?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn main() {
    // `cargo bench` passes `--bench`; a name filter is meaningless here.
    let n: usize = std::env::var("KEYS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let binary = env!("CARGO_BIN_EXE_keygate");
    let me = std::process::id().to_string();
    println!("startup bench: {n} keys");

    // (a) RSS of the cache alone, in a process that has done nothing else yet.
    let index = {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("unused.db");
        let cfg = common::write_appwrite_config(dir.path(), &db, free_addr(), Some(free_addr()));
        Snapshot::load(&cfg).unwrap().scopes
    };
    let before = status_kb(&me, "VmRSS").unwrap();
    let cache = KeyCache::new();
    let fill = Instant::now();
    for i in 0..n {
        cache.upsert(&record(i), &index);
    }
    let fill = fill.elapsed();
    let after = status_kb(&me, "VmRSS").unwrap();
    assert_eq!(cache.len(), n);
    let delta = mb(after - before);
    println!(
        "rss/cache: {:.1} MB before, {:.1} MB after, {:.1} MB for {n} keys ({:.0} bytes/key); \
         filled in {:.2} s; target <= {RSS_TARGET_MB} MB: {}",
        mb(before),
        mb(after),
        delta,
        (after - before) as f64 * 1024.0 / n as f64,
        fill.as_secs_f64(),
        if delta <= RSS_TARGET_MB {
            "met"
        } else {
            "MISSED"
        }
    );
    drop(cache);

    // (b) The store with n keys.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    // STARTUP_DB=path keeps the store there (and reuses it when it exists) for profiling.
    let db = std::env::var_os("STARTUP_DB")
        .map(PathBuf::from)
        .unwrap_or_else(|| dir.path().join("keys.db"));
    let built = Instant::now();
    let size_mb = |db: &Path| std::fs::metadata(db).map_or(0.0, |m| m.len() as f64 / 1e6);
    if db.exists() {
        println!(
            "store: reusing {} ({:.0} MB file)",
            db.display(),
            size_mb(&db)
        );
    } else {
        build_store(&runtime, &db, n);
        println!(
            "store: {n} keys written in {:.2} s ({:.0} MB file)",
            built.elapsed().as_secs_f64(),
            size_mb(&db)
        );
    }

    // In process: config load, then Gateway::start (store open + streamed load into the cache).
    let cfg = common::write_appwrite_config(dir.path(), &db, free_addr(), Some(free_addr()));
    let parsed = Instant::now();
    let snapshot = Snapshot::load(&cfg).unwrap();
    let parsed = parsed.elapsed();
    let started = Instant::now();
    let gateway = runtime.block_on(Gateway::start(snapshot)).unwrap();
    let started = started.elapsed();
    assert_eq!(gateway.keys().len(), n);
    // A resync of an unchanged store: every key streamed again, only marked as seen.
    let resynced = Instant::now();
    let loaded = runtime.block_on(gateway.resync()).unwrap();
    let resynced = resynced.elapsed();
    assert_eq!((loaded, gateway.keys().len()), (n, n));
    println!(
        "ready/in-process: Snapshot::load {:.1} ms, Gateway::start {:.2} s; \
         Gateway::resync (nothing changed) {:.2} s",
        parsed.as_secs_f64() * 1e3,
        started.as_secs_f64(),
        resynced.as_secs_f64()
    );
    drop(gateway);

    // Where Gateway::start spends it: the store read alone (rows -> records, dropped at once),
    // then the same read streamed into a cache.
    let snapshot = Snapshot::load(&cfg).unwrap();
    let (read, streamed) = runtime.block_on(async {
        let store = SqliteStore::open(&db).await.unwrap();
        let read = Instant::now();
        let mut rows = 0;
        store.load_each(&mut |_| rows += 1).await.unwrap();
        let read = read.elapsed();
        assert_eq!(rows, n);
        let streamed = Instant::now();
        let cache = KeyCache::with_capacity(store.count().await.unwrap());
        store
            .load_each(&mut |record| cache.upsert(&record, &snapshot.scopes))
            .await
            .unwrap();
        (read, streamed.elapsed())
    });
    println!(
        "ready/breakdown: SqliteStore::load_each {:.2} s ({n} rows read, nothing kept), \
         count + load_each into KeyCache::upsert {:.2} s (read and fill overlap)",
        read.as_secs_f64(),
        streamed.as_secs_f64(),
    );
    drop(runtime);

    // The binary, from spawn to /readyz 200.
    let mut times = Vec::new();
    for run in 1..=BINARY_RUNS {
        let ops = free_addr();
        let cfg = common::write_appwrite_config(dir.path(), &db, free_addr(), Some(ops));
        let spawned = Instant::now();
        let mut child = Command::new(binary)
            .args(["serve", "--config"])
            .arg(&cfg)
            .env("KEYGATE_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn keygate");
        let ready = loop {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("keygate exited before it was ready: {status}");
            }
            if http_status(ops, "/readyz") == Some(200) {
                break spawned.elapsed();
            }
            if spawned.elapsed() > Duration::from_secs(120) {
                let _ = child.kill();
                panic!("keygate not ready after 120 s");
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let pid = child.id().to_string();
        let rss = status_kb(&pid, "VmRSS").unwrap_or(0);
        let hwm = status_kb(&pid, "VmHWM").unwrap_or(0);
        let _ = child.kill();
        let _ = child.wait();
        println!(
            "ready/binary run {run}: {:.2} s to /readyz 200; VmRSS {:.1} MB, VmHWM (peak) {:.1} MB",
            ready.as_secs_f64(),
            mb(rss),
            mb(hwm)
        );
        times.push((ready.as_secs_f64(), rss, hwm));
    }
    times.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (median, rss, hwm) = times[times.len() / 2];
    println!(
        "ready/binary median of {BINARY_RUNS}: {median:.2} s, target <= {READY_TARGET_S} s: {}; \
         binary VmRSS {:.1} MB, peak {:.1} MB, target <= {RSS_TARGET_MB} MB: {}",
        if median <= READY_TARGET_S {
            "met"
        } else {
            "MISSED"
        },
        mb(rss),
        mb(hwm),
        if mb(rss) <= RSS_TARGET_MB {
            "met"
        } else {
            "MISSED"
        }
    );
}

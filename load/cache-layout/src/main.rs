//! Where the key cache's memory goes, and what a leaner layout would save: a stand-alone replica
//! of `KeyCache` (src/keys/cache.rs as of 27dc8e8: `CachedKey`, the digest map, the id index),
//! filled with N keys shaped like benches/startup.rs's (20-char ids, one project, 2-5 scopes),
//! measured by VmRSS. Not part of keygate's build; evidence for benches/README.md.
//!
//! Run: `cargo run --release -- VARIANT [N]` (N defaults to 1 000 000). Variants:
//! - `map_only`: the floor, a digest map of `Arc<()>` alone;
//! - `current`: today's layout (per key: `Arc<str>` id and project, `Arc<[Box<str>]>` scope
//!   names, `Arc<UsageState>`, `Arc<CachedKey>`; id index `KeyRef{Box<str>, Box<str>}` ->
//!   `Vec<Digest>`);
//! - `shared_arcs`: the id index keyed by the `CachedKey`'s own `Arc<str>`s, digests inline;
//! - `interned`: + one `Arc` per project and per distinct scope-name list;
//! - `interned_by_id`: + id index value a single `Digest`;
//! - `lean`: + usage state allocated on first use;
//! - `compact`: interned, lazy usage, the id index a set of the same `Arc<CachedKey>` (8-byte
//!   slots) hashed by (project, id), digest stored in the key;
//! - `compact_2w`: `compact` with a 2-word (128-scope) `ScopeSet` instead of 8 words;
//! - `minimal`: `compact_2w` + the id inline (`[u8; 36]`) and expiries as `i64` sentinels;
//! - `fill_current` / `fill_bulk`: fill TIME of today's `upsert` loop vs a bulk load into an
//!   empty, pre-sized cache with one compile per distinct scope list (inputs made first).

use dashmap::DashMap;
use sha2::{Digest as _, Sha256};
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::AtomicI64;
use std::sync::{Arc, Mutex, RwLock};

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct Digest([u8; 32]);
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
struct ScopeSet([u64; 8]);
#[derive(Clone, Copy)]
struct KeyRateLimit {
    _l: u32,
    _w: u32,
}
#[derive(Clone, Copy, PartialEq, Eq)]
enum KeyKind {
    Standard,
}
#[derive(Default)]
struct UsageState {
    _last: AtomicI64,
    _sdks: RwLock<Vec<Box<str>>>,
}
#[allow(dead_code)]
struct CachedKey {
    id: Arc<str>,
    project: Arc<str>,
    kind: KeyKind,
    scopes: ScopeSet,
    scope_names: Arc<[Box<str>]>,
    expire: Option<i64>,
    secret_valid_until: Option<i64>,
    rate_limit: Option<KeyRateLimit>,
    usage: Arc<UsageState>,
}
#[derive(Default)]
struct DigestHasher(u64);
impl Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        if bytes.len() >= 8 {
            let mut f = [0u8; 8];
            f.copy_from_slice(&bytes[..8]);
            self.0 ^= u64::from_ne_bytes(f);
        } else {
            for b in bytes {
                self.0 = self.0.rotate_left(8) ^ u64::from(*b);
            }
        }
    }
}
type DigestMap<V> = DashMap<Digest, V, BuildHasherDefault<DigestHasher>>;
#[derive(PartialEq, Eq, Hash)]
struct KeyRef {
    project: Box<str>,
    id: Box<str>,
}
#[derive(PartialEq, Eq, Hash)]
struct KeyRefArc {
    project: Arc<str>,
    id: Arc<str>,
}

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

fn rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap()
}
fn digest(i: usize) -> Digest {
    Digest(Sha256::digest(format!("standard_{i:0>256x}").as_bytes()).into())
}
fn id(i: usize) -> String {
    format!("{:020x}", 0x6650_f0e2_0000_0000u64 + i as u64)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let variant = args.get(1).map(String::as_str).unwrap_or("current");
    let n: usize = args
        .get(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    let before = rss_kb();
    let t = std::time::Instant::now();
    // Keep structures alive until measured.
    let mut keep: Vec<Box<dyn std::any::Any>> = Vec::new();
    match variant {
        // What KeyCache::upsert builds today: per key Arc<str> id + project, Arc<[Box<str>]>
        // scope names, Arc<UsageState>, Arc<CachedKey>; by_id with Box<str> KeyRef and Vec<Digest>.
        "current" | "shared_arcs" | "interned" | "interned_by_id" | "lean" => {
            let by_digest: DigestMap<Arc<CachedKey>> = DigestMap::default();
            let by_id_box: DashMap<KeyRef, Vec<Digest>> = DashMap::new();
            let by_id_arc: DashMap<KeyRefArc, (Digest, Option<Digest>)> = DashMap::new();
            let by_id_one: DashMap<KeyRefArc, Digest> = DashMap::new();
            let shared_usage = Arc::new(UsageState::default());
            let projects: Mutex<HashMap<String, Arc<str>>> = Mutex::default();
            let lists: Mutex<HashMap<Vec<String>, Arc<[Box<str>]>>> = Mutex::default();
            for i in 0..n {
                let scopes: Vec<String> = SCOPE_SETS[i % 4].iter().map(|s| s.to_string()).collect();
                let project = "demo".to_string();
                let key_id = id(i);
                let d = digest(i);
                let interned = variant != "current" && variant != "shared_arcs";
                let project_arc: Arc<str> = if interned {
                    projects
                        .lock()
                        .unwrap()
                        .entry(project.clone())
                        .or_insert_with(|| project.as_str().into())
                        .clone()
                } else {
                    project.as_str().into()
                };
                let names: Arc<[Box<str>]> = if interned {
                    lists
                        .lock()
                        .unwrap()
                        .entry(scopes.clone())
                        .or_insert_with(|| scopes.iter().map(|s| s.as_str().into()).collect())
                        .clone()
                } else {
                    scopes.iter().map(|s| s.as_str().into()).collect()
                };
                let id_arc: Arc<str> = key_id.as_str().into();
                let key = CachedKey {
                    id: id_arc.clone(),
                    project: project_arc.clone(),
                    kind: KeyKind::Standard,
                    scopes: ScopeSet::default(),
                    scope_names: names,
                    expire: None,
                    secret_valid_until: None,
                    rate_limit: None,
                    usage: if variant == "lean" {
                        shared_usage.clone()
                    } else {
                        Arc::new(UsageState::default())
                    },
                };
                by_digest.insert(d, Arc::new(key));
                match variant {
                    "current" => {
                        by_id_box.insert(
                            KeyRef {
                                project: project.as_str().into(),
                                id: key_id.as_str().into(),
                            },
                            vec![d],
                        );
                    }
                    "interned_by_id" | "lean" => {
                        by_id_one.insert(
                            KeyRefArc {
                                project: project_arc,
                                id: id_arc,
                            },
                            d,
                        );
                    }
                    _ => {
                        by_id_arc.insert(
                            KeyRefArc {
                                project: project_arc,
                                id: id_arc,
                            },
                            (d, None),
                        );
                    }
                }
            }
            keep.push(Box::new(by_digest));
            keep.push(Box::new(by_id_box));
            keep.push(Box::new(by_id_arc));
            keep.push(Box::new(by_id_one));
            keep.push(Box::new(shared_usage));
            keep.push(Box::new(projects));
            keep.push(Box::new(lists));
        }
        // Floor: the by_digest map of Digest -> Arc<()> alone.
        "map_only" => {
            let by_digest: DigestMap<Arc<()>> = DigestMap::default();
            for i in 0..n {
                by_digest.insert(digest(i), Arc::new(()));
            }
            keep.push(Box::new(by_digest));
        }
        "compact" => keep = compact::<8>(n),
        "compact_2w" => keep = compact::<2>(n),
        "minimal" => keep = minimal(n),
        "fill_current" | "fill_bulk" => {
            let recs = inputs(n);
            let t = std::time::Instant::now();
            let kept = if variant == "fill_current" {
                fill_current(&recs)
            } else {
                fill_bulk(&recs)
            };
            println!("{variant}: fill {:.2} s", t.elapsed().as_secs_f64());
            keep.push(kept);
            keep.push(Box::new(recs));
        }
        _ => panic!("variant?"),
    }
    let after = rss_kb();
    println!(
        "{variant:>13}: {:7.1} MB for {n} keys ({:4.0} B/key), {:.2} s",
        (after - before) as f64 / 1024.0,
        (after - before) as f64 * 1024.0 / n as f64,
        t.elapsed().as_secs_f64()
    );
    drop(keep);
}

/// A compact layout: the id index is a set of the same Arcs the digest map holds (8-byte slots),
/// hashed by (project, id); project and scope-name lists interned; usage allocated on first use.
#[allow(dead_code)]
struct CompactKey<const W: usize> {
    id: Arc<str>,
    project: Arc<str>,
    kind: KeyKind,
    scopes: [u64; W],
    scope_names: Arc<[Box<str>]>,
    expire: Option<i64>,
    secret_valid_until: Option<i64>,
    rate_limit: Option<KeyRateLimit>,
    usage: std::sync::OnceLock<Arc<UsageState>>,
    digest: Digest,
}
struct ById<const W: usize>(Arc<CompactKey<W>>);
impl<const W: usize> PartialEq for ById<W> {
    fn eq(&self, o: &Self) -> bool {
        self.0.project == o.0.project && self.0.id == o.0.id
    }
}
impl<const W: usize> Eq for ById<W> {}
impl<const W: usize> std::hash::Hash for ById<W> {
    fn hash<H: Hasher>(&self, h: &mut H) {
        self.0.project.hash(h);
        self.0.id.hash(h);
    }
}

fn compact<const W: usize>(n: usize) -> Vec<Box<dyn std::any::Any>> {
    let by_digest: DigestMap<Arc<CompactKey<W>>> = DigestMap::default();
    let by_id: dashmap::DashSet<ById<W>> = dashmap::DashSet::new();
    let project: Arc<str> = "demo".into();
    let lists: Vec<Arc<[Box<str>]>> = SCOPE_SETS
        .iter()
        .map(|l| l.iter().map(|s| (*s).into()).collect())
        .collect();
    for i in 0..n {
        let d = digest(i);
        let key = Arc::new(CompactKey::<W> {
            id: id(i).as_str().into(),
            project: project.clone(),
            kind: KeyKind::Standard,
            scopes: [0; W],
            scope_names: lists[i % 4].clone(),
            expire: None,
            secret_valid_until: None,
            rate_limit: None,
            usage: std::sync::OnceLock::new(),
            digest: d,
        });
        by_digest.insert(d, key.clone());
        by_id.insert(ById(key));
    }
    vec![Box::new(by_digest), Box::new(by_id), Box::new(lists)]
}

/// compact_2w plus: the id inline (Appwrite ids are at most 36 bytes), expiries as i64 with a
/// sentinel instead of Option<i64>.
#[allow(dead_code)]
struct MinKey {
    id: [u8; 36],
    id_len: u8,
    kind: KeyKind,
    project: Arc<str>,
    scopes: [u64; 2],
    scope_names: Arc<[Box<str>]>,
    expire: i64,
    secret_valid_until: i64,
    rate_limit: Option<KeyRateLimit>,
    usage: std::sync::OnceLock<Arc<UsageState>>,
    digest: Digest,
}
struct ByIdMin(Arc<MinKey>);
impl PartialEq for ByIdMin {
    fn eq(&self, o: &Self) -> bool {
        self.0.project == o.0.project && self.0.id == o.0.id
    }
}
impl Eq for ByIdMin {}
impl std::hash::Hash for ByIdMin {
    fn hash<H: Hasher>(&self, h: &mut H) {
        self.0.project.hash(h);
        self.0.id.hash(h);
    }
}
fn minimal(n: usize) -> Vec<Box<dyn std::any::Any>> {
    let by_digest: DigestMap<Arc<MinKey>> = DigestMap::default();
    let by_id: dashmap::DashSet<ByIdMin> = dashmap::DashSet::new();
    let project: Arc<str> = "demo".into();
    let lists: Vec<Arc<[Box<str>]>> = SCOPE_SETS
        .iter()
        .map(|l| l.iter().map(|s| (*s).into()).collect())
        .collect();
    for i in 0..n {
        let d = digest(i);
        let s = id(i);
        let mut idb = [0u8; 36];
        idb[..s.len()].copy_from_slice(s.as_bytes());
        let key = Arc::new(MinKey {
            id: idb,
            id_len: s.len() as u8,
            kind: KeyKind::Standard,
            project: project.clone(),
            scopes: [0; 2],
            scope_names: lists[i % 4].clone(),
            expire: i64::MAX,
            secret_valid_until: i64::MAX,
            rate_limit: None,
            usage: std::sync::OnceLock::new(),
            digest: d,
        });
        by_digest.insert(d, key.clone());
        by_id.insert(ByIdMin(key));
    }
    vec![Box::new(by_digest), Box::new(by_id), Box::new(lists)]
}

// ---- fill-time replica: inputs generated first, only the fill is timed ----
struct Rec {
    pub project: String,
    pub id: String,
    pub scopes: Vec<String>,
    pub digest: Digest,
}
fn inputs(n: usize) -> Vec<Rec> {
    (0..n)
        .map(|i| Rec {
            project: "demo".into(),
            id: id(i),
            scopes: SCOPE_SETS[i % 4].iter().map(|s| s.to_string()).collect(),
            digest: digest(i),
        })
        .collect()
}
fn index() -> HashMap<Arc<str>, usize> {
    let mut m = HashMap::new();
    for (i, s) in SCOPE_SETS.iter().flat_map(|l| l.iter()).enumerate() {
        m.entry(Arc::from(*s)).or_insert(i);
    }
    for i in 0..100 {
        m.entry(Arc::from(format!("filler.{i}").as_str()))
            .or_insert(100 + i);
    }
    m
}
fn compile(idx: &HashMap<Arc<str>, usize>, names: &[String]) -> ScopeSet {
    let mut s = ScopeSet::default();
    for n in names {
        if let Some(b) = idx.get(n.as_str()) {
            s.0[b / 64] |= 1 << (b % 64);
        }
    }
    s
}
/// KeyCache::upsert as written (src/keys/cache.rs): by_id.get for usage, fresh allocations, SipHash by_id.
fn fill_current(recs: &[Rec]) -> Box<dyn std::any::Any> {
    let idx = index();
    let by_digest: DigestMap<Arc<CachedKey>> = DigestMap::default();
    let by_id: DashMap<KeyRef, Vec<Digest>> = DashMap::new();
    for r in recs {
        let key = KeyRef {
            project: r.project.as_str().into(),
            id: r.id.as_str().into(),
        };
        let usage = by_id
            .get(&key)
            .and_then(|d| {
                d.first()
                    .and_then(|d| by_digest.get(d).map(|e| e.usage.clone()))
            })
            .unwrap_or_else(|| Arc::new(UsageState::default()));
        let current = CachedKey {
            id: r.id.as_str().into(),
            project: r.project.as_str().into(),
            kind: KeyKind::Standard,
            scopes: compile(&idx, &r.scopes),
            scope_names: r.scopes.iter().map(|s| s.as_str().into()).collect(),
            expire: None,
            secret_valid_until: None,
            rate_limit: None,
            usage,
        };
        let digests = vec![r.digest];
        by_digest.insert(r.digest, Arc::new(current));
        let replaced = by_id.insert(key, digests.clone());
        for old in replaced.unwrap_or_default() {
            if !digests.contains(&old) {
                by_digest.remove(&old);
            }
        }
    }
    Box::new((by_digest, by_id))
}
/// A bulk fill into an empty cache: maps pre-sized, no lookup of an existing entry, one compile and
/// one name list per distinct scope list, project interned, current layout otherwise.
fn fill_bulk(recs: &[Rec]) -> Box<dyn std::any::Any> {
    let idx = index();
    let by_digest: DigestMap<Arc<CachedKey>> =
        DigestMap::with_capacity_and_hasher(recs.len(), Default::default());
    let by_id: DashMap<KeyRef, Vec<Digest>> = DashMap::with_capacity(recs.len());
    let mut lists: HashMap<&[String], (ScopeSet, Arc<[Box<str>]>)> = HashMap::new();
    let mut projects: HashMap<&str, Arc<str>> = HashMap::new();
    for r in recs {
        let (scopes, names) = lists
            .entry(&r.scopes[..])
            .or_insert_with(|| {
                (
                    compile(&idx, &r.scopes),
                    r.scopes.iter().map(|s| s.as_str().into()).collect(),
                )
            })
            .clone();
        let project = projects
            .entry(&r.project)
            .or_insert_with(|| r.project.as_str().into())
            .clone();
        let current = CachedKey {
            id: r.id.as_str().into(),
            project,
            kind: KeyKind::Standard,
            scopes,
            scope_names: names,
            expire: None,
            secret_valid_until: None,
            rate_limit: None,
            usage: Arc::new(UsageState::default()),
        };
        by_digest.insert(r.digest, Arc::new(current));
        by_id.insert(
            KeyRef {
                project: r.project.as_str().into(),
                id: r.id.as_str().into(),
            },
            vec![r.digest],
        );
    }
    Box::new((by_digest, by_id))
}

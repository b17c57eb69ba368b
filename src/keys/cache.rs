//! The key cache: every live key in memory, keyed by the digest of its secret.
//!
//! Lookups on the request path are one hash of a SHA-256 digest and one shard read lock; the
//! secret itself is never compared. Entries are `Arc`s so a request can keep its key after the
//! shard lock is released (no map reference is ever held across an await). A rotated key has two
//! entries, its new secret and its previous one, until the grace period ends.

use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, RwLock};

use dashmap::DashMap;

use super::scopes::{ScopeIndex, ScopeSet};
use super::{Digest, KeyKind, KeyRateLimit, KeyRecord};

/// What the request path needs to know about a key.
#[derive(Debug, Clone)]
pub struct CachedKey {
    pub id: Arc<str>,
    pub project: Arc<str>,
    pub kind: KeyKind,
    pub scopes: ScopeSet,
    pub scope_names: Arc<[Box<str>]>,
    /// The key's expiry in Unix seconds; `None` never expires.
    pub expire: Option<i64>,
    /// Set on the entry of a rotated-out secret: it is refused from this moment (Unix seconds).
    pub secret_valid_until: Option<i64>,
    /// The key's own abuse limit, on every route.
    pub rate_limit: Option<KeyRateLimit>,
    /// Usage not yet written, shared by all entries of one key.
    pub usage: Arc<UsageState>,
}

/// Per-key usage bookkeeping, so the request path can tell in a few instructions whether there
/// is anything new to write behind it.
#[derive(Debug, Default)]
pub struct UsageState {
    /// When `accessedAt` was last written (or read from the store), Unix seconds.
    pub last_access_written: AtomicI64,
    pub sdks: RwLock<Vec<Box<str>>>,
}

impl UsageState {
    fn from_record(record: &KeyRecord) -> UsageState {
        UsageState {
            last_access_written: AtomicI64::new(record.accessed_at.map_or(0, |a| a.timestamp())),
            sdks: RwLock::new(record.sdks.iter().map(|s| s.as_str().into()).collect()),
        }
    }

    /// Claims the right to write `accessedAt` now, if `interval` seconds have passed since the
    /// last write. Only one caller wins per interval.
    pub fn claim_access(&self, now: i64, interval: i64) -> bool {
        let last = self.last_access_written.load(Ordering::Relaxed);
        now - last >= interval
            && self
                .last_access_written
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    /// Records an SDK name; true when it is new for this key.
    pub fn claim_sdk(&self, sdk: &str) -> bool {
        if self
            .sdks
            .read()
            .map(|known| known.iter().any(|s| &**s == sdk))
            .unwrap_or(true)
        {
            return false;
        }
        match self.sdks.write() {
            Ok(mut known) if !known.iter().any(|s| &**s == sdk) => {
                known.push(sdk.into());
                true
            }
            _ => false,
        }
    }
}

/// Digests are uniformly distributed already: their first eight bytes are a perfect hash, and
/// an attacker cannot aim collisions without SHA-256 preimages.
#[derive(Default)]
pub struct DigestHasher(u64);

impl Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // `Digest` hashes as its 32-byte array: a length prefix, then the bytes.
        if bytes.len() >= 8 {
            let mut first = [0u8; 8];
            first.copy_from_slice(&bytes[..8]);
            self.0 ^= u64::from_ne_bytes(first);
        } else {
            for b in bytes {
                self.0 = self.0.rotate_left(8) ^ u64::from(*b);
            }
        }
    }
}

type DigestMap<V> = DashMap<Digest, V, BuildHasherDefault<DigestHasher>>;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct KeyRef {
    project: Box<str>,
    id: Box<str>,
}

/// Every live key, by digest, plus the reverse index used to apply changes by key id.
#[derive(Default)]
pub struct KeyCache {
    by_digest: DigestMap<Arc<CachedKey>>,
    by_id: DashMap<KeyRef, Vec<Digest>>,
}

impl KeyCache {
    pub fn new() -> KeyCache {
        KeyCache::default()
    }

    /// The key whose secret has this digest.
    #[inline]
    pub fn lookup(&self, digest: &Digest) -> Option<Arc<CachedKey>> {
        self.by_digest
            .get(digest)
            .map(|entry| entry.value().clone())
    }

    /// Inserts or replaces a key. The new digests are live before old ones are removed, so a
    /// concurrent request never sees the key missing.
    pub fn upsert(&self, record: &KeyRecord, index: &ScopeIndex) {
        let key = KeyRef {
            project: record.project.as_str().into(),
            id: record.id.as_str().into(),
        };
        let usage = self
            .by_id
            .get(&key)
            .and_then(|digests| digests.first().and_then(|d| self.lookup(d)))
            .map(|existing| existing.usage.clone())
            .unwrap_or_else(|| Arc::new(UsageState::from_record(record)));
        let current = CachedKey {
            id: record.id.as_str().into(),
            project: record.project.as_str().into(),
            kind: record.kind,
            scopes: index.compile_known(record.scopes.iter().map(String::as_str)),
            scope_names: record.scopes.iter().map(|s| s.as_str().into()).collect(),
            expire: record.expire.map(|e| e.timestamp()),
            secret_valid_until: None,
            rate_limit: record.rate_limit,
            usage,
        };
        let mut digests = vec![record.digest];
        if let Some(previous) = &record.previous {
            let entry = CachedKey {
                id: current.id.clone(),
                project: current.project.clone(),
                scope_names: current.scope_names.clone(),
                usage: current.usage.clone(),
                secret_valid_until: Some(previous.until.timestamp()),
                ..current
            };
            self.by_digest.insert(previous.digest, Arc::new(entry));
            digests.push(previous.digest);
        }
        self.by_digest.insert(record.digest, Arc::new(current));
        let replaced = self.by_id.insert(key, digests.clone());
        for old in replaced.unwrap_or_default() {
            if !digests.contains(&old) {
                self.by_digest.remove(&old);
            }
        }
    }

    /// Removes a key; a no-op when it is not cached.
    pub fn remove(&self, project: &str, id: &str) {
        let key = KeyRef {
            project: project.into(),
            id: id.into(),
        };
        if let Some((_, digests)) = self.by_id.remove(&key) {
            for digest in digests {
                self.by_digest.remove(&digest);
            }
        }
    }

    /// Replaces the whole content (start-up and resync).
    pub fn replace_all(&self, records: &[KeyRecord], index: &ScopeIndex) {
        for record in records {
            self.upsert(record, index);
        }
        let live: std::collections::HashSet<(&str, &str)> = records
            .iter()
            .map(|r| (r.project.as_str(), r.id.as_str()))
            .collect();
        let stale: Vec<KeyRef> = self
            .by_id
            .iter()
            .filter(|e| !live.contains(&(&*e.key().project, &*e.key().id)))
            .map(|e| e.key().clone())
            .collect();
        for key in stale {
            self.remove(&key.project, &key.id);
        }
    }

    /// Compiles every key's scope set again, after a config reload brought scope names that
    /// keys may hold but could not be compiled before.
    pub fn recompile(&self, index: &ScopeIndex) {
        for mut entry in self.by_digest.iter_mut() {
            let mut key = CachedKey::clone(entry.value());
            key.scopes = index.compile_known(key.scope_names.iter().map(|s| &**s));
            *entry.value_mut() = Arc::new(key);
        }
    }

    /// Number of cached keys.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{PreviousSecret, Secret};
    use chrono::Utc;

    fn record(id: &str, secret: &Secret) -> KeyRecord {
        KeyRecord {
            id: id.into(),
            project: "p".into(),
            kind: KeyKind::Standard,
            name: id.into(),
            description: String::new(),
            scopes: vec!["a".into(), "gone".into()],
            expire: None,
            created_at: Utc::now(),
            updated_at: Utc::now(),
            accessed_at: None,
            sdks: vec![],
            digest: secret.digest(),
            previous: None,
            rate_limit: None,
        }
    }

    #[test]
    fn upsert_replaces_and_remove_forgets() {
        let mut index = ScopeIndex::default();
        index.register("a");
        let cache = KeyCache::new();
        let first = Secret::generate();
        let second = Secret::generate();
        cache.upsert(&record("k", &first), &index);
        let key = cache.lookup(&first.digest()).unwrap();
        assert_eq!(&*key.id, "k");
        assert_eq!(key.scopes, index.compile(["a"]).unwrap());

        cache.upsert(&record("k", &second), &index);
        assert!(cache.lookup(&first.digest()).is_none());
        assert!(cache.lookup(&second.digest()).is_some());
        assert_eq!(cache.len(), 1);

        cache.remove("p", "k");
        assert!(cache.lookup(&second.digest()).is_none());
        assert!(cache.is_empty());
    }

    #[test]
    fn rotated_keys_keep_their_previous_secret_with_a_deadline() {
        let index = ScopeIndex::default();
        let cache = KeyCache::new();
        let (old, new) = (Secret::generate(), Secret::generate());
        let until = Utc::now();
        let mut rotated = record("k", &new);
        rotated.previous = Some(PreviousSecret {
            digest: old.digest(),
            until,
        });
        cache.upsert(&rotated, &index);
        assert_eq!(
            cache.lookup(&new.digest()).unwrap().secret_valid_until,
            None
        );
        let previous = cache.lookup(&old.digest()).unwrap();
        assert_eq!(previous.secret_valid_until, Some(until.timestamp()));
        assert!(Arc::ptr_eq(
            &previous.usage,
            &cache.lookup(&new.digest()).unwrap().usage
        ));
        // Rotating again without grace drops the old secret.
        cache.upsert(&record("k", &new), &index);
        assert!(cache.lookup(&old.digest()).is_none());
    }

    #[test]
    fn usage_claims_once_per_interval_and_sdk() {
        let state = UsageState::default();
        assert!(state.claim_access(100, 60));
        assert!(!state.claim_access(120, 60));
        assert!(state.claim_access(160, 60));
        assert!(state.claim_sdk("python"));
        assert!(!state.claim_sdk("python"));
        assert!(state.claim_sdk("node"));
    }

    #[test]
    fn replace_all_drops_stale_keys() {
        let index = ScopeIndex::default();
        let cache = KeyCache::new();
        let (a, b) = (Secret::generate(), Secret::generate());
        cache.upsert(&record("a", &a), &index);
        cache.replace_all(&[record("b", &b)], &index);
        assert!(cache.lookup(&a.digest()).is_none());
        assert!(cache.lookup(&b.digest()).is_some());
    }
}

//! The key cache: every live key in memory, keyed by the digest of its secret.
//!
//! Lookups on the request path are one hash of a SHA-256 digest and one shard read lock; the
//! secret itself is never compared. Entries are `Arc`s so a request can keep its key after the
//! shard lock is released (no map reference is ever held across an await).

use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;

use dashmap::DashMap;

use super::scopes::{ScopeIndex, ScopeSet};
use super::{Digest, KeyRecord};

/// What the request path needs to know about a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedKey {
    pub id: Arc<str>,
    pub project: Arc<str>,
    pub scopes: ScopeSet,
    pub scope_names: Arc<[Box<str>]>,
    /// Unix seconds; `None` never expires.
    pub expire: Option<i64>,
}

impl CachedKey {
    pub fn from_record(record: &KeyRecord, index: &ScopeIndex) -> CachedKey {
        CachedKey {
            id: record.id.as_str().into(),
            project: record.project.as_str().into(),
            scopes: index.compile_known(record.scopes.iter().map(String::as_str)),
            scope_names: record.scopes.iter().map(|s| s.as_str().into()).collect(),
            expire: record.expire.map(|e| e.timestamp()),
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

    /// Inserts or replaces a key. The new digest is live before the old one is removed, so a
    /// concurrent request never sees the key missing.
    pub fn upsert(&self, record: &KeyRecord, index: &ScopeIndex) {
        let entry = Arc::new(CachedKey::from_record(record, index));
        self.by_digest.insert(record.digest, entry);
        let key = KeyRef {
            project: record.project.as_str().into(),
            id: record.id.as_str().into(),
        };
        let previous = self.by_id.insert(key, vec![record.digest]);
        for old in previous.unwrap_or_default() {
            if old != record.digest {
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

    /// Number of cached secrets.
    pub fn len(&self) -> usize {
        self.by_digest.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_digest.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::Secret;
    use chrono::Utc;

    fn record(id: &str, secret: &Secret) -> KeyRecord {
        KeyRecord {
            id: id.into(),
            project: "p".into(),
            name: id.into(),
            description: String::new(),
            scopes: vec!["a".into(), "gone".into()],
            expire: None,
            created_at: Utc::now(),
            updated_at: Utc::now(),
            accessed_at: None,
            sdks: vec![],
            digest: secret.digest(),
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

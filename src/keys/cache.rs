//! The key cache: every live key in memory, keyed by the digest of its secret.
//!
//! Lookups on the request path are one hash of a SHA-256 digest and one shard read lock; the
//! secret itself is never compared. Entries are `Arc`s so a request can keep its key after the
//! shard lock is released (no map reference is ever held across an await). A rotated key has two
//! entries, its new secret and its previous one, until the grace period ends.
//!
//! Memory is what bounds the cache (a million keys is a normal size), so what keys share is
//! stored once: project names and scope grants (the scope list and its compiled set) are
//! interned, and the id index holds one digest per key.

use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use dashmap::DashMap;

use super::scopes::{ScopeIndex, ScopeSet};
use super::{Digest, KeyKind, KeyRateLimit, KeyRecord};

/// "Never", for the expiry fields.
const NEVER: i64 = i64::MAX;

/// A scope list and its compiled set, shared by every key that holds exactly that list.
#[derive(Debug)]
pub struct Grant {
    pub names: Box<[Box<str>]>,
    pub scopes: ScopeSet,
}

/// What the request path needs to know about a key.
#[derive(Debug)]
pub struct CachedKey {
    pub id: Arc<str>,
    pub project: Arc<str>,
    pub kind: KeyKind,
    pub grant: Arc<Grant>,
    /// The key's own abuse limit, on every route.
    pub rate_limit: Option<KeyRateLimit>,
    expire: i64,
    secret_valid_until: i64,
    /// When `accessedAt` was last written (or read from the store), Unix seconds.
    last_access_written: AtomicI64,
    /// On the entry of the current secret: the digest of the previous secret, if it has one.
    previous: Option<Digest>,
}

impl CachedKey {
    /// The scopes granted to the key (implicit scopes not included).
    pub fn scopes(&self) -> &ScopeSet {
        &self.grant.scopes
    }

    /// The key's expiry, Unix seconds; `None` never expires.
    pub fn expire(&self) -> Option<i64> {
        (self.expire != NEVER).then_some(self.expire)
    }

    /// Set on the entry of a rotated-out secret: it is refused from this moment (Unix seconds).
    pub fn secret_valid_until(&self) -> Option<i64> {
        (self.secret_valid_until != NEVER).then_some(self.secret_valid_until)
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

    fn with_grant(&self, grant: Arc<Grant>) -> CachedKey {
        CachedKey {
            id: self.id.clone(),
            project: self.project.clone(),
            kind: self.kind,
            grant,
            rate_limit: self.rate_limit,
            expire: self.expire,
            secret_valid_until: self.secret_valid_until,
            last_access_written: AtomicI64::new(self.last_access_written.load(Ordering::Relaxed)),
            previous: self.previous,
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
type KeyRef = (Arc<str>, Arc<str>);

/// Every live key, by digest, plus the reverse index used to apply changes by key id.
#[derive(Default)]
pub struct KeyCache {
    by_digest: DigestMap<Arc<CachedKey>>,
    /// (project, id) → the digest of the key's current secret.
    by_id: DashMap<KeyRef, Digest>,
    projects: DashMap<Box<str>, Arc<str>>,
    grants: DashMap<Box<str>, Arc<Grant>>,
    /// SDK names seen per key (only keys that have any).
    sdks: DashMap<KeyRef, Vec<Box<str>>>,
}

impl KeyCache {
    pub fn new() -> KeyCache {
        KeyCache::default()
    }

    /// A cache sized for `keys` keys up front (start-up with a large store).
    pub fn with_capacity(keys: usize) -> KeyCache {
        KeyCache {
            by_digest: DashMap::with_capacity_and_hasher(keys, Default::default()),
            by_id: DashMap::with_capacity(keys),
            ..KeyCache::default()
        }
    }

    /// The key whose secret has this digest.
    #[inline]
    pub fn lookup(&self, digest: &Digest) -> Option<Arc<CachedKey>> {
        self.by_digest
            .get(digest)
            .map(|entry| entry.value().clone())
    }

    fn project(&self, name: &str) -> Arc<str> {
        if let Some(shared) = self.projects.get(name) {
            return shared.clone();
        }
        self.projects
            .entry(name.into())
            .or_insert_with(|| name.into())
            .clone()
    }

    fn grant(&self, names: &[String], index: &ScopeIndex) -> Arc<Grant> {
        let key = names.join("\n");
        if let Some(shared) = self.grants.get(key.as_str()) {
            return shared.clone();
        }
        self.grants
            .entry(key.into_boxed_str())
            .or_insert_with(|| {
                Arc::new(Grant {
                    names: names.iter().map(|s| s.as_str().into()).collect(),
                    scopes: index.compile_known(names.iter().map(String::as_str)),
                })
            })
            .clone()
    }

    /// Inserts or replaces a key. The new digests are live before old ones are removed, so a
    /// concurrent request never sees the key missing.
    pub fn upsert(&self, record: &KeyRecord, index: &ScopeIndex) {
        let project = self.project(&record.project);
        let key: KeyRef = (project.clone(), record.id.as_str().into());
        let old_digest = self.by_id.get(&key).map(|d| *d);
        let old = old_digest.and_then(|d| self.lookup(&d));
        let last_access = old
            .as_ref()
            .map(|k| k.last_access_written.load(Ordering::Relaxed))
            .unwrap_or_else(|| record.accessed_at.map_or(0, |a| a.timestamp()));
        if !record.sdks.is_empty() && !self.sdks.contains_key(&key) {
            self.sdks.insert(
                key.clone(),
                record.sdks.iter().map(|s| s.as_str().into()).collect(),
            );
        }
        let current = CachedKey {
            id: key.1.clone(),
            project,
            kind: record.kind,
            grant: self.grant(&record.scopes, index),
            rate_limit: record.rate_limit,
            expire: record.expire.map_or(NEVER, |e| e.timestamp()),
            secret_valid_until: NEVER,
            last_access_written: AtomicI64::new(last_access),
            previous: record.previous.map(|p| p.digest),
        };
        if let Some(previous) = &record.previous {
            let mut entry = current.with_grant(current.grant.clone());
            entry.secret_valid_until = previous.until.timestamp();
            entry.previous = None;
            self.by_digest.insert(previous.digest, Arc::new(entry));
        }
        let replaced = self.by_digest.insert(record.digest, Arc::new(current));
        self.by_id.insert(key, record.digest);

        // Secrets of the old version that the new one no longer has.
        let keep =
            |d: &Digest| *d == record.digest || record.previous.is_some_and(|p| p.digest == *d);
        let stale = [
            old_digest,
            old.as_ref().and_then(|k| k.previous),
            replaced.as_ref().and_then(|k| k.previous),
        ];
        for digest in stale.into_iter().flatten() {
            if !keep(&digest) {
                self.by_digest.remove(&digest);
            }
        }
    }

    /// Removes a key; a no-op when it is not cached.
    pub fn remove(&self, project: &str, id: &str) {
        let key: KeyRef = (project.into(), id.into());
        self.sdks.remove(&key);
        if let Some((_, digest)) = self.by_id.remove(&key) {
            if let Some((_, entry)) = self.by_digest.remove(&digest) {
                if let Some(previous) = entry.previous {
                    self.by_digest.remove(&previous);
                }
            }
        }
    }

    /// Replaces the whole content (start-up and resync).
    pub fn replace_all(&self, records: &[KeyRecord], index: &ScopeIndex) {
        let was_empty = self.by_id.is_empty();
        for record in records {
            self.upsert(record, index);
        }
        if !was_empty {
            let live: std::collections::HashSet<(&str, &str)> = records
                .iter()
                .map(|r| (r.project.as_str(), r.id.as_str()))
                .collect();
            let stale: Vec<KeyRef> = self
                .by_id
                .iter()
                .filter(|e| !live.contains(&(&*e.key().0, &*e.key().1)))
                .map(|e| e.key().clone())
                .collect();
            for (project, id) in stale {
                self.remove(&project, &id);
            }
        }
        self.prune();
    }

    /// Compiles every grant's scope set again, after a config reload brought scope names that
    /// keys may hold but could not be compiled before.
    pub fn recompile(&self, index: &ScopeIndex) {
        let fresh: std::collections::HashMap<*const Grant, Arc<Grant>> = self
            .grants
            .iter()
            .map(|entry| {
                let old = entry.value();
                let names: Vec<&str> = old.names.iter().map(|n| &**n).collect();
                let new = Arc::new(Grant {
                    names: old.names.clone(),
                    scopes: index.compile_known(names),
                });
                (Arc::as_ptr(old), new)
            })
            .collect();
        for mut entry in self.by_digest.iter_mut() {
            if let Some(grant) = fresh.get(&Arc::as_ptr(&entry.value().grant)) {
                let updated = entry.value().with_grant(grant.clone());
                *entry.value_mut() = Arc::new(updated);
            }
        }
        for mut entry in self.grants.iter_mut() {
            if let Some(grant) = fresh.get(&Arc::as_ptr(entry.value())) {
                *entry.value_mut() = grant.clone();
            }
        }
    }

    /// Forgets grants no key holds any more.
    fn prune(&self) {
        self.grants.retain(|_, grant| Arc::strong_count(grant) > 1);
    }

    /// Records an SDK name for a key; true when it is new for the key.
    pub fn claim_sdk(&self, key: &CachedKey, sdk: &str) -> bool {
        let id: KeyRef = (key.project.clone(), key.id.clone());
        if self
            .sdks
            .get(&id)
            .is_some_and(|known| known.iter().any(|s| &**s == sdk))
        {
            return false;
        }
        let mut known = self.sdks.entry(id).or_default();
        if known.iter().any(|s| &**s == sdk) {
            return false;
        }
        known.push(sdk.into());
        true
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
        assert_eq!(*key.scopes(), index.compile(["a"]).unwrap());
        assert_eq!(key.expire(), None);

        cache.upsert(&record("k", &second), &index);
        assert!(cache.lookup(&first.digest()).is_none());
        assert!(cache.lookup(&second.digest()).is_some());
        assert_eq!(cache.len(), 1);

        cache.remove("p", "k");
        assert!(cache.lookup(&second.digest()).is_none());
        assert!(cache.is_empty());
    }

    #[test]
    fn keys_share_projects_and_grants() {
        let index = ScopeIndex::default();
        let cache = KeyCache::new();
        let (a, b) = (Secret::generate(), Secret::generate());
        cache.upsert(&record("a", &a), &index);
        cache.upsert(&record("b", &b), &index);
        let (ka, kb) = (
            cache.lookup(&a.digest()).unwrap(),
            cache.lookup(&b.digest()).unwrap(),
        );
        assert!(Arc::ptr_eq(&ka.grant, &kb.grant));
        assert!(Arc::ptr_eq(&ka.project, &kb.project));
    }

    #[test]
    fn rotated_keys_keep_their_previous_secret_with_a_deadline() {
        let index = ScopeIndex::default();
        let cache = KeyCache::new();
        let (old, new, newest) = (Secret::generate(), Secret::generate(), Secret::generate());
        let until = Utc::now();
        let mut rotated = record("k", &new);
        rotated.previous = Some(PreviousSecret {
            digest: old.digest(),
            until,
        });
        cache.upsert(&rotated, &index);
        assert_eq!(
            cache.lookup(&new.digest()).unwrap().secret_valid_until(),
            None
        );
        let previous = cache.lookup(&old.digest()).unwrap();
        assert_eq!(previous.secret_valid_until(), Some(until.timestamp()));
        // An update of the same secret keeps the previous one.
        cache.upsert(&rotated, &index);
        assert!(cache.lookup(&old.digest()).is_some());
        // Rotating again without grace drops both older secrets.
        cache.upsert(&record("k", &newest), &index);
        assert!(cache.lookup(&old.digest()).is_none());
        assert!(cache.lookup(&new.digest()).is_none());
        assert!(cache.lookup(&newest.digest()).is_some());
        // Removing a rotated key removes its previous secret too.
        cache.upsert(&rotated, &index);
        cache.remove("p", "k");
        assert!(cache.lookup(&old.digest()).is_none() && cache.lookup(&new.digest()).is_none());
    }

    #[test]
    fn usage_claims_once_per_interval_and_sdk() {
        let index = ScopeIndex::default();
        let cache = KeyCache::new();
        let secret = Secret::generate();
        cache.upsert(&record("k", &secret), &index);
        let key = cache.lookup(&secret.digest()).unwrap();
        assert!(key.claim_access(100, 60));
        assert!(!key.claim_access(120, 60));
        assert!(key.claim_access(160, 60));
        assert!(cache.claim_sdk(&key, "python"));
        assert!(!cache.claim_sdk(&key, "python"));
        assert!(cache.claim_sdk(&key, "node"));
        // An update keeps what was claimed.
        cache.upsert(&record("k", &secret), &index);
        let key = cache.lookup(&secret.digest()).unwrap();
        assert!(!key.claim_access(170, 60));
        assert!(!cache.claim_sdk(&key, "node"));
    }

    #[test]
    fn recompile_after_the_index_grew() {
        let index = ScopeIndex::default();
        let cache = KeyCache::new();
        let secret = Secret::generate();
        cache.upsert(&record("k", &secret), &index);
        assert!(cache.lookup(&secret.digest()).unwrap().scopes().is_empty());
        let mut grown = ScopeIndex::succeeding(&index);
        grown.register("gone");
        cache.recompile(&grown);
        assert_eq!(
            *cache.lookup(&secret.digest()).unwrap().scopes(),
            grown.compile(["gone"]).unwrap()
        );
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

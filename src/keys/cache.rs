//! The key cache: every live key in memory, keyed by the digest of its secret.
//!
//! Lookups on the request path are one hash of a SHA-256 digest and one shard read lock; the
//! secret itself is never compared. Entries are `Arc`s so a request can keep its key after the
//! shard lock is released (no lock is ever held across an await). A rotated key has two entries,
//! its new secret and its previous one, until the grace period ends.
//!
//! Memory is what bounds the cache (a million keys is a normal size), so:
//! - what keys share is stored once: project names and scope grants (the scope list and its
//!   compiled set) are interned;
//! - an entry is one allocation of 128 bytes with its reference counts (the id inline, see
//!   [`KeyId`]), and the two tables that find it hold nothing but a pointer to it (9 bytes a
//!   slot with hashbrown's control byte), so a table's load factor (as low as 7/16 just after it
//!   doubled) costs little;
//! - the previous secret of a rotated key, which few keys have, lives in a side map.
//!
//! Writers (upserts, removals, resync passes, recompiles) are serialized by one mutex; the
//! request path never takes it.

use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasher, Hash, Hasher, RandomState};
use std::ops::Deref;
use std::sync::atomic::{AtomicI64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};

use dashmap::DashMap;
use hashbrown::HashTable;

use super::scopes::{ScopeIndex, ScopeSet};
use super::{Digest, KeyKind, KeyRateLimit, KeyRecord};

/// "Never", for the expiry fields.
const NEVER: i64 = i64::MAX;
/// Digest table shards: readers of different shards never touch the same lock.
const SHARDS: usize = 64;
/// Ids up to this length are held inline.
const INLINE_ID: usize = 22;

/// A scope list and its compiled set, shared by every key that holds exactly that list.
#[derive(Debug)]
pub struct Grant {
    pub names: Box<[Box<str>]>,
    pub scopes: ScopeSet,
}

/// A key id, inline when it is at most 22 bytes (Appwrite's generated ids are 20), else on the
/// heap (custom ids go up to 36). Derefs to `str`.
#[derive(Clone)]
pub struct KeyId(IdRepr);

#[derive(Clone)]
enum IdRepr {
    Inline { len: u8, bytes: [u8; INLINE_ID] },
    Heap(Box<str>),
}

impl KeyId {
    pub fn new(id: &str) -> KeyId {
        match u8::try_from(id.len()) {
            Ok(len) if id.len() <= INLINE_ID => {
                let mut bytes = [0; INLINE_ID];
                bytes[..id.len()].copy_from_slice(id.as_bytes());
                KeyId(IdRepr::Inline { len, bytes })
            }
            _ => KeyId(IdRepr::Heap(id.into())),
        }
    }

    pub fn as_str(&self) -> &str {
        match &self.0 {
            // Always valid: the bytes were copied whole from a `str`.
            IdRepr::Inline { len, bytes } => {
                std::str::from_utf8(&bytes[..usize::from(*len)]).unwrap_or_default()
            }
            IdRepr::Heap(id) => id,
        }
    }
}

impl Deref for KeyId {
    type Target = str;

    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl PartialEq for KeyId {
    fn eq(&self, other: &KeyId) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for KeyId {}

impl Hash for KeyId {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

/// What the request path needs to know about a key: the entry of one of its secrets.
///
/// `repr(C)` fixes the layout at 112 bytes (128 with the `Arc` counts, one allocator size
/// class), the digest a lookup compares first, on the cache line of the counts it increments.
#[derive(Debug)]
#[repr(C)]
pub struct CachedKey {
    /// The digest of the secret this entry is for.
    digest: Digest,
    /// Interned, and thin (a `String` behind the `Arc`) to keep the entry small.
    pub project: Arc<String>,
    pub grant: Arc<Grant>,
    expire: i64,
    secret_valid_until: i64,
    /// When `accessedAt` was last written (or read from the store), Unix seconds.
    last_access_written: AtomicI64,
    pub id: KeyId,
    /// The key's own abuse limit, on every route.
    pub rate_limit: Option<KeyRateLimit>,
    pub kind: KeyKind,
    /// The resync pass that last found the key in the store (see [`ResyncPass`]).
    seen: AtomicU8,
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

    fn is(&self, project: &str, id: &str) -> bool {
        self.project.as_str() == project && self.id.as_str() == id
    }

    /// A copy for another secret, or with another grant (entries are never changed in place).
    fn copy(&self, digest: Digest, grant: Arc<Grant>, secret_valid_until: i64) -> CachedKey {
        CachedKey {
            id: self.id.clone(),
            project: self.project.clone(),
            kind: self.kind,
            grant,
            rate_limit: self.rate_limit,
            digest,
            expire: self.expire,
            secret_valid_until,
            last_access_written: AtomicI64::new(self.last_access_written.load(Ordering::Relaxed)),
            seen: AtomicU8::new(self.seen.load(Ordering::Relaxed)),
        }
    }
}

/// Digests are uniformly distributed already: their first eight bytes are the hash (an
/// attacker cannot aim collisions without SHA-256 preimages), the ninth picks the shard.
fn digest_hash(digest: &Digest) -> u64 {
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest.0[..8]);
    u64::from_ne_bytes(first)
}

/// One shard of the digest table, on its own cache line.
#[repr(align(64))]
#[derive(Default)]
struct Shard(RwLock<HashTable<Arc<CachedKey>>>);

/// What only writers touch, behind [`KeyCache::writer`].
#[derive(Default)]
struct Index {
    /// (project, id) → the entry of the key's current secret.
    by_id: HashTable<Arc<CachedKey>>,
    /// Keyed (per process) hashing for `by_id`: ids come from clients.
    hasher: RandomState,
    /// A rotated key's current digest → its previous secret's digest.
    previous: HashMap<Digest, Digest>,
    projects: HashMap<Box<str>, Arc<String>>,
    grants: HashMap<Box<str>, Arc<Grant>>,
    /// Stamped on every entry written; a resync pass moves it on.
    epoch: u8,
}

impl Index {
    fn id_hash(&self, project: &str, id: &str) -> u64 {
        self.hasher.hash_one((project, id))
    }

    fn find(&self, project: &str, id: &str) -> Option<&Arc<CachedKey>> {
        self.by_id
            .find(self.id_hash(project, id), |k| k.is(project, id))
    }

    /// Makes `key` the entry of its (project, id); true when the key is new.
    fn put(&mut self, key: Arc<CachedKey>) -> bool {
        let hash = self.id_hash(&key.project, &key.id);
        let hasher = &self.hasher;
        match self.by_id.entry(
            hash,
            |k| k.is(&key.project, &key.id),
            |k| hasher.hash_one((k.project.as_str(), k.id.as_str())),
        ) {
            hashbrown::hash_table::Entry::Occupied(mut slot) => {
                *slot.get_mut() = key;
                false
            }
            hashbrown::hash_table::Entry::Vacant(slot) => {
                slot.insert(key);
                true
            }
        }
    }

    fn take(&mut self, project: &str, id: &str) -> Option<Arc<CachedKey>> {
        let hash = self.id_hash(project, id);
        self.by_id
            .find_entry(hash, |k| k.is(project, id))
            .ok()
            .map(|slot| slot.remove().0)
    }

    fn project(&mut self, name: &str) -> Arc<String> {
        if let Some(shared) = self.projects.get(name) {
            return shared.clone();
        }
        let shared = Arc::new(name.to_owned());
        self.projects.insert(name.into(), shared.clone());
        shared
    }

    fn grant(&mut self, names: &[String], index: &ScopeIndex) -> Arc<Grant> {
        let key = names.join("\n");
        if let Some(shared) = self.grants.get(key.as_str()) {
            return shared.clone();
        }
        let grant = Arc::new(Grant {
            names: names.iter().map(|s| s.as_str().into()).collect(),
            scopes: index.compile_known(names.iter().map(String::as_str)),
        });
        self.grants.insert(key.into_boxed_str(), grant.clone());
        grant
    }

    /// Forgets grants and projects no key holds any more.
    fn prune(&mut self) {
        self.grants.retain(|_, grant| Arc::strong_count(grant) > 1);
        self.projects
            .retain(|_, project| Arc::strong_count(project) > 1);
    }
}

/// Every live key, by digest, plus what is needed to apply changes by key id.
pub struct KeyCache {
    by_digest: Box<[Shard]>,
    writer: Mutex<Index>,
    keys: AtomicUsize,
    /// SDK names seen per key (only keys that have any).
    sdks: DashMap<(Arc<String>, KeyId), Vec<Box<str>>>,
}

impl Default for KeyCache {
    fn default() -> KeyCache {
        KeyCache {
            by_digest: (0..SHARDS).map(|_| Shard::default()).collect(),
            writer: Mutex::default(),
            keys: AtomicUsize::new(0),
            sdks: DashMap::new(),
        }
    }
}

impl KeyCache {
    pub fn new() -> KeyCache {
        KeyCache::default()
    }

    /// A cache with room for `keys` keys (start-up with a large store): its tables never grow
    /// while it fills, which would move every entry again, each time reading it to hash it.
    pub fn with_capacity(keys: usize) -> KeyCache {
        // Digests spread evenly over the shards; 1/16 of slack covers the spread.
        let per_shard = keys / SHARDS + keys / SHARDS / 16;
        KeyCache {
            by_digest: (0..SHARDS)
                .map(|_| Shard(RwLock::new(HashTable::with_capacity(per_shard))))
                .collect(),
            writer: Mutex::new(Index {
                by_id: HashTable::with_capacity(keys),
                ..Index::default()
            }),
            ..KeyCache::default()
        }
    }

    fn shard(&self, digest: &Digest) -> &RwLock<HashTable<Arc<CachedKey>>> {
        &self.by_digest[usize::from(digest.0[8]) % SHARDS].0
    }

    fn write(&self) -> MutexGuard<'_, Index> {
        self.writer.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The key whose secret has this digest.
    #[inline]
    pub fn lookup(&self, digest: &Digest) -> Option<Arc<CachedKey>> {
        let shard = self
            .shard(digest)
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        shard
            .find(digest_hash(digest), |k| k.digest == *digest)
            .cloned()
    }

    /// Makes `key` the entry of its digest, replacing any.
    fn publish(&self, key: Arc<CachedKey>) {
        let mut shard = self
            .shard(&key.digest)
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        match shard.entry(
            digest_hash(&key.digest),
            |k| k.digest == key.digest,
            |k| digest_hash(&k.digest),
        ) {
            hashbrown::hash_table::Entry::Occupied(mut slot) => *slot.get_mut() = key,
            hashbrown::hash_table::Entry::Vacant(slot) => {
                slot.insert(key);
            }
        }
    }

    fn unpublish(&self, digest: &Digest) {
        let mut shard = self
            .shard(digest)
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if let Ok(slot) = shard.find_entry(digest_hash(digest), |k| k.digest == *digest) {
            slot.remove();
        }
    }

    /// Inserts or replaces a key. The new digests are live before old ones are removed, so a
    /// concurrent request never sees the key missing. A key already cached exactly so is left
    /// as it is (only marked as seen by a resync pass in progress).
    pub fn upsert(&self, record: &KeyRecord, index: &ScopeIndex) {
        let mut ix = self.write();
        let epoch = ix.epoch;
        let old = ix.find(&record.project, &record.id).cloned();
        let old_previous = old
            .as_ref()
            .and_then(|k| ix.previous.get(&k.digest).copied());
        let grant = ix.grant(&record.scopes, index);
        let expire = record.expire.map_or(NEVER, |e| e.timestamp());

        if !record.sdks.is_empty() {
            let key = (ix.project(&record.project), KeyId::new(&record.id));
            if !self.sdks.contains_key(&key) {
                let names = record.sdks.iter().map(|s| s.as_str().into()).collect();
                self.sdks.insert(key, names);
            }
        }
        if let Some(old) = &old {
            let same_previous = match &record.previous {
                None => old_previous.is_none(),
                Some(p) => {
                    old_previous == Some(p.digest)
                        && self
                            .lookup(&p.digest)
                            .is_some_and(|k| k.secret_valid_until == p.until.timestamp())
                }
            };
            if same_previous
                && old.digest == record.digest
                && old.kind == record.kind
                && old.expire == expire
                && old.rate_limit == record.rate_limit
                && Arc::ptr_eq(&old.grant, &grant)
            {
                old.seen.store(epoch, Ordering::Relaxed);
                return;
            }
        }

        let last_access = match &old {
            Some(k) => k.last_access_written.load(Ordering::Relaxed),
            None => record.accessed_at.map_or(0, |a| a.timestamp()),
        };
        let current = Arc::new(CachedKey {
            id: old
                .as_ref()
                .map_or_else(|| KeyId::new(&record.id), |k| k.id.clone()),
            project: ix.project(&record.project),
            kind: record.kind,
            grant,
            rate_limit: record.rate_limit,
            digest: record.digest,
            expire,
            secret_valid_until: NEVER,
            last_access_written: AtomicI64::new(last_access),
            seen: AtomicU8::new(epoch),
        });
        if let Some(previous) = &record.previous {
            let entry = current.copy(
                previous.digest,
                current.grant.clone(),
                previous.until.timestamp(),
            );
            self.publish(Arc::new(entry));
        }
        self.publish(current.clone());
        if ix.put(current) {
            self.keys.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(old) = &old {
            ix.previous.remove(&old.digest);
        }
        if let Some(previous) = &record.previous {
            ix.previous.insert(record.digest, previous.digest);
        }

        // Secrets of the old version that the new one no longer has.
        let keep =
            |d: &Digest| *d == record.digest || record.previous.is_some_and(|p| p.digest == *d);
        for digest in [old.map(|k| k.digest), old_previous].into_iter().flatten() {
            if !keep(&digest) {
                self.unpublish(&digest);
            }
        }
    }

    /// Removes a key; a no-op when it is not cached.
    pub fn remove(&self, project: &str, id: &str) {
        let mut ix = self.write();
        self.remove_locked(&mut ix, project, id);
    }

    fn remove_locked(&self, ix: &mut Index, project: &str, id: &str) {
        let Some(key) = ix.take(project, id) else {
            return;
        };
        self.keys.fetch_sub(1, Ordering::Relaxed);
        self.sdks.remove(&(key.project.clone(), key.id.clone()));
        self.unpublish(&key.digest);
        if let Some(previous) = ix.previous.remove(&key.digest) {
            self.unpublish(&previous);
        }
    }

    /// Starts a resync: upsert every key the store has, then [`ResyncPass::finish`] removes the
    /// keys that were not upserted since the pass began. One pass at a time.
    pub fn begin_resync(&self) -> ResyncPass<'_> {
        let mut ix = self.write();
        ix.epoch = ix.epoch.wrapping_add(1);
        ResyncPass {
            cache: self,
            epoch: ix.epoch,
            finished: false,
        }
    }

    /// Replaces the whole content with `records` (a resync from a list).
    pub fn replace_all(&self, records: &[KeyRecord], index: &ScopeIndex) {
        let pass = self.begin_resync();
        for record in records {
            self.upsert(record, index);
        }
        pass.finish();
    }

    /// Compiles every grant's scope set again, after a config reload brought scope names that
    /// keys may hold but could not be compiled before.
    pub fn recompile(&self, index: &ScopeIndex) {
        let mut ix = self.write();
        let mut fresh: HashMap<*const Grant, Arc<Grant>> = HashMap::new();
        for grant in ix.grants.values_mut() {
            let names: Vec<&str> = grant.names.iter().map(|n| &**n).collect();
            let new = Arc::new(Grant {
                names: grant.names.clone(),
                scopes: index.compile_known(names),
            });
            fresh.insert(Arc::as_ptr(grant), new.clone());
            *grant = new;
        }
        let regrant = |key: &CachedKey| {
            let grant = fresh.get(&Arc::as_ptr(&key.grant))?;
            Some(Arc::new(key.copy(
                key.digest,
                grant.clone(),
                key.secret_valid_until,
            )))
        };
        // Key by key, so old and new entries never all exist at once.
        let Index {
            by_id, previous, ..
        } = &mut *ix;
        for digest in previous.values() {
            if let Some(key) = self.lookup(digest).and_then(|k| regrant(&k)) {
                self.publish(key);
            }
        }
        for slot in by_id.iter_mut() {
            if let Some(key) = regrant(slot) {
                self.publish(key.clone());
                *slot = key;
            }
        }
    }

    /// Records an SDK name for a key; true when it is new for the key.
    pub fn claim_sdk(&self, key: &CachedKey, sdk: &str) -> bool {
        let id = (key.project.clone(), key.id.clone());
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
        self.keys.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A resync in progress (see [`KeyCache::begin_resync`]). Dropped without [`finish`], e.g.
/// because reading the store failed, it removes nothing.
///
/// [`finish`]: ResyncPass::finish
#[must_use = "a resync pass removes stale keys only when finished"]
pub struct ResyncPass<'c> {
    cache: &'c KeyCache,
    epoch: u8,
    finished: bool,
}

impl ResyncPass<'_> {
    /// Removes every key not upserted since the pass began; returns how many. A pass overtaken
    /// by a newer one removes nothing.
    pub fn finish(mut self) -> usize {
        self.finished = true;
        let cache = self.cache;
        let mut ix = cache.write();
        if ix.epoch != self.epoch {
            return 0;
        }
        let stale: Vec<Arc<CachedKey>> = ix
            .by_id
            .iter()
            .filter(|k| k.seen.load(Ordering::Relaxed) != self.epoch)
            .cloned()
            .collect();
        for key in &stale {
            cache.remove_locked(&mut ix, &key.project, &key.id);
        }
        ix.prune();
        stale.len()
    }
}

impl Drop for ResyncPass<'_> {
    /// An unfinished pass counts every key as seen, so that after any pass all entries carry the
    /// current epoch and a later pass can never mistake an old stamp for its own.
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let ix = self.cache.write();
        for key in ix.by_id.iter() {
            key.seen.store(ix.epoch, Ordering::Relaxed);
        }
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
        cache.remove("p", "k");
        assert!(cache.is_empty());
    }

    #[test]
    fn upsert_applies_every_field() {
        let index = ScopeIndex::default();
        let cache = KeyCache::new();
        let secret = Secret::generate();
        cache.upsert(&record("k", &secret), &index);
        let mut changed = record("k", &secret);
        changed.kind = KeyKind::Dev;
        changed.expire = Some(Utc::now());
        changed.rate_limit = Some(KeyRateLimit {
            limit: 5,
            window_secs: 60,
        });
        changed.scopes = vec!["b".into()];
        cache.upsert(&changed, &index);
        let key = cache.lookup(&secret.digest()).unwrap();
        assert_eq!(key.kind, KeyKind::Dev);
        assert_eq!(key.expire(), changed.expire.map(|e| e.timestamp()));
        assert_eq!(key.rate_limit, changed.rate_limit);
        assert_eq!(&*key.grant.names, &["b".into()] as &[Box<str>]);
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn ids_of_any_length() {
        let index = ScopeIndex::default();
        let cache = KeyCache::new();
        for id in [
            "a",
            "0123456789abcdef01234",
            "0123456789abcdef012345",
            "x".repeat(36).as_str(),
        ] {
            let secret = Secret::generate();
            cache.upsert(&record(id, &secret), &index);
            let key = cache.lookup(&secret.digest()).unwrap();
            assert_eq!(&*key.id, id);
            assert_eq!(key.id.to_string(), id);
            assert_eq!(KeyId::new(id), key.id);
        }
        assert_eq!(cache.len(), 4);
        cache.remove("p", &"x".repeat(36));
        assert_eq!(cache.len(), 3);
    }

    #[test]
    fn an_entry_is_one_small_allocation() {
        // 112 bytes + the two reference counts = 128, one allocator size class.
        assert!(std::mem::size_of::<CachedKey>() <= 112);
        assert_eq!(std::mem::size_of::<KeyId>(), 24);
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
    fn an_unchanged_upsert_keeps_the_entry() {
        let index = ScopeIndex::default();
        let cache = KeyCache::new();
        let secret = Secret::generate();
        cache.upsert(&record("k", &secret), &index);
        let before = cache.lookup(&secret.digest()).unwrap();
        cache.upsert(&record("k", &secret), &index);
        assert!(Arc::ptr_eq(
            &before,
            &cache.lookup(&secret.digest()).unwrap()
        ));
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
        assert_eq!(&*previous.id, "k");
        // An update of the same secret keeps the previous one.
        cache.upsert(&rotated, &index);
        assert!(cache.lookup(&old.digest()).is_some());
        // A new deadline for the same previous secret is applied.
        let mut extended = rotated.clone();
        extended.previous = Some(PreviousSecret {
            digest: old.digest(),
            until: until + chrono::Duration::hours(1),
        });
        cache.upsert(&extended, &index);
        assert_eq!(
            cache.lookup(&old.digest()).unwrap().secret_valid_until(),
            Some(until.timestamp() + 3600)
        );
        // Rotating again without grace drops both older secrets.
        cache.upsert(&record("k", &newest), &index);
        assert!(cache.lookup(&old.digest()).is_none());
        assert!(cache.lookup(&new.digest()).is_none());
        assert!(cache.lookup(&newest.digest()).is_some());
        assert_eq!(cache.len(), 1);
        // Rotating with grace keeps exactly the secret just replaced.
        let mut again = record("k", &new);
        again.previous = Some(PreviousSecret {
            digest: newest.digest(),
            until,
        });
        cache.upsert(&again, &index);
        assert!(cache.lookup(&newest.digest()).is_some() && cache.lookup(&new.digest()).is_some());
        // Removing a rotated key removes its previous secret too.
        cache.remove("p", "k");
        assert!(cache.lookup(&newest.digest()).is_none() && cache.lookup(&new.digest()).is_none());
        assert!(cache.is_empty());
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
        let mut renamed = record("k", &secret);
        renamed.scopes = vec!["b".into()];
        cache.upsert(&renamed, &index);
        let key = cache.lookup(&secret.digest()).unwrap();
        assert_eq!(&*key.grant.names, &["b".into()] as &[Box<str>]);
        assert!(!key.claim_access(170, 60));
        assert!(!cache.claim_sdk(&key, "node"));
        // SDK names read from the store are known.
        let mut stored = record("s", &Secret::generate());
        stored.sdks = vec!["go".into()];
        cache.upsert(&stored, &index);
        let key = cache.lookup(&stored.digest).unwrap();
        assert!(!cache.claim_sdk(&key, "go"));
    }

    #[test]
    fn recompile_after_the_index_grew() {
        let index = ScopeIndex::default();
        let cache = KeyCache::new();
        let (secret, old) = (Secret::generate(), Secret::generate());
        let mut rotated = record("k", &secret);
        rotated.previous = Some(PreviousSecret {
            digest: old.digest(),
            until: Utc::now(),
        });
        cache.upsert(&rotated, &index);
        assert!(cache.lookup(&secret.digest()).unwrap().scopes().is_empty());
        let mut grown = ScopeIndex::succeeding(&index);
        grown.register("gone");
        cache.recompile(&grown);
        let expected = grown.compile(["gone"]).unwrap();
        assert_eq!(*cache.lookup(&secret.digest()).unwrap().scopes(), expected);
        assert_eq!(*cache.lookup(&old.digest()).unwrap().scopes(), expected);
        // Keys upserted afterwards share the recompiled grant.
        let other = Secret::generate();
        cache.upsert(&record("o", &other), &grown);
        assert_eq!(*cache.lookup(&other.digest()).unwrap().scopes(), expected);
        // And an unchanged upsert after the recompile is still recognized as unchanged.
        let before = cache.lookup(&secret.digest()).unwrap();
        cache.upsert(&rotated, &grown);
        assert!(Arc::ptr_eq(
            &before,
            &cache.lookup(&secret.digest()).unwrap()
        ));
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
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn a_resync_pass_sweeps_keys_it_did_not_see() {
        let index = ScopeIndex::default();
        let cache = KeyCache::new();
        let (a, b, c, old_c) = (
            Secret::generate(),
            Secret::generate(),
            Secret::generate(),
            Secret::generate(),
        );
        let mut rotated = record("c", &c);
        rotated.previous = Some(PreviousSecret {
            digest: old_c.digest(),
            until: Utc::now(),
        });
        for r in [record("a", &a), record("b", &b), rotated.clone()] {
            cache.upsert(&r, &index);
        }

        let pass = cache.begin_resync();
        // The store still has `a`; `c` was written (by an admin call, say) during the pass.
        cache.upsert(&record("a", &a), &index);
        cache.upsert(&rotated, &index);
        assert_eq!(pass.finish(), 1);
        assert!(cache.lookup(&a.digest()).is_some());
        assert!(cache.lookup(&b.digest()).is_none());
        assert!(cache.lookup(&c.digest()).is_some() && cache.lookup(&old_c.digest()).is_some());
        assert_eq!(cache.len(), 2);

        // A pass dropped unfinished (the store failed) removes nothing, then the next one sweeps.
        drop(cache.begin_resync());
        assert_eq!(cache.len(), 2);
        let pass = cache.begin_resync();
        cache.upsert(&record("a", &a), &index);
        assert_eq!(pass.finish(), 1);
        assert!(cache.lookup(&c.digest()).is_none() && cache.lookup(&old_c.digest()).is_none());
        assert_eq!(cache.len(), 1);

        // A pass overtaken by a newer one removes nothing.
        let first = cache.begin_resync();
        let second = cache.begin_resync();
        assert_eq!(first.finish(), 0);
        assert_eq!(second.finish(), 1);
        assert!(cache.is_empty());
    }

    #[test]
    fn many_passes_never_confuse_old_stamps() {
        let index = ScopeIndex::default();
        let cache = KeyCache::new();
        let (a, b) = (Secret::generate(), Secret::generate());
        cache.upsert(&record("a", &a), &index);
        cache.upsert(&record("b", &b), &index);
        // More failed passes than the epoch has values, then one that only sees `a`.
        for _ in 0..300 {
            drop(cache.begin_resync());
        }
        let pass = cache.begin_resync();
        cache.upsert(&record("a", &a), &index);
        assert_eq!(pass.finish(), 1);
        assert!(cache.lookup(&b.digest()).is_none());
    }
}

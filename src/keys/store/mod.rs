//! The durable key store behind the cache: a trait the gateway programs against, and its
//! implementations. A write returns only once it is durable, and is recorded in the audit log in
//! the same transaction.
//!
//! Every key write also appends to a change feed, which is how processes that did not make the
//! change (the CLI beside a running server, other gateway nodes) learn of it.

mod postgres;
mod sqlite;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::Serialize;

pub use postgres::PostgresStore;
pub use sqlite::SqliteStore;

use super::{Digest, KeyKind, KeyRateLimit, KeyRecord};
use crate::config::StoreUrl;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("a key with this id already exists")]
    AlreadyExists,
    #[error("a key with this secret already exists")]
    DuplicateSecret,
    #[error("key not found")]
    NotFound,
    #[error("the key store is unavailable: {0}")]
    Unavailable(String),
}

/// A key to create. The secret is already reduced to its digest.
#[derive(Debug, Clone)]
pub struct NewKey {
    pub id: String,
    pub project: String,
    pub kind: KeyKind,
    pub name: String,
    pub description: String,
    pub scopes: Vec<String>,
    pub expire: Option<DateTime<Utc>>,
    pub digest: Digest,
    pub rate_limit: Option<KeyRateLimit>,
}

/// A full replacement of a key's editable fields (Appwrite's PUT semantics).
#[derive(Debug, Clone)]
pub struct KeyUpdate {
    pub name: String,
    pub description: String,
    pub scopes: Vec<String>,
    pub expire: Option<DateTime<Utc>>,
    pub rate_limit: Option<KeyRateLimit>,
}

/// A new secret for an existing key; the old one stays valid until `grace_until`, if given.
#[derive(Debug, Clone)]
pub struct Rotation {
    pub digest: Digest,
    pub grace_until: Option<DateTime<Utc>>,
}

/// Usage seen on the request path, written behind it in batches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Usage {
    pub project: String,
    pub id: String,
    pub accessed_at: Option<DateTime<Utc>>,
    pub sdks: Vec<String>,
}

impl Usage {
    /// This usage over what a key already records: the latest `accessedAt` and the union of SDK
    /// names (known ones first). Idempotent, so a batch may be written twice.
    pub fn merged_over(
        &self,
        accessed_at: Option<DateTime<Utc>>,
        sdks: &[String],
    ) -> (Option<DateTime<Utc>>, Vec<String>) {
        let mut merged = sdks.to_vec();
        for sdk in &self.sdks {
            if !merged.contains(sdk) {
                merged.push(sdk.clone());
            }
        }
        (accessed_at.max(self.accessed_at), merged)
    }
}

/// Who made a change: `cli`, a key id, or `ephemeral`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Actor<'a>(pub &'a str);

impl Actor<'static> {
    pub const CLI: Actor<'static> = Actor("cli");
}

/// One recorded change to a key. Never holds a secret or a digest.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AuditEvent {
    pub seq: i64,
    pub at: String,
    pub actor: String,
    pub project: String,
    #[serde(rename = "keyId")]
    pub key_id: String,
    pub kind: String,
    pub action: String,
    pub changes: serde_json::Value,
}

/// A key that changed; read it again to learn how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub project: String,
    pub id: String,
}

/// A position in the change feed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Cursor(pub i64);

/// What a streaming load hands each key to.
pub type KeySink<'a> = dyn FnMut(KeyRecord) + Send + 'a;

#[async_trait]
pub trait KeyStore: Send + Sync + 'static {
    async fn create(&self, key: NewKey, actor: Actor<'_>) -> Result<KeyRecord, StoreError>;
    async fn get(&self, project: &str, id: &str) -> Result<Option<KeyRecord>, StoreError>;
    /// A project's keys of one kind, oldest first.
    async fn list(&self, project: &str, kind: KeyKind) -> Result<Vec<KeyRecord>, StoreError>;
    async fn update(
        &self,
        project: &str,
        id: &str,
        update: KeyUpdate,
        actor: Actor<'_>,
    ) -> Result<KeyRecord, StoreError>;
    async fn rotate(
        &self,
        project: &str,
        id: &str,
        rotation: Rotation,
        actor: Actor<'_>,
    ) -> Result<KeyRecord, StoreError>;
    async fn delete(&self, project: &str, id: &str, actor: Actor<'_>) -> Result<(), StoreError>;
    /// Merges usage into the keys (latest `accessedAt`, union of `sdks`); unknown keys are
    /// skipped. Not a change: it reaches no change feed and no audit log.
    async fn record_usage(&self, usage: &[Usage]) -> Result<(), StoreError>;
    /// The audit log, oldest first, optionally for one key id.
    async fn audit(&self, key_id: Option<&str>) -> Result<Vec<AuditEvent>, StoreError>;
    /// How many keys the store holds (API keys and dev keys), to size the cache for a load.
    async fn count(&self) -> Result<usize, StoreError>;
    /// Every key, handed to `sink` one at a time as it is read (never all in memory at once),
    /// and the feed position they reflect: every change after the returned cursor may be missing
    /// from what was loaded, none before it. On an error `sink` may have seen part of the keys.
    async fn load_each(&self, sink: &mut KeySink<'_>) -> Result<Cursor, StoreError>;
    /// Every key in one list, and the feed position they reflect ([`KeyStore::load_each`]
    /// collected; for callers that need them all at once, such as a migration).
    async fn load_all(&self) -> Result<(Vec<KeyRecord>, Cursor), StoreError> {
        let mut records = Vec::new();
        let cursor = self.load_each(&mut |record| records.push(record)).await?;
        Ok((records, cursor))
    }
    /// Changes after `cursor`, oldest first, and the position after the last one.
    async fn changes_since(&self, cursor: Cursor) -> Result<(Vec<Change>, Cursor), StoreError>;
    /// True when the feed lost track of changes after `cursor` (notifications missed while a
    /// listener was down, or a queue that overflowed): `changes_since` would then report every
    /// key at once, so a caller that holds every key (the gateway's cache) streams them all
    /// again instead ([`KeyStore::load_each`]). Stores whose feed never loses track say false.
    fn feed_lost_since(&self, _cursor: Cursor) -> bool {
        false
    }
    /// Cheap liveness check.
    async fn ping(&self) -> Result<(), StoreError>;
    /// Inserts a record exactly as given (digests, previous secret, timestamps, usage), for a
    /// migration between stores. False, and nothing written, when a key with this project and id
    /// already exists. It is a change: it reaches the change feed, and the audit log with the
    /// actor `migrate` and the action `import`.
    async fn import_record(&self, record: &KeyRecord) -> Result<bool, StoreError>;
    /// Appends audit events from another store (new `seq` numbers, everything else kept),
    /// skipping those already present: an event is present when the log already holds as many
    /// events equal to it in everything but `seq` (see [`audit_identity`]) as `events` holds up
    /// to and including it. Returns how many were appended. Not a change.
    async fn import_audit(&self, events: &[AuditEvent]) -> Result<usize, StoreError>;
}

/// Opens the store a config names.
pub async fn open(url: &StoreUrl) -> Result<std::sync::Arc<dyn KeyStore>, StoreError> {
    match url {
        StoreUrl::Sqlite(path) => Ok(std::sync::Arc::new(SqliteStore::open(path).await?)),
        StoreUrl::Postgres(url) => Ok(std::sync::Arc::new(PostgresStore::open(url).await?)),
    }
}

/// What makes two audit events the same event, whatever store numbered them: every field but
/// `seq`, with `changes` in a canonical form (object keys sorted).
pub fn audit_identity(event: &AuditEvent) -> String {
    fn canonical(value: &serde_json::Value) -> serde_json::Value {
        match value {
            serde_json::Value::Object(map) => {
                let mut entries: Vec<_> = map.iter().collect();
                entries.sort_by(|a, b| a.0.cmp(b.0));
                serde_json::Value::Object(
                    entries
                        .into_iter()
                        .map(|(k, v)| (k.clone(), canonical(v)))
                        .collect(),
                )
            }
            serde_json::Value::Array(items) => {
                serde_json::Value::Array(items.iter().map(canonical).collect())
            }
            other => other.clone(),
        }
    }
    serde_json::json!([
        event.at,
        event.actor,
        event.project,
        event.key_id,
        event.kind,
        event.action,
        canonical(&event.changes),
    ])
    .to_string()
}

/// The events of `incoming` to append to a log that already holds `existing` (a count per
/// [`audit_identity`]), in order: a multiset difference, so repeated identical events survive.
pub(crate) fn audit_missing(
    mut existing: std::collections::HashMap<String, usize>,
    incoming: &[AuditEvent],
) -> Vec<&AuditEvent> {
    let mut missing = Vec::new();
    for event in incoming {
        match existing.get_mut(&audit_identity(event)) {
            Some(count) if *count > 0 => *count -= 1,
            _ => missing.push(event),
        }
    }
    missing
}

/// An audit event's `at` (as [`super::format_date`] wrote it) back to a time.
pub(crate) fn audit_time(event: &AuditEvent) -> Result<DateTime<Utc>, StoreError> {
    DateTime::parse_from_rfc3339(&event.at)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| {
            StoreError::Unavailable(format!(
                "audit event {} has an unreadable time {:?}: {e}",
                event.seq, event.at
            ))
        })
}

/// What changed between two versions of a key, for the audit log: `{field: [old, new]}`.
pub(crate) fn diff(before: &KeyRecord, after: &KeyRecord) -> serde_json::Value {
    let mut changes = serde_json::Map::new();
    let mut field = |name: &str, old: serde_json::Value, new: serde_json::Value| {
        if old != new {
            changes.insert(name.to_owned(), serde_json::json!([old, new]));
        }
    };
    field(
        "name",
        before.name.clone().into(),
        after.name.clone().into(),
    );
    field(
        "description",
        before.description.clone().into(),
        after.description.clone().into(),
    );
    field(
        "scopes",
        before.scopes.clone().into(),
        after.scopes.clone().into(),
    );
    field(
        "expire",
        before.expire.as_ref().map(super::format_date).into(),
        after.expire.as_ref().map(super::format_date).into(),
    );
    field(
        "rateLimit",
        serde_json::to_value(before.rate_limit).unwrap_or_default(),
        serde_json::to_value(after.rate_limit).unwrap_or_default(),
    );
    serde_json::Value::Object(changes)
}

/// The audit description of a key as created or deleted.
pub(crate) fn summary(record: &KeyRecord) -> serde_json::Value {
    serde_json::json!({
        "name": record.name,
        "description": record.description,
        "scopes": record.scopes,
        "expire": record.expire.as_ref().map(super::format_date),
        "rateLimit": record.rate_limit,
    })
}

//! The durable key store behind the cache: a trait the gateway programs against, and its
//! implementations. A write returns only once it is durable.
//!
//! Every write also appends to a change feed, which is how processes that did not make the
//! change (the CLI beside a running server, other gateway nodes) learn of it.

mod sqlite;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

pub use sqlite::SqliteStore;

use super::{Digest, KeyRecord};
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
    pub name: String,
    pub description: String,
    pub scopes: Vec<String>,
    pub expire: Option<DateTime<Utc>>,
    pub digest: Digest,
}

/// A full replacement of a key's editable fields (Appwrite's PUT semantics).
#[derive(Debug, Clone)]
pub struct KeyUpdate {
    pub name: String,
    pub description: String,
    pub scopes: Vec<String>,
    pub expire: Option<DateTime<Utc>>,
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

#[async_trait]
pub trait KeyStore: Send + Sync + 'static {
    async fn create(&self, key: NewKey) -> Result<KeyRecord, StoreError>;
    async fn get(&self, project: &str, id: &str) -> Result<Option<KeyRecord>, StoreError>;
    async fn list(&self, project: &str) -> Result<Vec<KeyRecord>, StoreError>;
    async fn update(
        &self,
        project: &str,
        id: &str,
        update: KeyUpdate,
    ) -> Result<KeyRecord, StoreError>;
    async fn delete(&self, project: &str, id: &str) -> Result<(), StoreError>;
    /// Every key, and the feed position they reflect.
    async fn load_all(&self) -> Result<(Vec<KeyRecord>, Cursor), StoreError>;
    /// Changes after `cursor`, oldest first, and the position after the last one.
    async fn changes_since(&self, cursor: Cursor) -> Result<(Vec<Change>, Cursor), StoreError>;
    /// Cheap liveness check.
    async fn ping(&self) -> Result<(), StoreError>;
}

/// Opens the store a config names.
pub async fn open(url: &StoreUrl) -> Result<std::sync::Arc<dyn KeyStore>, StoreError> {
    match url {
        StoreUrl::Sqlite(path) => Ok(std::sync::Arc::new(SqliteStore::open(path).await?)),
    }
}

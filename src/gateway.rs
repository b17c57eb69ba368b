//! The running gateway's shared state: the current config snapshot, the key cache and the store,
//! and the change feed that keeps the cache current.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::Mutex;

use crate::config::Snapshot;
use crate::keys::cache::KeyCache;
use crate::keys::store::{self, Cursor, KeyStore, StoreError};
use crate::keys::usage::UsageRecorder;

/// How often the change feed is polled. Changes made by another process are live within this
/// interval plus one store round trip (well under the promised second).
pub const SYNC_INTERVAL: Duration = Duration::from_millis(200);

pub struct Gateway {
    config: ArcSwap<Snapshot>,
    keys: KeyCache,
    store: Arc<dyn KeyStore>,
    usage: UsageRecorder,
    cursor: Mutex<Cursor>,
}

impl Gateway {
    /// Opens the store the config names and loads every key into the cache.
    pub async fn start(snapshot: Snapshot) -> Result<Arc<Gateway>, StoreError> {
        let store = store::open(&snapshot.store).await?;
        Self::with_store(snapshot, store).await
    }

    pub async fn with_store(
        snapshot: Snapshot,
        store: Arc<dyn KeyStore>,
    ) -> Result<Arc<Gateway>, StoreError> {
        let (records, cursor) = store.load_all().await?;
        let keys = KeyCache::new();
        keys.replace_all(&records, &snapshot.scopes);
        tracing::info!(keys = keys.len(), "key cache loaded");
        Ok(Arc::new(Gateway {
            config: ArcSwap::from_pointee(snapshot),
            keys,
            usage: UsageRecorder::spawn(store.clone()),
            store,
            cursor: Mutex::new(cursor),
        }))
    }

    /// The current config. Load once per request and keep the `Arc` for its whole life.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.config.load_full()
    }

    pub fn keys(&self) -> &KeyCache {
        &self.keys
    }

    pub fn usage(&self) -> &UsageRecorder {
        &self.usage
    }

    pub fn store(&self) -> &Arc<dyn KeyStore> {
        &self.store
    }

    /// Applies every change recorded since the last call; returns how many were applied.
    pub async fn sync_once(&self) -> Result<usize, StoreError> {
        let mut cursor = self.cursor.lock().await;
        let (changes, next) = self.store.changes_since(*cursor).await?;
        if changes.is_empty() {
            return Ok(0);
        }
        let snapshot = self.snapshot();
        for change in &changes {
            match self.store.get(&change.project, &change.id).await? {
                Some(record) => self.keys.upsert(&record, &snapshot.scopes),
                None => self.keys.remove(&change.project, &change.id),
            }
        }
        *cursor = next;
        Ok(changes.len())
    }

    /// Polls the change feed until the returned task is aborted. A failing store is logged and
    /// retried; the cache keeps serving what it has.
    pub fn spawn_sync(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let gateway = Arc::clone(self);
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(SYNC_INTERVAL);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut failing = false;
            loop {
                ticker.tick().await;
                match gateway.sync_once().await {
                    Ok(applied) => {
                        if failing {
                            tracing::info!("key store reachable again");
                            failing = false;
                        }
                        if applied > 0 {
                            tracing::debug!(
                                applied,
                                keys = gateway.keys.len(),
                                "key changes applied"
                            );
                        }
                    }
                    Err(err) if !failing => {
                        tracing::error!(error = %err, "key change feed failed; serving from cache");
                        failing = true;
                    }
                    Err(_) => {}
                }
            }
        })
    }
}

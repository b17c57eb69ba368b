//! The running gateway's shared state: the current config snapshot, the key cache and the store,
//! and the change feed that keeps the cache current.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::Mutex;

use crate::config::Snapshot;
use crate::keys::cache::KeyCache;
use crate::keys::store::{self, Cursor, KeyStore, StoreError};
use crate::keys::usage::UsageRecorder;
use crate::limits::counter::Counters;

/// How often the change feed is polled. Changes made by another process are live within this
/// interval plus one store round trip (well under the promised second).
pub const SYNC_INTERVAL: Duration = Duration::from_millis(200);

/// Where the gateway reads the time: the system clock, or one a test sets.
#[derive(Debug, Clone, Default)]
pub enum Clock {
    #[default]
    System,
    Manual(Arc<AtomicI64>),
}

impl Clock {
    /// Unix seconds.
    pub fn now(&self) -> i64 {
        match self {
            Clock::System => chrono::Utc::now().timestamp(),
            Clock::Manual(now) => now.load(Ordering::Relaxed),
        }
    }
}

pub struct Gateway {
    config: ArcSwap<Snapshot>,
    clock: Clock,
    limits: Counters,
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
        Self::with_store_and_clock(snapshot, store, Clock::System).await
    }

    pub async fn with_store_and_clock(
        snapshot: Snapshot,
        store: Arc<dyn KeyStore>,
        clock: Clock,
    ) -> Result<Arc<Gateway>, StoreError> {
        let (records, cursor) = store.load_all().await?;
        let keys = KeyCache::new();
        keys.replace_all(&records, &snapshot.scopes);
        tracing::info!(keys = keys.len(), "key cache loaded");
        crate::metrics::install();
        metrics::gauge!(crate::metrics::KEY_CACHE_KEYS).set(keys.len() as f64);
        Ok(Arc::new(Gateway {
            limits: Counters::new(&snapshot.rate_limits),
            clock,
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

    /// Now, in Unix seconds, by the gateway's clock.
    pub fn now(&self) -> i64 {
        self.clock.now()
    }

    pub fn limits(&self) -> &Counters {
        &self.limits
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
        metrics::gauge!(crate::metrics::KEY_CACHE_KEYS).set(self.keys.len() as f64);
        Ok(changes.len())
    }

    /// Reloads every key from the store and replaces the cache's content: catches any change a
    /// feed may have missed (a notification lost while a connection was down).
    pub async fn resync(&self) -> Result<usize, StoreError> {
        let mut cursor = self.cursor.lock().await;
        let (records, next) = self.store.load_all().await?;
        self.keys.replace_all(&records, &self.snapshot().scopes);
        *cursor = next;
        metrics::gauge!(crate::metrics::KEY_CACHE_KEYS).set(self.keys.len() as f64);
        Ok(records.len())
    }

    /// Polls the change feed until the returned task is aborted. A failing store is logged and
    /// retried; the cache keeps serving what it has.
    pub fn spawn_sync(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let gateway = Arc::clone(self);
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(SYNC_INTERVAL);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut failing = false;
            let mut ticks: u64 = 0;
            let mut last_resync = tokio::time::Instant::now();
            loop {
                ticker.tick().await;
                ticks += 1;
                if let Some(every) = gateway.snapshot().store_resync {
                    if last_resync.elapsed() >= every {
                        last_resync = tokio::time::Instant::now();
                        match gateway.resync().await {
                            Ok(keys) => tracing::debug!(keys, "key cache resynced"),
                            Err(err) => tracing::warn!(error = %err, "key cache resync failed"),
                        }
                    }
                }
                // About once a minute, drop local abuse-limit counters of ended windows.
                if ticks % 300 == 0 {
                    let longest = gateway
                        .snapshot()
                        .routes
                        .routes()
                        .iter()
                        .filter_map(|r| r.rate_limit.as_ref())
                        .map(|l| l.window.as_secs())
                        .max()
                        .unwrap_or(0)
                        .max(crate::admin::handler::KEY_RATE_WINDOW_MAX.into());
                    gateway
                        .limits
                        .sweep(gateway.now(), i64::try_from(longest).unwrap_or(i64::MAX));
                }
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

//! The running gateway's shared state: the current config snapshot, the key cache and the store,
//! and the change feed that keeps the cache current.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use std::path::PathBuf;

use tokio::sync::{watch, Mutex};

use crate::config::{ConfigError, Snapshot};
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
    /// Bumped on every applied reload; listeners and tests wait on it.
    generation: watch::Sender<u64>,
    reload_lock: Mutex<()>,
    clock: Clock,
    limits: ArcSwap<Counters>,
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
        // Streamed: each key goes into the cache as it is read, never all of them into a list.
        let keys = KeyCache::with_capacity(store.count().await?);
        let scopes = &snapshot.scopes;
        let cursor = store
            .load_each(&mut |record| keys.upsert(&record, scopes))
            .await?;
        tracing::info!(keys = keys.len(), "key cache loaded");
        crate::metrics::install();
        metrics::gauge!(crate::metrics::KEY_CACHE_KEYS).set(keys.len() as f64);
        metrics::gauge!(crate::metrics::CONFIG_GENERATION).set(1.0);
        Ok(Arc::new(Gateway {
            generation: watch::Sender::new(1),
            reload_lock: Mutex::new(()),
            limits: ArcSwap::from_pointee(Counters::new(&snapshot.rate_limits)),
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

    /// The abuse-limit counters (replaced when a reload changes their backend).
    pub fn limits(&self) -> Arc<Counters> {
        self.limits.load_full()
    }

    /// The config generation now serving (1 at start, +1 per applied reload).
    pub fn generation(&self) -> u64 {
        *self.generation.borrow()
    }

    /// Notified of every applied reload.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Reads the config again and, if it is valid, swaps it in: requests in flight finish on the
    /// snapshot they started with, new requests see the new one. A bad config changes nothing;
    /// the error (file, line, key) is logged and counted. Returns the generation now serving.
    pub async fn reload(&self) -> Result<u64, ConfigError> {
        let _serial = self.reload_lock.lock().await;
        let previous = self.snapshot();
        let built = {
            let previous = previous.clone();
            tokio::task::spawn_blocking(move || previous.reload())
                .await
                .unwrap_or_else(|e| {
                    Err(ConfigError {
                        file: PathBuf::new(),
                        line: None,
                        column: None,
                        key: None,
                        message: format!("reload task failed: {e}"),
                    })
                })
        };
        let next = match built {
            Ok(next) => next,
            Err(err) => {
                metrics::counter!(crate::metrics::CONFIG_RELOAD_FAILURES_TOTAL).increment(1);
                tracing::error!(error = %err, generation = self.generation(), "config reload refused; the running config keeps serving");
                return Err(err);
            }
        };
        if next.store != previous.store {
            tracing::warn!("store.url changed: the store in use stays until a restart");
        }
        if next.ops_listen != previous.ops_listen {
            tracing::warn!("ops.listen changed: the ops listener moves at the next restart");
        }
        let (was, now) = (&previous.server, &next.server);
        if next.listen == previous.listen
            && (now.workers != was.workers || now.max_connections != was.max_connections)
        {
            tracing::warn!(
                workers = now.workers,
                max_connections = now.max_connections,
                "server.workers or server.max_connections changed: they apply when the public listener is next bound (a new server.listen, or a restart)"
            );
        }
        let grew = next.scopes.grew_since(&previous.scopes);
        if next.rate_limits != previous.rate_limits {
            self.limits
                .store(Arc::new(Counters::new(&next.rate_limits)));
        }
        let next = Arc::new(next);
        self.config.store(next.clone());
        if grew {
            self.keys.recompile(&next.scopes);
        }
        let mut generation = 0;
        self.generation.send_modify(|g| {
            *g += 1;
            generation = *g;
        });
        metrics::gauge!(crate::metrics::CONFIG_GENERATION).set(generation as f64);
        tracing::info!(generation, routes = next.routes.len(), "config reloaded");
        Ok(generation)
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
        if self.store.feed_lost_since(*cursor) {
            drop(cursor);
            tracing::info!("the change feed lost track of changes; reloading every key");
            return self.resync().await;
        }
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
    /// feed may have missed (a notification lost while a connection was down). Keys are upserted
    /// as they stream in (unchanged ones are only marked as seen), then the keys the store no
    /// longer has are removed. Returns how many keys the store had.
    pub async fn resync(&self) -> Result<usize, StoreError> {
        let mut cursor = self.cursor.lock().await;
        let snapshot = self.snapshot();
        let pass = self.keys.begin_resync();
        let mut loaded = 0;
        let next = self
            .store
            .load_each(&mut |record| {
                self.keys.upsert(&record, &snapshot.scopes);
                loaded += 1;
            })
            .await?;
        let removed = pass.finish();
        *cursor = next;
        metrics::gauge!(crate::metrics::KEY_CACHE_KEYS).set(self.keys.len() as f64);
        tracing::debug!(loaded, removed, "key cache resync applied");
        Ok(loaded)
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
                        .limits()
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

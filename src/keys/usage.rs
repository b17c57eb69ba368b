//! Usage tracking written behind the request: `accessedAt` at most once per interval per key,
//! and each new `X-SDK-Name`. The request path only checks two atomics and, when there is
//! something new, hands it to a bounded queue without waiting; a background task merges and
//! writes batches. If the queue is full (the store is slow or blocked) the update is dropped and
//! the request proceeds: usage is advisory, requests are not.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{TimeZone, Utc};
use tokio::sync::mpsc;

use super::cache::{CachedKey, KeyCache};
use super::store::{KeyStore, Usage};

const QUEUE: usize = 4096;
const FLUSH_EVERY: Duration = Duration::from_millis(500);
const BATCH_MAX: usize = 512;

/// The request path's handle on usage tracking.
#[derive(Clone)]
pub struct UsageRecorder {
    tx: mpsc::Sender<Usage>,
}

impl UsageRecorder {
    /// Starts the writer task on `store`.
    pub fn spawn(store: Arc<dyn KeyStore>) -> UsageRecorder {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(write_behind(store, rx));
        UsageRecorder { tx }
    }

    /// Notes a request made with `key`. Never waits.
    pub fn observe(
        &self,
        cache: &KeyCache,
        key: &CachedKey,
        sdk: Option<&[u8]>,
        now: i64,
        interval: Duration,
    ) {
        let interval = i64::try_from(interval.as_secs()).unwrap_or(i64::MAX);
        let accessed = key.claim_access(now, interval);
        let sdk = sdk
            .and_then(|s| std::str::from_utf8(s).ok())
            .map(str::trim)
            .filter(|s| !s.is_empty() && s.len() <= 128)
            .filter(|s| cache.claim_sdk(key, s));
        if !accessed && sdk.is_none() {
            return;
        }
        let usage = Usage {
            project: key.project.to_string(),
            id: key.id.to_string(),
            accessed_at: accessed
                .then(|| Utc.timestamp_opt(now, 0).single())
                .flatten(),
            sdks: sdk.map(|s| vec![s.to_owned()]).unwrap_or_default(),
        };
        if self.tx.try_send(usage).is_err() {
            tracing::debug!("usage queue full; dropping an update");
        }
    }
}

async fn write_behind(store: Arc<dyn KeyStore>, mut rx: mpsc::Receiver<Usage>) {
    let mut pending: HashMap<(String, String), Usage> = HashMap::new();
    loop {
        let first = match rx.recv().await {
            Some(usage) => usage,
            None => return,
        };
        merge(&mut pending, first);
        // Collect whatever else arrives shortly, then write it all in one transaction.
        let deadline = tokio::time::sleep(FLUSH_EVERY);
        tokio::pin!(deadline);
        while pending.len() < BATCH_MAX {
            tokio::select! {
                usage = rx.recv() => match usage {
                    Some(usage) => merge(&mut pending, usage),
                    None => break,
                },
                () = &mut deadline => break,
            }
        }
        let batch: Vec<Usage> = pending.drain().map(|(_, u)| u).collect();
        if let Err(err) = store.record_usage(&batch).await {
            tracing::warn!(error = %err, entries = batch.len(), "usage batch not written");
        }
    }
}

fn merge(pending: &mut HashMap<(String, String), Usage>, usage: Usage) {
    match pending.entry((usage.project.clone(), usage.id.clone())) {
        std::collections::hash_map::Entry::Vacant(slot) => {
            slot.insert(usage);
        }
        std::collections::hash_map::Entry::Occupied(mut slot) => {
            let existing = slot.get_mut();
            (existing.accessed_at, existing.sdks) =
                usage.merged_over(existing.accessed_at, &existing.sdks);
        }
    }
}

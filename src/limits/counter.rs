//! Abuse-limit counters: Appwrite's fixed window, counted locally or in Redis so several nodes
//! enforce one limit. If Redis fails, counting falls back to the local counters (logged and
//! counted in metrics) and Redis is tried again after a pause: limits stay enforced per node
//! rather than not at all.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use dashmap::DashMap;
use redis::aio::ConnectionManager;
use tokio::sync::Mutex;

use crate::config::{LimitBackend, RateLimitSettings};
use crate::metrics as m;

/// How long to stay on local counters after a Redis failure before trying Redis again.
const REDIS_RETRY_AFTER: i64 = 5;
/// A Redis round trip slower than this counts as a failure.
const REDIS_TIMEOUT: Duration = Duration::from_millis(250);

/// The state of one counter after a hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub limit: u32,
    pub remaining: u32,
    /// End of the current window, Unix seconds.
    pub reset: i64,
    pub allowed: bool,
}

impl Verdict {
    fn new(limit: u32, count: u64, reset: i64) -> Verdict {
        Verdict {
            limit,
            remaining: u32::try_from(u64::from(limit).saturating_sub(count)).unwrap_or(0),
            reset,
            allowed: count <= u64::from(limit),
        }
    }

    /// The tighter of two verdicts (refused beats allowed, then fewer remaining).
    pub fn tighter(self, other: Verdict) -> Verdict {
        match (self.allowed, other.allowed) {
            (true, false) => other,
            (false, true) => self,
            _ if other.remaining < self.remaining => other,
            _ => self,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Window {
    start: i64,
    count: u64,
}

/// Counters for every limit of this node (and, with Redis, of every node).
pub struct Counters {
    local: DashMap<String, Window>,
    redis: Option<Redis>,
    prefix: String,
}

struct Redis {
    url: String,
    connection: Mutex<Option<ConnectionManager>>,
    /// Unix second before which Redis is not tried again.
    paused_until: AtomicI64,
    up: AtomicBool,
}

impl Counters {
    pub fn new(settings: &RateLimitSettings) -> Counters {
        let redis = match &settings.backend {
            LimitBackend::Local => None,
            LimitBackend::Redis(url) => Some({
                metrics::gauge!(m::RATE_LIMIT_BACKEND_UP).set(1.0);
                Redis {
                    url: url.clone(),
                    connection: Mutex::new(None),
                    paused_until: AtomicI64::new(0),
                    up: AtomicBool::new(true),
                }
            }),
        };
        Counters {
            local: DashMap::new(),
            redis,
            prefix: settings.prefix.clone(),
        }
    }

    /// Counts one request against `key` in the fixed window containing `now`.
    pub async fn hit(&self, key: &str, limit: u32, window: Duration, now: i64) -> Verdict {
        let window_secs = i64::try_from(window.as_secs().max(1)).unwrap_or(i64::MAX);
        let start = now - now.rem_euclid(window_secs);
        let reset = start + window_secs;
        if let Some(redis) = &self.redis {
            if now >= redis.paused_until.load(Ordering::Relaxed) {
                let full_key = format!("{}:rl:{key}:{start}", self.prefix);
                match tokio::time::timeout(REDIS_TIMEOUT, redis.incr(&full_key, window_secs)).await
                {
                    Ok(Ok(count)) => {
                        if !redis.up.swap(true, Ordering::Relaxed) {
                            tracing::info!("rate-limit counters are shared through Redis again");
                            metrics::gauge!(m::RATE_LIMIT_BACKEND_UP).set(1.0);
                        }
                        return Verdict::new(limit, count, reset);
                    }
                    Ok(Err(err)) => redis.failed(now, &err.to_string()).await,
                    Err(_) => redis.failed(now, "timed out").await,
                }
            }
            metrics::counter!(m::RATE_LIMIT_FALLBACK_TOTAL).increment(1);
        }
        let mut entry = self
            .local
            .entry(key.to_owned())
            .or_insert(Window { start, count: 0 });
        if entry.start != start {
            *entry = Window { start, count: 0 };
        }
        entry.count += 1;
        Verdict::new(limit, entry.count, reset)
    }

    /// Drops local counters of windows that have ended.
    pub fn sweep(&self, now: i64, longest_window: i64) {
        self.local.retain(|_, w| w.start + longest_window > now);
    }
}

impl Redis {
    async fn incr(&self, key: &str, window_secs: i64) -> redis::RedisResult<u64> {
        let mut guard = self.connection.lock().await;
        if guard.is_none() {
            let client = redis::Client::open(self.url.as_str())?;
            *guard = Some(ConnectionManager::new(client).await?);
        }
        let mut connection = guard.clone().expect("connected above");
        drop(guard);
        // INCR and EXPIRE NX in one transaction: the window's key lives exactly one window.
        let (count,): (u64,) = redis::pipe()
            .atomic()
            .incr(key, 1)
            .cmd("EXPIRE")
            .arg(key)
            .arg(window_secs)
            .arg("NX")
            .ignore()
            .query_async(&mut connection)
            .await?;
        Ok(count)
    }

    async fn failed(&self, now: i64, reason: &str) {
        self.paused_until
            .store(now + REDIS_RETRY_AFTER, Ordering::Relaxed);
        // Forget the connection so the next attempt reconnects from scratch.
        *self.connection.lock().await = None;
        if self.up.swap(false, Ordering::Relaxed) {
            tracing::warn!(
                reason,
                "Redis rate-limit backend failed; counting locally on this node"
            );
            metrics::gauge!(m::RATE_LIMIT_BACKEND_UP).set(0.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local() -> Counters {
        Counters::new(&RateLimitSettings {
            backend: LimitBackend::Local,
            prefix: "t".into(),
        })
    }

    #[tokio::test(start_paused = true)]
    async fn fixed_window_counts_and_resets() {
        let counters = local();
        let window = Duration::from_secs(60);
        let now = 1_000_020; // 20 s into a window that started at 1_000_000 - 1_000_000 % 60
        let start = now - now % 60;
        for i in 1..=3 {
            let v = counters.hit("k", 3, window, now).await;
            assert!(v.allowed);
            assert_eq!(v.remaining, 3 - i);
            assert_eq!(v.reset, start + 60);
        }
        let over = counters.hit("k", 3, window, now + 1).await;
        assert!(!over.allowed);
        assert_eq!(over.remaining, 0);
        // Another key has its own budget; the next window starts afresh.
        assert!(counters.hit("other", 3, window, now).await.allowed);
        let next = counters.hit("k", 3, window, start + 60).await;
        assert!(next.allowed);
        assert_eq!(next.remaining, 2);
        counters.sweep(start + 200, 60);
        assert!(counters.local.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn unreachable_redis_falls_back_to_local_counting() {
        let counters = Counters::new(&RateLimitSettings {
            backend: LimitBackend::Redis("redis://127.0.0.1:1/".into()),
            prefix: "t".into(),
        });
        let window = Duration::from_secs(60);
        assert!(counters.hit("k", 1, window, 100).await.allowed);
        assert!(!counters.hit("k", 1, window, 101).await.allowed);
    }

    #[test]
    fn tighter() {
        let a = Verdict::new(10, 3, 0);
        let b = Verdict::new(5, 4, 0);
        assert_eq!(a.tighter(b), b);
        let refused = Verdict::new(1, 2, 0);
        assert_eq!(b.tighter(refused), refused);
    }
}

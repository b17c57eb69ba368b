//! Metric names, in one place. Units are in the names; labels are bounded: route id, method,
//! status class, outcome, upstream name, error kind — never a path, a key id or a secret.

use hashbrown::HashMap;
use std::cell::RefCell;
use std::sync::OnceLock;
use std::time::Duration;

use metrics::{Counter, Histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// Requests by `route` (index, or `none`), `method`, `status` (class: 2xx…) and `outcome`.
pub const REQUESTS_TOTAL: &str = "keygate_requests_total";
/// Whole-request latency, by `route`.
pub const REQUEST_DURATION_SECONDS: &str = "keygate_request_duration_seconds";
/// Time spent waiting for the upstream's response head, by `upstream`.
pub const UPSTREAM_DURATION_SECONDS: &str = "keygate_upstream_duration_seconds";
/// Authorization decisions by `outcome` (`allowed` or the Appwrite error type).
pub const AUTH_DECISIONS_TOTAL: &str = "keygate_auth_decisions_total";
/// Keys in the cache.
pub const KEY_CACHE_KEYS: &str = "keygate_key_cache_keys";
/// Upstream failures by `upstream` and `kind` (`connect`, `timeout`, `other`).
pub const UPSTREAM_ERRORS_TOTAL: &str = "keygate_upstream_errors_total";
/// Upstream addresses ejected by passive health, by `upstream`.
pub const UPSTREAM_EJECTIONS_TOTAL: &str = "keygate_upstream_ejections_total";
/// Requests refused by an abuse limit, by `route`.
pub const RATE_LIMITED_TOTAL: &str = "keygate_rate_limited_total";
/// Counter updates that fell back to local counters because Redis failed.
pub const RATE_LIMIT_FALLBACK_TOTAL: &str = "keygate_rate_limit_backend_fallback_total";
/// 1 while the shared (Redis) counter backend answers, 0 while falling back.
pub const RATE_LIMIT_BACKEND_UP: &str = "keygate_rate_limit_backend_up";
/// The config generation now serving.
pub const CONFIG_GENERATION: &str = "keygate_config_generation";
/// Config reloads refused (the running config kept serving).
pub const CONFIG_RELOAD_FAILURES_TOTAL: &str = "keygate_config_reload_failures_total";
/// Open client connections, by `listener` (`public`, `ops`).
pub const CONNECTIONS_OPEN: &str = "keygate_connections_open";

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the Prometheus recorder once per process and returns the handle that renders it.
pub fn install() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets(&[
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                1.0, 2.5, 5.0, 10.0, 30.0,
            ])
            .expect("the bucket list is not empty")
            .build_recorder();
        let handle = recorder.handle();
        // Another recorder may be installed already (an embedding application); then keygate's
        // own handle simply renders nothing.
        if metrics::set_global_recorder(recorder).is_ok() {
            spawn_upkeep(handle.clone());
        }
        handle
    })
}

/// How often histogram samples are folded into their buckets.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// Histogram samples wait in a queue until they are folded into their buckets, which a scrape
/// does, or this thread: without it, a gateway nobody scrapes would keep every sample of every
/// request in memory.
fn spawn_upkeep(handle: PrometheusHandle) {
    let spawned = std::thread::Builder::new()
        .name("keygate-metrics".into())
        .spawn(move || loop {
            std::thread::sleep(UPKEEP_EVERY);
            handle.run_upkeep();
        });
    if let Err(err) = spawned {
        tracing::warn!(error = %err, "cannot start the metrics upkeep thread; histograms are folded only when scraped");
    }
}

/// `2xx`, `4xx`…: a bounded label for a status.
pub fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// The labels of one request's metrics; every part is bounded (route index, fixed strings).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct RequestLabels {
    pub route: Option<usize>,
    pub method: &'static str,
    pub status: &'static str,
    pub outcome: &'static str,
}

/// The per-request metrics, resolved once per label set and thread: a request then increments
/// atomics instead of formatting labels and looking them up in the registry.
#[derive(Default)]
struct Handles {
    requests: HashMap<RequestLabels, Counter>,
    durations: HashMap<Option<usize>, Histogram>,
    decisions: HashMap<&'static str, Counter>,
    upstreams: HashMap<Box<str>, Histogram>,
}

thread_local! {
    static HANDLES: RefCell<Handles> = RefCell::new(Handles::default());
}

fn route_label(route: Option<usize>) -> String {
    route.map_or_else(|| "none".to_owned(), |r| r.to_string())
}

/// Counts a finished request and records its latency; `decision` is what the authorization
/// decision said, when it ran.
pub fn request_done(labels: RequestLabels, decision: Option<&'static str>, elapsed: Duration) {
    HANDLES.with(|handles| {
        let mut handles = handles.borrow_mut();
        handles
            .requests
            .entry(labels)
            .or_insert_with(|| {
                metrics::counter!(
                    REQUESTS_TOTAL,
                    "route" => route_label(labels.route),
                    "method" => labels.method,
                    "status" => labels.status,
                    "outcome" => labels.outcome,
                )
            })
            .increment(1);
        handles
            .durations
            .entry(labels.route)
            .or_insert_with(|| {
                metrics::histogram!(REQUEST_DURATION_SECONDS, "route" => route_label(labels.route))
            })
            .record(elapsed.as_secs_f64());
        if let Some(decision) = decision {
            handles
                .decisions
                .entry(decision)
                .or_insert_with(|| metrics::counter!(AUTH_DECISIONS_TOTAL, "outcome" => decision))
                .increment(1);
        }
    });
}

/// Records how long an upstream took to answer.
pub fn upstream_done(upstream: &str, elapsed: Duration) {
    HANDLES.with(|handles| {
        let mut handles = handles.borrow_mut();
        if let Some(histogram) = handles.upstreams.get(upstream) {
            histogram.record(elapsed.as_secs_f64());
            return;
        }
        let histogram =
            metrics::histogram!(UPSTREAM_DURATION_SECONDS, "upstream" => upstream.to_owned());
        histogram.record(elapsed.as_secs_f64());
        handles.upstreams.insert(upstream.into(), histogram);
    });
}

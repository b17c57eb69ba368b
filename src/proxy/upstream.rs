//! An upstream: one or several addresses behind a name, a pooled keep-alive client, balancing
//! (round robin or least outstanding requests) and passive health: an address that fails
//! `eject_after` times in a row rests for `eject_for`, unless every address is resting.
//!
//! Every thread that sends requests has its own connection pool per upstream, made on its first
//! request: a request goes out on a connection driven by the thread that serves the client, so
//! the hand-off to the upstream connection is a local wake-up, never a cross-thread one, and a
//! thread's pooled connections end with the thread (and its runtime), never under another
//! thread's request.
//!
//! The pool is a stack of idle HTTP/1.1 connections per address. A connection goes back when
//! its response body has been read to the end ([`PooledBody`]), is taken most recently used
//! first, and is closed instead of reused once the upstream has closed it or it has been idle
//! for the upstream's `idle_timeout`. A request that a reused connection could not send (the
//! upstream closed it at that moment) is sent again on another connection.

use std::cell::RefCell;
use std::error::Error as _;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, StatusCode, Uri};
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use tower_service::Service as _;

use super::{Body, BoxError};

/// Idle connections kept per address on each thread; more are closed when they come back.
const MAX_IDLE: usize = 256;
/// How often, at most, each thread closes the connections that have idled too long.
const SWEEP_EVERY: Duration = Duration::from_secs(15);
/// `idle_timeout` when none is configured.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// How requests are spread over an upstream's addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Balance {
    RoundRobin,
    LeastOutstanding,
}

/// Everything an upstream is built from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamSettings {
    pub name: String,
    pub urls: Vec<String>,
    pub forward_key: bool,
    pub timeout: Duration,
    pub connect_timeout: Duration,
    /// How long a pooled connection may sit idle before it is closed rather than reused.
    pub idle_timeout: Duration,
    pub balance: Balance,
    pub eject_after: u32,
    pub eject_for: Duration,
    /// PEM CA bundle for https:// addresses; `None`: the system's roots.
    pub ca_pem: Option<Vec<u8>>,
}

/// How an upstream request failed.
#[derive(Debug)]
pub enum SendError {
    /// No connection could be made (refused, unreachable, connect timeout, TLS handshake).
    Connect(BoxError),
    /// The connection failed while sending the request or reading the response head.
    Http(hyper::Error),
}

impl SendError {
    pub fn is_connect(&self) -> bool {
        matches!(self, SendError::Connect(_))
    }
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::Connect(err) => write!(f, "connect: {err}")?,
            SendError::Http(err) => write!(f, "{err}")?,
        }
        let mut source = self.source().and_then(|s| s.source());
        while let Some(err) = source {
            write!(f, ": {err}")?;
            source = err.source();
        }
        Ok(())
    }
}

impl std::error::Error for SendError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            SendError::Connect(err) => Some(err.as_ref()),
            SendError::Http(err) => Some(err),
        }
    }
}

type Connector = HttpsConnector<HttpConnector>;

/// How an upstream connects; shared by the upstream's versions across reloads while its
/// connection settings stay the same, and the key to each thread's pool for it.
struct Pools {
    connector: Connector,
}

/// One thread's idle connections for one [`Pools`], per address.
struct ThreadPool {
    owner: Weak<Pools>,
    /// The `idle_timeout` of the config that last used the pool on this thread.
    idle_timeout: Duration,
    /// Per address: idle connections, the most recently used last.
    idle: Vec<(Arc<Target>, Vec<Idle>)>,
}

struct Idle {
    sender: SendRequest<Body>,
    since: Instant,
}

impl ThreadPool {
    fn idle_for(&mut self, target: &Arc<Target>) -> &mut Vec<Idle> {
        let index = match self.idle.iter().position(|(t, _)| t.same_address(target)) {
            Some(index) => index,
            None => {
                self.idle.push((target.clone(), Vec::new()));
                self.idle.len() - 1
            }
        };
        &mut self.idle[index].1
    }
}

thread_local! {
    /// This thread's pools; those of upstreams that no config holds any more are dropped when
    /// the next pool is made.
    static POOLS: RefCell<Vec<ThreadPool>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` on this thread's pool for `owner`, making it on first use. A request passes its
/// config's `idle_timeout`, which the pool then keeps to (a reload may change it).
fn with_thread_pool<R>(
    owner: &Arc<Pools>,
    idle_timeout: Option<Duration>,
    f: impl FnOnce(&mut ThreadPool) -> R,
) -> R {
    POOLS.with_borrow_mut(|pools| {
        let mine = Arc::as_ptr(owner);
        let index = match pools.iter().position(|p| p.owner.as_ptr() == mine) {
            Some(index) => index,
            None => {
                pools.retain(|p| p.owner.strong_count() > 0);
                let timeout = idle_timeout.unwrap_or(DEFAULT_IDLE_TIMEOUT);
                pools.push(ThreadPool {
                    owner: Arc::downgrade(owner),
                    idle_timeout: timeout,
                    idle: Vec::new(),
                });
                // Requests prune the pool as they pass; this closes what idled too long when
                // none come.
                if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                    runtime.spawn(sweep_idle(Arc::downgrade(owner), sweep_interval(timeout)));
                }
                pools.len() - 1
            }
        };
        let pool = &mut pools[index];
        if let Some(timeout) = idle_timeout {
            pool.idle_timeout = timeout;
        }
        f(pool)
    })
}

/// Sweeps the calling thread's pool for `owner` until no config holds the upstream any more.
async fn sweep_idle(owner: Weak<Pools>, mut every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        let Some(pools) = owner.upgrade() else {
            return;
        };
        let now = Instant::now();
        every = with_thread_pool(&pools, None, |pool| {
            let timeout = pool.idle_timeout;
            for (_, idle) in &mut pool.idle {
                idle.retain(|conn| {
                    conn.sender.is_ready() && now.duration_since(conn.since) < timeout
                });
            }
            sweep_interval(timeout)
        });
    }
}

/// Sweeps often enough that no connection stays much past `idle_timeout`.
fn sweep_interval(idle_timeout: Duration) -> Duration {
    SWEEP_EVERY
        .min(idle_timeout / 2)
        .max(Duration::from_millis(10))
}

/// A reusable idle connection to `target` from this thread's pool, if there is one.
fn checkout(
    owner: &Arc<Pools>,
    target: &Arc<Target>,
    timeout: Duration,
) -> Option<SendRequest<Body>> {
    with_thread_pool(owner, Some(timeout), |pool| {
        let idle = pool.idle_for(target);
        while let Some(conn) = idle.pop() {
            // Closed by the upstream, or idle too long: dropping the sender closes it.
            if conn.sender.is_ready() && conn.since.elapsed() < timeout {
                return Some(conn.sender);
            }
        }
        None
    })
}

/// Puts a connection whose exchange is complete back into this thread's pool. One that is not
/// ready yet (the request body is still being sent) goes back once it is.
fn checkin(owner: Weak<Pools>, target: Arc<Target>, mut sender: SendRequest<Body>) {
    if sender.is_closed() {
        return;
    }
    if !sender.is_ready() {
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if sender.ready().await.is_ok() {
                    checkin(owner, target, sender);
                }
            });
        }
        return;
    }
    let Some(owner) = owner.upgrade() else {
        return;
    };
    let now = Instant::now();
    with_thread_pool(&owner, None, |pool| {
        let timeout = pool.idle_timeout;
        let idle = pool.idle_for(&target);
        let expired = idle
            .iter()
            .take_while(|conn| now.duration_since(conn.since) >= timeout)
            .count();
        let over = (idle.len() + 1).saturating_sub(MAX_IDLE);
        idle.drain(..expired.max(over));
        idle.push(Idle { sender, since: now });
    });
}

/// An upstream response body that returns its connection to the pool once it has been read to
/// the end. Dropped before the end, it takes the connection with it (HTTP/1.1 cannot abandon a
/// response half-read).
pub struct PooledBody {
    inner: Incoming,
    reuse: Option<Reuse>,
}

struct Reuse {
    owner: Weak<Pools>,
    target: Arc<Target>,
    sender: SendRequest<Body>,
}

impl PooledBody {
    fn release(&mut self) {
        if let Some(reuse) = self.reuse.take() {
            checkin(reuse.owner, reuse.target, reuse.sender);
        }
    }
}

impl HttpBody for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        match &frame {
            Some(Err(_)) => self.reuse = None,
            None => self.release(),
            Some(Ok(_)) if self.inner.is_end_stream() => self.release(),
            Some(Ok(_)) => {}
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        if self.inner.is_end_stream() {
            self.release();
        }
    }
}

/// One address of an upstream and its health.
#[derive(Debug)]
pub struct Target {
    scheme: Scheme,
    authority: Authority,
    /// `scheme://authority`, what the connector dials.
    address: Uri,
    /// A path prefix from the URL, without a trailing `/` (often empty).
    prefix: String,
    outstanding: AtomicUsize,
    failures: AtomicU32,
    /// Milliseconds since the process epoch until which the address rests.
    ejected_until: AtomicU64,
}

impl Target {
    pub fn authority(&self) -> &Authority {
        &self.authority
    }

    /// The origin-form request target (`/prefix/path?query`) for what the client asked.
    pub fn uri_for(&self, asked: &RequestTarget<'_>) -> Result<Uri, http::Error> {
        match asked {
            // Nothing to rewrite: the client's target is shared, not parsed again.
            RequestTarget::AsSent(sent) if self.prefix.is_empty() => Ok(Uri::from(sent.clone())),
            RequestTarget::AsSent(sent) => self.join(sent.path(), sent.query()),
            RequestTarget::Normalized { path, query } => self.join(path, *query),
        }
    }

    fn join(&self, path: &str, query: Option<&str>) -> Result<Uri, http::Error> {
        let mut target =
            String::with_capacity(self.prefix.len() + path.len() + 1 + query.map_or(0, str::len));
        target.push_str(&self.prefix);
        target.push_str(path);
        if let Some(query) = query {
            target.push('?');
            target.push_str(query);
        }
        Ok(Uri::from(PathAndQuery::try_from(target)?))
    }

    /// Whether two targets are the same address (their connections are interchangeable).
    fn same_address(&self, other: &Target) -> bool {
        std::ptr::eq(self, other)
            || (self.scheme == other.scheme && self.authority == other.authority)
    }

    fn resting(&self, now: u64) -> bool {
        self.ejected_until.load(Ordering::Relaxed) > now
    }
}

/// The path and query a request is forwarded with: always the normalized path (what was
/// authorized) and the client's raw query.
pub enum RequestTarget<'a> {
    /// The client's own path and query, when normalization left the path as it was.
    AsSent(PathAndQuery),
    /// A path that normalization rewrote, and the client's query.
    Normalized {
        path: String,
        query: Option<&'a str>,
    },
}

/// Marks a request outstanding on a target until dropped.
pub struct InFlight(Arc<Target>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.outstanding.fetch_sub(1, Ordering::Relaxed);
    }
}

pub struct Upstream {
    pub settings: UpstreamSettings,
    /// Some address is https: the client carries trust roots.
    needs_tls: bool,
    targets: Vec<Arc<Target>>,
    next: AtomicUsize,
    pools: Arc<Pools>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("name", &self.settings.name)
            .field("urls", &self.settings.urls)
            .field("forward_key", &self.settings.forward_key)
            .field("balance", &self.settings.balance)
            .finish_non_exhaustive()
    }
}

fn epoch_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    u64::try_from(EPOCH.get_or_init(Instant::now).elapsed().as_millis()).unwrap_or(u64::MAX)
}

fn parse_target(url: &str) -> Result<Target, String> {
    let uri: Uri = url
        .parse()
        .map_err(|_| format!("`{url}` is not a URL such as http://127.0.0.1:8081"))?;
    let scheme = uri.scheme().cloned().ok_or("the URL needs a scheme")?;
    if scheme != Scheme::HTTP && scheme != Scheme::HTTPS {
        return Err(format!(
            "scheme `{scheme}` is not supported; use http:// or https://"
        ));
    }
    let authority = uri.authority().cloned().ok_or("the URL needs a host")?;
    if authority.as_str().contains('@') {
        return Err("credentials in upstream URLs are not supported".into());
    }
    if uri.query().is_some() {
        return Err("an upstream URL cannot carry a query".into());
    }
    let address = Uri::builder()
        .scheme(scheme.clone())
        .authority(authority.clone())
        .path_and_query("/")
        .build()
        .map_err(|e| e.to_string())?;
    Ok(Target {
        scheme,
        authority,
        address,
        prefix: uri.path().trim_end_matches('/').to_owned(),
        outstanding: AtomicUsize::new(0),
        failures: AtomicU32::new(0),
        ejected_until: AtomicU64::new(0),
    })
}

impl Upstream {
    /// Builds an upstream; reuses `previous`'s connection pool when the connection settings are
    /// the same (a config reload keeps warm connections).
    pub fn new(
        settings: UpstreamSettings,
        previous: Option<&Upstream>,
    ) -> Result<Upstream, String> {
        if settings.urls.is_empty() {
            return Err("give `url` or a non-empty `urls` list".into());
        }
        let targets = settings
            .urls
            .iter()
            .map(|url| parse_target(url).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        let needs_tls = targets.iter().any(|t| t.scheme == Scheme::HTTPS);
        let pools = match previous.filter(|p| {
            p.settings.connect_timeout == settings.connect_timeout
                && p.settings.ca_pem == settings.ca_pem
                && p.needs_tls == needs_tls
        }) {
            Some(previous) => previous.pools.clone(),
            None => Arc::new(Pools {
                connector: build_connector(&settings, needs_tls)?,
            }),
        };
        Ok(Upstream {
            settings,
            needs_tls,
            targets,
            next: AtomicUsize::new(0),
            pools,
        })
    }

    pub fn name(&self) -> &str {
        &self.settings.name
    }

    pub fn forward_key(&self) -> bool {
        self.settings.forward_key
    }

    pub fn timeout(&self) -> Duration {
        self.settings.timeout
    }

    pub fn targets(&self) -> &[Arc<Target>] {
        &self.targets
    }

    /// Sends `request` (origin-form target, `Host` set) to `target` on an idle connection
    /// from this thread's pool, or a new one. A request that a pooled connection closed before
    /// sending (the upstream ended it while idle) is sent again on another.
    pub async fn send(
        &self,
        target: &Arc<Target>,
        mut request: Request<Body>,
    ) -> Result<Response<PooledBody>, SendError> {
        loop {
            let idle_timeout = self.settings.idle_timeout;
            let (mut sender, reused) = match checkout(&self.pools, target, idle_timeout) {
                Some(sender) => (sender, true),
                None => (self.connect(target).await?, false),
            };
            match sender.try_send_request(request).await {
                Ok(response) => {
                    // After a switch of protocols the connection belongs to the upgrade.
                    let reuse =
                        (response.status() != StatusCode::SWITCHING_PROTOCOLS).then(|| Reuse {
                            owner: Arc::downgrade(&self.pools),
                            target: target.clone(),
                            sender,
                        });
                    let (parts, inner) = response.into_parts();
                    return Ok(Response::from_parts(parts, PooledBody { inner, reuse }));
                }
                Err(mut err) => match err.take_message() {
                    Some(unsent) if reused => request = unsent,
                    _ => return Err(SendError::Http(err.into_error())),
                },
            }
        }
    }

    /// Opens a connection to `target`; a task on this thread drives it.
    async fn connect(&self, target: &Target) -> Result<SendRequest<Body>, SendError> {
        let io = self
            .pools
            .connector
            .clone()
            .call(target.address.clone())
            .await
            .map_err(SendError::Connect)?;
        let (sender, connection) = http1::handshake(io).await.map_err(SendError::Http)?;
        tokio::spawn(async move {
            if let Err(err) = connection.with_upgrades().await {
                tracing::debug!(error = %err, "upstream connection ended with an error");
            }
        });
        Ok(sender)
    }

    /// Picks an address, skipping `exclude` (already tried) and resting addresses — unless
    /// every other address rests, in which case resting ones are tried rather than none.
    pub fn pick(&self, exclude: &[usize]) -> Option<(usize, InFlight)> {
        let now = epoch_ms();
        let n = self.targets.len();
        let open = |i: &usize| !exclude.contains(i);
        let healthy = |i: &usize| open(i) && !self.targets[*i].resting(now);
        let any_healthy = (0..n).any(|i| healthy(&i));
        let candidate = |i: &usize| if any_healthy { healthy(i) } else { open(i) };
        let count = (0..n).filter(candidate).count();
        if count == 0 {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed) % count;
        let mut from_start = (0..n)
            .filter(candidate)
            .skip(start)
            .chain((0..n).filter(candidate).take(start));
        let chosen = match self.settings.balance {
            Balance::RoundRobin => from_start.next(),
            Balance::LeastOutstanding => {
                from_start.min_by_key(|i| self.targets[*i].outstanding.load(Ordering::Relaxed))
            }
        }
        .expect("count > 0 candidates");
        let target = self.targets[chosen].clone();
        target.outstanding.fetch_add(1, Ordering::Relaxed);
        Some((chosen, InFlight(target)))
    }

    /// Records the result of a request to a target; returns true when it was just ejected.
    pub fn report(&self, index: usize, ok: bool) -> bool {
        let target = &self.targets[index];
        if ok {
            target.failures.store(0, Ordering::Relaxed);
            return false;
        }
        let failures = target.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures >= self.settings.eject_after && self.targets.len() > 1 {
            target.failures.store(0, Ordering::Relaxed);
            let until =
                epoch_ms() + u64::try_from(self.settings.eject_for.as_millis()).unwrap_or(u64::MAX);
            target.ejected_until.store(until, Ordering::Relaxed);
            return true;
        }
        false
    }
}

fn build_connector(settings: &UpstreamSettings, needs_tls: bool) -> Result<Connector, String> {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.set_connect_timeout(Some(settings.connect_timeout));
    http.set_keepalive(Some(Duration::from_secs(60)));
    http.enforce_http(false);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let tls = match (&settings.ca_pem, needs_tls) {
        (Some(pem), _) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in crate::tls::certs_from_pem(pem)? {
                roots
                    .add(cert)
                    .map_err(|e| format!("bad CA certificate: {e}"))?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        (None, true) => {
            let mut roots = rustls::RootCertStore::empty();
            let native = rustls_native_certs::load_native_certs();
            for cert in native.certs {
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err(
                    "no system root certificates found; set `ca` for https upstreams".into(),
                );
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        (None, false) => builder
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth(),
    };
    Ok(hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(urls: &[&str], balance: Balance) -> UpstreamSettings {
        UpstreamSettings {
            name: "u".into(),
            urls: urls.iter().map(|u| u.to_string()).collect(),
            forward_key: false,
            timeout: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(90),
            balance,
            eject_after: 2,
            eject_for: Duration::from_secs(60),
            ca_pem: None,
        }
    }

    #[test]
    fn builds_target_uris_with_prefix() {
        let u = Upstream::new(
            settings(&["http://127.0.0.1:8081/api/"], Balance::RoundRobin),
            None,
        )
        .unwrap();
        let normalized = RequestTarget::Normalized {
            path: "/v1/users".into(),
            query: Some("limit=1"),
        };
        let as_sent = RequestTarget::AsSent(PathAndQuery::from_static("/v1/users?limit=1"));
        for asked in [&normalized, &as_sent] {
            assert_eq!(
                u.targets()[0].uri_for(asked).unwrap().to_string(),
                "/api/v1/users?limit=1"
            );
        }
        let bare = Upstream::new(
            settings(&["http://127.0.0.1:8081"], Balance::RoundRobin),
            None,
        )
        .unwrap();
        for asked in [&normalized, &as_sent] {
            assert_eq!(
                bare.targets()[0].uri_for(asked).unwrap().to_string(),
                "/v1/users?limit=1"
            );
        }
    }

    #[test]
    fn refuses_unsupported_urls() {
        for bad in [
            "ftp://x",
            "127.0.0.1:80",
            "http://u:p@host",
            "http://host/?q=1",
        ] {
            assert!(
                Upstream::new(settings(&[bad], Balance::RoundRobin), None).is_err(),
                "{bad}"
            );
        }
        assert!(Upstream::new(settings(&[], Balance::RoundRobin), None).is_err());
    }

    #[tokio::test]
    async fn round_robin_skips_ejected_addresses() {
        let u = Upstream::new(
            settings(
                &["http://a:1", "http://b:1", "http://c:1"],
                Balance::RoundRobin,
            ),
            None,
        )
        .unwrap();
        let picks: Vec<usize> = (0..6).map(|_| u.pick(&[]).unwrap().0).collect();
        assert_eq!(picks, vec![0, 1, 2, 0, 1, 2]);
        assert!(!u.report(1, false));
        assert!(u.report(1, false), "ejected after two failures in a row");
        assert!((0..6).all(|_| u.pick(&[]).unwrap().0 != 1));
        // Excluding every healthy address falls back to the resting one.
        assert_eq!(u.pick(&[0, 2]).unwrap().0, 1);
        assert!(u.pick(&[0, 1, 2]).is_none());
    }

    #[tokio::test]
    async fn least_outstanding_prefers_idle_addresses() {
        let u = Upstream::new(
            settings(&["http://a:1", "http://b:1"], Balance::LeastOutstanding),
            None,
        )
        .unwrap();
        let (first, _held) = u.pick(&[]).unwrap();
        for _ in 0..4 {
            let (next, _) = u.pick(&[]).unwrap();
            assert_ne!(next, first, "the busy address was picked");
        }
    }
}

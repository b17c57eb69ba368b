//! An upstream: one or several addresses behind a name, a pooled keep-alive client, balancing
//! (round robin or least outstanding requests) and passive health: an address that fails
//! `eject_after` times in a row rests for `eject_for`, unless every address is resting.
//!
//! Every thread that sends requests has its own connection pool per upstream, made on its first
//! request: a request goes out on a connection driven by the thread that serves the client, so
//! the hand-off to the upstream connection is a local wake-up, never a cross-thread one, and a
//! thread's pooled connections end with the thread (and its runtime), never under another
//! thread's request.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use http::uri::{Authority, PathAndQuery, Scheme};
use http::Uri;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use super::Body;

pub type UpstreamClient = Client<HttpsConnector<HttpConnector>, Body>;

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
    pub balance: Balance,
    pub eject_after: u32,
    pub eject_for: Duration,
    /// PEM CA bundle for https:// addresses; `None`: the system's roots.
    pub ca_pem: Option<Vec<u8>>,
}

type Connector = HttpsConnector<HttpConnector>;

/// How an upstream connects; shared by the upstream's versions across reloads while its
/// connection settings stay the same, and the key to each thread's pool for it.
struct Pools {
    connector: Connector,
}

thread_local! {
    /// This thread's pool for each upstream it has sent to; pools of upstreams that no config
    /// holds any more are dropped when the next pool is made.
    static POOLS: RefCell<Vec<(Weak<Pools>, UpstreamClient)>> = const { RefCell::new(Vec::new()) };
}

/// One address of an upstream and its health.
#[derive(Debug)]
pub struct Target {
    scheme: Scheme,
    authority: Authority,
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

    /// The upstream URI for a normalized path and the client's raw query.
    pub fn uri_for(&self, path: &str, query: Option<&str>) -> Result<Uri, http::Error> {
        let mut target =
            String::with_capacity(self.prefix.len() + path.len() + 1 + query.map_or(0, str::len));
        target.push_str(&self.prefix);
        target.push_str(path);
        if let Some(query) = query {
            target.push('?');
            target.push_str(query);
        }
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(PathAndQuery::try_from(target)?)
            .build()
    }

    fn resting(&self, now: u64) -> bool {
        self.ejected_until.load(Ordering::Relaxed) > now
    }
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
    Ok(Target {
        scheme,
        authority,
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

    /// Sends a request on the calling thread's pool for this upstream.
    pub fn request(
        &self,
        request: http::Request<Body>,
    ) -> hyper_util::client::legacy::ResponseFuture {
        POOLS.with(|pools| {
            let mut pools = pools.borrow_mut();
            let mine = Arc::as_ptr(&self.pools);
            if let Some((_, client)) = pools.iter().find(|(key, _)| key.as_ptr() == mine) {
                return client.request(request);
            }
            pools.retain(|(key, _)| key.strong_count() > 0);
            let client = Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(90))
                .pool_max_idle_per_host(256)
                .build(self.pools.connector.clone());
            let response = client.request(request);
            pools.push((Arc::downgrade(&self.pools), client));
            response
        })
    }

    /// Picks an address, skipping `exclude` (already tried) and resting addresses — unless
    /// every other address rests, in which case resting ones are tried rather than none.
    pub fn pick(&self, exclude: &[usize]) -> Option<(usize, InFlight)> {
        let now = epoch_ms();
        let open: Vec<usize> = (0..self.targets.len())
            .filter(|i| !exclude.contains(i))
            .collect();
        let healthy: Vec<usize> = open
            .iter()
            .copied()
            .filter(|i| !self.targets[*i].resting(now))
            .collect();
        let candidates = if healthy.is_empty() { open } else { healthy };
        if candidates.is_empty() {
            return None;
        }
        let turn = self.next.fetch_add(1, Ordering::Relaxed);
        let chosen = match self.settings.balance {
            Balance::RoundRobin => candidates[turn % candidates.len()],
            Balance::LeastOutstanding => {
                let start = turn % candidates.len();
                (0..candidates.len())
                    .map(|k| candidates[(start + k) % candidates.len()])
                    .min_by_key(|i| self.targets[*i].outstanding.load(Ordering::Relaxed))
                    .expect("candidates is not empty")
            }
        };
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
        assert_eq!(
            u.targets()[0]
                .uri_for("/v1/users", Some("limit=1"))
                .unwrap()
                .to_string(),
            "http://127.0.0.1:8081/api/v1/users?limit=1"
        );
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

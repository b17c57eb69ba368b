//! Config: the YAML file (and the route maps it includes), parsed in two stages (raw serde
//! structs → a validated [`Snapshot`]), with errors that name the file, line and key.
//!
//! A `Snapshot` is immutable; the gateway holds the current one behind an `ArcSwap` and every
//! request loads it once, so a request sees one consistent config from start to end.

mod raw;
mod yaml;

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::admin::{self, MANAGEMENT_SCOPES};
use crate::keys::ephemeral::{EphemeralSigner, SECRET_MIN_LEN};
use crate::keys::scopes::{ScopeIndex, ScopeSet, MAX_SCOPES};
use crate::limits::{self, RateLimit};
use crate::proxy::upstream::{Balance, Upstream, UpstreamSettings};
use crate::routes::{project_segment, MethodSet, Route, RouteTable, RouteTarget};
use raw::{RawConfig, RawInclude, RawRoute, Text};

/// The config keygate runs on when none is given: `config/keygate.yaml`, compiled in.
pub const EMBEDDED_DEFAULT: &str = include_str!("../../config/keygate.yaml");
const EMBEDDED_NAME: &str = "<embedded config/keygate.yaml>";

/// Appwrite's implicit scopes of every project key.
pub const DEFAULT_IMPLICIT_SCOPES: [&str; 3] = ["global", "health.read", "graphql"];
/// Where the ephemeral signing secret is read from when the config names none.
pub const EPHEMERAL_SECRET_ENV: &str = "KEYGATE_EPHEMERAL_SECRET";
const DEFAULT_USAGE_INTERVAL: Duration = Duration::from_secs(24 * 3600);

/// A config that could not be loaded: where, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub column: Option<usize>,
    /// The key path, such as `routes[2].upstream`, when one is known.
    pub key: Option<String>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(column) = self.column {
                write!(f, ":{column}")?;
            }
        }
        if let Some(key) = &self.key {
            write!(f, ": {key}")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

/// Where keys are stored.
#[derive(Clone, PartialEq, Eq)]
pub enum StoreUrl {
    /// `sqlite://relative/path.db` (relative to the working directory) or `sqlite:///abs/path.db`.
    Sqlite(PathBuf),
    /// `postgres://user:password@host:port/database` (several nodes share it).
    Postgres(String),
}

impl StoreUrl {
    /// Parses `sqlite://PATH` or `postgres://…`.
    pub fn parse(url: &str) -> Result<StoreUrl, String> {
        if let Some(path) = url.strip_prefix("sqlite://").filter(|p| !p.is_empty()) {
            return Ok(StoreUrl::Sqlite(PathBuf::from(path)));
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(StoreUrl::Postgres(url.to_owned()));
        }
        Err("expected sqlite://PATH (relative to the working directory) or postgres://…".into())
    }

    /// The URL without its password, for logs and errors.
    pub fn redacted(&self) -> String {
        match self {
            StoreUrl::Sqlite(path) => format!("sqlite://{}", path.display()),
            StoreUrl::Postgres(url) => match url.split_once("://").and_then(|(scheme, rest)| {
                let (userinfo, host) = rest.rsplit_once('@')?;
                let user = userinfo.split(':').next().unwrap_or("");
                Some(format!("{scheme}://{user}:***@{host}"))
            }) {
                Some(redacted) => redacted,
                None => url.clone(),
            },
        }
    }
}

impl fmt::Debug for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// A project keys and requests may belong to.
#[derive(Debug, Clone, Default)]
pub struct Project {
    /// Allowed browser origins, exactly as a browser sends them (`https://app.example.com`).
    pub origins: Vec<String>,
    /// `*` was listed: every origin is allowed.
    pub any_origin: bool,
    /// Overrides the route's upstream for this project's requests.
    pub upstream: Option<usize>,
    pub dev_keys: bool,
}

impl Project {
    pub fn allows_origin(&self, origin: &[u8]) -> bool {
        self.any_origin || self.origins.iter().any(|o| o.as_bytes() == origin)
    }
}

/// A listener's TLS configuration (certificate chain and key loaded).
#[derive(Clone)]
pub struct Tls(pub tokio_rustls::TlsAcceptor);

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Tls(..)")
    }
}

/// How the public listener treats connections.
#[derive(Clone)]
pub struct ServerSettings {
    /// Present when the listener terminates TLS.
    pub tls: Option<Tls>,
    pub max_connections: usize,
    /// Threads serving the public listener (one runtime and one set of upstream pools each).
    pub workers: usize,
    pub header_read_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub h2_max_concurrent_streams: u32,
    pub shutdown_grace: Duration,
}

impl fmt::Debug for ServerSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerSettings")
            .field("tls", &self.tls)
            .field("max_connections", &self.max_connections)
            .field("workers", &self.workers)
            .field("header_read_timeout", &self.header_read_timeout)
            .field("max_header_bytes", &self.max_header_bytes)
            .field("max_headers", &self.max_headers)
            .field("shutdown_grace", &self.shutdown_grace)
            .finish()
    }
}

/// At most this many public listener threads.
pub const MAX_WORKERS: usize = 256;

/// One public listener thread per CPU the process may use.
pub fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(MAX_WORKERS))
}

/// Dev key policy.
#[derive(Debug, Clone)]
pub struct DevKeySettings {
    pub enabled: bool,
    pub max_duration: Duration,
}

/// Where abuse-limit counters live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LimitBackend {
    Local,
    Redis(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimitSettings {
    pub backend: LimitBackend,
    pub prefix: String,
}

/// A validated, immutable config.
#[derive(Debug)]
pub struct Snapshot {
    pub source: PathBuf,
    /// Every file this snapshot was read from: the config and its includes.
    pub files: Vec<PathBuf>,
    pub listen: SocketAddr,
    pub server: ServerSettings,
    pub ops_listen: Option<SocketAddr>,
    pub ops_tls: Option<Tls>,
    pub store: StoreUrl,
    /// Full cache reloads from the store, if any.
    pub store_resync: Option<Duration>,
    pub projects: HashMap<String, Project>,
    pub scopes: ScopeIndex,
    pub guest_scopes: ScopeSet,
    pub implicit_scopes: ScopeSet,
    /// Present when ephemeral keys are enabled.
    pub ephemeral: Option<EphemeralSigner>,
    pub dev_keys: DevKeySettings,
    pub rate_limits: RateLimitSettings,
    pub usage_interval: Duration,
    pub upstreams: Vec<Upstream>,
    pub routes: RouteTable,
}

impl Snapshot {
    /// Loads and validates a config file and the files it includes.
    pub fn load(path: &Path) -> Result<Snapshot, ConfigError> {
        Self::load_after(path, None)
    }

    /// Loads the config that succeeds `previous` (a reload): scope names keep their bits and
    /// unchanged upstreams keep their connection pools.
    pub fn load_after(path: &Path, previous: Option<&Snapshot>) -> Result<Snapshot, ConfigError> {
        let text = read(path)?;
        Self::parse_after(path, &text, previous)
    }

    /// Reads this snapshot's source again, as the config that succeeds it.
    pub fn reload(&self) -> Result<Snapshot, ConfigError> {
        if self.source == Path::new(EMBEDDED_NAME) {
            Self::parse_after(&self.source, EMBEDDED_DEFAULT, Some(self))
        } else {
            Self::load_after(&self.source, Some(self))
        }
    }

    /// The embedded default config (`config/keygate.yaml` at build time).
    pub fn embedded_default() -> Result<Snapshot, ConfigError> {
        Self::parse(Path::new(EMBEDDED_NAME), EMBEDDED_DEFAULT)
    }

    /// Parses and validates config text; `file` names the source in errors and anchors relative
    /// include paths.
    pub fn parse(file: &Path, text: &str) -> Result<Snapshot, ConfigError> {
        Self::parse_after(file, text, None)
    }

    fn parse_after(
        file: &Path,
        text: &str,
        previous: Option<&Snapshot>,
    ) -> Result<Snapshot, ConfigError> {
        let raw: RawConfig = yaml::parse(file, text)?;
        let mut sources = vec![Source {
            file: file.to_owned(),
            text: text.to_owned(),
        }];
        let mut includes = Vec::new();
        for (i, name) in raw.include.iter().enumerate() {
            let path = file.parent().unwrap_or_else(|| Path::new("")).join(&**name);
            let included_text = read(&path).map_err(|mut err| {
                let at = yaml::locate(text, &format!("include[{i}]"));
                err.message = format!(
                    "{} (included from {}{})",
                    err.message,
                    file.display(),
                    at.map(|(l, _)| format!(":{l}")).unwrap_or_default()
                );
                err
            })?;
            let included: RawInclude = yaml::parse(&path, &included_text)?;
            sources.push(Source {
                file: path,
                text: included_text,
            });
            includes.push(included);
        }
        Validator {
            sources: &sources,
            previous,
        }
        .build(raw, includes)
    }

    pub fn project(&self, id: &str) -> Option<&Project> {
        self.projects.get(id)
    }
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|err| ConfigError {
        file: path.to_owned(),
        line: None,
        column: None,
        key: None,
        message: format!("cannot read the file: {err}"),
    })
}

struct Source {
    file: PathBuf,
    text: String,
}

struct Validator<'a> {
    /// The config first, then its includes in order.
    sources: &'a [Source],
    previous: Option<&'a Snapshot>,
}

/// A route and where it was written.
struct SourcedRoute<'r> {
    source: usize,
    key: String,
    raw: &'r RawRoute,
}

impl Validator<'_> {
    fn error_in(
        &self,
        source: usize,
        key: impl Into<String>,
        message: impl Into<String>,
    ) -> ConfigError {
        let key = key.into();
        let Source { file, text } = &self.sources[source];
        let location = yaml::locate(text, &key);
        ConfigError {
            file: file.clone(),
            line: location.map(|l| l.0),
            column: location.map(|l| l.1),
            key: Some(key),
            message: message.into(),
        }
    }

    fn error(&self, key: impl Into<String>, message: impl Into<String>) -> ConfigError {
        self.error_in(0, key, message)
    }

    fn build(&self, raw: RawConfig, includes: Vec<RawInclude>) -> Result<Snapshot, ConfigError> {
        let listen = self.socket_addr("server.listen", &raw.server.listen)?;
        let server = self.server_settings(&raw.server)?;
        let (ops_listen, ops_tls) = match &raw.ops {
            Some(ops) => (
                Some(self.socket_addr("ops.listen", &ops.listen)?),
                match &ops.tls {
                    Some(tls) => Some(self.tls("ops.tls", tls, true)?),
                    None => None,
                },
            ),
            None => (None, None),
        };
        let store = self.store_url(&raw.store.url)?;
        let store_resync = match (&raw.store.resync, &store) {
            (Some(value), _) => Some(self.duration("store.resync", value)?),
            (None, StoreUrl::Postgres(_)) => Some(Duration::from_secs(30)),
            (None, StoreUrl::Sqlite(_)) => None,
        };

        let dev_keys = DevKeySettings {
            enabled: raw.dev_keys.enabled.unwrap_or(true),
            max_duration: match &raw.dev_keys.max_duration {
                Some(value) => self.duration("dev_keys.max_duration", value)?,
                None => Duration::from_secs(30 * 24 * 3600),
            },
        };
        let rate_limits = RateLimitSettings {
            backend: match raw.rate_limits.backend.as_deref() {
                None | Some("local") => LimitBackend::Local,
                Some(url) if url.starts_with("redis://") => LimitBackend::Redis(url.to_owned()),
                Some(other) => {
                    return Err(self.error(
                        "rate_limits.backend",
                        format!("`{other}` is neither `local` nor a redis:// URL"),
                    ))
                }
            },
            prefix: raw
                .rate_limits
                .prefix
                .as_ref()
                .map_or_else(|| "keygate".to_owned(), |p| p.0.clone()),
        };

        let mut routes_in: Vec<SourcedRoute<'_>> = raw
            .routes
            .iter()
            .enumerate()
            .map(|(i, r)| SourcedRoute {
                source: 0,
                key: format!("routes[{i}]"),
                raw: r,
            })
            .collect();
        for (n, include) in includes.iter().enumerate() {
            routes_in.extend(
                include
                    .routes
                    .iter()
                    .enumerate()
                    .map(|(i, r)| SourcedRoute {
                        source: n + 1,
                        key: format!("routes[{i}]"),
                        raw: r,
                    }),
            );
        }

        // Guest scopes: the config's own, else the first include's profile.
        let (guest_source, guest_key, guest_names): (usize, &str, Vec<&str>) =
            match &raw.guest_scopes {
                Some(list) => (0, "guest_scopes", list.iter().map(|s| &**s).collect()),
                None => includes
                    .iter()
                    .enumerate()
                    .find_map(|(n, inc)| {
                        inc.guest_scopes.as_ref().map(|list| {
                            (n + 1, "guest_scopes", list.iter().map(|s| &**s).collect())
                        })
                    })
                    .unwrap_or((0, "guest_scopes", Vec::new())),
            };
        let implicit_names: Vec<&str> = match &raw.keys.implicit_scopes {
            Some(names) => names.iter().map(|n| &**n).collect(),
            None => DEFAULT_IMPLICIT_SCOPES.to_vec(),
        };
        for (source, key, names) in [
            (guest_source, guest_key, &guest_names),
            (0, "keys.implicit_scopes", &implicit_names),
        ] {
            if let Some(name) = names.iter().find(|n| MANAGEMENT_SCOPES.contains(n)) {
                return Err(self.error_in(
                    source,
                    key,
                    format!("`{name}` may only be granted to a key explicitly"),
                ));
            }
        }

        let scopes = self.scope_index(
            &raw,
            &includes,
            (guest_source, &guest_names),
            &implicit_names,
            &routes_in,
        )?;
        let implicit_scopes = scopes.compile_known(implicit_names.iter().copied());
        let guest_scopes = scopes.compile_known(guest_names.iter().copied());
        let ephemeral = self.ephemeral(&raw)?;
        let usage_interval = match &raw.keys.usage_interval {
            Some(value) => self.duration("keys.usage_interval", value)?,
            None => DEFAULT_USAGE_INTERVAL,
        };

        let mut upstream_index = HashMap::new();
        let mut upstreams = Vec::new();
        for (name, upstream) in &raw.upstreams {
            let built = self.upstream(name, upstream)?;
            upstream_index.insert(name.as_str(), upstreams.len());
            upstreams.push(built);
        }
        if upstreams.is_empty() {
            return Err(self.error("upstreams", "at least one upstream is required"));
        }

        let mut projects = HashMap::new();
        for (id, project) in &raw.projects {
            let key = format!("projects.{id}");
            if !crate::keys::is_valid_id(id) {
                return Err(self.error(
                    key,
                    "a project id is 1-36 characters of a-z A-Z 0-9 . _ - and starts with a letter or digit",
                ));
            }
            for (i, origin) in project.origins.iter().enumerate() {
                if &**origin != "*" && !is_valid_origin(origin) {
                    return Err(self.error(
                        format!("{key}.origins[{i}]"),
                        format!("`{}` is not an origin such as https://app.example.com (scheme://host[:port], no path)", &**origin),
                    ));
                }
            }
            let upstream = match &project.upstream {
                Some(name) => Some(*upstream_index.get(&**name).ok_or_else(|| {
                    self.error(
                        format!("{key}.upstream"),
                        format!("unknown upstream `{}`", &**name),
                    )
                })?),
                None => None,
            };
            projects.insert(
                id.clone(),
                Project {
                    origins: project
                        .origins
                        .iter()
                        .filter(|o| &***o != "*")
                        .map(|o| o.0.clone())
                        .collect(),
                    any_origin: project.origins.iter().any(|o| &**o == "*"),
                    upstream,
                    dev_keys: project.dev_keys.unwrap_or(dev_keys.enabled),
                },
            );
        }
        let default_upstream = match &raw.default_upstream {
            Some(name) => Some(*upstream_index.get(&**name).ok_or_else(|| {
                self.error(
                    "default_upstream",
                    format!("unknown upstream `{}`", &**name),
                )
            })?),
            None if upstreams.len() == 1 => Some(0),
            None => None,
        };

        let mut routes = RouteTable::default();
        for (method, path, endpoint, scope) in admin::ROUTES {
            let methods = MethodSet::parse(method).expect("built-in route methods are valid");
            routes
                .push(Route {
                    index: 0,
                    pattern: (*path).to_owned(),
                    methods,
                    scopes: scopes
                        .compile([*scope])
                        .expect("management scopes are always known"),
                    scope_names: (*scope).into(),
                    public: false,
                    target: RouteTarget::Admin(*endpoint),
                    rate_limit: None,
                    max_body: None,
                    project_segment: project_segment(path),
                })
                .expect("built-in route patterns are valid");
        }
        for route in &routes_in {
            let built = self.route(route, &scopes, &upstream_index, default_upstream)?;
            routes.push(built).map_err(|e| {
                self.error_in(route.source, format!("{}.path", route.key), e.to_string())
            })?;
        }

        Ok(Snapshot {
            source: self.sources[0].file.clone(),
            files: self.sources.iter().map(|s| s.file.clone()).collect(),
            listen,
            server,
            ops_listen,
            ops_tls,
            store,
            store_resync,
            projects,
            scopes,
            guest_scopes,
            implicit_scopes,
            ephemeral,
            dev_keys,
            rate_limits,
            usage_interval,
            upstreams,
            routes,
        })
    }

    /// Every scope name the config knows: listed under `scopes` (here or in an include), granted
    /// to guests or implicitly to keys, used by a route, or checked by keygate itself.
    fn scope_index(
        &self,
        raw: &RawConfig,
        includes: &[RawInclude],
        (guest_source, guest_names): (usize, &[&str]),
        implicit_names: &[&str],
        routes: &[SourcedRoute<'_>],
    ) -> Result<ScopeIndex, ConfigError> {
        let mut named: Vec<(usize, String, &str)> = Vec::new();
        for (i, s) in raw.scopes.iter().enumerate() {
            named.push((0, format!("scopes[{i}]"), s));
        }
        for (n, include) in includes.iter().enumerate() {
            for (i, s) in include.scopes.iter().enumerate() {
                named.push((n + 1, format!("scopes[{i}]"), s));
            }
        }

        named.extend(
            MANAGEMENT_SCOPES
                .iter()
                .map(|s| (0, "scopes".to_owned(), *s)),
        );
        for route in routes {
            for (i, s) in route.raw.scopes.iter().enumerate() {
                named.push((route.source, format!("{}.scopes[{i}]", route.key), s));
            }
        }
        let mut index = match self.previous {
            Some(previous) => ScopeIndex::succeeding(&previous.scopes),
            None => ScopeIndex::default(),
        };
        for (source, key, name) in named {
            if !is_valid_scope_name(name) {
                return Err(self.error_in(
                    source,
                    key,
                    format!("`{name}` is not a scope name (letters, digits and . _ - only)"),
                ));
            }
            if index.register(name).is_none() {
                return Err(self.error_in(
                    source,
                    key,
                    format!("more than {MAX_SCOPES} distinct scope names"),
                ));
            }
        }
        // Guest and implicit scopes grant, they do not declare: a name no route uses and no
        // `scopes:` list declares is a typo, not a scope.
        let granted = guest_names
            .iter()
            .map(|name| (guest_source, "guest_scopes", *name, true))
            .chain(implicit_names.iter().map(|name| {
                (
                    0,
                    "keys.implicit_scopes",
                    *name,
                    raw.keys.implicit_scopes.is_some(),
                )
            }));
        for (source, key, name, written) in granted {
            if index.knows(name) {
                continue;
            }
            if written {
                return Err(self.error_in(
                    source,
                    key,
                    format!("unknown scope `{name}`: no route uses it and no `scopes:` list declares it"),
                ));
            }
            // An unwritten default (Appwrite's implicit scopes) is simply known.
            index.register(name);
        }
        Ok(index)
    }

    fn ephemeral(&self, raw: &RawConfig) -> Result<Option<EphemeralSigner>, ConfigError> {
        let secret = match &raw.keys.ephemeral_secret {
            Some(secret) => Some(secret.0.clone()),
            None => std::env::var(EPHEMERAL_SECRET_ENV)
                .ok()
                .filter(|s| !s.is_empty()),
        };
        let enabled = raw.keys.ephemeral.unwrap_or(secret.is_some());
        match (enabled, secret) {
            (false, _) => Ok(None),
            (true, None) => Err(self.error(
                "keys.ephemeral",
                format!("ephemeral keys are enabled but no keys.ephemeral_secret (or {EPHEMERAL_SECRET_ENV}) is set"),
            )),
            (true, Some(secret)) if secret.len() < SECRET_MIN_LEN => Err(self.error(
                "keys.ephemeral_secret",
                format!("the ephemeral signing secret must be at least {SECRET_MIN_LEN} bytes"),
            )),
            (true, Some(secret)) => Ok(Some(EphemeralSigner::new(secret.as_bytes()))),
        }
    }

    fn route(
        &self,
        route: &SourcedRoute<'_>,
        scopes: &ScopeIndex,
        upstream_index: &HashMap<&str, usize>,
        default_upstream: Option<usize>,
    ) -> Result<Route, ConfigError> {
        let (source, key, raw) = (route.source, &route.key, route.raw);
        let err = |k: String, m: String| self.error_in(source, k, m);
        if raw.methods.is_empty() {
            return Err(err(
                format!("{key}.methods"),
                "list at least one method".into(),
            ));
        }
        let mut methods = MethodSet::empty();
        for (m, name) in raw.methods.iter().enumerate() {
            let parsed = MethodSet::parse(name).ok_or_else(|| {
                err(
                    format!("{key}.methods[{m}]"),
                    format!("`{}` is not an HTTP method (upper case, or `*`)", &**name),
                )
            })?;
            methods = methods.with(parsed);
        }
        match (raw.public, raw.scopes.is_empty()) {
            (true, false) => {
                return Err(err(
                    format!("{key}.scopes"),
                    "a public route takes no scopes".into(),
                ))
            }
            (false, true) => {
                return Err(err(
                    key.clone(),
                    "a route needs `scopes` (any one suffices) or `public: true`".into(),
                ))
            }
            _ => {}
        }
        let scope_set = scopes
            .compile(raw.scopes.iter().map(|s| &**s))
            .map_err(|e| err(format!("{key}.scopes"), e.to_string()))?;
        let upstream = match &raw.upstream {
            Some(name) => *upstream_index.get(&**name).ok_or_else(|| {
                err(
                    format!("{key}.upstream"),
                    format!("unknown upstream `{}`", &**name),
                )
            })?,
            None => default_upstream.ok_or_else(|| {
                err(
                    key.clone(),
                    "name an `upstream`, or set `default_upstream` (there are several upstreams)"
                        .into(),
                )
            })?,
        };
        let rate_limit = match &raw.rate_limit {
            None => None,
            Some(limit) => {
                let window =
                    self.duration_in(source, &format!("{key}.rate_limit.window"), &limit.window)?;
                let keys = limits::parse_key(&limit.key)
                    .map_err(|m| err(format!("{key}.rate_limit.key"), m))?;
                if limit.limit == 0 {
                    return Err(err(
                        format!("{key}.rate_limit.limit"),
                        "a limit must be at least 1".into(),
                    ));
                }
                Some(RateLimit {
                    limit: limit.limit,
                    window,
                    keys,
                })
            }
        };
        let max_body = match &raw.max_body {
            Some(value) => Some(parse_size(value).ok_or_else(|| {
                err(
                    format!("{key}.max_body"),
                    format!("`{}` is not a size such as 10MiB", &**value),
                )
            })?),
            None => None,
        };
        let scope_names: Vec<&str> = raw.scopes.iter().map(|s| &**s).collect();
        Ok(Route {
            max_body,
            index: 0,
            pattern: raw.path.0.clone(),
            methods,
            scopes: scope_set,
            scope_names: scope_names.join(", ").into(),
            public: raw.public,
            target: RouteTarget::Upstream(upstream),
            rate_limit,
            project_segment: project_segment(&raw.path),
        })
    }

    fn server_settings(&self, raw: &raw::RawServer) -> Result<ServerSettings, ConfigError> {
        let size =
            |key: &str, value: &Option<Text>, default: usize| -> Result<usize, ConfigError> {
                match value {
                    None => Ok(default),
                    Some(v) => parse_size(v)
                        .and_then(|n| usize::try_from(n).ok())
                        .ok_or_else(|| {
                            self.error(key, format!("`{}` is not a size such as 64KiB", &**v))
                        }),
                }
            };
        let duration =
            |key: &str, value: &Option<Text>, default: u64| -> Result<Duration, ConfigError> {
                match value {
                    None => Ok(Duration::from_secs(default)),
                    Some(v) => self.duration(key, v),
                }
            };
        let max_header_bytes = size("server.max_header_bytes", &raw.max_header_bytes, 64 * 1024)?;
        if max_header_bytes < 8192 {
            return Err(self.error("server.max_header_bytes", "must be at least 8KiB"));
        }
        Ok(ServerSettings {
            tls: match &raw.tls {
                Some(tls) => Some(self.tls("server.tls", tls, false)?),
                None => None,
            },
            max_connections: raw.max_connections.unwrap_or(10_000).max(1),
            workers: match raw.workers {
                None => default_workers(),
                Some(0) => return Err(self.error("server.workers", "must be at least 1")),
                Some(n) if n > MAX_WORKERS => {
                    return Err(self.error(
                        "server.workers",
                        format!("at most {MAX_WORKERS} (one per CPU core is the usual choice)"),
                    ))
                }
                Some(n) => n,
            },
            header_read_timeout: duration(
                "server.header_read_timeout",
                &raw.header_read_timeout,
                30,
            )?,
            max_header_bytes,
            max_headers: raw.max_headers.unwrap_or(100).max(1),
            h2_max_concurrent_streams: raw.h2_max_concurrent_streams.unwrap_or(256).max(1),
            shutdown_grace: duration("server.shutdown_grace", &raw.shutdown_grace, 30)?,
        })
    }

    /// TLS files are relative to the config file's directory.
    fn tls(&self, key: &str, raw: &raw::RawTls, allow_client_ca: bool) -> Result<Tls, ConfigError> {
        if raw.client_ca.is_some() && !allow_client_ca {
            return Err(self.error(
                format!("{key}.client_ca"),
                "client certificates are supported on the ops listener only",
            ));
        }
        let base = self.sources[0]
            .file
            .parent()
            .unwrap_or_else(|| Path::new(""));
        let cert = base.join(&*raw.cert);
        let private_key = base.join(&*raw.key);
        let client_ca = raw.client_ca.as_ref().map(|ca| base.join(&**ca));
        crate::tls::acceptor(&cert, &private_key, client_ca.as_deref())
            .map(Tls)
            .map_err(|msg| self.error(format!("{key}.cert"), msg))
    }

    fn upstream(&self, name: &str, raw: &raw::RawUpstream) -> Result<Upstream, ConfigError> {
        let key = format!("upstreams.{name}");
        let urls: Vec<String> = match (&raw.url, raw.urls.is_empty()) {
            (Some(url), true) => vec![url.0.clone()],
            (None, false) => raw.urls.iter().map(|u| u.0.clone()).collect(),
            _ => return Err(self.error(key, "give either `url` or `urls` (a list)")),
        };
        let balance = match raw.balance.as_deref() {
            None | Some("round_robin") => Balance::RoundRobin,
            Some("least_outstanding") => Balance::LeastOutstanding,
            Some(other) => {
                return Err(self.error(
                    format!("{key}.balance"),
                    format!("`{other}` is not round_robin or least_outstanding"),
                ))
            }
        };
        let duration = |field: &str, value: &Option<Text>, default: Duration| match value {
            Some(v) => self.duration(&format!("{key}.{field}"), v),
            None => Ok(default),
        };
        let ca_pem = match &raw.ca {
            Some(path) => {
                let path = self.sources[0]
                    .file
                    .parent()
                    .unwrap_or_else(|| Path::new(""))
                    .join(&**path);
                Some(std::fs::read(&path).map_err(|e| {
                    self.error(
                        format!("{key}.ca"),
                        format!("cannot read {}: {e}", path.display()),
                    )
                })?)
            }
            None => None,
        };
        let settings = UpstreamSettings {
            name: name.to_owned(),
            urls,
            forward_key: raw.forward_key,
            timeout: duration("timeout", &raw.timeout, Duration::from_secs(30))?,
            connect_timeout: duration(
                "connect_timeout",
                &raw.connect_timeout,
                Duration::from_secs(5),
            )?,
            idle_timeout: duration(
                "idle_timeout",
                &raw.idle_timeout,
                crate::proxy::upstream::DEFAULT_IDLE_TIMEOUT,
            )?,
            balance,
            eject_after: raw.eject_after.unwrap_or(3).max(1),
            eject_for: duration("eject_for", &raw.eject_for, Duration::from_secs(10))?,
            ca_pem,
        };
        let previous = self
            .previous
            .and_then(|p| p.upstreams.iter().find(|u| u.name() == name));
        let url_key = if raw.url.is_some() {
            format!("{key}.url")
        } else {
            format!("{key}.urls")
        };
        Upstream::new(settings, previous).map_err(|msg| self.error(url_key, msg))
    }

    fn socket_addr(&self, key: &str, value: &Text) -> Result<SocketAddr, ConfigError> {
        value.parse().map_err(|_| {
            self.error(
                key,
                format!("`{}` is not an address such as 127.0.0.1:8080", &**value),
            )
        })
    }

    fn store_url(&self, url: &Text) -> Result<StoreUrl, ConfigError> {
        StoreUrl::parse(url).map_err(|msg| self.error("store.url", msg))
    }

    fn duration(&self, key: &str, value: &Text) -> Result<Duration, ConfigError> {
        self.duration_in(0, key, value)
    }

    fn duration_in(&self, source: usize, key: &str, value: &Text) -> Result<Duration, ConfigError> {
        match humantime::parse_duration(value) {
            Ok(d) if !d.is_zero() => Ok(d),
            _ => Err(self.error_in(
                source,
                key,
                format!(
                    "`{}` is not a positive duration such as 30s or 500ms",
                    &**value
                ),
            )),
        }
    }
}

/// A byte size: a number with an optional unit (B, KB, KiB, MB, MiB, GB, GiB).
pub fn parse_size(value: &str) -> Option<u64> {
    let value = value.trim();
    let split = value
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(value.len());
    let (number, unit) = value.split_at(split);
    let number: u64 = number.parse().ok()?;
    let factor: u64 = match unit.trim() {
        "" | "B" => 1,
        "KB" | "kB" => 1000,
        "KiB" => 1 << 10,
        "MB" => 1000 * 1000,
        "MiB" => 1 << 20,
        "GB" => 1000 * 1000 * 1000,
        "GiB" => 1 << 30,
        _ => return None,
    };
    number.checked_mul(factor)
}

/// `scheme://host[:port]`, as browsers send `Origin`.
fn is_valid_origin(origin: &str) -> bool {
    let Ok(uri) = origin.parse::<http::Uri>() else {
        return false;
    };
    uri.scheme().is_some()
        && uri.authority().is_some_and(|a| !a.as_str().contains('@'))
        && uri.path_and_query().is_none_or(|pq| pq.as_str() == "/")
        && !origin.ends_with('/')
}

fn is_valid_scope_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

#[cfg(test)]
mod tests;

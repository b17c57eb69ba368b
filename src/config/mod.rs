//! Config: the YAML file, parsed in two stages (raw serde structs → a validated [`Snapshot`]),
//! with errors that name the file, line and key.
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

use crate::keys::scopes::{ScopeIndex, ScopeSet, MAX_SCOPES};
use crate::proxy::upstream::Upstream;
use crate::routes::{MethodSet, Route, RouteTable};
use raw::{RawConfig, RawRoute, Text};

/// The config keygate runs on when none is given: `config/keygate.yaml`, compiled in.
pub const EMBEDDED_DEFAULT: &str = include_str!("../../config/keygate.yaml");
const EMBEDDED_NAME: &str = "<embedded config/keygate.yaml>";

/// Appwrite's implicit scopes of every project key.
pub const DEFAULT_IMPLICIT_SCOPES: [&str; 3] = ["global", "health.read", "graphql"];
/// Scopes keygate's own key-management API checks; always known.
pub const BUILTIN_SCOPES: [&str; 2] = ["keys.read", "keys.write"];

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
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUrl {
    /// `sqlite://relative/path.db` (relative to the working directory) or `sqlite:///abs/path.db`.
    Sqlite(PathBuf),
}

/// A project keys and requests may belong to.
#[derive(Debug, Clone, Default)]
pub struct Project {
    pub origins: Vec<String>,
}

/// A secret from the config. Never printed.
#[derive(Clone)]
pub struct ConfigSecret(String);

impl ConfigSecret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ConfigSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ConfigSecret(<redacted>)")
    }
}

/// A validated, immutable config.
#[derive(Debug)]
pub struct Snapshot {
    pub source: PathBuf,
    pub listen: SocketAddr,
    pub ops_listen: Option<SocketAddr>,
    pub store: StoreUrl,
    pub projects: HashMap<String, Project>,
    pub scopes: ScopeIndex,
    pub guest_scopes: ScopeSet,
    pub implicit_scopes: ScopeSet,
    pub ephemeral_secret: Option<ConfigSecret>,
    pub upstreams: Vec<Upstream>,
    pub routes: RouteTable,
}

impl Snapshot {
    /// Loads and validates a config file.
    pub fn load(path: &Path) -> Result<Snapshot, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|err| ConfigError {
            file: path.to_owned(),
            line: None,
            column: None,
            key: None,
            message: format!("cannot read the file: {err}"),
        })?;
        Self::parse(path, &text)
    }

    /// The embedded default config (`config/keygate.yaml` at build time).
    pub fn embedded_default() -> Result<Snapshot, ConfigError> {
        Self::parse(Path::new(EMBEDDED_NAME), EMBEDDED_DEFAULT)
    }

    /// Parses and validates config text; `file` only names the source in errors.
    pub fn parse(file: &Path, text: &str) -> Result<Snapshot, ConfigError> {
        let raw: RawConfig = yaml::parse(file, text)?;
        Validator { file, text }.build(raw)
    }

    pub fn project(&self, id: &str) -> Option<&Project> {
        self.projects.get(id)
    }
}

struct Validator<'a> {
    file: &'a Path,
    text: &'a str,
}

impl Validator<'_> {
    fn error(&self, key: impl Into<String>, message: impl Into<String>) -> ConfigError {
        let key = key.into();
        let location = yaml::locate(self.text, &key);
        ConfigError {
            file: self.file.to_owned(),
            line: location.map(|l| l.0),
            column: location.map(|l| l.1),
            key: Some(key),
            message: message.into(),
        }
    }

    fn build(&self, raw: RawConfig) -> Result<Snapshot, ConfigError> {
        let listen = self.socket_addr("server.listen", &raw.server.listen)?;
        let ops_listen = match &raw.ops {
            Some(ops) => Some(self.socket_addr("ops.listen", &ops.listen)?),
            None => None,
        };
        let store = self.store_url(&raw.store.url)?;

        let mut projects = HashMap::new();
        for (id, project) in &raw.projects {
            if !crate::keys::is_valid_id(id) {
                return Err(self.error(
                    format!("projects.{id}"),
                    "a project id is 1-36 characters of a-z A-Z 0-9 . _ - and starts with a letter or digit",
                ));
            }
            projects.insert(
                id.clone(),
                Project {
                    origins: project.origins.iter().map(|o| o.0.clone()).collect(),
                },
            );
        }

        let scopes = self.scope_index(&raw)?;
        let implicit_names: Vec<&str> = match &raw.keys.implicit_scopes {
            Some(names) => names.iter().map(|n| &**n).collect(),
            None => DEFAULT_IMPLICIT_SCOPES.to_vec(),
        };
        let implicit_scopes = scopes.compile_known(implicit_names);
        let guest_scopes = scopes.compile_known(raw.guest_scopes.iter().map(|n| &**n));

        let ephemeral_secret = raw
            .keys
            .ephemeral_secret
            .as_ref()
            .map(|s| ConfigSecret(s.0.clone()));

        let mut upstream_index = HashMap::new();
        let mut upstreams = Vec::new();
        for (name, upstream) in &raw.upstreams {
            let key = format!("upstreams.{name}");
            let timeout =
                self.duration(&format!("{key}.timeout"), upstream.timeout.as_ref(), 30)?;
            let connect_timeout = self.duration(
                &format!("{key}.connect_timeout"),
                upstream.connect_timeout.as_ref(),
                5,
            )?;
            let built = Upstream::new(
                name,
                &upstream.url,
                upstream.forward_key,
                timeout,
                connect_timeout,
            )
            .map_err(|msg| self.error(format!("{key}.url"), msg))?;
            upstream_index.insert(name.as_str(), upstreams.len());
            upstreams.push(built);
        }
        if upstreams.is_empty() {
            return Err(self.error("upstreams", "at least one upstream is required"));
        }

        let mut routes = RouteTable::default();
        for (i, route) in raw.routes.iter().enumerate() {
            let built = self.route(i, route, &scopes, &upstream_index)?;
            routes
                .push(built)
                .map_err(|e| self.error(format!("routes[{i}].path"), e.to_string()))?;
        }

        Ok(Snapshot {
            source: self.file.to_owned(),
            listen,
            ops_listen,
            store,
            projects,
            scopes,
            guest_scopes,
            implicit_scopes,
            ephemeral_secret,
            upstreams,
            routes,
        })
    }

    /// Every scope name the config knows: listed under `scopes`, granted to guests or implicitly
    /// to keys, used by a route, or checked by keygate itself.
    fn scope_index(&self, raw: &RawConfig) -> Result<ScopeIndex, ConfigError> {
        let mut named: Vec<(String, &str)> = Vec::new();
        for (i, s) in raw.scopes.iter().enumerate() {
            named.push((format!("scopes[{i}]"), s));
        }
        for (i, s) in raw.guest_scopes.iter().enumerate() {
            named.push((format!("guest_scopes[{i}]"), s));
        }
        match &raw.keys.implicit_scopes {
            Some(list) => {
                for (i, s) in list.iter().enumerate() {
                    named.push((format!("keys.implicit_scopes[{i}]"), s));
                }
            }
            None => named.extend(
                DEFAULT_IMPLICIT_SCOPES
                    .iter()
                    .map(|s| ("keys.implicit_scopes".to_owned(), *s)),
            ),
        }
        named.extend(BUILTIN_SCOPES.iter().map(|s| ("scopes".to_owned(), *s)));
        for (r, route) in raw.routes.iter().enumerate() {
            for (i, s) in route.scopes.iter().enumerate() {
                named.push((format!("routes[{r}].scopes[{i}]"), s));
            }
        }
        let mut index = ScopeIndex::default();
        for (key, name) in named {
            if !is_valid_scope_name(name) {
                return Err(self.error(
                    key,
                    format!("`{name}` is not a scope name (letters, digits and . _ - only)"),
                ));
            }
            if index.register(name).is_none() {
                return Err(self.error(key, format!("more than {MAX_SCOPES} distinct scope names")));
            }
        }
        Ok(index)
    }

    fn route(
        &self,
        i: usize,
        raw: &RawRoute,
        scopes: &ScopeIndex,
        upstream_index: &HashMap<&str, usize>,
    ) -> Result<Route, ConfigError> {
        let key = format!("routes[{i}]");
        if raw.methods.is_empty() {
            return Err(self.error(format!("{key}.methods"), "list at least one method"));
        }
        let mut methods = MethodSet::empty();
        for (m, name) in raw.methods.iter().enumerate() {
            let parsed = MethodSet::parse(name).ok_or_else(|| {
                self.error(
                    format!("{key}.methods[{m}]"),
                    format!("`{}` is not an HTTP method (upper case, or `*`)", &**name),
                )
            })?;
            methods = methods.with(parsed);
        }
        match (raw.public, raw.scopes.is_empty()) {
            (true, false) => {
                return Err(self.error(format!("{key}.scopes"), "a public route takes no scopes"))
            }
            (false, true) => {
                return Err(self.error(
                    key,
                    "a route needs `scopes` (any one suffices) or `public: true`",
                ))
            }
            _ => {}
        }
        let scope_set = scopes
            .compile(raw.scopes.iter().map(|s| &**s))
            .map_err(|e| self.error(format!("{key}.scopes"), e.to_string()))?;
        let upstream = match &raw.upstream {
            Some(name) => *upstream_index.get(&**name).ok_or_else(|| {
                self.error(
                    format!("{key}.upstream"),
                    format!("unknown upstream `{}`", &**name),
                )
            })?,
            None if upstream_index.len() == 1 => 0,
            None => {
                return Err(self.error(
                    key,
                    "name an `upstream` (there is more than one to choose from)",
                ))
            }
        };
        let scope_names: Vec<&str> = raw.scopes.iter().map(|s| &**s).collect();
        Ok(Route {
            index: i,
            pattern: raw.path.0.clone(),
            methods,
            scopes: scope_set,
            scope_names: scope_names.join(", ").into(),
            public: raw.public,
            upstream,
        })
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
        match url.strip_prefix("sqlite://") {
            Some(path) if !path.is_empty() => Ok(StoreUrl::Sqlite(PathBuf::from(path))),
            _ => Err(self.error(
                "store.url",
                "expected sqlite://PATH (a relative path is taken from the working directory)",
            )),
        }
    }

    fn duration(
        &self,
        key: &str,
        value: Option<&Text>,
        default_secs: u64,
    ) -> Result<Duration, ConfigError> {
        let Some(value) = value else {
            return Ok(Duration::from_secs(default_secs));
        };
        match humantime::parse_duration(value) {
            Ok(d) if !d.is_zero() => Ok(d),
            _ => Err(self.error(
                key,
                format!(
                    "`{}` is not a positive duration such as 30s or 500ms",
                    &**value
                ),
            )),
        }
    }
}

fn is_valid_scope_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Snapshot, ConfigError> {
        Snapshot::parse(Path::new("test.yaml"), text)
    }

    const BASE: &str = r#"
server: { listen: "127.0.0.1:0" }
store: { url: "sqlite://data/test.db" }
projects: { demo: {} }
upstreams:
  api: { url: "http://127.0.0.1:9", forward_key: false, timeout: 2s }
"#;

    #[test]
    fn embedded_default_is_valid() {
        let snapshot = Snapshot::embedded_default().unwrap();
        assert!(!snapshot.routes.is_empty());
    }

    #[test]
    fn validation_errors_name_file_line_and_key() {
        let text = format!(
            "{BASE}routes:\n  - {{ methods: [GET], path: /a, scopes: [a.read] }}\n  - {{ methods: [GET], path: /b, scopes: [b.read], upstream: nope }}\n"
        );
        let err = parse(&text).unwrap_err();
        assert_eq!(err.key.as_deref(), Some("routes[1].upstream"));
        assert_eq!(err.line, Some(9));
        assert!(err.to_string().starts_with("test.yaml:9:"), "{err}");
        assert!(err.message.contains("nope"));
    }

    #[test]
    fn unknown_fields_are_refused_with_their_line() {
        let text = format!("{BASE}routes:\n  - {{ methods: [GET], path: /a, scope: [a] }}\n");
        let err = parse(&text).unwrap_err();
        assert_eq!(err.line, Some(8), "{err}");
        assert!(err.message.contains("unknown field `scope`"), "{err}");
        assert_eq!(err.key.as_deref(), Some("routes[0]"));
    }

    #[test]
    fn syntax_errors_name_the_line() {
        let err = parse("server: { listen: \"127.0.0.1:0\"\nstore: [").unwrap_err();
        assert!(err.line.is_some(), "{err}");
    }

    #[test]
    fn routes_need_scopes_or_public() {
        let text = format!("{BASE}routes:\n  - {{ methods: [GET], path: /a }}\n");
        assert!(parse(&text).unwrap_err().message.contains("public"));
        let text = format!(
            "{BASE}routes:\n  - {{ methods: [GET], path: /a, public: true, scopes: [x] }}\n"
        );
        assert!(parse(&text).is_err());
        let text = format!("{BASE}routes:\n  - {{ methods: [get], path: /a, public: true }}\n");
        assert_eq!(
            parse(&text).unwrap_err().key.as_deref(),
            Some("routes[0].methods[0]")
        );
    }

    #[test]
    fn scopes_known_from_every_source() {
        let text = format!(
            "{BASE}scopes: [extra.scope]\nguest_scopes: [locale.read]\nroutes:\n  - {{ methods: [GET], path: /a, scopes: [a.read, a.write] }}\n"
        );
        let snapshot = parse(&text).unwrap();
        for name in [
            "extra.scope",
            "locale.read",
            "a.read",
            "a.write",
            "global",
            "keys.write",
        ] {
            assert!(snapshot.scopes.knows(name), "{name}");
        }
        assert!(!snapshot.scopes.knows("a.reda"));
        assert!(!snapshot.guest_scopes.is_empty());
    }

    #[test]
    fn env_substitution_errors_point_at_the_value() {
        let text = format!(
            "{BASE}keys: {{ ephemeral_secret: \"${{KEYGATE_TEST_UNSET_VARIABLE}}\" }}\nroutes: []\n"
        );
        let err = parse(&text).unwrap_err();
        assert!(err.message.contains("KEYGATE_TEST_UNSET_VARIABLE"), "{err}");
        assert_eq!(err.line, Some(7), "{err}");
    }

    #[test]
    fn json_loads_too() {
        let json = r#"{"server": {"listen": "127.0.0.1:0"}, "store": {"url": "sqlite://x.db"},
            "upstreams": {"a": {"url": "http://127.0.0.1:1"}},
            "routes": [{"methods": ["GET"], "path": "/x/{id}", "scopes": ["x.read"]}]}"#;
        let snapshot = parse(json).unwrap();
        assert_eq!(snapshot.routes.len(), 1);
    }
}

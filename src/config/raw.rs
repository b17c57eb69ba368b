//! Stage one of config loading: the file's shape, exactly. Every struct refuses unknown fields so
//! a misspelt key is an error, and every string expands `${ENV}` references as it is read.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Deserializer};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConfig {
    /// Route maps to append after `routes`, relative to this file (see [`RawInclude`]).
    #[serde(default)]
    pub include: Vec<Text>,
    pub server: RawServer,
    #[serde(default)]
    pub ops: Option<RawOps>,
    pub store: RawStore,
    #[serde(default)]
    pub projects: BTreeMap<String, RawProject>,
    #[serde(default)]
    pub guest_scopes: Option<Vec<Text>>,
    #[serde(default)]
    pub keys: RawKeys,
    #[serde(default)]
    pub dev_keys: RawDevKeys,
    #[serde(default)]
    pub rate_limits: RawRateLimits,
    /// Extra scope names keys may hold although no route uses them yet.
    #[serde(default)]
    pub scopes: Vec<Text>,
    pub upstreams: BTreeMap<String, RawUpstream>,
    /// The upstream of routes that name none (required when there are several upstreams).
    #[serde(default)]
    pub default_upstream: Option<Text>,
    #[serde(default)]
    pub routes: Vec<RawRoute>,
}

/// An included route map, such as `config/appwrite.yaml`: routes, the scope names they bring,
/// and the guest scopes of that profile (used when the including file sets none).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawInclude {
    #[serde(default)]
    pub guest_scopes: Option<Vec<Text>>,
    #[serde(default)]
    pub scopes: Vec<Text>,
    #[serde(default)]
    pub routes: Vec<RawRoute>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawServer {
    pub listen: Text,
    #[serde(default)]
    pub tls: Option<RawTls>,
    /// Open client connections at most; further connections wait in the listen backlog.
    #[serde(default)]
    pub max_connections: Option<usize>,
    /// Threads serving the public listener, each with its own upstream connection pools.
    #[serde(default)]
    pub workers: Option<usize>,
    /// Time a client has to send its request head.
    #[serde(default)]
    pub header_read_timeout: Option<Text>,
    /// Request head size limit (HTTP/1.1 buffer, HTTP/2 header list); over it: 431.
    #[serde(default)]
    pub max_header_bytes: Option<Text>,
    /// Request header count limit; over it: 431.
    #[serde(default)]
    pub max_headers: Option<usize>,
    /// Concurrent HTTP/2 streams per connection.
    #[serde(default)]
    pub h2_max_concurrent_streams: Option<u32>,
    /// How long requests in flight may take to finish after SIGTERM/SIGINT.
    #[serde(default)]
    pub shutdown_grace: Option<Text>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTls {
    pub cert: Text,
    pub key: Text,
    /// CA bundle that client certificates must chain to (ops listener only): clients must
    /// present one.
    #[serde(default)]
    pub client_ca: Option<Text>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawOps {
    pub listen: Text,
    #[serde(default)]
    pub tls: Option<RawTls>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawStore {
    pub url: Text,
    /// How often the whole cache is reloaded from the store, to catch changes a feed missed
    /// (default: 30s for PostgreSQL; never for SQLite, whose change table misses nothing).
    #[serde(default)]
    pub resync: Option<Text>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawProject {
    /// Browser origins allowed to call on behalf of this project (`*`: any).
    #[serde(default)]
    pub origins: Vec<Text>,
    /// Send this project's requests to this upstream instead of the route's.
    #[serde(default)]
    pub upstream: Option<Text>,
    /// Dev keys for this project (default: as `dev_keys.enabled`).
    #[serde(default)]
    pub dev_keys: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDevKeys {
    #[serde(default)]
    pub enabled: Option<bool>,
    /// The longest expiry a dev key may be given (default 30d).
    #[serde(default)]
    pub max_duration: Option<Text>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRateLimits {
    /// `local` (default) or `redis://host:port/db` to share counters between nodes.
    #[serde(default)]
    pub backend: Option<Text>,
    /// Prefix of the Redis keys (default `keygate`).
    #[serde(default)]
    pub prefix: Option<Text>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawKeys {
    #[serde(default)]
    pub implicit_scopes: Option<Vec<Text>>,
    /// Ephemeral keys on or off; by default on exactly when a secret is configured.
    #[serde(default)]
    pub ephemeral: Option<bool>,
    #[serde(default)]
    pub ephemeral_secret: Option<Text>,
    /// How often `accessedAt` is written at most (Appwrite: 24h).
    #[serde(default)]
    pub usage_interval: Option<Text>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawUpstream {
    /// One address (`url`) or several (`urls`), balanced.
    #[serde(default)]
    pub url: Option<Text>,
    #[serde(default)]
    pub urls: Vec<Text>,
    /// `round_robin` (default) or `least_outstanding`.
    #[serde(default)]
    pub balance: Option<Text>,
    /// Consecutive failures after which an address is ejected (default 3).
    #[serde(default)]
    pub eject_after: Option<u32>,
    /// How long an ejected address rests (default 10s).
    #[serde(default)]
    pub eject_for: Option<Text>,
    /// CA bundle for https:// upstreams (default: the system's roots).
    #[serde(default)]
    pub ca: Option<Text>,
    #[serde(default)]
    pub forward_key: bool,
    #[serde(default)]
    pub timeout: Option<Text>,
    #[serde(default)]
    pub connect_timeout: Option<Text>,
    #[serde(default)]
    pub idle_timeout: Option<Text>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRoute {
    pub methods: Vec<Text>,
    pub path: Text,
    #[serde(default)]
    pub scopes: Vec<Text>,
    #[serde(default)]
    pub upstream: Option<Text>,
    #[serde(default)]
    pub public: bool,
    #[serde(default)]
    pub rate_limit: Option<RawRateLimit>,
    /// Request body size limit (e.g. `10MiB`); over it: 413.
    #[serde(default)]
    pub max_body: Option<Text>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRateLimit {
    pub limit: u32,
    pub window: Text,
    /// Appwrite's key template (`url:{url},ip:{ip}`, alternatives joined by `|`) or a plain
    /// comma list of placeholder names (`ip,method,url`).
    pub key: Text,
}

/// A string from the config with `${NAME}` replaced by the environment variable `NAME`
/// (`$${` writes a literal `${`). An unset variable is an error at the line that names it.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Text(pub String);

impl fmt::Debug for Text {
    // Expanded values are often secrets; raw config is never printed whole.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Text(..)")
    }
}

impl std::ops::Deref for Text {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(deserializer)?;
        expand_env(&raw, |name| std::env::var(name).ok())
            .map(Text)
            .map_err(serde::de::Error::custom)
    }
}

pub(crate) fn expand_env(
    raw: &str,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<String, String> {
    if !raw.contains('$') {
        return Ok(raw.to_owned());
    }
    let mut out = String::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(tail) = after.strip_prefix("${") {
            out.push_str("${");
            rest = tail;
        } else if let Some(tail) = after.strip_prefix('{') {
            let end = tail
                .find('}')
                .ok_or_else(|| "unterminated ${ in value".to_owned())?;
            let name = &tail[..end];
            if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                return Err(format!(
                    "`${{{name}}}` is not a valid environment variable reference"
                ));
            }
            let value =
                lookup(name).ok_or_else(|| format!("environment variable `{name}` is not set"))?;
            out.push_str(&value);
            rest = &tail[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        (name == "SECRET").then(|| "s3cr3t".to_owned())
    }

    #[test]
    fn expands_and_escapes() {
        assert_eq!(expand_env("a${SECRET}b", env).unwrap(), "as3cr3tb");
        assert_eq!(expand_env("$${SECRET}", env).unwrap(), "${SECRET}");
        assert_eq!(expand_env("cost $5", env).unwrap(), "cost $5");
        assert!(expand_env("${MISSING}", env)
            .unwrap_err()
            .contains("MISSING"));
        assert!(expand_env("${SECRET", env).is_err());
        assert!(expand_env("${A-B}", env).is_err());
    }
}

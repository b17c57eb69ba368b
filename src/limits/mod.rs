//! Abuse limits: per-route request budgets in Appwrite's terms (limit, window, key template).
//!
//! This module owns the compiled form of a route's `rate_limit`; the counters live beside it.

use std::time::Duration;

/// One value a limit key is built from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placeholder {
    /// The client's address.
    Ip,
    /// The route's template (`/v1/users/{userId}`), not the concrete path.
    Url,
    Method,
    /// The caller's key id (Appwrite's user id); empty for guests.
    UserId,
    ProjectId,
    /// A path parameter of the route, or a JSON/query parameter of the request.
    Param(String),
    /// The chunk of a chunked upload (`Content-Range` start).
    ChunkId,
}

impl Placeholder {
    fn parse(name: &str) -> Option<Placeholder> {
        Some(match name {
            "ip" => Placeholder::Ip,
            "url" => Placeholder::Url,
            "method" => Placeholder::Method,
            "userId" => Placeholder::UserId,
            "projectId" => Placeholder::ProjectId,
            "chunkId" => Placeholder::ChunkId,
            other => Placeholder::Param(other.strip_prefix("param-")?.to_owned()),
        })
        .filter(|p| !matches!(p, Placeholder::Param(name) if name.is_empty()))
    }
}

/// The values one counter is keyed by.
pub type KeyTemplate = Vec<Placeholder>;

/// A route's compiled abuse limit. Every template is counted separately; a request is refused
/// when any of its counters is over the limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimit {
    pub limit: u32,
    pub window: Duration,
    pub keys: Vec<KeyTemplate>,
}

/// Parses a key: Appwrite's template form (`url:{url},ip:{ip}|url:{url},email:{param-email}`)
/// or a plain comma list of placeholder names (`ip,method,url`).
pub fn parse_key(key: &str) -> Result<Vec<KeyTemplate>, String> {
    key.split('|')
        .map(|alternative| {
            let names: Vec<&str> = if alternative.contains('{') {
                alternative
                    .split('{')
                    .skip(1)
                    .map(|rest| rest.split_once('}').map_or(rest, |(name, _)| name))
                    .collect()
            } else {
                alternative.split(',').map(str::trim).collect()
            };
            if names.is_empty() || names.iter().any(|n| n.is_empty()) {
                return Err(format!("`{alternative}` names no placeholder"));
            }
            names
                .into_iter()
                .map(|name| {
                    Placeholder::parse(name).ok_or_else(|| {
                        format!(
                            "unknown placeholder `{name}` (ip, url, method, userId, projectId, chunkId, param-<name>)"
                        )
                    })
                })
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_forms() {
        assert_eq!(
            parse_key("ip,method,url").unwrap(),
            vec![vec![Placeholder::Ip, Placeholder::Method, Placeholder::Url]]
        );
        assert_eq!(
            parse_key("url:{url},email:{param-email}|url:{url},ip:{ip}").unwrap(),
            vec![
                vec![Placeholder::Url, Placeholder::Param("email".into())],
                vec![Placeholder::Url, Placeholder::Ip]
            ]
        );
        assert!(parse_key("ip,bogus").is_err());
        assert!(parse_key("").is_err());
        assert!(parse_key("x:{param-}").is_err());
    }
}

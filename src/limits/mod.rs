//! Abuse limits: per-route request budgets in Appwrite's terms (limit, window, key template).
//!
//! This module owns the compiled form of a route's `rate_limit` and how a request is counted
//! against it; the counters themselves are in [`counter`].

pub mod counter;

use std::time::Duration;

/// One value a limit key is built from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placeholder {
    /// The client's address.
    Ip,
    /// The route's template (`/v1/users/{userId}`), not the concrete path.
    Url,
    Method,
    /// The caller's key id in place of Appwrite's session user id, which keygate does not
    /// see; empty for guests (the only callers route limits count).
    UserId,
    ProjectId,
    /// A path parameter of the route, else a query parameter of the request. Body parameters
    /// are not read (bodies are streamed, never buffered for a limit): a template that names
    /// one counts every request of the route with an empty value, one shared budget — stricter
    /// than Appwrite, never looser.
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

/// What a request offers for building its counter keys.
pub struct RequestFacts<'a> {
    pub ip: std::net::IpAddr,
    pub method: &'a http::Method,
    pub route: &'a crate::routes::Route,
    /// The route's path parameters for this request.
    pub params: &'a [(String, &'a str)],
    pub query: Option<&'a str>,
    pub headers: &'a http::HeaderMap,
    pub key_id: &'a str,
    pub project: &'a str,
}

/// The counter key of one template for one request: the route's pattern and methods, and each
/// placeholder's value, hashed so that every node derives the same key.
pub fn counter_key(template: &KeyTemplate, facts: &RequestFacts<'_>) -> String {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    hasher.update(facts.route.pattern.as_bytes());
    hasher.update(format!("{:?}", facts.route.methods).as_bytes());
    for placeholder in template {
        hasher.update([0u8]);
        match placeholder {
            Placeholder::Ip => hasher.update(facts.ip.to_string().as_bytes()),
            Placeholder::Url => hasher.update(facts.route.pattern.as_bytes()),
            Placeholder::Method => hasher.update(facts.method.as_str().as_bytes()),
            Placeholder::UserId => hasher.update(facts.key_id.as_bytes()),
            Placeholder::ProjectId => hasher.update(facts.project.as_bytes()),
            Placeholder::ChunkId => hasher.update(
                facts
                    .headers
                    .get(http::header::CONTENT_RANGE)
                    .map(|v| v.as_bytes())
                    .unwrap_or_default(),
            ),
            Placeholder::Param(name) => {
                // A path parameter, else a query parameter. Body parameters are not read: the
                // request body is streamed, never buffered for a limit.
                let from_path = facts
                    .params
                    .iter()
                    .find(|(n, _)| n == name)
                    .map(|(_, v)| (*v).to_owned());
                let value = from_path.or_else(|| {
                    form_urlencoded::parse(facts.query.unwrap_or("").as_bytes())
                        .find(|(k, _)| k == name)
                        .map(|(_, v)| v.into_owned())
                });
                hasher.update(value.unwrap_or_default().as_bytes());
            }
        }
    }
    hex::encode(&hasher.finalize()[..16])
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

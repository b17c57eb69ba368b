//! Header rewriting between client and upstream, in one place: hop-by-hop headers, forwarding
//! headers, identity headers and the API key.

use std::cell::RefCell;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::auth::{DEV_KEY_HEADER, KEY_HEADER};
use crate::keys::scopes::{ScopeIndex, ScopeSet};

pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub const IDENTITY_KEY_ID: HeaderName = HeaderName::from_static("x-keygate-key-id");
pub const IDENTITY_PROJECT: HeaderName = HeaderName::from_static("x-keygate-project");
pub const IDENTITY_SCOPES: HeaderName = HeaderName::from_static("x-keygate-scopes");
const IDENTITY_PREFIX: &str = "x-keygate-";
const KEY: HeaderName = HeaderName::from_static(KEY_HEADER);
const DEV_KEY: HeaderName = HeaderName::from_static(DEV_KEY_HEADER);
const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// Headers that describe one connection and must not cross a proxy (RFC 9110 §7.6.1), plus the
/// proxy-auth pair, which is meant for this hop alone.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// The names `Connection` lists (the rare request that has any).
fn connection_listed(headers: &HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        // `keep-alive`, a usual value, is hop-by-hop anyway.
        .filter(|name| !name.eq_ignore_ascii_case("keep-alive"))
        .filter_map(|name| HeaderName::from_bytes(name.as_bytes()).ok())
        .collect()
}

/// Removes hop-by-hop headers (and `Upgrade`), including any that `Connection` names, and those
/// `also` picks, in one pass over the names present: a request carries a handful of headers, so
/// comparing each with the short lists is cheaper than hashing every name that might be there.
fn remove_where(headers: &mut HeaderMap, also: impl Fn(&HeaderName) -> bool) {
    let listed = connection_listed(headers);
    let doomed: Vec<HeaderName> = headers
        .keys()
        .filter(|&name| {
            HOP_BY_HOP.contains(name)
                || *name == header::UPGRADE
                || listed.contains(name)
                || also(name)
        })
        .cloned()
        .collect();
    for name in doomed {
        headers.remove(name);
    }
}

/// How many scope sets each thread keeps the header value of.
const SCOPE_HEADERS_KEPT: usize = 32;

thread_local! {
    /// Recently sent scope sets and their header values, oldest first. A bit names the same
    /// scope for the life of the process ([`ScopeIndex`]), so an entry never goes stale.
    static SCOPE_HEADERS: RefCell<Vec<(ScopeSet, HeaderValue)>> = const { RefCell::new(Vec::new()) };
}

/// The `X-Keygate-Scopes` value for a scope set: its names in index order, comma-separated.
/// Requests of the same key send the same set, so the value is made once per thread and set.
pub fn scopes_header(index: &ScopeIndex, set: &ScopeSet) -> Option<HeaderValue> {
    SCOPE_HEADERS.with_borrow_mut(|kept| {
        if let Some((_, value)) = kept.iter().find(|(s, _)| s == set) {
            return Some(value.clone());
        }
        let value = HeaderValue::from_str(&index.names_of(set).join(",")).ok()?;
        if kept.len() == SCOPE_HEADERS_KEPT {
            kept.remove(0);
        }
        kept.push((*set, value.clone()));
        Some(value)
    })
}

/// What the upstream should learn about the caller.
pub struct Forwarding<'a> {
    /// The client's IP address, as a header value (made once per connection).
    pub peer: &'a HeaderValue,
    pub https: bool,
    pub request_id: &'a HeaderValue,
    pub forward_key: bool,
    pub key_id: Option<&'a str>,
    pub project: Option<&'a str>,
    /// The caller's scopes, comma-separated (see [`scopes_header`]).
    pub scopes: Option<&'a HeaderValue>,
    /// Host for upstream requests that arrived without one (HTTP/2 sends `:authority`).
    pub authority: Option<&'a str>,
    /// An HTTP/1.1 upgrade: `Upgrade` is kept (it is what the upstream must agree to).
    pub upgrade: bool,
}

/// Rewrites client request headers into upstream request headers.
pub fn to_upstream(headers: &mut HeaderMap, fwd: &Forwarding<'_>) {
    let upgrade = if fwd.upgrade {
        headers.get(header::UPGRADE).cloned()
    } else {
        None
    };
    // Identity headers are keygate's to write, credentials are for keygate alone when the
    // upstream does not check them itself, and what clients claim about earlier hops is not
    // passed on (keygate is the edge): drop every client-sent copy first.
    remove_where(headers, |name| {
        name.as_str().starts_with(IDENTITY_PREFIX)
            || *name == header::FORWARDED
            || *name == X_REAL_IP
            || *name == X_FORWARDED_HOST
            || (!fwd.forward_key && (*name == KEY || *name == DEV_KEY))
    });
    if let Some(protocol) = upgrade {
        headers.insert(header::UPGRADE, protocol);
    }
    if !fwd.forward_key {
        if let Some(id) = fwd.key_id.and_then(|v| HeaderValue::from_str(v).ok()) {
            headers.insert(IDENTITY_KEY_ID, id);
        }
        if let Some(project) = fwd.project.and_then(|v| HeaderValue::from_str(v).ok()) {
            headers.insert(IDENTITY_PROJECT, project);
        }
        if let Some(scopes) = fwd.scopes {
            headers.insert(IDENTITY_SCOPES, scopes.clone());
        }
    }

    let host = match headers.get(header::HOST) {
        Some(host) => Some(host.clone()),
        None => fwd.authority.and_then(|a| HeaderValue::from_str(a).ok()),
    };
    if let Some(host) = host {
        headers.insert(header::HOST, host.clone());
        headers.insert(X_FORWARDED_HOST, host);
    }
    headers.insert(X_FORWARDED_FOR, fwd.peer.clone());
    headers.insert(
        X_FORWARDED_PROTO,
        HeaderValue::from_static(if fwd.https { "https" } else { "http" }),
    );
    headers.insert(REQUEST_ID, fwd.request_id.clone());
}

/// Rewrites upstream response headers into client response headers. CORS is keygate's to
/// grant: an upstream's own grant is dropped.
pub fn to_client(headers: &mut HeaderMap) {
    remove_where(headers, |name| {
        *name == header::ACCESS_CONTROL_ALLOW_ORIGIN
            || *name == header::ACCESS_CONTROL_ALLOW_CREDENTIALS
            || *name == header::ACCESS_CONTROL_EXPOSE_HEADERS
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forwarding<'a>(id: &'a HeaderValue, forward_key: bool) -> Forwarding<'a> {
        static PEER: HeaderValue = HeaderValue::from_static("10.0.0.1");
        static SCOPES: HeaderValue = HeaderValue::from_static("users.read");
        Forwarding {
            peer: &PEER,
            https: false,
            request_id: id,
            forward_key,
            key_id: Some("k1"),
            project: Some("demo"),
            scopes: Some(&SCOPES),
            authority: None,
            upgrade: false,
        }
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        map
    }

    #[test]
    fn scopes_header_lists_the_names_of_a_set_and_keeps_it_per_thread() {
        let mut index = ScopeIndex::default();
        for name in ["users.read", "files.write", "files.read"] {
            index.register(name).unwrap();
        }
        let set = index.compile(["users.read", "files.write"]).unwrap();
        let value = scopes_header(&index, &set).unwrap();
        assert_eq!(value, "users.read,files.write");
        assert_eq!(scopes_header(&index, &set).unwrap(), value);
        let other = index.compile(["files.write"]).unwrap();
        assert_eq!(scopes_header(&index, &other).unwrap(), "files.write");
        assert_eq!(scopes_header(&index, &ScopeSet::default()).unwrap(), "");
    }

    #[test]
    fn strips_hop_by_hop_and_connection_listed() {
        let mut h = headers(&[
            ("connection", "close, x-secret-hop"),
            ("x-secret-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("x-kept", "1"),
        ]);
        remove_where(&mut h, |_| false);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn identity_replaces_key_and_spoofs() {
        let id = HeaderValue::from_static("req-1");
        let mut h = headers(&[
            ("x-appwrite-key", "standard_abc"),
            ("x-appwrite-dev-key", "dev_abc"),
            ("x-keygate-key-id", "admin"),
            ("X-Keygate-Anything", "x"),
            ("x-forwarded-for", "1.2.3.4"),
            ("host", "api.example.com"),
        ]);
        to_upstream(&mut h, &forwarding(&id, false));
        assert!(!h.contains_key("x-appwrite-key"));
        assert!(!h.contains_key("x-appwrite-dev-key"));
        assert_eq!(h["x-keygate-key-id"], "k1");
        assert_eq!(h["x-keygate-project"], "demo");
        assert_eq!(h["x-keygate-scopes"], "users.read");
        assert!(!h.contains_key("x-keygate-anything"));
        assert_eq!(h["x-forwarded-for"], "10.0.0.1");
        assert_eq!(h["x-forwarded-host"], "api.example.com");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-request-id"], "req-1");
    }

    #[test]
    fn forward_key_keeps_key_and_sends_no_identity() {
        let id = HeaderValue::from_static("req-2");
        let mut h = headers(&[
            ("x-appwrite-key", "standard_abc"),
            ("x-keygate-key-id", "admin"),
        ]);
        to_upstream(&mut h, &forwarding(&id, true));
        assert_eq!(h["x-appwrite-key"], "standard_abc");
        assert!(!h.contains_key("x-keygate-key-id"));
    }
}

//! Header rewriting between client and upstream, in one place: hop-by-hop headers, forwarding
//! headers, identity headers and the API key.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::auth::KEY_HEADER;

pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub const IDENTITY_KEY_ID: HeaderName = HeaderName::from_static("x-keygate-key-id");
pub const IDENTITY_PROJECT: HeaderName = HeaderName::from_static("x-keygate-project");
pub const IDENTITY_SCOPES: HeaderName = HeaderName::from_static("x-keygate-scopes");
const IDENTITY_PREFIX: &str = "x-keygate-";
const DEV_KEY_HEADER: &str = "x-appwrite-dev-key";

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

/// Removes hop-by-hop headers, including any that `Connection` names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    headers.remove(header::UPGRADE);
}

/// What the upstream should learn about the caller.
pub struct Forwarding<'a> {
    pub peer: IpAddr,
    pub https: bool,
    pub request_id: &'a HeaderValue,
    pub forward_key: bool,
    pub key_id: Option<&'a str>,
    pub project: Option<&'a str>,
    pub scopes: &'a str,
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
    strip_hop_by_hop(headers);
    if let Some(protocol) = upgrade {
        headers.insert(header::UPGRADE, protocol);
    }

    // Identity headers are keygate's to write: drop every client-sent copy first.
    let spoofed: Vec<HeaderName> = headers
        .keys()
        .filter(|name| name.as_str().starts_with(IDENTITY_PREFIX))
        .cloned()
        .collect();
    for name in spoofed {
        headers.remove(name);
    }
    if !fwd.forward_key {
        // Credentials are for keygate alone when the upstream does not check them itself.
        headers.remove(KEY_HEADER);
        headers.remove(DEV_KEY_HEADER);
        if let Some(id) = fwd.key_id.and_then(|v| HeaderValue::from_str(v).ok()) {
            headers.insert(IDENTITY_KEY_ID, id);
        }
        if let Some(project) = fwd.project.and_then(|v| HeaderValue::from_str(v).ok()) {
            headers.insert(IDENTITY_PROJECT, project);
        }
        if let Ok(scopes) = HeaderValue::from_str(fwd.scopes) {
            headers.insert(IDENTITY_SCOPES, scopes);
        }
    }

    // keygate is the edge: what clients claim about earlier hops is not passed on.
    headers.remove(header::FORWARDED);
    headers.remove("x-real-ip");
    if !headers.contains_key(header::HOST) {
        if let Some(host) = fwd.authority.and_then(|a| HeaderValue::from_str(a).ok()) {
            headers.insert(header::HOST, host);
        }
    }
    let host = headers.get(header::HOST).cloned();
    headers.remove("x-forwarded-host");
    if let Some(host) = host {
        headers.insert("x-forwarded-host", host);
    }
    headers.insert(
        "x-forwarded-for",
        HeaderValue::from_str(&fwd.peer.to_string()).expect("an IP address is a valid header"),
    );
    headers.insert(
        "x-forwarded-proto",
        HeaderValue::from_static(if fwd.https { "https" } else { "http" }),
    );
    headers.insert(REQUEST_ID, fwd.request_id.clone());
}

/// Rewrites upstream response headers into client response headers. CORS is keygate's to
/// grant: an upstream's own grant is dropped.
pub fn to_client(headers: &mut HeaderMap) {
    strip_hop_by_hop(headers);
    for name in [
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
    ] {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forwarding<'a>(id: &'a HeaderValue, forward_key: bool) -> Forwarding<'a> {
        Forwarding {
            peer: "10.0.0.1".parse().unwrap(),
            https: false,
            request_id: id,
            forward_key,
            key_id: Some("k1"),
            project: Some("demo"),
            scopes: "users.read",
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
    fn strips_hop_by_hop_and_connection_listed() {
        let mut h = headers(&[
            ("connection", "close, x-secret-hop"),
            ("x-secret-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("x-kept", "1"),
        ]);
        strip_hop_by_hop(&mut h);
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

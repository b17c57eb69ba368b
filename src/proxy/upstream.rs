//! An upstream: where a route's requests go, with its own pooled keep-alive client and timeouts.

use std::time::Duration;

use http::uri::{Authority, PathAndQuery, Scheme};
use http::Uri;
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

pub type UpstreamClient = Client<HttpConnector, Incoming>;

pub struct Upstream {
    pub name: String,
    scheme: Scheme,
    authority: Authority,
    /// A path prefix from the upstream URL, without a trailing `/` (often empty).
    prefix: String,
    /// Forward `X-Appwrite-Key` (an Appwrite upstream checks it again) or strip it and send
    /// identity headers instead.
    pub forward_key: bool,
    /// Time allowed from sending the request to receiving the response head.
    pub timeout: Duration,
    pub connect_timeout: Duration,
    client: UpstreamClient,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("name", &self.name)
            .field(
                "url",
                &format_args!("{}://{}{}", self.scheme, self.authority, self.prefix),
            )
            .field("forward_key", &self.forward_key)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Upstream {
    pub fn new(
        name: &str,
        url: &str,
        forward_key: bool,
        timeout: Duration,
        connect_timeout: Duration,
    ) -> Result<Upstream, String> {
        let uri: Uri = url
            .parse()
            .map_err(|_| format!("`{url}` is not a URL such as http://127.0.0.1:8081"))?;
        let scheme = uri.scheme().cloned().ok_or("the URL needs a scheme")?;
        if scheme != Scheme::HTTP {
            return Err(format!(
                "scheme `{scheme}` is not supported for upstreams; use http://"
            ));
        }
        let authority = uri.authority().cloned().ok_or("the URL needs a host")?;
        if authority.as_str().contains('@') {
            return Err("credentials in upstream URLs are not supported".into());
        }
        if uri.query().is_some() {
            return Err("an upstream URL cannot carry a query".into());
        }
        let prefix = uri.path().trim_end_matches('/').to_owned();

        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(connect_timeout));
        connector.set_keepalive(Some(Duration::from_secs(60)));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(256)
            .build(connector);
        Ok(Upstream {
            name: name.to_owned(),
            scheme,
            authority,
            prefix,
            forward_key,
            timeout,
            connect_timeout,
            client,
        })
    }

    pub fn authority(&self) -> &Authority {
        &self.authority
    }

    pub fn client(&self) -> &UpstreamClient {
        &self.client
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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream(url: &str) -> Result<Upstream, String> {
        Upstream::new(
            "u",
            url,
            false,
            Duration::from_secs(1),
            Duration::from_secs(1),
        )
    }

    #[test]
    fn builds_target_uris_with_prefix() {
        let u = upstream("http://127.0.0.1:8081/api/").unwrap();
        assert_eq!(
            u.uri_for("/v1/users", Some("limit=1")).unwrap().to_string(),
            "http://127.0.0.1:8081/api/v1/users?limit=1"
        );
        let u = upstream("http://backend:80").unwrap();
        assert_eq!(
            u.uri_for("/", None).unwrap().to_string(),
            "http://backend:80/"
        );
    }

    #[test]
    fn refuses_unsupported_urls() {
        assert!(upstream("ftp://x").is_err());
        assert!(upstream("127.0.0.1:80").is_err());
        assert!(upstream("http://u:p@host").is_err());
        assert!(upstream("http://host/?q=1").is_err());
    }
}

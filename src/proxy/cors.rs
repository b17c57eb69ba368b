//! Browser origins: preflights answered by keygate with what Appwrite's web SDK sends and reads,
//! and the CORS grant on responses to allowed origins.
//!
//! A preflight reflects any origin: it carries no credentials, so nothing can be checked yet.
//! The actual request is checked (unless it carries an API key or a valid dev key); a refused
//! origin gets a 403 without any CORS grant, which the browser reports as a CORS failure.

use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};

use super::{full_body, Body};
use crate::auth::{origin_allowed, DEV_KEY_HEADER, KEY_HEADER, PROJECT_HEADER};
use crate::config::Snapshot;
use crate::error::Rejection;

const ALLOW_METHODS: &str = "GET, POST, PUT, PATCH, DELETE";
/// The request headers Appwrite's SDKs send.
const ALLOW_HEADERS: &str = "Origin, Cookie, Set-Cookie, X-Requested-With, Content-Type, \
    Access-Control-Allow-Origin, Access-Control-Request-Headers, Accept, X-Appwrite-Project, \
    X-Appwrite-Key, X-Appwrite-Dev-Key, X-Appwrite-Locale, X-Appwrite-Mode, X-Appwrite-JWT, \
    X-Appwrite-Response-Format, X-Appwrite-Timeout, X-Appwrite-Session, X-Appwrite-ID, \
    X-Appwrite-Timestamp, X-SDK-Version, X-SDK-Name, X-SDK-Language, X-SDK-Platform, \
    X-SDK-GraphQL, X-Fallback-Cookies, X-Forwarded-For, X-Forwarded-User-Agent, Content-Range, \
    Range, Cache-Control, Expires, Pragma, X-Request-Id";
/// The response headers Appwrite's SDKs read.
const EXPOSE_HEADERS: &str = "X-Appwrite-Session, X-Fallback-Cookies, X-RateLimit-Limit, \
    X-RateLimit-Remaining, X-RateLimit-Reset, X-Appwrite-Warning, X-Request-Id";

pub fn is_preflight<B>(req: &Request<B>) -> bool {
    req.method() == Method::OPTIONS
        && req.headers().contains_key(header::ORIGIN)
        && req
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
}

pub fn preflight(headers: &HeaderMap) -> Response<Body> {
    let mut response = Response::new(full_body(""));
    *response.status_mut() = StatusCode::NO_CONTENT;
    let out = response.headers_mut();
    if let Some(origin) = headers.get(header::ORIGIN) {
        grant(out, origin);
    }
    out.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static(ALLOW_METHODS),
    );
    out.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static(ALLOW_HEADERS),
    );
    out.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("86400"),
    );
    response
}

/// Grants `origin` access to a response.
pub fn grant(headers: &mut HeaderMap, origin: &HeaderValue) {
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
        HeaderValue::from_static("true"),
    );
    headers.insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static(EXPOSE_HEADERS),
    );
    headers.append(header::VARY, HeaderValue::from_static("Origin"));
}

/// A refused request from an allowed origin still lets the page read the error. So does one
/// whose API key or dev key was valid (the scope check, which comes after the credentials, is
/// what refused it): those skip the origin check.
pub fn origin_for_rejection(
    snapshot: &Snapshot,
    headers: &HeaderMap,
    rejection: &Rejection,
) -> Option<HeaderValue> {
    if *rejection == Rejection::UnknownOrigin {
        return None;
    }
    let origin = headers.get(header::ORIGIN)?;
    let credentials_passed = matches!(rejection, Rejection::MissingScope { .. })
        && (headers.contains_key(KEY_HEADER) || headers.contains_key(DEV_KEY_HEADER));
    let project = headers.get(PROJECT_HEADER).and_then(|v| v.to_str().ok());
    (credentials_passed || origin_allowed(snapshot, project, origin.as_bytes()))
        .then(|| origin.clone())
}

//! Request rejections and their single mapping to an HTTP status and an Appwrite error body.
//!
//! Every layer that refuses a request produces a [`Rejection`]; [`Rejection::status_and_type`]
//! is the one `match` that decides what the client sees. Messages are short, our own words, and
//! never echo a credential.

use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use serde::Serialize;

/// Why a request was not forwarded.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum Rejection {
    #[error("invalid request target: {0}")]
    BadTarget(&'static str),
    #[error("the {0} header may be sent only once")]
    RepeatedHeader(&'static str),
    #[error("invalid header: {0}")]
    BadHeader(&'static str),
    #[error("no route matches this request")]
    RouteNotFound,
    #[error("the origin of this request is not allowed for the project")]
    UnknownOrigin,
    #[error("the dev key has expired")]
    DevKeyExpired,
    #[error("too many requests; try again after the rate-limit window resets")]
    RateLimited,
    #[error("the API key is not valid")]
    UnknownKey,
    #[error("the API key has expired")]
    KeyExpired,
    #[error("the API key does not belong to the project named in X-Appwrite-Project")]
    ProjectMismatch,
    #[error("project not found")]
    UnknownProject,
    /// `needed` lists the route's scopes, any one of which would have sufficed.
    #[error("{principal} is missing a scope this route needs (one of: {needed})")]
    MissingScope {
        principal: &'static str,
        needed: Arc<str>,
    },
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("invalid query: {0}")]
    InvalidQuery(String),
    #[error("cursor `{0}` does not name a key in this list")]
    CursorNotFound(String),
    #[error("key not found")]
    KeyNotFound,
    #[error("a key with this id already exists")]
    KeyAlreadyExists,
    /// Delegation ceiling: the request grants scopes the caller does not hold.
    #[error("the calling key cannot grant scopes it does not hold: {0}")]
    ScopesExceeded(String),
    /// Delegation ceiling: the request outlives the caller.
    #[error("the calling key cannot grant an expiry later than its own")]
    ExpireExceeded,
    /// Delegation ceiling: the target key holds more than the caller.
    #[error("the calling key cannot manage a key that holds more than it does")]
    TargetForbidden,
    /// Delegation ceiling: the request makes a key faster than the rate-limited caller.
    #[error("the calling key cannot make a key with a looser rate limit than its own")]
    RateLimitExceedsCaller,
    #[error("{0} are disabled in this deployment")]
    FeatureDisabled(&'static str),
    #[error("request body too large")]
    PayloadTooLarge,
    #[error("the key store is unavailable; try again")]
    StoreUnavailable,
    #[error("the upstream could not be reached")]
    UpstreamUnavailable,
    #[error("the upstream did not answer in time")]
    UpstreamTimeout,
    /// Something that should not happen did (a newly generated secret colliding with a stored
    /// one); the request changed nothing.
    #[error("internal error")]
    Internal,
}

impl Rejection {
    /// The one place where a rejection becomes a status and an Appwrite error type.
    ///
    /// Types are Appwrite's (`errors.tsv`) where Appwrite has one. keygate's own, in Appwrite's
    /// style, cover what Appwrite never reports: the delegation ceiling (`key_scopes_exceeded`,
    /// `key_expire_exceeded`, `key_target_forbidden`, `key_rate_limit_exceeded`), and failures of
    /// the gateway's own
    /// dependencies (`general_bad_gateway`, `general_gateway_timeout`,
    /// `general_service_unavailable`, `general_payload_too_large`).
    pub fn status_and_type(&self) -> (StatusCode, &'static str) {
        use Rejection::*;
        match self {
            BadTarget(_) | RepeatedHeader(_) | BadHeader(_) => {
                (StatusCode::BAD_REQUEST, "general_argument_invalid")
            }
            RouteNotFound => (StatusCode::NOT_FOUND, "general_route_not_found"),
            UnknownOrigin => (StatusCode::FORBIDDEN, "general_unknown_origin"),
            DevKeyExpired => (StatusCode::GONE, "dev_key_gone"),
            RateLimited => (StatusCode::TOO_MANY_REQUESTS, "general_rate_limit_exceeded"),
            UnknownKey => (StatusCode::UNAUTHORIZED, "user_unauthorized"),
            KeyExpired => (StatusCode::UNAUTHORIZED, "project_key_expired"),
            ProjectMismatch => (StatusCode::FORBIDDEN, "project_id_missing"),
            UnknownProject => (StatusCode::NOT_FOUND, "project_not_found"),
            MissingScope { .. } => (StatusCode::UNAUTHORIZED, "general_unauthorized_scope"),
            InvalidArgument(_) => (StatusCode::BAD_REQUEST, "general_argument_invalid"),
            InvalidQuery(_) => (StatusCode::BAD_REQUEST, "general_query_invalid"),
            CursorNotFound(_) => (StatusCode::BAD_REQUEST, "general_cursor_not_found"),
            KeyNotFound => (StatusCode::NOT_FOUND, "key_not_found"),
            KeyAlreadyExists => (StatusCode::CONFLICT, "key_already_exists"),
            ScopesExceeded(_) => (StatusCode::FORBIDDEN, "key_scopes_exceeded"),
            ExpireExceeded => (StatusCode::FORBIDDEN, "key_expire_exceeded"),
            TargetForbidden => (StatusCode::FORBIDDEN, "key_target_forbidden"),
            RateLimitExceedsCaller => (StatusCode::FORBIDDEN, "key_rate_limit_exceeded"),
            FeatureDisabled(_) => (StatusCode::FORBIDDEN, "general_service_disabled"),
            PayloadTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "general_payload_too_large"),
            StoreUnavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                "general_service_unavailable",
            ),
            UpstreamUnavailable => (StatusCode::BAD_GATEWAY, "general_bad_gateway"),
            UpstreamTimeout => (StatusCode::GATEWAY_TIMEOUT, "general_gateway_timeout"),
            Internal => (StatusCode::INTERNAL_SERVER_ERROR, "general_server_error"),
        }
    }

    /// A short, stable label for logs and metrics (bounded cardinality).
    pub fn outcome(&self) -> &'static str {
        self.status_and_type().1
    }

    pub fn to_body(&self) -> ErrorBody {
        let (status, kind) = self.status_and_type();
        ErrorBody::new(status, kind, self.to_string())
    }
}

/// Appwrite's error body: `{"message", "code", "type", "version"}`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ErrorBody {
    pub message: String,
    pub code: u16,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub version: &'static str,
}

impl ErrorBody {
    pub fn new(status: StatusCode, kind: &'static str, message: String) -> Self {
        ErrorBody {
            message,
            code: status.as_u16(),
            kind,
            version: crate::VERSION,
        }
    }

    pub fn status(&self) -> StatusCode {
        StatusCode::from_u16(self.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    /// Renders the body as a complete response with the headers every rejection carries.
    pub fn into_response<B: From<Bytes>>(self) -> Response<B> {
        let status = self.status();
        let json = serde_json::to_vec(&self).unwrap_or_default();
        let mut response = Response::new(B::from(Bytes::from(json)));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_scope_names_the_scopes() {
        let body = Rejection::MissingScope {
            principal: "the API key",
            needed: "users.read, users.write".into(),
        }
        .to_body();
        assert_eq!(body.code, 401);
        assert_eq!(body.kind, "general_unauthorized_scope");
        assert!(body.message.contains("users.read, users.write"));
    }

    #[test]
    fn body_serializes_in_appwrite_shape() {
        let json = serde_json::to_value(Rejection::UnknownKey.to_body()).unwrap();
        assert_eq!(json["type"], "user_unauthorized");
        assert_eq!(json["code"], 401);
        assert!(json["message"].is_string());
        assert!(json["version"].is_string());
    }
}

//! keygate's own key-management API (Appwrite's `/v1/project/keys…`, the
//! `/v1/projects/{projectId}/keys…` aliases and `/v1/projects/{projectId}/dev-keys…`), served
//! locally and never forwarded.
//!
//! The routes are built into every route table ahead of the config's, so the ordinary decision
//! authenticates the caller and checks `keys.read` / `keys.write`; this module then validates the
//! request, applies the delegation ceiling and writes to the store.

pub mod ceiling;
pub mod handler;
pub mod query;

pub use handler::handle;

/// One operation of the key-management API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    ListKeys,
    CreateKey,
    CreateEphemeralKey,
    GetKey,
    UpdateKey,
    DeleteKey,
    RotateKey,
    ListDevKeys,
    CreateDevKey,
    GetDevKey,
    UpdateDevKey,
    DeleteDevKey,
}

/// The built-in routes: method, path, endpoint, required scope.
#[rustfmt::skip]
pub const ROUTES: &[(&str, &str, Endpoint, &str)] = &[
    ("GET",    "/v1/project/keys",                               Endpoint::ListKeys,           "keys.read"),
    ("POST",   "/v1/project/keys",                               Endpoint::CreateKey,          "keys.write"),
    ("POST",   "/v1/project/keys/ephemeral",                     Endpoint::CreateEphemeralKey, "keys.write"),
    ("GET",    "/v1/project/keys/{keyId}",                       Endpoint::GetKey,             "keys.read"),
    ("PUT",    "/v1/project/keys/{keyId}",                       Endpoint::UpdateKey,          "keys.write"),
    ("DELETE", "/v1/project/keys/{keyId}",                       Endpoint::DeleteKey,          "keys.write"),
    ("POST",   "/v1/project/keys/{keyId}/rotate",                Endpoint::RotateKey,          "keys.write"),
    ("GET",    "/v1/projects/{projectId}/keys",                  Endpoint::ListKeys,           "keys.read"),
    ("POST",   "/v1/projects/{projectId}/keys",                  Endpoint::CreateKey,          "keys.write"),
    ("POST",   "/v1/projects/{projectId}/jwts",                  Endpoint::CreateEphemeralKey, "keys.write"),
    ("POST",   "/v1/projects/{projectId}/keys/ephemeral",        Endpoint::CreateEphemeralKey, "keys.write"),
    ("GET",    "/v1/projects/{projectId}/keys/{keyId}",          Endpoint::GetKey,             "keys.read"),
    ("PUT",    "/v1/projects/{projectId}/keys/{keyId}",          Endpoint::UpdateKey,          "keys.write"),
    ("DELETE", "/v1/projects/{projectId}/keys/{keyId}",          Endpoint::DeleteKey,          "keys.write"),
    ("POST",   "/v1/projects/{projectId}/keys/{keyId}/rotate",   Endpoint::RotateKey,          "keys.write"),
    ("GET",    "/v1/projects/{projectId}/dev-keys",              Endpoint::ListDevKeys,        "devKeys.read"),
    ("POST",   "/v1/projects/{projectId}/dev-keys",              Endpoint::CreateDevKey,       "devKeys.write"),
    ("GET",    "/v1/projects/{projectId}/dev-keys/{keyId}",      Endpoint::GetDevKey,          "devKeys.read"),
    ("PUT",    "/v1/projects/{projectId}/dev-keys/{keyId}",      Endpoint::UpdateDevKey,       "devKeys.write"),
    ("DELETE", "/v1/projects/{projectId}/dev-keys/{keyId}",      Endpoint::DeleteDevKey,       "devKeys.write"),
];

/// Scopes that only keys may hold: a config that granted them to guests, or implicitly to every
/// key, would hand out key management.
pub const MANAGEMENT_SCOPES: &[&str] =
    &["keys.read", "keys.write", "devKeys.read", "devKeys.write"];

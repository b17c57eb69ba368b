//! keygate: Appwrite-style API key scopes, enforced at the edge.
//!
//! # Request flow
//!
//! ```text
//! client ─▶ server (hyper, h1 + h2c) ─▶ proxy::handle
//!              │  snapshot = gateway.snapshot()            one immutable config per request
//!              │  auth::decide(snapshot, cache, head)      normalize → route → credential →
//!              │                                           resolve → project/expiry → scopes
//!              ├─ Err(Rejection) ─▶ Appwrite error body    (error.rs: one status per rejection)
//!              └─ Ok(Decision)   ─▶ headers::to_upstream ─▶ upstream client (pooled, streamed)
//! ```
//!
//! # Layout
//!
//! - [`config`]: YAML → raw structs → validated [`config::Snapshot`].
//! - [`routes`]: path normalization and the compiled route table.
//! - [`keys`]: the key model, secrets and digests, scope bitsets, the cache and the stores.
//! - [`auth`]: the authorization decision, a pure function usable from any hyper service.
//! - [`proxy`]: forwarding, header rewriting, upstream clients.
//! - [`gateway`]: shared state (snapshot, cache, store) and the change feed.
//! - [`server`]: listeners (TLS, HTTP/1.1 and HTTP/2), the ops endpoints, graceful shutdown.
//! - [`limits`]: abuse limits and their counters (local or Redis).
//! - [`admin`]: keygate's own key-management API and the delegation ceiling.
//! - [`metrics`]: metric names; [`tls`]: TLS material; [`store_migrate`]: store-to-store copy.
//! - [`sample`]: the bundled echo upstream.
//! - [`error`]: rejections and the Appwrite error body.

pub mod admin;
pub mod auth;
pub mod config;
pub mod error;
pub mod gateway;
pub mod keys;
pub mod limits;
pub mod metrics;
pub mod proxy;
pub mod routes;
pub mod sample;
pub mod server;
pub mod store_migrate;
pub mod tls;

/// keygate's version, reported in every error body.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

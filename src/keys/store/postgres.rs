//! The shared store: PostgreSQL, for several gateway nodes (and the CLI) on one database.
//!
//! # Schema
//!
//! Tables mirror the SQLite store's: `keys` (times as Unix milliseconds in `BIGINT`, so records
//! compare equal across stores; `scopes`/`sdks` as JSONB; digests as `BYTEA UNIQUE`; ids and
//! projects in the "C" collation so lists order exactly as SQLite orders them), `audit` (written
//! in the same transaction as the change it records) and `key_deletions` (see below). Migrations
//! are numbered in `keygate_schema` and applied at open inside one transaction that first takes a
//! transaction-scoped advisory lock, so nodes starting together apply each migration once. Writes
//! are committed with `synchronous_commit = on` before a call returns.
//!
//! # Connections
//!
//! A small pool of connections (at most [`MAX_CONNECTIONS`] in use, idle ones kept). A connection
//! the server dropped (`pg_terminate_backend`, a restart) is noticed when taken from the pool and
//! replaced; a call that fails because its connection was lost is retried once on a new one when
//! that is safe (any read; a write only when the loss showed before its transaction began). Every
//! call is bounded by [`CALL_TIMEOUT`] (connect, statement and lock timeouts are shorter), so a
//! call made while the database is down or unreachable answers `Unavailable` and never hangs.
//!
//! # Change feed
//!
//! Every write runs `pg_notify('keygate_keys', '<project>/<id>')` in its transaction, so the
//! notification is sent if and only if the change commits. A dedicated connection `LISTEN`s on
//! that channel from a spawned task and appends what it hears to an in-memory queue numbered by a
//! local counter, which is the [`Cursor`]; a write made through this store is also appended at
//! once, without waiting for its notification. `changes_since` reads the queue after the cursor
//! and drops what the caller has acknowledged (entries up to the cursor it passes: the queue has
//! one consumer, the gateway's sync loop).
//!
//! Notifications sent while the listening connection is down are lost, so when it comes back
//! (it reconnects with backoff) it appends a *resync marker*. `feed_lost_since` tells the
//! gateway, which then streams every key again (its resync) rather than asking for the changes:
//! at a million keys, reading them all in one query is a memory spike. For other callers,
//! `changes_since` expands a marker into a change for every key now in the table (catching
//! creates and updates made during the outage) plus one for every key deleted since the last
//! point known to have been heard: deletes
//! also write `key_deletions` (`seq`, project, id, time; pruned after a week) in their
//! transaction, and the listener's periodic ping reads the log's highest `seq`, which counts as
//! heard one ping later (every notification committed before that reading has been read by
//! then). The gateway's periodic full resync (`store.resync`, 30 s by default for PostgreSQL)
//! remains the safety net for anything this reasoning misses.
//!
//! The caller of `changes_since` reads every reported key next; so that a burst of writes on
//! other nodes costs one query rather than one per key, `changes_since` reads the reported keys
//! ahead in one query and `get` serves each of them once from that, until the next
//! `changes_since` or for [`READ_AHEAD_FOR`] at most, and never after this store wrote the key.

use std::collections::{HashMap, HashSet, VecDeque};
use std::str::FromStr;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, TimeZone, Utc};
use futures_util::future::BoxFuture;
use futures_util::StreamExt;
use tokio::sync::{oneshot, Semaphore, SemaphorePermit};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{AsyncMessage, Client, Config, GenericClient, NoTls, Row};

use super::{
    audit_identity, audit_missing, audit_time, diff, summary, Actor, AuditEvent, Change, Cursor,
    KeySink, KeyStore, KeyUpdate, NewKey, Rotation, StoreError, Usage,
};
use crate::keys::{format_date, Digest, KeyKind, KeyRateLimit, KeyRecord, PreviousSecret};

/// The notification channel of the change feed.
const CHANNEL: &str = "keygate_keys";
/// Taken (transaction-scoped) while migrations run: "keygate" in ASCII.
const MIGRATION_LOCK: i64 = 0x006b_6579_6761_7465;
/// Connections in use at once, per store.
pub const MAX_CONNECTIONS: usize = 8;
/// The longest any call takes, connecting included.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Server-side bounds for one statement and for waiting on a row lock (milliseconds).
const SESSION_OPTIONS: &str =
    "-c synchronous_commit=on -c statement_timeout=4000 -c lock_timeout=3000";
/// How often the listening connection proves it is alive (and reads the deletion log's head).
const LISTEN_PING: Duration = Duration::from_secs(2);
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// How long a deletion stays in `key_deletions`.
const DELETIONS_KEPT: Duration = Duration::from_secs(7 * 24 * 3600);
/// Queue entries kept for a consumer that never reads; beyond, they collapse into a marker.
const FEED_CAPACITY: usize = 100_000;
/// Changes returned by one `changes_since`.
const FEED_BATCH: usize = 10_000;
/// How long a key read ahead by `changes_since` may be served to `get`.
const READ_AHEAD_FOR: Duration = Duration::from_secs(1);
/// Keys read per query by `load_each`.
const LOAD_PAGE: usize = 5_000;
/// Audit events appended per transaction by `import_audit`.
const IMPORT_BATCH: usize = 1_000;

/// Schema migrations, in order; the version of each is its position plus one. Never edit one
/// that has shipped: append.
const MIGRATIONS: &[&str] = &["
CREATE TABLE keys (
    project         TEXT COLLATE \"C\" NOT NULL,
    id              TEXT COLLATE \"C\" NOT NULL,
    kind            TEXT NOT NULL DEFAULT 'standard',
    name            TEXT NOT NULL,
    description     TEXT NOT NULL DEFAULT '',
    scopes          JSONB NOT NULL,
    expire          BIGINT,
    created_at      BIGINT NOT NULL,
    updated_at      BIGINT NOT NULL,
    accessed_at     BIGINT,
    sdks            JSONB NOT NULL DEFAULT '[]',
    digest          BYTEA NOT NULL,
    previous_digest BYTEA,
    previous_until  BIGINT,
    rate_limit      BIGINT,
    rate_window     BIGINT,
    CONSTRAINT keys_pkey PRIMARY KEY (project, id),
    CONSTRAINT keys_digest_key UNIQUE (digest),
    CONSTRAINT keys_previous_digest_key UNIQUE (previous_digest)
);
CREATE INDEX keys_list ON keys (project, kind, created_at, id);
CREATE TABLE audit (
    seq     BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at      BIGINT NOT NULL,
    actor   TEXT NOT NULL,
    project TEXT NOT NULL,
    key_id  TEXT NOT NULL,
    kind    TEXT NOT NULL,
    action  TEXT NOT NULL,
    changes JSONB NOT NULL
);
CREATE INDEX audit_key ON audit (key_id);
CREATE TABLE key_deletions (
    seq     BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    project TEXT NOT NULL,
    id      TEXT NOT NULL,
    at      BIGINT NOT NULL
);
CREATE INDEX key_deletions_at ON key_deletions (at);
"];

const COLUMNS: &str = "project, id, kind, name, description, scopes::text, expire, created_at, \
                       updated_at, accessed_at, sdks::text, digest, previous_digest, \
                       previous_until, rate_limit, rate_window";

/// A PostgreSQL-backed [`KeyStore`].
pub struct PostgresStore {
    pool: Pool,
    feed: Arc<Feed>,
    listener: tokio::task::AbortHandle,
    read_ahead: Mutex<ReadAhead>,
}

/// The keys the last `changes_since` reported, read in one query, for the `get` of each that
/// follows. Each is served once, for at most [`READ_AHEAD_FOR`], and never after this store wrote
/// the key; the next `changes_since` replaces them all.
#[derive(Default)]
struct ReadAhead {
    at: Option<Instant>,
    records: HashMap<(String, String), Option<KeyRecord>>,
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

impl PostgresStore {
    /// Connects, applies pending migrations and starts listening for other nodes' changes.
    pub async fn open(url: &str) -> Result<PostgresStore, StoreError> {
        let mut config = Config::from_str(url)
            .map_err(|e| StoreError::Unavailable(format!("invalid PostgreSQL URL: {e}")))?;
        let options = match config.get_options() {
            Some(own) if !own.is_empty() => format!("{own} {SESSION_OPTIONS}"),
            _ => SESSION_OPTIONS.to_owned(),
        };
        config
            .options(options)
            .connect_timeout(CONNECT_TIMEOUT)
            .keepalives_idle(Duration::from_secs(10));
        if config.get_application_name().is_none() {
            config.application_name("keygate");
        }
        let pool = Pool {
            config,
            idle: Mutex::new(Vec::new()),
            permits: Semaphore::new(MAX_CONNECTIONS),
        };
        migrate(&pool.config).await?;
        let feed = Arc::new(Feed::default());
        let (ready_tx, ready_rx) = oneshot::channel();
        let listener = tokio::spawn(listen(pool.config.clone(), Arc::downgrade(&feed), ready_tx))
            .abort_handle();
        let ready = tokio::time::timeout(CALL_TIMEOUT * 2, ready_rx).await;
        match ready {
            Ok(Ok(Ok(()))) => Ok(PostgresStore {
                pool,
                feed,
                listener,
                read_ahead: Mutex::default(),
            }),
            Ok(Ok(Err(err))) => {
                listener.abort();
                Err(err)
            }
            _ => {
                listener.abort();
                Err(StoreError::Unavailable(
                    "the change feed's LISTEN connection did not start".into(),
                ))
            }
        }
    }

    /// Runs `op` on a pooled connection within [`CALL_TIMEOUT`]; once more on a new connection
    /// when it failed in a way marked safe to retry.
    async fn run<T, F>(&self, op: F) -> Result<T, StoreError>
    where
        T: Send,
        F: for<'c> Fn(&'c mut Client) -> BoxFuture<'c, Result<T, Fail>> + Send + Sync,
    {
        let deadline = tokio::time::Instant::now() + CALL_TIMEOUT;
        let mut fresh = false;
        loop {
            let attempt = async {
                let mut conn = self.pool.get(fresh).await?;
                let result = op(conn.client()).await;
                conn.reusable = true;
                result
            };
            match tokio::time::timeout_at(deadline, attempt).await {
                Ok(Ok(value)) => return Ok(value),
                Ok(Err(fail)) if fail.retry && !fresh => {
                    tracing::debug!(error = %fail.error, "PostgreSQL connection lost; retrying");
                    fresh = true;
                }
                Ok(Err(fail)) => return Err(fail.error),
                Err(_) => {
                    return Err(StoreError::Unavailable(format!(
                        "PostgreSQL did not answer within {CALL_TIMEOUT:?}"
                    )))
                }
            }
        }
    }

    /// Notes this store's own committed write in the feed at once.
    fn written(&self, project: &str, id: &str) {
        self.forget_read_ahead(project, id);
        self.feed.push(Entry::Key(Change {
            project: project.to_owned(),
            id: id.to_owned(),
        }));
    }

    /// The record `changes_since` read ahead for this key, once.
    fn read_ahead(&self, project: &str, id: &str) -> Option<Option<KeyRecord>> {
        let mut ahead = self.read_ahead.lock().ok()?;
        if ahead.at?.elapsed() > READ_AHEAD_FOR {
            *ahead = ReadAhead::default();
            return None;
        }
        ahead.records.remove(&(project.to_owned(), id.to_owned()))
    }

    fn forget_read_ahead(&self, project: &str, id: &str) {
        if let Ok(mut ahead) = self.read_ahead.lock() {
            ahead.records.remove(&(project.to_owned(), id.to_owned()));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Connections

struct Pool {
    config: Config,
    idle: Mutex<Vec<Client>>,
    permits: Semaphore,
}

struct Conn<'p> {
    client: Option<Client>,
    pool: &'p Pool,
    /// Set once the operation ran to its end; a connection dropped mid-operation (timed out) may
    /// be inside a transaction, and is closed rather than reused.
    reusable: bool,
    _permit: SemaphorePermit<'p>,
}

impl Conn<'_> {
    fn client(&mut self) -> &mut Client {
        self.client.as_mut().expect("a connection until dropped")
    }
}

impl Drop for Conn<'_> {
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            if self.reusable && !client.is_closed() {
                if let Ok(mut idle) = self.pool.idle.lock() {
                    if idle.len() < MAX_CONNECTIONS {
                        idle.push(client);
                    }
                }
            }
        }
    }
}

impl Pool {
    /// An idle connection still open, or a new one (always new when `fresh`).
    async fn get(&self, fresh: bool) -> Result<Conn<'_>, Fail> {
        let permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| Fail::from(StoreError::Unavailable("store closed".into())))?;
        let mut reused = None;
        if !fresh {
            let mut idle = self
                .idle
                .lock()
                .map_err(|_| Fail::from(StoreError::Unavailable("pool poisoned".into())))?;
            while let Some(client) = idle.pop() {
                if !client.is_closed() {
                    reused = Some(client);
                    break;
                }
            }
        }
        let client = match reused {
            Some(client) => client,
            None => connect(&self.config).await?,
        };
        Ok(Conn {
            client: Some(client),
            pool: self,
            reusable: false,
            _permit: permit,
        })
    }
}

/// A new connection whose protocol messages a spawned task processes.
async fn connect(config: &Config) -> Result<Client, Fail> {
    let (client, connection) = connect_raw(config).await?;
    tokio::spawn(async move {
        if let Err(err) = connection.await {
            tracing::debug!(error = %err, "PostgreSQL connection closed");
        }
    });
    Ok(client)
}

type Connection =
    tokio_postgres::Connection<tokio_postgres::Socket, tokio_postgres::tls::NoTlsStream>;

async fn connect_raw(config: &Config) -> Result<(Client, Connection), Fail> {
    match tokio::time::timeout(CONNECT_TIMEOUT, config.connect(NoTls)).await {
        Ok(Ok(pair)) => Ok(pair),
        Ok(Err(err)) => Err(Fail {
            error: StoreError::Unavailable(format!(
                "cannot connect to PostgreSQL: {}",
                describe(&err)
            )),
            retry: false,
        }),
        Err(_) => Err(Fail {
            error: StoreError::Unavailable(format!(
                "cannot connect to PostgreSQL within {CONNECT_TIMEOUT:?}"
            )),
            retry: false,
        }),
    }
}

/// Why an operation failed, and whether trying it again on a new connection is safe.
struct Fail {
    error: StoreError,
    retry: bool,
}

impl From<StoreError> for Fail {
    fn from(error: StoreError) -> Fail {
        Fail {
            error,
            retry: false,
        }
    }
}

/// A failure after which the operation must not be repeated (its outcome may be unknown).
fn failed(err: tokio_postgres::Error) -> Fail {
    Fail {
        error: classify(err),
        retry: false,
    }
}

/// A failure of an operation that is safe to repeat: retried when the connection was lost.
fn lost(err: tokio_postgres::Error) -> Fail {
    let retry = connection_lost(&err);
    Fail {
        error: classify(err),
        retry,
    }
}

fn connection_lost(err: &tokio_postgres::Error) -> bool {
    match err.code() {
        None => true,
        // Class 08: connection exception; class 57: operator intervention (terminated, shut
        // down, starting up).
        Some(code) => code.code().starts_with("08") || code.code().starts_with("57"),
    }
}

fn classify(err: tokio_postgres::Error) -> StoreError {
    if err.code() == Some(&SqlState::UNIQUE_VIOLATION) {
        let constraint = err
            .as_db_error()
            .and_then(|db| db.constraint())
            .unwrap_or_default();
        if constraint.contains("digest") {
            return StoreError::DuplicateSecret;
        }
        return StoreError::AlreadyExists;
    }
    StoreError::Unavailable(describe(&err))
}

fn describe(err: &tokio_postgres::Error) -> String {
    match err.as_db_error() {
        Some(db) => format!("{} {}: {}", db.severity(), db.code().code(), db.message()),
        None => {
            let mut text = err.to_string();
            let mut source = std::error::Error::source(err);
            while let Some(inner) = source {
                text.push_str(": ");
                text.push_str(&inner.to_string());
                source = inner.source();
            }
            text
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Migrations

async fn migrate(config: &Config) -> Result<(), StoreError> {
    let work = async {
        let mut client = connect(config).await.map_err(|f| f.error)?;
        let tx = client.transaction().await.map_err(classify)?;
        tx.batch_execute("SET LOCAL statement_timeout = 0")
            .await
            .map_err(classify)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await
            .map_err(classify)?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS keygate_schema (
                 version    INTEGER PRIMARY KEY,
                 applied_at BIGINT NOT NULL
             )",
        )
        .await
        .map_err(classify)?;
        let current: i32 = tx
            .query_one("SELECT COALESCE(MAX(version), 0) FROM keygate_schema", &[])
            .await
            .map_err(classify)?
            .get(0);
        let known = i32::try_from(MIGRATIONS.len()).unwrap_or(i32::MAX);
        if current > known {
            return Err(StoreError::Unavailable(format!(
                "the database has schema version {current}; this keygate knows up to {known}"
            )));
        }
        for (version, sql) in (1..)
            .zip(MIGRATIONS)
            .skip(usize::try_from(current).unwrap_or(0))
        {
            tx.batch_execute(sql).await.map_err(classify)?;
            tx.execute(
                "INSERT INTO keygate_schema (version, applied_at) VALUES ($1, $2)",
                &[&version, &millis(&Utc::now())],
            )
            .await
            .map_err(classify)?;
            tracing::info!(version, "PostgreSQL key store schema migrated");
        }
        tx.commit().await.map_err(classify)
    };
    tokio::time::timeout(Duration::from_secs(60), work)
        .await
        .map_err(|_| StoreError::Unavailable("schema migration timed out".into()))?
}

// ---------------------------------------------------------------------------------------------
// Change feed

#[derive(Debug, Clone)]
enum Entry {
    Key(Change),
    /// Notifications may have been missed; `deleted_after` is the deletion log position up to
    /// which deletions are known to have been heard.
    Resync {
        deleted_after: i64,
    },
}

#[derive(Default)]
struct Feed {
    state: Mutex<FeedState>,
}

#[derive(Default)]
struct FeedState {
    head: i64,
    entries: VecDeque<(i64, Entry)>,
}

impl Feed {
    fn push(&self, entry: Entry) {
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        if state.entries.len() >= FEED_CAPACITY {
            // Nobody reads this feed (a CLI process): collapse it rather than grow without end.
            let deleted_after = state
                .entries
                .iter()
                .filter_map(|(_, e)| match e {
                    Entry::Resync { deleted_after } => Some(*deleted_after),
                    Entry::Key(_) => None,
                })
                .min()
                .unwrap_or(0);
            state.entries.clear();
            state.head += 1;
            let seq = state.head;
            state
                .entries
                .push_back((seq, Entry::Resync { deleted_after }));
        }
        state.head += 1;
        let seq = state.head;
        state.entries.push_back((seq, entry));
    }

    fn head(&self) -> i64 {
        self.state.lock().map(|s| s.head).unwrap_or(0)
    }

    /// Whether a resync marker lies after `cursor`.
    fn lost_after(&self, cursor: Cursor) -> bool {
        self.state.lock().is_ok_and(|state| {
            state
                .entries
                .iter()
                .any(|(seq, e)| *seq > cursor.0 && matches!(e, Entry::Resync { .. }))
        })
    }

    /// Drops entries up to `cursor` (acknowledged) and returns the ones after it.
    fn after(&self, cursor: Cursor) -> Vec<(i64, Entry)> {
        let Ok(mut state) = self.state.lock() else {
            return Vec::new();
        };
        while state
            .entries
            .front()
            .is_some_and(|(seq, _)| *seq <= cursor.0)
        {
            state.entries.pop_front();
        }
        state.entries.iter().take(FEED_BATCH).cloned().collect()
    }
}

/// The listening task: (re)connects, LISTENs, feeds the queue, pings; ends with the store.
async fn listen(config: Config, feed: Weak<Feed>, ready: oneshot::Sender<Result<(), StoreError>>) {
    let mut ready = Some(ready);
    // The deletion log position up to which deletions are known to have been heard.
    let mut heard: i64 = 0;
    let mut backoff = BACKOFF_MIN;
    loop {
        let session = listen_session(&config, &feed).await;
        let (client, mut forwarder, mark) = match session {
            Ok(session) => session,
            Err(err) => {
                if let Some(ready) = ready.take() {
                    let _ = ready.send(Err(err));
                    return;
                }
                tracing::debug!(error = %err, "change feed cannot listen yet");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                if feed.strong_count() == 0 {
                    return;
                }
                continue;
            }
        };
        backoff = BACKOFF_MIN;
        match ready.take() {
            Some(ready) => {
                heard = mark;
                let _ = ready.send(Ok(()));
            }
            None => {
                let Some(feed) = feed.upgrade() else { return };
                feed.push(Entry::Resync {
                    deleted_after: heard,
                });
                tracing::info!("change feed listening again; resyncing keys");
            }
        }
        // A reading of the deletion log's head on this connection: every notification committed
        // before it has been read by the next ping, so it then counts as heard.
        let mut last_reading = mark;
        loop {
            tokio::select! {
                _ = &mut forwarder => break,
                _ = tokio::time::sleep(LISTEN_PING) => {
                    if feed.strong_count() == 0 {
                        return;
                    }
                    let reading = tokio::time::timeout(CONNECT_TIMEOUT, deletion_head(&client)).await;
                    match reading {
                        Ok(Ok(reading)) => {
                            heard = heard.max(last_reading);
                            last_reading = reading;
                        }
                        _ => break,
                    }
                }
            }
        }
        tracing::warn!("change feed connection lost; reconnecting");
        drop(client);
        forwarder.abort();
    }
}

/// Connects, starts forwarding notifications into the feed and LISTENs; returns the client, the
/// forwarding task (it ends when the connection does) and the deletion log's head.
async fn listen_session(
    config: &Config,
    feed: &Weak<Feed>,
) -> Result<(Client, tokio::task::JoinHandle<()>, i64), StoreError> {
    let (client, mut connection) = connect_raw(config).await.map_err(|f| f.error)?;
    let feed = feed.clone();
    let forwarder = tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(note)) if note.channel() == CHANNEL => {
                    let Some(feed) = feed.upgrade() else { return };
                    match note.payload().rsplit_once('/') {
                        Some((project, id)) => feed.push(Entry::Key(Change {
                            project: project.to_owned(),
                            id: id.to_owned(),
                        })),
                        None => tracing::warn!(payload = note.payload(), "odd key notification"),
                    }
                }
                Ok(_) => {}
                Err(err) => {
                    tracing::debug!(error = %err, "change feed connection closed");
                    return;
                }
            }
        }
    });
    let setup = async {
        client
            .batch_execute(&format!("LISTEN {CHANNEL}"))
            .await
            .map_err(classify)?;
        deletion_head(&client).await
    };
    match tokio::time::timeout(CALL_TIMEOUT, setup).await {
        Ok(Ok(mark)) => Ok((client, forwarder, mark)),
        Ok(Err(err)) => {
            forwarder.abort();
            Err(err)
        }
        Err(_) => {
            forwarder.abort();
            Err(StoreError::Unavailable("LISTEN timed out".into()))
        }
    }
}

async fn deletion_head(client: &Client) -> Result<i64, StoreError> {
    client
        .query_one("SELECT COALESCE(MAX(seq), 0) FROM key_deletions", &[])
        .await
        .map(|row| row.get(0))
        .map_err(classify)
}

// ---------------------------------------------------------------------------------------------
// Rows

fn millis(date: &DateTime<Utc>) -> i64 {
    date.timestamp_millis()
}

fn from_millis(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms).single().unwrap_or_default()
}

fn json(list: &[String]) -> String {
    serde_json::to_string(list).unwrap_or_else(|_| "[]".into())
}

fn digest_from(bytes: Vec<u8>) -> Result<Digest, StoreError> {
    bytes
        .try_into()
        .map(Digest)
        .map_err(|_| StoreError::Unavailable("a stored digest is not 32 bytes".into()))
}

fn read_record(row: &Row) -> Result<KeyRecord, StoreError> {
    let get_err = |e: tokio_postgres::Error| StoreError::Unavailable(describe(&e));
    let kind: String = row.try_get(2).map_err(get_err)?;
    let scopes: String = row.try_get(5).map_err(get_err)?;
    let sdks: String = row.try_get(10).map_err(get_err)?;
    let previous = match (
        row.try_get::<_, Option<Vec<u8>>>(12).map_err(get_err)?,
        row.try_get::<_, Option<i64>>(13).map_err(get_err)?,
    ) {
        (Some(digest), Some(until)) => Some(PreviousSecret {
            digest: digest_from(digest)?,
            until: from_millis(until),
        }),
        _ => None,
    };
    let rate_limit = match (
        row.try_get::<_, Option<i64>>(14).map_err(get_err)?,
        row.try_get::<_, Option<i64>>(15).map_err(get_err)?,
    ) {
        (Some(limit), Some(window)) => match (u32::try_from(limit), u32::try_from(window)) {
            (Ok(limit), Ok(window_secs)) => Some(KeyRateLimit { limit, window_secs }),
            _ => None,
        },
        _ => None,
    };
    Ok(KeyRecord {
        project: row.try_get(0).map_err(get_err)?,
        id: row.try_get(1).map_err(get_err)?,
        // As in SQLite: an unknown kind (from a newer keygate) grants nothing.
        kind: KeyKind::parse(&kind).unwrap_or(KeyKind::Dev),
        name: row.try_get(3).map_err(get_err)?,
        description: row.try_get(4).map_err(get_err)?,
        scopes: serde_json::from_str(&scopes).unwrap_or_default(),
        expire: row
            .try_get::<_, Option<i64>>(6)
            .map_err(get_err)?
            .map(from_millis),
        created_at: from_millis(row.try_get(7).map_err(get_err)?),
        updated_at: from_millis(row.try_get(8).map_err(get_err)?),
        accessed_at: row
            .try_get::<_, Option<i64>>(9)
            .map_err(get_err)?
            .map(from_millis),
        sdks: serde_json::from_str(&sdks).unwrap_or_default(),
        digest: digest_from(row.try_get(11).map_err(get_err)?)?,
        previous,
        rate_limit,
    })
}

fn read_audit(row: &Row) -> Result<AuditEvent, StoreError> {
    let get_err = |e: tokio_postgres::Error| StoreError::Unavailable(describe(&e));
    let changes: String = row.try_get(7).map_err(get_err)?;
    Ok(AuditEvent {
        seq: row.try_get(0).map_err(get_err)?,
        at: format_date(&from_millis(row.try_get(1).map_err(get_err)?)),
        actor: row.try_get(2).map_err(get_err)?,
        project: row.try_get(3).map_err(get_err)?,
        key_id: row.try_get(4).map_err(get_err)?,
        kind: row.try_get(5).map_err(get_err)?,
        action: row.try_get(6).map_err(get_err)?,
        changes: serde_json::from_str(&changes).unwrap_or_default(),
    })
}

fn limit_of(rate: Option<KeyRateLimit>) -> (Option<i64>, Option<i64>) {
    (
        rate.map(|r| i64::from(r.limit)),
        rate.map(|r| i64::from(r.window_secs)),
    )
}

/// One key, its row locked until the transaction ends when `lock`.
async fn select_one(
    client: &impl GenericClient,
    project: &str,
    id: &str,
    lock: bool,
    on_error: fn(tokio_postgres::Error) -> Fail,
) -> Result<Option<KeyRecord>, Fail> {
    let sql = format!(
        "SELECT {COLUMNS} FROM keys WHERE project = $1 AND id = $2{}",
        if lock { " FOR UPDATE" } else { "" }
    );
    let row = client
        .query_opt(&sql, &[&project, &id])
        .await
        .map_err(on_error)?;
    row_record(row)
}

/// Appends to the audit log and notifies the change feed; called inside every write transaction.
async fn record_change(
    tx: &tokio_postgres::Transaction<'_>,
    record: &KeyRecord,
    actor: &str,
    action: &str,
    changes: &serde_json::Value,
) -> Result<(), tokio_postgres::Error> {
    let payload = format!("{}/{}", record.project, record.id);
    tx.execute(
        "WITH audited AS (
             INSERT INTO audit (at, actor, project, key_id, kind, action, changes)
             VALUES ($1, $2, $3, $4, $5, $6, $7::text::jsonb)
         )
         SELECT pg_notify($8, $9)",
        &[
            &millis(&Utc::now()),
            &actor,
            &record.project,
            &record.id,
            &record.kind.as_str(),
            &action,
            &changes.to_string(),
            &CHANNEL,
            &payload,
        ],
    )
    .await?;
    Ok(())
}

fn row_record(row: Option<Row>) -> Result<Option<KeyRecord>, Fail> {
    row.map(|r| read_record(&r)).transpose().map_err(Fail::from)
}

// ---------------------------------------------------------------------------------------------
// Operations: each runs on one connection and may be run twice (see `PostgresStore::run`).

async fn op_create(c: &mut Client, key: NewKey, actor: String) -> Result<KeyRecord, Fail> {
    let tx = c.transaction().await.map_err(lost)?;
    let now = millis(&Utc::now());
    let (limit, window) = limit_of(key.rate_limit);
    let row = tx
        .query_one(
            &format!(
                "INSERT INTO keys (project, id, kind, name, description, scopes, expire,
                                   created_at, updated_at, digest, rate_limit, rate_window)
                 VALUES ($1, $2, $3, $4, $5, $6::text::jsonb, $7, $8, $8, $9, $10, $11)
                 RETURNING {COLUMNS}"
            ),
            &[
                &key.project,
                &key.id,
                &key.kind.as_str(),
                &key.name,
                &key.description,
                &json(&key.scopes),
                &key.expire.as_ref().map(millis),
                &now,
                &&key.digest.0[..],
                &limit,
                &window,
            ],
        )
        .await
        .map_err(failed)?;
    let record = read_record(&row)?;
    record_change(&tx, &record, &actor, "create", &summary(&record))
        .await
        .map_err(failed)?;
    tx.commit().await.map_err(failed)?;
    Ok(record)
}

async fn op_update(
    c: &mut Client,
    project: String,
    id: String,
    update: KeyUpdate,
    actor: String,
) -> Result<KeyRecord, Fail> {
    let tx = c.transaction().await.map_err(lost)?;
    let before = select_one(&tx, &project, &id, true, failed)
        .await?
        .ok_or(StoreError::NotFound)?;
    let (limit, window) = limit_of(update.rate_limit);
    let row = tx
        .query_opt(
            &format!(
                "UPDATE keys SET name = $3, description = $4, scopes = $5::text::jsonb,
                        expire = $6, updated_at = $7, rate_limit = $8, rate_window = $9
                 WHERE project = $1 AND id = $2
                 RETURNING {COLUMNS}"
            ),
            &[
                &project,
                &id,
                &update.name,
                &update.description,
                &json(&update.scopes),
                &update.expire.as_ref().map(millis),
                &millis(&Utc::now()),
                &limit,
                &window,
            ],
        )
        .await
        .map_err(failed)?;
    let after = row_record(row)?.ok_or(StoreError::NotFound)?;
    record_change(&tx, &after, &actor, "update", &diff(&before, &after))
        .await
        .map_err(failed)?;
    tx.commit().await.map_err(failed)?;
    Ok(after)
}

async fn op_rotate(
    c: &mut Client,
    project: String,
    id: String,
    rotation: Rotation,
    actor: String,
) -> Result<KeyRecord, Fail> {
    let tx = c.transaction().await.map_err(lost)?;
    let before = select_one(&tx, &project, &id, true, failed)
        .await?
        .ok_or(StoreError::NotFound)?;
    let (previous_digest, previous_until) = match rotation.grace_until {
        Some(until) => (Some(before.digest.0.to_vec()), Some(millis(&until))),
        None => (None, None),
    };
    let row = tx
        .query_opt(
            &format!(
                "UPDATE keys SET digest = $3, previous_digest = $4, previous_until = $5,
                        updated_at = $6
                 WHERE project = $1 AND id = $2
                 RETURNING {COLUMNS}"
            ),
            &[
                &project,
                &id,
                &&rotation.digest.0[..],
                &previous_digest,
                &previous_until,
                &millis(&Utc::now()),
            ],
        )
        .await
        .map_err(failed)?;
    let after = row_record(row)?.ok_or(StoreError::NotFound)?;
    let changes = serde_json::json!({
        "secret": "rotated",
        "previousSecretValidUntil": rotation.grace_until.as_ref().map(format_date),
    });
    record_change(&tx, &after, &actor, "rotate", &changes)
        .await
        .map_err(failed)?;
    tx.commit().await.map_err(failed)?;
    Ok(after)
}

async fn op_delete(c: &mut Client, project: String, id: String, actor: String) -> Result<(), Fail> {
    let tx = c.transaction().await.map_err(lost)?;
    let row = tx
        .query_opt(
            &format!("DELETE FROM keys WHERE project = $1 AND id = $2 RETURNING {COLUMNS}"),
            &[&project, &id],
        )
        .await
        .map_err(failed)?;
    let before = row_record(row)?.ok_or(StoreError::NotFound)?;
    let now = Utc::now();
    let horizon = millis(&now) - i64::try_from(DELETIONS_KEPT.as_millis()).unwrap_or(i64::MAX);
    tx.execute(
        "WITH pruned AS (DELETE FROM key_deletions WHERE at < $4)
         INSERT INTO key_deletions (project, id, at) VALUES ($1, $2, $3)",
        &[&project, &id, &millis(&now), &horizon],
    )
    .await
    .map_err(failed)?;
    record_change(&tx, &before, &actor, "delete", &summary(&before))
        .await
        .map_err(failed)?;
    tx.commit().await.map_err(failed)?;
    Ok(())
}

/// Idempotent (latest time, union of names), so safe to repeat whole.
async fn op_usage(c: &mut Client, mut usage: Vec<Usage>) -> Result<(), Fail> {
    // One lock order for every node, so two batches never deadlock.
    usage.sort_by(|a, b| (&a.project, &a.id).cmp(&(&b.project, &b.id)));
    let tx = c.transaction().await.map_err(lost)?;
    for entry in &usage {
        let Some(current) = select_one(&tx, &entry.project, &entry.id, true, lost).await? else {
            continue;
        };
        let (accessed, sdks) = entry.merged_over(current.accessed_at, &current.sdks);
        tx.execute(
            "UPDATE keys SET accessed_at = $3, sdks = $4::text::jsonb WHERE project = $1 AND id = $2",
            &[
                &entry.project,
                &entry.id,
                &accessed.as_ref().map(millis),
                &json(&sdks),
            ],
        )
        .await
        .map_err(lost)?;
    }
    tx.commit().await.map_err(lost)?;
    Ok(())
}

async fn op_import_record(c: &mut Client, record: KeyRecord) -> Result<Option<KeyRecord>, Fail> {
    let tx = c.transaction().await.map_err(lost)?;
    let (limit, window) = limit_of(record.rate_limit);
    let previous_digest = record.previous.map(|p| p.digest.0.to_vec());
    let previous_until = record.previous.map(|p| millis(&p.until));
    let params: [&(dyn ToSql + Sync); 16] = [
        &record.project,
        &record.id,
        &record.kind.as_str(),
        &record.name,
        &record.description,
        &json(&record.scopes),
        &record.expire.as_ref().map(millis),
        &millis(&record.created_at),
        &millis(&record.updated_at),
        &record.accessed_at.as_ref().map(millis),
        &json(&record.sdks),
        &&record.digest.0[..],
        &previous_digest,
        &previous_until,
        &limit,
        &window,
    ];
    let row = tx
        .query_opt(
            &format!(
                "INSERT INTO keys (project, id, kind, name, description, scopes, expire,
                                   created_at, updated_at, accessed_at, sdks, digest,
                                   previous_digest, previous_until, rate_limit, rate_window)
                 VALUES ($1, $2, $3, $4, $5, $6::text::jsonb, $7, $8, $9, $10, $11::text::jsonb,
                         $12, $13, $14, $15, $16)
                 ON CONFLICT (project, id) DO NOTHING
                 RETURNING {COLUMNS}"
            ),
            &params,
        )
        .await
        .map_err(failed)?;
    let Some(imported) = row_record(row)? else {
        return Ok(None);
    };
    record_change(&tx, &imported, "migrate", "import", &summary(&imported))
        .await
        .map_err(failed)?;
    tx.commit().await.map_err(failed)?;
    Ok(Some(imported))
}

async fn op_audit_counts(
    c: &mut Client,
    key_ids: Vec<String>,
) -> Result<HashMap<String, usize>, Fail> {
    let rows = c
        .query(
            "SELECT seq, at, actor, project, key_id, kind, action, changes::text FROM audit
             WHERE key_id = ANY($1)",
            &[&key_ids],
        )
        .await
        .map_err(lost)?;
    let mut counts = HashMap::new();
    for row in rows {
        *counts
            .entry(audit_identity(&read_audit(&row)?))
            .or_insert(0) += 1;
    }
    Ok(counts)
}

/// Appends events as given, in order, in one transaction.
async fn op_append_audit(
    c: &mut Client,
    events: Vec<AuditEvent>,
    at: Vec<i64>,
) -> Result<usize, Fail> {
    let tx = c.transaction().await.map_err(lost)?;
    let actor: Vec<&str> = events.iter().map(|e| e.actor.as_str()).collect();
    let project: Vec<&str> = events.iter().map(|e| e.project.as_str()).collect();
    let key_id: Vec<&str> = events.iter().map(|e| e.key_id.as_str()).collect();
    let kind: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
    let action: Vec<&str> = events.iter().map(|e| e.action.as_str()).collect();
    let changes: Vec<String> = events.iter().map(|e| e.changes.to_string()).collect();
    let appended = tx
        .execute(
            "INSERT INTO audit (at, actor, project, key_id, kind, action, changes)
             SELECT at, actor, project, key_id, kind, action, changes::jsonb
             FROM UNNEST($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[],
                         $6::text[], $7::text[])
                  WITH ORDINALITY AS e (at, actor, project, key_id, kind, action, changes, n)
             ORDER BY n",
            &[&at, &actor, &project, &key_id, &kind, &action, &changes],
        )
        .await
        .map_err(failed)?;
    tx.commit().await.map_err(failed)?;
    Ok(usize::try_from(appended).unwrap_or(usize::MAX))
}

// ---------------------------------------------------------------------------------------------

#[async_trait]
impl KeyStore for PostgresStore {
    async fn create(&self, key: NewKey, actor: Actor<'_>) -> Result<KeyRecord, StoreError> {
        let actor = actor.0.to_owned();
        let record = self
            .run(|c| Box::pin(op_create(c, key.clone(), actor.clone())))
            .await?;
        self.written(&record.project, &record.id);
        Ok(record)
    }

    async fn get(&self, project: &str, id: &str) -> Result<Option<KeyRecord>, StoreError> {
        let (project, id) = (project.to_owned(), id.to_owned());
        if let Some(record) = self.read_ahead(&project, &id) {
            return Ok(record);
        }
        self.run(|c| {
            let (project, id) = (project.clone(), id.clone());
            Box::pin(async move { select_one(c, &project, &id, false, lost).await })
        })
        .await
    }

    async fn list(&self, project: &str, kind: KeyKind) -> Result<Vec<KeyRecord>, StoreError> {
        let project = project.to_owned();
        self.run(|c| {
            let project = project.clone();
            Box::pin(async move {
                let rows = c
                    .query(
                        &format!(
                            "SELECT {COLUMNS} FROM keys WHERE project = $1 AND kind = $2
                             ORDER BY created_at, id"
                        ),
                        &[&project, &kind.as_str()],
                    )
                    .await
                    .map_err(lost)?;
                rows.iter()
                    .map(|r| read_record(r).map_err(Fail::from))
                    .collect()
            })
        })
        .await
    }

    async fn update(
        &self,
        project: &str,
        id: &str,
        update: KeyUpdate,
        actor: Actor<'_>,
    ) -> Result<KeyRecord, StoreError> {
        let (project, id, actor) = (project.to_owned(), id.to_owned(), actor.0.to_owned());
        let record = self
            .run(|c| {
                Box::pin(op_update(
                    c,
                    project.clone(),
                    id.clone(),
                    update.clone(),
                    actor.clone(),
                ))
            })
            .await?;
        self.written(&record.project, &record.id);
        Ok(record)
    }

    async fn rotate(
        &self,
        project: &str,
        id: &str,
        rotation: Rotation,
        actor: Actor<'_>,
    ) -> Result<KeyRecord, StoreError> {
        let (project, id, actor) = (project.to_owned(), id.to_owned(), actor.0.to_owned());
        let record = self
            .run(|c| {
                Box::pin(op_rotate(
                    c,
                    project.clone(),
                    id.clone(),
                    rotation.clone(),
                    actor.clone(),
                ))
            })
            .await?;
        self.written(&record.project, &record.id);
        Ok(record)
    }

    async fn delete(&self, project: &str, id: &str, actor: Actor<'_>) -> Result<(), StoreError> {
        let (project, id, actor) = (project.to_owned(), id.to_owned(), actor.0.to_owned());
        self.run(|c| Box::pin(op_delete(c, project.clone(), id.clone(), actor.clone())))
            .await?;
        self.written(&project, &id);
        Ok(())
    }

    async fn record_usage(&self, usage: &[Usage]) -> Result<(), StoreError> {
        if usage.is_empty() {
            return Ok(());
        }
        let usage = usage.to_vec();
        self.run(|c| Box::pin(op_usage(c, usage.clone()))).await?;
        for entry in &usage {
            self.forget_read_ahead(&entry.project, &entry.id);
        }
        Ok(())
    }

    async fn audit(&self, key_id: Option<&str>) -> Result<Vec<AuditEvent>, StoreError> {
        let key_id = key_id.map(str::to_owned);
        self.run(|c| {
            let key_id = key_id.clone();
            Box::pin(async move {
                const SELECT: &str =
                    "SELECT seq, at, actor, project, key_id, kind, action, changes::text FROM audit";
                let rows = match &key_id {
                    Some(id) => {
                        c.query(&format!("{SELECT} WHERE key_id = $1 ORDER BY seq"), &[id])
                            .await
                    }
                    None => c.query(&format!("{SELECT} ORDER BY seq"), &[]).await,
                }
                .map_err(lost)?;
                rows.iter()
                    .map(|r| read_audit(r).map_err(Fail::from))
                    .collect()
            })
        })
        .await
    }

    async fn count(&self) -> Result<usize, StoreError> {
        let count: i64 = self
            .run(|c| {
                Box::pin(async move {
                    let row = c
                        .query_one("SELECT COUNT(*) FROM keys", &[])
                        .await
                        .map_err(lost)?;
                    Ok(row.get(0))
                })
            })
            .await?;
        Ok(usize::try_from(count).unwrap_or(0))
    }

    /// Reads the keys in pages of [`LOAD_PAGE`] in primary-key order, each page its own query
    /// (retried and bounded like any read), so no statement outlives [`CALL_TIMEOUT`] whatever
    /// the number of keys. The pages are not one snapshot; the cursor, taken first, covers that:
    /// a key written while the pages are read is reported by the feed after it.
    async fn load_each(&self, sink: &mut KeySink<'_>) -> Result<Cursor, StoreError> {
        let cursor = Cursor(self.feed.head());
        let mut after: Option<(String, String)> = None;
        loop {
            let page = self
                .run(|c| {
                    let after = after.clone();
                    Box::pin(async move {
                        let limit = LOAD_PAGE as i64;
                        let rows = match &after {
                            None => {
                                c.query(
                                    &format!(
                                        "SELECT {COLUMNS} FROM keys ORDER BY project, id LIMIT $1"
                                    ),
                                    &[&limit],
                                )
                                .await
                            }
                            Some((project, id)) => {
                                c.query(
                                    &format!(
                                        "SELECT {COLUMNS} FROM keys WHERE (project, id) > ($1, $2)
                                         ORDER BY project, id LIMIT $3"
                                    ),
                                    &[project, id, &limit],
                                )
                                .await
                            }
                        }
                        .map_err(lost)?;
                        rows.iter()
                            .map(|r| read_record(r).map_err(Fail::from))
                            .collect::<Result<Vec<_>, _>>()
                    })
                })
                .await?;
            let last_page = page.len() < LOAD_PAGE;
            after = page.last().map(|r| (r.project.clone(), r.id.clone()));
            page.into_iter().for_each(&mut *sink);
            if last_page {
                return Ok(cursor);
            }
        }
    }

    fn feed_lost_since(&self, cursor: Cursor) -> bool {
        self.feed.lost_after(cursor)
    }

    async fn changes_since(&self, cursor: Cursor) -> Result<(Vec<Change>, Cursor), StoreError> {
        if let Ok(mut ahead) = self.read_ahead.lock() {
            *ahead = ReadAhead::default();
        }
        let entries = self.feed.after(cursor);
        let Some((last, _)) = entries.last() else {
            return Ok((Vec::new(), cursor));
        };
        let last = Cursor(*last);
        let resync_from = entries
            .iter()
            .filter_map(|(_, e)| match e {
                Entry::Resync { deleted_after } => Some(*deleted_after),
                Entry::Key(_) => None,
            })
            .min();
        let mut changes = Vec::with_capacity(entries.len());
        let mut read: HashMap<(String, String), Option<KeyRecord>> = HashMap::new();
        if let Some(deleted_after) = resync_from {
            // Every key now present, and every key deleted since deletions were last known heard.
            let (present, deleted) = self
                .run(|c| {
                    Box::pin(async move {
                        let present = c
                            .query(&format!("SELECT {COLUMNS} FROM keys"), &[])
                            .await
                            .map_err(lost)?;
                        let deleted = c
                            .query(
                                "SELECT project, id FROM key_deletions WHERE seq > $1 ORDER BY seq",
                                &[&deleted_after],
                            )
                            .await
                            .map_err(lost)?;
                        let present = present
                            .iter()
                            .map(read_record)
                            .collect::<Result<Vec<_>, _>>()?;
                        let deleted: Vec<(String, String)> =
                            deleted.iter().map(|r| (r.get(0), r.get(1))).collect();
                        Ok((present, deleted))
                    })
                })
                .await?;
            for (project, id) in deleted {
                changes.push(Change {
                    project: project.clone(),
                    id: id.clone(),
                });
                read.insert((project, id), None);
            }
            for record in present {
                changes.push(Change {
                    project: record.project.clone(),
                    id: record.id.clone(),
                });
                read.insert((record.project.clone(), record.id.clone()), Some(record));
            }
        }
        changes.extend(entries.into_iter().filter_map(|(_, e)| match e {
            Entry::Key(change) => Some(change),
            Entry::Resync { .. } => None,
        }));
        // Each key once (a write of this store is queued twice: at once, and when heard).
        let mut unique = HashSet::with_capacity(changes.len());
        changes.retain(|c| unique.insert((c.project.clone(), c.id.clone())));

        // The caller reads every changed key next: read them all now, in one query.
        let (projects, ids): (Vec<String>, Vec<String>) = changes
            .iter()
            .filter(|c| !read.contains_key(&(c.project.clone(), c.id.clone())))
            .map(|c| (c.project.clone(), c.id.clone()))
            .unzip();
        if !ids.is_empty() {
            let fetched = self
                .run(|c| {
                    let (projects, ids) = (projects.clone(), ids.clone());
                    Box::pin(async move {
                        let rows = c
                            .query(
                                &format!(
                                    "SELECT {COLUMNS} FROM keys WHERE (project, id) IN
                                     (SELECT p, i FROM UNNEST($1::text[], $2::text[]) AS u (p, i))"
                                ),
                                &[&projects, &ids],
                            )
                            .await
                            .map_err(lost)?;
                        rows.iter()
                            .map(|r| read_record(r).map_err(Fail::from))
                            .collect::<Result<Vec<_>, _>>()
                    })
                })
                .await;
            match fetched {
                Ok(records) => {
                    read.extend(projects.into_iter().zip(ids).map(|key| (key, None)));
                    for record in records {
                        read.insert((record.project.clone(), record.id.clone()), Some(record));
                    }
                }
                // Not fatal: each key is then read on its own (and fails there if it must).
                Err(err) => tracing::debug!(error = %err, "reading changed keys ahead failed"),
            }
        }
        if let Ok(mut ahead) = self.read_ahead.lock() {
            *ahead = ReadAhead {
                at: Some(Instant::now()),
                records: read,
            };
        }
        Ok((changes, last))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.run(|c| {
            Box::pin(async move {
                c.simple_query("SELECT 1").await.map_err(lost)?;
                Ok(())
            })
        })
        .await
    }

    async fn import_record(&self, record: &KeyRecord) -> Result<bool, StoreError> {
        let imported = self
            .run(|c| Box::pin(op_import_record(c, record.clone())))
            .await?;
        match imported {
            Some(record) => {
                self.written(&record.project, &record.id);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Appends in batches of [`IMPORT_BATCH`], each its own transaction, after one reading of
    /// what is present. A batch whose commit is in doubt is not repeated: the call fails, and
    /// running it again (it recomputes what is missing) finishes the import exactly. Two imports
    /// into one database must not run at once.
    async fn import_audit(&self, events: &[AuditEvent]) -> Result<usize, StoreError> {
        if events.is_empty() {
            return Ok(0);
        }
        let mut key_ids: Vec<String> = events.iter().map(|e| e.key_id.clone()).collect();
        key_ids.sort();
        key_ids.dedup();
        let existing = self
            .run(|c| Box::pin(op_audit_counts(c, key_ids.clone())))
            .await?;
        let missing = audit_missing(existing, events);
        let mut appended = 0;
        for batch in missing.chunks(IMPORT_BATCH) {
            let at = batch
                .iter()
                .map(|e| audit_time(e).map(|t| millis(&t)))
                .collect::<Result<Vec<_>, _>>()?;
            let batch: Vec<AuditEvent> = batch.iter().map(|e| (*e).clone()).collect();
            appended += self
                .run(|c| Box::pin(op_append_audit(c, batch.clone(), at.clone())))
                .await?;
        }
        Ok(appended)
    }
}

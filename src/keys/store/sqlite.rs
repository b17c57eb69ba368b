//! The embedded store: one SQLite file in WAL mode with `synchronous=FULL`, so a write that
//! returned survives a kill -9 (and a power cut). Several processes may open the same file; the
//! change table is how each learns of the others' writes.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use chrono::{DateTime, TimeZone, Utc};
use rusqlite::{params, Connection, ErrorCode, OptionalExtension, Row, Transaction};

use super::{
    audit_identity, audit_missing, audit_time, diff, summary, Actor, AuditEvent, Change, Cursor,
    KeySink, KeyStore, KeyUpdate, NewKey, Rotation, StoreError, Usage,
};
use crate::keys::{format_date, Digest, KeyKind, KeyRateLimit, KeyRecord, PreviousSecret};

const SCHEMA_VERSION: i64 = 1;
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS keys (
    project         TEXT NOT NULL,
    id              TEXT NOT NULL,
    kind            TEXT NOT NULL DEFAULT 'standard',
    name            TEXT NOT NULL,
    description     TEXT NOT NULL DEFAULT '',
    scopes          TEXT NOT NULL,
    expire          INTEGER,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL,
    accessed_at     INTEGER,
    sdks            TEXT NOT NULL DEFAULT '[]',
    digest          BLOB NOT NULL UNIQUE,
    previous_digest BLOB UNIQUE,
    previous_until  INTEGER,
    rate_limit      INTEGER,
    rate_window     INTEGER,
    PRIMARY KEY (project, id)
);
CREATE TABLE IF NOT EXISTS key_changes (
    seq     INTEGER PRIMARY KEY AUTOINCREMENT,
    project TEXT NOT NULL,
    id      TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS audit (
    seq     INTEGER PRIMARY KEY AUTOINCREMENT,
    at      INTEGER NOT NULL,
    actor   TEXT NOT NULL,
    project TEXT NOT NULL,
    key_id  TEXT NOT NULL,
    kind    TEXT NOT NULL,
    action  TEXT NOT NULL,
    changes TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_key ON audit (key_id);
";
/// Records per batch of a streaming load, and batches read ahead of the sink.
const LOAD_BATCH: usize = 1024;
const LOAD_BATCHES_IN_FLIGHT: usize = 4;
const COLUMNS: &str = "project, id, kind, name, description, scopes, expire, created_at, \
                       updated_at, accessed_at, sdks, digest, previous_digest, previous_until, \
                       rate_limit, rate_window";

/// A SQLite-backed [`KeyStore`]. Blocking SQLite calls run on tokio's blocking pool.
pub struct SqliteStore {
    path: PathBuf,
    // One connection, serialized: SQLite allows one writer at a time anyway, and reads here are
    // short. A std mutex because it is only held inside `spawn_blocking`, never across an await.
    conn: Arc<Mutex<Connection>>,
}

impl SqliteStore {
    pub async fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        let path = path.to_owned();
        let opened = path.clone();
        let conn = tokio::task::spawn_blocking(move || open_connection(&opened))
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))??;
        Ok(SqliteStore {
            path,
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    async fn with<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = conn
                .lock()
                .map_err(|_| StoreError::Unavailable("store connection poisoned".into()))?;
            f(&mut guard)
        })
        .await
        .map_err(|e| StoreError::Unavailable(e.to_string()))?
    }

    /// Runs `f` in a write transaction (taken immediately, so it never has to be upgraded).
    async fn write<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Transaction<'_>) -> Result<T, StoreError> + Send + 'static,
    {
        self.with(move |conn| {
            let tx = conn
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                .map_err(unavailable)?;
            let value = f(&tx)?;
            tx.commit().map_err(unavailable)?;
            Ok(value)
        })
        .await
    }
}

fn open_connection(path: &Path) -> Result<Connection, StoreError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| {
            StoreError::Unavailable(format!("cannot create {}: {e}", dir.display()))
        })?;
    }
    let conn = Connection::open(path).map_err(unavailable)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))
        .map_err(unavailable)?;
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(unavailable)?;
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(unavailable)?;
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(unavailable)?;
    if version > SCHEMA_VERSION {
        return Err(StoreError::Unavailable(format!(
            "{} has schema version {version}; this keygate knows up to {SCHEMA_VERSION}",
            path.display()
        )));
    }
    conn.execute_batch(SCHEMA).map_err(unavailable)?;
    conn.pragma_update(None, "user_version", SCHEMA_VERSION)
        .map_err(unavailable)?;
    Ok(conn)
}

fn unavailable(err: rusqlite::Error) -> StoreError {
    StoreError::Unavailable(err.to_string())
}

/// The receiving side of a streaming load went away (its caller was cancelled).
fn abandoned() -> StoreError {
    StoreError::Unavailable("the load was abandoned".into())
}

fn millis(date: &DateTime<Utc>) -> i64 {
    date.timestamp_millis()
}

fn from_millis(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms).single().unwrap_or_default()
}

fn digest_from(blob: Vec<u8>, column: usize) -> rusqlite::Result<Digest> {
    let bytes: [u8; 32] = blob.try_into().map_err(|_| {
        rusqlite::Error::FromSqlConversionFailure(
            column,
            rusqlite::types::Type::Blob,
            "digest is not 32 bytes".into(),
        )
    })?;
    Ok(Digest(bytes))
}

fn read_record(row: &Row<'_>) -> rusqlite::Result<KeyRecord> {
    let kind: String = row.get(2)?;
    let scopes: String = row.get(5)?;
    let sdks: String = row.get(10)?;
    let previous = match (
        row.get::<_, Option<Vec<u8>>>(12)?,
        row.get::<_, Option<i64>>(13)?,
    ) {
        (Some(digest), Some(until)) => Some(PreviousSecret {
            digest: digest_from(digest, 12)?,
            until: from_millis(until),
        }),
        _ => None,
    };
    Ok(KeyRecord {
        project: row.get(0)?,
        id: row.get(1)?,
        // An unknown kind can only come from a newer keygate; treat it as a dev key, which
        // grants no scope, rather than as an API key.
        kind: KeyKind::parse(&kind).unwrap_or(KeyKind::Dev),
        name: row.get(3)?,
        description: row.get(4)?,
        scopes: serde_json::from_str(&scopes).unwrap_or_default(),
        expire: row.get::<_, Option<i64>>(6)?.map(from_millis),
        created_at: from_millis(row.get(7)?),
        updated_at: from_millis(row.get(8)?),
        accessed_at: row.get::<_, Option<i64>>(9)?.map(from_millis),
        sdks: serde_json::from_str(&sdks).unwrap_or_default(),
        digest: digest_from(row.get(11)?, 11)?,
        previous,
        rate_limit: match (
            row.get::<_, Option<u32>>(14)?,
            row.get::<_, Option<u32>>(15)?,
        ) {
            (Some(limit), Some(window_secs)) => Some(KeyRateLimit { limit, window_secs }),
            _ => None,
        },
    })
}

fn select_one(conn: &Connection, project: &str, id: &str) -> Result<Option<KeyRecord>, StoreError> {
    conn.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM keys WHERE project = ?1 AND id = ?2"
    ))
    .and_then(|mut stmt| stmt.query_row(params![project, id], read_record).optional())
    .map_err(unavailable)
}

/// Appends to the change feed and the audit log; called inside every write transaction.
fn record_change(
    tx: &Transaction<'_>,
    record: &KeyRecord,
    actor: Actor<'_>,
    action: &str,
    changes: &serde_json::Value,
) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO key_changes (project, id) VALUES (?1, ?2)",
        params![record.project, record.id],
    )
    .map_err(unavailable)?;
    tx.execute(
        "INSERT INTO audit (at, actor, project, key_id, kind, action, changes)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            millis(&Utc::now()),
            actor.0,
            record.project,
            record.id,
            record.kind.as_str(),
            action,
            changes.to_string(),
        ],
    )
    .map_err(unavailable)?;
    Ok(())
}

fn json(list: &[String]) -> String {
    serde_json::to_string(list).unwrap_or_else(|_| "[]".into())
}

fn constraint(err: rusqlite::Error) -> StoreError {
    match err {
        rusqlite::Error::SqliteFailure(e, Some(msg))
            if e.code == ErrorCode::ConstraintViolation =>
        {
            if msg.contains("digest") {
                StoreError::DuplicateSecret
            } else {
                StoreError::AlreadyExists
            }
        }
        other => unavailable(other),
    }
}

#[async_trait]
impl KeyStore for SqliteStore {
    async fn create(&self, key: NewKey, actor: Actor<'_>) -> Result<KeyRecord, StoreError> {
        let actor = actor.0.to_owned();
        self.write(move |tx| {
            let now = millis(&Utc::now());
            tx.execute(
                "INSERT INTO keys (project, id, kind, name, description, scopes, expire, created_at, updated_at, digest, rate_limit, rate_window)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?8, ?9, ?10, ?11)",
                params![
                    key.project,
                    key.id,
                    key.kind.as_str(),
                    key.name,
                    key.description,
                    json(&key.scopes),
                    key.expire.as_ref().map(millis),
                    now,
                    &key.digest.0[..],
                    key.rate_limit.map(|r| r.limit),
                    key.rate_limit.map(|r| r.window_secs),
                ],
            )
            .map_err(constraint)?;
            let record = select_one(tx, &key.project, &key.id)?
                .ok_or_else(|| StoreError::Unavailable("created key vanished".into()))?;
            record_change(tx, &record, Actor(&actor), "create", &summary(&record))?;
            Ok(record)
        })
        .await
    }

    async fn get(&self, project: &str, id: &str) -> Result<Option<KeyRecord>, StoreError> {
        let (project, id) = (project.to_owned(), id.to_owned());
        self.with(move |conn| select_one(conn, &project, &id)).await
    }

    async fn list(&self, project: &str, kind: KeyKind) -> Result<Vec<KeyRecord>, StoreError> {
        let project = project.to_owned();
        self.with(move |conn| {
            let mut stmt = conn
                .prepare_cached(&format!(
                    "SELECT {COLUMNS} FROM keys WHERE project = ?1 AND kind = ?2 ORDER BY created_at, id"
                ))
                .map_err(unavailable)?;
            let rows = stmt
                .query_map(params![project, kind.as_str()], read_record)
                .map_err(unavailable)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(unavailable)
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
        self.write(move |tx| {
            let before = select_one(tx, &project, &id)?.ok_or(StoreError::NotFound)?;
            tx.execute(
                "UPDATE keys SET name = ?3, description = ?4, scopes = ?5, expire = ?6, updated_at = ?7,
                        rate_limit = ?8, rate_window = ?9
                 WHERE project = ?1 AND id = ?2",
                params![
                    project,
                    id,
                    update.name,
                    update.description,
                    json(&update.scopes),
                    update.expire.as_ref().map(millis),
                    millis(&Utc::now()),
                    update.rate_limit.map(|r| r.limit),
                    update.rate_limit.map(|r| r.window_secs),
                ],
            )
            .map_err(unavailable)?;
            let after = select_one(tx, &project, &id)?.ok_or(StoreError::NotFound)?;
            record_change(tx, &after, Actor(&actor), "update", &diff(&before, &after))?;
            Ok(after)
        })
        .await
    }

    async fn rotate(
        &self,
        project: &str,
        id: &str,
        rotation: Rotation,
        actor: Actor<'_>,
    ) -> Result<KeyRecord, StoreError> {
        let (project, id, actor) = (project.to_owned(), id.to_owned(), actor.0.to_owned());
        self.write(move |tx| {
            let before = select_one(tx, &project, &id)?.ok_or(StoreError::NotFound)?;
            let (previous_digest, previous_until) = match rotation.grace_until {
                Some(until) => (Some(before.digest.0.to_vec()), Some(millis(&until))),
                None => (None, None),
            };
            tx.execute(
                "UPDATE keys SET digest = ?3, previous_digest = ?4, previous_until = ?5, updated_at = ?6
                 WHERE project = ?1 AND id = ?2",
                params![
                    project,
                    id,
                    &rotation.digest.0[..],
                    previous_digest,
                    previous_until,
                    millis(&Utc::now()),
                ],
            )
            .map_err(constraint)?;
            let after = select_one(tx, &project, &id)?.ok_or(StoreError::NotFound)?;
            let changes = serde_json::json!({
                "secret": "rotated",
                "previousSecretValidUntil": rotation.grace_until.as_ref().map(format_date),
            });
            record_change(tx, &after, Actor(&actor), "rotate", &changes)?;
            Ok(after)
        })
        .await
    }

    async fn delete(&self, project: &str, id: &str, actor: Actor<'_>) -> Result<(), StoreError> {
        let (project, id, actor) = (project.to_owned(), id.to_owned(), actor.0.to_owned());
        self.write(move |tx| {
            let before = select_one(tx, &project, &id)?.ok_or(StoreError::NotFound)?;
            tx.execute(
                "DELETE FROM keys WHERE project = ?1 AND id = ?2",
                params![project, id],
            )
            .map_err(unavailable)?;
            record_change(tx, &before, Actor(&actor), "delete", &summary(&before))
        })
        .await
    }

    async fn record_usage(&self, usage: &[Usage]) -> Result<(), StoreError> {
        let usage = usage.to_vec();
        self.write(move |tx| {
            for entry in &usage {
                let Some(current) = select_one(tx, &entry.project, &entry.id)? else {
                    continue;
                };
                let (accessed, sdks) = entry.merged_over(current.accessed_at, &current.sdks);
                tx.execute(
                    "UPDATE keys SET accessed_at = ?3, sdks = ?4 WHERE project = ?1 AND id = ?2",
                    params![
                        entry.project,
                        entry.id,
                        accessed.as_ref().map(millis),
                        json(&sdks)
                    ],
                )
                .map_err(unavailable)?;
            }
            Ok(())
        })
        .await
    }

    async fn audit(&self, key_id: Option<&str>) -> Result<Vec<AuditEvent>, StoreError> {
        let key_id = key_id.map(str::to_owned);
        self.with(move |conn| {
            let (sql, args): (&str, Vec<String>) = match key_id {
                Some(id) => (
                    "SELECT seq, at, actor, project, key_id, kind, action, changes FROM audit
                     WHERE key_id = ?1 ORDER BY seq",
                    vec![id],
                ),
                None => (
                    "SELECT seq, at, actor, project, key_id, kind, action, changes FROM audit ORDER BY seq",
                    vec![],
                ),
            };
            let mut stmt = conn.prepare(sql).map_err(unavailable)?;
            let rows = stmt
                .query_map(rusqlite::params_from_iter(args), read_audit)
                .map_err(unavailable)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(unavailable)
        })
        .await
    }

    async fn count(&self) -> Result<usize, StoreError> {
        self.with(|conn| {
            conn.query_row("SELECT COUNT(*) FROM keys", [], |r| r.get(0))
                .map_err(unavailable)
        })
        .await
    }

    /// The rows are read on the blocking pool, in one read transaction (so the keys and the
    /// cursor describe the same moment), and cross to the caller's task in batches of
    /// [`LOAD_BATCH`] through a channel of [`LOAD_BATCHES_IN_FLIGHT`]: the reader and the sink
    /// run at the same time, and at most a few thousand records exist at once.
    async fn load_each(&self, sink: &mut KeySink<'_>) -> Result<Cursor, StoreError> {
        let (batches, mut received) = tokio::sync::mpsc::channel(LOAD_BATCHES_IN_FLIGHT);
        let read = self.with(move |conn| {
            let tx = conn.transaction().map_err(unavailable)?;
            let cursor: i64 = tx
                .query_row("SELECT COALESCE(MAX(seq), 0) FROM key_changes", [], |r| {
                    r.get(0)
                })
                .map_err(unavailable)?;
            {
                let mut stmt = tx
                    .prepare(&format!("SELECT {COLUMNS} FROM keys"))
                    .map_err(unavailable)?;
                let mut rows = stmt.query([]).map_err(unavailable)?;
                let mut batch = Vec::with_capacity(LOAD_BATCH);
                while let Some(row) = rows.next().map_err(unavailable)? {
                    batch.push(read_record(row).map_err(unavailable)?);
                    if batch.len() == LOAD_BATCH {
                        let full = std::mem::replace(&mut batch, Vec::with_capacity(LOAD_BATCH));
                        batches.blocking_send(full).map_err(|_| abandoned())?;
                    }
                }
                if !batch.is_empty() {
                    batches.blocking_send(batch).map_err(|_| abandoned())?;
                }
            }
            tx.commit().map_err(unavailable)?;
            Ok(Cursor(cursor))
        });
        let deliver = async {
            while let Some(batch) = received.recv().await {
                batch.into_iter().for_each(&mut *sink);
            }
        };
        let (cursor, ()) = tokio::join!(read, deliver);
        cursor
    }

    async fn changes_since(&self, cursor: Cursor) -> Result<(Vec<Change>, Cursor), StoreError> {
        self.with(move |conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT seq, project, id FROM key_changes WHERE seq > ?1 ORDER BY seq LIMIT 10000",
                )
                .map_err(unavailable)?;
            let mut last = cursor;
            let rows = stmt
                .query_map(params![cursor.0], |row| {
                    Ok((row.get::<_, i64>(0)?, row.get(1)?, row.get(2)?))
                })
                .map_err(unavailable)?;
            let mut changes = Vec::new();
            for row in rows {
                let (seq, project, id) = row.map_err(unavailable)?;
                last = Cursor(seq);
                changes.push(Change { project, id });
            }
            Ok((changes, last))
        })
        .await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.with(|conn| {
            conn.query_row("SELECT 1", [], |_| Ok(()))
                .map_err(unavailable)
        })
        .await
    }

    async fn import_record(&self, record: &KeyRecord) -> Result<bool, StoreError> {
        let record = record.clone();
        self.write(move |tx| {
            if select_one(tx, &record.project, &record.id)?.is_some() {
                return Ok(false);
            }
            tx.execute(
                &format!(
                    "INSERT INTO keys ({COLUMNS})
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)"
                ),
                params![
                    record.project,
                    record.id,
                    record.kind.as_str(),
                    record.name,
                    record.description,
                    json(&record.scopes),
                    record.expire.as_ref().map(millis),
                    millis(&record.created_at),
                    millis(&record.updated_at),
                    record.accessed_at.as_ref().map(millis),
                    json(&record.sdks),
                    &record.digest.0[..],
                    record.previous.map(|p| p.digest.0.to_vec()),
                    record.previous.map(|p| millis(&p.until)),
                    record.rate_limit.map(|r| r.limit),
                    record.rate_limit.map(|r| r.window_secs),
                ],
            )
            .map_err(constraint)?;
            record_change(tx, &record, Actor("migrate"), "import", &summary(&record))?;
            Ok(true)
        })
        .await
    }

    async fn import_audit(&self, events: &[AuditEvent]) -> Result<usize, StoreError> {
        let events = events.to_vec();
        self.write(move |tx| {
            let mut existing = std::collections::HashMap::new();
            {
                let mut stmt = tx
                    .prepare(
                        "SELECT seq, at, actor, project, key_id, kind, action, changes FROM audit",
                    )
                    .map_err(unavailable)?;
                let rows = stmt.query_map([], read_audit).map_err(unavailable)?;
                for row in rows {
                    *existing
                        .entry(audit_identity(&row.map_err(unavailable)?))
                        .or_insert(0usize) += 1;
                }
            }
            let missing = audit_missing(existing, &events);
            for event in &missing {
                tx.execute(
                    "INSERT INTO audit (at, actor, project, key_id, kind, action, changes)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                    params![
                        millis(&audit_time(event)?),
                        event.actor,
                        event.project,
                        event.key_id,
                        event.kind,
                        event.action,
                        event.changes.to_string(),
                    ],
                )
                .map_err(unavailable)?;
            }
            Ok(missing.len())
        })
        .await
    }
}

fn read_audit(row: &Row<'_>) -> rusqlite::Result<AuditEvent> {
    let changes: String = row.get(7)?;
    Ok(AuditEvent {
        seq: row.get(0)?,
        at: format_date(&from_millis(row.get(1)?)),
        actor: row.get(2)?,
        project: row.get(3)?,
        key_id: row.get(4)?,
        kind: row.get(5)?,
        action: row.get(6)?,
        changes: serde_json::from_str(&changes).unwrap_or_default(),
    })
}

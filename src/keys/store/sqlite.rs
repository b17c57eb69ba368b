//! The embedded store: one SQLite file in WAL mode, `synchronous=FULL`, so a write that returned
//! survives a kill -9 (and a power cut). Several processes may open the same file; the change
//! table is how each learns of the others' writes.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use chrono::{DateTime, TimeZone, Utc};
use rusqlite::{params, Connection, ErrorCode, OptionalExtension, Row};

use super::{Change, Cursor, KeyStore, KeyUpdate, NewKey, StoreError};
use crate::keys::{Digest, KeyRecord};

const SCHEMA_VERSION: i64 = 1;
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS keys (
    project     TEXT NOT NULL,
    id          TEXT NOT NULL,
    name        TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    scopes      TEXT NOT NULL,
    expire      INTEGER,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    accessed_at INTEGER,
    sdks        TEXT NOT NULL DEFAULT '[]',
    digest      BLOB NOT NULL UNIQUE,
    PRIMARY KEY (project, id)
);
CREATE TABLE IF NOT EXISTS key_changes (
    seq     INTEGER PRIMARY KEY AUTOINCREMENT,
    project TEXT NOT NULL,
    id      TEXT NOT NULL
);
";
const COLUMNS: &str =
    "project, id, name, description, scopes, expire, created_at, updated_at, accessed_at, sdks, digest";

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

fn millis(date: &DateTime<Utc>) -> i64 {
    date.timestamp_millis()
}

fn from_millis(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms).single().unwrap_or_default()
}

fn read_record(row: &Row<'_>) -> rusqlite::Result<KeyRecord> {
    let scopes: String = row.get(4)?;
    let sdks: String = row.get(9)?;
    let digest: Vec<u8> = row.get(10)?;
    let digest: [u8; 32] = digest.try_into().map_err(|_| {
        rusqlite::Error::FromSqlConversionFailure(
            10,
            rusqlite::types::Type::Blob,
            "digest is not 32 bytes".into(),
        )
    })?;
    Ok(KeyRecord {
        project: row.get(0)?,
        id: row.get(1)?,
        name: row.get(2)?,
        description: row.get(3)?,
        scopes: serde_json::from_str(&scopes).unwrap_or_default(),
        expire: row.get::<_, Option<i64>>(5)?.map(from_millis),
        created_at: from_millis(row.get(6)?),
        updated_at: from_millis(row.get(7)?),
        accessed_at: row.get::<_, Option<i64>>(8)?.map(from_millis),
        sdks: serde_json::from_str(&sdks).unwrap_or_default(),
        digest: Digest(digest),
    })
}

fn select_one(conn: &Connection, project: &str, id: &str) -> Result<Option<KeyRecord>, StoreError> {
    conn.query_row(
        &format!("SELECT {COLUMNS} FROM keys WHERE project = ?1 AND id = ?2"),
        params![project, id],
        read_record,
    )
    .optional()
    .map_err(unavailable)
}

fn record_change(conn: &Connection, project: &str, id: &str) -> Result<(), StoreError> {
    conn.execute(
        "INSERT INTO key_changes (project, id) VALUES (?1, ?2)",
        params![project, id],
    )
    .map(drop)
    .map_err(unavailable)
}

fn json(list: &[String]) -> String {
    serde_json::to_string(list).unwrap_or_else(|_| "[]".into())
}

#[async_trait]
impl KeyStore for SqliteStore {
    async fn create(&self, key: NewKey) -> Result<KeyRecord, StoreError> {
        self.with(move |conn| {
            let tx = conn.transaction().map_err(unavailable)?;
            let now = millis(&Utc::now());
            let inserted = tx.execute(
                "INSERT INTO keys (project, id, name, description, scopes, expire, created_at, updated_at, digest)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7, ?8)",
                params![
                    key.project,
                    key.id,
                    key.name,
                    key.description,
                    json(&key.scopes),
                    key.expire.as_ref().map(millis),
                    now,
                    &key.digest.0[..],
                ],
            );
            match inserted {
                Ok(_) => {}
                Err(rusqlite::Error::SqliteFailure(e, Some(msg)))
                    if e.code == ErrorCode::ConstraintViolation =>
                {
                    return Err(if msg.contains("digest") {
                        StoreError::DuplicateSecret
                    } else {
                        StoreError::AlreadyExists
                    });
                }
                Err(e) => return Err(unavailable(e)),
            }
            record_change(&tx, &key.project, &key.id)?;
            let record = select_one(&tx, &key.project, &key.id)?
                .ok_or_else(|| StoreError::Unavailable("created key vanished".into()))?;
            tx.commit().map_err(unavailable)?;
            Ok(record)
        })
        .await
    }

    async fn get(&self, project: &str, id: &str) -> Result<Option<KeyRecord>, StoreError> {
        let (project, id) = (project.to_owned(), id.to_owned());
        self.with(move |conn| select_one(conn, &project, &id)).await
    }

    async fn list(&self, project: &str) -> Result<Vec<KeyRecord>, StoreError> {
        let project = project.to_owned();
        self.with(move |conn| {
            let mut stmt = conn
                .prepare_cached(&format!(
                    "SELECT {COLUMNS} FROM keys WHERE project = ?1 ORDER BY created_at, id"
                ))
                .map_err(unavailable)?;
            let rows = stmt
                .query_map(params![project], read_record)
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
    ) -> Result<KeyRecord, StoreError> {
        let (project, id) = (project.to_owned(), id.to_owned());
        self.with(move |conn| {
            let tx = conn.transaction().map_err(unavailable)?;
            let changed = tx
                .execute(
                    "UPDATE keys SET name = ?3, description = ?4, scopes = ?5, expire = ?6, updated_at = ?7
                     WHERE project = ?1 AND id = ?2",
                    params![
                        project,
                        id,
                        update.name,
                        update.description,
                        json(&update.scopes),
                        update.expire.as_ref().map(millis),
                        millis(&Utc::now()),
                    ],
                )
                .map_err(unavailable)?;
            if changed == 0 {
                return Err(StoreError::NotFound);
            }
            record_change(&tx, &project, &id)?;
            let record = select_one(&tx, &project, &id)?.ok_or(StoreError::NotFound)?;
            tx.commit().map_err(unavailable)?;
            Ok(record)
        })
        .await
    }

    async fn delete(&self, project: &str, id: &str) -> Result<(), StoreError> {
        let (project, id) = (project.to_owned(), id.to_owned());
        self.with(move |conn| {
            let tx = conn.transaction().map_err(unavailable)?;
            let changed = tx
                .execute(
                    "DELETE FROM keys WHERE project = ?1 AND id = ?2",
                    params![project, id],
                )
                .map_err(unavailable)?;
            if changed == 0 {
                return Err(StoreError::NotFound);
            }
            record_change(&tx, &project, &id)?;
            tx.commit().map_err(unavailable)
        })
        .await
    }

    async fn load_all(&self) -> Result<(Vec<KeyRecord>, Cursor), StoreError> {
        self.with(|conn| {
            // One read transaction, so the keys and the cursor describe the same moment.
            let tx = conn.transaction().map_err(unavailable)?;
            let cursor: i64 = tx
                .query_row("SELECT COALESCE(MAX(seq), 0) FROM key_changes", [], |r| {
                    r.get(0)
                })
                .map_err(unavailable)?;
            let records = {
                let mut stmt = tx
                    .prepare(&format!("SELECT {COLUMNS} FROM keys"))
                    .map_err(unavailable)?;
                let rows = stmt.query_map([], read_record).map_err(unavailable)?;
                rows.collect::<Result<Vec<_>, _>>().map_err(unavailable)?
            };
            tx.commit().map_err(unavailable)?;
            Ok((records, Cursor(cursor)))
        })
        .await
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
}

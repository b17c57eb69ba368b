//! Loading every key from a store into the cache: the streaming load (`KeyStore::load_each`) on
//! SQLite and PostgreSQL with more keys than one batch or page, and the gateway's resync, which
//! upserts what the store has and sweeps what it no longer has.
//!
//! PostgreSQL is expected on 127.0.0.1:5432 (`KEYGATE_TEST_PG_PORT` to change the port) with
//! trust authentication for `postgres` or `root`. Without it the PostgreSQL tests print
//! "SKIPPED: …" and pass, unless `KEYGATE_REQUIRE_SERVICES=1`.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::{Duration, Utc};
use keygate::config::Snapshot;
use keygate::gateway::Gateway;
use keygate::keys::store::{Actor, KeyStore, NewKey, Rotation, SqliteStore};
use keygate::keys::{Digest, KeyKind, KeyRecord, Secret};

mod common;
use common::pg::PgDb;

/// More than one SQLite batch (1024) and more than two PostgreSQL pages (5000).
const MANY: usize = 12_345;

/// Where key `i` of the bulk insert goes: two projects that sort differently byte-wise ("C")
/// and case-insensitively, ids of mixed case.
fn bulk_key(i: usize) -> (String, String) {
    let project = if i % 3 == 0 { "B" } else { "a" };
    let id = if i % 2 == 0 {
        format!("k{i}")
    } else {
        format!("K{i}")
    };
    (project.to_owned(), id)
}

fn bulk_digest(i: usize) -> Digest {
    Digest::of(&format!("s{i}"))
}

/// Writes `MANY` keys into a SQLite store's file behind its back, in one transaction.
fn sqlite_bulk_insert(path: &Path) {
    let mut conn = rusqlite::Connection::open(path).unwrap();
    let tx = conn.transaction().unwrap();
    {
        let mut insert = tx
            .prepare(
                "INSERT INTO keys (project, id, kind, name, description, scopes, created_at,
                                   updated_at, digest)
                 VALUES (?1, ?2, 'standard', 'bulk', '', '[\"users.read\"]', 1, 1, ?3)",
            )
            .unwrap();
        for i in 0..MANY {
            let (project, id) = bulk_key(i);
            insert
                .execute(rusqlite::params![project, id, &bulk_digest(i).0[..]])
                .unwrap();
        }
    }
    tx.commit().unwrap();
}

/// The same keys, written into a PostgreSQL store's database behind its back.
async fn postgres_bulk_insert(client: &tokio_postgres::Client) {
    let mut projects = Vec::with_capacity(MANY);
    let mut ids = Vec::with_capacity(MANY);
    let mut digests = Vec::with_capacity(MANY);
    for i in 0..MANY {
        let (project, id) = bulk_key(i);
        projects.push(project);
        ids.push(id);
        digests.push(bulk_digest(i).0.to_vec());
    }
    client
        .execute(
            "INSERT INTO keys (project, id, kind, name, description, scopes, created_at,
                               updated_at, digest)
             SELECT p, i, 'standard', 'bulk', '', '[\"users.read\"]', 1, 1, d
             FROM UNNEST($1::text[], $2::text[], $3::bytea[]) AS u (p, i, d)",
            &[&projects, &ids, &digests],
        )
        .await
        .unwrap();
}

/// Streams every key and checks that each arrived once, whole, and that the cursor is right.
async fn check_streamed(store: &dyn KeyStore, also: &[KeyRecord]) {
    let mut seen = HashSet::new();
    let mut streamed = Vec::new();
    let cursor = store
        .load_each(&mut |record| {
            assert!(
                seen.insert((record.project.clone(), record.id.clone())),
                "{}/{} streamed twice",
                record.project,
                record.id
            );
            streamed.push(record);
        })
        .await
        .unwrap();
    assert_eq!(streamed.len(), MANY + also.len());
    assert_eq!(store.count().await.unwrap(), streamed.len());
    for i in 0..MANY {
        assert!(
            seen.contains(&bulk_key(i)),
            "{:?} not streamed",
            bulk_key(i)
        );
    }
    let bulk: Vec<&KeyRecord> = streamed.iter().filter(|r| r.name == "bulk").collect();
    assert_eq!(bulk.len(), MANY);
    let digests: HashSet<Digest> = bulk.iter().map(|r| r.digest).collect();
    assert_eq!(digests, (0..MANY).map(bulk_digest).collect());
    assert!(bulk
        .iter()
        .all(|r| r.scopes == ["users.read"] && r.kind == KeyKind::Standard));
    for record in also {
        assert!(
            streamed.contains(record),
            "{} not streamed whole",
            record.id
        );
    }
    // The cursor is where the feed is: the created keys' changes are before it.
    let (after, _) = store.changes_since(cursor).await.unwrap();
    assert!(
        after.iter().all(|c| also.iter().any(|r| r.id == c.id)),
        "{after:?}"
    );
    // `load_all` is the same load, collected.
    let (all, _) = store.load_all().await.unwrap();
    assert_eq!(all.len(), streamed.len());
}

fn new_key(project: &str, id: &str, scopes: &[&str]) -> (NewKey, Secret) {
    let secret = Secret::generate();
    let key = NewKey {
        id: id.into(),
        project: project.into(),
        kind: KeyKind::Standard,
        name: id.into(),
        description: String::new(),
        scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
        expire: None,
        digest: secret.digest(),
        rate_limit: None,
    };
    (key, secret)
}

#[tokio::test]
async fn sqlite_streams_every_key_in_batches() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.db");
    let store = SqliteStore::open(&path).await.unwrap();
    sqlite_bulk_insert(&path);
    let created = store
        .create(new_key("demo", "made", &["users.write"]).0, Actor::CLI)
        .await
        .unwrap();
    check_streamed(&store, &[created]).await;
}

#[tokio::test]
async fn postgres_streams_every_key_in_pages() {
    let Some(db) = PgDb::fresh().await else {
        return;
    };
    let store = db.open().await;
    postgres_bulk_insert(&db.client().await).await;
    let created = store
        .create(new_key("demo", "made", &["users.write"]).0, Actor::CLI)
        .await
        .unwrap();
    check_streamed(&*store, &[created]).await;
}

#[tokio::test]
async fn sqlite_load_stops_cleanly_when_abandoned() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.db");
    let store = SqliteStore::open(&path).await.unwrap();
    sqlite_bulk_insert(&path);
    // The caller gives up after the first key: the reader stops and the store stays usable.
    let (stop, stopped) = tokio::sync::oneshot::channel();
    let mut stop = Some(stop);
    let mut sink = |_| {
        if let Some(stop) = stop.take() {
            let _ = stop.send(());
        }
    };
    let load = store.load_each(&mut sink);
    tokio::select! {
        biased;
        _ = stopped => {}
        _ = load => panic!("the load finished before it was abandoned"),
    }
    let (all, _) = store.load_all().await.unwrap();
    assert_eq!(all.len(), MANY);
}

// ---------------------------------------------------------------------------------------------
// Resync

const CONFIG: &str = r#"
server: { listen: "127.0.0.1:0" }
store: { url: "sqlite://unused.db" }
projects: { demo: {} }
upstreams: { none: { url: "http://127.0.0.1:9" } }
routes:
  - { methods: [GET], path: /v1/users, scopes: [users.read] }
  - { methods: [POST], path: /v1/users, scopes: [users.write] }
"#;

/// Writes to a store's tables without the store (so without its change feed).
enum Backdoor {
    Sqlite(PathBuf),
    Postgres(tokio_postgres::Client),
}

impl Backdoor {
    async fn execute(&self, sql: &str) {
        match self {
            Backdoor::Sqlite(path) => {
                rusqlite::Connection::open(path)
                    .unwrap()
                    .execute_batch(sql)
                    .unwrap();
            }
            Backdoor::Postgres(client) => client.batch_execute(sql).await.unwrap(),
        }
    }

    async fn insert(&self, project: &str, id: &str, digest: &Digest) {
        let hex = hex::encode(digest.0);
        let digest = match self {
            Backdoor::Sqlite(_) => format!("X'{hex}'"),
            Backdoor::Postgres(_) => format!("'\\x{hex}'::bytea"),
        };
        self.execute(&format!(
            "INSERT INTO keys (project, id, kind, name, description, scopes, created_at,
                               updated_at, digest)
             VALUES ('{project}', '{id}', 'standard', '{id}', '', '[\"users.read\"]', 1, 1,
                     {digest})"
        ))
        .await;
    }
}

/// Keys created through the store, then changed behind its back (no change reaches the feed):
/// a resync must bring the cache to what the store holds.
async fn resync_applies_what_the_feed_missed(store: Arc<dyn KeyStore>, backdoor: Backdoor) {
    let (a, a_secret) = new_key("demo", "a", &["users.read"]);
    let (b, b_secret) = new_key("demo", "b", &["users.read"]);
    let (c, c_old) = new_key("demo", "c", &["users.read"]);
    for key in [a, b, c] {
        store.create(key, Actor::CLI).await.unwrap();
    }
    let c_new = Secret::generate();
    let grace_until = Utc::now() + Duration::hours(1);
    store
        .rotate(
            "demo",
            "c",
            Rotation {
                digest: c_new.digest(),
                grace_until: Some(grace_until),
            },
            Actor::CLI,
        )
        .await
        .unwrap();
    let snapshot = Snapshot::parse(Path::new("keygate.yaml"), CONFIG).unwrap();
    let gateway = Gateway::with_store(snapshot, store.clone()).await.unwrap();
    let keys = gateway.keys();
    assert_eq!(keys.len(), 3);
    assert!(keys.lookup(&c_old.digest()).is_some());

    let d_secret = Secret::generate();
    backdoor
        .execute("DELETE FROM keys WHERE project = 'demo' AND id = 'b'")
        .await;
    backdoor
        .execute("UPDATE keys SET scopes = '[\"users.write\"]' WHERE project = 'demo' AND id = 'a'")
        .await;
    backdoor.insert("demo", "d", &d_secret.digest()).await;
    // Nothing told the cache.
    assert!(keys.lookup(&b_secret.digest()).is_some());
    assert!(keys.lookup(&d_secret.digest()).is_none());

    assert_eq!(gateway.resync().await.unwrap(), 3);
    assert_eq!(keys.len(), 3);
    assert!(keys.lookup(&b_secret.digest()).is_none(), "b was swept");
    let a = keys.lookup(&a_secret.digest()).unwrap();
    assert_eq!(&*a.grant.names, &["users.write".into()] as &[Box<str>]);
    assert_eq!(
        *a.scopes(),
        gateway.snapshot().scopes.compile(["users.write"]).unwrap()
    );
    assert_eq!(&*keys.lookup(&d_secret.digest()).unwrap().id, "d");
    // The rotated key keeps its previous secret, with its deadline.
    assert_eq!(
        keys.lookup(&c_new.digest()).unwrap().secret_valid_until(),
        None
    );
    assert_eq!(
        keys.lookup(&c_old.digest()).unwrap().secret_valid_until(),
        Some(grace_until.timestamp())
    );

    // A resync with nothing changed keeps every entry as it is.
    let before = keys.lookup(&d_secret.digest()).unwrap();
    assert_eq!(gateway.resync().await.unwrap(), 3);
    assert!(Arc::ptr_eq(
        &before,
        &keys.lookup(&d_secret.digest()).unwrap()
    ));
    assert_eq!(keys.len(), 3);

    // Emptied behind its back, the store empties the cache.
    backdoor.execute("DELETE FROM keys").await;
    assert_eq!(gateway.resync().await.unwrap(), 0);
    assert!(keys.is_empty());
    assert!(keys.lookup(&c_old.digest()).is_none() && keys.lookup(&c_new.digest()).is_none());
}

#[tokio::test]
async fn sqlite_resync_applies_what_the_feed_missed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.db");
    let store = Arc::new(SqliteStore::open(&path).await.unwrap());
    resync_applies_what_the_feed_missed(store, Backdoor::Sqlite(path)).await;
}

#[tokio::test]
async fn postgres_resync_applies_what_the_feed_missed() {
    let Some(db) = PgDb::fresh().await else {
        return;
    };
    let store = db.open().await;
    resync_applies_what_the_feed_missed(store, Backdoor::Postgres(db.client().await)).await;
}

/// When PostgreSQL's listening connection comes back, the feed has lost track of what changed
/// meanwhile: the gateway then streams every key again and sweeps, rather than having the feed
/// report every key in one batch (a memory spike at a million keys). A row deleted behind the
/// store's back (no notification, no deletion log) is what only the sweep notices.
#[tokio::test]
async fn postgres_feed_loss_reloads_every_key_with_a_sweep() {
    let Some(db) = PgDb::fresh().await else {
        return;
    };
    let store = db.open().await;
    let (a, a_secret) = new_key("demo", "a", &["users.read"]);
    let (b, b_secret) = new_key("demo", "b", &["users.read"]);
    for key in [a, b] {
        store.create(key, Actor::CLI).await.unwrap();
    }
    let snapshot = Snapshot::parse(Path::new("keygate.yaml"), CONFIG).unwrap();
    let gateway = Gateway::with_store(snapshot, store.clone()).await.unwrap();
    let keys = gateway.keys();
    assert_eq!(keys.len(), 2);

    db.client()
        .await
        .batch_execute("DELETE FROM keys WHERE project = 'demo' AND id = 'b'")
        .await
        .unwrap();
    // The feed heard nothing: a sync leaves the cache as it was.
    gateway.sync_once().await.unwrap();
    assert!(keys.lookup(&b_secret.digest()).is_some());

    // The listener's connection drops; once it is back, the next sync reloads every key.
    let killed = db.terminate_connections().await;
    assert!(killed >= 1, "no connection terminated");
    let swept = common::eventually(std::time::Duration::from_secs(15), || async {
        let _ = gateway.sync_once().await;
        keys.lookup(&b_secret.digest()).is_none()
    })
    .await;
    assert!(
        swept.is_some(),
        "b, deleted behind the feed, is still cached"
    );
    assert!(keys.lookup(&a_secret.digest()).is_some());
    assert_eq!(keys.len(), 1);
    // The resync acknowledged the feed's marker: the next sync is an ordinary one, which applies
    // the one change (a resync would report both keys).
    let (c, c_secret) = new_key("demo", "c", &["users.read"]);
    store.create(c, Actor::CLI).await.unwrap();
    assert_eq!(gateway.sync_once().await.unwrap(), 1);
    assert!(keys.lookup(&c_secret.digest()).is_some());
}

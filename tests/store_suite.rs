//! One behaviour suite for every `KeyStore`, written once against `&dyn KeyStore` and run on
//! SQLite (a temporary file) and on PostgreSQL (a fresh database per test); then what only the
//! PostgreSQL store has to show (lost connections, outages, concurrent migrations) and the
//! migration between stores.
//!
//! PostgreSQL is expected on 127.0.0.1:5432 (`KEYGATE_TEST_PG_PORT` to change the port) with
//! trust authentication for `postgres` or `root`. Without it the PostgreSQL tests print
//! "SKIPPED: …" and pass, unless `KEYGATE_REQUIRE_SERVICES=1`.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeZone, Utc};
use keygate::keys::store::{
    audit_identity, Actor, AuditEvent, Change, Cursor, KeyStore, KeyUpdate, NewKey, PostgresStore,
    Rotation, SqliteStore, StoreError, Usage,
};
use keygate::keys::{KeyKind, KeyRateLimit, KeyRecord, PreviousSecret, Secret};
use tokio::net::{TcpListener, TcpStream};

use keygate::store_migrate;

mod common;
use common::pg::{pg_port, PgDb};

// ---------------------------------------------------------------------------------------------
// PostgreSQL test databases

async fn sqlite_pair() -> (tempfile::TempDir, Arc<dyn KeyStore>, Arc<dyn KeyStore>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.db");
    let a = SqliteStore::open(&path).await.unwrap();
    let b = SqliteStore::open(&path).await.unwrap();
    (dir, Arc::new(a), Arc::new(b))
}

/// Runs each behaviour test twice: `sqlite::name` and `postgres::name`. Each gets two handles on
/// one store (two connections to one file, or two stores on one database).
macro_rules! suite {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $name() {
                    let (_dir, a, b) = super::sqlite_pair().await;
                    super::$name(&*a, &*b).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $name() {
                    let Some(db) = super::PgDb::fresh().await else { return };
                    let (a, b) = (db.open().await, db.open().await);
                    super::$name(&*a, &*b).await;
                }
            )*
        }
    };
}

suite!(
    create_get_and_list_by_kind,
    list_orders_by_creation_then_id,
    update_replaces_the_editable_fields,
    rotate_with_and_without_grace,
    delete_removes_the_key,
    duplicate_ids_and_secrets_are_refused,
    record_usage_merges_and_is_not_a_change,
    audit_rows_have_actor_and_changes_and_never_a_digest,
    changes_since_reports_every_write,
    load_all_returns_every_key,
    import_record_and_import_audit,
);

// ---------------------------------------------------------------------------------------------
// Helpers

fn new_key(project: &str, id: &str, kind: KeyKind) -> (NewKey, Secret) {
    let secret = Secret::generate_for(kind);
    (
        NewKey {
            id: id.into(),
            project: project.into(),
            kind,
            name: format!("key {id}"),
            description: String::new(),
            scopes: if kind == KeyKind::Standard {
                vec!["users.read".into()]
            } else {
                vec![]
            },
            expire: None,
            digest: secret.digest(),
            rate_limit: None,
        },
        secret,
    )
}

async fn create(store: &dyn KeyStore, project: &str, id: &str) -> KeyRecord {
    store
        .create(new_key(project, id, KeyKind::Standard).0, Actor::CLI)
        .await
        .unwrap()
}

/// A time at millisecond precision, as stores keep it.
fn ms(date: DateTime<Utc>) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(date.timestamp_millis()).unwrap()
}

fn ids(records: &[KeyRecord]) -> Vec<&str> {
    records.iter().map(|r| r.id.as_str()).collect()
}

/// Reads the change feed until it has been quiet for a while (a PostgreSQL store hears its own
/// writes a second time, through LISTEN); returns what it read and the cursor after it.
async fn settle(store: &dyn KeyStore, mut cursor: Cursor) -> (Vec<Change>, Cursor) {
    let mut all = Vec::new();
    let mut quiet_since = Instant::now();
    while quiet_since.elapsed() < Duration::from_millis(400) {
        let (changes, next) = store.changes_since(cursor).await.unwrap();
        if !changes.is_empty() {
            quiet_since = Instant::now();
        }
        all.extend(changes);
        cursor = next;
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    (all, cursor)
}

/// Polls the feed until every change in `expected` was seen, or `within` passes.
async fn feed_reports(
    store: &dyn KeyStore,
    mut cursor: Cursor,
    expected: &[(&str, &str)],
    within: Duration,
) -> (HashSet<(String, String)>, Cursor) {
    let started = Instant::now();
    let mut seen = HashSet::new();
    loop {
        if let Ok((changes, next)) = store.changes_since(cursor).await {
            seen.extend(changes.into_iter().map(|c| (c.project, c.id)));
            cursor = next;
        }
        let done = expected
            .iter()
            .all(|(p, i)| seen.contains(&(p.to_string(), i.to_string())));
        if done || started.elapsed() > within {
            return (seen, cursor);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn set(pairs: &[(&str, &str)]) -> HashSet<(String, String)> {
    pairs
        .iter()
        .map(|(p, i)| (p.to_string(), i.to_string()))
        .collect()
}

fn without_seq(events: &[AuditEvent]) -> Vec<String> {
    events.iter().map(audit_identity).collect()
}

// ---------------------------------------------------------------------------------------------
// The behaviour suite

async fn create_get_and_list_by_kind(store: &dyn KeyStore, _: &dyn KeyStore) {
    let expire = ms(Utc::now() + chrono::Duration::days(3));
    let (mut key, _) = new_key("demo", "k1", KeyKind::Standard);
    key.description = "the first".into();
    key.scopes = vec!["users.read".into(), "documents.write".into()];
    key.expire = Some(expire);
    key.rate_limit = Some(KeyRateLimit {
        limit: 10,
        window_secs: 60,
    });
    let before = ms(Utc::now());
    let created = store.create(key.clone(), Actor::CLI).await.unwrap();
    assert_eq!(created.id, "k1");
    assert_eq!(created.project, "demo");
    assert_eq!(created.kind, KeyKind::Standard);
    assert_eq!(created.name, "key k1");
    assert_eq!(created.description, "the first");
    assert_eq!(created.scopes, key.scopes);
    assert_eq!(created.expire, Some(expire));
    assert_eq!(created.rate_limit, key.rate_limit);
    assert_eq!(created.digest, key.digest);
    assert_eq!(created.previous, None);
    assert_eq!(created.accessed_at, None);
    assert!(created.sdks.is_empty());
    assert_eq!(created.created_at, created.updated_at);
    assert!(created.created_at >= before && created.created_at <= Utc::now());
    assert_eq!(
        store.get("demo", "k1").await.unwrap(),
        Some(created.clone())
    );

    let dev = store
        .create(new_key("demo", "d1", KeyKind::Dev).0, Actor::CLI)
        .await
        .unwrap();
    assert_eq!(dev.kind, KeyKind::Dev);
    let k2 = create(store, "demo", "k2").await;
    // The same id in another project is another key.
    let other = create(store, "other", "k1").await;
    assert_ne!(other.digest, created.digest);

    assert_eq!(
        ids(&store.list("demo", KeyKind::Standard).await.unwrap()),
        ["k1", "k2"]
    );
    assert_eq!(
        store.list("demo", KeyKind::Dev).await.unwrap(),
        vec![dev.clone()]
    );
    assert_eq!(
        store.list("other", KeyKind::Standard).await.unwrap(),
        vec![other]
    );
    assert!(store.list("other", KeyKind::Dev).await.unwrap().is_empty());
    assert!(store
        .list("nobody", KeyKind::Standard)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(store.get("demo", "k2").await.unwrap(), Some(k2));
    assert_eq!(store.get("demo", "missing").await.unwrap(), None);
    assert_eq!(store.get("other", "d1").await.unwrap(), None);
    store.ping().await.unwrap();
}

fn record_at(project: &str, id: &str, created_ms: i64) -> KeyRecord {
    let created = Utc.timestamp_millis_opt(created_ms).unwrap();
    KeyRecord {
        id: id.into(),
        project: project.into(),
        kind: KeyKind::Standard,
        name: id.into(),
        description: String::new(),
        scopes: vec!["users.read".into()],
        expire: None,
        created_at: created,
        updated_at: created,
        accessed_at: None,
        sdks: vec![],
        digest: Secret::generate().digest(),
        previous: None,
        rate_limit: None,
    }
}

async fn list_orders_by_creation_then_id(store: &dyn KeyStore, _: &dyn KeyStore) {
    // Same creation time: ordered by id, byte by byte (as SQLite compares text), so "B" sorts
    // before "a" and "10" before "9" whatever the database's collation.
    let base = 1_700_000_000_000;
    for (id, at) in [
        ("b", base),
        ("9", base),
        ("a", base),
        ("late", base + 5),
        ("B", base),
        ("10", base),
        ("a-", base),
        ("zz", base - 1),
    ] {
        assert!(store
            .import_record(&record_at("demo", id, at))
            .await
            .unwrap());
    }
    let listed = store.list("demo", KeyKind::Standard).await.unwrap();
    assert_eq!(ids(&listed), ["zz", "10", "9", "B", "a", "a-", "b", "late"]);
    // Keys created one after another come out in creation order.
    let mut created = Vec::new();
    for n in 0..5 {
        created.push(create(store, "seq", &format!("x{}", 5 - n)).await);
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert_eq!(
        ids(&store.list("seq", KeyKind::Standard).await.unwrap()),
        ids(&created)
    );
}

async fn update_replaces_the_editable_fields(store: &dyn KeyStore, _: &dyn KeyStore) {
    let (mut key, _) = new_key("demo", "k1", KeyKind::Standard);
    key.description = "before".into();
    key.rate_limit = Some(KeyRateLimit {
        limit: 5,
        window_secs: 1,
    });
    let created = store.create(key, Actor::CLI).await.unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    let expire = ms(Utc::now() + chrono::Duration::hours(1));
    let updated = store
        .update(
            "demo",
            "k1",
            KeyUpdate {
                name: "renamed".into(),
                description: "before".into(),
                scopes: vec!["users.write".into()],
                expire: Some(expire),
                rate_limit: None,
            },
            Actor("k-admin"),
        )
        .await
        .unwrap();
    assert_eq!(updated.name, "renamed");
    assert_eq!(updated.description, "before");
    assert_eq!(updated.scopes, ["users.write"]);
    assert_eq!(updated.expire, Some(expire));
    assert_eq!(updated.rate_limit, None);
    assert_eq!(updated.created_at, created.created_at);
    assert!(updated.updated_at > created.updated_at);
    assert_eq!(updated.digest, created.digest);
    assert_eq!(updated.kind, KeyKind::Standard);
    assert_eq!(
        store.get("demo", "k1").await.unwrap(),
        Some(updated.clone())
    );

    let audit = store.audit(Some("k1")).await.unwrap();
    let last = audit.last().unwrap();
    assert_eq!(last.action, "update");
    assert_eq!(last.actor, "k-admin");
    assert_eq!(
        last.changes["name"],
        serde_json::json!(["key k1", "renamed"])
    );
    assert_eq!(
        last.changes["scopes"],
        serde_json::json!([["users.read"], ["users.write"]])
    );
    assert_eq!(
        last.changes["rateLimit"],
        serde_json::json!([{"limit": 5, "window": 1}, null])
    );
    assert!(
        last.changes.get("description").is_none(),
        "{}",
        last.changes
    );

    let missing = store
        .update(
            "demo",
            "nope",
            KeyUpdate {
                name: "x".into(),
                description: String::new(),
                scopes: vec![],
                expire: None,
                rate_limit: None,
            },
            Actor::CLI,
        )
        .await;
    assert!(matches!(missing, Err(StoreError::NotFound)), "{missing:?}");
    // Another project's key of the same id is not this one.
    let elsewhere = store
        .update(
            "other",
            "k1",
            KeyUpdate {
                name: "x".into(),
                description: String::new(),
                scopes: vec![],
                expire: None,
                rate_limit: None,
            },
            Actor::CLI,
        )
        .await;
    assert!(matches!(elsewhere, Err(StoreError::NotFound)));
}

async fn rotate_with_and_without_grace(store: &dyn KeyStore, _: &dyn KeyStore) {
    let created = create(store, "demo", "k1").await;
    let other = create(store, "demo", "k2").await;

    let first = Secret::generate();
    let rotated = store
        .rotate(
            "demo",
            "k1",
            Rotation {
                digest: first.digest(),
                grace_until: None,
            },
            Actor::CLI,
        )
        .await
        .unwrap();
    assert_eq!(rotated.digest, first.digest());
    assert_eq!(rotated.previous, None);
    assert!(rotated.updated_at >= created.updated_at);

    let second = Secret::generate();
    let until = ms(Utc::now() + chrono::Duration::minutes(10));
    let graced = store
        .rotate(
            "demo",
            "k1",
            Rotation {
                digest: second.digest(),
                grace_until: Some(until),
            },
            Actor("k-admin"),
        )
        .await
        .unwrap();
    assert_eq!(graced.digest, second.digest());
    assert_eq!(
        graced.previous,
        Some(PreviousSecret {
            digest: first.digest(),
            until
        })
    );
    assert_eq!(store.get("demo", "k1").await.unwrap(), Some(graced.clone()));

    // A rotation without grace ends the previous secret at once.
    let third = Secret::generate();
    let ended = store
        .rotate(
            "demo",
            "k1",
            Rotation {
                digest: third.digest(),
                grace_until: None,
            },
            Actor::CLI,
        )
        .await
        .unwrap();
    assert_eq!(ended.previous, None);

    let clash = store
        .rotate(
            "demo",
            "k1",
            Rotation {
                digest: other.digest,
                grace_until: None,
            },
            Actor::CLI,
        )
        .await;
    assert!(
        matches!(clash, Err(StoreError::DuplicateSecret)),
        "{clash:?}"
    );
    assert_eq!(store.get("demo", "k1").await.unwrap(), Some(ended));
    let missing = store
        .rotate(
            "demo",
            "nope",
            Rotation {
                digest: Secret::generate().digest(),
                grace_until: None,
            },
            Actor::CLI,
        )
        .await;
    assert!(matches!(missing, Err(StoreError::NotFound)));

    let rotations: Vec<AuditEvent> = store
        .audit(Some("k1"))
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.action == "rotate")
        .collect();
    assert_eq!(rotations.len(), 3);
    assert_eq!(
        rotations[0].changes,
        serde_json::json!({"secret": "rotated", "previousSecretValidUntil": null})
    );
    assert_eq!(
        rotations[1].changes,
        serde_json::json!({
            "secret": "rotated",
            "previousSecretValidUntil": keygate::keys::format_date(&until),
        })
    );
    assert_eq!(rotations[1].actor, "k-admin");
}

async fn delete_removes_the_key(store: &dyn KeyStore, _: &dyn KeyStore) {
    let gone = create(store, "demo", "k1").await;
    create(store, "demo", "k2").await;
    create(store, "other", "k1").await;
    store.delete("demo", "k1", Actor("k-admin")).await.unwrap();
    assert_eq!(store.get("demo", "k1").await.unwrap(), None);
    assert_eq!(
        ids(&store.list("demo", KeyKind::Standard).await.unwrap()),
        ["k2"]
    );
    assert!(store.get("other", "k1").await.unwrap().is_some());
    let again = store.delete("demo", "k1", Actor::CLI).await;
    assert!(matches!(again, Err(StoreError::NotFound)), "{again:?}");
    let last = store.audit(Some("k1")).await.unwrap();
    let last = last.iter().rfind(|e| e.project == "demo").unwrap();
    assert_eq!(last.action, "delete");
    assert_eq!(last.actor, "k-admin");
    assert_eq!(last.changes["name"], "key k1");
    assert_eq!(last.changes["scopes"], serde_json::json!(["users.read"]));
    // Its secret is free again.
    let (mut again, _) = new_key("demo", "k3", KeyKind::Standard);
    again.digest = gone.digest;
    store.create(again, Actor::CLI).await.unwrap();
}

async fn duplicate_ids_and_secrets_are_refused(store: &dyn KeyStore, _: &dyn KeyStore) {
    let (key, _) = new_key("demo", "k1", KeyKind::Standard);
    let first = store.create(key.clone(), Actor::CLI).await.unwrap();
    let audit_before = store.audit(None).await.unwrap().len();

    let (mut same_id, _) = new_key("demo", "k1", KeyKind::Standard);
    same_id.name = "second".into();
    let err = store.create(same_id, Actor::CLI).await;
    assert!(matches!(err, Err(StoreError::AlreadyExists)), "{err:?}");
    // A dev key cannot take an API key's id either: one id space per project.
    let err = store
        .create(new_key("demo", "k1", KeyKind::Dev).0, Actor::CLI)
        .await;
    assert!(matches!(err, Err(StoreError::AlreadyExists)), "{err:?}");

    let (mut same_secret, _) = new_key("demo", "k2", KeyKind::Standard);
    same_secret.digest = key.digest;
    let err = store.create(same_secret.clone(), Actor::CLI).await;
    assert!(matches!(err, Err(StoreError::DuplicateSecret)), "{err:?}");
    same_secret.project = "other".into();
    let err = store.create(same_secret, Actor::CLI).await;
    assert!(matches!(err, Err(StoreError::DuplicateSecret)), "{err:?}");

    assert_eq!(store.get("demo", "k1").await.unwrap(), Some(first));
    assert_eq!(store.get("demo", "k2").await.unwrap(), None);
    assert_eq!(store.audit(None).await.unwrap().len(), audit_before);
}

async fn record_usage_merges_and_is_not_a_change(store: &dyn KeyStore, _: &dyn KeyStore) {
    let created = create(store, "demo", "k1").await;
    create(store, "demo", "k2").await;
    let (_, cursor) = store.load_all().await.unwrap();
    let (_, cursor) = settle(store, cursor).await;
    let audit_before = store.audit(None).await.unwrap();

    let t0 = ms(Utc::now() - chrono::Duration::minutes(5));
    let t1 = ms(Utc::now() - chrono::Duration::minutes(1));
    let t2 = ms(Utc::now());
    let usage = |id: &str, at: Option<DateTime<Utc>>, sdks: &[&str]| Usage {
        project: "demo".into(),
        id: id.into(),
        accessed_at: at,
        sdks: sdks.iter().map(|s| s.to_string()).collect(),
    };
    store
        .record_usage(&[
            usage("k1", Some(t1), &["node"]),
            usage("nope", Some(t1), &["python"]),
        ])
        .await
        .unwrap();
    let k1 = store.get("demo", "k1").await.unwrap().unwrap();
    assert_eq!(k1.accessed_at, Some(t1));
    assert_eq!(k1.sdks, ["node"]);
    assert_eq!(k1.updated_at, created.updated_at);

    // Older time: kept at the latest; new names appended in order, known ones not repeated.
    store
        .record_usage(&[usage("k1", Some(t0), &["python", "node", "go"])])
        .await
        .unwrap();
    let k1 = store.get("demo", "k1").await.unwrap().unwrap();
    assert_eq!(k1.accessed_at, Some(t1));
    assert_eq!(k1.sdks, ["node", "python", "go"]);

    // No time: the time stays; a later one wins; two keys in one batch.
    store
        .record_usage(&[
            usage("k2", None, &["web"]),
            usage("k1", None, &[]),
            usage("k1", Some(t2), &["go"]),
        ])
        .await
        .unwrap();
    let k1 = store.get("demo", "k1").await.unwrap().unwrap();
    assert_eq!(k1.accessed_at, Some(t2));
    assert_eq!(k1.sdks, ["node", "python", "go"]);
    let k2 = store.get("demo", "k2").await.unwrap().unwrap();
    assert_eq!(k2.accessed_at, None);
    assert_eq!(k2.sdks, ["web"]);
    store.record_usage(&[]).await.unwrap();
    assert_eq!(store.get("demo", "nope").await.unwrap(), None);

    let (changes, _) = settle(store, cursor).await;
    assert!(
        changes.is_empty(),
        "usage reached the change feed: {changes:?}"
    );
    assert_eq!(store.audit(None).await.unwrap(), audit_before);
}

async fn audit_rows_have_actor_and_changes_and_never_a_digest(
    store: &dyn KeyStore,
    _: &dyn KeyStore,
) {
    let started = ms(Utc::now());
    let (key, secret) = new_key("demo", "k1", KeyKind::Standard);
    store.create(key, Actor::CLI).await.unwrap();
    let (dev, dev_secret) = new_key("demo", "d1", KeyKind::Dev);
    store.create(dev, Actor("ephemeral")).await.unwrap();
    store
        .update(
            "demo",
            "k1",
            KeyUpdate {
                name: "renamed".into(),
                description: "d".into(),
                scopes: vec!["users.read".into()],
                expire: None,
                rate_limit: None,
            },
            Actor("admin-key"),
        )
        .await
        .unwrap();
    let rotated = Secret::generate();
    store
        .rotate(
            "demo",
            "k1",
            Rotation {
                digest: rotated.digest(),
                grace_until: Some(Utc::now() + chrono::Duration::minutes(1)),
            },
            Actor("admin-key"),
        )
        .await
        .unwrap();
    store.delete("demo", "d1", Actor::CLI).await.unwrap();

    let all = store.audit(None).await.unwrap();
    let summary: Vec<(&str, &str, &str, &str)> = all
        .iter()
        .map(|e| {
            (
                e.key_id.as_str(),
                e.kind.as_str(),
                e.actor.as_str(),
                e.action.as_str(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("k1", "standard", "cli", "create"),
            ("d1", "dev", "ephemeral", "create"),
            ("k1", "standard", "admin-key", "update"),
            ("k1", "standard", "admin-key", "rotate"),
            ("d1", "dev", "cli", "delete"),
        ]
    );
    assert!(all.windows(2).all(|w| w[0].seq < w[1].seq));
    for event in &all {
        assert_eq!(event.project, "demo");
        let at = DateTime::parse_from_rfc3339(&event.at).unwrap();
        assert!(at >= started && at <= Utc::now(), "{}", event.at);
    }
    assert_eq!(all[0].changes["name"], "key k1");
    assert_eq!(all[0].changes["scopes"], serde_json::json!(["users.read"]));
    assert_eq!(all[0].changes["expire"], serde_json::Value::Null);
    assert_eq!(all[2].changes["description"], serde_json::json!(["", "d"]));
    assert_eq!(
        store.audit(Some("d1")).await.unwrap(),
        vec![all[1].clone(), all[4].clone()]
    );
    assert!(store.audit(Some("nope")).await.unwrap().is_empty());

    let text = serde_json::to_string(&all).unwrap();
    for digest in [secret.digest(), dev_secret.digest(), rotated.digest()] {
        assert!(
            !text.contains(&hex::encode(digest.0)),
            "a digest in the audit log"
        );
    }
    for s in [&secret, &dev_secret, &rotated] {
        assert!(!text.contains(s.expose()), "a secret in the audit log");
        assert!(!text.contains(&s.expose()[..40]));
    }
}

async fn changes_since_reports_every_write(store: &dyn KeyStore, other: &dyn KeyStore) {
    create(store, "demo", "before").await;
    let (loaded, cursor) = store.load_all().await.unwrap();
    assert_eq!(ids(&loaded), ["before"]);
    // Nothing after the load (a PostgreSQL store may still hear its own create once).
    let (early, cursor) = settle(store, cursor).await;
    assert!(
        early.iter().all(|c| c.id == "before"),
        "unexpected: {early:?}"
    );

    create(store, "demo", "k1").await;
    create(store, "demo", "k2").await;
    let k3 = create(store, "other", "k3").await;
    store
        .update(
            "demo",
            "k2",
            KeyUpdate {
                name: "n".into(),
                description: String::new(),
                scopes: vec![],
                expire: None,
                rate_limit: None,
            },
            Actor::CLI,
        )
        .await
        .unwrap();
    store
        .rotate(
            "other",
            "k3",
            Rotation {
                digest: Secret::generate().digest(),
                grace_until: None,
            },
            Actor::CLI,
        )
        .await
        .unwrap();
    store.delete("demo", "k1", Actor::CLI).await.unwrap();
    // A write through this handle is in the feed as soon as it returns.
    let (changes, next) = store.changes_since(cursor).await.unwrap();
    assert!(next > cursor);
    let seen: HashSet<(String, String)> = changes
        .iter()
        .map(|c| (c.project.clone(), c.id.clone()))
        .collect();
    assert_eq!(
        seen,
        set(&[("demo", "k1"), ("demo", "k2"), ("other", "k3")])
    );
    let (_, next) = settle(store, next).await;
    assert!(store.changes_since(next).await.unwrap().0.is_empty());
    assert_eq!(store.changes_since(next).await.unwrap().1, next);

    // Another handle (another process, another node) writes: heard within a second.
    create(other, "demo", "theirs").await;
    other.delete("other", "k3", Actor::CLI).await.unwrap();
    let (seen, _) = feed_reports(
        store,
        next,
        &[("demo", "theirs"), ("other", "k3")],
        Duration::from_secs(1),
    )
    .await;
    assert!(
        seen.is_superset(&set(&[("demo", "theirs"), ("other", "k3")])),
        "{seen:?}"
    );
    assert_eq!(store.get("other", "k3").await.unwrap(), None);
    assert_eq!(k3.id, "k3");
}

async fn load_all_returns_every_key(store: &dyn KeyStore, other: &dyn KeyStore) {
    assert!(store.load_all().await.unwrap().0.is_empty());
    let mut expected = Vec::new();
    for (project, id, kind) in [
        ("demo", "a", KeyKind::Standard),
        ("demo", "b", KeyKind::Dev),
        ("other", "a", KeyKind::Standard),
        ("third", "c", KeyKind::Dev),
    ] {
        expected.push(
            store
                .create(new_key(project, id, kind).0, Actor::CLI)
                .await
                .unwrap(),
        );
    }
    expected.push(create(other, "demo", "from-other").await);
    store.delete("demo", "a", Actor::CLI).await.unwrap();
    expected.remove(0);
    let by_key = |records: Vec<KeyRecord>| -> HashMap<(String, String), KeyRecord> {
        records
            .into_iter()
            .map(|r| ((r.project.clone(), r.id.clone()), r))
            .collect()
    };
    let (loaded, cursor) = store.load_all().await.unwrap();
    assert_eq!(by_key(loaded), by_key(expected.clone()));
    let (loaded_by_other, _) = other.load_all().await.unwrap();
    assert_eq!(by_key(loaded_by_other), by_key(expected));
    // The cursor is where the feed is: nothing new after it but echoes of what was loaded.
    let (after, _) = settle(store, cursor).await;
    let known: HashSet<&str> = ["a", "b", "c", "from-other"].into();
    assert!(
        after.iter().all(|c| known.contains(c.id.as_str())),
        "{after:?}"
    );
}

async fn import_record_and_import_audit(store: &dyn KeyStore, _: &dyn KeyStore) {
    let (_, cursor) = store.load_all().await.unwrap();
    let existing = create(store, "demo", "k1").await;
    let mut record = record_at("demo", "imported", 1_700_000_000_123);
    record.kind = KeyKind::Dev;
    record.description = "from elsewhere".into();
    record.expire = Some(Utc.timestamp_millis_opt(1_900_000_000_456).unwrap());
    record.updated_at = Utc.timestamp_millis_opt(1_700_000_100_000).unwrap();
    record.accessed_at = Some(Utc.timestamp_millis_opt(1_700_000_200_000).unwrap());
    record.sdks = vec!["python".into(), "node".into()];
    record.previous = Some(PreviousSecret {
        digest: Secret::generate().digest(),
        until: Utc.timestamp_millis_opt(1_800_000_000_000).unwrap(),
    });
    record.rate_limit = Some(KeyRateLimit {
        limit: 7,
        window_secs: 3600,
    });
    assert!(store.import_record(&record).await.unwrap());
    assert_eq!(
        store.get("demo", "imported").await.unwrap(),
        Some(record.clone())
    );
    assert!(!store.import_record(&record).await.unwrap());
    // An existing id is left alone, whatever the import holds.
    let mut clash = record.clone();
    clash.id = "k1".into();
    clash.digest = Secret::generate().digest();
    clash.previous = None;
    assert!(!store.import_record(&clash).await.unwrap());
    assert_eq!(
        store.get("demo", "k1").await.unwrap(),
        Some(existing.clone())
    );
    // A secret another key holds is refused.
    let mut stolen = record_at("demo", "stolen", 1);
    stolen.digest = existing.digest;
    assert!(matches!(
        store.import_record(&stolen).await,
        Err(StoreError::DuplicateSecret)
    ));

    let (seen, _) = feed_reports(
        store,
        cursor,
        &[("demo", "imported")],
        Duration::from_secs(1),
    )
    .await;
    assert!(seen.contains(&("demo".to_string(), "imported".to_string())));
    let audit = store.audit(Some("imported")).await.unwrap();
    assert_eq!(audit.len(), 1, "{audit:?}");
    assert_eq!(
        (audit[0].actor.as_str(), audit[0].action.as_str()),
        ("migrate", "import")
    );
    assert_eq!(audit[0].kind, "dev");

    // Audit events: appended once, identical ones kept as many times as given.
    let event = |key: &str, action: &str, at: &str| AuditEvent {
        seq: 0,
        at: at.into(),
        actor: "cli".into(),
        project: "demo".into(),
        key_id: key.into(),
        kind: "standard".into(),
        action: action.into(),
        changes: serde_json::json!({"name": "x", "scopes": ["a", "b"], "rateLimit": {"window": 60, "limit": 2}}),
    };
    let events = vec![
        event("old", "create", "2023-01-01T00:00:00.001+00:00"),
        event("old", "update", "2023-01-01T00:00:00.002+00:00"),
        event("old", "update", "2023-01-01T00:00:00.002+00:00"),
        event("old", "delete", "2023-01-02T00:00:00.000+00:00"),
    ];
    let before = store.audit(None).await.unwrap();
    assert_eq!(store.import_audit(&events).await.unwrap(), 4);
    assert_eq!(store.import_audit(&events).await.unwrap(), 0);
    assert_eq!(store.import_audit(&events[1..2]).await.unwrap(), 0);
    assert_eq!(store.import_audit(&[]).await.unwrap(), 0);
    let after = store.audit(None).await.unwrap();
    assert_eq!(after.len(), before.len() + 4);
    assert_eq!(without_seq(&after[before.len()..]), without_seq(&events));
    assert!(after.windows(2).all(|w| w[0].seq < w[1].seq));
    assert_eq!(store.audit(Some("old")).await.unwrap().len(), 4);
    // One more identical event than the log holds: that one is appended.
    let mut three = events[1..3].to_vec();
    three.push(events[1].clone());
    assert_eq!(store.import_audit(&three).await.unwrap(), 1);
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL only

#[tokio::test]
async fn postgres_concurrent_opens_migrate_once() {
    let Some(db) = PgDb::fresh().await else {
        return;
    };
    let url = db.url();
    let opens = (0..6).map(|_| {
        let url = url.clone();
        tokio::spawn(async move { PostgresStore::open(&url).await })
    });
    let mut stores = Vec::new();
    for open in opens {
        stores.push(open.await.unwrap().unwrap());
    }
    let client = db.client().await;
    let versions: Vec<i32> = client
        .query("SELECT version FROM keygate_schema ORDER BY version", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(versions, [1]);
    // Opening again changes nothing; a newer schema is refused.
    drop(PostgresStore::open(&url).await.unwrap());
    client
        .execute(
            "INSERT INTO keygate_schema (version, applied_at) VALUES (99, 0)",
            &[],
        )
        .await
        .unwrap();
    let newer = PostgresStore::open(&url).await;
    assert!(
        matches!(&newer, Err(StoreError::Unavailable(m)) if m.contains("99")),
        "{:?}",
        newer.err()
    );
}

#[tokio::test]
async fn postgres_recovers_from_terminated_connections() {
    let Some(db) = PgDb::fresh().await else {
        return;
    };
    let (a, b) = (db.open().await, db.open().await);
    create(&*a, "demo", "k0").await;
    let (_, cursor) = a.load_all().await.unwrap();
    let (_, mut cursor) = settle(&*a, cursor).await;
    for round in 0..3 {
        let killed = db.terminate_connections().await;
        assert!(killed >= 2, "only {killed} connections terminated");
        // The next call on a dropped connection reconnects, reads and writes alike.
        assert!(a.get("demo", "k0").await.unwrap().is_some());
        create(&*a, "demo", &format!("a{round}")).await;
        create(&*b, "demo", &format!("b{round}")).await;
        // What the other store wrote reaches this one once its listener is back.
        let started = Instant::now();
        let id = format!("b{round}");
        let (seen, next) =
            feed_reports(&*a, cursor, &[("demo", &id)], Duration::from_secs(3)).await;
        assert!(
            seen.contains(&("demo".to_string(), id.clone())),
            "round {round}: {seen:?}"
        );
        eprintln!("round {round}: heard {id} after {:?}", started.elapsed());
        cursor = next;
    }
}

/// A TCP proxy in front of PostgreSQL that a test can cut (refusing connections) or make hang
/// (accepting connections and never answering).
struct Proxy {
    addr: SocketAddr,
    mode: Arc<AtomicU8>,
    conns: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    task: tokio::task::JoinHandle<()>,
}

const UP: u8 = 0;
const DOWN: u8 = 1;
const HANG: u8 = 2;

impl Proxy {
    async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mode = Arc::new(AtomicU8::new(UP));
        let conns: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let (m, c) = (mode.clone(), conns.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let handle = match m.load(Ordering::SeqCst) {
                    UP => tokio::spawn(async move {
                        if let Ok(mut outbound) = TcpStream::connect(target).await {
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    }),
                    HANG => tokio::spawn(async move {
                        let _held = inbound;
                        std::future::pending::<()>().await;
                    }),
                    _ => continue,
                };
                c.lock().unwrap().push(handle);
            }
        });
        Proxy {
            addr,
            mode,
            conns,
            task,
        }
    }

    /// Sets the mode; leaving UP cuts every connection through the proxy.
    fn set(&self, mode: u8) {
        self.mode.store(mode, Ordering::SeqCst);
        if mode != UP {
            for conn in self.conns.lock().unwrap().drain(..) {
                conn.abort();
            }
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        self.set(DOWN);
    }
}

#[tokio::test]
async fn postgres_outage_answers_unavailable_promptly_and_catches_up_after() {
    let Some(db) = PgDb::fresh().await else {
        return;
    };
    let proxy = Proxy::start(SocketAddr::from(([127, 0, 0, 1], pg_port()))).await;
    let through = PostgresStore::open(&db.url_via(proxy.addr)).await.unwrap();
    let direct = db.open().await;
    for id in ["doomed", "changed", "kept"] {
        create(&*direct, "demo", id).await;
    }
    let (_, cursor) = through.load_all().await.unwrap();
    let (_, cursor) = settle(&through, cursor).await;

    // Down: every call answers Unavailable at once.
    proxy.set(DOWN);
    for _ in 0..3 {
        let started = Instant::now();
        // (A key the feed did not just report: those it read ahead are served once from memory.)
        let got = through.get("demo", "nope").await;
        assert!(matches!(got, Err(StoreError::Unavailable(_))), "{got:?}");
        let write = through
            .create(new_key("demo", "nope", KeyKind::Standard).0, Actor::CLI)
            .await;
        assert!(
            matches!(write, Err(StoreError::Unavailable(_))),
            "{write:?}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
    }
    // Changes made meanwhile by another node: a delete, a create, an update.
    direct.delete("demo", "doomed", Actor::CLI).await.unwrap();
    create(&*direct, "demo", "new").await;
    direct
        .update(
            "demo",
            "changed",
            KeyUpdate {
                name: "changed meanwhile".into(),
                description: String::new(),
                scopes: vec![],
                expire: None,
                rate_limit: None,
            },
            Actor::CLI,
        )
        .await
        .unwrap();

    // Hanging: calls give up within the call timeout rather than wait forever.
    proxy.set(HANG);
    let started = Instant::now();
    let got = through.get("demo", "nope").await;
    assert!(matches!(got, Err(StoreError::Unavailable(_))), "{got:?}");
    let waited = started.elapsed();
    assert!(waited < Duration::from_secs(7), "{waited:?}");
    let started = Instant::now();
    let opened = PostgresStore::open(&db.url_via(proxy.addr)).await;
    assert!(matches!(opened, Err(StoreError::Unavailable(_))));
    assert!(started.elapsed() < Duration::from_secs(7));

    // Back up: the store serves again, and its feed reports what it missed.
    proxy.set(UP);
    let started = Instant::now();
    let expected = [("demo", "doomed"), ("demo", "new"), ("demo", "changed")];
    let (seen, _) = feed_reports(&through, cursor, &expected, Duration::from_secs(5)).await;
    assert!(seen.is_superset(&set(&expected)), "{seen:?}");
    eprintln!(
        "call timed out after {waited:?}; missed changes reported {:?} after recovery",
        started.elapsed()
    );
    assert_eq!(through.get("demo", "doomed").await.unwrap(), None);
    assert_eq!(
        through.get("demo", "changed").await.unwrap().unwrap().name,
        "changed meanwhile"
    );
    create(&through, "demo", "after").await;
}

// ---------------------------------------------------------------------------------------------
// Migration between stores

#[tokio::test]
async fn migrate_sqlite_to_postgres_and_back() {
    let Some(db) = PgDb::fresh().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let source = SqliteStore::open(&dir.path().join("source.db"))
        .await
        .unwrap();
    // A history: both kinds, updates, rotations with and without grace, usage, a deletion.
    for n in 0..20 {
        let kind = if n % 4 == 3 {
            KeyKind::Dev
        } else {
            KeyKind::Standard
        };
        let project = if n % 5 == 0 { "other" } else { "demo" };
        let (mut key, _) = new_key(project, &format!("k{n}"), kind);
        if n % 3 == 0 {
            key.rate_limit = Some(KeyRateLimit {
                limit: n + 1,
                window_secs: 60,
            });
            key.expire = Some(Utc::now() + chrono::Duration::days(i64::from(n)));
        }
        source.create(key, Actor::CLI).await.unwrap();
    }
    source
        .rotate(
            "demo",
            "k1",
            Rotation {
                digest: Secret::generate().digest(),
                grace_until: Some(Utc::now() + chrono::Duration::hours(1)),
            },
            Actor("admin"),
        )
        .await
        .unwrap();
    source
        .rotate(
            "demo",
            "k2",
            Rotation {
                digest: Secret::generate().digest(),
                grace_until: None,
            },
            Actor("admin"),
        )
        .await
        .unwrap();
    source
        .update(
            "demo",
            "k4",
            KeyUpdate {
                name: "renamed".into(),
                description: "described".into(),
                scopes: vec!["a".into(), "b".into()],
                expire: None,
                rate_limit: None,
            },
            Actor("admin"),
        )
        .await
        .unwrap();
    source.delete("demo", "k6", Actor::CLI).await.unwrap();
    source
        .record_usage(&[Usage {
            project: "demo".into(),
            id: "k1".into(),
            accessed_at: Some(Utc::now()),
            sdks: vec!["python".into(), "web".into()],
        }])
        .await
        .unwrap();

    let pg = db.open().await;
    let started = Instant::now();
    let report = store_migrate::migrate(&source, &*pg).await.unwrap();
    eprintln!("SQLite → PostgreSQL: {report:?} in {:?}", started.elapsed());
    let source_audit = source.audit(None).await.unwrap();
    assert_eq!(report.keys_copied, 19);
    assert_eq!(report.keys_skipped, 0);
    assert_eq!(report.audit_copied, source_audit.len());
    assert_eq!(report.audit_skipped, 0);
    let again = store_migrate::migrate(&source, &*pg).await.unwrap();
    assert_eq!(
        again,
        store_migrate::MigrateReport {
            keys_copied: 0,
            keys_skipped: 19,
            audit_copied: 0,
            audit_skipped: source_audit.len(),
        }
    );

    let back = SqliteStore::open(&dir.path().join("back.db"))
        .await
        .unwrap();
    let report = store_migrate::migrate(&*pg, &back).await.unwrap();
    let pg_audit = pg.audit(None).await.unwrap();
    assert_eq!(report.keys_copied, 19);
    assert_eq!(report.audit_copied, pg_audit.len());
    let again = store_migrate::migrate(&*pg, &back).await.unwrap();
    assert_eq!((again.keys_copied, again.audit_copied), (0, 0));

    // Keys: the same in all three, field for field (digests, previous secrets, usage, times).
    let sorted = |mut records: Vec<KeyRecord>| {
        records.sort_by(|a, b| (&a.project, &a.id).cmp(&(&b.project, &b.id)));
        records
    };
    let original = sorted(source.load_all().await.unwrap().0);
    assert_eq!(original.len(), 19);
    assert!(original.iter().any(|r| r.previous.is_some()));
    assert!(original.iter().any(|r| !r.sdks.is_empty()));
    assert!(original.iter().any(|r| r.kind == KeyKind::Dev));
    assert_eq!(sorted(pg.load_all().await.unwrap().0), original);
    assert_eq!(sorted(back.load_all().await.unwrap().0), original);
    for kind in [KeyKind::Standard, KeyKind::Dev] {
        for project in ["demo", "other"] {
            assert_eq!(
                back.list(project, kind).await.unwrap(),
                source.list(project, kind).await.unwrap()
            );
        }
    }

    // Audit: the source's history, in order, then one `migrate` row per key copied.
    let back_audit = back.audit(None).await.unwrap();
    assert_eq!(
        without_seq(&pg_audit[..source_audit.len()]),
        without_seq(&source_audit)
    );
    assert_eq!(
        without_seq(&back_audit[..pg_audit.len()]),
        without_seq(&pg_audit)
    );
    let imports = |events: &[AuditEvent]| {
        events
            .iter()
            .filter(|e| e.actor == "migrate" && e.action == "import")
            .count()
    };
    assert_eq!(imports(&pg_audit), 19);
    assert_eq!(imports(&back_audit), 38);
    assert_eq!(back_audit.len(), source_audit.len() + 38);
}

/// Three stores on one database, each with a consumer that does what the gateway's sync does
/// (read the feed, then `get` every changed key); 1000 creates spread over the three stores, 16
/// at a time: every consumer has read every key within a second of the last write.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_feed_keeps_up_with_a_thousand_writes_from_three_stores() {
    let Some(db) = PgDb::fresh().await else {
        return;
    };
    let stores: Vec<Arc<dyn KeyStore>> = vec![db.open().await, db.open().await, db.open().await];
    let seen: Vec<Arc<Mutex<HashSet<String>>>> = (0..3).map(|_| Arc::default()).collect();
    let mut consumers = Vec::new();
    for (store, seen) in stores.iter().zip(&seen) {
        let (store, seen) = (store.clone(), seen.clone());
        consumers.push(tokio::spawn(async move {
            let (_, mut cursor) = store.load_all().await.unwrap();
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let Ok((changes, next)) = store.changes_since(cursor).await else {
                    continue;
                };
                let mut read = Vec::new();
                for change in &changes {
                    match store.get(&change.project, &change.id).await {
                        Ok(Some(record)) => read.push(record.id),
                        Ok(None) => panic!("{} reported but absent", change.id),
                        Err(_) => break,
                    }
                }
                if read.len() == changes.len() {
                    seen.lock().unwrap().extend(read);
                    cursor = next;
                }
            }
        }));
    }
    let permits = Arc::new(tokio::sync::Semaphore::new(16));
    let mut writes = Vec::new();
    let started = Instant::now();
    for n in 0..1000usize {
        let (store, permits) = (stores[n % 3].clone(), permits.clone());
        writes.push(tokio::spawn(async move {
            let _permit = permits.acquire().await.unwrap();
            let key = new_key("demo", &format!("bulk{n}"), KeyKind::Standard).0;
            store.create(key, Actor::CLI).await.unwrap();
        }));
    }
    for write in writes {
        write.await.unwrap();
    }
    let written = Instant::now();
    let all_seen = || seen.iter().all(|s| s.lock().unwrap().len() == 1000);
    while !all_seen() && written.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let lag = written.elapsed();
    for consumer in consumers {
        consumer.abort();
    }
    for (n, seen) in seen.iter().enumerate() {
        assert_eq!(seen.lock().unwrap().len(), 1000, "consumer {n}");
    }
    eprintln!(
        "1000 creates through 3 stores in {:?}; every consumer had read all {lag:?} after the last",
        written - started
    );
    assert!(lag < Duration::from_secs(1), "consumers lagged {lag:?}");
}

//! A PostgreSQL database per test: created fresh, dropped (connections and all) afterwards.
//!
//! PostgreSQL is expected on 127.0.0.1:5432 (`KEYGATE_TEST_PG_PORT` to change the port) with
//! trust authentication for `postgres` or `root`. Without it, [`PgDb::fresh`] says so and
//! returns `None` — unless `KEYGATE_REQUIRE_SERVICES=1`, which makes it a failure.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use keygate::keys::store::{KeyStore, PostgresStore};

pub fn pg_port() -> u16 {
    std::env::var("KEYGATE_TEST_PG_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(5432)
}

/// A database created for one test, dropped (connections and all) when this is dropped.
pub struct PgDb {
    admin_url: String,
    user: String,
    name: String,
}

impl PgDb {
    /// A fresh database, or None (after printing why) when PostgreSQL is not reachable.
    pub async fn fresh() -> Option<PgDb> {
        let port = pg_port();
        for user in ["postgres", "root"] {
            let admin_url = format!("postgres://{user}@127.0.0.1:{port}/postgres");
            let Ok(admin) = pg_client(&admin_url).await else {
                continue;
            };
            let name = format!("keygate_t_{}", keygate::keys::unique_id());
            admin
                .batch_execute(&format!("CREATE DATABASE \"{name}\""))
                .await
                .unwrap();
            return Some(PgDb {
                admin_url,
                user: user.to_owned(),
                name,
            });
        }
        if std::env::var("KEYGATE_REQUIRE_SERVICES").as_deref() == Ok("1") {
            panic!("PostgreSQL not reachable on 127.0.0.1:{port} and KEYGATE_REQUIRE_SERVICES=1");
        }
        eprintln!("SKIPPED: PostgreSQL not reachable on 127.0.0.1:{port}");
        None
    }

    pub fn url(&self) -> String {
        self.url_via(SocketAddr::from(([127, 0, 0, 1], pg_port())))
    }

    pub fn url_via(&self, addr: SocketAddr) -> String {
        format!("postgres://{}@{addr}/{}", self.user, self.name)
    }

    pub async fn open(&self) -> Arc<dyn KeyStore> {
        Arc::new(PostgresStore::open(&self.url()).await.unwrap())
    }

    /// A connection to the test database itself, for what a test does behind the store's back.
    pub async fn client(&self) -> tokio_postgres::Client {
        pg_client(&self.url()).await.unwrap()
    }

    /// Drops every connection other processes hold to this database.
    pub async fn terminate_connections(&self) -> u64 {
        let admin = pg_client(&self.admin_url).await.unwrap();
        let rows = admin
            .query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                 WHERE datname = $1 AND pid <> pg_backend_pid()",
                &[&self.name],
            )
            .await
            .unwrap();
        rows.len() as u64
    }
}

impl Drop for PgDb {
    fn drop(&mut self) {
        let (url, name) = (self.admin_url.clone(), self.name.clone());
        // Drop may run inside a runtime (or while panicking): use a thread with its own.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                // After a restart the server may need a moment before it accepts connections.
                for _ in 0..50 {
                    if let Ok(admin) = pg_client(&url).await {
                        let _ = admin
                            .batch_execute(&format!(
                                "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
                            ))
                            .await;
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            });
        })
        .join();
    }
}

pub async fn pg_client(url: &str) -> Result<tokio_postgres::Client, String> {
    let connecting = tokio_postgres::connect(url, tokio_postgres::NoTls);
    match tokio::time::timeout(Duration::from_secs(3), connecting).await {
        Ok(Ok((client, connection))) => {
            tokio::spawn(connection);
            Ok(client)
        }
        Ok(Err(err)) => Err(err.to_string()),
        Err(_) => Err(format!("no answer from {url}")),
    }
}

//! Throwaway databases for tests: a fresh, migrated [`Store`] per test, removed afterwards.
//!
//! - [`TestDb::postgres`] creates `broker_test_<random>` on the server at `BROKER_TEST_PG_URL`
//!   (default `postgres://postgres@127.0.0.1:5432/postgres`) and drops it `WITH (FORCE)` on
//!   [`TestDb::cleanup`] or, best effort, on drop.
//! - [`TestDb::sqlite`] puts a database file in a fresh temporary directory.
//!
//! Test-only code: failing loudly (panicking) with a clear message is the point here.
#![allow(clippy::panic, clippy::expect_used)]

use super::Store;
use sqlx::postgres::PgPoolOptions;
use std::path::PathBuf;

/// Environment variable naming the Postgres server (an admin database URL) for tests.
pub const PG_URL_ENV: &str = "BROKER_TEST_PG_URL";
/// Used when [`PG_URL_ENV`] is unset.
pub const DEFAULT_PG_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// A fresh database and a migrated store on it.
pub struct TestDb {
    url: String,
    store: Store,
    /// Postgres: the database to drop, and where to connect to drop it.
    pg: Option<PgTarget>,
    /// SQLite: the temporary directory to remove.
    dir: Option<PathBuf>,
}

struct PgTarget {
    admin_url: String,
    name: String,
}

impl std::fmt::Debug for TestDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may carry a password: show only the backend.
        f.debug_struct("TestDb")
            .field("backend", &self.store.backend())
            .finish_non_exhaustive()
    }
}

fn random_suffix() -> String {
    format!("{:016x}", rand::random::<u64>())
}

impl TestDb {
    /// A fresh database on the test Postgres server. Panics with a clear message when no server
    /// answers.
    pub async fn postgres() -> TestDb {
        let (admin_url, from_env) = match std::env::var(PG_URL_ENV) {
            Ok(u) if !u.trim().is_empty() => (u, true),
            _ => (DEFAULT_PG_URL.to_owned(), false),
        };
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(std::time::Duration::from_secs(10))
            .connect(&admin_url)
            .await
            .unwrap_or_else(|e| {
                if from_env {
                    panic!(
                        "Postgres tests: cannot connect to the server named by {PG_URL_ENV}: {e}"
                    )
                } else {
                    panic!(
                        "Postgres tests need a server: set {PG_URL_ENV} to an admin database URL \
                         or run one at {DEFAULT_PG_URL} ({e})"
                    )
                }
            });
        // Only [0-9a-f_] in the name, so quoting it into the statement is safe.
        let name = format!("broker_test_{}", random_suffix());
        sqlx::raw_sql(&format!("CREATE DATABASE \"{name}\""))
            .execute(&admin)
            .await
            .unwrap_or_else(|e| panic!("Postgres tests: cannot create database {name}: {e}"));
        admin.close().await;

        let mut url = url::Url::parse(&admin_url)
            .unwrap_or_else(|_| panic!("Postgres tests: {PG_URL_ENV} is not a valid URL"));
        url.set_path(&format!("/{name}"));
        let url = url.to_string();
        let pg = PgTarget { admin_url, name };
        let store = match Store::connect(&url).await {
            Ok(s) => s,
            Err(e) => {
                drop_database_blocking(pg);
                panic!("Postgres tests: cannot connect to the new test database: {e}")
            }
        };
        let db = TestDb {
            url,
            store,
            pg: Some(pg),
            dir: None,
        };
        if let Err(e) = db.store.migrate().await {
            panic!("Postgres tests: migration failed: {e}");
        }
        db
    }

    /// A fresh SQLite database file in a new temporary directory.
    pub async fn sqlite() -> TestDb {
        let dir = std::env::temp_dir().join(format!("broker-test-{}", random_suffix()));
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("SQLite tests: cannot create {}: {e}", dir.display()));
        let url = format!("sqlite:{}", dir.join("broker.db").display());
        let store = Store::connect(&url)
            .await
            .unwrap_or_else(|e| panic!("SQLite tests: cannot open the test database: {e}"));
        let db = TestDb {
            url,
            store,
            pg: None,
            dir: Some(dir),
        };
        if let Err(e) = db.store.migrate().await {
            panic!("SQLite tests: migration failed: {e}");
        }
        db
    }

    /// URL of the test database (for a second `Store::connect`, or the broker binary).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// A handle on the (migrated) test database.
    pub fn store(&self) -> Store {
        self.store.clone()
    }

    /// Close the store and remove the database now.
    pub async fn cleanup(mut self) {
        self.store.close().await;
        if let Some(pg) = self.pg.take() {
            drop_database(&pg).await;
        }
        if let Some(dir) = self.dir.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some(pg) = self.pg.take() {
            drop_database_blocking(pg);
        }
        if let Some(dir) = self.dir.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Drop the database from a separate thread with its own runtime: `Drop` cannot await, and
/// blocking on the test's own runtime from inside it could deadlock.
fn drop_database_blocking(pg: PgTarget) {
    let worker = std::thread::spawn(move || {
        if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            rt.block_on(drop_database(&pg));
        }
    });
    let _ = worker.join();
}

/// Best effort: `WITH (FORCE)` ends connections still open (e.g. store clones a test kept).
async fn drop_database(pg: &PgTarget) {
    let Ok(admin) = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(std::time::Duration::from_secs(5))
        .connect(&pg.admin_url)
        .await
    else {
        return;
    };
    let name = &pg.name;
    let _ = sqlx::raw_sql(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
        .execute(&admin)
        .await;
    admin.close().await;
}

//! Raw SQL against a test broker's own store, on either backend, for assertions on the rows
//! themselves (counts the API does not expose).
// Test harness: a query that fails fails the calling test loudly, naming the query.
#![allow(clippy::expect_used, clippy::panic)]

use broker::audit::AuditEvent;
use broker::store::AuditFilter;
use broker::store::testdb::TestDb;
use sqlx::{PgPool, SqlitePool};

/// The first `limit` events of a test store's audit log, oldest first.
pub async fn audit_log(db: &TestDb, limit: u32) -> Vec<AuditEvent> {
    db.store()
        .audit_events(&AuditFilter {
            limit,
            ..AuditFilter::default()
        })
        .await
        .expect("audit events")
}

/// A pool on a store URL (`sqlite:` or Postgres).
pub enum StoreDb {
    Pg(PgPool),
    Lite(SqlitePool),
}

impl StoreDb {
    pub async fn connect(url: &str) -> StoreDb {
        if url.starts_with("sqlite:") {
            StoreDb::Lite(SqlitePool::connect(url).await.expect("sqlite connects"))
        } else {
            StoreDb::Pg(PgPool::connect(url).await.expect("postgres connects"))
        }
    }

    /// One `count(*)`-style number (the same SQL on both backends).
    pub async fn number(&self, sql: &str) -> i64 {
        self.number_with(sql, &[]).await
    }

    /// [`Self::number`] with text parameters `$1`, `$2`, ….
    pub async fn number_with(&self, sql: &str, args: &[&str]) -> i64 {
        match self {
            StoreDb::Pg(p) => {
                let mut q = sqlx::query_scalar(sql);
                for a in args {
                    q = q.bind(*a);
                }
                q.fetch_one(p).await
            }
            StoreDb::Lite(p) => {
                let mut q = sqlx::query_scalar(sql);
                for a in args {
                    q = q.bind(*a);
                }
                q.fetch_one(p).await
            }
        }
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    pub async fn close(&self) {
        match self {
            StoreDb::Pg(p) => p.close().await,
            StoreDb::Lite(p) => p.close().await,
        }
    }
}

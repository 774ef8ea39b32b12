//! What only SQLite does: the pool (WAL, foreign keys, busy timeout; one connection kept for an
//! in-memory database), its migrations, and the row-at-a-time writes of new grants and
//! activations (Postgres batches those in its group writer, `postgres.rs`). Every other query is
//! shared (`grants.rs`, `audit_log.rs`, `records.rs`); the encodings (times as INTEGER unix
//! milliseconds, uuids as TEXT, JSON as TEXT) are applied in `db.rs`.
//!
//! Concurrency: every write transaction starts with `BEGIN IMMEDIATE` (`db::Backend::begin`),
//! taking SQLite's single write lock up front, so writers are serialised, and each state change
//! is still an `UPDATE ... WHERE status = <expected>`, so a transition happens at most once.

use super::audit_log::append;
use super::codec::{ACQUIRE_TIMEOUT, migrate_err};
use super::db::{Backend, Conn, Sql};
use super::grants::transition;
use super::records::claim_jti;
use super::{JtiRecord, NewGrant, StoreError};
use crate::audit::AuditEvent;
use sqlx::SqlitePool;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use std::str::FromStr;
use time::OffsetDateTime;
use uuid::Uuid;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/sqlite");

/// How long a statement waits for another connection's write lock before failing as busy.
const BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
const MAX_CONNECTIONS: u32 = 8;

pub(super) async fn connect(url: &str) -> Result<SqlitePool, StoreError> {
    let options = SqliteConnectOptions::from_str(url)
        .map_err(|_| StoreError::BadUrl("unparseable sqlite url".to_owned()))?
        .create_if_missing(true)
        .foreign_keys(true)
        // WAL: readers never block the writer. An in-memory database ignores it.
        .journal_mode(SqliteJournalMode::Wal)
        // NORMAL is durable across application crashes in WAL mode; only an OS crash can lose
        // the last commits, which the reaper's recovery tolerates.
        .synchronous(SqliteSynchronous::Normal)
        .busy_timeout(BUSY_TIMEOUT);
    let in_memory = url.contains(":memory:") || url.contains("mode=memory");
    let pool_options = SqlitePoolOptions::new().acquire_timeout(ACQUIRE_TIMEOUT);
    // An in-memory database lives only as long as a connection to it: keep exactly one forever.
    let pool_options = if in_memory {
        pool_options
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
    } else {
        pool_options.max_connections(MAX_CONNECTIONS)
    };
    Ok(pool_options.connect_with(options).await?)
}

pub(super) async fn migrate(pool: &SqlitePool) -> Result<(), StoreError> {
    MIGRATOR.run(pool).await.map_err(migrate_err)
}

/// One transaction: the jti (if given) and the grant with its credentials, in `status`
/// (`issuing` for an intent; `active`, with its audit event, for credentials minted in memory).
pub(super) async fn insert_grant(
    db: &Backend,
    grant: &NewGrant,
    jti: Option<&JtiRecord>,
    audit: Option<&AuditEvent>,
) -> Result<(), StoreError> {
    let status = if audit.is_some() { "active" } else { "issuing" };
    let mut tx = db.begin().await?;
    let mut conn = tx.conn();
    if let Some(j) = jti
        && !claim_jti(&mut conn, j, grant.created_at).await?
    {
        return Err(StoreError::Replayed);
    }
    conn.execute(
        &Sql::new(
            "INSERT INTO grants (id, status, issuer, subject, repository, repository_id, job,
                                 bundle_digest, revocation_hash, created_at, expires_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        )
        .bind(grant.id)
        .bind(status)
        .bind(&grant.issuer)
        .bind(&grant.subject)
        .bind(&grant.repository)
        .bind(&grant.repository_id)
        .bind(&grant.job)
        .bind(&grant.bundle_digest)
        .bind(&grant.revocation_hash)
        .bind(grant.created_at)
        .bind(grant.expires_at),
    )
    .await?;
    for (position, c) in grant.credentials.iter().enumerate() {
        conn.execute(
            &Sql::new(
                "INSERT INTO grant_credentials (grant_id, position, name, kind, resource_id,
                                                details)
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(grant.id)
            .bind(position_i64(position)?)
            .bind(&c.name)
            .bind(c.kind.as_str())
            .bind(&c.resource_id)
            .bind(&c.details),
        )
        .await?;
    }
    if let Some(a) = audit {
        append(&mut conn, &[a]).await?;
    }
    tx.commit().await
}

/// One transaction: `issuing` → `active` with the final expiry and details, and the audit event.
pub(super) async fn activate_grant(
    db: &Backend,
    id: Uuid,
    expires_at: OffsetDateTime,
    details: &[serde_json::Value],
    audit: &AuditEvent,
) -> Result<(), StoreError> {
    let mut tx = db.begin().await?;
    let mut conn = tx.conn();
    let sql = Sql::new(
        "UPDATE grants SET status = 'active', expires_at = $2 WHERE id = $1 AND status = 'issuing'",
    );
    transition(&mut conn, sql.bind(id).bind(expires_at), "issuing").await?;
    let count: i64 = conn
        .fetch_one(
            &Sql::new("SELECT count(*) AS n FROM grant_credentials WHERE grant_id = $1").bind(id),
        )
        .await?
        .get("n")?;
    if usize::try_from(count).ok() != Some(details.len()) {
        return Err(StoreError::Conflict(
            "credential details do not match the grant".to_owned(),
        ));
    }
    for (position, d) in details.iter().enumerate() {
        set_details(&mut conn, id, position, d).await?;
    }
    append(&mut conn, &[audit]).await?;
    tx.commit().await
}

async fn set_details(
    conn: &mut Conn<'_>,
    id: Uuid,
    position: usize,
    details: &serde_json::Value,
) -> Result<(), StoreError> {
    conn.execute(
        &Sql::new(
            "UPDATE grant_credentials SET details = $3 WHERE grant_id = $1 AND position = $2",
        )
        .bind(id)
        .bind(position_i64(position)?)
        .bind(details),
    )
    .await?;
    Ok(())
}

fn position_i64(position: usize) -> Result<i64, StoreError> {
    i64::try_from(position).map_err(|_| StoreError::Conflict("too many credentials".to_owned()))
}

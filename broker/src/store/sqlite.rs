//! The SQLite backend (embedded default, single process).
//!
//! Encodings (see `migrations/sqlite`): times are INTEGER unix milliseconds, uuids TEXT in
//! hyphenated lowercase form, JSON TEXT. Times therefore round-trip with millisecond precision.
//!
//! Concurrency: every write transaction starts with `BEGIN IMMEDIATE`, taking SQLite's single
//! write lock up front (a deferred transaction that reads and then writes can fail with
//! SQLITE_BUSY instead of waiting). Writers are thus serialised, and each state change is still
//! an `UPDATE ... WHERE status = <expected>` so a transition happens at most once.

use super::chain::{self, ChainHead, ChainRow};
use super::codec::{
    ACQUIRE_TIMEOUT, corrupt, enum_text, migrate_err, parse_cause, parse_kind, parse_status,
};
use super::{
    AuditFilter, AuditRecord, ChainAnchor, Checkpoint, CheckpointKind, ClaimedGrant,
    CredentialStatus, FreezeRecord, Grant, GrantCursor, GrantSelect, GrantStatus, JobMatch,
    JtiRecord, NewGrant, RevokeCause, StoreError, StoreGauges, StoreStats,
};
use crate::audit::AuditEvent;
use crate::providers::{CredentialKind, IssuedCredential};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{Row, SqlitePool};
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

pub(super) async fn ping(pool: &SqlitePool) -> Result<(), StoreError> {
    sqlx::query("SELECT 1").execute(pool).await?;
    Ok(())
}

pub(super) async fn begin_grant(
    pool: &SqlitePool,
    grant: &NewGrant,
    jti: Option<&JtiRecord>,
) -> Result<(), StoreError> {
    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
    insert_grant(&mut tx, grant, jti, "issuing").await?;
    tx.commit().await?;
    Ok(())
}

/// One transaction: the grant, its jti and credentials, already `active`, with its audit event.
pub(super) async fn issue_grant(
    pool: &SqlitePool,
    grant: &NewGrant,
    jti: Option<&JtiRecord>,
    audit: &AuditEvent,
) -> Result<(), StoreError> {
    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
    insert_grant(&mut tx, grant, jti, "active").await?;
    insert_audit(&mut tx, audit).await?;
    tx.commit().await?;
    Ok(())
}

/// Record `jti` (if given) and insert the grant with its credentials in `status`, inside the
/// caller's transaction.
async fn insert_grant(
    tx: &mut SqliteConnection,
    grant: &NewGrant,
    jti: Option<&JtiRecord>,
    status: &str,
) -> Result<(), StoreError> {
    if let Some(j) = jti {
        // Insert, or take over a record whose window has passed; a live record makes the upsert
        // return nothing.
        let won = sqlx::query(
            "INSERT INTO used_jti (iss, jti, expires_at) VALUES ($1, $2, $3)
             ON CONFLICT (iss, jti) DO UPDATE SET expires_at = excluded.expires_at
             WHERE used_jti.expires_at <= $4
             RETURNING 1",
        )
        .bind(&j.iss)
        .bind(&j.jti)
        .bind(ms(j.expires_at))
        .bind(ms(grant.created_at))
        .fetch_optional(&mut *tx)
        .await?;
        if won.is_none() {
            return Err(StoreError::Replayed);
        }
    }
    sqlx::query(
        "INSERT INTO grants (id, status, issuer, subject, repository, repository_id, job,
                             bundle_digest, revocation_hash, created_at, expires_at)
         VALUES ($1, $11, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
    )
    .bind(grant.id.to_string())
    .bind(&grant.issuer)
    .bind(&grant.subject)
    .bind(&grant.repository)
    .bind(&grant.repository_id)
    .bind(json_text(&grant.job)?)
    .bind(&grant.bundle_digest)
    .bind(&grant.revocation_hash)
    .bind(ms(grant.created_at))
    .bind(ms(grant.expires_at))
    .bind(status)
    .execute(&mut *tx)
    .await?;
    for (position, c) in grant.credentials.iter().enumerate() {
        sqlx::query(
            "INSERT INTO grant_credentials (grant_id, position, name, kind, resource_id, details)
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(grant.id.to_string())
        .bind(position_i64(position)?)
        .bind(&c.name)
        .bind(c.kind.as_str())
        .bind(&c.resource_id)
        .bind(json_text(&c.details)?)
        .execute(&mut *tx)
        .await?;
    }
    Ok(())
}

pub(super) async fn activate_grant(
    pool: &SqlitePool,
    id: Uuid,
    expires_at: OffsetDateTime,
    details: &[serde_json::Value],
    audit: &AuditEvent,
) -> Result<(), StoreError> {
    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
    let moved = sqlx::query(
        "UPDATE grants SET status = 'active', expires_at = $2 WHERE id = $1 AND status = 'issuing'",
    )
    .bind(id.to_string())
    .bind(ms(expires_at))
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if moved != 1 {
        return Err(StoreError::Conflict("grant is not issuing".to_owned()));
    }
    let count: i64 =
        sqlx::query_scalar("SELECT count(*) FROM grant_credentials WHERE grant_id = $1")
            .bind(id.to_string())
            .fetch_one(&mut *tx)
            .await?;
    if usize::try_from(count).ok() != Some(details.len()) {
        return Err(StoreError::Conflict(
            "credential details do not match the grant".to_owned(),
        ));
    }
    for (position, d) in details.iter().enumerate() {
        sqlx::query(
            "UPDATE grant_credentials SET details = $3 WHERE grant_id = $1 AND position = $2",
        )
        .bind(id.to_string())
        .bind(position_i64(position)?)
        .bind(json_text(d)?)
        .execute(&mut *tx)
        .await?;
    }
    insert_audit(&mut tx, audit).await?;
    tx.commit().await?;
    Ok(())
}

pub(super) async fn fail_grant(
    pool: &SqlitePool,
    id: Uuid,
    release_jti: Option<&JtiRecord>,
    audit: &AuditEvent,
) -> Result<(), StoreError> {
    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
    // revoked_at records when the grant stopped being live, as for the other final states.
    let moved = sqlx::query(
        "UPDATE grants SET status = 'failed', revoked_at = $2 WHERE id = $1 AND status = 'issuing'",
    )
    .bind(id.to_string())
    .bind(ms(audit.time))
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if moved != 1 {
        return Err(StoreError::Conflict("grant is not issuing".to_owned()));
    }
    if let Some(j) = release_jti {
        sqlx::query("DELETE FROM used_jti WHERE iss = $1 AND jti = $2")
            .bind(&j.iss)
            .bind(&j.jti)
            .execute(&mut *tx)
            .await?;
    }
    insert_audit(&mut tx, audit).await?;
    tx.commit().await?;
    Ok(())
}

pub(super) async fn append_audit(pool: &SqlitePool, audit: &AuditEvent) -> Result<(), StoreError> {
    // Reading the head and appending must not interleave with another writer.
    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
    insert_audit(&mut tx, audit).await?;
    tx.commit().await?;
    Ok(())
}

/// Append one event to the chain, inside the caller's (immediate) transaction: SQLite's single
/// write lock keeps `seq` order equal to chain order.
async fn insert_audit(conn: &mut SqliteConnection, audit: &AuditEvent) -> Result<(), StoreError> {
    let prev: String = sqlx::query_scalar("SELECT hash FROM audit_chain_head WHERE id = 1")
        .fetch_one(&mut *conn)
        .await?;
    let hash = chain::event_hash(&prev, audit)?;
    let seq: i64 = sqlx::query_scalar(
        "INSERT INTO audit_events (id, time, action, outcome, reason, grant_id, request_id,
                                   repository, repository_id, actor, event, prev_hash, hash)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
         RETURNING seq",
    )
    .bind(audit.id.to_string())
    .bind(ms(audit.time))
    .bind(enum_text(&audit.action)?)
    .bind(enum_text(&audit.outcome)?)
    .bind(&audit.reason)
    .bind(audit.grant_id.map(|g| g.to_string()))
    .bind(&audit.request_id)
    .bind(&audit.job.repository)
    .bind(&audit.job.repository_id)
    .bind(&audit.actor)
    .bind(json_text(audit)?)
    .bind(&prev)
    .bind(&hash)
    .fetch_one(&mut *conn)
    .await?;
    sqlx::query("UPDATE audit_chain_head SET seq = $1, hash = $2 WHERE id = 1")
        .bind(seq)
        .bind(&hash)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

pub(super) async fn freeze_state(pool: &SqlitePool) -> Result<Option<FreezeRecord>, StoreError> {
    let row = sqlx::query("SELECT filter, reason, actor, since FROM broker_freeze WHERE id = 1")
        .fetch_optional(pool)
        .await?;
    row.map(|r| {
        Ok(FreezeRecord {
            filter: json_col(&r, "filter")?,
            reason: r.try_get("reason")?,
            actor: r.try_get("actor")?,
            since: time_col(&r, "since")?,
        })
    })
    .transpose()
}

pub(super) async fn set_freeze(
    pool: &SqlitePool,
    freeze: Option<&FreezeRecord>,
    audit: &AuditEvent,
) -> Result<bool, StoreError> {
    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
    let was = sqlx::query("DELETE FROM broker_freeze WHERE id = 1")
        .execute(&mut *tx)
        .await?
        .rows_affected()
        > 0;
    if let Some(f) = freeze {
        sqlx::query(
            "INSERT INTO broker_freeze (id, filter, reason, actor, since)
             VALUES (1, $1, $2, $3, $4)",
        )
        .bind(json_text(&f.filter)?)
        .bind(&f.reason)
        .bind(&f.actor)
        .bind(ms(f.since))
        .execute(&mut *tx)
        .await?;
    }
    insert_audit(&mut tx, audit).await?;
    tx.commit().await?;
    Ok(was)
}

pub(super) async fn chain_head(pool: &SqlitePool) -> Result<ChainHead, StoreError> {
    let row = sqlx::query("SELECT seq, hash, legacy_max_seq FROM audit_chain_head WHERE id = 1")
        .fetch_optional(pool)
        .await?
        .ok_or_else(|| corrupt("audit chain head"))?;
    Ok(ChainHead {
        seq: row.try_get("seq")?,
        hash: row.try_get("hash")?,
        legacy_max_seq: row.try_get("legacy_max_seq")?,
    })
}

pub(super) async fn chain_page(
    pool: &SqlitePool,
    after_seq: i64,
    limit: u32,
) -> Result<Vec<ChainRow>, StoreError> {
    let rows = sqlx::query(
        "SELECT seq, id, time, action, outcome, reason, grant_id, request_id, repository,
                repository_id, actor, event, prev_hash, hash
         FROM audit_events WHERE seq > $1 ORDER BY seq LIMIT $2",
    )
    .bind(after_seq)
    .bind(i64::from(limit))
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(ChainRow {
                seq: r.try_get("seq")?,
                id: r.try_get("id")?,
                time: time_col(r, "time")?,
                action: r.try_get("action")?,
                outcome: r.try_get("outcome")?,
                reason: r.try_get("reason")?,
                grant_id: r.try_get("grant_id")?,
                request_id: r.try_get("request_id")?,
                repository: r.try_get("repository")?,
                repository_id: r.try_get("repository_id")?,
                actor: r.try_get("actor")?,
                event: r.try_get("event")?,
                prev_hash: r.try_get("prev_hash")?,
                hash: r.try_get("hash")?,
            })
        })
        .collect()
}

fn checkpoint_from_row(r: &SqliteRow) -> Result<Checkpoint, StoreError> {
    let kind = match r.try_get::<String, _>("kind")?.as_str() {
        "export" => CheckpointKind::Export,
        "prune" => CheckpointKind::Prune,
        _ => return Err(corrupt("audit checkpoint kind")),
    };
    Ok(Checkpoint {
        kind,
        created_at: time_col(r, "created_at")?,
        seq: r.try_get("seq")?,
        hash: r.try_get("hash")?,
        event_count: u64::try_from(r.try_get::<i64, _>("event_count")?)
            .map_err(|_| corrupt("audit checkpoint count"))?,
        last_event_id: r
            .try_get::<Option<String>, _>("last_event_id")?
            .map(|s| Uuid::parse_str(&s).map_err(|_| corrupt("uuid")))
            .transpose()?,
        last_event_time: opt_time_col(r, "last_event_time")?,
    })
}

async fn last_prune(conn: &mut SqliteConnection) -> Result<Option<Checkpoint>, StoreError> {
    let row = sqlx::query(
        "SELECT kind, created_at, seq, hash, event_count, last_event_id, last_event_time
         FROM audit_checkpoints WHERE kind = 'prune' ORDER BY seq DESC LIMIT 1",
    )
    .fetch_optional(&mut *conn)
    .await?;
    row.as_ref().map(checkpoint_from_row).transpose()
}

pub(super) async fn last_prune_checkpoint(
    pool: &SqlitePool,
) -> Result<Option<Checkpoint>, StoreError> {
    let mut conn = pool.acquire().await?;
    last_prune(&mut conn).await
}

pub(super) async fn checkpoint_recorded(
    pool: &SqlitePool,
    anchor: &ChainAnchor,
) -> Result<bool, StoreError> {
    let found: Option<i64> = sqlx::query_scalar(
        "SELECT 1 FROM audit_checkpoints WHERE seq = $1 AND hash = $2 AND event_count = $3 LIMIT 1",
    )
    .bind(anchor.seq)
    .bind(&anchor.hash)
    .bind(count_i64(anchor.count)?)
    .fetch_optional(pool)
    .await?;
    Ok(found.is_some())
}

fn count_i64(n: u64) -> Result<i64, StoreError> {
    i64::try_from(n).map_err(|_| StoreError::Conflict("event count out of range".to_owned()))
}

/// Chained events after the cut `base` up to and including `through`.
async fn count_chained(
    conn: &mut SqliteConnection,
    base: Option<&Checkpoint>,
    through: i64,
) -> Result<u64, StoreError> {
    let n: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM audit_events WHERE seq > $1 AND seq <= $2 AND hash IS NOT NULL",
    )
    .bind(base.map_or(0, |b| b.seq))
    .bind(through)
    .fetch_one(&mut *conn)
    .await?;
    Ok(base.map_or(0, |b| b.event_count) + u64::try_from(n).unwrap_or(0))
}

async fn insert_checkpoint(
    conn: &mut SqliteConnection,
    cp: &Checkpoint,
    pruned_before: Option<OffsetDateTime>,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO audit_checkpoints (kind, created_at, seq, hash, event_count, last_event_id,
                                        last_event_time, pruned_before)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(cp.kind.as_str())
    .bind(ms(cp.created_at))
    .bind(cp.seq)
    .bind(&cp.hash)
    .bind(count_i64(cp.event_count)?)
    .bind(cp.last_event_id.map(|u| u.to_string()))
    .bind(cp.last_event_time.map(ms))
    .bind(pruned_before.map(ms))
    .execute(&mut *conn)
    .await?;
    Ok(())
}

pub(super) async fn record_checkpoint(
    pool: &SqlitePool,
    now: OffsetDateTime,
) -> Result<Checkpoint, StoreError> {
    // The write lock keeps appenders out while counting, so count, seq and hash agree.
    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
    let row = sqlx::query("SELECT seq, hash FROM audit_chain_head WHERE id = 1")
        .fetch_optional(&mut *tx)
        .await?
        .ok_or_else(|| corrupt("audit chain head"))?;
    let (seq, hash): (i64, String) = (row.try_get("seq")?, row.try_get("hash")?);
    let base = last_prune(&mut tx).await?;
    let event_count = count_chained(&mut tx, base.as_ref(), seq).await?;
    let last = sqlx::query("SELECT id, time FROM audit_events WHERE seq = $1")
        .bind(seq)
        .fetch_optional(&mut *tx)
        .await?;
    let (last_event_id, last_event_time) = match (&last, &base) {
        (Some(r), _) => (Some(uuid_col(r, "id")?), Some(time_col(r, "time")?)),
        (None, Some(b)) if b.seq == seq => (b.last_event_id, b.last_event_time),
        (None, _) => (None, None),
    };
    let cp = Checkpoint {
        kind: CheckpointKind::Export,
        created_at: now,
        seq,
        hash,
        event_count,
        last_event_id,
        last_event_time,
    };
    insert_checkpoint(&mut tx, &cp, None).await?;
    tx.commit().await?;
    Ok(cp)
}

pub(super) async fn prune_target(
    pool: &SqlitePool,
    before: OffsetDateTime,
) -> Result<Option<i64>, StoreError> {
    // The last event of the longest prefix (in chain order) whose events are all older than
    // `before`.
    let target: Option<i64> = sqlx::query_scalar(
        "SELECT max(seq) FROM audit_events
         WHERE seq < COALESCE((SELECT min(seq) FROM audit_events WHERE time >= $1),
                              9223372036854775807)",
    )
    .bind(ms(before))
    .fetch_one(pool)
    .await?;
    Ok(target)
}

pub(super) async fn prune_batch(
    pool: &SqlitePool,
    target: i64,
    before: OffsetDateTime,
    now: OffsetDateTime,
    batch: u32,
) -> Result<Option<(Checkpoint, u64)>, StoreError> {
    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
    let base = last_prune(&mut tx).await?;
    let after = base.as_ref().map_or(0, |b| b.seq);
    let mut cut = sqlx::query(
        "SELECT seq, id, time, hash FROM audit_events
         WHERE seq > $1 AND seq <= $2 ORDER BY seq LIMIT 1 OFFSET $3",
    )
    .bind(after)
    .bind(target)
    .bind(i64::from(batch.saturating_sub(1)))
    .fetch_optional(&mut *tx)
    .await?;
    if cut.is_none() {
        cut = sqlx::query(
            "SELECT seq, id, time, hash FROM audit_events
             WHERE seq > $1 AND seq <= $2 ORDER BY seq DESC LIMIT 1",
        )
        .bind(after)
        .bind(target)
        .fetch_optional(&mut *tx)
        .await?;
    }
    let Some(cut) = cut else {
        return Ok(None);
    };
    let seq: i64 = cut.try_get("seq")?;
    // A legacy (unchained) event has no hash: the chain has not started yet at it.
    let hash = cut
        .try_get::<Option<String>, _>("hash")?
        .unwrap_or_else(|| chain::GENESIS.to_owned());
    let cp = Checkpoint {
        kind: CheckpointKind::Prune,
        created_at: now,
        seq,
        hash,
        event_count: count_chained(&mut tx, base.as_ref(), seq).await?,
        last_event_id: Some(uuid_col(&cut, "id")?),
        last_event_time: Some(time_col(&cut, "time")?),
    };
    insert_checkpoint(&mut tx, &cp, Some(before)).await?;
    // The trigger lets a DELETE through only while the guard is on and only up to the prune
    // checkpoint just written; it is off again before anyone else can see it.
    sqlx::query("UPDATE audit_prune_guard SET active = 1 WHERE id = 1")
        .execute(&mut *tx)
        .await?;
    let deleted = sqlx::query("DELETE FROM audit_events WHERE seq <= $1")
        .bind(seq)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    sqlx::query("UPDATE audit_prune_guard SET active = 0 WHERE id = 1")
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(Some((cp, deleted)))
}

pub(super) async fn checkpoints(
    pool: &SqlitePool,
    limit: u32,
) -> Result<Vec<Checkpoint>, StoreError> {
    let rows = sqlx::query(
        "SELECT kind, created_at, seq, hash, event_count, last_event_id, last_event_time
         FROM audit_checkpoints ORDER BY id LIMIT $1",
    )
    .bind(i64::from(limit))
    .fetch_all(pool)
    .await?;
    rows.iter().map(checkpoint_from_row).collect()
}

pub(super) async fn event_with_hash(
    pool: &SqlitePool,
    hash: &str,
) -> Result<Option<(i64, String)>, StoreError> {
    let row = sqlx::query("SELECT seq, id FROM audit_events WHERE hash = $1")
        .bind(hash)
        .fetch_optional(pool)
        .await?;
    row.map(|r| Ok((r.try_get("seq")?, r.try_get("id")?)))
        .transpose()
}

pub(super) async fn audit_records(
    pool: &SqlitePool,
    filter: &AuditFilter,
    limit: i64,
) -> Result<Vec<AuditRecord>, StoreError> {
    // Same shape as the Postgres query (see there); credential names are looked up in the event
    // JSON with json_each, the cursor with a row-value comparison on (time, seq).
    let rows = sqlx::query(
        "SELECT seq, event FROM audit_events
         WHERE ($1 IS NULL OR grant_id = $1)
           AND ($2 IS NULL OR request_id = $2)
           AND ($3 IS NULL OR repository = $3)
           AND ($4 IS NULL OR outcome = $4)
           AND ($5 IS NULL OR reason = $5)
           AND ($6 IS NULL OR time >= $6)
           AND ($7 IS NULL OR time < $7)
           AND ($8 IS NULL OR repository_id = $8)
           AND ($9 IS NULL OR actor = $9)
           AND ($10 IS NULL
                OR EXISTS (SELECT 1 FROM json_each(event, '$.credentials_requested') j
                           WHERE j.value = $10)
                OR EXISTS (SELECT 1 FROM json_each(event, '$.credentials_granted') j
                           WHERE j.value = $10))
           AND ($11 IS NULL OR grant_id IN
                (SELECT grant_id FROM grant_credentials WHERE kind = $11))
           AND ($12 IS NULL OR (time, seq) <
                (SELECT c.time, c.seq FROM audit_events c WHERE c.seq = $12))
         ORDER BY time DESC, seq DESC
         LIMIT $13",
    )
    .bind(filter.grant_id.map(|g| g.to_string()))
    .bind(&filter.request_id)
    .bind(&filter.repository)
    .bind(&filter.outcome)
    .bind(&filter.reason)
    .bind(filter.since.map(ms))
    .bind(filter.until.map(ms))
    .bind(&filter.repository_id)
    .bind(&filter.actor)
    .bind(&filter.credential)
    .bind(&filter.kind)
    .bind(filter.cursor)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|r| {
            let text: &str = r.try_get("event")?;
            let event = serde_json::from_str(text).map_err(|_| corrupt("audit event"))?;
            Ok(AuditRecord {
                seq: r.try_get("seq")?,
                event,
            })
        })
        .collect()
}

pub(super) async fn grant(pool: &SqlitePool, id: Uuid) -> Result<Option<Grant>, StoreError> {
    let mut conn = pool.acquire().await?;
    let row = sqlx::query("SELECT * FROM grants WHERE id = $1")
        .bind(id.to_string())
        .fetch_optional(&mut *conn)
        .await?;
    match row {
        Some(r) => Ok(Some(grant_with_credentials(&mut conn, &r).await?)),
        None => Ok(None),
    }
}

pub(super) async fn grant_by_revocation_hash(
    pool: &SqlitePool,
    hash: &str,
) -> Result<Option<Grant>, StoreError> {
    let mut conn = pool.acquire().await?;
    let row = sqlx::query("SELECT * FROM grants WHERE revocation_hash = $1")
        .bind(hash)
        .fetch_optional(&mut *conn)
        .await?;
    match row {
        Some(r) => Ok(Some(grant_with_credentials(&mut conn, &r).await?)),
        None => Ok(None),
    }
}

pub(super) async fn credential_status(
    pool: &SqlitePool,
    kind: CredentialKind,
    resource_id: &str,
) -> Result<Option<CredentialStatus>, StoreError> {
    let row = sqlx::query(
        "SELECT g.id, g.status, g.expires_at
         FROM grant_credentials c JOIN grants g ON g.id = c.grant_id
         WHERE c.kind = $1 AND c.resource_id = $2",
    )
    .bind(kind.as_str())
    .bind(resource_id)
    .fetch_optional(pool)
    .await?;
    row.map(|r| {
        Ok(CredentialStatus {
            grant_id: uuid_col(&r, "id")?,
            grant_status: parse_status(r.try_get("status")?)?,
            expires_at: time_col(&r, "expires_at")?,
        })
    })
    .transpose()
}

pub(super) async fn claim_for_revoke(
    pool: &SqlitePool,
    id: Uuid,
    now: OffsetDateTime,
    lease_until: OffsetDateTime,
) -> Result<Option<ClaimedGrant>, StoreError> {
    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
    // A revoking grant keeps the cause recorded when it was first claimed; `status` in SET is the
    // value before this update.
    let row = sqlx::query(
        "UPDATE grants
         SET revoke_cause = CASE WHEN status = 'revoking'
                                 THEN COALESCE(revoke_cause, 'requested')
                                 ELSE 'requested' END,
             status = 'revoking',
             lease_until = $3
         WHERE id = $1
           AND (status IN ('active', 'issuing')
                OR (status = 'revoking' AND (lease_until IS NULL OR lease_until <= $2)))
         RETURNING *",
    )
    .bind(id.to_string())
    .bind(ms(now))
    .bind(ms(lease_until))
    .fetch_optional(&mut *tx)
    .await?;
    let claimed = match row {
        Some(row) => Some(claimed_with_credentials(&mut tx, &row).await?),
        None => None,
    };
    tx.commit().await?;
    Ok(claimed)
}

pub(super) async fn claim_due(
    pool: &SqlitePool,
    now: OffsetDateTime,
    stale_issuing_before: OffsetDateTime,
    lease_until: OffsetDateTime,
    limit: u32,
) -> Result<Vec<ClaimedGrant>, StoreError> {
    // BEGIN IMMEDIATE holds the write lock from the candidate query to the commit, so no other
    // claimer (in this or another process) can take the same rows.
    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
    let rows = sqlx::query(
        "UPDATE grants
         SET revoke_cause = CASE status
                                WHEN 'active' THEN 'expired'
                                WHEN 'issuing' THEN 'recovery'
                                ELSE COALESCE(revoke_cause, 'recovery') END,
             status = 'revoking',
             lease_until = $3
         WHERE id IN (
             SELECT id FROM grants
             WHERE (status = 'active' AND expires_at <= $1)
                OR (status = 'issuing' AND created_at < $2)
                OR (status = 'revoking' AND lease_until <= $1)
             ORDER BY expires_at
             LIMIT $4)
         RETURNING *",
    )
    .bind(ms(now))
    .bind(ms(stale_issuing_before))
    .bind(ms(lease_until))
    .bind(i64::from(limit))
    .fetch_all(&mut *tx)
    .await?;
    let mut claimed = Vec::with_capacity(rows.len());
    for row in &rows {
        claimed.push(claimed_with_credentials(&mut tx, row).await?);
    }
    tx.commit().await?;
    Ok(claimed)
}

pub(super) async fn finish_revoke(
    pool: &SqlitePool,
    id: Uuid,
    cause: RevokeCause,
    now: OffsetDateTime,
    audit: &AuditEvent,
) -> Result<(), StoreError> {
    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
    let moved = sqlx::query(
        "UPDATE grants SET status = $2, revoked_at = $3, lease_until = NULL
         WHERE id = $1 AND status = 'revoking'",
    )
    .bind(id.to_string())
    .bind(cause.final_status().as_str())
    .bind(ms(now))
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if moved != 1 {
        return Err(StoreError::Conflict("grant is not revoking".to_owned()));
    }
    insert_audit(&mut tx, audit).await?;
    tx.commit().await?;
    Ok(())
}

pub(super) async fn revoke_failed(
    pool: &SqlitePool,
    id: Uuid,
    error: &str,
    retry_at: OffsetDateTime,
    audit: &AuditEvent,
) -> Result<(), StoreError> {
    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
    let moved = sqlx::query(
        "UPDATE grants
         SET revoke_attempts = revoke_attempts + 1, last_error = $2, lease_until = $3
         WHERE id = $1 AND status = 'revoking'",
    )
    .bind(id.to_string())
    .bind(error)
    .bind(ms(retry_at))
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if moved != 1 {
        return Err(StoreError::Conflict("grant is not revoking".to_owned()));
    }
    insert_audit(&mut tx, audit).await?;
    tx.commit().await?;
    Ok(())
}

pub(super) async fn active_grants(pool: &SqlitePool, limit: u32) -> Result<Vec<Grant>, StoreError> {
    let mut conn = pool.acquire().await?;
    let rows = sqlx::query(
        "SELECT * FROM grants WHERE status = 'active' ORDER BY created_at, id LIMIT $1",
    )
    .bind(i64::from(limit))
    .fetch_all(&mut *conn)
    .await?;
    let mut grants = Vec::with_capacity(rows.len());
    for row in &rows {
        grants.push(grant_with_credentials(&mut conn, row).await?);
    }
    Ok(grants)
}

/// The `WHERE` conditions of a revoke-all selection, after `status = 'active'` (as Postgres).
fn push_select(q: &mut sqlx::QueryBuilder<'_, sqlx::Sqlite>, select: &GrantSelect) {
    if let Some(v) = &select.issuer {
        q.push(" AND g.issuer = ").push_bind(v.clone());
    }
    if let Some(v) = &select.repository {
        q.push(" AND g.repository = ").push_bind(v.clone());
    }
    if let Some(v) = &select.repository_id {
        q.push(" AND g.repository_id = ").push_bind(v.clone());
    }
    if let Some(t) = select.issued_after {
        q.push(" AND g.created_at >= ").push_bind(ms(t));
    }
    if let Some(t) = select.issued_before {
        q.push(" AND g.created_at < ").push_bind(ms(t));
    }
    if let Some(v) = &select.credential {
        q.push(
            " AND EXISTS (SELECT 1 FROM grant_credentials c WHERE c.grant_id = g.id AND c.name = ",
        )
        .push_bind(v.clone())
        .push(")");
    }
    if let Some(v) = &select.kind {
        q.push(
            " AND EXISTS (SELECT 1 FROM grant_credentials c WHERE c.grant_id = g.id AND c.kind = ",
        )
        .push_bind(v.clone())
        .push(")");
    }
}

pub(super) async fn active_grants_page(
    pool: &SqlitePool,
    select: &GrantSelect,
    after: Option<GrantCursor>,
    limit: u32,
) -> Result<Vec<Grant>, StoreError> {
    let mut q = sqlx::QueryBuilder::new("SELECT g.* FROM grants g WHERE g.status = 'active'");
    push_select(&mut q, select);
    if let Some(c) = after {
        let t = ms(c.created_at);
        q.push(" AND g.created_at >= ")
            .push_bind(t)
            .push(" AND (g.created_at > ")
            .push_bind(t)
            .push(" OR g.id > ")
            .push_bind(c.id.to_string())
            .push(")");
    }
    q.push(" ORDER BY g.created_at, g.id LIMIT ")
        .push_bind(i64::from(limit));
    let mut conn = pool.acquire().await?;
    let rows = q.build().fetch_all(&mut *conn).await?;
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    // Every credential of the page in one query (a query per grant is what made a large
    // revoke-all outlast the store's call limit).
    let ids: Vec<String> = rows
        .iter()
        .map(|r| r.try_get::<String, _>("id"))
        .collect::<Result<_, _>>()?;
    let cred_rows = sqlx::query(
        "SELECT grant_id, name, kind, resource_id, details FROM grant_credentials
         WHERE grant_id IN (SELECT value FROM json_each($1)) ORDER BY grant_id, position",
    )
    .bind(json_text(&ids)?)
    .fetch_all(&mut *conn)
    .await?;
    let mut creds: std::collections::HashMap<String, Vec<IssuedCredential>> =
        std::collections::HashMap::with_capacity(ids.len());
    for r in &cred_rows {
        creds
            .entry(r.try_get::<String, _>("grant_id")?)
            .or_default()
            .push(IssuedCredential {
                name: r.try_get("name")?,
                kind: parse_kind(r.try_get("kind")?)?,
                resource_id: r.try_get("resource_id")?,
                details: json_col(r, "details")?,
            });
    }
    rows.iter()
        .zip(&ids)
        .map(|(row, id)| grant_from_row(row, creds.remove(id).unwrap_or_default()))
        .collect()
}

pub(super) async fn revoke_in_store(
    pool: &SqlitePool,
    now: OffsetDateTime,
    audits: &[AuditEvent],
) -> Result<Vec<Uuid>, StoreError> {
    let ids: Vec<String> = audits
        .iter()
        .filter_map(|a| a.grant_id.map(|g| g.to_string()))
        .collect();
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
    let moved: Vec<String> = sqlx::query_scalar(
        "UPDATE grants
         SET status = 'revoked', revoke_cause = 'requested', revoked_at = $2, lease_until = NULL
         WHERE id IN (SELECT value FROM json_each($1)) AND status = 'active'
         RETURNING id",
    )
    .bind(json_text(&ids)?)
    .bind(ms(now))
    .fetch_all(&mut *tx)
    .await?;
    let moved = moved
        .iter()
        .map(|s| Uuid::parse_str(s).map_err(|_| corrupt("uuid")))
        .collect::<Result<Vec<_>, _>>()?;
    let moved_set: std::collections::HashSet<Uuid> = moved.iter().copied().collect();
    for a in audits {
        if a.grant_id.is_some_and(|g| moved_set.contains(&g)) {
            insert_audit(&mut tx, a).await?;
        }
    }
    tx.commit().await?;
    Ok(moved)
}

pub(super) async fn record_jti(
    pool: &SqlitePool,
    j: &JtiRecord,
    now: OffsetDateTime,
) -> Result<(), StoreError> {
    // As in `begin_grant`: insert, or take over a record whose window has passed.
    let won = sqlx::query(
        "INSERT INTO used_jti (iss, jti, expires_at) VALUES ($1, $2, $3)
         ON CONFLICT (iss, jti) DO UPDATE SET expires_at = excluded.expires_at
         WHERE used_jti.expires_at <= $4
         RETURNING 1",
    )
    .bind(&j.iss)
    .bind(&j.jti)
    .bind(ms(j.expires_at))
    .bind(ms(now))
    .fetch_optional(pool)
    .await?;
    match won {
        Some(_) => Ok(()),
        None => Err(StoreError::Replayed),
    }
}

pub(super) async fn active_job_grants(
    pool: &SqlitePool,
    job: &JobMatch,
    limit: u32,
) -> Result<Vec<Grant>, StoreError> {
    let mut conn = pool.acquire().await?;
    // `grants_active_job_idx` covers (repository_id, json_extract(job, '$.job_id')) of active
    // rows; the expression must be written exactly so for SQLite to use it.
    let rows = sqlx::query(
        "SELECT * FROM grants
         WHERE status = 'active' AND repository_id = $1 AND json_extract(job, '$.job_id') = $2
           AND issuer IN (SELECT value FROM json_each($3))
           AND json_extract(job, '$.platform') = $4
           AND ($5 IS NULL OR json_extract(job, '$.run_id') = $5)
           AND ($6 IS NULL OR json_extract(job, '$.run_attempt') = $6)
         ORDER BY created_at, id LIMIT $7",
    )
    .bind(&job.repository_id)
    .bind(&job.job_id)
    .bind(json_text(&job.issuers)?)
    .bind(&job.platform)
    .bind(&job.run_id)
    .bind(&job.run_attempt)
    .bind(i64::from(limit))
    .fetch_all(&mut *conn)
    .await?;
    let mut grants = Vec::with_capacity(rows.len());
    for row in &rows {
        grants.push(grant_with_credentials(&mut conn, row).await?);
    }
    Ok(grants)
}

pub(super) async fn record_delivery(
    pool: &SqlitePool,
    source: &str,
    id: &str,
    now: OffsetDateTime,
    expires_at: OffsetDateTime,
) -> Result<(), StoreError> {
    // As for `used_jti`: insert, or take over an expired record; a live one returns nothing.
    let won = sqlx::query(
        "INSERT INTO webhook_deliveries (source, delivery_id, received_at, expires_at)
         VALUES ($1, $2, $3, $4)
         ON CONFLICT (source, delivery_id) DO UPDATE
             SET received_at = excluded.received_at, expires_at = excluded.expires_at
         WHERE webhook_deliveries.expires_at <= $3
         RETURNING 1",
    )
    .bind(source)
    .bind(id)
    .bind(ms(now))
    .bind(ms(expires_at))
    .fetch_optional(pool)
    .await?;
    match won {
        Some(_) => Ok(()),
        None => Err(StoreError::Replayed),
    }
}

pub(super) async fn forget_delivery(
    pool: &SqlitePool,
    source: &str,
    id: &str,
) -> Result<(), StoreError> {
    sqlx::query("DELETE FROM webhook_deliveries WHERE source = $1 AND delivery_id = $2")
        .bind(source)
        .bind(id)
        .execute(pool)
        .await?;
    Ok(())
}

pub(super) async fn purge_deliveries(
    pool: &SqlitePool,
    now: OffsetDateTime,
) -> Result<u64, StoreError> {
    let done = sqlx::query("DELETE FROM webhook_deliveries WHERE expires_at <= $1")
        .bind(ms(now))
        .execute(pool)
        .await?;
    Ok(done.rows_affected())
}

pub(super) async fn purge_jti(pool: &SqlitePool, now: OffsetDateTime) -> Result<u64, StoreError> {
    let done = sqlx::query("DELETE FROM used_jti WHERE expires_at <= $1")
        .bind(ms(now))
        .execute(pool)
        .await?;
    Ok(done.rows_affected())
}

pub(super) async fn stats(pool: &SqlitePool) -> Result<StoreStats, StoreError> {
    let row = sqlx::query(
        "SELECT count(CASE WHEN status = 'active' THEN 1 END) AS active,
                count(CASE WHEN status = 'issuing' THEN 1 END) AS issuing,
                count(CASE WHEN status = 'revoking' AND revoke_attempts > 0 THEN 1 END) AS failing
         FROM grants WHERE status IN ('active', 'issuing', 'revoking')",
    )
    .fetch_one(pool)
    .await?;
    Ok(StoreStats {
        active_grants: row.try_get("active")?,
        issuing_grants: row.try_get("issuing")?,
        revoke_failures_pending: row.try_get("failing")?,
    })
}

pub(super) async fn gauges(
    pool: &SqlitePool,
    now: OffsetDateTime,
) -> Result<StoreGauges, StoreError> {
    let rows = sqlx::query(
        "SELECT c.kind, count(DISTINCT g.id) AS n
         FROM grants g JOIN grant_credentials c ON c.grant_id = g.id
         WHERE g.status = 'active' GROUP BY c.kind ORDER BY c.kind",
    )
    .fetch_all(pool)
    .await?;
    let active_by_kind = rows
        .iter()
        .map(|r| Ok((r.try_get("kind")?, r.try_get("n")?)))
        .collect::<Result<Vec<_>, StoreError>>()?;
    let oldest: Option<i64> = sqlx::query_scalar(
        "SELECT min(expires_at) FROM grants
         WHERE status IN ('active', 'revoking') AND expires_at < ?",
    )
    .bind(ms(now))
    .fetch_one(pool)
    .await?;
    Ok(StoreGauges {
        active_by_kind,
        oldest_overdue: oldest.map(from_ms).transpose()?,
    })
}

/// Unix milliseconds, the schema's time encoding (floor, so ordering is kept before 1970 too).
pub(super) fn ms(t: OffsetDateTime) -> i64 {
    let millis = t.unix_timestamp_nanos().div_euclid(1_000_000);
    // Every OffsetDateTime (years ±9999) fits: i64 milliseconds span ±292 million years.
    i64::try_from(millis).unwrap_or(i64::MAX)
}

fn from_ms(v: i64) -> Result<OffsetDateTime, StoreError> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(v) * 1_000_000)
        .map_err(|_| corrupt("timestamp"))
}

fn time_col(row: &SqliteRow, col: &str) -> Result<OffsetDateTime, StoreError> {
    from_ms(row.try_get(col)?)
}

fn opt_time_col(row: &SqliteRow, col: &str) -> Result<Option<OffsetDateTime>, StoreError> {
    row.try_get::<Option<i64>, _>(col)?.map(from_ms).transpose()
}

fn uuid_col(row: &SqliteRow, col: &str) -> Result<Uuid, StoreError> {
    Uuid::parse_str(row.try_get(col)?).map_err(|_| corrupt("uuid"))
}

fn json_col(row: &SqliteRow, col: &str) -> Result<serde_json::Value, StoreError> {
    serde_json::from_str(row.try_get(col)?).map_err(|_| corrupt("json"))
}

fn json_text<T: serde::Serialize + ?Sized>(v: &T) -> Result<String, StoreError> {
    serde_json::to_string(v)
        .map_err(|_| StoreError::Unavailable("value not encodable as json".to_owned()))
}

fn position_i64(position: usize) -> Result<i64, StoreError> {
    i64::try_from(position).map_err(|_| StoreError::Conflict("too many credentials".to_owned()))
}

async fn load_credentials(
    conn: &mut SqliteConnection,
    id: &str,
) -> Result<Vec<IssuedCredential>, StoreError> {
    let rows = sqlx::query(
        "SELECT name, kind, resource_id, details FROM grant_credentials
         WHERE grant_id = $1 ORDER BY position",
    )
    .bind(id)
    .fetch_all(conn)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(IssuedCredential {
                name: r.try_get("name")?,
                kind: parse_kind(r.try_get("kind")?)?,
                resource_id: r.try_get("resource_id")?,
                details: json_col(r, "details")?,
            })
        })
        .collect()
}

async fn grant_with_credentials(
    conn: &mut SqliteConnection,
    row: &SqliteRow,
) -> Result<Grant, StoreError> {
    let id: &str = row.try_get("id")?;
    let credentials = load_credentials(conn, id).await?;
    grant_from_row(row, credentials)
}

async fn claimed_with_credentials(
    conn: &mut SqliteConnection,
    row: &SqliteRow,
) -> Result<ClaimedGrant, StoreError> {
    let grant = grant_with_credentials(conn, row).await?;
    if grant.status != GrantStatus::Revoking {
        return Err(corrupt("claimed grant"));
    }
    let cause: Option<&str> = row.try_get("revoke_cause")?;
    let cause = parse_cause(cause.unwrap_or_default())?;
    Ok(ClaimedGrant { grant, cause })
}

fn grant_from_row(
    row: &SqliteRow,
    credentials: Vec<IssuedCredential>,
) -> Result<Grant, StoreError> {
    Ok(Grant {
        id: uuid_col(row, "id")?,
        status: parse_status(row.try_get("status")?)?,
        issuer: row.try_get("issuer")?,
        subject: row.try_get("subject")?,
        repository: row.try_get("repository")?,
        repository_id: row.try_get("repository_id")?,
        job: json_col(row, "job")?,
        bundle_digest: row.try_get("bundle_digest")?,
        created_at: time_col(row, "created_at")?,
        expires_at: time_col(row, "expires_at")?,
        revoked_at: opt_time_col(row, "revoked_at")?,
        revoke_attempts: row.try_get("revoke_attempts")?,
        last_error: row.try_get("last_error")?,
        credentials,
    })
}

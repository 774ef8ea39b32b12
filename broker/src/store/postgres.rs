//! The Postgres backend (production).
//!
//! Concurrency: state changes are single `UPDATE ... WHERE status = <expected>` statements, which
//! Postgres re-checks against the latest row version after waiting on a concurrent writer (READ
//! COMMITTED), so two callers can never both win one transition. The reaper's batch claim locks
//! its candidates with `FOR UPDATE SKIP LOCKED`, so replicas split the due grants between them
//! instead of queueing on the same rows.

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
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPoolOptions, PgRow};
use sqlx::types::Json;
use sqlx::{PgPool, Row};
use std::collections::HashMap;
use std::str::FromStr;
use time::OffsetDateTime;
use uuid::Uuid;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/postgres");

/// Server-side bounds set on every connection (milliseconds). A statement or lock wait that runs
/// past these is cancelled by the server, so a stuck query cannot hold a request forever.
const STATEMENT_TIMEOUT_MS: &str = "5000";
const LOCK_TIMEOUT_MS: &str = "3000";
const IDLE_IN_TRANSACTION_TIMEOUT_MS: &str = "15000";

const MAX_CONNECTIONS: u32 = 16;

pub(super) async fn connect(url: &str) -> Result<PgPool, StoreError> {
    let options = PgConnectOptions::from_str(url)
        .map_err(|_| StoreError::BadUrl("unparseable postgres url".to_owned()))?
        .application_name("broker")
        .options([
            ("statement_timeout", STATEMENT_TIMEOUT_MS),
            ("lock_timeout", LOCK_TIMEOUT_MS),
            (
                "idle_in_transaction_session_timeout",
                IDLE_IN_TRANSACTION_TIMEOUT_MS,
            ),
        ]);
    let pool = PgPoolOptions::new()
        .max_connections(MAX_CONNECTIONS)
        .min_connections(0)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .idle_timeout(Some(std::time::Duration::from_secs(300)))
        .connect_with(options)
        .await?;
    Ok(pool)
}

pub(super) async fn migrate(pool: &PgPool) -> Result<(), StoreError> {
    MIGRATOR.run(pool).await.map_err(migrate_err)
}

pub(super) async fn ping(pool: &PgPool) -> Result<(), StoreError> {
    sqlx::query("SELECT 1").execute(pool).await?;
    Ok(())
}

/// One grant to insert in a batch: the grant, its jti (if single-use), and its first status
/// (`active` for credentials minted in memory, `issuing` for an intent).
pub(super) type GrantInsert<'a> = (&'a NewGrant, Option<&'a JtiRecord>, &'static str);

/// Many grants, set-based, in one statement: the jti records, the grants and their credentials
/// for the whole batch. Each item's outcome is `Ok` or `Replayed` (its jti is live, or taken by
/// an earlier item of the same batch); refused items write nothing.
pub(super) async fn insert_grants(
    conn: &mut PgConnection,
    items: &[GrantInsert<'_>],
) -> Result<Vec<Result<(), StoreError>>, StoreError> {
    let mut outcomes: Vec<Result<(), StoreError>> = Vec::with_capacity(items.len());
    // A token used twice inside one batch: the later use is a replay (and one upsert statement
    // cannot touch the same row twice).
    let mut seen = std::collections::HashSet::new();
    for (_, jti, _) in items {
        let fresh = jti.is_none_or(|j| seen.insert((j.iss.as_str(), j.jti.as_str())));
        outcomes.push(if fresh {
            Ok(())
        } else {
            Err(StoreError::Replayed)
        });
    }
    let fresh: Vec<&GrantInsert<'_>> = items
        .iter()
        .zip(&outcomes)
        .filter(|(_, o)| o.is_ok())
        .map(|(i, _)| i)
        .collect();
    if fresh.is_empty() {
        return Ok(outcomes);
    }
    let claimed: Vec<&JtiRecord> = fresh.iter().filter_map(|(_, j, _)| *j).collect();
    // The earliest `now` of the batch decides whether a used record's window has passed, so no
    // item takes over a record that was still live at its own time.
    let now = items.iter().map(|(g, _, _)| g.created_at).min();
    let grants: Vec<&NewGrant> = fresh.iter().map(|(g, _, _)| *g).collect();
    let (mut gid, mut pos, mut name, mut kind, mut rid, mut det) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    for g in &grants {
        for (position, c) in g.credentials.iter().enumerate() {
            gid.push(g.id);
            pos.push(position_i32(position)?);
            name.push(c.name.as_str());
            kind.push(c.kind.as_str());
            rid.push(c.resource_id.as_str());
            det.push(Json(&c.details));
        }
    }
    // `j` claims the jti records (insert, or take over one whose window has passed); a grant
    // goes in only if it has no jti or its jti was claimed here, and credentials only with their
    // grant. All parts see one snapshot; the foreign keys are checked at the end of the
    // statement, when the grants are there.
    let won: Vec<(String, String)> = sqlx::query_as(
        "WITH j AS (
             INSERT INTO used_jti (iss, jti, expires_at)
             SELECT * FROM unnest($1::text[], $2::text[], $3::timestamptz[])
             ON CONFLICT (iss, jti) DO UPDATE SET expires_at = EXCLUDED.expires_at
             WHERE used_jti.expires_at <= $4
             RETURNING iss, jti),
         g AS (
             INSERT INTO grants (id, status, issuer, subject, repository, repository_id, job,
                                 bundle_digest, revocation_hash, created_at, expires_at)
             SELECT id, status, issuer, subject, repository, repository_id, job, bundle_digest,
                    revocation_hash, created_at, expires_at
             FROM unnest($5::uuid[], $6::text[], $7::text[], $8::text[], $9::text[],
                         $10::jsonb[], $11::text[], $12::text[], $13::timestamptz[],
                         $14::timestamptz[], $15::text[], $16::text[], $17::text[])
                  AS u(id, issuer, subject, repository, repository_id, job, bundle_digest,
                       revocation_hash, created_at, expires_at, status, jti_iss, jti)
             WHERE u.jti IS NULL
                OR EXISTS (SELECT 1 FROM j WHERE j.iss = u.jti_iss AND j.jti = u.jti)
             RETURNING id),
         c AS (
             INSERT INTO grant_credentials (grant_id, position, name, kind, resource_id, details)
             SELECT * FROM unnest($18::uuid[], $19::int4[], $20::text[], $21::text[],
                                  $22::text[], $23::jsonb[])
                      AS c(grant_id, position, name, kind, resource_id, details)
             WHERE c.grant_id IN (SELECT id FROM g))
         SELECT iss, jti FROM j",
    )
    .bind(claimed.iter().map(|j| j.iss.as_str()).collect::<Vec<_>>())
    .bind(claimed.iter().map(|j| j.jti.as_str()).collect::<Vec<_>>())
    .bind(claimed.iter().map(|j| j.expires_at).collect::<Vec<_>>())
    .bind(now)
    .bind(grants.iter().map(|g| g.id).collect::<Vec<_>>())
    .bind(grants.iter().map(|g| g.issuer.as_str()).collect::<Vec<_>>())
    .bind(
        grants
            .iter()
            .map(|g| g.subject.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(
        grants
            .iter()
            .map(|g| g.repository.as_deref())
            .collect::<Vec<_>>(),
    )
    .bind(
        grants
            .iter()
            .map(|g| g.repository_id.as_deref())
            .collect::<Vec<_>>(),
    )
    .bind(grants.iter().map(|g| Json(&g.job)).collect::<Vec<_>>())
    .bind(
        grants
            .iter()
            .map(|g| g.bundle_digest.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(
        grants
            .iter()
            .map(|g| g.revocation_hash.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(grants.iter().map(|g| g.created_at).collect::<Vec<_>>())
    .bind(grants.iter().map(|g| g.expires_at).collect::<Vec<_>>())
    .bind(
        fresh
            .iter()
            .map(|(_, _, status)| *status)
            .collect::<Vec<_>>(),
    )
    .bind(
        fresh
            .iter()
            .map(|(_, j, _)| j.map(|j| j.iss.as_str()))
            .collect::<Vec<_>>(),
    )
    .bind(
        fresh
            .iter()
            .map(|(_, j, _)| j.map(|j| j.jti.as_str()))
            .collect::<Vec<_>>(),
    )
    .bind(&gid)
    .bind(&pos)
    .bind(&name)
    .bind(&kind)
    .bind(&rid)
    .bind(&det)
    .fetch_all(&mut *conn)
    .await?;
    let won: std::collections::HashSet<(&str, &str)> =
        won.iter().map(|(i, j)| (i.as_str(), j.as_str())).collect();
    for ((_, j, _), o) in items.iter().zip(outcomes.iter_mut()) {
        if let (Some(j), Ok(())) = (j, &o)
            && !won.contains(&(j.iss.as_str(), j.jti.as_str()))
        {
            *o = Err(StoreError::Replayed);
        }
    }
    Ok(outcomes)
}

/// `issuing` → `active` with the final details, inside the caller's transaction, in one
/// statement. Its checks guard its writes, so a `Conflict` leaves nothing written (a batch drops
/// just this item).
pub(super) async fn activate_rows(
    conn: &mut PgConnection,
    id: Uuid,
    expires_at: OffsetDateTime,
    details: &[serde_json::Value],
) -> Result<(), StoreError> {
    let positions = (0..details.len())
        .map(position_i32)
        .collect::<Result<Vec<_>, _>>()?;
    let expected = i64::try_from(details.len())
        .map_err(|_| StoreError::Conflict("too many credentials".to_owned()))?;
    let details: Vec<Json<&serde_json::Value>> = details.iter().map(Json).collect();
    // The grant moves only if it is `issuing` and has exactly as many credentials as details
    // were given; the details are written only if it moved.
    let (moved, stored): (i64, i64) = sqlx::query_as(
        "WITH n AS (SELECT count(*) AS stored FROM grant_credentials WHERE grant_id = $1),
         g AS (
             UPDATE grants SET status = 'active', expires_at = $2
             WHERE id = $1 AND status = 'issuing' AND (SELECT stored FROM n) = $5
             RETURNING id),
         c AS (
             UPDATE grant_credentials c SET details = u.details
             FROM unnest($3::int4[], $4::jsonb[]) AS u(position, details), g
             WHERE c.grant_id = g.id AND c.position = u.position)
         SELECT (SELECT count(*) FROM g), (SELECT stored FROM n)",
    )
    .bind(id)
    .bind(expires_at)
    .bind(&positions)
    .bind(&details)
    .bind(expected)
    .fetch_one(&mut *conn)
    .await?;
    if stored != expected {
        return Err(StoreError::Conflict(
            "credential details do not match the grant".to_owned(),
        ));
    }
    if moved != 1 {
        return Err(StoreError::Conflict("grant is not issuing".to_owned()));
    }
    Ok(())
}

pub(super) async fn fail_grant(
    pool: &PgPool,
    id: Uuid,
    release_jti: Option<&JtiRecord>,
    audit: &AuditEvent,
) -> Result<(), StoreError> {
    let mut tx = pool.begin().await?;
    // revoked_at records when the grant stopped being live, as for the other final states.
    let moved = sqlx::query(
        "UPDATE grants SET status = 'failed', revoked_at = $2 WHERE id = $1 AND status = 'issuing'",
    )
    .bind(id)
    .bind(audit.time)
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

/// Append one event to the chain, inside the caller's transaction.
async fn insert_audit(conn: &mut PgConnection, audit: &AuditEvent) -> Result<(), StoreError> {
    insert_audits(conn, &[audit]).await
}

/// Append events to the chain in the given order, inside the caller's transaction: one
/// statement up to [`CHAIN_IN_SQL_MAX`] events, two beyond. Locking the head row serialises appenders across replicas
/// until this transaction ends, so `seq` order is chain order (see `chain.rs`): the rows are
/// inserted in hash-chain order (`ORDER BY ord`), each taking the next `seq`.
pub(super) async fn insert_audits(
    conn: &mut PgConnection,
    audits: &[&AuditEvent],
) -> Result<(), StoreError> {
    if audits.is_empty() {
        return Ok(());
    }
    // Everything but the link hashes is computed before the head is locked. The canonical text
    // is also what the `event` column stores (parsed into jsonb by Postgres): the same JSON, so
    // each event is serialised once.
    let canonical = audits
        .iter()
        .map(|a| chain::canonical_event(a))
        .collect::<Result<Vec<_>, _>>()?;
    let n = audits.len();
    if n > CHAIN_IN_SQL_MAX {
        return insert_audits_hashed_here(conn, audits, canonical).await;
    }
    let mut cols = AuditColumns::with_capacity(n);
    for a in audits {
        cols.push(a)?;
    }
    // One statement: lock the head, chain the link hashes in order (`sha256(prev || canonical)`,
    // as `chain::link_hash`), insert the rows in chain order and move the head. The head is
    // therefore held for this one round trip and the commit.
    let canonical: Vec<Vec<u8>> = canonical.into_iter().map(String::into_bytes).collect();
    cols.bind(sqlx::query(
        "WITH RECURSIVE
         head AS (SELECT hash FROM audit_chain_head WHERE id = 1 FOR UPDATE),
         u AS (SELECT * FROM unnest($1::uuid[], $2::timestamptz[], $3::text[], $4::text[],
                                    $5::text[], $6::uuid[], $7::text[], $8::text[], $9::text[],
                                    $10::text[], $11::bytea[])
                    WITH ORDINALITY AS u(id, time, action, outcome, reason, grant_id,
                                         request_id, repository, repository_id, actor, canon,
                                         ord)),
         chain(ord, prev, hash) AS (
             SELECT 0::bigint, NULL::text, (SELECT hash FROM head)
             UNION ALL
             SELECT c.ord + 1, c.hash,
                    encode(sha256(convert_to(c.hash, 'UTF8') || u.canon), 'hex')
             FROM chain c JOIN u ON u.ord = c.ord + 1),
         ins AS (
             INSERT INTO audit_events (id, time, action, outcome, reason, grant_id, request_id,
                                       repository, repository_id, actor, event, prev_hash, hash)
             SELECT u.id, u.time, u.action, u.outcome, u.reason, u.grant_id, u.request_id,
                    u.repository, u.repository_id, u.actor,
                    convert_from(u.canon, 'UTF8')::jsonb, chain.prev, chain.hash
             FROM u JOIN chain ON chain.ord = u.ord
             ORDER BY u.ord
             RETURNING seq)
         UPDATE audit_chain_head
         SET seq = (SELECT max(seq) FROM ins),
             hash = (SELECT hash FROM chain ORDER BY ord DESC LIMIT 1)
         WHERE id = 1",
    ))
    .bind(&canonical)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Up to this many events, the link hashes are chained inside the insert statement (the head
/// is held for one round trip). The recursive chaining joins each step against the whole batch,
/// so its cost grows with the square of the batch: a page of 1,000 events took about 0.4 s.
/// Larger batches (revoke-all pages) read the head, chain in the broker, and insert: one more
/// round trip with the head held, linear in the batch.
const CHAIN_IN_SQL_MAX: usize = 64;

/// Append a large batch: lock and read the head, compute every link hash here
/// (`chain::link_hash`, the same function verify uses), insert the rows in chain order and move
/// the head, inside the caller's transaction.
async fn insert_audits_hashed_here(
    conn: &mut PgConnection,
    audits: &[&AuditEvent],
    canonical: Vec<String>,
) -> Result<(), StoreError> {
    let head: String =
        sqlx::query_scalar("SELECT hash FROM audit_chain_head WHERE id = 1 FOR UPDATE")
            .fetch_one(&mut *conn)
            .await?;
    let mut prevs = Vec::with_capacity(audits.len());
    let mut hashes = Vec::with_capacity(audits.len());
    let mut prev = head;
    for c in &canonical {
        let h = chain::link_hash(&prev, c);
        prevs.push(std::mem::replace(&mut prev, h.clone()));
        hashes.push(h);
    }
    let mut cols = AuditColumns::with_capacity(audits.len());
    for a in audits {
        cols.push(a)?;
    }
    cols.bind(sqlx::query(
        "WITH
         u AS (SELECT * FROM unnest($1::uuid[], $2::timestamptz[], $3::text[], $4::text[],
                                    $5::text[], $6::uuid[], $7::text[], $8::text[], $9::text[],
                                    $10::text[], $11::text[], $12::text[], $13::text[])
                    WITH ORDINALITY AS u(id, time, action, outcome, reason, grant_id,
                                         request_id, repository, repository_id, actor, canon,
                                         prev, hash, ord)),
         ins AS (
             INSERT INTO audit_events (id, time, action, outcome, reason, grant_id, request_id,
                                       repository, repository_id, actor, event, prev_hash, hash)
             SELECT id, time, action, outcome, reason, grant_id, request_id, repository,
                    repository_id, actor, canon::jsonb, prev, hash
             FROM u ORDER BY ord
             RETURNING seq)
         UPDATE audit_chain_head
         SET seq = (SELECT max(seq) FROM ins), hash = $14
         WHERE id = 1",
    ))
    .bind(&canonical)
    .bind(&prevs)
    .bind(&hashes)
    .bind(&prev)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Column arrays for one multi-row audit insert.
struct AuditColumns<'a> {
    ids: Vec<Uuid>,
    times: Vec<OffsetDateTime>,
    actions: Vec<String>,
    outcomes: Vec<String>,
    reasons: Vec<&'a str>,
    grant_ids: Vec<Option<Uuid>>,
    request_ids: Vec<Option<&'a str>>,
    repositories: Vec<Option<&'a str>>,
    repository_ids: Vec<Option<&'a str>>,
    actors: Vec<Option<&'a str>>,
}

impl<'a> AuditColumns<'a> {
    /// Bind the ten columns as `$1`..`$10` of an insert's `unnest`.
    fn bind<'q>(
        &'q self,
        q: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
        q.bind(&self.ids)
            .bind(&self.times)
            .bind(&self.actions)
            .bind(&self.outcomes)
            .bind(&self.reasons)
            .bind(&self.grant_ids)
            .bind(&self.request_ids)
            .bind(&self.repositories)
            .bind(&self.repository_ids)
            .bind(&self.actors)
    }

    fn push(&mut self, a: &'a AuditEvent) -> Result<(), StoreError> {
        self.ids.push(a.id);
        self.times.push(a.time);
        self.actions.push(enum_text(&a.action)?);
        self.outcomes.push(enum_text(&a.outcome)?);
        self.reasons.push(a.reason.as_str());
        self.grant_ids.push(a.grant_id);
        self.request_ids.push(a.request_id.as_deref());
        self.repositories.push(a.job.repository.as_deref());
        self.repository_ids.push(a.job.repository_id.as_deref());
        self.actors.push(a.actor.as_deref());
        Ok(())
    }

    fn with_capacity(n: usize) -> Self {
        Self {
            ids: Vec::with_capacity(n),
            times: Vec::with_capacity(n),
            actions: Vec::with_capacity(n),
            outcomes: Vec::with_capacity(n),
            reasons: Vec::with_capacity(n),
            grant_ids: Vec::with_capacity(n),
            request_ids: Vec::with_capacity(n),
            repositories: Vec::with_capacity(n),
            repository_ids: Vec::with_capacity(n),
            actors: Vec::with_capacity(n),
        }
    }
}

pub(super) async fn freeze_state(pool: &PgPool) -> Result<Option<FreezeRecord>, StoreError> {
    let row = sqlx::query("SELECT filter, reason, actor, since FROM broker_freeze WHERE id = 1")
        .fetch_optional(pool)
        .await?;
    row.map(|r| {
        Ok(FreezeRecord {
            filter: r.try_get::<Json<serde_json::Value>, _>("filter")?.0,
            reason: r.try_get("reason")?,
            actor: r.try_get("actor")?,
            since: r.try_get("since")?,
        })
    })
    .transpose()
}

pub(super) async fn set_freeze(
    pool: &PgPool,
    freeze: Option<&FreezeRecord>,
    audit: &AuditEvent,
) -> Result<bool, StoreError> {
    let mut tx = pool.begin().await?;
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
        .bind(Json(&f.filter))
        .bind(&f.reason)
        .bind(&f.actor)
        .bind(f.since)
        .execute(&mut *tx)
        .await?;
    }
    insert_audit(&mut tx, audit).await?;
    tx.commit().await?;
    Ok(was)
}

pub(super) async fn chain_head(pool: &PgPool) -> Result<ChainHead, StoreError> {
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
    pool: &PgPool,
    after_seq: i64,
    limit: u32,
) -> Result<Vec<ChainRow>, StoreError> {
    let rows = sqlx::query(
        "SELECT seq, id, time, action, outcome, reason, grant_id, request_id, repository,
                repository_id, actor, event::text AS event, prev_hash, hash
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
                id: r.try_get::<Uuid, _>("id")?.to_string(),
                time: r.try_get("time")?,
                action: r.try_get("action")?,
                outcome: r.try_get("outcome")?,
                reason: r.try_get("reason")?,
                grant_id: r
                    .try_get::<Option<Uuid>, _>("grant_id")?
                    .map(|g| g.to_string()),
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

fn checkpoint_from_row(r: &PgRow) -> Result<Checkpoint, StoreError> {
    let kind = match r.try_get::<String, _>("kind")?.as_str() {
        "export" => CheckpointKind::Export,
        "prune" => CheckpointKind::Prune,
        _ => return Err(corrupt("audit checkpoint kind")),
    };
    Ok(Checkpoint {
        kind,
        created_at: r.try_get("created_at")?,
        seq: r.try_get("seq")?,
        hash: r.try_get("hash")?,
        event_count: u64::try_from(r.try_get::<i64, _>("event_count")?)
            .map_err(|_| corrupt("audit checkpoint count"))?,
        last_event_id: r.try_get("last_event_id")?,
        last_event_time: r.try_get("last_event_time")?,
    })
}

async fn last_prune(conn: &mut PgConnection) -> Result<Option<Checkpoint>, StoreError> {
    let row = sqlx::query(
        "SELECT kind, created_at, seq, hash, event_count, last_event_id, last_event_time
         FROM audit_checkpoints WHERE kind = 'prune' ORDER BY seq DESC LIMIT 1",
    )
    .fetch_optional(&mut *conn)
    .await?;
    row.as_ref().map(checkpoint_from_row).transpose()
}

pub(super) async fn last_prune_checkpoint(pool: &PgPool) -> Result<Option<Checkpoint>, StoreError> {
    let mut conn = pool.acquire().await?;
    last_prune(&mut conn).await
}

pub(super) async fn checkpoint_recorded(
    pool: &PgPool,
    anchor: &ChainAnchor,
) -> Result<bool, StoreError> {
    let found: Option<i32> = sqlx::query_scalar(
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
    conn: &mut PgConnection,
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
    conn: &mut PgConnection,
    cp: &Checkpoint,
    pruned_before: Option<OffsetDateTime>,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO audit_checkpoints (kind, created_at, seq, hash, event_count, last_event_id,
                                        last_event_time, pruned_before)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(cp.kind.as_str())
    .bind(cp.created_at)
    .bind(cp.seq)
    .bind(&cp.hash)
    .bind(count_i64(cp.event_count)?)
    .bind(cp.last_event_id)
    .bind(cp.last_event_time)
    .bind(pruned_before)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

pub(super) async fn record_checkpoint(
    pool: &PgPool,
    now: OffsetDateTime,
) -> Result<Checkpoint, StoreError> {
    let mut tx = pool.begin().await?;
    // Holding the head keeps appenders out while counting, so count, seq and hash agree.
    let row = sqlx::query("SELECT seq, hash FROM audit_chain_head WHERE id = 1 FOR UPDATE")
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
        (Some(r), _) => (Some(r.try_get("id")?), Some(r.try_get("time")?)),
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
    pool: &PgPool,
    before: OffsetDateTime,
) -> Result<Option<i64>, StoreError> {
    // The last event of the longest prefix (in chain order) whose events are all older than
    // `before`.
    let target: Option<i64> = sqlx::query_scalar(
        "SELECT max(seq) FROM audit_events
         WHERE seq < COALESCE((SELECT min(seq) FROM audit_events WHERE time >= $1),
                              9223372036854775807)",
    )
    .bind(before)
    .fetch_one(pool)
    .await?;
    Ok(target)
}

pub(super) async fn prune_batch(
    pool: &PgPool,
    target: i64,
    before: OffsetDateTime,
    now: OffsetDateTime,
    batch: u32,
) -> Result<Option<(Checkpoint, u64)>, StoreError> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT 1 FROM audit_chain_head WHERE id = 1 FOR UPDATE")
        .execute(&mut *tx)
        .await?;
    let base = last_prune(&mut tx).await?;
    let after = base.as_ref().map_or(0, |b| b.seq);
    let cut = sqlx::query(
        "SELECT seq, id, time, hash FROM audit_events
         WHERE seq > $1 AND seq <= $2 ORDER BY seq LIMIT 1 OFFSET $3",
    )
    .bind(after)
    .bind(target)
    .bind(i64::from(batch.saturating_sub(1)))
    .fetch_optional(&mut *tx)
    .await?;
    let cut = match cut {
        Some(r) => Some(r),
        None => {
            sqlx::query(
                "SELECT seq, id, time, hash FROM audit_events
                 WHERE seq > $1 AND seq <= $2 ORDER BY seq DESC LIMIT 1",
            )
            .bind(after)
            .bind(target)
            .fetch_optional(&mut *tx)
            .await?
        }
    };
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
        last_event_id: Some(cut.try_get("id")?),
        last_event_time: Some(cut.try_get("time")?),
    };
    insert_checkpoint(&mut tx, &cp, Some(before)).await?;
    // The trigger lets a DELETE through only with this transaction-local setting and only up
    // to the prune checkpoint just written.
    sqlx::query("SELECT set_config('broker.audit_prune', 'on', true)")
        .execute(&mut *tx)
        .await?;
    let deleted = sqlx::query("DELETE FROM audit_events WHERE seq <= $1")
        .bind(seq)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    sqlx::query("SELECT set_config('broker.audit_prune', 'off', true)")
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(Some((cp, deleted)))
}

pub(super) async fn checkpoints(pool: &PgPool, limit: u32) -> Result<Vec<Checkpoint>, StoreError> {
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
    pool: &PgPool,
    hash: &str,
) -> Result<Option<(i64, String)>, StoreError> {
    let row = sqlx::query("SELECT seq, id FROM audit_events WHERE hash = $1")
        .bind(hash)
        .fetch_optional(pool)
        .await?;
    row.map(|r| Ok((r.try_get("seq")?, r.try_get::<Uuid, _>("id")?.to_string())))
        .transpose()
}

pub(super) async fn audit_records(
    pool: &PgPool,
    filter: &AuditFilter,
    limit: i64,
) -> Result<Vec<AuditRecord>, StoreError> {
    // Each filter is "parameter is NULL or the row matches", so one prepared statement serves
    // every combination. The cursor compares (time, seq) with the cursor row's, matching the
    // ORDER BY, so pages neither overlap nor skip events that share a time.
    let rows = sqlx::query(
        "SELECT seq, event FROM audit_events
         WHERE ($1::uuid IS NULL OR grant_id = $1)
           AND ($2::text IS NULL OR request_id = $2)
           AND ($3::text IS NULL OR repository = $3)
           AND ($4::text IS NULL OR outcome = $4)
           AND ($5::text IS NULL OR reason = $5)
           AND ($6::timestamptz IS NULL OR time >= $6)
           AND ($7::timestamptz IS NULL OR time < $7)
           AND ($8::text IS NULL OR repository_id = $8)
           AND ($9::text IS NULL OR actor = $9)
           AND ($10::text IS NULL
                OR event->'credentials_requested' @> jsonb_build_array($10::text)
                OR event->'credentials_granted' @> jsonb_build_array($10::text))
           AND ($11::text IS NULL OR grant_id IN
                (SELECT grant_id FROM grant_credentials WHERE kind = $11))
           AND ($12::bigint IS NULL OR (time, seq) <
                (SELECT c.time, c.seq FROM audit_events c WHERE c.seq = $12))
         ORDER BY time DESC, seq DESC
         LIMIT $13",
    )
    .bind(filter.grant_id)
    .bind(&filter.request_id)
    .bind(&filter.repository)
    .bind(&filter.outcome)
    .bind(&filter.reason)
    .bind(filter.since)
    .bind(filter.until)
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
            let event = r
                .try_get::<Json<AuditEvent>, _>("event")
                .map(|j| j.0)
                .map_err(|_| corrupt("audit event"))?;
            Ok(AuditRecord {
                seq: r.try_get("seq")?,
                event,
            })
        })
        .collect()
}

pub(super) async fn grant(pool: &PgPool, id: Uuid) -> Result<Option<Grant>, StoreError> {
    let row = sqlx::query("SELECT * FROM grants WHERE id = $1")
        .bind(id)
        .fetch_optional(pool)
        .await?;
    with_credentials_one(pool, row).await
}

pub(super) async fn grant_by_revocation_hash(
    pool: &PgPool,
    hash: &str,
) -> Result<Option<Grant>, StoreError> {
    let row = sqlx::query("SELECT * FROM grants WHERE revocation_hash = $1")
        .bind(hash)
        .fetch_optional(pool)
        .await?;
    with_credentials_one(pool, row).await
}

/// The id and status of the grant a revocation token belongs to (one indexed row, no
/// credentials).
pub(super) async fn grant_status_by_revocation_hash(
    pool: &PgPool,
    hash: &str,
) -> Result<Option<(Uuid, GrantStatus)>, StoreError> {
    let row: Option<(Uuid, String)> =
        sqlx::query_as("SELECT id, status FROM grants WHERE revocation_hash = $1")
            .bind(hash)
            .fetch_optional(pool)
            .await?;
    row.map(|(id, status)| Ok((id, parse_status(&status)?)))
        .transpose()
}

pub(super) async fn credential_status(
    pool: &PgPool,
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
            grant_id: r.try_get("id")?,
            grant_status: parse_status(r.try_get("status")?)?,
            expires_at: r.try_get("expires_at")?,
        })
    })
    .transpose()
}

pub(super) async fn claim_for_revoke(
    pool: &PgPool,
    id: Uuid,
    now: OffsetDateTime,
    lease_until: OffsetDateTime,
) -> Result<Option<ClaimedGrant>, StoreError> {
    // One statement in its own implicit transaction, committed without waiting for its WAL
    // flush: `set_config(…, true)` turns `synchronous_commit` off for this transaction only. The
    // claim must be visible to every other session at once, which is all the lease needs, and
    // nothing depends on it surviving a crash of the store: if it is lost, the grant is `active`
    // again and the revoke is simply repeated (by the caller's retry or the reaper), which is
    // idempotent; and the revoke's outcome (`finish_revoke`) is committed durably after it,
    // which flushes the claim too (the WAL is written in order). A revoking grant keeps the
    // cause recorded when it was first claimed; `status` in SET is the value before this update.
    let mut conn = pool.acquire().await?;
    let row = sqlx::query(
        "UPDATE grants
         SET revoke_cause = CASE WHEN status = 'revoking'
                                 THEN COALESCE(revoke_cause, 'requested')
                                 ELSE 'requested' END,
             status = 'revoking',
             lease_until = $3
         FROM (SELECT set_config('synchronous_commit', 'off', true)) AS async_commit
         WHERE id = $1
           AND (status IN ('active', 'issuing')
                OR (status = 'revoking' AND (lease_until IS NULL OR lease_until <= $2)))
         RETURNING grants.*",
    )
    .bind(id)
    .bind(now)
    .bind(lease_until)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    // Read after the claim committed, as the transaction read them before: a grant's credential
    // rows change only with its status (activation), which the claim has now taken away.
    let mut creds = load_credentials(&mut conn, &[id]).await?;
    Ok(Some(claimed_from_row(
        &row,
        creds.remove(&id).unwrap_or_default(),
    )?))
}

pub(super) async fn claim_due(
    pool: &PgPool,
    now: OffsetDateTime,
    stale_issuing_before: OffsetDateTime,
    lease_until: OffsetDateTime,
    limit: u32,
) -> Result<Vec<ClaimedGrant>, StoreError> {
    let mut tx = pool.begin().await?;
    // SKIP LOCKED: rows another replica is claiming right now are left to it, not waited on.
    // The locking clause re-checks the WHERE against the newest row version, so a row changed
    // by a transaction that committed meanwhile is only taken if it is still due.
    let rows = sqlx::query(
        "WITH due AS (
             SELECT id FROM grants
             WHERE (status = 'active' AND expires_at <= $1)
                OR (status = 'issuing' AND created_at < $2)
                OR (status = 'revoking' AND lease_until <= $1)
             ORDER BY expires_at
             LIMIT $4
             FOR UPDATE SKIP LOCKED
         )
         UPDATE grants g
         SET revoke_cause = CASE g.status
                                WHEN 'active' THEN 'expired'
                                WHEN 'issuing' THEN 'recovery'
                                ELSE COALESCE(g.revoke_cause, 'recovery') END,
             status = 'revoking',
             lease_until = $3
         FROM due
         WHERE g.id = due.id
           AND g.status IN ('active', 'issuing', 'revoking')
         RETURNING g.*",
    )
    .bind(now)
    .bind(stale_issuing_before)
    .bind(lease_until)
    .bind(i64::from(limit))
    .fetch_all(&mut *tx)
    .await?;
    let claimed = with_credentials(&mut tx, &rows, claimed_from_row).await?;
    tx.commit().await?;
    Ok(claimed)
}

/// `revoking` → the cause's final status, inside the caller's transaction (`Conflict`, nothing
/// written, if the grant is not `revoking`).
pub(super) async fn finish_rows(
    conn: &mut PgConnection,
    id: Uuid,
    cause: RevokeCause,
    now: OffsetDateTime,
) -> Result<(), StoreError> {
    let moved = sqlx::query(
        "UPDATE grants SET status = $2, revoked_at = $3, lease_until = NULL
         WHERE id = $1 AND status = 'revoking'",
    )
    .bind(id)
    .bind(cause.final_status().as_str())
    .bind(now)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    if moved != 1 {
        return Err(StoreError::Conflict("grant is not revoking".to_owned()));
    }
    Ok(())
}

pub(super) async fn revoke_failed(
    pool: &PgPool,
    id: Uuid,
    error: &str,
    retry_at: OffsetDateTime,
    audit: &AuditEvent,
) -> Result<(), StoreError> {
    let mut tx = pool.begin().await?;
    let moved = sqlx::query(
        "UPDATE grants
         SET revoke_attempts = revoke_attempts + 1, last_error = $2, lease_until = $3
         WHERE id = $1 AND status = 'revoking'",
    )
    .bind(id)
    .bind(error)
    .bind(retry_at)
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

pub(super) async fn active_grants(pool: &PgPool, limit: u32) -> Result<Vec<Grant>, StoreError> {
    let mut tx = pool.begin().await?;
    let rows = sqlx::query(
        "SELECT * FROM grants WHERE status = 'active' ORDER BY created_at, id LIMIT $1",
    )
    .bind(i64::from(limit))
    .fetch_all(&mut *tx)
    .await?;
    let grants = with_credentials(&mut tx, &rows, grant_from_row).await?;
    tx.commit().await?;
    Ok(grants)
}

pub(super) async fn record_jti(
    pool: &PgPool,
    j: &JtiRecord,
    now: OffsetDateTime,
) -> Result<(), StoreError> {
    // As in `insert_grants`: insert, or take over a record whose window has passed.
    let won = sqlx::query(
        "INSERT INTO used_jti (iss, jti, expires_at) VALUES ($1, $2, $3)
         ON CONFLICT (iss, jti) DO UPDATE SET expires_at = excluded.expires_at
         WHERE used_jti.expires_at <= $4
         RETURNING 1",
    )
    .bind(&j.iss)
    .bind(&j.jti)
    .bind(j.expires_at)
    .bind(now)
    .fetch_optional(pool)
    .await?;
    match won {
        Some(_) => Ok(()),
        None => Err(StoreError::Replayed),
    }
}

pub(super) async fn active_job_grants(
    pool: &PgPool,
    job: &JobMatch,
    limit: u32,
) -> Result<Vec<Grant>, StoreError> {
    let mut tx = pool.begin().await?;
    // `grants_active_job_idx` covers (repository_id, job ->> 'job_id') of active rows.
    let rows = sqlx::query(
        "SELECT * FROM grants
         WHERE status = 'active' AND repository_id = $1 AND (job ->> 'job_id') = $2
           AND issuer = ANY($3) AND (job ->> 'platform') = $4
           AND ($5::text IS NULL OR (job ->> 'run_id') = $5)
           AND ($6::text IS NULL OR (job ->> 'run_attempt') = $6)
         ORDER BY created_at, id LIMIT $7",
    )
    .bind(&job.repository_id)
    .bind(&job.job_id)
    .bind(&job.issuers)
    .bind(&job.platform)
    .bind(&job.run_id)
    .bind(&job.run_attempt)
    .bind(i64::from(limit))
    .fetch_all(&mut *tx)
    .await?;
    let grants = with_credentials(&mut tx, &rows, grant_from_row).await?;
    tx.commit().await?;
    Ok(grants)
}

pub(super) async fn record_delivery(
    pool: &PgPool,
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
             SET received_at = EXCLUDED.received_at, expires_at = EXCLUDED.expires_at
         WHERE webhook_deliveries.expires_at <= $3
         RETURNING 1",
    )
    .bind(source)
    .bind(id)
    .bind(now)
    .bind(expires_at)
    .fetch_optional(pool)
    .await?;
    match won {
        Some(_) => Ok(()),
        None => Err(StoreError::Replayed),
    }
}

pub(super) async fn forget_delivery(
    pool: &PgPool,
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
    pool: &PgPool,
    now: OffsetDateTime,
) -> Result<u64, StoreError> {
    let done = sqlx::query("DELETE FROM webhook_deliveries WHERE expires_at <= $1")
        .bind(now)
        .execute(pool)
        .await?;
    Ok(done.rows_affected())
}

pub(super) async fn purge_jti(pool: &PgPool, now: OffsetDateTime) -> Result<u64, StoreError> {
    let done = sqlx::query("DELETE FROM used_jti WHERE expires_at <= $1")
        .bind(now)
        .execute(pool)
        .await?;
    Ok(done.rows_affected())
}

pub(super) async fn stats(pool: &PgPool) -> Result<StoreStats, StoreError> {
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

pub(super) async fn gauges(pool: &PgPool, now: OffsetDateTime) -> Result<StoreGauges, StoreError> {
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
    let oldest_overdue: Option<OffsetDateTime> = sqlx::query_scalar(
        "SELECT min(expires_at) FROM grants
         WHERE status IN ('active', 'revoking') AND expires_at < $1",
    )
    .bind(now)
    .fetch_one(pool)
    .await?;
    Ok(StoreGauges {
        active_by_kind,
        oldest_overdue,
    })
}

/// The `WHERE` conditions of a revoke-all selection, after `status = 'active'`. Only the
/// given fields add a condition, so each selection gets a plan of its own instead of one generic
/// plan full of `$n IS NULL OR ...`.
fn push_select<'a>(q: &mut sqlx::QueryBuilder<'a, sqlx::Postgres>, select: &'a GrantSelect) {
    if let Some(v) = &select.issuer {
        q.push(" AND g.issuer = ").push_bind(v);
    }
    if let Some(v) = &select.repository {
        q.push(" AND g.repository = ").push_bind(v);
    }
    if let Some(v) = &select.repository_id {
        q.push(" AND g.repository_id = ").push_bind(v);
    }
    if let Some(t) = select.issued_after {
        q.push(" AND g.created_at >= ").push_bind(t);
    }
    if let Some(t) = select.issued_before {
        q.push(" AND g.created_at < ").push_bind(t);
    }
    if let Some(v) = &select.credential {
        q.push(
            " AND EXISTS (SELECT 1 FROM grant_credentials c WHERE c.grant_id = g.id AND c.name = ",
        )
        .push_bind(v)
        .push(")");
    }
    if let Some(v) = &select.kind {
        q.push(
            " AND EXISTS (SELECT 1 FROM grant_credentials c WHERE c.grant_id = g.id AND c.kind = ",
        )
        .push_bind(v)
        .push(")");
    }
}

pub(super) async fn active_grants_page(
    pool: &PgPool,
    select: &GrantSelect,
    after: Option<GrantCursor>,
    limit: u32,
) -> Result<Vec<Grant>, StoreError> {
    let mut q = sqlx::QueryBuilder::new("SELECT g.* FROM grants g WHERE g.status = 'active'");
    push_select(&mut q, select);
    if let Some(c) = after {
        // The plain bound lets the (status, created_at) index start at the cursor; the row
        // comparison breaks ties between grants created in the same microsecond.
        q.push(" AND g.created_at >= ")
            .push_bind(c.created_at)
            .push(" AND (g.created_at, g.id) > (")
            .push_bind(c.created_at)
            .push(", ")
            .push_bind(c.id)
            .push(")");
    }
    q.push(" ORDER BY g.created_at, g.id LIMIT ")
        .push_bind(i64::from(limit));
    let mut conn = pool.acquire().await?;
    let rows = q.build().fetch_all(&mut *conn).await?;
    with_credentials(&mut conn, &rows, grant_from_row).await
}

pub(super) async fn revoke_in_store(
    pool: &PgPool,
    now: OffsetDateTime,
    audits: &[AuditEvent],
) -> Result<Vec<Uuid>, StoreError> {
    let ids: Vec<Uuid> = audits.iter().filter_map(|a| a.grant_id).collect();
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let mut tx = pool.begin().await?;
    // Rows are locked in id order, so two concurrent revoke-alls over overlapping pages wait on
    // each other instead of deadlocking. `status = 'active'` is re-checked after any wait: a
    // grant the job's own revoke or the reaper claimed meanwhile is left to them.
    let moved: Vec<Uuid> = sqlx::query_scalar(
        "WITH picked AS (
             SELECT id FROM grants WHERE id = ANY($1) AND status = 'active'
             ORDER BY id FOR UPDATE)
         UPDATE grants g
         SET status = 'revoked', revoke_cause = 'requested', revoked_at = $2, lease_until = NULL
         FROM picked
         WHERE g.id = picked.id AND g.status = 'active'
         RETURNING g.id",
    )
    .bind(&ids)
    .bind(now)
    .fetch_all(&mut *tx)
    .await?;
    let moved_set: std::collections::HashSet<Uuid> = moved.iter().copied().collect();
    let events: Vec<&AuditEvent> = audits
        .iter()
        .filter(|a| a.grant_id.is_some_and(|g| moved_set.contains(&g)))
        .collect();
    insert_audits(&mut tx, &events).await?;
    tx.commit().await?;
    Ok(moved)
}

fn position_i32(position: usize) -> Result<i32, StoreError> {
    i32::try_from(position).map_err(|_| StoreError::Conflict("too many credentials".to_owned()))
}

async fn with_credentials_one(
    pool: &PgPool,
    row: Option<PgRow>,
) -> Result<Option<Grant>, StoreError> {
    let Some(row) = row else { return Ok(None) };
    let id: Uuid = row.try_get("id")?;
    let mut conn = pool.acquire().await?;
    let mut creds = load_credentials(&mut conn, &[id]).await?;
    Ok(Some(grant_from_row(
        &row,
        creds.remove(&id).unwrap_or_default(),
    )?))
}

/// Credentials of the given grants, each list in position order.
/// Build one value per `grants` row (a grant or a claimed grant) with its credentials, loaded
/// in one query.
async fn with_credentials<T>(
    conn: &mut PgConnection,
    rows: &[PgRow],
    build: impl Fn(&PgRow, Vec<IssuedCredential>) -> Result<T, StoreError>,
) -> Result<Vec<T>, StoreError> {
    let ids: Vec<Uuid> = rows
        .iter()
        .map(|r| r.try_get::<Uuid, _>("id"))
        .collect::<Result<_, _>>()?;
    let mut creds = load_credentials(conn, &ids).await?;
    rows.iter()
        .zip(&ids)
        .map(|(row, id)| build(row, creds.remove(id).unwrap_or_default()))
        .collect()
}

async fn load_credentials(
    conn: &mut PgConnection,
    ids: &[Uuid],
) -> Result<HashMap<Uuid, Vec<IssuedCredential>>, StoreError> {
    let mut out: HashMap<Uuid, Vec<IssuedCredential>> = HashMap::new();
    if ids.is_empty() {
        return Ok(out);
    }
    let rows = sqlx::query(
        "SELECT grant_id, name, kind, resource_id, details FROM grant_credentials
         WHERE grant_id = ANY($1) ORDER BY grant_id, position",
    )
    .bind(ids)
    .fetch_all(conn)
    .await?;
    for r in rows {
        let grant_id: Uuid = r.try_get("grant_id")?;
        let credential = IssuedCredential {
            name: r.try_get("name")?,
            kind: parse_kind(r.try_get("kind")?)?,
            resource_id: r.try_get("resource_id")?,
            details: r.try_get::<Json<serde_json::Value>, _>("details")?.0,
        };
        out.entry(grant_id).or_default().push(credential);
    }
    Ok(out)
}

fn grant_from_row(row: &PgRow, credentials: Vec<IssuedCredential>) -> Result<Grant, StoreError> {
    Ok(Grant {
        id: row.try_get("id")?,
        status: parse_status(row.try_get("status")?)?,
        issuer: row.try_get("issuer")?,
        subject: row.try_get("subject")?,
        repository: row.try_get("repository")?,
        repository_id: row.try_get("repository_id")?,
        job: row.try_get::<Json<serde_json::Value>, _>("job")?.0,
        bundle_digest: row.try_get("bundle_digest")?,
        created_at: row.try_get("created_at")?,
        expires_at: row.try_get("expires_at")?,
        revoked_at: row.try_get("revoked_at")?,
        revoke_attempts: row.try_get("revoke_attempts")?,
        last_error: row.try_get("last_error")?,
        credentials,
    })
}

fn claimed_from_row(
    row: &PgRow,
    credentials: Vec<IssuedCredential>,
) -> Result<ClaimedGrant, StoreError> {
    let grant = grant_from_row(row, credentials)?;
    if grant.status != GrantStatus::Revoking {
        return Err(corrupt("claimed grant"));
    }
    let cause: Option<String> = row.try_get("revoke_cause")?;
    let cause = parse_cause(cause.as_deref().unwrap_or_default())?;
    Ok(ClaimedGrant { grant, cause })
}

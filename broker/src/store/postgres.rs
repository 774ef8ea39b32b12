//! What only Postgres does: the pool (server-side statement, lock and idle timeouts), its
//! migrations, the set-based writes of the group writer (`group_commit.rs`: many grants in one
//! statement with `unnest` and data-modifying CTEs; an activation in one statement; audit events
//! chained in SQL), and the advisory lock of [`locked`]. Every other query is shared
//! (`grants.rs`, `audit_log.rs`, `records.rs`).

use super::chain;
use super::codec::{ACQUIRE_TIMEOUT, enum_text, migrate_err};
use super::{JtiRecord, NewGrant, StoreError};
use crate::audit::AuditEvent;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPoolOptions};
use sqlx::types::Json;
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
    .bind(column(&grants, |g| g.id))
    .bind(column(&grants, |g| g.issuer.as_str()))
    .bind(column(&grants, |g| g.subject.as_str()))
    .bind(column(&grants, |g| g.repository.as_deref()))
    .bind(column(&grants, |g| g.repository_id.as_deref()))
    .bind(column(&grants, |g| Json(&g.job)))
    .bind(column(&grants, |g| g.bundle_digest.as_str()))
    .bind(column(&grants, |g| g.revocation_hash.as_str()))
    .bind(column(&grants, |g| g.created_at))
    .bind(column(&grants, |g| g.expires_at))
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

/// Append events (with their canonical texts) to the chain in the given order, inside the
/// caller's transaction: one statement up to [`CHAIN_IN_SQL_MAX`] events, two beyond. Locking
/// the head row serialises appenders across replicas until this transaction ends, so `seq`
/// order is chain order (see `chain.rs`): the rows are inserted in hash-chain order
/// (`ORDER BY ord`), each taking the next `seq`. The canonical text is also what the `event`
/// column stores (parsed into jsonb by Postgres).
pub(super) async fn insert_audits(
    conn: &mut PgConnection,
    audits: &[&AuditEvent],
    canonical: Vec<String>,
) -> Result<(), StoreError> {
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
    let (prevs, hashes) = chain::links(head, &canonical);
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
    .bind(hashes.last())
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

/// One column of a set of grants, for an `unnest` parameter.
fn column<'g, T>(grants: &[&'g NewGrant], f: impl Fn(&'g NewGrant) -> T) -> Vec<T> {
    grants.iter().map(|g| f(g)).collect()
}

pub(super) fn position_i32(position: usize) -> Result<i32, StoreError> {
    i32::try_from(position).map_err(|_| StoreError::Conflict("too many credentials".to_owned()))
}

/// Run `work` holding the transaction-scoped advisory lock `key` (see `Store::locked`).
pub(super) async fn locked<T>(
    pool: &PgPool,
    key: &str,
    work: impl std::future::Future<Output = T>,
) -> Result<T, StoreError> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
        .bind(key)
        .execute(&mut *tx)
        .await?;
    let out = work.await;
    tx.commit().await?;
    Ok(out)
}

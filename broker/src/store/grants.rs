//! Grant queries written once for both backends: reads, claims, revocation transitions,
//! revoke-all pages, counts.
//!
//! Concurrency: every state change is one `UPDATE ... WHERE status = <expected>`, which
//! Postgres re-checks against the newest row version after waiting on a concurrent writer (READ
//! COMMITTED) and which SQLite runs under its single write lock, so two callers can never both
//! win one transition. The new grants and activations of a Postgres store are written
//! set-based by its group writer (`postgres.rs`, `group_commit.rs`); SQLite's by `sqlite.rs`.

use super::audit_log::{append, append_canonical};
use super::chain;
use super::codec::{corrupt, parse_cause, parse_kind, parse_status};
use super::db::{Arg, Backend, Conn, Dialect, Row, Sql};
use super::{
    ClaimedGrant, CredentialStatus, Grant, GrantCursor, GrantSelect, GrantStatus, JobMatch,
    JtiRecord, RevokeCause, SecretMatch, StoreError, StoreGauges, StoreStats,
};
use crate::audit::AuditEvent;
use crate::providers::{CredentialKind, IssuedCredential};
use std::collections::{HashMap, HashSet};
use time::OffsetDateTime;
use uuid::Uuid;

pub(super) async fn fail_grant(
    db: &Backend,
    id: Uuid,
    release_jti: Option<&JtiRecord>,
    audit: &AuditEvent,
) -> Result<(), StoreError> {
    let mut tx = db.begin().await?;
    let mut conn = tx.conn();
    // revoked_at records when the grant stopped being live, as for the other final states.
    let sql = Sql::new(
        "UPDATE grants SET status = 'failed', revoked_at = $2 WHERE id = $1 AND status = 'issuing'",
    );
    transition(&mut conn, sql.bind(id).bind(audit.time), "issuing").await?;
    if let Some(j) = release_jti {
        conn.execute(
            &Sql::new("DELETE FROM used_jti WHERE iss = $1 AND jti = $2")
                .bind(&j.iss)
                .bind(&j.jti),
        )
        .await?;
    }
    append(&mut conn, &[audit]).await?;
    tx.commit().await
}

pub(super) async fn grant(db: &Backend, id: Uuid) -> Result<Option<Grant>, StoreError> {
    one_grant(db, Sql::new("SELECT * FROM grants WHERE id = $1").bind(id)).await
}

pub(super) async fn grant_by_revocation_hash(
    db: &Backend,
    hash: &str,
) -> Result<Option<Grant>, StoreError> {
    one_grant(
        db,
        Sql::new("SELECT * FROM grants WHERE revocation_hash = $1").bind(hash),
    )
    .await
}

async fn one_grant(db: &Backend, sql: Sql<'_>) -> Result<Option<Grant>, StoreError> {
    let mut pooled = db.acquire().await?;
    one_with_credentials(&mut pooled.conn(), &sql, grant_from_row).await
}

/// The row `sql` returns, if any, built with its credentials.
async fn one_with_credentials<T>(
    conn: &mut Conn<'_>,
    sql: &Sql<'_>,
    build: impl Fn(&Row, Vec<IssuedCredential>) -> Result<T, StoreError>,
) -> Result<Option<T>, StoreError> {
    let rows: Vec<Row> = conn.fetch_optional(sql).await?.into_iter().collect();
    Ok(with_credentials(conn, &rows, build).await?.pop())
}

/// The id and status of the grant a revocation token belongs to (one indexed row, no
/// credentials).
pub(super) async fn grant_status_by_revocation_hash(
    db: &Backend,
    hash: &str,
) -> Result<Option<(Uuid, GrantStatus)>, StoreError> {
    let mut pooled = db.acquire().await?;
    let row = pooled
        .conn()
        .fetch_optional(
            &Sql::new("SELECT id, status FROM grants WHERE revocation_hash = $1").bind(hash),
        )
        .await?;
    row.map(|r| Ok((r.uuid("id")?, parse_status(&r.get::<String>("status")?)?)))
        .transpose()
}

pub(super) async fn credential_status(
    db: &Backend,
    kind: CredentialKind,
    resource_id: &str,
) -> Result<Option<CredentialStatus>, StoreError> {
    let mut pooled = db.acquire().await?;
    let row = pooled
        .conn()
        .fetch_optional(
            &Sql::new(
                "SELECT g.id, g.status, g.expires_at
                 FROM grant_credentials c JOIN grants g ON g.id = c.grant_id
                 WHERE c.kind = $1 AND c.resource_id = $2",
            )
            .bind(kind.as_str())
            .bind(resource_id),
        )
        .await?;
    row.map(|r| {
        Ok(CredentialStatus {
            grant_id: r.uuid("id")?,
            grant_status: parse_status(&r.get::<String>("status")?)?,
            expires_at: r.time("expires_at")?,
        })
    })
    .transpose()
}

/// The credential whose details hold this secret hash, and its grant. The comparison is
/// written as `json_field` writes it, the expression `grant_credentials_secret_sha256_idx`
/// indexes.
pub(super) async fn credential_by_secret_hash(
    db: &Backend,
    hash: &str,
) -> Result<Option<SecretMatch>, StoreError> {
    let d = db.dialect();
    let mut pooled = db.acquire().await?;
    let row = pooled
        .conn()
        .fetch_optional(
            &Sql::new(format!(
                "SELECT g.id, g.status, g.expires_at, g.created_at, c.name, c.kind, c.resource_id,
                        {} AS details
                 FROM grant_credentials c JOIN grants g ON g.id = c.grant_id
                 WHERE {} = $1",
                d.json_text("c.details"),
                d.json_field("c.details", crate::providers::SECRET_HASH_KEY),
            ))
            .bind(hash),
        )
        .await?;
    row.map(|r| {
        let details: String = r.get("details")?;
        Ok(SecretMatch {
            grant_id: r.uuid("id")?,
            grant_status: parse_status(&r.get::<String>("status")?)?,
            expires_at: r.time("expires_at")?,
            created_at: r.time("created_at")?,
            credential: IssuedCredential {
                name: r.get("name")?,
                kind: parse_kind(&r.get::<String>("kind")?)?,
                resource_id: r.get("resource_id")?,
                details: serde_json::from_str(&details)
                    .map_err(|_| corrupt("credential details"))?,
            },
        })
    })
    .transpose()
}

/// See `Store::revoked_resource_ids`. (Uses the `(status, expires_at)` index.)
pub(super) async fn revoked_resource_ids(
    db: &Backend,
    kind: CredentialKind,
    live_after: OffsetDateTime,
) -> Result<Vec<String>, StoreError> {
    let mut pooled = db.acquire().await?;
    let rows = pooled
        .conn()
        .fetch_all(
            &Sql::new(
                "SELECT c.resource_id
                 FROM grants g JOIN grant_credentials c ON c.grant_id = g.id
                 WHERE g.status IN ('revoking', 'revoked', 'failed', 'expired')
                   AND g.expires_at > $1 AND c.kind = $2
                 ORDER BY c.resource_id",
            )
            .bind(live_after)
            .bind(kind.as_str()),
        )
        .await?;
    rows.iter()
        .map(|r| r.get::<String>("resource_id"))
        .collect()
}

/// `active` | `issuing` | `revoking` (lease over) → `revoking` with a lease.
///
/// One statement in its own implicit transaction. On Postgres it is committed without waiting
/// for its WAL flush (`set_config(…, true)` turns `synchronous_commit` off for this transaction
/// only): the claim must be visible to every other session at once, which is all the lease
/// needs, and nothing depends on it surviving a crash of the store: if it is lost, the grant is
/// `active` again and the revoke is simply repeated (by the caller's retry or the reaper), which
/// is idempotent; and the revoke's outcome (`finish_revoke`) is committed durably after it,
/// which flushes the claim too (the WAL is written in order). A revoking grant keeps the cause
/// recorded when it was first claimed; `status` in SET is the value before this update.
pub(super) async fn claim_for_revoke(
    db: &Backend,
    id: Uuid,
    now: OffsetDateTime,
    lease_until: OffsetDateTime,
) -> Result<Option<ClaimedGrant>, StoreError> {
    let mut pooled = db.acquire().await?;
    let mut conn = pooled.conn();
    let async_commit = match conn.dialect() {
        Dialect::Postgres => {
            " FROM (SELECT set_config('synchronous_commit', 'off', true)) AS async_commit"
        }
        Dialect::Sqlite => "",
    };
    let sql = Sql::new(format!(
        "UPDATE grants
         SET revoke_cause = CASE WHEN status = 'revoking'
                                 THEN COALESCE(revoke_cause, 'requested')
                                 ELSE 'requested' END,
             status = 'revoking',
             lease_until = $3{async_commit}
         WHERE id = $1
           AND (status IN ('active', 'issuing')
                OR (status = 'revoking' AND (lease_until IS NULL OR lease_until <= $2)))
         RETURNING *"
    ))
    .bind(id)
    .bind(now)
    .bind(lease_until);
    // The credentials are read after the claim committed, as a transaction would have read them
    // before: a grant's credential rows change only with its status (activation), which the
    // claim has taken away.
    one_with_credentials(&mut conn, &sql, claimed_from_row).await
}

pub(super) async fn claim_due(
    db: &Backend,
    now: OffsetDateTime,
    stale_issuing_before: OffsetDateTime,
    lease_until: OffsetDateTime,
    limit: u32,
) -> Result<Vec<ClaimedGrant>, StoreError> {
    let mut tx = db.begin().await?;
    let mut conn = tx.conn();
    // Postgres: SKIP LOCKED leaves rows another replica is claiming right now to it instead of
    // waiting on them, and re-checks the WHERE against the newest row version, so a row changed
    // by a transaction that committed meanwhile is only taken if it is still due. SQLite: the
    // write lock, held from the candidate query to the commit, keeps every other claimer out.
    let skip_locked = conn.dialect().for_update_skip_locked();
    let sql = Sql::new(format!(
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
             LIMIT $4{skip_locked})
           AND status IN ('active', 'issuing', 'revoking')
         RETURNING *"
    ))
    .bind(now)
    .bind(stale_issuing_before)
    .bind(lease_until)
    .bind(i64::from(limit));
    let rows = conn.fetch_all(&sql).await?;
    let claimed = with_credentials(&mut conn, &rows, claimed_from_row).await?;
    tx.commit().await?;
    Ok(claimed)
}

/// `revoking` → the cause's final status, inside the caller's transaction (`Conflict`, nothing
/// written, if the grant is not `revoking`).
pub(super) async fn finish_rows(
    conn: &mut Conn<'_>,
    id: Uuid,
    cause: RevokeCause,
    now: OffsetDateTime,
) -> Result<(), StoreError> {
    let sql = Sql::new(
        "UPDATE grants SET status = $2, revoked_at = $3, lease_until = NULL
         WHERE id = $1 AND status = 'revoking'",
    );
    let sql = sql.bind(id).bind(cause.final_status().as_str()).bind(now);
    transition(conn, sql, "revoking").await
}

/// Run a compare-and-set transition (an `UPDATE` of one grant whose `WHERE` names the status it
/// leaves): `Conflict`, nothing written, unless the grant was in status `from`.
pub(super) async fn transition(
    conn: &mut Conn<'_>,
    sql: Sql<'_>,
    from: &str,
) -> Result<(), StoreError> {
    if conn.execute(&sql).await? != 1 {
        return Err(StoreError::Conflict(format!("grant is not {from}")));
    }
    Ok(())
}

/// [`finish_rows`] and the audit event in one transaction (SQLite; Postgres batches finishes in
/// its group writer).
pub(super) async fn finish_revoke(
    db: &Backend,
    id: Uuid,
    cause: RevokeCause,
    now: OffsetDateTime,
    audit: &AuditEvent,
) -> Result<(), StoreError> {
    let mut tx = db.begin().await?;
    let mut conn = tx.conn();
    finish_rows(&mut conn, id, cause, now).await?;
    append(&mut conn, &[audit]).await?;
    tx.commit().await
}

pub(super) async fn revoke_failed(
    db: &Backend,
    id: Uuid,
    error: &str,
    retry_at: OffsetDateTime,
    audit: &AuditEvent,
) -> Result<(), StoreError> {
    let mut tx = db.begin().await?;
    let mut conn = tx.conn();
    let sql = Sql::new(
        "UPDATE grants
         SET revoke_attempts = revoke_attempts + 1, last_error = $2, lease_until = $3
         WHERE id = $1 AND status = 'revoking'",
    );
    transition(
        &mut conn,
        sql.bind(id).bind(error).bind(retry_at),
        "revoking",
    )
    .await?;
    append(&mut conn, &[audit]).await?;
    tx.commit().await
}

pub(super) async fn active_grants(db: &Backend, limit: u32) -> Result<Vec<Grant>, StoreError> {
    grants_where(
        db,
        Sql::new("SELECT * FROM grants WHERE status = 'active' ORDER BY created_at, id LIMIT $1")
            .bind(i64::from(limit)),
    )
    .await
}

/// The grants a query selects (`SELECT *` from `grants`), with their credentials: two queries.
async fn grants_where(db: &Backend, sql: Sql<'_>) -> Result<Vec<Grant>, StoreError> {
    let mut pooled = db.acquire().await?;
    let mut conn = pooled.conn();
    let rows = conn.fetch_all(&sql).await?;
    with_credentials(&mut conn, &rows, grant_from_row).await
}

pub(super) async fn active_job_grants(
    db: &Backend,
    job: &JobMatch,
    limit: u32,
) -> Result<Vec<Grant>, StoreError> {
    let d = db.dialect();
    let f = |key| d.json_field("job", key);
    // `grants_active_job_idx` covers (repository_id, job's job_id) of active rows.
    let mut sql = Sql::new(format!(
        "SELECT * FROM grants
         WHERE status = 'active' AND repository_id = $1 AND {} = $2
           AND {}
           AND {} = $4",
        f("job_id"),
        d.in_list("issuer", 3),
        f("platform"),
    ))
    .bind(&job.repository_id)
    .bind(&job.job_id)
    .bind(Arg::TextList(&job.issuers))
    .bind(&job.platform);
    if let Some(v) = &job.run_id {
        sql.push(&format!(" AND {} = ", f("run_id"))).push_bind(v);
    }
    if let Some(v) = &job.run_attempt {
        sql.push(&format!(" AND {} = ", f("run_attempt")))
            .push_bind(v);
    }
    sql.push(" ORDER BY created_at, id LIMIT ")
        .push_bind(i64::from(limit));
    grants_where(db, sql).await
}

/// The `WHERE` conditions of a revoke-all selection, after `status = 'active'`. Only the
/// given fields add a condition, so each selection gets a plan of its own instead of one generic
/// plan full of `$n IS NULL OR ...`.
fn push_select<'a>(q: &mut Sql<'a>, select: &'a GrantSelect) {
    q.and_eq("g.issuer", &select.issuer)
        .and_eq("g.repository", &select.repository)
        .and_eq("g.repository_id", &select.repository_id)
        .and_within("g.created_at", select.issued_after, select.issued_before);
    for (col, v) in [("name", &select.credential), ("kind", &select.kind)] {
        if let Some(v) = v {
            q.push(&format!(
                " AND EXISTS (SELECT 1 FROM grant_credentials c WHERE c.grant_id = g.id AND c.{col} = "
            ))
            .push_bind(v)
            .push(")");
        }
    }
}

pub(super) async fn active_grants_page(
    db: &Backend,
    select: &GrantSelect,
    after: Option<GrantCursor>,
    limit: u32,
) -> Result<Vec<Grant>, StoreError> {
    let mut q = Sql::new("SELECT g.* FROM grants g WHERE g.status = 'active'");
    push_select(&mut q, select);
    if let Some(c) = after {
        // The plain bound lets the (status, created_at) index start at the cursor; the row
        // comparison breaks ties between grants created in the same instant.
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
    grants_where(db, q).await
}

/// See `Store::revoke_in_store`.
pub(super) async fn revoke_in_store(
    db: &Backend,
    now: OffsetDateTime,
    audits: &[AuditEvent],
) -> Result<Vec<Uuid>, StoreError> {
    let ids: Vec<Uuid> = audits.iter().filter_map(|a| a.grant_id).collect();
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let mut tx = db.begin().await?;
    let mut conn = tx.conn();
    let d = conn.dialect();
    // Postgres locks the rows in id order, so two concurrent revoke-alls over overlapping pages
    // wait on each other instead of deadlocking. `status = 'active'` is re-checked after any
    // wait: a grant the job's own revoke or the reaper claimed meanwhile is left to them.
    let sql = Sql::new(format!(
        "UPDATE grants
         SET status = 'revoked', revoke_cause = 'requested', revoked_at = $2, lease_until = NULL
         WHERE id IN (SELECT id FROM grants WHERE {} AND status = 'active' ORDER BY id{})
           AND status = 'active'
         RETURNING id",
        d.in_list("id", 1),
        d.for_update(),
    ))
    .bind(Arg::IdList(&ids))
    .bind(now);
    // The events' canonical texts (what the chain hashes and the rows store) are built while the
    // database runs the update: the broker's share of a page overlaps the database's.
    let (rows, canonical) = futures::join!(conn.fetch_all(&sql), async {
        audits
            .iter()
            .map(chain::canonical_event)
            .collect::<Result<Vec<_>, _>>()
    });
    let (rows, canonical) = (rows?, canonical?);
    let moved = rows
        .iter()
        .map(|r| r.uuid("id"))
        .collect::<Result<Vec<_>, _>>()?;
    let moved_set: HashSet<Uuid> = moved.iter().copied().collect();
    let (events, canonical): (Vec<&AuditEvent>, Vec<String>) = audits
        .iter()
        .zip(canonical)
        .filter(|(a, _)| a.grant_id.is_some_and(|g| moved_set.contains(&g)))
        .unzip();
    append_canonical(&mut conn, &events, canonical).await?;
    tx.commit().await?;
    Ok(moved)
}

pub(super) async fn stats(db: &Backend) -> Result<StoreStats, StoreError> {
    let mut pooled = db.acquire().await?;
    let row = pooled
        .conn()
        .fetch_one(&Sql::new(
            "SELECT count(CASE WHEN status = 'active' THEN 1 END) AS active,
                count(CASE WHEN status = 'issuing' THEN 1 END) AS issuing,
                count(CASE WHEN status = 'revoking' AND revoke_attempts > 0 THEN 1 END) AS failing
             FROM grants WHERE status IN ('active', 'issuing', 'revoking')",
        ))
        .await?;
    Ok(StoreStats {
        active_grants: row.get("active")?,
        issuing_grants: row.get("issuing")?,
        revoke_failures_pending: row.get("failing")?,
    })
}

pub(super) async fn gauges(db: &Backend, now: OffsetDateTime) -> Result<StoreGauges, StoreError> {
    let mut pooled = db.acquire().await?;
    let mut conn = pooled.conn();
    let rows = conn
        .fetch_all(&Sql::new(
            "SELECT c.kind, count(DISTINCT g.id) AS n
             FROM grants g JOIN grant_credentials c ON c.grant_id = g.id
             WHERE g.status = 'active' GROUP BY c.kind ORDER BY c.kind",
        ))
        .await?;
    let active_by_kind = rows
        .iter()
        .map(|r| Ok((r.get("kind")?, r.get("n")?)))
        .collect::<Result<Vec<_>, StoreError>>()?;
    let oldest = conn
        .fetch_one(
            &Sql::new(
                "SELECT min(expires_at) AS oldest FROM grants
                 WHERE status IN ('active', 'revoking') AND expires_at < $1",
            )
            .bind(now),
        )
        .await?;
    Ok(StoreGauges {
        active_by_kind,
        oldest_overdue: oldest.opt_time("oldest")?,
    })
}

/// Build one value per `grants` row (a grant or a claimed grant) with its credentials, loaded
/// in one query.
async fn with_credentials<T>(
    conn: &mut Conn<'_>,
    rows: &[Row],
    build: impl Fn(&Row, Vec<IssuedCredential>) -> Result<T, StoreError>,
) -> Result<Vec<T>, StoreError> {
    let ids: Vec<Uuid> = rows
        .iter()
        .map(|r| r.uuid("id"))
        .collect::<Result<_, _>>()?;
    let mut creds = load_credentials(conn, &ids).await?;
    rows.iter()
        .zip(&ids)
        .map(|(row, id)| build(row, creds.remove(id).unwrap_or_default()))
        .collect()
}

/// Credentials of the given grants, each list in position order.
async fn load_credentials(
    conn: &mut Conn<'_>,
    ids: &[Uuid],
) -> Result<HashMap<Uuid, Vec<IssuedCredential>>, StoreError> {
    let mut out: HashMap<Uuid, Vec<IssuedCredential>> = HashMap::with_capacity(ids.len());
    if ids.is_empty() {
        return Ok(out);
    }
    let sql = Sql::new(format!(
        "SELECT grant_id, name, kind, resource_id, details FROM grant_credentials
         WHERE {} ORDER BY grant_id, position",
        conn.dialect().in_list("grant_id", 1)
    ))
    .bind(Arg::IdList(ids));
    for r in conn.fetch_all(&sql).await? {
        let credential = IssuedCredential {
            name: r.get("name")?,
            kind: parse_kind(&r.get::<String>("kind")?)?,
            resource_id: r.get("resource_id")?,
            details: r.json("details")?,
        };
        out.entry(r.uuid("grant_id")?).or_default().push(credential);
    }
    Ok(out)
}

fn grant_from_row(row: &Row, credentials: Vec<IssuedCredential>) -> Result<Grant, StoreError> {
    Ok(Grant {
        id: row.uuid("id")?,
        status: parse_status(&row.get::<String>("status")?)?,
        issuer: row.get("issuer")?,
        subject: row.get("subject")?,
        repository: row.get("repository")?,
        repository_id: row.get("repository_id")?,
        job: row.json("job")?,
        bundle_digest: row.get("bundle_digest")?,
        created_at: row.time("created_at")?,
        expires_at: row.time("expires_at")?,
        revoked_at: row.opt_time("revoked_at")?,
        revoke_attempts: row.get("revoke_attempts")?,
        last_error: row.get("last_error")?,
        credentials,
    })
}

fn claimed_from_row(
    row: &Row,
    credentials: Vec<IssuedCredential>,
) -> Result<ClaimedGrant, StoreError> {
    let grant = grant_from_row(row, credentials)?;
    if grant.status != GrantStatus::Revoking {
        return Err(corrupt("claimed grant"));
    }
    let cause: Option<String> = row.get("revoke_cause")?;
    let cause = parse_cause(cause.as_deref().unwrap_or_default())?;
    Ok(ClaimedGrant { grant, cause })
}

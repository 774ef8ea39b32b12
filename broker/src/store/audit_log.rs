//! The audit log, written once for both backends: appending to the hash chain, reading events
//! back, the rows a chain walk reads, checkpoints and pruning, and the freeze (whose changes
//! are audited in the same transaction).
//!
//! Appenders hold the chain head while they append (Postgres: the head row locked until
//! commit; SQLite: the single write lock of the `BEGIN IMMEDIATE` transaction they run in), so
//! `seq` order is chain order (see `chain.rs`).

use super::chain::{self, ChainHead, ChainRow};
use super::codec::{corrupt, enum_text};
use super::db::{Arg, Backend, Conn, Dialect, Row, Sql};
use super::postgres;
use super::{
    AuditFilter, AuditRecord, ChainAnchor, Checkpoint, CheckpointKind, FreezeRecord, StoreError,
};
use crate::audit::AuditEvent;
use time::OffsetDateTime;

/// Append events to the chain in the given order, inside the caller's transaction.
pub(super) async fn append(conn: &mut Conn<'_>, audits: &[&AuditEvent]) -> Result<(), StoreError> {
    if audits.is_empty() {
        return Ok(());
    }
    // Everything but the link hashes is computed before the head is held. The canonical text
    // is also what the `event` column stores: the same JSON, so each event is serialised once.
    let canonical = audits
        .iter()
        .map(|a| chain::canonical_event(a))
        .collect::<Result<Vec<_>, _>>()?;
    append_canonical(conn, audits, canonical).await
}

/// [`append`] with each event's canonical text already built (`chain::canonical_event`).
pub(super) async fn append_canonical(
    conn: &mut Conn<'_>,
    audits: &[&AuditEvent],
    canonical: Vec<String>,
) -> Result<(), StoreError> {
    if audits.is_empty() {
        return Ok(());
    }
    if let Conn::Pg(c) = conn {
        // Set-based: one or two statements whatever the batch size.
        return postgres::insert_audits(c, audits, canonical).await;
    }
    let head: String = conn
        .fetch_one(&Sql::new(format!(
            "SELECT hash FROM audit_chain_head WHERE id = 1{}",
            conn.dialect().for_update()
        )))
        .await?
        .get("hash")?;
    let (prevs, hashes) = chain::links(head, &canonical);
    let mut seq = 0;
    for (((a, canon), prev), hash) in audits.iter().zip(&canonical).zip(&prevs).zip(&hashes) {
        let sql = Sql::new(
            "INSERT INTO audit_events (id, time, action, outcome, reason, grant_id, request_id,
                                       repository, repository_id, actor, event, prev_hash, hash)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
             RETURNING seq",
        )
        .bind(a.id)
        .bind(a.time)
        .bind(enum_text(&a.action)?)
        .bind(enum_text(&a.outcome)?)
        .bind(&a.reason)
        .bind(a.grant_id)
        .bind(&a.request_id)
        .bind(&a.job.repository)
        .bind(&a.job.repository_id)
        .bind(&a.actor)
        .bind(canon.as_str())
        .bind(prev.as_str())
        .bind(hash.as_str());
        seq = conn.fetch_one(&sql).await?.get("seq")?;
    }
    let last = hashes.last().map(String::as_str);
    conn.execute(
        &Sql::new("UPDATE audit_chain_head SET seq = $1, hash = $2 WHERE id = 1")
            .bind(seq)
            .bind(last),
    )
    .await?;
    Ok(())
}

/// Append events on their own, in one transaction.
pub(super) async fn append_audit(db: &Backend, audit: &AuditEvent) -> Result<(), StoreError> {
    let mut tx = db.begin().await?;
    append(&mut tx.conn(), &[audit]).await?;
    tx.commit().await
}

pub(super) async fn audit_records(
    db: &Backend,
    filter: &AuditFilter,
    limit: i64,
) -> Result<Vec<AuditRecord>, StoreError> {
    let d = db.dialect();
    // Only the given filters add a condition. The cursor compares (time, seq) with the cursor
    // row's, matching the ORDER BY, so pages neither overlap nor skip events that share a time.
    let mut q = Sql::new("SELECT seq, event FROM audit_events WHERE 1 = 1");
    if let Some(g) = filter.grant_id {
        q.push(" AND grant_id = ").push_bind(g);
    }
    q.and_eq("request_id", &filter.request_id)
        .and_eq("repository", &filter.repository)
        .and_eq("outcome", &filter.outcome)
        .and_eq("reason", &filter.reason)
        .and_eq("repository_id", &filter.repository_id)
        .and_eq("actor", &filter.actor)
        .and_within("time", filter.since, filter.until);
    if let Some(v) = filter.verified {
        // A JSON boolean, read back as each backend spells it (no bound value needed).
        q.push(match (d, v) {
            (Dialect::Postgres, true) => " AND (event ->> 'verified') = 'true'",
            (Dialect::Postgres, false) => " AND (event ->> 'verified') = 'false'",
            (Dialect::Sqlite, true) => " AND json_type(event, '$.verified') = 'true'",
            (Dialect::Sqlite, false) => " AND json_type(event, '$.verified') = 'false'",
        });
    }
    if let Some(name) = &filter.credential {
        let n = q.next_param();
        q.push(&match d {
            Dialect::Postgres => format!(
                " AND (event->'credentials_requested' @> jsonb_build_array(${n}::text)
                       OR event->'credentials_granted' @> jsonb_build_array(${n}::text))"
            ),
            Dialect::Sqlite => format!(
                " AND (EXISTS (SELECT 1 FROM json_each(event, '$.credentials_requested') j
                               WHERE j.value = ${n})
                       OR EXISTS (SELECT 1 FROM json_each(event, '$.credentials_granted') j
                                  WHERE j.value = ${n}))"
            ),
        });
        q = q.bind(name);
    }
    if let Some(kind) = &filter.kind {
        q.push(" AND grant_id IN (SELECT grant_id FROM grant_credentials WHERE kind = ")
            .push_bind(kind)
            .push(")");
    }
    if let Some(c) = filter.cursor {
        q.push(" AND (time, seq) < (SELECT c.time, c.seq FROM audit_events c WHERE c.seq = ")
            .push_bind(c)
            .push(")");
    }
    q.push(" ORDER BY time DESC, seq DESC LIMIT ")
        .push_bind(limit);
    let mut pooled = db.acquire().await?;
    let rows = pooled.conn().fetch_all(&q).await?;
    rows.iter()
        .map(|r| {
            Ok(AuditRecord {
                seq: r.get("seq")?,
                event: r.json("event").map_err(|_| corrupt("audit event"))?,
            })
        })
        .collect()
}

pub(super) async fn chain_head(db: &Backend) -> Result<ChainHead, StoreError> {
    let mut pooled = db.acquire().await?;
    let row = pooled
        .conn()
        .fetch_optional(&Sql::new(
            "SELECT seq, hash, legacy_max_seq FROM audit_chain_head WHERE id = 1",
        ))
        .await?
        .ok_or_else(|| corrupt("audit chain head"))?;
    Ok(ChainHead {
        seq: row.get("seq")?,
        hash: row.get("hash")?,
        legacy_max_seq: row.get("legacy_max_seq")?,
    })
}

pub(super) async fn chain_page(
    db: &Backend,
    after_seq: i64,
    limit: u32,
) -> Result<Vec<ChainRow>, StoreError> {
    let sql = Sql::new(format!(
        "SELECT seq, id, time, action, outcome, reason, grant_id, request_id, repository,
                repository_id, actor, {} AS event, prev_hash, hash
         FROM audit_events WHERE seq > $1 ORDER BY seq LIMIT $2",
        db.dialect().json_text("event")
    ))
    .bind(after_seq)
    .bind(i64::from(limit));
    let mut pooled = db.acquire().await?;
    let rows = pooled.conn().fetch_all(&sql).await?;
    rows.iter()
        .map(|r| {
            Ok(ChainRow {
                seq: r.get("seq")?,
                id: r.uuid_text("id")?,
                time: r.time("time")?,
                action: r.get("action")?,
                outcome: r.get("outcome")?,
                reason: r.get("reason")?,
                grant_id: r.opt_uuid_text("grant_id")?,
                request_id: r.get("request_id")?,
                repository: r.get("repository")?,
                repository_id: r.get("repository_id")?,
                actor: r.get("actor")?,
                event: r.get("event")?,
                prev_hash: r.get("prev_hash")?,
                hash: r.get("hash")?,
            })
        })
        .collect()
}

/// The event holding chain hash `hash`: its `seq` and id.
pub(super) async fn event_with_hash(
    db: &Backend,
    hash: &str,
) -> Result<Option<(i64, String)>, StoreError> {
    let mut pooled = db.acquire().await?;
    let row = pooled
        .conn()
        .fetch_optional(&Sql::new("SELECT seq, id FROM audit_events WHERE hash = $1").bind(hash))
        .await?;
    row.map(|r| Ok((r.get("seq")?, r.uuid_text("id")?)))
        .transpose()
}

const CHECKPOINT_COLUMNS: &str =
    "kind, created_at, seq, hash, event_count, last_event_id, last_event_time";

fn checkpoint_from_row(r: &Row) -> Result<Checkpoint, StoreError> {
    let kind = match r.get::<String>("kind")?.as_str() {
        "export" => CheckpointKind::Export,
        "prune" => CheckpointKind::Prune,
        _ => return Err(corrupt("audit checkpoint kind")),
    };
    Ok(Checkpoint {
        kind,
        created_at: r.time("created_at")?,
        seq: r.get("seq")?,
        hash: r.get("hash")?,
        event_count: u64::try_from(r.get::<i64>("event_count")?)
            .map_err(|_| corrupt("audit checkpoint count"))?,
        last_event_id: r.opt_uuid("last_event_id")?,
        last_event_time: r.opt_time("last_event_time")?,
    })
}

async fn last_prune(conn: &mut Conn<'_>) -> Result<Option<Checkpoint>, StoreError> {
    let row = conn
        .fetch_optional(&Sql::new(format!(
            "SELECT {CHECKPOINT_COLUMNS}
             FROM audit_checkpoints WHERE kind = 'prune' ORDER BY seq DESC LIMIT 1"
        )))
        .await?;
    row.as_ref().map(checkpoint_from_row).transpose()
}

pub(super) async fn last_prune_checkpoint(db: &Backend) -> Result<Option<Checkpoint>, StoreError> {
    let mut pooled = db.acquire().await?;
    last_prune(&mut pooled.conn()).await
}

pub(super) async fn checkpoint_recorded(
    db: &Backend,
    anchor: &ChainAnchor,
) -> Result<bool, StoreError> {
    let mut pooled = db.acquire().await?;
    let found = pooled
        .conn()
        .fetch_optional(
            &Sql::new(
                "SELECT 1 FROM audit_checkpoints
                 WHERE seq = $1 AND hash = $2 AND event_count = $3 LIMIT 1",
            )
            .bind(anchor.seq)
            .bind(&anchor.hash)
            .bind(count_i64(anchor.count)?),
        )
        .await?;
    Ok(found.is_some())
}

pub(super) async fn checkpoints(db: &Backend, limit: u32) -> Result<Vec<Checkpoint>, StoreError> {
    let mut pooled = db.acquire().await?;
    let rows = pooled
        .conn()
        .fetch_all(
            &Sql::new(format!(
                "SELECT {CHECKPOINT_COLUMNS} FROM audit_checkpoints ORDER BY id LIMIT $1"
            ))
            .bind(i64::from(limit)),
        )
        .await?;
    rows.iter().map(checkpoint_from_row).collect()
}

/// The newest checkpoint of `kind`, if any.
pub(super) async fn newest_checkpoint(
    db: &Backend,
    kind: CheckpointKind,
) -> Result<Option<Checkpoint>, StoreError> {
    let mut pooled = db.acquire().await?;
    let row = pooled
        .conn()
        .fetch_optional(
            &Sql::new(format!(
                "SELECT {CHECKPOINT_COLUMNS} FROM audit_checkpoints WHERE kind = $1
                 ORDER BY id DESC LIMIT 1"
            ))
            .bind(kind.as_str()),
        )
        .await?;
    row.as_ref().map(checkpoint_from_row).transpose()
}

fn count_i64(n: u64) -> Result<i64, StoreError> {
    i64::try_from(n).map_err(|_| StoreError::Conflict("event count out of range".to_owned()))
}

/// Chained events after the cut `base` up to and including `through`.
async fn count_chained(
    conn: &mut Conn<'_>,
    base: Option<&Checkpoint>,
    through: i64,
) -> Result<u64, StoreError> {
    let n: i64 = conn
        .fetch_one(
            &Sql::new(
                "SELECT count(*) AS n FROM audit_events
                 WHERE seq > $1 AND seq <= $2 AND hash IS NOT NULL",
            )
            .bind(base.map_or(0, |b| b.seq))
            .bind(through),
        )
        .await?
        .get("n")?;
    Ok(base.map_or(0, |b| b.event_count) + u64::try_from(n).unwrap_or(0))
}

async fn insert_checkpoint(
    conn: &mut Conn<'_>,
    cp: &Checkpoint,
    pruned_before: Option<OffsetDateTime>,
) -> Result<(), StoreError> {
    conn.execute(
        &Sql::new(format!(
            "INSERT INTO audit_checkpoints ({CHECKPOINT_COLUMNS}, pruned_before)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
        ))
        .bind(cp.kind.as_str())
        .bind(cp.created_at)
        .bind(cp.seq)
        .bind(&cp.hash)
        .bind(count_i64(cp.event_count)?)
        .bind(cp.last_event_id)
        .bind(cp.last_event_time)
        .bind(pruned_before),
    )
    .await?;
    Ok(())
}

/// Lock the chain head (keeps appenders out until the transaction ends) and read it.
async fn hold_head(conn: &mut Conn<'_>) -> Result<(i64, String), StoreError> {
    let sql = Sql::new(format!(
        "SELECT seq, hash FROM audit_chain_head WHERE id = 1{}",
        conn.dialect().for_update()
    ));
    let row = conn
        .fetch_optional(&sql)
        .await?
        .ok_or_else(|| corrupt("audit chain head"))?;
    Ok((row.get("seq")?, row.get("hash")?))
}

pub(super) async fn record_checkpoint(
    db: &Backend,
    now: OffsetDateTime,
) -> Result<Checkpoint, StoreError> {
    let mut tx = db.begin().await?;
    let mut conn = tx.conn();
    // Holding the head keeps appenders out while counting, so count, seq and hash agree.
    let (seq, hash) = hold_head(&mut conn).await?;
    let base = last_prune(&mut conn).await?;
    let event_count = count_chained(&mut conn, base.as_ref(), seq).await?;
    let last = conn
        .fetch_optional(&Sql::new("SELECT id, time FROM audit_events WHERE seq = $1").bind(seq))
        .await?;
    let (last_event_id, last_event_time) = match (&last, &base) {
        (Some(r), _) => (Some(r.uuid("id")?), Some(r.time("time")?)),
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
    insert_checkpoint(&mut conn, &cp, None).await?;
    tx.commit().await?;
    Ok(cp)
}

/// The last event of the longest prefix (in chain order) whose events are all older than
/// `before`.
pub(super) async fn prune_target(
    db: &Backend,
    before: OffsetDateTime,
) -> Result<Option<i64>, StoreError> {
    let mut pooled = db.acquire().await?;
    let row = pooled
        .conn()
        .fetch_one(
            &Sql::new(
                "SELECT max(seq) AS target FROM audit_events
                 WHERE seq < COALESCE((SELECT min(seq) FROM audit_events WHERE time >= $1),
                                      9223372036854775807)",
            )
            .bind(before),
        )
        .await?;
    row.get("target")
}

/// The statement that lets this transaction's `DELETE` of audit rows through (`on`) or not.
/// The triggers allow a delete only with it on and only up to the prune checkpoint just written;
/// it is off again before the transaction ends (Postgres: a transaction-local setting; SQLite: a
/// guard row, which no other connection can see while the write lock is held).
fn prune_guard(d: Dialect, on: bool) -> Sql<'static> {
    match d {
        Dialect::Postgres => Sql::new(format!(
            "SELECT set_config('broker.audit_prune', '{}', true)",
            if on { "on" } else { "off" }
        )),
        Dialect::Sqlite => Sql::new(format!(
            "UPDATE audit_prune_guard SET active = {} WHERE id = 1",
            u8::from(on)
        )),
    }
}

pub(super) async fn prune_batch(
    db: &Backend,
    target: i64,
    before: OffsetDateTime,
    now: OffsetDateTime,
    batch: u32,
) -> Result<Option<(Checkpoint, u64)>, StoreError> {
    let mut tx = db.begin().await?;
    let mut conn = tx.conn();
    hold_head(&mut conn).await?;
    let base = last_prune(&mut conn).await?;
    let after = base.as_ref().map_or(0, |b| b.seq);
    let cut_at = |order: &str, offset: i64| {
        Sql::new(format!(
            "SELECT seq, id, time, hash FROM audit_events
             WHERE seq > $1 AND seq <= $2 ORDER BY seq {order} LIMIT 1 OFFSET $3"
        ))
        .bind(after)
        .bind(target)
        .bind(offset)
    };
    let mut cut = conn
        .fetch_optional(&cut_at("ASC", i64::from(batch.saturating_sub(1))))
        .await?;
    if cut.is_none() {
        cut = conn.fetch_optional(&cut_at("DESC", 0)).await?;
    }
    let Some(cut) = cut else {
        return Ok(None);
    };
    let seq: i64 = cut.get("seq")?;
    // A legacy (unchained) event has no hash: the chain has not started yet at it.
    let hash = cut
        .get::<Option<String>>("hash")?
        .unwrap_or_else(|| chain::GENESIS.to_owned());
    let cp = Checkpoint {
        kind: CheckpointKind::Prune,
        created_at: now,
        seq,
        hash,
        event_count: count_chained(&mut conn, base.as_ref(), seq).await?,
        last_event_id: Some(cut.uuid("id")?),
        last_event_time: Some(cut.time("time")?),
    };
    insert_checkpoint(&mut conn, &cp, Some(before)).await?;
    let d = conn.dialect();
    conn.execute(&prune_guard(d, true)).await?;
    let deleted = conn
        .execute(&Sql::new("DELETE FROM audit_events WHERE seq <= $1").bind(seq))
        .await?;
    conn.execute(&prune_guard(d, false)).await?;
    tx.commit().await?;
    Ok(Some((cp, deleted)))
}

pub(super) async fn freeze_state(db: &Backend) -> Result<Option<FreezeRecord>, StoreError> {
    let mut pooled = db.acquire().await?;
    let row = pooled
        .conn()
        .fetch_optional(&Sql::new(
            "SELECT filter, reason, actor, since FROM broker_freeze WHERE id = 1",
        ))
        .await?;
    row.map(|r| {
        Ok(FreezeRecord {
            filter: r.json("filter")?,
            reason: r.get("reason")?,
            actor: r.get("actor")?,
            since: r.time("since")?,
        })
    })
    .transpose()
}

/// Replace the freeze (`None` lifts it) and append `audit`, in one transaction. Whether a
/// freeze was in force before.
pub(super) async fn set_freeze(
    db: &Backend,
    freeze: Option<&FreezeRecord>,
    audit: &AuditEvent,
) -> Result<bool, StoreError> {
    let mut tx = db.begin().await?;
    let mut conn = tx.conn();
    let was = conn
        .execute(&Sql::new("DELETE FROM broker_freeze WHERE id = 1"))
        .await?
        > 0;
    if let Some(f) = freeze {
        conn.execute(
            &Sql::new(
                "INSERT INTO broker_freeze (id, filter, reason, actor, since)
                 VALUES (1, $1, $2, $3, $4)",
            )
            .bind(Arg::Json(&f.filter))
            .bind(&f.reason)
            .bind(&f.actor)
            .bind(f.since),
        )
        .await?;
    }
    append(&mut conn, &[audit]).await?;
    tx.commit().await?;
    Ok(was)
}

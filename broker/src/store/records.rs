//! Replay records, written once for both backends: used job-token ids (`used_jti`) and webhook
//! deliveries acted on. A record is live until its `expires_at`; after that it may be taken over
//! (an upsert whose `WHERE` lets only an expired row be replaced) or purged.

use super::db::{Backend, Conn, Sql};
use super::{JtiRecord, StoreError};
use time::OffsetDateTime;

/// Record `j` inside the caller's transaction: insert, or take over a record whose window has
/// passed at `now`. `false`: a live record holds it (a replay).
pub(super) async fn claim_jti(
    conn: &mut Conn<'_>,
    j: &JtiRecord,
    now: OffsetDateTime,
) -> Result<bool, StoreError> {
    let won = conn
        .fetch_optional(
            &Sql::new(
                "INSERT INTO used_jti (iss, jti, expires_at) VALUES ($1, $2, $3)
                 ON CONFLICT (iss, jti) DO UPDATE SET expires_at = excluded.expires_at
                 WHERE used_jti.expires_at <= $4
                 RETURNING 1",
            )
            .bind(&j.iss)
            .bind(&j.jti)
            .bind(j.expires_at)
            .bind(now),
        )
        .await?;
    Ok(won.is_some())
}

pub(super) async fn record_jti(
    db: &Backend,
    j: &JtiRecord,
    now: OffsetDateTime,
) -> Result<(), StoreError> {
    let mut pooled = db.acquire().await?;
    if claim_jti(&mut pooled.conn(), j, now).await? {
        Ok(())
    } else {
        Err(StoreError::Replayed)
    }
}

pub(super) async fn record_delivery(
    db: &Backend,
    source: &str,
    id: &str,
    now: OffsetDateTime,
    expires_at: OffsetDateTime,
) -> Result<(), StoreError> {
    let mut pooled = db.acquire().await?;
    let won = pooled
        .conn()
        .fetch_optional(
            &Sql::new(
                "INSERT INTO webhook_deliveries (source, delivery_id, received_at, expires_at)
                 VALUES ($1, $2, $3, $4)
                 ON CONFLICT (source, delivery_id) DO UPDATE
                     SET received_at = excluded.received_at, expires_at = excluded.expires_at
                 WHERE webhook_deliveries.expires_at <= $3
                 RETURNING 1",
            )
            .bind(source)
            .bind(id)
            .bind(now)
            .bind(expires_at),
        )
        .await?;
    match won {
        Some(_) => Ok(()),
        None => Err(StoreError::Replayed),
    }
}

pub(super) async fn forget_delivery(
    db: &Backend,
    source: &str,
    id: &str,
) -> Result<(), StoreError> {
    let mut pooled = db.acquire().await?;
    pooled
        .conn()
        .execute(
            &Sql::new("DELETE FROM webhook_deliveries WHERE source = $1 AND delivery_id = $2")
                .bind(source)
                .bind(id),
        )
        .await?;
    Ok(())
}

/// Delete the records of `table` (`used_jti` | `webhook_deliveries`) past their window.
pub(super) async fn purge(
    db: &Backend,
    table: Purge,
    now: OffsetDateTime,
) -> Result<u64, StoreError> {
    let table = match table {
        Purge::Jti => "used_jti",
        Purge::Deliveries => "webhook_deliveries",
    };
    let mut pooled = db.acquire().await?;
    pooled
        .conn()
        .execute(&Sql::new(format!("DELETE FROM {table} WHERE expires_at <= $1")).bind(now))
        .await
}

/// Which replay records [`purge`] deletes.
#[derive(Debug, Clone, Copy)]
pub(super) enum Purge {
    Jti,
    Deliveries,
}

// About 600 lines on purpose: the Store facade is the whole interface of the store (one method per operation the rest of the broker may call); the queries are in grants.rs, audit_log.rs, records.rs and verify.rs.
//! The store: grants (leases), replay records and audit events, in Postgres (production) or
//! SQLite (embedded default). The only module that contains SQL.
//!
//! INTERFACE CONTRACT: the exchange, revoke, reaper and HTTP code call exactly these
//! functions.
//!
//! Invariants kept by both backends:
//! - every multi-statement operation is one transaction;
//! - every state change is a compare-and-set on `grants.status` (the expected status is in the
//!   `WHERE`), so concurrent callers cannot double-transition a grant;
//! - every time comes from the caller's clock, never from the database's `now()`;
//! - no text the database cannot hold reaches a statement: every write escapes its strings
//!   (claims, audit text, filters) through `text.rs`, the one boundary for outside text;
//! - no secret is ever stored: the revocation token arrives here only as its SHA-256 hash, and
//!   [`AuditEvent`] cannot carry a secret;
//! - no operation hangs: pool acquisition, statements (Postgres `statement_timeout`) and each
//!   public call as a whole are bounded, and failures become [`StoreError::Unavailable`]
//!   without the connection URL (it may hold a password).

mod audit_log;
mod chain;
mod codec;
mod db;
mod grants;
mod group_commit;
mod model;
mod postgres;
mod records;
mod sqlite;
#[cfg(any(test, feature = "testkit"))]
pub mod testdb;
#[cfg(test)]
mod tests;
pub mod text;
mod verify;

use crate::audit::AuditEvent;
pub use crate::audit::checkpoint::{Checkpoint, CheckpointKind};
use crate::providers::CredentialKind;
#[cfg(test)]
use crate::providers::IssuedCredential;
pub use chain::{BreakKind, ChainAnchor, ChainBreak, ChainReport};
use db::Backend;
pub use model::{
    AuditFilter, AuditPage, AuditRecord, ClaimedGrant, CredentialStatus, FreezeRecord, Grant,
    GrantCursor, GrantSelect, GrantStatus, JobMatch, JtiRecord, NewGrant, PruneReport, RevokeCause,
    SecretMatch, StoreError, StoreGauges, StoreStats,
};
use records::Purge;
use time::{Duration, OffsetDateTime};
use uuid::Uuid;

/// The store handle; cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    backend: Backend,
    /// Postgres only: batches the chain-appending writes (see `group_commit.rs`). SQLite has a
    /// single writer and a cheap commit, so it writes directly.
    writer: Option<group_commit::GroupWriter>,
}

/// Upper bound on one public store call, whatever it waits on (pool, locks, network). The HTTP
/// layer turns the resulting `Unavailable` into a 503 instead of hanging a request.
const OPERATION_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Events deleted per prune transaction: each batch stays well inside the statement timeout,
/// and every batch leaves its own prune checkpoint, so an interrupted prune is still consistent.
const PRUNE_BATCH: u32 = 5000;

async fn bounded<T>(
    fut: impl std::future::Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(OPERATION_TIMEOUT, fut).await {
        Ok(result) => result,
        Err(_) => Err(StoreError::Unavailable(
            "store operation timed out".to_owned(),
        )),
    }
}

/// [`bounded`] for a write that carries audit events: a failure other than a replay refusal
/// is counted (`broker_audit_write_failures_total`), since the events it carried were not
/// written.
async fn audited<T>(
    fut: impl std::future::Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    let result = bounded(fut).await;
    if matches!(&result, Err(e) if !matches!(e, StoreError::Replayed)) {
        crate::metrics::audit_write_failed();
    }
    result
}

impl Store {
    /// Connect by URL: `postgres://…` or `sqlite:PATH` / `sqlite::memory:`. Does not migrate.
    pub async fn connect(url: &str) -> Result<Store, StoreError> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let pool = bounded(postgres::connect(url)).await?;
            Ok(Store {
                writer: Some(group_commit::GroupWriter::start(&pool)?),
                backend: Backend::Postgres(pool),
            })
        } else if url.starts_with("sqlite:") {
            let pool = bounded(sqlite::connect(url)).await?;
            Ok(Store {
                backend: Backend::Sqlite(pool),
                writer: None,
            })
        } else {
            // Never echo the URL: it may carry a password.
            Err(StoreError::BadUrl(
                "expected a postgres://, postgresql:// or sqlite: url".to_owned(),
            ))
        }
    }
    /// The Postgres store's group writer (every grant and audit write of a Postgres store goes
    /// through it; a SQLite store has none and writes directly).
    fn writer(&self) -> Result<&group_commit::GroupWriter, StoreError> {
        self.writer
            .as_ref()
            .ok_or_else(|| StoreError::Unavailable("store writer missing".to_owned()))
    }
    /// Apply migrations from `migrations/postgres` or `migrations/sqlite` (embedded).
    pub async fn migrate(&self) -> Result<(), StoreError> {
        bounded(async {
            match &self.backend {
                Backend::Postgres(pool) => postgres::migrate(pool).await,
                Backend::Sqlite(pool) => sqlite::migrate(pool).await,
            }
        })
        .await
    }
    /// `SELECT 1` with a short timeout.
    pub async fn ping(&self) -> Result<(), StoreError> {
        bounded(async {
            let mut pooled = self.backend.acquire().await?;
            pooled.conn().execute(&db::Sql::new("SELECT 1")).await?;
            Ok(())
        })
        .await
    }
    /// Which backend (`postgres` | `sqlite`).
    pub fn backend(&self) -> &'static str {
        match self.backend {
            Backend::Postgres(_) => "postgres",
            Backend::Sqlite(_) => "sqlite",
        }
    }

    /// How many grants one [`Store::revoke_in_store`] transaction should take when a revoke-all
    /// walks pages of them: on Postgres a page costs its rows plus a fixed share (round trips,
    /// the commit's WAL flush), and other writers wait only for the audit chain head, so larger
    /// pages pay. SQLite inserts the events one by one under its single write lock, which every
    /// other write waits for: there a larger page saves nothing and starves honest jobs
    /// (measured: 3 honest exchange+revoke pairs per second beside pages of 5,000, 18 beside
    /// pages of 1,000), so the caller keeps its own page size and does not read the next page
    /// while one is written (`None`; with the read-ahead alone, honest pairs fell to 10 per
    /// second at 50,000 grants for a run 1 s shorter).
    pub fn in_store_revoke_page(&self) -> Option<u32> {
        match self.backend {
            Backend::Postgres(_) => Some(5_000),
            Backend::Sqlite(_) => None,
        }
    }

    /// One transaction: record `jti` (if given; a live duplicate → `StoreError::Replayed`,
    /// an expired duplicate is replaced) and insert the grant in `issuing` with its credentials.
    pub async fn begin_grant(
        &self,
        grant: &NewGrant,
        jti: Option<&JtiRecord>,
    ) -> Result<(), StoreError> {
        let grant = text::escape_grant(grant);
        let grant = &*grant;
        let jti = jti.map(text::escape_jti);
        let jti = jti.as_deref();
        match &self.backend {
            Backend::Postgres(_) => bounded(self.writer()?.begin(grant, jti)).await,
            Backend::Sqlite(_) => {
                bounded(sqlite::insert_grant(&self.backend, grant, jti, None)).await
            }
        }
    }
    /// One transaction: `issuing` → `active` with the final expiry and per-credential details
    /// (same order as in `NewGrant::credentials`), and append `audit`. Error `Conflict` if the
    /// grant is not `issuing`.
    pub async fn activate_grant(
        &self,
        id: Uuid,
        expires_at: OffsetDateTime,
        details: &[serde_json::Value],
        audit: &AuditEvent,
    ) -> Result<(), StoreError> {
        let details = text::escape_details(details);
        let details = &*details;
        let audit = text::escape_event(audit);
        let audit = &*audit;
        match &self.backend {
            Backend::Postgres(_) => {
                let op = group_commit::Op::Activate {
                    id,
                    expires_at,
                    details: details.to_vec(),
                };
                audited(self.writer()?.submit(op, audit)).await
            }
            Backend::Sqlite(_) => {
                audited(sqlite::activate_grant(
                    &self.backend,
                    id,
                    expires_at,
                    details,
                    audit,
                ))
                .await
            }
        }
    }
    /// One transaction: record `jti` (as `begin_grant`), insert the grant already `active` with
    /// its credentials' final details, and append `audit`. For grants whose credentials were
    /// minted in memory (nothing to revoke if this fails).
    pub async fn issue_grant(
        &self,
        grant: &NewGrant,
        jti: Option<&JtiRecord>,
        audit: &AuditEvent,
    ) -> Result<(), StoreError> {
        let grant = text::escape_grant(grant);
        let grant = &*grant;
        let jti = jti.map(text::escape_jti);
        let jti = jti.as_deref();
        let audit = text::escape_event(audit);
        let audit = &*audit;
        match &self.backend {
            Backend::Postgres(_) => {
                let op = group_commit::Op::Issue {
                    grant: Box::new(grant.clone()),
                    jti: jti.cloned(),
                };
                audited(self.writer()?.submit(op, audit)).await
            }
            Backend::Sqlite(_) => {
                audited(sqlite::insert_grant(&self.backend, grant, jti, Some(audit))).await
            }
        }
    }
    /// One transaction: `issuing` → `failed` (nothing minted is left: caller revoked it first),
    /// delete the `jti` record if given (an exchange that issued nothing does not consume the
    /// token), append `audit`.
    pub async fn fail_grant(
        &self,
        id: Uuid,
        release_jti: Option<&JtiRecord>,
        audit: &AuditEvent,
    ) -> Result<(), StoreError> {
        let release_jti = release_jti.map(text::escape_jti);
        let release_jti = release_jti.as_deref();
        let audit = text::escape_event(audit);
        let audit = &*audit;
        audited(grants::fail_grant(&self.backend, id, release_jti, audit)).await
    }
    /// Append one audit event on its own.
    pub async fn append_audit(&self, audit: &AuditEvent) -> Result<(), StoreError> {
        let audit = text::escape_event(audit);
        let audit = &*audit;
        match &self.backend {
            Backend::Postgres(_) => {
                audited(self.writer()?.submit(group_commit::Op::Append, audit)).await
            }
            Backend::Sqlite(_) => audited(audit_log::append_audit(&self.backend, audit)).await,
        }
    }
    /// Read audit events back, newest first.
    pub async fn audit_events(&self, filter: &AuditFilter) -> Result<Vec<AuditEvent>, StoreError> {
        let page = self.audit_page(filter).await?;
        Ok(page.records.into_iter().map(|r| r.event).collect())
    }
    /// One page of audit events, newest first (time, then insertion order), with the cursor of
    /// the next page when more match.
    pub async fn audit_page(&self, filter: &AuditFilter) -> Result<AuditPage, StoreError> {
        let filter = &text::escape_filter(filter);
        let limit = codec::audit_limit(filter.limit);
        // One row more than asked tells whether another page exists without a second query.
        let mut records =
            bounded(audit_log::audit_records(&self.backend, filter, limit + 1)).await?;
        let more = records.len() as i64 > limit;
        records.truncate(usize::try_from(limit).unwrap_or(0));
        let next_cursor = if more {
            records.last().map(|r| r.seq)
        } else {
            None
        };
        Ok(AuditPage {
            records,
            next_cursor,
        })
    }

    /// Walk the audit hash chain oldest first and report the first event that was modified,
    /// deleted or reordered (see `chain.rs`). Reads in pages, each a bounded call, so a long
    /// log is not cut off by the per-call timeout.
    pub async fn verify_audit_chain(&self) -> Result<ChainReport, StoreError> {
        self.verify_audit_chain_through(None).await
    }

    /// [`Store::verify_audit_chain`], and also prove the chain still passes through `anchor`
    /// (a checkpoint exported earlier): its event, with its hash, at its count. Detects a log
    /// truncated or rewritten before the checkpoint even when the rewrite left a consistent
    /// chain. The walk starts at the newest prune cut; an anchor at or before the cut is
    /// vouched for by the stored checkpoint records only.
    pub async fn verify_audit_chain_through(
        &self,
        anchor: Option<&ChainAnchor>,
    ) -> Result<ChainReport, StoreError> {
        verify::verify_through(&self.backend, anchor).await
    }

    /// Record where the chain stands now (kind `export`) and return it, for `broker audit
    /// checkpoint` to sign. Appenders wait while the events are counted.
    pub async fn audit_checkpoint(&self, now: OffsetDateTime) -> Result<Checkpoint, StoreError> {
        bounded(audit_log::record_checkpoint(&self.backend, now)).await
    }

    /// Delete the oldest audit events, all older than `before`, keeping the chain verifiable:
    /// in batches, each one transaction that first records a prune checkpoint at its cut (the
    /// hash of the last deleted event and the count) and then deletes up to it. Stops at the
    /// first event at or after `before` (in chain order), so no newer event is deleted even if
    /// a few older ones after it stay. Appends an `audit_pruned` event when anything went.
    pub async fn prune_audit(
        &self,
        before: OffsetDateTime,
        now: OffsetDateTime,
        actor: &str,
    ) -> Result<PruneReport, StoreError> {
        let target = bounded(audit_log::prune_target(&self.backend, before)).await?;
        let mut report = PruneReport {
            deleted: 0,
            cut_seq: None,
            pruned_events: 0,
        };
        if let Some(target) = target {
            while let Some((cp, deleted)) = bounded(audit_log::prune_batch(
                &self.backend,
                target,
                before,
                now,
                PRUNE_BATCH,
            ))
            .await?
            {
                report.deleted += deleted;
                report.cut_seq = Some(cp.seq);
                report.pruned_events = cp.event_count;
            }
        }
        if report.deleted > 0 {
            let mut ev = crate::audit::AuditEvent::new(
                now,
                crate::audit::Action::Admin,
                crate::audit::Outcome::Success,
                "audit_pruned",
            );
            ev.actor = Some(actor.to_owned());
            ev.detail = Some(format!(
                "{} events before {} pruned through seq {}",
                report.deleted,
                before
                    .format(&time::format_description::well_known::Rfc3339)
                    .unwrap_or_default(),
                report.cut_seq.unwrap_or_default()
            ));
            self.append_audit(&ev).await?;
        }
        Ok(report)
    }

    /// Audit events after sequence number `after`, in chain order, at most `limit`, with their
    /// chain links (the audit stream).
    pub async fn audit_after(
        &self,
        after: i64,
        limit: u32,
    ) -> Result<Vec<crate::audit::stream::ChainedEvent>, StoreError> {
        let rows = bounded(audit_log::chain_page(&self.backend, after, limit)).await?;
        Ok(rows
            .into_iter()
            .map(|r| crate::audit::stream::ChainedEvent {
                seq: r.seq,
                hash: r.hash,
                prev_hash: r.prev_hash,
                event: r.event,
            })
            .collect())
    }
    /// The sequence number through which the audit log was pruned (events at or before it are
    /// gone), if it ever was.
    pub async fn audit_pruned_through(&self) -> Result<Option<i64>, StoreError> {
        let cut = bounded(audit_log::last_prune_checkpoint(&self.backend)).await?;
        Ok(cut.map(|c| c.seq))
    }

    /// The newest checkpoint of `kind`, if any.
    pub async fn newest_checkpoint(
        &self,
        kind: CheckpointKind,
    ) -> Result<Option<Checkpoint>, StoreError> {
        bounded(audit_log::newest_checkpoint(&self.backend, kind)).await
    }

    /// The stored checkpoints, oldest first (at most `limit`).
    pub async fn audit_checkpoints(&self, limit: u32) -> Result<Vec<Checkpoint>, StoreError> {
        bounded(audit_log::checkpoints(&self.backend, limit)).await
    }

    /// The freeze in force, if any.
    pub async fn freeze_state(&self) -> Result<Option<FreezeRecord>, StoreError> {
        bounded(audit_log::freeze_state(&self.backend)).await
    }
    /// One transaction: replace the freeze (`None` lifts it) and append `audit`. Returns whether
    /// a freeze was in force before.
    pub async fn set_freeze(
        &self,
        freeze: Option<&FreezeRecord>,
        audit: &AuditEvent,
    ) -> Result<bool, StoreError> {
        let freeze = freeze.map(text::escape_freeze);
        let audit = text::escape_event(audit);
        let audit = &*audit;
        audited(audit_log::set_freeze(&self.backend, freeze.as_ref(), audit)).await
    }

    pub async fn grant(&self, id: Uuid) -> Result<Option<Grant>, StoreError> {
        bounded(grants::grant(&self.backend, id)).await
    }
    pub async fn grant_by_revocation_hash(&self, hash: &str) -> Result<Option<Grant>, StoreError> {
        bounded(grants::grant_by_revocation_hash(&self.backend, hash)).await
    }
    /// The id and status of the grant a revocation token belongs to (what a revoke needs
    /// before it claims the grant; no credentials read).
    pub async fn grant_status_by_revocation_hash(
        &self,
        hash: &str,
    ) -> Result<Option<(Uuid, GrantStatus)>, StoreError> {
        bounded(grants::grant_status_by_revocation_hash(&self.backend, hash)).await
    }
    /// Status of the grant holding credential `(kind, resource_id)`.
    pub async fn credential_status(
        &self,
        kind: CredentialKind,
        resource_id: &str,
    ) -> Result<Option<CredentialStatus>, StoreError> {
        bounded(grants::credential_status(&self.backend, kind, resource_id)).await
    }

    /// The credential whose secret hashes to `sha256_hex` (kept in its details under
    /// `providers::SECRET_HASH_KEY`: Postgres passwords, opaque API tokens), with its grant.
    pub async fn credential_by_secret_hash(
        &self,
        sha256_hex: &str,
    ) -> Result<Option<SecretMatch>, StoreError> {
        bounded(grants::credential_by_secret_hash(&self.backend, sha256_hex)).await
    }

    /// Resource ids of `kind` credentials whose grant is no longer active (revoked, being
    /// revoked, failed, expired) and expires after `live_after`: what a revocation list names.
    pub async fn revoked_resource_ids(
        &self,
        kind: CredentialKind,
        live_after: OffsetDateTime,
    ) -> Result<Vec<String>, StoreError> {
        bounded(grants::revoked_resource_ids(
            &self.backend,
            kind,
            live_after,
        ))
        .await
    }

    /// Claim one grant for a requested revocation: `active` | `issuing` | `revoking` (lease
    /// expired) → `revoking` with a lease until `now + lease`. Returns `None` if the grant is in a
    /// final state or another worker holds a live lease (idempotent revoke).
    pub async fn claim_for_revoke(
        &self,
        id: Uuid,
        now: OffsetDateTime,
        lease: Duration,
    ) -> Result<Option<ClaimedGrant>, StoreError> {
        let lease_until = codec::lease_end(now, lease)?;
        bounded(grants::claim_for_revoke(
            &self.backend,
            id,
            now,
            lease_until,
        ))
        .await
    }
    /// Claim up to `limit` grants that need the reaper, each exactly once across replicas
    /// (Postgres: `FOR UPDATE SKIP LOCKED`): `active` with `expires_at <= now` (cause Expired),
    /// `issuing` created before `stale_issuing_before` (cause Recovery), and `revoking` whose
    /// lease ran out (cause: the one recorded when first claimed). Each claimed row moves to
    /// `revoking` with a lease until `now + lease`.
    pub async fn claim_due(
        &self,
        now: OffsetDateTime,
        stale_issuing_before: OffsetDateTime,
        lease: Duration,
        limit: u32,
    ) -> Result<Vec<ClaimedGrant>, StoreError> {
        let lease_until = codec::lease_end(now, lease)?;
        bounded(grants::claim_due(
            &self.backend,
            now,
            stale_issuing_before,
            lease_until,
            limit,
        ))
        .await
    }
    /// One transaction: `revoking` → the cause's final status, `revoked_at = now`, append audit.
    pub async fn finish_revoke(
        &self,
        id: Uuid,
        cause: RevokeCause,
        now: OffsetDateTime,
        audit: &AuditEvent,
    ) -> Result<(), StoreError> {
        let audit = text::escape_event(audit);
        let audit = &*audit;
        let op = group_commit::Op::Finish { id, cause, now };
        match &self.backend {
            Backend::Postgres(_) => audited(self.writer()?.submit(op, audit)).await,
            Backend::Sqlite(_) => {
                audited(grants::finish_revoke(&self.backend, id, cause, now, audit)).await
            }
        }
    }
    /// One transaction: keep `revoking`, count the attempt, record the (non-secret) error, set
    /// the lease to `retry_at` so the reaper retries then, append audit.
    pub async fn revoke_failed(
        &self,
        id: Uuid,
        error: &str,
        retry_at: OffsetDateTime,
        audit: &AuditEvent,
    ) -> Result<(), StoreError> {
        let error = codec::clip_error(&text::escape(error));
        let audit = text::escape_event(audit);
        let audit = &*audit;
        audited(grants::revoke_failed(
            &self.backend,
            id,
            &error,
            retry_at,
            audit,
        ))
        .await
    }
    /// Active grants (for revoke-all), oldest first.
    pub async fn active_grants(&self, limit: u32) -> Result<Vec<Grant>, StoreError> {
        bounded(grants::active_grants(&self.backend, limit)).await
    }
    /// One page of the active grants `select` matches, oldest first (creation time, then id),
    /// after `after`, with their credentials: two queries whatever the page size.
    pub async fn active_grants_page(
        &self,
        select: &GrantSelect,
        after: Option<GrantCursor>,
        limit: u32,
    ) -> Result<Vec<Grant>, StoreError> {
        let select = &text::escape_select(select);
        bounded(grants::active_grants_page(
            &self.backend,
            select,
            after,
            limit,
        ))
        .await
    }
    /// Revoke, set-based, grants whose credentials live only in the broker (API tokens: the
    /// store's status *is* the revocation, checked at introspection). One transaction: every
    /// grant named by an event's `grant_id` that is still `active` becomes `revoked`
    /// (cause `requested`, `revoked_at = now`), and exactly the events of the grants that moved
    /// are appended to the audit chain, in order. Returns the ids that moved; the others were
    /// taken meanwhile by another revocation (the job's own, the reaper), which audits them.
    pub async fn revoke_in_store(
        &self,
        now: OffsetDateTime,
        audits: &[AuditEvent],
    ) -> Result<Vec<Uuid>, StoreError> {
        let audits = text::escape_events(audits);
        audited(grants::revoke_in_store(&self.backend, now, &audits)).await
    }
    /// Record a single-use job token's `jti` on its own (a job token used as an OIDC operator
    /// credential). A live record → `StoreError::Replayed`; an expired one is replaced. Shares
    /// `used_jti` with exchanges, so one token serves either one exchange or one operator call.
    pub async fn record_jti(&self, jti: &JtiRecord, now: OffsetDateTime) -> Result<(), StoreError> {
        let jti = text::escape_jti(jti);
        let jti = &*jti;
        bounded(records::record_jti(&self.backend, jti, now)).await
    }
    /// Active grants of one finished job (job-end webhooks), oldest first.
    pub async fn active_job_grants(
        &self,
        job: &JobMatch,
        limit: u32,
    ) -> Result<Vec<Grant>, StoreError> {
        let job = &text::escape_job(job);
        bounded(grants::active_job_grants(&self.backend, job, limit)).await
    }
    /// Record a webhook delivery acted on, or take over a record whose window has passed. A
    /// live record with the same `(source, id)` → `StoreError::Replayed`.
    pub async fn record_delivery(
        &self,
        source: &str,
        id: &str,
        now: OffsetDateTime,
        expires_at: OffsetDateTime,
    ) -> Result<(), StoreError> {
        let (source, id) = (text::escape(source), text::escape(id));
        let (source, id) = (&*source, &*id);
        bounded(records::record_delivery(
            &self.backend,
            source,
            id,
            now,
            expires_at,
        ))
        .await
    }
    /// Drop a delivery record (the delivery could not be processed; let a retry through).
    pub async fn forget_delivery(&self, source: &str, id: &str) -> Result<(), StoreError> {
        let (source, id) = (text::escape(source), text::escape(id));
        let (source, id) = (&*source, &*id);
        bounded(records::forget_delivery(&self.backend, source, id)).await
    }
    /// Delete webhook delivery records past their window. Returns how many.
    pub async fn purge_deliveries(&self, now: OffsetDateTime) -> Result<u64, StoreError> {
        bounded(records::purge(&self.backend, Purge::Deliveries, now)).await
    }
    /// Delete replay records past their window. Returns how many.
    pub async fn purge_jti(&self, now: OffsetDateTime) -> Result<u64, StoreError> {
        bounded(records::purge(&self.backend, Purge::Jti, now)).await
    }
    pub async fn stats(&self) -> Result<StoreStats, StoreError> {
        bounded(grants::stats(&self.backend)).await
    }
    /// Metrics gauges: active grants per credential kind, and the expiry of the oldest grant
    /// past `now` that is not yet revoked (the reaper's lag). Two indexed queries.
    pub async fn gauges(&self, now: OffsetDateTime) -> Result<StoreGauges, StoreError> {
        bounded(grants::gauges(&self.backend, now)).await
    }

    /// Close the pool (graceful shutdown, tests). Calls after this fail with `Unavailable`.
    pub async fn close(&self) {
        match &self.backend {
            Backend::Postgres(pool) => pool.close().await,
            Backend::Sqlite(pool) => pool.close().await,
        }
    }
}

impl Store {
    /// Run `work` while holding a lock named `key` that every replica sharing this store
    /// respects (Postgres: a transaction-scoped advisory lock, released when the transaction
    /// ends, also if this task is cancelled; SQLite: one node, so the caller's in-process lock
    /// suffices). For read-modify-write of state kept outside the store, e.g. an AWS role's
    /// deny policy. Waiting is bounded by the store's statement timeout.
    pub async fn locked<T>(
        &self,
        key: &str,
        work: impl std::future::Future<Output = T>,
    ) -> Result<T, StoreError> {
        match &self.backend {
            Backend::Postgres(pool) => postgres::locked(pool, key, work).await,
            Backend::Sqlite(_) => Ok(work.await),
        }
    }
}

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

mod chain;
mod codec;
mod group_commit;
mod postgres;
mod sqlite;
#[cfg(any(test, feature = "testkit"))]
pub mod testdb;
#[cfg(test)]
mod tests;
pub mod text;

use crate::audit::AuditEvent;
use crate::providers::{CredentialKind, IssuedCredential};
pub use chain::{BreakKind, ChainAnchor, ChainBreak, ChainReport};
use serde::{Deserialize, Serialize};
use time::{Duration, OffsetDateTime};
use uuid::Uuid;

/// Lifecycle of a grant (a lease on one or more credentials).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GrantStatus {
    /// Intent written, minting under way (or crashed: the reaper recovers it).
    Issuing,
    /// All credentials minted and returned.
    Active,
    /// A revocation (by request, expiry or recovery) is under way or waiting for a retry.
    Revoking,
    /// Revoked on request (`/v1/revoke`, revoke-all, webhook).
    Revoked,
    /// Revoked by the reaper after expiry.
    Expired,
    /// Minting failed or crashed; whatever was minted has been cleaned up.
    Failed,
}

impl GrantStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            GrantStatus::Issuing => "issuing",
            GrantStatus::Active => "active",
            GrantStatus::Revoking => "revoking",
            GrantStatus::Revoked => "revoked",
            GrantStatus::Expired => "expired",
            GrantStatus::Failed => "failed",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "issuing" => GrantStatus::Issuing,
            "active" => GrantStatus::Active,
            "revoking" => GrantStatus::Revoking,
            "revoked" => GrantStatus::Revoked,
            "expired" => GrantStatus::Expired,
            "failed" => GrantStatus::Failed,
            _ => return None,
        })
    }
    /// No further transition happens from here.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            GrantStatus::Revoked | GrantStatus::Expired | GrantStatus::Failed
        )
    }
}

/// Why a grant is being revoked; decides the final status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RevokeCause {
    /// Caller asked (`/v1/revoke`, revoke-all, webhook) → `revoked`.
    Requested,
    /// Past `expires_at` → `expired`.
    Expired,
    /// Left in `issuing` (crash or failed mint) → `failed`.
    Recovery,
}

impl RevokeCause {
    pub fn as_str(self) -> &'static str {
        match self {
            RevokeCause::Requested => "requested",
            RevokeCause::Expired => "expired",
            RevokeCause::Recovery => "recovery",
        }
    }
    pub fn final_status(self) -> GrantStatus {
        match self {
            RevokeCause::Requested => GrantStatus::Revoked,
            RevokeCause::Expired => GrantStatus::Expired,
            RevokeCause::Recovery => GrantStatus::Failed,
        }
    }
}

/// A replay record: this `jti` from this `iss` was used; keep until `expires_at`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JtiRecord {
    pub iss: String,
    pub jti: String,
    pub expires_at: OffsetDateTime,
}

/// Everything written with a grant's intent, before anything is minted.
#[derive(Debug, Clone)]
pub struct NewGrant {
    pub id: Uuid,
    /// SHA-256 hex of the revocation token (the token itself is never stored).
    pub revocation_hash: String,
    /// Configured issuer name.
    pub issuer: String,
    pub subject: String,
    pub repository: Option<String>,
    pub repository_id: Option<String>,
    /// Job identity for webhooks later (run id / attempt / job id), non-secret.
    pub job: serde_json::Value,
    pub bundle_digest: String,
    pub created_at: OffsetDateTime,
    pub expires_at: OffsetDateTime,
    pub credentials: Vec<IssuedCredential>,
}

/// A grant as read back.
#[derive(Debug, Clone, PartialEq)]
pub struct Grant {
    pub id: Uuid,
    pub status: GrantStatus,
    pub issuer: String,
    pub subject: String,
    pub repository: Option<String>,
    pub repository_id: Option<String>,
    pub job: serde_json::Value,
    pub bundle_digest: String,
    pub created_at: OffsetDateTime,
    pub expires_at: OffsetDateTime,
    pub revoked_at: Option<OffsetDateTime>,
    /// Revocation attempts that failed so far.
    pub revoke_attempts: i32,
    pub last_error: Option<String>,
    pub credentials: Vec<IssuedCredential>,
}

/// A grant the reaper (or a revoke call) has claimed for revocation, with the cause.
#[derive(Debug, Clone, PartialEq)]
pub struct ClaimedGrant {
    pub grant: Grant,
    pub cause: RevokeCause,
}

/// Status of one minted credential, for introspection.
#[derive(Debug, Clone, PartialEq)]
pub struct CredentialStatus {
    pub grant_id: Uuid,
    pub grant_status: GrantStatus,
    pub expires_at: OffsetDateTime,
}

/// Filter for reading audit events back (`GET /v1/audit`, CLI, tests). Every field narrows the
/// result (AND); `None` means "any". The backends apply all of them in SQL, never in memory.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    pub grant_id: Option<Uuid>,
    pub request_id: Option<String>,
    pub repository: Option<String>,
    pub outcome: Option<String>,
    pub reason: Option<String>,
    /// Events at or after this time.
    pub since: Option<OffsetDateTime>,
    /// Events strictly before this time.
    pub until: Option<OffsetDateTime>,
    pub repository_id: Option<String>,
    /// `job`, `reaper`, `operator:<name>`...
    pub actor: Option<String>,
    /// A credential name the event requested or granted.
    pub credential: Option<String>,
    /// A credential kind (`api_token`, ...): events of grants that hold a credential of this
    /// kind. Events without a grant (denials) never match.
    pub kind: Option<String>,
    /// Only events older than the event with this sequence number (the previous page's
    /// [`AuditPage::next_cursor`]), in the same newest-first order.
    pub cursor: Option<i64>,
    /// Newest first; at most this many (capped at 1000).
    pub limit: u32,
}

/// One audit event with its sequence number (insertion order, the pagination cursor).
#[derive(Debug, Clone, PartialEq)]
pub struct AuditRecord {
    pub seq: i64,
    pub event: AuditEvent,
}

/// One page of audit events, newest first.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditPage {
    pub records: Vec<AuditRecord>,
    /// Set when more events match: pass it as [`AuditFilter::cursor`] for the next page.
    pub next_cursor: Option<i64>,
}

/// The emergency freeze as stored (the filter is the admin layer's JSON).
#[derive(Debug, Clone, PartialEq)]
pub struct FreezeRecord {
    pub filter: serde_json::Value,
    pub reason: String,
    pub actor: String,
    pub since: OffsetDateTime,
}

/// Why a checkpoint was recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckpointKind {
    /// `broker audit checkpoint`: printed signed, to be kept off this database.
    Export,
    /// `broker audit prune`: the events up to `seq` were deleted in the same transaction.
    Prune,
}

impl CheckpointKind {
    fn as_str(self) -> &'static str {
        match self {
            CheckpointKind::Export => "export",
            CheckpointKind::Prune => "prune",
        }
    }
}

/// Where the audit hash chain stood: the event at `seq` has chain hash `hash` and is the
/// `event_count`-th chained event ever written (pruned ones included).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub kind: CheckpointKind,
    pub created_at: OffsetDateTime,
    pub seq: i64,
    pub hash: String,
    pub event_count: u64,
    pub last_event_id: Option<Uuid>,
    pub last_event_time: Option<OffsetDateTime>,
}

impl Checkpoint {
    pub fn anchor(&self) -> ChainAnchor {
        ChainAnchor {
            seq: self.seq,
            hash: self.hash.clone(),
            count: self.event_count,
        }
    }
}

/// What `prune_audit` did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PruneReport {
    /// Events deleted (chained and legacy).
    pub deleted: u64,
    /// `seq` of the last deleted event: the cut the chain now starts after.
    pub cut_seq: Option<i64>,
    /// Chained events pruned so far in total (the cut checkpoint's count).
    pub pruned_events: u64,
}

/// The active grants of one finished job (job-end webhooks). Every field must match; the
/// optional ones only when given. Values are compared as the strings kept in `grants.job`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobMatch {
    /// Configured issuer names the delivery may concern (the webhook's platform).
    pub issuers: Vec<String>,
    /// `github` | `gitlab` (`grants.job.platform`).
    pub platform: String,
    /// GitHub repository id, GitLab project id (`grants.repository_id`).
    pub repository_id: String,
    /// GitHub `check_run_id`, GitLab `job_id` (`grants.job.job_id`).
    pub job_id: String,
    /// GitHub `run_id` / GitLab `pipeline_id` (`grants.job.run_id`).
    pub run_id: Option<String>,
    /// GitHub `run_attempt` (`grants.job.run_attempt`).
    pub run_attempt: Option<String>,
}

/// Which active grants an emergency revoke-all selects. Every field narrows the selection
/// (AND); `None` means "any". Both backends apply all of them in SQL, so a selection that
/// matches a few grants among millions reads only those (never "load everything, then filter").
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GrantSelect {
    /// Configured issuer name (`grants.issuer`).
    pub issuer: Option<String>,
    pub repository: Option<String>,
    pub repository_id: Option<String>,
    /// Grants holding a credential of this definition name.
    pub credential: Option<String>,
    /// Grants holding a credential of this kind (`api_token`, ...).
    pub kind: Option<String>,
    /// Created at or after.
    pub issued_after: Option<OffsetDateTime>,
    /// Created strictly before.
    pub issued_before: Option<OffsetDateTime>,
}

/// Where the previous page of [`Store::active_grants_page`] ended: its last grant's creation
/// time and id (keyset pagination, so a page costs the same at the millionth grant as at the
/// first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrantCursor {
    pub created_at: OffsetDateTime,
    pub id: Uuid,
}

/// Counts for `/readyz` and metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct StoreStats {
    pub active_grants: i64,
    pub issuing_grants: i64,
    /// Grants in `revoking` whose last attempt failed.
    pub revoke_failures_pending: i64,
}

/// What `/metrics` reads from the store (cluster-wide, whichever replica asks).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreGauges {
    /// `(kind, active grants holding a credential of it)`, kinds with none omitted.
    pub active_by_kind: Vec<(String, i64)>,
    /// Expiry of the oldest grant still `active` or `revoking` after it expired.
    pub oldest_overdue: Option<OffsetDateTime>,
}

/// Store failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The `(iss, jti)` pair was already used and is still inside its replay window.
    #[error("token already used")]
    Replayed,
    /// Database unreachable, timed out or failed.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// A state transition that is not allowed (e.g. activating a grant that is not `issuing`).
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("bad store url: {0}")]
    BadUrl(String),
    /// The database refused this item's data (Postgres SQLSTATE class 22/23/54, SQLite
    /// TOOBIG/CONSTRAINT/MISMATCH): not an outage, and a retry would fail the same way. Written
    /// alone, so other writes batched with it are not affected (see `group_commit.rs`).
    #[error("data rejected by the store: {0}")]
    Rejected(String),
}

impl StoreError {
    /// Stable reason code for audit events, logs and HTTP error bodies.
    pub fn reason_code(&self) -> &'static str {
        match self {
            StoreError::Replayed => "token_replayed",
            StoreError::Unavailable(_) => "store_unavailable",
            StoreError::Conflict(_) => "store_conflict",
            StoreError::BadUrl(_) => "bad_store_url",
            StoreError::Rejected(_) => "store_rejected",
        }
    }
}

/// The store handle; cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    backend: Backend,
    /// Postgres only: batches the chain-appending writes (see `group_commit.rs`). SQLite has a
    /// single writer and a cheap commit, so it writes directly.
    writer: Option<group_commit::GroupWriter>,
}

/// The two pools. Debug prints only the backend name: pool options could reveal the host.
#[derive(Clone)]
enum Backend {
    Postgres(sqlx::PgPool),
    Sqlite(sqlx::SqlitePool),
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Backend::Postgres(_) => f.write_str("Backend::Postgres"),
            Backend::Sqlite(_) => f.write_str("Backend::Sqlite"),
        }
    }
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

/// Run the backend-specific function of the same name on whichever pool this store holds.
macro_rules! dispatch {
    ($self:ident, $f:ident ( $($arg:expr),* $(,)? )) => {
        bounded(async {
            match &$self.backend {
                Backend::Postgres(pool) => postgres::$f(pool, $($arg),*).await,
                Backend::Sqlite(pool) => sqlite::$f(pool, $($arg),*).await,
            }
        })
        .await
    };
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
        dispatch!(self, migrate())
    }
    /// `SELECT 1` with a short timeout.
    pub async fn ping(&self) -> Result<(), StoreError> {
        dispatch!(self, ping())
    }
    /// Which backend (`postgres` | `sqlite`).
    pub fn backend(&self) -> &'static str {
        match self.backend {
            Backend::Postgres(_) => "postgres",
            Backend::Sqlite(_) => "sqlite",
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
            Backend::Sqlite(pool) => bounded(sqlite::begin_grant(pool, grant, jti)).await,
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
                bounded(self.writer()?.submit(op, audit)).await
            }
            Backend::Sqlite(pool) => {
                bounded(sqlite::activate_grant(pool, id, expires_at, details, audit)).await
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
                bounded(self.writer()?.submit(op, audit)).await
            }
            Backend::Sqlite(pool) => bounded(sqlite::issue_grant(pool, grant, jti, audit)).await,
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
        dispatch!(self, fail_grant(id, release_jti, audit))
    }
    /// Append one audit event on its own.
    pub async fn append_audit(&self, audit: &AuditEvent) -> Result<(), StoreError> {
        let audit = text::escape_event(audit);
        let audit = &*audit;
        match &self.backend {
            Backend::Postgres(_) => {
                bounded(self.writer()?.submit(group_commit::Op::Append, audit)).await
            }
            Backend::Sqlite(pool) => bounded(sqlite::append_audit(pool, audit)).await,
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
        let filter = &escape_filter(filter);
        let limit = codec::audit_limit(filter.limit);
        // One row more than asked tells whether another page exists without a second query.
        let mut records = dispatch!(self, audit_records(filter, limit + 1))?;
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
        let head = dispatch!(self, chain_head())?;
        let base = match dispatch!(self, last_prune_checkpoint())? {
            Some(cp) => chain::ChainBase {
                seq: Some(cp.seq),
                hash: cp.hash,
                count: cp.event_count,
            },
            None => chain::ChainBase::genesis(),
        };
        let mut walker = chain::Walker::new(head, base.clone());
        if let Some(a) = anchor {
            walker = walker.with_anchor(a.clone());
            if a.count > 0 && base.seq.is_some_and(|cut| a.seq <= cut) {
                // Before the cut the events are gone: the checkpoint must be consistent with the
                // cut (no more events than it covers) and held by the append-only record.
                if a.count <= base.count && dispatch!(self, checkpoint_recorded(a))? {
                    walker.anchor_met_at_cut();
                } else {
                    let b = ChainBreak {
                        kind: BreakKind::Deleted,
                        seq: a.seq,
                        event_id: String::new(),
                        message: format!(
                            "the checkpoint (seq {}, {} events) lies in the pruned range but no \
                             stored checkpoint matches it: the log was cut or rewritten",
                            a.seq, a.count
                        ),
                    };
                    return Ok(walker.report(Some(b)));
                }
            }
        }
        let mut after = walker.start_after();
        loop {
            let rows = dispatch!(self, chain_page(after, chain::VERIFY_PAGE))?;
            let Some(last) = rows.last() else { break };
            after = last.seq;
            for row in &rows {
                match walker.check(row) {
                    chain::Check::Ok => {}
                    chain::Check::Broken(b) => return Ok(walker.report(Some(b))),
                    chain::Check::Link { row, prev } => {
                        let found = dispatch!(self, event_with_hash(&prev))?;
                        return Ok(walker.report(Some(chain::link_break(&row, found))));
                    }
                }
            }
        }
        if let Some(head_hash) = walker.tail_mismatch() {
            let found = dispatch!(self, event_with_hash(&head_hash))?;
            return Ok(walker.report(Some(walker.tail_break(found))));
        }
        let broken = walker.anchor_break();
        Ok(walker.report(broken))
    }

    /// Record where the chain stands now (kind `export`) and return it, for `broker audit
    /// checkpoint` to sign. Appenders wait while the events are counted.
    pub async fn audit_checkpoint(&self, now: OffsetDateTime) -> Result<Checkpoint, StoreError> {
        dispatch!(self, record_checkpoint(now))
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
        let target = dispatch!(self, prune_target(before))?;
        let mut report = PruneReport {
            deleted: 0,
            cut_seq: None,
            pruned_events: 0,
        };
        if let Some(target) = target {
            while let Some((cp, deleted)) =
                dispatch!(self, prune_batch(target, before, now, PRUNE_BATCH))?
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

    /// The stored checkpoints, oldest first (at most `limit`).
    pub async fn audit_checkpoints(&self, limit: u32) -> Result<Vec<Checkpoint>, StoreError> {
        dispatch!(self, checkpoints(limit))
    }

    /// The freeze in force, if any.
    pub async fn freeze_state(&self) -> Result<Option<FreezeRecord>, StoreError> {
        dispatch!(self, freeze_state())
    }
    /// One transaction: replace the freeze (`None` lifts it) and append `audit`. Returns whether
    /// a freeze was in force before.
    pub async fn set_freeze(
        &self,
        freeze: Option<&FreezeRecord>,
        audit: &AuditEvent,
    ) -> Result<bool, StoreError> {
        let freeze = freeze.map(|f| FreezeRecord {
            filter: text::escape_json(&f.filter).into_owned(),
            reason: text::escape(&f.reason).into_owned(),
            actor: text::escape(&f.actor).into_owned(),
            since: f.since,
        });
        let audit = text::escape_event(audit);
        let audit = &*audit;
        dispatch!(self, set_freeze(freeze.as_ref(), audit))
    }

    pub async fn grant(&self, id: Uuid) -> Result<Option<Grant>, StoreError> {
        dispatch!(self, grant(id))
    }
    pub async fn grant_by_revocation_hash(&self, hash: &str) -> Result<Option<Grant>, StoreError> {
        dispatch!(self, grant_by_revocation_hash(hash))
    }
    /// The id and status of the grant a revocation token belongs to (what a revoke needs
    /// before it claims the grant; no credentials read).
    pub async fn grant_status_by_revocation_hash(
        &self,
        hash: &str,
    ) -> Result<Option<(Uuid, GrantStatus)>, StoreError> {
        match &self.backend {
            Backend::Postgres(pool) => postgres::grant_status_by_revocation_hash(pool, hash).await,
            Backend::Sqlite(_) => Ok(self
                .grant_by_revocation_hash(hash)
                .await?
                .map(|g| (g.id, g.status))),
        }
    }
    /// Status of the grant holding credential `(kind, resource_id)`.
    pub async fn credential_status(
        &self,
        kind: CredentialKind,
        resource_id: &str,
    ) -> Result<Option<CredentialStatus>, StoreError> {
        dispatch!(self, credential_status(kind, resource_id))
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
        dispatch!(self, claim_for_revoke(id, now, lease_until))
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
        dispatch!(
            self,
            claim_due(now, stale_issuing_before, lease_until, limit)
        )
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
            Backend::Postgres(_) => bounded(self.writer()?.submit(op, audit)).await,
            Backend::Sqlite(pool) => {
                bounded(sqlite::finish_revoke(pool, id, cause, now, audit)).await
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
        dispatch!(self, revoke_failed(id, &error, retry_at, audit))
    }
    /// Active grants (for revoke-all), oldest first.
    pub async fn active_grants(&self, limit: u32) -> Result<Vec<Grant>, StoreError> {
        dispatch!(self, active_grants(limit))
    }
    /// One page of the active grants `select` matches, oldest first (creation time, then id),
    /// after `after`, with their credentials: two queries whatever the page size.
    pub async fn active_grants_page(
        &self,
        select: &GrantSelect,
        after: Option<GrantCursor>,
        limit: u32,
    ) -> Result<Vec<Grant>, StoreError> {
        let select = &GrantSelect {
            issuer: text::escape_opt(&select.issuer),
            repository: text::escape_opt(&select.repository),
            repository_id: text::escape_opt(&select.repository_id),
            credential: text::escape_opt(&select.credential),
            kind: text::escape_opt(&select.kind),
            ..select.clone()
        };
        dispatch!(self, active_grants_page(select, after, limit))
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
        // Copied only when some event needs escaping (revoke-all pages hold a thousand).
        let escaped: Vec<AuditEvent>;
        let audits = if audits
            .iter()
            .any(|a| matches!(text::escape_event(a), std::borrow::Cow::Owned(_)))
        {
            escaped = audits
                .iter()
                .map(|a| text::escape_event(a).into_owned())
                .collect();
            &escaped[..]
        } else {
            audits
        };
        dispatch!(self, revoke_in_store(now, audits))
    }
    /// Record a single-use job token's `jti` on its own (a job token used as an OIDC operator
    /// credential). A live record → `StoreError::Replayed`; an expired one is replaced. Shares
    /// `used_jti` with exchanges, so one token serves either one exchange or one operator call.
    pub async fn record_jti(&self, jti: &JtiRecord, now: OffsetDateTime) -> Result<(), StoreError> {
        let jti = text::escape_jti(jti);
        let jti = &*jti;
        dispatch!(self, record_jti(jti, now))
    }
    /// Active grants of one finished job (job-end webhooks), oldest first.
    pub async fn active_job_grants(
        &self,
        job: &JobMatch,
        limit: u32,
    ) -> Result<Vec<Grant>, StoreError> {
        let e = |s: &str| text::escape(s).into_owned();
        let job = &JobMatch {
            issuers: job.issuers.iter().map(|s| e(s)).collect(),
            platform: e(&job.platform),
            repository_id: e(&job.repository_id),
            job_id: e(&job.job_id),
            run_id: text::escape_opt(&job.run_id),
            run_attempt: text::escape_opt(&job.run_attempt),
        };
        dispatch!(self, active_job_grants(job, limit))
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
        dispatch!(self, record_delivery(source, id, now, expires_at))
    }
    /// Drop a delivery record (the delivery could not be processed; let a retry through).
    pub async fn forget_delivery(&self, source: &str, id: &str) -> Result<(), StoreError> {
        let (source, id) = (text::escape(source), text::escape(id));
        let (source, id) = (&*source, &*id);
        dispatch!(self, forget_delivery(source, id))
    }
    /// Delete webhook delivery records past their window. Returns how many.
    pub async fn purge_deliveries(&self, now: OffsetDateTime) -> Result<u64, StoreError> {
        dispatch!(self, purge_deliveries(now))
    }
    /// Delete replay records past their window. Returns how many.
    pub async fn purge_jti(&self, now: OffsetDateTime) -> Result<u64, StoreError> {
        dispatch!(self, purge_jti(now))
    }
    pub async fn stats(&self) -> Result<StoreStats, StoreError> {
        dispatch!(self, stats())
    }
    /// Metrics gauges: active grants per credential kind, and the expiry of the oldest grant
    /// past `now` that is not yet revoked (the reaper's lag). Two indexed queries.
    pub async fn gauges(&self, now: OffsetDateTime) -> Result<StoreGauges, StoreError> {
        dispatch!(self, gauges(now))
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
            Backend::Postgres(pool) => {
                let mut tx = pool.begin().await?;
                sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
                    .bind(key)
                    .execute(&mut *tx)
                    .await?;
                let out = work.await;
                tx.commit().await?;
                Ok(out)
            }
            Backend::Sqlite(_) => Ok(work.await),
        }
    }
}

/// An audit filter with its text escaped as stored text is (see `text.rs`), so a filter value
/// reaches SQL only in a form the store can hold, and finds what was stored escaped.
fn escape_filter(f: &AuditFilter) -> AuditFilter {
    AuditFilter {
        request_id: text::escape_opt(&f.request_id),
        repository: text::escape_opt(&f.repository),
        outcome: text::escape_opt(&f.outcome),
        reason: text::escape_opt(&f.reason),
        repository_id: text::escape_opt(&f.repository_id),
        actor: text::escape_opt(&f.actor),
        credential: text::escape_opt(&f.credential),
        kind: text::escape_opt(&f.kind),
        ..f.clone()
    }
}

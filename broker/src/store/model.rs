//! The store's data types: what callers hand in and get back. No SQL here.

use crate::audit::AuditEvent;
use crate::providers::IssuedCredential;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
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

/// The credential whose secret has a given SHA-256 (a leak report, an opaque token's
/// introspection), with its grant's status.
#[derive(Debug, Clone, PartialEq)]
pub struct SecretMatch {
    pub grant_id: Uuid,
    pub grant_status: GrantStatus,
    pub expires_at: OffsetDateTime,
    pub created_at: OffsetDateTime,
    pub credential: IssuedCredential,
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
    /// Revocation events whose check on the target did (`true`) or did not (`false`) show
    /// the old access gone (`AuditEvent::verified`).
    pub verified: Option<bool>,
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

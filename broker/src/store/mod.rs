//! The store: grants (leases), replay records and audit events, in Postgres (production) or
//! SQLite (embedded default). The only module that contains SQL.
//!
//! INTERFACE CONTRACT: the exchange, revoke, reaper and HTTP code call exactly these
//! functions. Bodies are filled in by the store implementation.

use crate::audit::AuditEvent;
use crate::providers::{CredentialKind, IssuedCredential};
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
        matches!(self, GrantStatus::Revoked | GrantStatus::Expired | GrantStatus::Failed)
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

/// Filter for reading audit events back (CLI, tests; issue 6 extends it).
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    pub grant_id: Option<Uuid>,
    pub request_id: Option<String>,
    pub repository: Option<String>,
    pub outcome: Option<String>,
    pub reason: Option<String>,
    pub since: Option<OffsetDateTime>,
    /// Newest first; at most this many (capped at 1000).
    pub limit: u32,
}

/// Counts for `/readyz` and metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct StoreStats {
    pub active_grants: i64,
    pub issuing_grants: i64,
    /// Grants in `revoking` whose last attempt failed.
    pub revoke_failures_pending: i64,
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
}

/// The store handle; cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    _private: (),
}

#[allow(unused_variables, clippy::unused_async)]
impl Store {
    /// Connect by URL: `postgres://…` or `sqlite:PATH` / `sqlite::memory:`. Does not migrate.
    pub async fn connect(url: &str) -> Result<Store, StoreError> {
        unimplemented!()
    }
    /// Apply migrations from `migrations/postgres` or `migrations/sqlite` (embedded).
    pub async fn migrate(&self) -> Result<(), StoreError> {
        unimplemented!()
    }
    /// `SELECT 1` with a short timeout.
    pub async fn ping(&self) -> Result<(), StoreError> {
        unimplemented!()
    }
    /// Which backend (`postgres` | `sqlite`).
    pub fn backend(&self) -> &'static str {
        unimplemented!()
    }

    /// One transaction: record `jti` (if given; a live duplicate → `StoreError::Replayed`,
    /// an expired duplicate is replaced) and insert the grant in `issuing` with its credentials.
    pub async fn begin_grant(&self, grant: &NewGrant, jti: Option<&JtiRecord>) -> Result<(), StoreError> {
        unimplemented!()
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
        unimplemented!()
    }
    /// One transaction: `issuing` → `failed` (nothing minted is left: caller revoked it first),
    /// delete the `jti` record if given (an exchange that issued nothing does not consume the
    /// token), append `audit`.
    pub async fn fail_grant(&self, id: Uuid, release_jti: Option<&JtiRecord>, audit: &AuditEvent) -> Result<(), StoreError> {
        unimplemented!()
    }
    /// Append one audit event on its own.
    pub async fn append_audit(&self, audit: &AuditEvent) -> Result<(), StoreError> {
        unimplemented!()
    }
    /// Read audit events back, newest first.
    pub async fn audit_events(&self, filter: &AuditFilter) -> Result<Vec<AuditEvent>, StoreError> {
        unimplemented!()
    }

    pub async fn grant(&self, id: Uuid) -> Result<Option<Grant>, StoreError> {
        unimplemented!()
    }
    pub async fn grant_by_revocation_hash(&self, hash: &str) -> Result<Option<Grant>, StoreError> {
        unimplemented!()
    }
    /// Status of the grant holding credential `(kind, resource_id)`.
    pub async fn credential_status(&self, kind: CredentialKind, resource_id: &str) -> Result<Option<CredentialStatus>, StoreError> {
        unimplemented!()
    }

    /// Claim one grant for a requested revocation: `active` | `issuing` | `revoking` (lease
    /// expired) → `revoking` with a lease until `now + lease`. Returns `None` if the grant is in a
    /// final state or another worker holds a live lease (idempotent revoke).
    pub async fn claim_for_revoke(&self, id: Uuid, now: OffsetDateTime, lease: Duration) -> Result<Option<ClaimedGrant>, StoreError> {
        unimplemented!()
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
        unimplemented!()
    }
    /// One transaction: `revoking` → the cause's final status, `revoked_at = now`, append audit.
    pub async fn finish_revoke(&self, id: Uuid, cause: RevokeCause, now: OffsetDateTime, audit: &AuditEvent) -> Result<(), StoreError> {
        unimplemented!()
    }
    /// One transaction: keep `revoking`, count the attempt, record the (non-secret) error, set
    /// the lease to `retry_at` so the reaper retries then, append audit.
    pub async fn revoke_failed(&self, id: Uuid, error: &str, retry_at: OffsetDateTime, audit: &AuditEvent) -> Result<(), StoreError> {
        unimplemented!()
    }
    /// Active grants (for revoke-all), oldest first.
    pub async fn active_grants(&self, limit: u32) -> Result<Vec<Grant>, StoreError> {
        unimplemented!()
    }
    /// Delete replay records past their window. Returns how many.
    pub async fn purge_jti(&self, now: OffsetDateTime) -> Result<u64, StoreError> {
        unimplemented!()
    }
    pub async fn stats(&self) -> Result<StoreStats, StoreError> {
        unimplemented!()
    }
}

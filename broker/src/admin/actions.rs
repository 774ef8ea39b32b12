//! What operator actions answer: the freeze in force, the revoke-all report and the tally of
//! grants sent down the revoke path. The actions
//! themselves are `service/operators.rs`.

use super::GrantFilter;
use crate::providers::CredentialKind;
use crate::store::FreezeRecord;
use serde::Serialize;
use std::collections::BTreeMap;
use time::OffsetDateTime;
use uuid::Uuid;

/// The freeze in force.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Freeze {
    pub filter: GrantFilter,
    pub reason: String,
    pub actor: String,
    #[serde(with = "time::serde::rfc3339")]
    pub since: OffsetDateTime,
}

impl Freeze {
    /// A stored freeze whose filter this build cannot read freezes everything (fail closed).
    pub(crate) fn from_record(r: FreezeRecord) -> Self {
        let filter = serde_json::from_value(r.filter).unwrap_or_default();
        Self {
            filter,
            reason: r.reason,
            actor: r.actor,
            since: r.since,
        }
    }
}

/// One grant revoke-all could not revoke now; it stays queued for the reaper.
#[derive(Debug, Clone, Serialize)]
pub struct RevokeFailure {
    pub grant_id: Uuid,
    pub reason: String,
}

/// What became of a set of grants sent down the revoke path (a revoke-all, a webhook's job):
/// part of both reports, flattened into their JSON.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RevokeTally {
    /// Grants revoked by this call.
    pub revoked_grants: usize,
    /// Credentials revoked, per kind.
    pub revoked: BTreeMap<String, usize>,
    /// Grants another worker (the job's own revoke, the reaper) was already revoking.
    pub already_in_progress: usize,
    /// Grants whose revocation failed; the reaper retries them.
    pub failures: Vec<RevokeFailure>,
}

impl RevokeTally {
    /// Count one revoked grant with its credentials' kinds.
    pub fn revoked(&mut self, kinds: impl IntoIterator<Item = CredentialKind>) {
        self.revoked_grants += 1;
        for k in kinds {
            *self.revoked.entry(k.as_str().to_owned()).or_default() += 1;
        }
    }

    /// Add another tally's counts to this one.
    pub fn merge(&mut self, other: RevokeTally) {
        self.revoked_grants += other.revoked_grants;
        for (k, n) in other.revoked {
            *self.revoked.entry(k).or_default() += n;
        }
        self.already_in_progress += other.already_in_progress;
        self.failures.extend(other.failures);
    }
}

/// What one revoke-all did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RevokeAllReport {
    /// Active grants matching the filter that this call reached.
    pub matched: usize,
    /// What became of them.
    #[serde(flatten)]
    pub tally: RevokeTally,
    /// Every grant the filter matched when this call reached it has been handled. `false`: the
    /// call ran out of its time budget ([`REVOKE_ALL_CALL_BUDGET`]); call again to continue
    /// (the grants revoked so far stay revoked and are not selected again).
    pub complete: bool,
    /// `!complete` (kept for clients of the earlier answer).
    pub truncated: bool,
    /// Store pages taken (each [`REVOKE_ALL_PAGE`] grants at most, or
    /// more after pages revoked in the store alone: `Store::in_store_revoke_page`).
    pub pages: usize,
    /// Grants revoked set-based (in-store credentials, a page per transaction).
    pub revoked_in_store: usize,
    /// How long this call took, in milliseconds.
    pub elapsed_ms: u64,
    /// Provider-wide kill switches applied (only when the filter selects nothing narrower than
    /// a credential kind): e.g. AWS roles get a deny on sessions issued before now.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub provider_wide: BTreeMap<String, serde_json::Value>,
}

//! What a delivery answers. The delivery's life is `service/webhook.rs`.

use crate::admin::RevokeFailure;
use serde::Serialize;
use std::collections::BTreeMap;

/// What one acted-on delivery did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct HookReport {
    /// Active grants of the job.
    pub matched: usize,
    /// Grants revoked by this delivery.
    pub revoked_grants: usize,
    /// Credentials revoked, per kind.
    pub revoked: BTreeMap<String, usize>,
    /// Grants another worker (the job's own revoke, the reaper) was already revoking.
    pub already_in_progress: usize,
    /// Grants whose revocation failed; the reaper retries them.
    pub failures: Vec<RevokeFailure>,
}

/// The answer to a delivery that was not refused.
#[derive(Debug, Clone)]
pub enum HookOutcome {
    /// Verified, but nothing to do (why).
    Ignored(&'static str),
    /// A job ended; its grants were handled.
    Done(HookReport),
}

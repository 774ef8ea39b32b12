//! Audit events: one for every exchange attempt (allow or deny), every revocation and every
//! reaping.
//!
//! Invariant: an [`AuditEvent`] never holds a secret value. It is built from verified claims,
//! policy decisions and non-secret resource ids only; secrets are [`crate::secret::Sensitive`],
//! which is not `Serialize`, so they cannot be put here.

pub mod checkpoint;
pub mod export;
pub mod stream;

pub use crate::oidc::JobAttribution;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// `POST /v1/exchange`
    Exchange,
    /// `POST /v1/revoke` (caller presented a revocation token)
    Revoke,
    /// The reaper revoked an expired grant.
    Expire,
    /// The reaper cleaned up a grant left in `issuing` by a crash.
    Recover,
    /// A revocation attempt failed and will be retried.
    RevokeFailed,
    /// Operator action (revoke-all, freeze, ...).
    Admin,
    /// A job-end webhook delivery (`/v1/hooks/*`): acted on or refused.
    Webhook,
    /// A leak report (`/v1/leaks/github`, `/v1/leaks`): acted on or refused.
    LeakReported,
}

impl Action {
    /// The name written in the audit log (`exchange`, `revoke_failed`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Exchange => "exchange",
            Action::Revoke => "revoke",
            Action::Expire => "expire",
            Action::Recover => "recover",
            Action::RevokeFailed => "revoke_failed",
            Action::Admin => "admin",
            Action::Webhook => "webhook",
            Action::LeakReported => "leak_reported",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Allow,
    Deny,
    Error,
    Success,
    Failure,
}

/// One audit record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEvent {
    pub id: Uuid,
    #[serde(with = "time::serde::rfc3339")]
    pub time: OffsetDateTime,
    /// The broker's own request id (also sent back as `X-Request-Id`).
    pub request_id: Option<String>,
    /// The caller's `X-Request-Id`, only when it matched `[A-Za-z0-9._-]{1,64}`. Absent from the
    /// JSON when unset, so events written before this field hash exactly as they did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_request_id: Option<String>,
    pub action: Action,
    pub outcome: Outcome,
    /// Stable reason code (`ok`, `token_expired`, `policy_denied`, ...).
    pub reason: String,
    pub grant_id: Option<Uuid>,
    #[serde(default)]
    pub job: JobAttribution,
    #[serde(default)]
    pub rules_matched: Vec<String>,
    pub bundle_digest: Option<String>,
    #[serde(default)]
    pub credentials_requested: Vec<String>,
    #[serde(default)]
    pub credentials_granted: Vec<String>,
    /// Non-secret ids of the resources minted or revoked (role names, token ids, session names).
    #[serde(default)]
    pub resource_ids: Vec<String>,
    pub ttl_seconds: Option<i64>,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub expires_at: Option<OffsetDateTime>,
    pub client_addr: Option<String>,
    pub user_agent: Option<String>,
    /// Who acted for revocations and admin actions (`job`, `reaper`, `operator:<name>`).
    pub actor: Option<String>,
    /// Free-form, non-secret detail (e.g. which credential was denied and why).
    pub detail: Option<String>,
    /// Fields whose request-controlled value was cut to its cap (`refusals::fields`); absent
    /// when nothing was cut.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub truncated: Vec<String>,
    /// On a revocation: whether the target showed afterwards that the old access no longer
    /// works (`Provider::verify_revoked`); absent where no target could be asked, so events
    /// written before this field hash exactly as they did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified: Option<bool>,
    /// Set on an aggregate event: refusals counted here instead of one row each
    /// (`refusals::aggregate`); absent on every other event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aggregate: Option<RefusalAggregate>,
}

/// Similar refusals (same client, action and reason) of one window, counted in one event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefusalAggregate {
    /// Refusals this event stands for (none of them has a row of its own).
    pub count: u64,
    /// Refusals of the same key and window that do have their own row.
    pub recorded: u64,
    #[serde(with = "time::serde::rfc3339")]
    pub first_seen: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub last_seen: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub window_start: OffsetDateTime,
    pub window_seconds: i64,
}

impl AuditEvent {
    /// A new event with the given action/outcome/reason at `time`; the rest empty.
    pub fn new(time: OffsetDateTime, action: Action, outcome: Outcome, reason: &str) -> Self {
        Self {
            id: Uuid::now_v7(),
            time,
            request_id: None,
            client_request_id: None,
            action,
            outcome,
            reason: reason.to_owned(),
            grant_id: None,
            job: JobAttribution::default(),
            rules_matched: Vec::new(),
            bundle_digest: None,
            credentials_requested: Vec::new(),
            credentials_granted: Vec::new(),
            resource_ids: Vec::new(),
            ttl_seconds: None,
            expires_at: None,
            client_addr: None,
            user_agent: None,
            actor: None,
            detail: None,
            truncated: Vec::new(),
            verified: None,
            aggregate: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Action;

    #[test]
    fn action_names_are_the_serialized_ones() {
        for a in [
            Action::Exchange,
            Action::Revoke,
            Action::Expire,
            Action::Recover,
            Action::RevokeFailed,
            Action::Admin,
            Action::Webhook,
            Action::LeakReported,
        ] {
            assert_eq!(serde_json::to_value(a).unwrap(), a.as_str());
        }
    }
}

//! Audit events: one for every exchange attempt (allow or deny), every revocation and every
//! reaping.
//!
//! Invariant: an [`AuditEvent`] never holds a secret value. It is built from verified claims,
//! policy decisions and non-secret resource ids only; secrets are [`crate::secret::Sensitive`],
//! which is not `Serialize`, so they cannot be put here.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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

/// Job attribution taken from verified claims (GitHub and GitLab names mapped to one shape).
/// Every field is optional because issuers differ; none is secret.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobAttribution {
    pub issuer: Option<String>,
    pub platform: Option<String>,
    pub iss: Option<String>,
    pub sub: Option<String>,
    /// GitHub `repository`, GitLab `project_path`.
    pub repository: Option<String>,
    /// GitHub `repository_id`, GitLab `project_id`.
    pub repository_id: Option<String>,
    /// GitHub `repository_owner`, GitLab `namespace_path`.
    pub owner: Option<String>,
    /// GitHub `repository_owner_id`, GitLab `namespace_id`.
    pub owner_id: Option<String>,
    #[serde(rename = "ref")]
    pub git_ref: Option<String>,
    pub sha: Option<String>,
    pub workflow: Option<String>,
    pub job_workflow_ref: Option<String>,
    /// GitHub `run_id`, GitLab `pipeline_id`.
    pub run_id: Option<String>,
    pub run_attempt: Option<String>,
    /// GitHub `check_run_id` / `job_workflow_ref`-less job id, GitLab `job_id`.
    pub job_id: Option<String>,
    pub actor: Option<String>,
    pub event: Option<String>,
    pub environment: Option<String>,
    pub runner_environment: Option<String>,
}

/// One audit record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEvent {
    pub id: Uuid,
    #[serde(with = "time::serde::rfc3339")]
    pub time: OffsetDateTime,
    pub request_id: Option<String>,
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
}

impl AuditEvent {
    /// A new event with the given action/outcome/reason at `time`; the rest empty.
    pub fn new(time: OffsetDateTime, action: Action, outcome: Outcome, reason: &str) -> Self {
        Self {
            id: Uuid::now_v7(),
            time,
            request_id: None,
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
        }
    }
}

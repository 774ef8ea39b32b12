//! Audit events: one for every exchange attempt (allow or deny), every revocation and every
//! reaping.
//!
//! Invariant: an [`AuditEvent`] never holds a secret value. It is built from verified claims,
//! policy decisions and non-secret resource ids only; secrets are [`crate::secret::Sensitive`],
//! which is not `Serialize`, so they cannot be put here.

pub mod checkpoint;

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
            aggregate: None,
        }
    }
}

fn claim_str(claims: &serde_json::Map<String, serde_json::Value>, key: &str) -> Option<String> {
    match claims.get(key)? {
        serde_json::Value::String(s) if !s.is_empty() => Some(truncate(s)),
        serde_json::Value::Number(n) => Some(n.to_string()),
        serde_json::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Claims are attacker-influenced strings of any length; the audit log keeps a bounded prefix.
fn truncate(s: &str) -> String {
    const MAX: usize = 512;
    if s.len() <= MAX {
        return s.to_owned();
    }
    format!("{}…", &s[..s.floor_char_boundary(MAX)])
}

impl JobAttribution {
    /// Map GitHub and GitLab claim names onto one shape.
    pub fn from_claims(claims: &crate::oidc::VerifiedClaims) -> Self {
        use crate::oidc::Platform;
        let c = &claims.claims;
        let pick = |gh: &str, gl: &str| match claims.platform {
            Platform::Github => claim_str(c, gh),
            Platform::Gitlab => claim_str(c, gl),
        };
        Self {
            issuer: Some(claims.issuer.clone()),
            platform: Some(claims.platform.as_str().to_owned()),
            iss: Some(claims.iss.clone()),
            sub: Some(truncate(&claims.sub)),
            repository: pick("repository", "project_path"),
            repository_id: pick("repository_id", "project_id"),
            owner: pick("repository_owner", "namespace_path"),
            owner_id: pick("repository_owner_id", "namespace_id"),
            git_ref: claim_str(c, "ref"),
            sha: claim_str(c, "sha"),
            workflow: pick("workflow", "ci_config_ref_uri"),
            job_workflow_ref: pick("job_workflow_ref", "ci_config_ref_uri"),
            run_id: pick("run_id", "pipeline_id"),
            run_attempt: pick("run_attempt", "__none__"),
            job_id: pick("check_run_id", "job_id"),
            actor: pick("actor", "user_login"),
            event: pick("event_name", "pipeline_source"),
            environment: claim_str(c, "environment"),
            runner_environment: claim_str(c, "runner_environment"),
        }
    }

    /// The job identity kept with a grant (for job-end webhooks), as JSON.
    pub fn job_key(&self) -> serde_json::Value {
        serde_json::json!({
            "platform": self.platform,
            "repository_id": self.repository_id,
            "run_id": self.run_id,
            "run_attempt": self.run_attempt,
            "job_id": self.job_id,
        })
    }
}

//! Job attribution: the verified claims of a GitHub or GitLab job mapped onto one shape, for the
//! audit log, AWS session names and tags, and the job key kept with a grant. Derived from
//! verified claims only; no field is secret. Lives here (not in `audit`) so that providers and
//! the audit log both take it from the module that owns the claims.

use super::{Platform, VerifiedClaims};
use serde::{Deserialize, Serialize};

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
    pub fn from_claims(claims: &VerifiedClaims) -> Self {
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

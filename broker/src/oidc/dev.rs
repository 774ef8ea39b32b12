//! Built-in dev issuer for `broker dev`: lets a developer mint GitHub- and GitLab-shaped job
//! tokens locally without a CI system.
//!
//! !!! THE DEV KEY IS PUBLIC !!! `dev_key.pem` is committed to the repository, so anyone can sign
//! tokens this issuer accepts. Its configs carry `danger_dev_issuer: true` and the config loader
//! refuses such an issuer outside dev mode. The issuer hosts end in `.invalid` (RFC 6761), so
//! they can never be real or reachable, and the keys are inline: nothing is ever fetched.

use serde_json::{Value, json};
use time::{Duration, OffsetDateTime};

use super::{IssuerConfig, Platform};

/// `iss` of dev GitHub-shaped tokens.
pub const DEV_ISSUER: &str = "https://dev-issuer.broker.invalid";
/// `iss` of dev GitLab-shaped tokens.
pub const DEV_GITLAB_ISSUER: &str = "https://dev-gitlab.broker.invalid";
/// `kid` of the dev key.
pub const DEV_KID: &str = "broker-dev-1";

/// PUBLIC, DEV-ONLY private key. Never trust tokens it signs outside dev mode.
const DEV_KEY_PEM: &str = include_str!("dev_key.pem");
/// The matching public JWKS.
const DEV_JWKS: &str = include_str!("dev_jwks.json");

#[derive(Debug, thiserror::Error)]
pub enum DevError {
    #[error("dev token signing failed: {0}")]
    Signing(String),
}

impl DevError {
    pub fn reason_code(&self) -> &'static str {
        match self {
            DevError::Signing(_) => "dev_signing_failed",
        }
    }
}

fn dev_config(name: &str, audience: &str, platform: Platform, iss: &str) -> IssuerConfig {
    let mut c = IssuerConfig::new(name, platform, Some(iss.to_owned()));
    c.inline_jwks = Some(DEV_JWKS.to_owned());
    c.audience = Some(audience.to_owned());
    c.danger_dev_issuer = true;
    c
}

/// The dev GitHub-shaped issuer (inline keys, `danger_dev_issuer: true`).
pub fn issuer_config(name: &str, audience: &str) -> IssuerConfig {
    dev_config(name, audience, Platform::Github, DEV_ISSUER)
}

/// The dev GitLab-shaped issuer (inline keys, `danger_dev_issuer: true`).
pub fn gitlab_issuer_config(name: &str, audience: &str) -> IssuerConfig {
    dev_config(name, audience, Platform::Gitlab, DEV_GITLAB_ISSUER)
}

/// Sign claims with the dev key (RS256, `kid` [`DEV_KID`]).
pub fn sign(claims: &Value) -> Result<String, DevError> {
    let key = jsonwebtoken::EncodingKey::from_rsa_pem(DEV_KEY_PEM.as_bytes())
        .map_err(|e| DevError::Signing(e.to_string()))?;
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    header.kid = Some(DEV_KID.to_owned());
    jsonwebtoken::encode(&header, claims, &key).map_err(|e| DevError::Signing(e.to_string()))
}

/// A simulated CI job. Field names follow GitHub; [`gitlab_claims`] maps them to GitLab's.
#[derive(Debug, Clone)]
pub struct DevJob {
    /// `owner/name` (GitLab: project path `group/project`).
    pub repository: String,
    pub repository_id: u64,
    /// Owner login (GitLab: namespace path).
    pub owner: String,
    pub owner_id: u64,
    /// Full ref, e.g. `refs/heads/main` or `refs/tags/v1`.
    pub git_ref: String,
    /// GitHub event (`push`, `pull_request`, `workflow_dispatch`); GitLab pipeline source.
    pub event_name: String,
    pub environment: Option<String>,
    /// Workflow name (GitHub) / unused by GitLab.
    pub workflow: String,
    pub actor: String,
    /// Workflow run id (GitHub) / pipeline id (GitLab).
    pub run_id: u64,
    pub audience: String,
    pub ttl: Duration,
    pub now: OffsetDateTime,
}

impl DevJob {
    /// A plausible push-to-main job of `acme/app`.
    pub fn example(audience: &str, now: OffsetDateTime) -> Self {
        Self {
            repository: "acme/app".into(),
            repository_id: 123_456_789,
            owner: "acme".into(),
            owner_id: 4_242_424,
            git_ref: "refs/heads/main".into(),
            event_name: "push".into(),
            environment: None,
            workflow: "deploy".into(),
            actor: "octocat".into(),
            run_id: 9_876_543_210,
            audience: audience.into(),
            ttl: Duration::minutes(5),
            now,
        }
    }

    /// The job the example policies (`policies/github.yaml`) allow `deploy-api` for: a push to
    /// main of `acme/api`, repository id 1000001, owner id 9000001. Tests vary it from here.
    pub fn acme_api(audience: &str, now: OffsetDateTime) -> Self {
        Self {
            repository: "acme/api".into(),
            repository_id: 1_000_001,
            owner_id: 9_000_001,
            run_id: 1,
            ..Self::example(audience, now)
        }
    }

    fn ref_type(&self) -> &'static str {
        if self.git_ref.starts_with("refs/tags/") {
            "tag"
        } else {
            "branch"
        }
    }

    fn short_ref(&self) -> &str {
        self.git_ref
            .strip_prefix("refs/heads/")
            .or_else(|| self.git_ref.strip_prefix("refs/tags/"))
            .unwrap_or(&self.git_ref)
    }

    /// A stable fake commit id derived from the job, 40 hex digits like a git SHA-1.
    fn sha(&self) -> String {
        let mut h =
            crate::secret::sha256_hex(format!("{}@{}", self.repository, self.run_id).as_bytes());
        h.truncate(40);
        h
    }

    fn times(&self) -> (i64, i64, i64) {
        let iat = self.now.unix_timestamp();
        (iat, iat, iat.saturating_add(self.ttl.whole_seconds()))
    }
}

/// Claims the way GitHub Actions puts them in a job's OIDC token (ids are strings there).
pub fn github_claims(job: &DevJob) -> Value {
    let (iat, nbf, exp) = job.times();
    let sha = job.sha();
    let workflow_path = format!(".github/workflows/{}.yml", job.workflow);
    let workflow_ref = format!("{}/{}@{}", job.repository, workflow_path, job.git_ref);
    let sub = match (&job.environment, job.event_name.as_str()) {
        (Some(env), _) => format!("repo:{}:environment:{env}", job.repository),
        (None, "pull_request") => format!("repo:{}:pull_request", job.repository),
        (None, _) => format!("repo:{}:ref:{}", job.repository, job.git_ref),
    };
    let (head_ref, base_ref) = if job.event_name == "pull_request" {
        ("feature", "main")
    } else {
        ("", "")
    };
    let mut c = json!({
        "jti": uuid::Uuid::new_v4().to_string(),
        "sub": sub,
        "aud": job.audience,
        "ref": job.git_ref,
        "ref_type": job.ref_type(),
        "ref_protected": (job.short_ref() == "main").to_string(),
        "sha": sha,
        "repository": job.repository,
        "repository_id": job.repository_id.to_string(),
        "repository_owner": job.owner,
        "repository_owner_id": job.owner_id.to_string(),
        "repository_visibility": "private",
        "run_id": job.run_id.to_string(),
        "run_number": "42",
        "run_attempt": "1",
        "actor": job.actor,
        "actor_id": "583231",
        "workflow": job.workflow,
        "workflow_ref": workflow_ref,
        "workflow_sha": sha,
        "job_workflow_ref": workflow_ref,
        "job_workflow_sha": sha,
        "head_ref": head_ref,
        "base_ref": base_ref,
        "event_name": job.event_name,
        "runner_environment": "github-hosted",
        "check_run_id": (job.run_id.wrapping_mul(3) % 100_000_000_000).to_string(),
        "iss": DEV_ISSUER,
        "nbf": nbf,
        "exp": exp,
        "iat": iat,
    });
    if let (Some(env), Some(obj)) = (&job.environment, c.as_object_mut()) {
        obj.insert("environment".into(), Value::String(env.clone()));
    }
    c
}

/// Claims the way GitLab CI puts them in an `id_tokens` token.
pub fn gitlab_claims(job: &DevJob) -> Value {
    let (iat, nbf, exp) = job.times();
    let short_ref = job.short_ref();
    let ref_type = job.ref_type();
    let host = DEV_GITLAB_ISSUER.trim_start_matches("https://");
    let mut c = json!({
        "namespace_id": job.owner_id.to_string(),
        "namespace_path": job.owner,
        "project_id": job.repository_id.to_string(),
        "project_path": job.repository,
        "user_id": "583231",
        "user_login": job.actor,
        "user_email": format!("{}@example.com", job.actor),
        "user_access_level": "developer",
        "pipeline_id": job.run_id.to_string(),
        "pipeline_source": job.event_name,
        "job_id": (job.run_id.wrapping_add(7)).to_string(),
        "ref": short_ref,
        "ref_type": ref_type,
        "ref_path": job.git_ref,
        "ref_protected": (short_ref == "main").to_string(),
        "runner_id": 12_270_857,
        "runner_environment": "gitlab-hosted",
        "sha": job.sha(),
        "project_visibility": "private",
        "ci_config_ref_uri": format!("{host}/{}//.gitlab-ci.yml@{}", job.repository, job.git_ref),
        "ci_config_sha": job.sha(),
        "jti": uuid::Uuid::new_v4().to_string(),
        "iss": DEV_GITLAB_ISSUER,
        "iat": iat,
        "nbf": nbf,
        "exp": exp,
        "sub": format!("project_path:{}:ref_type:{ref_type}:ref:{short_ref}", job.repository),
        "aud": job.audience,
    });
    if let (Some(env), Some(obj)) = (&job.environment, c.as_object_mut()) {
        obj.insert("environment".into(), Value::String(env.clone()));
        obj.insert("environment_protected".into(), Value::String("true".into()));
        obj.insert("deployment_tier".into(), Value::String("production".into()));
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oidc::{Verifier, VerifierOptions};
    use crate::time::ManualClock;
    use std::sync::Arc;

    const NOW: i64 = 1_750_000_000;

    fn verifier() -> Verifier {
        Verifier::new(
            "broker".into(),
            vec![
                issuer_config("dev", "broker"),
                gitlab_issuer_config("dev-gitlab", "broker"),
            ],
            Arc::new(ManualClock::at_unix(NOW)),
            VerifierOptions::default(),
        )
        .unwrap()
    }

    fn job() -> DevJob {
        DevJob::example("broker", OffsetDateTime::from_unix_timestamp(NOW).unwrap())
    }

    #[tokio::test]
    async fn dev_github_token_verifies_offline() {
        let v = verifier();
        let mut j = job();
        j.environment = Some("prod".into());
        let c = v.verify(&sign(&github_claims(&j)).unwrap()).await.unwrap();
        assert_eq!(c.issuer, "dev");
        assert_eq!(c.platform, Platform::Github);
        assert_eq!(c.sub, "repo:acme/app:environment:prod");
        assert_eq!(c.claims["environment"], "prod");
        assert_eq!(c.claims["repository_id"], "123456789");
        assert_eq!(v.jwks_fetch_count("dev"), 0);
        assert!(
            v.health()
                .iter()
                .all(|h| h.static_keys && h.keys_loaded == 1)
        );
    }

    #[tokio::test]
    async fn dev_gitlab_token_verifies_offline() {
        let v = verifier();
        let c = v
            .verify(&sign(&gitlab_claims(&job())).unwrap())
            .await
            .unwrap();
        assert_eq!(c.issuer, "dev-gitlab");
        assert_eq!(c.platform, Platform::Gitlab);
        assert_eq!(c.sub, "project_path:acme/app:ref_type:branch:ref:main");
        assert_eq!(
            c.claims["ci_config_ref_uri"],
            "dev-gitlab.broker.invalid/acme/app//.gitlab-ci.yml@refs/heads/main"
        );
    }

    #[test]
    fn claim_sets_are_complete() {
        let g = github_claims(&job());
        for k in [
            "jti",
            "sub",
            "aud",
            "ref",
            "ref_type",
            "ref_protected",
            "sha",
            "repository",
            "repository_id",
            "repository_owner",
            "repository_owner_id",
            "repository_visibility",
            "run_id",
            "run_number",
            "run_attempt",
            "actor",
            "actor_id",
            "workflow",
            "workflow_ref",
            "workflow_sha",
            "job_workflow_ref",
            "job_workflow_sha",
            "head_ref",
            "base_ref",
            "event_name",
            "runner_environment",
            "check_run_id",
            "iss",
            "nbf",
            "exp",
            "iat",
        ] {
            assert!(g.get(k).is_some(), "github claim {k} missing");
        }
        assert_eq!(g["sub"], "repo:acme/app:ref:refs/heads/main");
        assert_eq!(g["exp"].as_i64().unwrap() - g["iat"].as_i64().unwrap(), 300);
        let mut j = job();
        j.environment = Some("prod".into());
        let l = gitlab_claims(&j);
        for k in [
            "namespace_id",
            "namespace_path",
            "project_id",
            "project_path",
            "user_id",
            "user_login",
            "user_email",
            "pipeline_id",
            "pipeline_source",
            "job_id",
            "ref",
            "ref_type",
            "ref_protected",
            "environment",
            "environment_protected",
            "runner_id",
            "runner_environment",
            "sha",
            "ci_config_ref_uri",
            "sub",
            "jti",
            "iss",
            "aud",
            "iat",
            "nbf",
            "exp",
        ] {
            assert!(l.get(k).is_some(), "gitlab claim {k} missing");
        }
        assert_ne!(
            github_claims(&job())["jti"],
            g["jti"],
            "jti is unique per token"
        );
    }

    #[test]
    fn dev_configs_are_flagged_and_valid() {
        for c in [issuer_config("d", "a"), gitlab_issuer_config("g", "a")] {
            assert!(c.danger_dev_issuer);
            assert!(c.inline_jwks.is_some());
            assert!(c.validate().is_empty(), "{:?}", c.validate());
            assert!(c.issuer_url().unwrap().ends_with(".invalid"));
        }
    }
}

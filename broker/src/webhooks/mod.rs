//! Job-end webhooks: GitHub `workflow_job` and GitLab job events revoke the grants of a job that
//! finished, even when its pipeline never reached its own revoke step. HTTP lives in
//! `http/hooks.rs`; this module holds the rules.
//!
//! Invariants:
//! - Nothing is revoked, recorded or parsed before the delivery's signature (GitHub HMAC) or
//!   token (GitLab) verified, in constant time, against one of the configured secrets.
//! - A delivery matches only grants of its own platform's issuers, its repository id and its job
//!   id (GitHub: plus run id and attempt); see [`event`] for exactly what is compared.
//! - A delivery acts only inside the scope of the secret that verified it ([`scope`]): the
//!   repository it names and the repository of every grant it would revoke (from the grant's
//!   verified job token) must match that secret's `scope`, else 403 `webhook_out_of_scope`,
//!   audited, nothing revoked and the delivery id not kept.
//! - Only deliveries that act are recorded, and only after their signature verified, so a forged
//!   request can neither revoke nor block a real delivery by taking its id.
//! - Every refused delivery (bad signature, replay, malformed) and every acted-on delivery writes
//!   one `webhook` audit event; if it cannot be written the call fails with 503.

mod actions;
pub mod event;
pub mod scope;
pub mod signature;

pub use actions::{HookOutcome, HookReport};
pub use event::{HookEvent, JobEnd};
pub use scope::Scope;

use crate::oidc::{IssuerConfig, Platform};
use crate::reason::ReasonCode;
use crate::secret::SecretRef;
use crate::secret::Sensitive;
use crate::store::StoreError;
use crate::time::serde_duration;
use serde::Deserialize;
use time::Duration;

/// Shortest secret accepted: a short one can be guessed offline from one captured delivery.
pub const MIN_SECRET_LEN: usize = 16;

/// Longest delivery id kept (GitHub sends a UUID; GitLab a UUID or an idempotency key).
pub const MAX_DELIVERY_ID: usize = 128;

/// Grants one delivery revokes at most (one job holds a handful).
pub const MAX_GRANTS_PER_DELIVERY: u32 = 1000;

fn default_delivery_ttl() -> Duration {
    Duration::days(7)
}

fn default_max_body() -> usize {
    1024 * 1024
}

/// `webhooks:` in the config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhooksConfig {
    /// `POST /v1/hooks/github`; absent → that endpoint answers 404.
    #[serde(default)]
    pub github: Option<GithubHookConfig>,
    /// `POST /v1/hooks/gitlab`; absent → that endpoint answers 404.
    #[serde(default)]
    pub gitlab: Option<GitlabHookConfig>,
    /// How long a delivery id is remembered (a second delivery with it → 409).
    #[serde(default = "default_delivery_ttl", with = "serde_duration")]
    pub delivery_ttl: Duration,
    /// Largest webhook body accepted (bytes); larger → 413.
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
}

impl Default for WebhooksConfig {
    fn default() -> Self {
        Self {
            github: None,
            gitlab: None,
            delivery_ttl: default_delivery_ttl(),
            max_body_bytes: default_max_body(),
        }
    }
}

impl std::fmt::Display for WebhooksConfig {
    /// The config summary's lines: where each secret comes from and its scope, never its value.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let list = |secrets: &[ScopedSecret]| {
            secrets
                .iter()
                .map(ScopedSecret::describe)
                .collect::<Vec<_>>()
                .join(", ")
        };
        if let Some(g) = &self.github {
            writeln!(f, "webhooks.github.secrets: {}", list(&g.secrets))?;
        }
        if let Some(g) = &self.gitlab {
            writeln!(f, "webhooks.gitlab.tokens: {}", list(&g.tokens))?;
        }
        Ok(())
    }
}

/// One webhook secret (by reference, as [`SecretRef`]) and the repositories (GitHub) or
/// projects (GitLab) it may speak for.
#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScopedSecret {
    pub file: Option<std::path::PathBuf>,
    pub env: Option<String>,
    pub value: Option<String>,
    /// Required: `owner/*`, `owner/repo` (GitHub); `group/*`, `group/sub/project` (GitLab);
    /// `*` for any. Optional in the type only so that a missing one is reported by
    /// [`validate`] with its key.
    #[serde(default)]
    pub scope: Option<Vec<String>>,
}

impl std::fmt::Debug for ScopedSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScopedSecret")
            .field("secret", &self.secret_ref())
            .field("scope", &self.scope)
            .finish()
    }
}

impl ScopedSecret {
    /// An inline secret with a scope (tests, examples).
    pub fn inline(value: impl Into<String>, scope: &[&str]) -> Self {
        Self {
            value: Some(value.into()),
            scope: Some(scope.iter().map(|s| (*s).to_owned()).collect()),
            ..Self::default()
        }
    }

    /// Where the secret comes from.
    pub fn secret_ref(&self) -> SecretRef {
        SecretRef {
            file: self.file.clone(),
            env: self.env.clone(),
            value: self.value.clone(),
        }
    }

    /// For the config summary: where the secret comes from and its scope, never its value.
    pub fn describe(&self) -> String {
        format!(
            "{} scope {:?}",
            self.secret_ref().describe(),
            self.scope.as_deref().unwrap_or_default()
        )
    }
}

/// `webhooks.github`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GithubHookConfig {
    /// Webhook secrets, each with the repositories it may speak for; a delivery signed with any
    /// of them is accepted inside that secret's scope (rotation: add the new one with the same
    /// scope, change it in GitHub, remove the old one).
    pub secrets: Vec<ScopedSecret>,
    /// Configured issuer names whose grants this endpoint may revoke; empty = every GitHub
    /// issuer. Set it when several GitHub instances (github.com, GHES) are configured: their
    /// repository ids are independent.
    #[serde(default)]
    pub issuers: Vec<String>,
}

/// `webhooks.gitlab`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GitlabHookConfig {
    /// Secret tokens (`X-Gitlab-Token`), each with the projects it may speak for; any of them
    /// is accepted inside its scope (rotation).
    pub tokens: Vec<ScopedSecret>,
    /// Configured issuer names whose grants this endpoint may revoke; empty = every GitLab
    /// issuer.
    #[serde(default)]
    pub issuers: Vec<String>,
}

/// Which endpoint a delivery came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Github,
    Gitlab,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Github => "github",
            Source::Gitlab => "gitlab",
        }
    }
    pub fn platform(self) -> Platform {
        match self {
            Source::Github => Platform::Github,
            Source::Gitlab => Platform::Gitlab,
        }
    }
}

/// One configured endpoint: its secrets, each secret's scope (same positions), and the
/// issuers it may touch.
#[derive(Debug, Clone)]
pub(crate) struct Endpoint {
    pub(crate) secrets: Vec<Sensitive>,
    pub(crate) scopes: Vec<Scope>,
    pub(crate) issuers: Vec<String>,
}

/// The webhook endpoints as configured (none by default).
#[derive(Debug, Clone)]
pub struct Webhooks {
    github: Option<Endpoint>,
    gitlab: Option<Endpoint>,
    pub(crate) delivery_ttl: Duration,
    max_body_bytes: usize,
}

impl Default for Webhooks {
    fn default() -> Self {
        let d = WebhooksConfig::default();
        Self {
            github: None,
            gitlab: None,
            delivery_ttl: d.delivery_ttl,
            max_body_bytes: d.max_body_bytes,
        }
    }
}

/// `webhooks:` that cannot be used: every problem found, each naming its key (`validate`
/// reports them all at load; building from an unvalidated config stops here).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", .0.join("; "))]
pub struct InvalidWebhooks(pub Vec<String>);

/// Every problem with `webhooks:`, each naming its key (never a secret's value).
pub fn validate(cfg: &WebhooksConfig, issuers: &[IssuerConfig]) -> Vec<String> {
    let mut p = Vec::new();
    let mut endpoint = |key: &str,
                        secrets: &[ScopedSecret],
                        names: &[String],
                        platform: Platform| {
        if secrets.is_empty() {
            p.push(format!("webhooks.{key}: at least one secret is required"));
        }
        let mut seen: Vec<(usize, Sensitive)> = Vec::new();
        for (i, s) in secrets.iter().enumerate() {
            match s.secret_ref().resolve() {
                Err(e) => p.push(format!("webhooks.{key}[{i}]: {e}")),
                Ok(v) if v.expose().len() < MIN_SECRET_LEN => p.push(format!(
                    "webhooks.{key}[{i}]: at least {MIN_SECRET_LEN} characters"
                )),
                Ok(v) => {
                    // One secret, one scope: a second entry with the same value would never
                    // be the one that verifies, so its scope would silently not apply.
                    if let Some((j, _)) = seen.iter().find(|(_, w)| *w == v) {
                        p.push(format!(
                            "webhooks.{key}[{i}]: the same secret as [{j}]; give one entry with the combined scope"
                        ));
                    }
                    seen.push((i, v));
                }
            }
            match &s.scope {
                None => p.push(format!(
                    "webhooks.{key}[{i}].scope: required ({}; [\"*\"] for any)",
                    match platform {
                        Platform::Github =>
                            "repositories this secret may speak for: owner/* or owner/repo",
                        Platform::Gitlab =>
                            "projects this token may speak for: group/* or group/project",
                    }
                )),
                Some(list) => {
                    if let Err(problems) = Scope::parse(list, platform) {
                        for m in problems {
                            p.push(format!("webhooks.{key}[{i}].scope: {m}"));
                        }
                    }
                }
            }
        }
        for n in names {
            match issuers.iter().find(|i| &i.name == n) {
                None => p.push(format!("webhooks.{key}: unknown issuer {n:?}")),
                Some(i) if i.platform != platform => p.push(format!(
                    "webhooks.{key}: issuer {n:?} is not a {} issuer",
                    platform.as_str()
                )),
                Some(_) => {}
            }
        }
    };
    if let Some(g) = &cfg.github {
        endpoint("github.secrets", &g.secrets, &g.issuers, Platform::Github);
    }
    if let Some(g) = &cfg.gitlab {
        endpoint("gitlab.tokens", &g.tokens, &g.issuers, Platform::Gitlab);
    }
    if cfg.delivery_ttl < Duration::minutes(1) {
        p.push("webhooks.delivery_ttl: at least 1m".into());
    }
    if !(1024..=25 * 1024 * 1024).contains(&cfg.max_body_bytes) {
        p.push("webhooks.max_body_bytes: 1024 to 26214400".into());
    }
    p
}

impl Webhooks {
    /// From the config; the issuer list fills in each endpoint's default issuers.
    pub fn from_config(
        cfg: &WebhooksConfig,
        issuers: &[IssuerConfig],
    ) -> Result<Self, InvalidWebhooks> {
        let problems = validate(cfg, issuers);
        if !problems.is_empty() {
            return Err(InvalidWebhooks(problems));
        }
        let build = |secrets: &[ScopedSecret], names: &[String], platform: Platform| {
            let scopes = secrets
                .iter()
                .map(|s| {
                    Scope::parse(s.scope.as_deref().unwrap_or_default(), platform)
                        .map_err(InvalidWebhooks)
                })
                .collect::<Result<Vec<_>, _>>()?;
            let secrets = secrets
                .iter()
                .map(|s| s.secret_ref().resolve())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| InvalidWebhooks(vec![e.to_string()]))?;
            let issuers = if names.is_empty() {
                issuers
                    .iter()
                    .filter(|i| i.platform == platform)
                    .map(|i| i.name.clone())
                    .collect()
            } else {
                names.to_vec()
            };
            Ok::<_, InvalidWebhooks>(Endpoint {
                secrets,
                scopes,
                issuers,
            })
        };
        Ok(Self {
            github: cfg
                .github
                .as_ref()
                .map(|g| build(&g.secrets, &g.issuers, Platform::Github))
                .transpose()?,
            gitlab: cfg
                .gitlab
                .as_ref()
                .map(|g| build(&g.tokens, &g.issuers, Platform::Gitlab))
                .transpose()?,
            delivery_ttl: cfg.delivery_ttl,
            max_body_bytes: cfg.max_body_bytes,
        })
    }

    pub(crate) fn endpoint(&self, source: Source) -> Option<&Endpoint> {
        match source {
            Source::Github => self.github.as_ref(),
            Source::Gitlab => self.gitlab.as_ref(),
        }
    }

    /// Largest body the webhook routes accept.
    pub fn max_body_bytes(&self) -> usize {
        self.max_body_bytes
    }
}

/// One delivery as received: headers the rules need, and the raw body.
#[derive(Debug)]
pub struct Delivery<'a> {
    pub source: Source,
    /// `X-GitHub-Event` / `X-Gitlab-Event`.
    pub event: Option<String>,
    /// `X-GitHub-Delivery` / GitLab `Idempotency-Key`, else `X-Gitlab-Event-UUID`.
    pub delivery_id: Option<String>,
    /// `X-Hub-Signature-256` (GitHub) or `X-Gitlab-Token` (GitLab, a secret).
    pub credential: Option<Sensitive>,
    pub body: &'a [u8],
}

/// Why a delivery was refused. Each maps to one status and code in `http::error`.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    /// This endpoint is not configured.
    #[error("webhook endpoint not configured")]
    NotConfigured,
    #[error("missing or invalid webhook signature")]
    BadSignature,
    /// Authentic, but for a repository (or a grant of one) outside the scope of the secret
    /// that verified it. The message names the repository, never the secret.
    #[error("delivery outside the scope of its secret: {0}")]
    OutOfScope(String),
    #[error("delivery {0:?} was already processed")]
    Replayed(String),
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// This client sent too many deliveries that failed verification (`refusals.rs`).
    #[error("too many failed verifications from this client")]
    TooManyFailures { retry_after_secs: u64 },
}

impl WebhookError {
    /// Stable reason code (also the audit `reason`).
    pub fn reason(&self) -> ReasonCode {
        match self {
            WebhookError::NotConfigured => ReasonCode::NotFound,
            WebhookError::BadSignature => ReasonCode::BadSignature,
            WebhookError::OutOfScope(_) => ReasonCode::WebhookOutOfScope,
            WebhookError::Replayed(_) => ReasonCode::ReplayedDelivery,
            WebhookError::BadRequest(_) => ReasonCode::BadRequest,
            WebhookError::Store(crate::store::StoreError::Rejected(_)) => ReasonCode::StoreRejected,
            WebhookError::Store(_) => ReasonCode::StoreUnavailable,
            WebhookError::TooManyFailures { .. } => ReasonCode::TooManyFailures,
        }
    }

    /// [`WebhookError::reason`] as its wire string.
    pub fn reason_code(&self) -> &'static str {
        self.reason().as_str()
    }
}

/// Header text for the audit log: bounded, printable ASCII only.
pub(crate) fn clean_header(s: &str, max: usize) -> String {
    s.chars()
        .filter(|c| c.is_ascii_graphic())
        .take(max)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issuers() -> Vec<IssuerConfig> {
        vec![
            crate::oidc::dev::issuer_config("github", "aud"),
            crate::oidc::dev::gitlab_issuer_config("gitlab", "aud"),
        ]
    }

    #[test]
    fn config_names_every_problem_and_never_a_secret() {
        let cfg: WebhooksConfig = serde_saphyr::from_str(
            "github: {secrets: [{value: short-secret-x, scope: [\"*\"]}], issuers: [gitlab, nope]}\n\
             gitlab: {tokens: []}\ndelivery_ttl: 10s\n",
        )
        .unwrap();
        let p = validate(&cfg, &issuers()).join("\n");
        assert!(p.contains("webhooks.github.secrets[0]: at least 16"), "{p}");
        assert!(
            p.contains("issuer \"gitlab\" is not a github issuer"),
            "{p}"
        );
        assert!(p.contains("unknown issuer \"nope\""), "{p}");
        assert!(p.contains("webhooks.gitlab.tokens: at least one"), "{p}");
        assert!(p.contains("webhooks.delivery_ttl"), "{p}");
        assert!(!p.contains("short-secret-x"), "{p}");
        assert!(Webhooks::from_config(&cfg, &issuers()).is_err());
        assert!(serde_saphyr::from_str::<WebhooksConfig>("github: {secret: x}").is_err());
    }

    #[test]
    fn endpoints_default_to_their_platforms_issuers() {
        let cfg: WebhooksConfig = serde_saphyr::from_str(
            "github: {secrets: [{value: 0123456789abcdef, scope: [\"acme/*\"]}]}\n",
        )
        .unwrap();
        let w = Webhooks::from_config(&cfg, &issuers()).unwrap();
        assert_eq!(
            w.endpoint(Source::Github).unwrap().issuers,
            vec!["github".to_owned()]
        );
        assert!(w.endpoint(Source::Gitlab).is_none());
        assert!(Webhooks::default().endpoint(Source::Github).is_none());
        assert!(!format!("{w:?}").contains("0123456789abcdef"));
        assert!(w.endpoint(Source::Github).unwrap().scopes[0].allows("acme/api"));
    }

    #[test]
    fn every_secret_needs_a_valid_scope() {
        let cfg: WebhooksConfig = serde_saphyr::from_str(
            "github:\n  secrets:\n\
             \x20   - {value: secret-one-0123456789}\n\
             \x20   - {value: secret-two-0123456789, scope: []}\n\
             \x20   - {value: secret-three-012345678, scope: [\"acme\", \"acme/*\"]}\n\
             \x20   - {value: secret-one-0123456789, scope: [\"*\"]}\n\
             gitlab:\n  tokens: [{value: token-0123456789abcdef, scope: [\"grp/sub/*\", \"grp/*/x\"]}]\n",
        )
        .unwrap();
        let p = validate(&cfg, &issuers());
        let all = p.join("\n");
        assert!(
            all.contains("webhooks.github.secrets[0].scope: required"),
            "{all}"
        );
        assert!(
            all.contains("webhooks.github.secrets[1].scope: must list at least one"),
            "{all}"
        );
        assert!(
            all.contains("webhooks.github.secrets[2].scope: [0] \"acme\": expected"),
            "{all}"
        );
        assert!(
            all.contains("webhooks.github.secrets[3]: the same secret as [0]"),
            "{all}"
        );
        assert!(
            all.contains("webhooks.gitlab.tokens[0].scope: [1] \"grp/*/x\""),
            "{all}"
        );
        assert_eq!(p.len(), 5, "{all}");
        assert!(!all.contains("0123456789"), "{all}");
        // Explicit wildcard: the behaviour before scopes, for those who want it.
        let cfg: WebhooksConfig =
            serde_saphyr::from_str("gitlab: {tokens: [{env: NO_SUCH_VAR_HERE, scope: [\"*\"]}]}\n")
                .unwrap();
        let p = validate(&cfg, &issuers()).join("\n");
        assert!(
            p.contains("NO_SUCH_VAR_HERE is not set") && !p.contains("scope"),
            "{p}"
        );
    }
}

//! Leak reports: a leaked broker credential is revoked within seconds of being reported.
//!
//! Two ways in: `POST /v1/leaks/github`, GitHub's secret scanning partner protocol (a JSON
//! array of `{token, type, url, source}` signed with ECDSA P-256 by one of the keys GitHub
//! publishes, see `github_keys.rs`), and `POST /v1/leaks` for operators (same body, admin
//! auth; `broker leak report` on the CLI). This module owns the report's shape, its limits,
//! the answer's labels and the `leaks:` config section; acting on a report (find the grant,
//! revoke through the one revocation path, audit) is `service/leak.rs`.
//!
//! Invariants:
//! - A reported token is never logged, audited or kept: only its SHA-256 (what GitHub's answer
//!   carries as `token_hash`) leaves this module.
//! - Nothing in an unsigned or badly signed report is read beyond its headers.
//! - The answer says no more than GitHub's protocol needs: ours or not (`true_positive` /
//!   `false_positive`) and, to the authenticated sender, whether it was still live.

pub mod github_keys;

use crate::secret::{Sensitive, sha256_hex};
use serde::{Deserialize, Serialize};
use std::fmt;
use time::Duration;

/// Most tokens one report may carry (GitHub sends batches; a larger report is refused whole).
pub const MAX_TOKENS: usize = 1000;
/// Longest token looked at (a JWT of ours is well under this); longer ones are not ours.
pub const MAX_TOKEN_BYTES: usize = 4096;
/// Longest `type`, `url` and `source` kept (longer text is cut).
const MAX_TEXT: usize = 512;

/// The `leaks:` section of the config.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaksConfig {
    /// GitHub's secret scanning partner endpoint (`POST /v1/leaks/github`); absent = 404.
    #[serde(default)]
    pub github: Option<GithubLeaksConfig>,
    /// When a leaked credential belongs to a job that is still running, also freeze new
    /// exchanges for its repository (the operators' freeze; only if no freeze is in force).
    #[serde(default)]
    pub freeze_repository: bool,
}

/// `leaks.github`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GithubLeaksConfig {
    /// Where GitHub publishes its signing keys (`{"public_keys": [...]}`):
    /// `https://api.github.com/meta/public_keys/secret_scanning`. HTTPS, except on a loopback
    /// address (tests).
    pub keys_url: String,
    /// An unknown key identifier refetches the key list at most once per this window.
    #[serde(
        default = "default_refresh_cooldown",
        with = "crate::time::serde_duration"
    )]
    pub refresh_cooldown: Duration,
}

fn default_refresh_cooldown() -> Duration {
    Duration::seconds(10)
}

impl fmt::Display for LeaksConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(g) = &self.github {
            writeln!(f, "leaks.github.keys_url: {}", g.keys_url)?;
        }
        if self.freeze_repository {
            writeln!(f, "leaks.freeze_repository: true")?;
        }
        Ok(())
    }
}

/// Problems with the `leaks:` section, each naming its key.
pub fn validate(cfg: &LeaksConfig) -> Vec<String> {
    let mut p = Vec::new();
    if let Some(g) = &cfg.github {
        match url::Url::parse(&g.keys_url) {
            Ok(u) if u.scheme() == "https" => {}
            Ok(u) if u.scheme() == "http" && is_loopback(&u) => {}
            _ => p.push(format!(
                "leaks.github.keys_url: expected an https URL (http only on a loopback address), got {:?}",
                g.keys_url
            )),
        }
        if g.refresh_cooldown < Duration::SECOND || g.refresh_cooldown > Duration::hours(1) {
            p.push("leaks.github.refresh_cooldown: between 1s and 1h".into());
        }
    }
    p
}

fn is_loopback(u: &url::Url) -> bool {
    match u.host() {
        Some(url::Host::Ipv4(a)) => a.is_loopback(),
        Some(url::Host::Ipv6(a)) => a.is_loopback(),
        Some(url::Host::Domain(d)) => d == "localhost",
        None => false,
    }
}

/// Where a report came from (the audit actor and the metric label).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReportSource {
    /// GitHub's secret scanning (signature verified).
    Github,
    /// An operator (`POST /v1/leaks`, `broker leak report`), by actor name.
    Operator(String),
}

impl ReportSource {
    pub fn actor(&self) -> String {
        match self {
            ReportSource::Github => "leak:github".into(),
            ReportSource::Operator(a) => format!("leak:{a}"),
        }
    }
    pub fn metric(&self) -> &'static str {
        match self {
            ReportSource::Github => "github",
            ReportSource::Operator(_) => "operator",
        }
    }
}

/// One reported token. `Debug` shows the hash, never the token.
pub struct ReportedToken {
    pub token: Sensitive,
    /// SHA-256 of the token, lowercase hex (GitHub's `token_hash`).
    pub token_hash: String,
    /// The sender's name for the kind of token (GitHub: the pattern's type), cut to a bound.
    pub token_type: String,
    /// Where it was found (a URL, for the audit), cut to a bound.
    pub url: Option<String>,
    /// GitHub's `source` (`content`, `commit`, `issue_comment`, ...), cut to a bound.
    pub source: Option<String>,
}

impl fmt::Debug for ReportedToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReportedToken")
            .field("token_hash", &self.token_hash)
            .field("token_type", &self.token_type)
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct RawToken {
    token: String,
    #[serde(rename = "type", default)]
    token_type: Option<String>,
    #[serde(default)]
    url: Option<String>,
    #[serde(default)]
    source: Option<String>,
}

/// Why a report body cannot be read. Carries no token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReportError {
    #[error("the body is not a JSON array of {{token, type, url, source}}")]
    Shape,
    #[error("the report is empty")]
    Empty,
    #[error("more than {MAX_TOKENS} tokens in one report")]
    TooMany,
}

/// Parse a report body: GitHub's partner format, a JSON array of `{token, type, url, source}`
/// (`type`, `url` and `source` optional for operators).
pub fn parse_report(body: &[u8]) -> Result<Vec<ReportedToken>, ReportError> {
    let raw: Vec<RawToken> = serde_json::from_slice(body).map_err(|_| ReportError::Shape)?;
    if raw.is_empty() {
        return Err(ReportError::Empty);
    }
    if raw.len() > MAX_TOKENS {
        return Err(ReportError::TooMany);
    }
    Ok(raw
        .into_iter()
        .map(|r| ReportedToken {
            token_hash: sha256_hex(r.token.as_bytes()),
            token: Sensitive::new(r.token),
            token_type: clean(r.token_type.as_deref().unwrap_or("")),
            url: r.url.as_deref().map(clean),
            source: r.source.as_deref().map(clean),
        })
        .collect())
}

/// Outside text for the audit and the answer: printable, bounded.
fn clean(s: &str) -> String {
    s.chars()
        .filter(|c| !c.is_control())
        .take(MAX_TEXT)
        .collect()
}

/// GitHub's label for a reported token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Label {
    /// The broker issued it.
    TruePositive,
    /// Not a token the broker issued (or malformed: wrong checksum, truncated).
    FalsePositive,
}

/// What became of a token of ours.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenStatus {
    /// It was live and its grant is revoked now (or its revocation is queued and retried).
    Revoked,
    /// Its grant had already ended (revoked, expired): nothing to do.
    AlreadyInactive,
    /// An operator token: it cannot be revoked from here; rotate it in the config.
    RotateOperatorToken,
    /// Not ours.
    Unknown,
}

/// One entry of the answer, in GitHub's shape (`token_hash`, `token_type`, `label`) plus the
/// broker's `status` (GitHub ignores fields it does not know).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TokenAnswer {
    pub token_hash: String,
    pub token_type: String,
    pub label: Label,
    pub status: TokenStatus,
}

/// The leak endpoints as configured: GitHub's keys (none: `/v1/leaks/github` answers 404)
/// and whether a running job's repository is frozen.
#[derive(Debug, Default)]
pub struct Leaks {
    pub(crate) github: Option<github_keys::GithubKeys>,
    pub(crate) freeze_repository: bool,
}

impl Leaks {
    pub fn from_config(cfg: &LeaksConfig) -> anyhow::Result<Self> {
        let github = match &cfg.github {
            Some(g) => Some(github_keys::GithubKeys::new(
                &g.keys_url,
                std::time::Duration::try_from(g.refresh_cooldown)
                    .unwrap_or(std::time::Duration::from_secs(10)),
            )?),
            None => None,
        };
        Ok(Self {
            github,
            freeze_repository: cfg.freeze_repository,
        })
    }
}

/// Why a leak report was not acted on. Carries no token.
#[derive(Debug, thiserror::Error)]
pub enum LeakError {
    /// `leaks.github` is not configured.
    #[error("not configured")]
    NotConfigured,
    #[error("report signature: {0}")]
    Signature(github_keys::SignatureError),
    #[error("bad request: {0}")]
    BadRequest(ReportError),
    #[error("store: {0}")]
    Store(#[from] crate::store::StoreError),
    /// This client sent too many reports that failed verification (`refusals/`).
    #[error("too many failed verifications from this client")]
    TooManyFailures { retry_after_secs: u64 },
}

impl LeakError {
    /// Stable reason code (also the audit `reason`).
    pub fn reason(&self) -> crate::reason::ReasonCode {
        use crate::reason::ReasonCode as R;
        match self {
            LeakError::NotConfigured => R::NotFound,
            LeakError::Signature(github_keys::SignatureError::KeysUnavailable) => {
                R::LeakKeysUnavailable
            }
            LeakError::Signature(_) => R::BadSignature,
            LeakError::BadRequest(_) => R::BadRequest,
            LeakError::Store(crate::store::StoreError::Rejected(_)) => R::StoreRejected,
            LeakError::Store(_) => R::StoreUnavailable,
            LeakError::TooManyFailures { .. } => R::TooManyFailures,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_parse_into_hashes_and_never_show_the_token() {
        let body = br#"[{"token":"brk_at_secret","type":"broker_api_token","url":"https://github.com/o/r/blob/x/f","source":"content"},
                       {"token":"other"}]"#;
        let r = parse_report(body).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].token_hash, sha256_hex(b"brk_at_secret"));
        assert_eq!(r[0].token_type, "broker_api_token");
        assert_eq!(r[0].source.as_deref(), Some("content"));
        assert_eq!(r[1].url, None);
        assert!(!format!("{r:?}").contains("brk_at_secret"));
        assert_eq!(parse_report(b"[]").unwrap_err(), ReportError::Empty);
        assert_eq!(parse_report(b"{}").unwrap_err(), ReportError::Shape);
        assert_eq!(
            parse_report(b"[{\"type\":\"x\"}]").unwrap_err(),
            ReportError::Shape
        );
        let many = format!("[{}]", vec![r#"{"token":"t"}"#; MAX_TOKENS + 1].join(","));
        assert_eq!(
            parse_report(many.as_bytes()).unwrap_err(),
            ReportError::TooMany
        );
    }

    #[test]
    fn outside_text_is_cut_and_printable() {
        let long = format!("{}\u{7}x", "u".repeat(600));
        let body = serde_json::to_vec(&serde_json::json!([{"token": "t", "url": long}])).unwrap();
        let r = parse_report(&body).unwrap();
        let url = r[0].url.clone().unwrap();
        assert_eq!(url.len(), MAX_TEXT);
        assert!(!url.contains('\u{7}'));
    }

    #[test]
    fn config_wants_https_or_loopback() {
        let cfg = |u: &str| LeaksConfig {
            github: Some(GithubLeaksConfig {
                keys_url: u.into(),
                refresh_cooldown: default_refresh_cooldown(),
            }),
            freeze_repository: false,
        };
        assert!(
            validate(&cfg(
                "https://api.github.com/meta/public_keys/secret_scanning"
            ))
            .is_empty()
        );
        assert!(validate(&cfg("http://127.0.0.1:9/keys")).is_empty());
        assert_eq!(validate(&cfg("http://keys.example/k")).len(), 1);
        assert_eq!(validate(&cfg("not a url")).len(), 1);
    }
}

//! Per-issuer configuration: which OIDC issuers the broker trusts and how strictly.
//!
//! Issuer URL presets (the `url` field is compared byte for byte with the token's `iss`):
//!
//! | Where the job runs | `url` |
//! |---|---|
//! | GitHub.com | omit it (default `https://token.actions.githubusercontent.com`) |
//! | GitHub.com, enterprise-customised issuer | omit `url`, set `enterprise_slug: acme`: issuer `https://token.actions.githubusercontent.com/acme`, keys stay at the root `https://token.actions.githubusercontent.com/.well-known/jwks` |
//! | GitHub Enterprise Cloud with data residency (GHE.com) | `https://token.actions.SUBDOMAIN.ghe.com` |
//! | GitHub Enterprise Server | `https://HOST/_services/token` |
//! | GitLab.com | `https://gitlab.com` |
//! | GitLab self-managed | the instance URL, e.g. `https://gitlab.example.com` (no trailing slash) |
//!
//! For an instance the broker cannot reach (air-gapped GHES behind another network), export its
//! JWKS and point `static_jwks_file` at it: keys are then loaded once, never fetched.

use jsonwebtoken::Algorithm;
use serde::Deserialize;
use std::path::PathBuf;
use time::Duration;
use url::Url;

use super::Platform;

/// The issuer of GitHub-hosted (and GitHub.com self-hosted runner) Actions tokens.
pub const GITHUB_ISSUER: &str = "https://token.actions.githubusercontent.com";
/// Where GitHub publishes its keys, also for enterprise-slug issuers.
pub const GITHUB_JWKS: &str = "https://token.actions.githubusercontent.com/.well-known/jwks";

/// One trusted issuer. Unknown fields are refused so a typo cannot silently weaken a check.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuerConfig {
    /// What policies refer to (`github`, `gitlab-internal`, ...).
    pub name: String,
    pub platform: Platform,
    /// Exact issuer URL. Optional for GitHub (see the module table for presets).
    #[serde(default)]
    pub url: Option<String>,
    /// GitHub enterprise-customised issuer: `https://token.actions.githubusercontent.com/<slug>`.
    /// Only with platform github and no `url`.
    #[serde(default)]
    pub enterprise_slug: Option<String>,
    /// Fetch keys from here instead of following discovery.
    #[serde(default)]
    pub jwks_url: Option<String>,
    /// Load keys from this file (a JWKS document) and never fetch: for issuers the broker cannot
    /// reach. Rotating keys means updating the file and restarting.
    #[serde(default)]
    pub static_jwks_file: Option<PathBuf>,
    /// A JWKS document given in code (the built-in dev issuer). Never read from config files.
    #[serde(skip)]
    pub inline_jwks: Option<String>,
    /// Per-issuer audience; defaults to the broker-wide audience.
    #[serde(default)]
    pub audience: Option<String>,
    /// Pinned signature algorithms. Default `[RS256]` (what GitHub and GitLab use). Allowed:
    /// RS256/384/512, PS256/384/512, ES256/384. `none` and HS* are refused by [`Self::validate`]:
    /// a symmetric algorithm would let anyone holding the public key forge tokens.
    #[serde(default = "default_algorithms")]
    pub algorithms: Vec<String>,
    /// Whether a token (by `jti`) may be exchanged only once. Default true.
    ///
    /// GitLab trade-off: a GitLab job receives its `id_tokens` when it starts and cannot get new
    /// ones mid-job. A job that needs two exchanges (say a database user and an AWS session) must
    /// use an issuer entry with `single_use: false`, and so accepts that a leaked token can be
    /// replayed until its `exp`. Prefer one exchange per job, or short `id_tokens` lifetimes.
    /// GitHub jobs can request a fresh token per exchange, so keep the default there.
    #[serde(default = "default_true")]
    pub single_use: bool,
    /// Clock skew allowed on `exp`, `nbf` and `iat`. Default 60s.
    #[serde(default = "default_leeway", with = "crate::time::serde_duration")]
    pub leeway: Duration,
    /// Oldest acceptable `iat`. Default 1h for github, 24h for gitlab (GitLab tokens live as
    /// long as the job, which may be long).
    #[serde(default, with = "crate::time::serde_duration::option")]
    pub max_token_age: Option<Duration>,
    /// Tokens larger than this are refused before decoding. Default 16 KiB.
    #[serde(default = "default_max_token_bytes")]
    pub max_token_bytes: usize,
    /// Allow `http://` issuer and JWKS URLs. Only for tests against 127.0.0.1.
    #[serde(default)]
    pub danger_allow_insecure_http: bool,
    /// Marks the built-in dev issuer, whose private key is public. The config loader refuses it
    /// outside dev mode; the verifier only carries the flag.
    #[serde(default)]
    pub danger_dev_issuer: bool,
}

fn default_algorithms() -> Vec<String> {
    vec!["RS256".to_owned()]
}
fn default_true() -> bool {
    true
}
fn default_leeway() -> Duration {
    Duration::seconds(60)
}
pub(crate) const DEFAULT_MAX_TOKEN_BYTES: usize = 16 * 1024;
fn default_max_token_bytes() -> usize {
    DEFAULT_MAX_TOKEN_BYTES
}

/// Algorithms a configuration may pin. Anything else (HS*, `none`, EdDSA) is refused.
pub(crate) fn parse_allowed_algorithm(s: &str) -> Option<Algorithm> {
    Some(match s {
        "RS256" => Algorithm::RS256,
        "RS384" => Algorithm::RS384,
        "RS512" => Algorithm::RS512,
        "PS256" => Algorithm::PS256,
        "PS384" => Algorithm::PS384,
        "PS512" => Algorithm::PS512,
        "ES256" => Algorithm::ES256,
        "ES384" => Algorithm::ES384,
        _ => return None,
    })
}

impl IssuerConfig {
    /// An issuer with every default, for code-built configurations (dev mode, tests).
    pub fn new(name: impl Into<String>, platform: Platform, url: Option<String>) -> Self {
        Self {
            name: name.into(),
            platform,
            url,
            enterprise_slug: None,
            jwks_url: None,
            static_jwks_file: None,
            inline_jwks: None,
            audience: None,
            algorithms: default_algorithms(),
            single_use: true,
            leeway: default_leeway(),
            max_token_age: None,
            max_token_bytes: default_max_token_bytes(),
            danger_allow_insecure_http: false,
            danger_dev_issuer: false,
        }
    }

    /// The exact `iss` this entry accepts, after presets. `None` only for an invalid entry
    /// (gitlab without `url`).
    pub fn issuer_url(&self) -> Option<String> {
        match (&self.url, &self.enterprise_slug, self.platform) {
            (Some(u), _, _) => Some(u.clone()),
            (None, Some(slug), Platform::Github) => Some(format!("{GITHUB_ISSUER}/{slug}")),
            (None, None, Platform::Github) => Some(GITHUB_ISSUER.to_owned()),
            _ => None,
        }
    }

    /// Explicit JWKS URL, or the GitHub root key set for enterprise-slug issuers; `None` means
    /// follow discovery.
    pub fn effective_jwks_url(&self) -> Option<String> {
        if let Some(u) = &self.jwks_url {
            return Some(u.clone());
        }
        if self.url.is_none() && self.enterprise_slug.is_some() {
            return Some(GITHUB_JWKS.to_owned());
        }
        None
    }

    pub fn effective_max_token_age(&self) -> Duration {
        self.max_token_age.unwrap_or(match self.platform {
            Platform::Github => Duration::hours(1),
            Platform::Gitlab => Duration::hours(24),
        })
    }

    /// The pinned algorithms, or `None` if any entry is not allowed.
    pub fn pinned_algorithms(&self) -> Option<Vec<Algorithm>> {
        self.algorithms
            .iter()
            .map(|a| parse_allowed_algorithm(a))
            .collect()
    }

    /// Every problem with this entry (empty means usable). Messages name fields, never secrets.
    pub fn validate(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.name.trim().is_empty() {
            p.push("name must not be empty".to_owned());
        } else if !self
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            p.push(format!(
                "name {:?} may only contain A-Z a-z 0-9 - _",
                self.name
            ));
        }
        match (&self.url, &self.enterprise_slug, self.platform) {
            (Some(_), Some(_), _) => {
                p.push("set either url or enterprise_slug, not both".to_owned())
            }
            (None, Some(_), Platform::Gitlab) => {
                p.push("enterprise_slug is only for platform github".to_owned())
            }
            (None, None, Platform::Gitlab) => {
                p.push("url is required for platform gitlab".to_owned())
            }
            _ => {}
        }
        if let Some(slug) = &self.enterprise_slug
            && (slug.is_empty()
                || !slug
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'))
        {
            p.push(format!("enterprise_slug {slug:?} is not a valid slug"));
        }
        if let Some(u) = self.issuer_url() {
            self.check_url("url", &u, &mut p);
            if u.ends_with('/') {
                p.push(format!(
                    "url {u:?} ends with '/': GitHub and GitLab issuers never do, and iss is compared exactly"
                ));
            }
        }
        if let Some(u) = &self.jwks_url {
            self.check_url("jwks_url", u, &mut p);
        }
        let key_sources = [
            self.jwks_url.is_some(),
            self.static_jwks_file.is_some(),
            self.inline_jwks.is_some(),
        ];
        if key_sources.iter().filter(|s| **s).count() > 1 {
            p.push("set at most one of jwks_url, static_jwks_file (and inline keys)".to_owned());
        }
        if self.algorithms.is_empty() {
            p.push("algorithms must not be empty".to_owned());
        }
        for a in &self.algorithms {
            if parse_allowed_algorithm(a).is_none() {
                p.push(format!(
                    "algorithm {a:?} is not allowed (allowed: RS256 RS384 RS512 PS256 PS384 PS512 ES256 ES384)"
                ));
            }
        }
        if let Some(a) = &self.audience
            && a.trim().is_empty()
        {
            p.push("audience must not be empty when set".to_owned());
        }
        if self.leeway.is_negative() || self.leeway > Duration::minutes(5) {
            p.push("leeway must be between 0s and 5m".to_owned());
        }
        if let Some(age) = self.max_token_age
            && !age.is_positive()
        {
            p.push("max_token_age must be positive".to_owned());
        }
        if self.max_token_bytes < 512 || self.max_token_bytes > 64 * 1024 {
            p.push("max_token_bytes must be between 512 and 65536".to_owned());
        }
        p
    }

    fn check_url(&self, field: &str, raw: &str, p: &mut Vec<String>) {
        let u = match Url::parse(raw) {
            Ok(u) => u,
            Err(e) => {
                p.push(format!("{field} {raw:?} is not a URL: {e}"));
                return;
            }
        };
        match u.scheme() {
            "https" => {}
            "http" if self.danger_allow_insecure_http => {}
            "http" => p.push(format!(
                "{field} {raw:?} must use https (danger_allow_insecure_http is for local tests only)"
            )),
            other => p.push(format!("{field} {raw:?} has unsupported scheme {other:?}")),
        }
        if u.host_str().is_none_or(str::is_empty) {
            p.push(format!("{field} {raw:?} has no host"));
        }
        if u.query().is_some() || u.fragment().is_some() {
            p.push(format!("{field} {raw:?} must not have a query or fragment"));
        }
        if !u.username().is_empty() || u.password().is_some() {
            p.push(format!("{field} must not contain credentials"));
        }
    }
}

/// Every problem with `issuers:`, each naming its key: none at all, a duplicate name, each
/// issuer's own problems, and the built-in development issuer outside `broker dev`.
pub fn validate_issuers(issuers: &[IssuerConfig], allow_dev_issuer: bool) -> Vec<String> {
    let mut p = Vec::new();
    if issuers.is_empty() {
        p.push("issuers: at least one issuer is required".into());
    }
    let mut names = std::collections::BTreeSet::new();
    for (i, iss) in issuers.iter().enumerate() {
        if !names.insert(iss.name.clone()) {
            p.push(format!(
                "issuers[{i}].name: duplicate issuer name {:?}",
                iss.name
            ));
        }
        for e in iss.validate() {
            p.push(format!("issuers[{i}] ({}): {e}", iss.name));
        }
        if iss.danger_dev_issuer && !allow_dev_issuer {
            p.push(format!(
                "issuers[{i}] ({}): the built-in development issuer is refused outside `broker dev`",
                iss.name
            ));
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> IssuerConfig {
        serde_saphyr::from_str(yaml).expect("parse")
    }

    #[test]
    fn github_defaults() {
        let c = parse("name: github\nplatform: github\n");
        assert!(c.validate().is_empty(), "{:?}", c.validate());
        assert_eq!(c.issuer_url().as_deref(), Some(GITHUB_ISSUER));
        assert_eq!(c.effective_jwks_url(), None);
        assert_eq!(c.pinned_algorithms(), Some(vec![Algorithm::RS256]));
        assert!(c.single_use);
        assert_eq!(c.leeway, Duration::seconds(60));
        assert_eq!(c.effective_max_token_age(), Duration::hours(1));
        assert_eq!(c.max_token_bytes, 16 * 1024);
        assert!(!c.danger_allow_insecure_http && !c.danger_dev_issuer);
    }

    #[test]
    fn enterprise_slug_issuer_keeps_root_jwks() {
        let c = parse("name: gh\nplatform: github\nenterprise_slug: acme\n");
        assert!(c.validate().is_empty(), "{:?}", c.validate());
        assert_eq!(
            c.issuer_url().as_deref(),
            Some("https://token.actions.githubusercontent.com/acme")
        );
        assert_eq!(c.effective_jwks_url().as_deref(), Some(GITHUB_JWKS));
    }

    #[test]
    fn gitlab_needs_url_and_gets_longer_age() {
        let c = parse("name: gl\nplatform: gitlab\n");
        assert!(c.validate().iter().any(|p| p.contains("url is required")));
        let c = parse(
            "name: gl\nplatform: gitlab\nurl: https://gitlab.com\nsingle_use: false\nleeway: 30s\n",
        );
        assert!(c.validate().is_empty(), "{:?}", c.validate());
        assert_eq!(c.effective_max_token_age(), Duration::hours(24));
        assert!(!c.single_use);
        assert_eq!(c.leeway, Duration::seconds(30));
    }

    #[test]
    fn ghes_and_ghe_com_forms_validate() {
        for url in [
            "https://token.actions.acme.ghe.com",
            "https://ghes.example.com/_services/token",
        ] {
            let c = parse(&format!("name: e\nplatform: github\nurl: {url}\n"));
            assert!(c.validate().is_empty(), "{url}: {:?}", c.validate());
            assert_eq!(c.issuer_url().as_deref(), Some(url));
        }
    }

    #[test]
    fn unknown_fields_are_refused() {
        let r: Result<IssuerConfig, _> =
            serde_saphyr::from_str("name: g\nplatform: github\naudiance: x\n");
        assert!(r.is_err());
        let r: Result<IssuerConfig, _> =
            serde_saphyr::from_str("name: g\nplatform: github\ninline_jwks: '{}'\n");
        assert!(r.is_err(), "inline keys must not come from config files");
    }

    #[test]
    fn forbidden_algorithms_are_reported() {
        let c = parse("name: g\nplatform: github\nalgorithms: [RS256, none, HS256, ES256]\n");
        let p = c.validate();
        assert_eq!(
            p.iter().filter(|p| p.contains("not allowed")).count(),
            2,
            "{p:?}"
        );
        assert_eq!(c.pinned_algorithms(), None);
        let c = parse("name: g\nplatform: github\nalgorithms: []\n");
        assert!(!c.validate().is_empty());
    }

    #[test]
    fn insecure_urls_need_the_danger_flag() {
        let c = parse("name: g\nplatform: gitlab\nurl: http://127.0.0.1:8080\n");
        assert!(c.validate().iter().any(|p| p.contains("https")));
        let c = parse(
            "name: g\nplatform: gitlab\nurl: http://127.0.0.1:8080\ndanger_allow_insecure_http: true\n",
        );
        assert!(c.validate().is_empty(), "{:?}", c.validate());
        let c = parse("name: g\nplatform: github\njwks_url: http://keys.example\n");
        assert!(c.validate().iter().any(|p| p.contains("jwks_url")));
    }

    #[test]
    fn reports_every_problem() {
        let c = parse(
            "name: 'bad name'\nplatform: gitlab\nurl: 'https://gitlab.com/?x=1'\nalgorithms: [HS512]\nmax_token_bytes: 10\njwks_url: ftp://x\nstatic_jwks_file: /k.json\n",
        );
        let p = c.validate();
        assert!(p.len() >= 6, "{p:?}");
        let c = parse("name: g\nplatform: gitlab\nurl: https://gitlab.com/\n");
        assert!(c.validate().iter().any(|p| p.contains("ends with")));
        let c = parse("name: g\nplatform: gitlab\nurl: not a url\n");
        assert!(c.validate().iter().any(|p| p.contains("not a URL")));
    }
}

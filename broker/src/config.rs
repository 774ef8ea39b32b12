//! Broker configuration: one YAML file, environment overrides, validated once at start.
//!
//! Rules: unknown keys are rejected; every semantic problem is reported with its key path in
//! one go; secrets (the store URL may hold a password, signing keys) are referenced by file path
//! or environment variable name and held as [`Sensitive`], never echoed. `Display` of the
//! config says whether a secret is set, never its value.

use crate::oidc::IssuerConfig;
pub use crate::secret::SecretRef;
use crate::time::serde_duration;
use serde::Deserialize;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
pub use targets::{
    AwsTargetConfig, PostgresTargetConfig, SslMode, TargetsConfig, valid_aws_region,
};
use time::Duration;

mod env;
mod targets;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// `postgres://…` or `sqlite:PATH`.
    pub url: SecretRef,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Directory of policy files (a git checkout).
    pub dir: PathBuf,
    /// Poll the directory this often and reload when its files change (a ConfigMap update, a
    /// git-sync). Unset: reload only on SIGHUP.
    #[serde(default, with = "serde_duration::option")]
    pub watch_interval: Option<Duration>,
}

/// OpenTelemetry traces (`telemetry.rs`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// OTLP/HTTP collector base URL (`http://otel-collector:4318`); spans go to
    /// `{otlp_endpoint}/v1/traces`. Unset: no traces.
    pub otlp_endpoint: Option<String>,
    /// `service.name` of the exported spans.
    pub service_name: String,
    /// Bound on one export request.
    #[serde(with = "serde_duration")]
    pub export_timeout: Duration,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            service_name: "broker".into(),
            export_timeout: Duration::seconds(10),
        }
    }
}

/// `GET /metrics`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Bearer token a scraper must send. Unset: `/metrics` is open to whoever reaches the
    /// listener.
    pub token: Option<SecretRef>,
    /// Also serve `/metrics` and the detailed `/readyz` on the public `listen` address (the
    /// behaviour before they moved to `admin_listen`). Off: the public listener answers only a
    /// bare `/healthz` and `{"ready": bool}` on `/readyz`.
    #[serde(default)]
    pub danger_public_diagnostics: bool,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiTokenConfig {
    /// The active Ed25519 signing key (PKCS#8 PEM), e.g. `{file: /run/secrets/broker-signing.pem}`.
    /// Unset: an ephemeral key (tokens stop verifying on restart; fine for one replica in dev).
    pub signing_key: Option<SecretRef>,
    /// Retired keys still published until their last token expires.
    #[serde(default)]
    pub retired_keys: Vec<SecretRef>,
}

/// Why the configured signing keys cannot be used; names the key, never its value.
#[derive(Debug, thiserror::Error)]
pub enum SigningKeyError {
    #[error("api_tokens.signing_key: {0}")]
    Active(crate::secret::SecretRefError),
    #[error("api_tokens.retired_keys: {0}")]
    Retired(crate::secret::SecretRefError),
    #[error("api_tokens.signing_key: {0}")]
    Key(#[from] crate::providers::api_token::KeyError),
}

impl ApiTokenConfig {
    /// The persistent signing keys (active and retired), or `None` when no key is configured
    /// (the broker then runs on an ephemeral key).
    pub fn signing_keys(
        &self,
    ) -> Result<Option<crate::providers::api_token::SigningKeys>, SigningKeyError> {
        let Some(active) = &self.signing_key else {
            return Ok(None);
        };
        let active = active.resolve().map_err(SigningKeyError::Active)?;
        let retired = self
            .retired_keys
            .iter()
            .map(|r| r.resolve().map_err(SigningKeyError::Retired))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Some(crate::providers::api_token::SigningKeys::from_pems(
            &active, &retired,
        )?))
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest request body accepted (bytes).
    pub max_body_bytes: usize,
    /// Whole-request timeout.
    #[serde(with = "serde_duration")]
    pub request_timeout: Duration,
    /// Requests in flight before new ones get 503 `overloaded`.
    pub max_concurrency: usize,
    /// Credentials in one exchange.
    pub max_credentials_per_exchange: usize,
    /// Exchanges per minute allowed for one repository (GitHub `repository_id`, GitLab
    /// `project_id`) on one replica, as a burst that refills evenly; 0 turns the limit off.
    pub exchanges_per_minute_per_repository: u32,
    /// Time a request head (request line and headers) may take from its first byte; past it
    /// the connection gets 408 `header_timeout`. A new connection must start its head within it.
    #[serde(with = "serde_duration")]
    pub header_read_timeout: Duration,
    /// Time a keep-alive connection may stay idle between requests before it is closed.
    #[serde(with = "serde_duration")]
    pub idle_timeout: Duration,
    /// Largest request head (bytes); larger gets 431 `headers_too_large`.
    pub max_header_bytes: usize,
    /// Open connections at most (the idle ones are shed first at the cap). Unset: half the
    /// process's soft open-files limit.
    pub max_connections: Option<usize>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 64 * 1024,
            request_timeout: Duration::seconds(15),
            max_concurrency: 1024,
            max_credentials_per_exchange: 16,
            exchanges_per_minute_per_repository: 600,
            header_read_timeout: Duration::seconds(10),
            idle_timeout: Duration::seconds(65),
            max_header_bytes: 64 * 1024,
            max_connections: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GrantConfig {
    /// TTL when the request names none.
    #[serde(with = "serde_duration")]
    pub default_ttl: Duration,
    /// Upper bound on any grant, whatever policies say.
    #[serde(with = "serde_duration")]
    pub max_ttl: Duration,
}

impl Default for GrantConfig {
    fn default() -> Self {
        Self {
            default_ttl: Duration::minutes(15),
            max_ttl: Duration::hours(6),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReaperConfig {
    /// How often each replica looks for due grants.
    #[serde(with = "serde_duration")]
    pub interval: Duration,
    /// A grant still `issuing` after this long is treated as crashed and cleaned up.
    #[serde(with = "serde_duration")]
    pub stale_issuing_after: Duration,
    /// How long a claimed revocation is reserved for one replica.
    #[serde(with = "serde_duration")]
    pub lease: Duration,
    /// Grants claimed per round.
    pub batch: u32,
}

impl Default for ReaperConfig {
    fn default() -> Self {
        Self {
            interval: Duration::seconds(5),
            stale_issuing_after: Duration::minutes(2),
            lease: Duration::minutes(1),
            batch: 100,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// `tracing` filter, e.g. `info` or `broker=debug,info`.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Listen address, e.g. `0.0.0.0:8080`.
    pub listen: SocketAddr,
    /// Optional separate address for the operator API (`/v1/admin/*`, `/v1/audit`), e.g.
    /// `127.0.0.1:9090`; when set, those endpoints answer 404 on `listen`.
    #[serde(default)]
    pub admin_listen: Option<SocketAddr>,
    /// The broker's public URL: `iss` of the API tokens it mints.
    pub public_url: String,
    /// The audience job tokens must carry (request it with `aud` in the workflow).
    pub audience: String,
    pub store: StoreConfig,
    pub policies: PolicyConfig,
    pub issuers: Vec<IssuerConfig>,
    #[serde(default)]
    pub api_tokens: ApiTokenConfig,
    #[serde(default)]
    pub targets: TargetsConfig,
    #[serde(default)]
    pub grants: GrantConfig,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub reaper: ReaperConfig,
    #[serde(default)]
    pub log: LogConfig,
    /// Who may call the operator endpoints (`/v1/admin/*`); tokens kept only as hashes.
    #[serde(default)]
    pub operators: Vec<crate::admin::OperatorConfig>,
    /// Job-end webhooks (`/v1/hooks/github`, `/v1/hooks/gitlab`); absent = endpoints answer 404.
    #[serde(default)]
    pub webhooks: crate::webhooks::WebhooksConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    /// Limits on refusals of unauthenticated requests (failure rate per client, audit rows
    /// per window); see `refusals/`.
    #[serde(default)]
    pub refusals: crate::refusals::RefusalConfig,
    /// Leak reports (`/v1/leaks/github`, `/v1/leaks`); see `leaks/` and docs/leaks.md.
    #[serde(default)]
    pub leaks: crate::leaks::LeaksConfig,
    /// Signed audit checkpoints on a schedule and where they are exported (`audit/export.rs`).
    #[serde(default)]
    pub audit: crate::audit::export::AuditConfig,
}

/// Whether the built-in dev issuer may be configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Serve,
    Dev,
}

/// Why a config could not be loaded: which file, and which key. No variant holds a secret's
/// value (the parser's message quotes the offending key and position, and secrets are only
/// ever references).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {}: {kind}", path.display())]
    Read {
        path: PathBuf,
        kind: std::io::ErrorKind,
    },
    /// Not YAML, a wrong type, or an unknown key (with line and column).
    #[error("{source_name}: {message}")]
    Syntax {
        source_name: String,
        message: String,
    },
    /// An environment override that cannot be used; `key` is the variable.
    #[error("{key}: {message}")]
    Env { key: &'static str, message: String },
    /// Every semantic problem, each naming its key.
    #[error("invalid config {}:\n  {}", path.display(), problems.join("\n  "))]
    Invalid {
        path: PathBuf,
        problems: Vec<String>,
    },
}

impl Config {
    /// Parse YAML text (unknown keys rejected, with line and column).
    pub fn parse(text: &str, source: &str) -> Result<Self, ConfigError> {
        serde_saphyr::from_str(text).map_err(|e| ConfigError::Syntax {
            source_name: source.to_owned(),
            message: e.to_string(),
        })
    }

    /// Read, apply environment overrides, validate.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: path.to_owned(),
            kind: e.kind(),
        })?;
        let mut cfg = Self::parse(&text, &path.display().to_string())?;
        cfg.apply_env(|k| std::env::var(k).ok())?;
        let problems = cfg.validate(Mode::Serve);
        if problems.is_empty() {
            Ok(cfg)
        } else {
            Err(ConfigError::Invalid {
                path: path.to_owned(),
                problems,
            })
        }
    }

    /// Every problem, each naming its key.
    pub fn validate(&self, mode: Mode) -> Vec<String> {
        let mut p = Vec::new();
        if url::Url::parse(&self.public_url).is_err() {
            p.push(format!("public_url: not a URL: {:?}", self.public_url));
        }
        if self.audience.trim().is_empty() {
            p.push("audience: required (the aud job tokens must carry)".into());
        } else if self.audience.starts_with("https://github.com/") {
            p.push(
                "audience: must be specific to this broker; GitHub's default audience \
                 (https://github.com/<owner>) is shared by every consumer"
                    .into(),
            );
        }
        if let Err(e) = self.store.url.resolve() {
            p.push(format!("store.url: {e}"));
        }
        if !self.policies.dir.is_dir() {
            p.push(format!(
                "policies.dir: not a directory: {}",
                self.policies.dir.display()
            ));
        }
        p.extend(crate::oidc::validate_issuers(
            &self.issuers,
            mode == Mode::Dev,
        ));
        p.extend(crate::admin::operators::validate(&self.operators));
        p.extend(crate::admin::operators::validate_issuers(
            &self.operators,
            &self.issuers,
        ));
        p.extend(crate::webhooks::validate(&self.webhooks, &self.issuers));
        p.extend(crate::refusals::validate(&self.refusals));
        p.extend(crate::leaks::validate(&self.leaks));
        p.extend(crate::audit::export::validate(&self.audit));
        if self
            .admin_listen
            .is_some_and(|a| a == self.listen && a.port() != 0)
        {
            p.push("admin_listen: must differ from listen".into());
        }
        if let Some(e) = &self.telemetry.otlp_endpoint {
            match url::Url::parse(e) {
                Ok(u) if matches!(u.scheme(), "http" | "https") => {}
                _ => p.push(format!(
                    "telemetry.otlp_endpoint: expected an http(s) URL, got {e:?}"
                )),
            }
        }
        if let Some(Err(e)) = self.metrics.token.as_ref().map(SecretRef::resolve) {
            p.push(format!("metrics.token: {e}"));
        }
        if self
            .policies
            .watch_interval
            .is_some_and(|d| d < Duration::SECOND)
        {
            p.push("policies.watch_interval: at least 1s".into());
        }
        if let Some(Err(e)) = self.api_tokens.signing_key.as_ref().map(SecretRef::resolve) {
            p.push(format!("api_tokens.signing_key: {e}"));
        }
        for (i, k) in self.api_tokens.retired_keys.iter().enumerate() {
            if let Err(e) = k.resolve() {
                p.push(format!("api_tokens.retired_keys[{i}]: {e}"));
            }
        }
        p.extend(self.targets.validate());
        if self.grants.default_ttl <= Duration::ZERO
            || self.grants.default_ttl > self.grants.max_ttl
        {
            p.push("grants.default_ttl: must be positive and at most grants.max_ttl".into());
        }
        if self.reaper.interval <= Duration::ZERO || self.reaper.lease <= Duration::ZERO {
            p.push("reaper.interval and reaper.lease: must be positive".into());
        }
        if self.limits.max_body_bytes < 1024 || self.limits.max_concurrency == 0 {
            p.push("limits: max_body_bytes must be >= 1024 and max_concurrency >= 1".into());
        }
        if self.limits.header_read_timeout <= Duration::ZERO
            || self.limits.idle_timeout <= Duration::ZERO
        {
            p.push("limits: header_read_timeout and idle_timeout must be positive".into());
        }
        if self.limits.max_header_bytes < 8 * 1024 || self.limits.max_connections == Some(0) {
            p.push("limits: max_header_bytes must be >= 8192 and max_connections >= 1".into());
        }
        p
    }
}

impl fmt::Display for Config {
    /// A summary safe to log: where secrets come from, never what they are.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "listen: {}", self.listen)?;
        if let Some(a) = self.admin_listen {
            writeln!(f, "admin_listen: {a}")?;
        }
        write!(f, "{}", self.webhooks)?;
        write!(f, "{}", self.leaks)?;
        writeln!(f, "public_url: {}", self.public_url)?;
        writeln!(f, "audience: {}", self.audience)?;
        writeln!(f, "store.url: {}", self.store.url.describe())?;
        writeln!(f, "policies.dir: {}", self.policies.dir.display())?;
        if let Some(d) = self.policies.watch_interval {
            writeln!(
                f,
                "policies.watch_interval: {}",
                crate::time::format_duration(d)
            )?;
        }
        if let Some(t) = &self.metrics.token {
            writeln!(f, "metrics.token: {}", t.describe())?;
        }
        if let Some(e) = &self.telemetry.otlp_endpoint {
            writeln!(f, "telemetry.otlp_endpoint: {e}")?;
        }
        let names: Vec<&str> = self.issuers.iter().map(|i| i.name.as_str()).collect();
        writeln!(f, "issuers: {}", names.join(", "))?;
        writeln!(
            f,
            "api_tokens.signing_key: {}",
            self.api_tokens
                .signing_key
                .as_ref()
                .map_or("ephemeral".into(), SecretRef::describe)
        )?;
        write!(f, "{}", self.targets)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal valid config with its policy directory at `dir`.
    pub(crate) fn base(dir: &Path) -> String {
        format!(
            "listen: 127.0.0.1:8080\npublic_url: https://broker.example\naudience: https://broker.example\n\
             store:\n  url: {{value: \"sqlite::memory:\"}}\npolicies:\n  dir: {}\nissuers:\n  - name: github\n    platform: github\n",
            dir.display()
        )
    }

    #[test]
    fn parses_minimal_config_with_defaults() {
        let d = tempfile::tempdir().unwrap();
        let cfg = Config::parse(&base(d.path()), "t").unwrap();
        assert!(
            cfg.validate(Mode::Serve).is_empty(),
            "{:?}",
            cfg.validate(Mode::Serve)
        );
        assert_eq!(cfg.grants.default_ttl, Duration::minutes(15));
    }

    #[test]
    fn connection_limits_and_diagnostics_parse_and_are_checked() {
        let d = tempfile::tempdir().unwrap();
        let cfg = Config::parse(&base(d.path()), "t").unwrap();
        assert_eq!(cfg.limits.header_read_timeout, Duration::seconds(10));
        assert_eq!(cfg.limits.idle_timeout, Duration::seconds(65));
        assert_eq!(cfg.limits.max_header_bytes, 64 * 1024);
        assert_eq!(cfg.limits.max_connections, None);
        assert!(!cfg.metrics.danger_public_diagnostics);
        let text = format!(
            "{}limits:\n  header_read_timeout: 2s\n  idle_timeout: 5s\n  max_header_bytes: 16384\n  max_connections: 64\n\
             metrics:\n  danger_public_diagnostics: true\n",
            base(d.path())
        );
        let cfg = Config::parse(&text, "t").unwrap();
        assert_eq!(cfg.limits.header_read_timeout, Duration::seconds(2));
        assert_eq!(cfg.limits.max_connections, Some(64));
        assert!(cfg.metrics.danger_public_diagnostics);
        let bad = format!(
            "{}limits:\n  header_read_timeout: 0s\n  max_header_bytes: 100\n  max_connections: 0\n",
            base(d.path())
        );
        let problems = Config::parse(&bad, "t").unwrap().validate(Mode::Serve);
        assert!(
            problems.iter().any(|p| p.contains("header_read_timeout")),
            "{problems:?}"
        );
        assert!(
            problems.iter().any(|p| p.contains("max_connections")),
            "{problems:?}"
        );
    }

    #[test]
    fn unknown_keys_are_rejected_with_location() {
        let d = tempfile::tempdir().unwrap();
        let err =
            Config::parse(&format!("{}bogus: 1\n", base(d.path())), "broker.yaml").unwrap_err();
        assert!(
            matches!(&err, ConfigError::Syntax { source_name, .. } if source_name == "broker.yaml")
        );
        let err = err.to_string();
        assert!(err.contains("bogus"), "{err}");
        assert!(err.starts_with("broker.yaml"), "{err}");
    }

    #[test]
    fn every_problem_is_reported_and_secrets_are_not_echoed() {
        let text = "listen: 127.0.0.1:8080\npublic_url: nope\naudience: https://github.com/acme\n\
                    store:\n  url: {value: \"postgres://u:hunter2@db/x\", env: X}\npolicies:\n  dir: /nonexistent\nissuers: []\n";
        let cfg = Config::parse(text, "t").unwrap();
        let p = cfg.validate(Mode::Serve);
        assert!(p.len() >= 5, "{p:?}");
        let all = p.join("\n");
        for key in [
            "public_url",
            "audience",
            "store.url",
            "policies.dir",
            "issuers",
        ] {
            assert!(all.contains(key), "missing {key} in {all}");
        }
        assert!(!all.contains("hunter2"));
        assert!(!format!("{cfg:?}").contains("hunter2"));
        assert!(!format!("{cfg}").contains("hunter2"));
    }

    #[test]
    fn load_names_the_file_and_every_bad_key() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("broker.yaml");
        let missing = Config::load(&path).unwrap_err();
        assert!(matches!(&missing, ConfigError::Read { path: p, .. } if *p == path));
        std::fs::write(
            &path,
            base(d.path()).replace("https://broker.example\naudience", "nope\naudience"),
        )
        .unwrap();
        let err = Config::load(&path).unwrap_err();
        let ConfigError::Invalid { path: p, problems } = &err else {
            panic!("{err}");
        };
        assert_eq!(p, &path);
        assert!(
            problems.iter().any(|m| m.starts_with("public_url: ")),
            "{problems:?}"
        );
        assert!(
            err.to_string()
                .starts_with(&format!("invalid config {}:", path.display()))
        );
    }
}

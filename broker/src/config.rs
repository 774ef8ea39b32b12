//! Broker configuration: one YAML file, environment overrides, validated once at start.
//!
//! Rules: unknown keys are rejected; every semantic problem is reported with its key path in
//! one go; secrets (the store URL may hold a password, signing keys) are referenced by file path
//! or environment variable name and held as [`Sensitive`], never echoed. `Display` of the
//! config says whether a secret is set, never its value.

use crate::oidc::IssuerConfig;
use crate::secret::Sensitive;
use crate::time::serde_duration;
use serde::Deserialize;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use time::Duration;

/// A secret given by reference: exactly one of `file`, `env` (or, for non-secret-bearing values
/// such as a SQLite path, `value`).
#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretRef {
    pub file: Option<PathBuf>,
    pub env: Option<String>,
    /// Inline value. Allowed, but a warning is logged if it looks like it holds a password.
    pub value: Option<String>,
}

impl fmt::Debug for SecretRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretRef")
            .field("file", &self.file)
            .field("env", &self.env)
            .field("value", &self.value.as_ref().map(|_| "[redacted]"))
            .finish()
    }
}

impl SecretRef {
    pub fn inline(v: impl Into<String>) -> Self {
        Self {
            value: Some(v.into()),
            ..Self::default()
        }
    }

    /// Read the secret. Errors name the source, never the value.
    pub fn resolve(&self) -> Result<Sensitive, String> {
        match (&self.file, &self.env, &self.value) {
            (Some(p), None, None) => std::fs::read_to_string(p)
                .map(|s| Sensitive::new(s.trim_end_matches(['\n', '\r']).to_owned()))
                .map_err(|e| format!("cannot read file {}: {}", p.display(), e.kind())),
            (None, Some(var), None) => std::env::var(var)
                .map(Sensitive::new)
                .map_err(|_| format!("environment variable {var} is not set")),
            (None, None, Some(v)) => Ok(Sensitive::new(v.clone())),
            (None, None, None) => Err("no file, env or value given".into()),
            _ => Err("give exactly one of file, env, value".into()),
        }
    }

    pub(crate) fn describe(&self) -> String {
        match (&self.file, &self.env, &self.value) {
            (Some(p), _, _) => format!("file {}", p.display()),
            (_, Some(v), _) => format!("env {v}"),
            (_, _, Some(_)) => "inline (set)".into(),
            _ => "unset".into(),
        }
    }
}

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

/// `sslmode` handed out in `database_url` (libpq's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    #[default]
    VerifyFull,
}

impl SslMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

fn default_pg_port() -> u16 {
    5432
}
fn default_pool_size() -> u32 {
    4
}
fn default_connect_timeout() -> Duration {
    Duration::seconds(5)
}
fn default_scram_iterations() -> u32 {
    crate::providers::postgres::scram::DEFAULT_ITERATIONS
}
fn default_role_prefix() -> String {
    crate::providers::postgres::naming::DEFAULT_PREFIX.to_owned()
}

/// One Postgres server the broker creates job users on (`targets.postgres.<name>`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresTargetConfig {
    /// Admin connection string (`postgres://admin:…@db:5432/postgres?sslmode=verify-full&…`):
    /// it holds a password, so it comes from a file or env var. TLS to the server is set here.
    pub admin_url: SecretRef,
    /// Host handed to jobs in `host` and `database_url` (may differ from the admin's).
    pub host: String,
    #[serde(default = "default_pg_port")]
    pub port: u16,
    /// `sslmode` in the `database_url` handed to jobs.
    #[serde(default)]
    pub sslmode: SslMode,
    /// Admin connections per database (the admin database and each database worked in).
    #[serde(default = "default_pool_size")]
    pub pool_size: u32,
    /// Bound on connecting (and waiting for a pooled connection); past it: `target_unavailable`.
    #[serde(default = "default_connect_timeout", with = "serde_duration")]
    pub connect_timeout: Duration,
    /// Prefix of every role the broker creates on this server (revoke touches no other role).
    #[serde(default = "default_role_prefix")]
    pub role_prefix: String,
    /// PBKDF2 iterations in the SCRAM-SHA-256 verifier of each created user (1 to 100,000; see
    /// `providers::postgres::scram` for why the default is 1 and when to raise it).
    #[serde(default = "default_scram_iterations")]
    pub scram_iterations: u32,
}

fn default_role_max_session() -> Duration {
    Duration::hours(1)
}

/// Whether `r` looks like an AWS region name (`eu-west-1`, `us-gov-west-1`, `cn-north-1`).
pub fn valid_aws_region(r: &str) -> bool {
    (4..=32).contains(&r.len())
        && r.contains('-')
        && r.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !r.starts_with('-')
        && !r.ends_with('-')
}

/// One AWS endpoint/account setting the broker assumes roles through (`targets.aws.<name>`).
/// The broker's own AWS identity comes from the standard credential chain (env, profile, web
/// identity / IRSA, instance metadata), never from this file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AwsTargetConfig {
    /// Region of the STS endpoint, and the default `region` handed to jobs.
    pub region: String,
    /// Endpoint override for STS and IAM (private endpoints; a local test server).
    #[serde(default)]
    pub endpoint_url: Option<String>,
    /// The brokered roles' `MaxSessionDuration` (AWS: 1h to 12h; default 1h). Grants longer than
    /// this get sessions this long; it also bounds how long a revoke-all deny is kept.
    #[serde(default = "default_role_max_session", with = "serde_duration")]
    pub role_max_session: Duration,
}

/// Systems credentials are minted on.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetsConfig {
    /// Postgres servers by name (`postgres:` credentials name one in `target`).
    #[serde(default)]
    pub postgres: std::collections::BTreeMap<String, PostgresTargetConfig>,
    /// AWS settings by name (`aws_sts:` credentials name one in `target`).
    #[serde(default)]
    pub aws: std::collections::BTreeMap<String, AwsTargetConfig>,
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
}

/// Whether the built-in dev issuer may be configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Serve,
    Dev,
}

impl Config {
    /// Parse YAML text (unknown keys rejected, with line and column).
    pub fn parse(text: &str, source: &str) -> Result<Self, String> {
        serde_saphyr::from_str(text).map_err(|e| format!("{source}: {e}"))
    }

    /// Read, apply environment overrides, validate.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read config {}: {}", path.display(), e.kind()))?;
        let mut cfg = Self::parse(&text, &path.display().to_string())?;
        cfg.apply_env(|k| std::env::var(k).ok())?;
        let problems = cfg.validate(Mode::Serve);
        if problems.is_empty() {
            Ok(cfg)
        } else {
            Err(format!(
                "invalid config {}:\n  {}",
                path.display(),
                problems.join("\n  ")
            ))
        }
    }

    /// Environment overrides (`BROKER_LISTEN`, `BROKER_PUBLIC_URL`, `BROKER_AUDIENCE`,
    /// `BROKER_STORE_URL_FILE`, `BROKER_STORE_URL_ENV`, `BROKER_POLICIES_DIR`,
    /// `BROKER_POLICIES_WATCH_INTERVAL`,
    /// `BROKER_LOG_FORMAT`, `BROKER_LOG_LEVEL`).
    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) -> Result<(), String> {
        if let Some(v) = get("BROKER_LISTEN") {
            self.listen = v
                .parse()
                .map_err(|_| format!("BROKER_LISTEN: not an address: {v:?}"))?;
        }
        if let Some(v) = get("BROKER_PUBLIC_URL") {
            self.public_url = v;
        }
        if let Some(v) = get("BROKER_AUDIENCE") {
            self.audience = v;
        }
        if let Some(v) = get("BROKER_STORE_URL_FILE") {
            self.store.url = SecretRef {
                file: Some(v.into()),
                ..SecretRef::default()
            };
        }
        if let Some(v) = get("BROKER_STORE_URL_ENV") {
            self.store.url = SecretRef {
                env: Some(v),
                ..SecretRef::default()
            };
        }
        if let Some(v) = get("BROKER_POLICIES_DIR") {
            self.policies.dir = v.into();
        }
        if let Some(v) = get("BROKER_POLICIES_WATCH_INTERVAL") {
            self.policies.watch_interval =
                Some(crate::time::parse_duration(&v).map_err(|_| {
                    format!("BROKER_POLICIES_WATCH_INTERVAL: not a duration: {v:?}")
                })?);
        }
        if let Some(v) = get("BROKER_LOG_FORMAT") {
            self.log.format = match v.as_str() {
                "json" => LogFormat::Json,
                "text" => LogFormat::Text,
                _ => {
                    return Err(format!(
                        "BROKER_LOG_FORMAT: expected text or json, got {v:?}"
                    ));
                }
            };
        }
        if let Some(v) = get("BROKER_LOG_LEVEL") {
            self.log.level = v;
        }
        Ok(())
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
        if self.issuers.is_empty() {
            p.push("issuers: at least one issuer is required".into());
        }
        p.extend(crate::admin::operators::validate(&self.operators));
        p.extend(crate::admin::operators::validate_issuers(
            &self.operators,
            &self.issuers,
        ));
        p.extend(crate::webhooks::validate(&self.webhooks, &self.issuers));
        p.extend(crate::refusals::validate(&self.refusals));
        if self
            .admin_listen
            .is_some_and(|a| a == self.listen && a.port() != 0)
        {
            p.push("admin_listen: must differ from listen".into());
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, iss) in self.issuers.iter().enumerate() {
            if !names.insert(iss.name.clone()) {
                p.push(format!(
                    "issuers[{i}].name: duplicate issuer name {:?}",
                    iss.name
                ));
            }
            for e in iss.validate() {
                p.push(format!("issuers[{i}] ({}): {e}", iss.name));
            }
            if iss.danger_dev_issuer && mode != Mode::Dev {
                p.push(format!(
                    "issuers[{i}] ({}): the built-in development issuer is refused outside `broker dev`",
                    iss.name
                ));
            }
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
        for (name, t) in &self.targets.postgres {
            let key = format!("targets.postgres.{name}");
            if name.is_empty()
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            {
                p.push(format!("{key}: target names are [A-Za-z0-9_-]"));
            }
            if let Err(e) = t.admin_url.resolve() {
                p.push(format!("{key}.admin_url: {e}"));
            }
            if t.host.trim().is_empty() {
                p.push(format!("{key}.host: required (the host jobs connect to)"));
            }
            if t.pool_size == 0 || t.pool_size > 100 {
                p.push(format!("{key}.pool_size: must be 1 to 100"));
            }
            if !(1..=crate::providers::postgres::scram::MAX_ITERATIONS)
                .contains(&t.scram_iterations)
            {
                p.push(format!("{key}.scram_iterations: must be 1 to 100000"));
            }
            if t.connect_timeout <= Duration::ZERO {
                p.push(format!("{key}.connect_timeout: must be positive"));
            }
            if let Err(e) = crate::providers::postgres::naming::check_prefix(&t.role_prefix) {
                p.push(format!("{key}.role_prefix: {e}"));
            }
        }
        for (name, t) in &self.targets.aws {
            let key = format!("targets.aws.{name}");
            if name.is_empty()
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            {
                p.push(format!("{key}: target names are [A-Za-z0-9_-]"));
            }
            if !valid_aws_region(&t.region) {
                p.push(format!("{key}.region: not an AWS region name"));
            }
            if let Some(u) = &t.endpoint_url
                && !matches!(url::Url::parse(u), Ok(p) if matches!(p.scheme(), "https" | "http") && p.host().is_some())
            {
                p.push(format!("{key}.endpoint_url: must be an http(s) URL"));
            }
            if t.role_max_session < Duration::hours(1) || t.role_max_session > Duration::hours(12) {
                p.push(format!(
                    "{key}.role_max_session: must be 1h to 12h (AWS's range)"
                ));
            }
        }
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
        if let Some(g) = &self.webhooks.github {
            let s: Vec<String> = g.secrets.iter().map(|s| s.describe()).collect();
            writeln!(f, "webhooks.github.secrets: {}", s.join(", "))?;
        }
        if let Some(g) = &self.webhooks.gitlab {
            let s: Vec<String> = g.tokens.iter().map(|s| s.describe()).collect();
            writeln!(f, "webhooks.gitlab.tokens: {}", s.join(", "))?;
        }
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
        for (name, t) in &self.targets.postgres {
            writeln!(
                f,
                "targets.postgres.{name}: admin_url {}, host {}:{}, sslmode {}",
                t.admin_url.describe(),
                t.host,
                t.port,
                t.sslmode.as_str()
            )?;
        }
        for (name, t) in &self.targets.aws {
            writeln!(
                f,
                "targets.aws.{name}: region {}, endpoint {}",
                t.region,
                t.endpoint_url.as_deref().unwrap_or("default")
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base(dir: &Path) -> String {
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
    fn aws_targets_parse_and_are_checked() {
        let d = tempfile::tempdir().unwrap();
        let cfg = Config::parse(
            &format!(
                "{}targets:\n  aws:\n    main:\n      region: eu-west-1\n      endpoint_url: http://127.0.0.1:5000\n",
                base(d.path())
            ),
            "t",
        )
        .unwrap();
        assert!(cfg.validate(Mode::Serve).is_empty());
        let t = &cfg.targets.aws["main"];
        assert_eq!(t.role_max_session, Duration::hours(1));
        assert!(format!("{cfg}").contains("targets.aws.main: region eu-west-1"));
        let cfg = Config::parse(
            &format!(
                "{}targets:\n  aws:\n    b@d:\n      region: EU\n      endpoint_url: 'ftp://x'\n      role_max_session: 13h\n",
                base(d.path())
            ),
            "t",
        )
        .unwrap();
        let all = cfg.validate(Mode::Serve).join("\n");
        for key in [
            "target names",
            ".region",
            ".endpoint_url",
            ".role_max_session",
        ] {
            assert!(all.contains(key), "missing {key} in {all}");
        }
        assert!(
            Config::parse(
                &format!(
                    "{}targets:\n  aws:\n    m: {{region: eu-west-1, secret: x}}\n",
                    base(d.path())
                ),
                "t"
            )
            .is_err()
        );
    }

    #[test]
    fn postgres_targets_parse_and_are_checked() {
        let d = tempfile::tempdir().unwrap();
        let ok = format!(
            "{}targets:\n  postgres:\n    main:\n      admin_url: {{value: \"postgres://a:hunter2@db/postgres\"}}\n      host: db.example\n",
            base(d.path())
        );
        let cfg = Config::parse(&ok, "t").unwrap();
        assert!(cfg.validate(Mode::Serve).is_empty());
        let t = &cfg.targets.postgres["main"];
        assert_eq!(
            (t.port, t.sslmode, t.role_prefix.as_str()),
            (5432, SslMode::VerifyFull, "brk_")
        );
        assert!(!format!("{cfg}").contains("hunter2"));
        assert!(!format!("{cfg:?}").contains("hunter2"));
        let bad = format!(
            "{}targets:\n  postgres:\n    main:\n      admin_url: {{env: NOPE_NOT_SET_X}}\n      host: ''\n      pool_size: 0\n      role_prefix: pg_x\n      scram_iterations: 0\n",
            base(d.path())
        );
        let p = Config::parse(&bad, "t")
            .unwrap()
            .validate(Mode::Serve)
            .join("\n");
        for key in [
            "main.admin_url",
            "main.host",
            "main.pool_size",
            "main.role_prefix",
            "main.scram_iterations",
        ] {
            assert!(p.contains(key), "missing {key} in {p}");
        }
        assert!(
            Config::parse(&format!("{}targets:\n  mysql: {{}}\n", base(d.path())), "t").is_err()
        );
    }

    #[test]
    fn env_overrides_apply() {
        let d = tempfile::tempdir().unwrap();
        let mut cfg = Config::parse(&base(d.path()), "t").unwrap();
        cfg.apply_env(|k| (k == "BROKER_LISTEN").then(|| "127.0.0.1:9999".to_owned()))
            .unwrap();
        assert_eq!(cfg.listen.port(), 9999);
        assert!(
            cfg.apply_env(|k| (k == "BROKER_LOG_FORMAT").then(|| "xml".to_owned()))
                .is_err()
        );
    }
}

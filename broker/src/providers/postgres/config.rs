//! `targets.postgres.<name>` in the broker config: one Postgres server job users are created on,
//! its defaults and its validation. The provider owns this section; `config` only gathers the
//! targets by name (`config` imports `providers`, never the reverse).

use crate::secret::SecretRef;
use crate::time::serde_duration;
use serde::Deserialize;
use time::Duration;

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
    super::scram::DEFAULT_ITERATIONS
}
fn default_role_prefix() -> String {
    super::naming::DEFAULT_PREFIX.to_owned()
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

impl PostgresTargetConfig {
    /// Every problem of this target, each naming its key under `key` (`targets.postgres.<name>`).
    pub fn validate(&self, key: &str) -> Vec<String> {
        let mut p = Vec::new();
        if let Err(e) = self.admin_url.resolve() {
            p.push(format!("{key}.admin_url: {e}"));
        }
        if self.host.trim().is_empty() {
            p.push(format!("{key}.host: required (the host jobs connect to)"));
        }
        if self.pool_size == 0 || self.pool_size > 100 {
            p.push(format!("{key}.pool_size: must be 1 to 100"));
        }
        if !(1..=super::scram::MAX_ITERATIONS).contains(&self.scram_iterations) {
            p.push(format!("{key}.scram_iterations: must be 1 to 100000"));
        }
        if self.connect_timeout <= Duration::ZERO {
            p.push(format!("{key}.connect_timeout: must be positive"));
        }
        if let Err(e) = super::naming::check_prefix(&self.role_prefix) {
            p.push(format!("{key}.role_prefix: {e}"));
        }
        p
    }

    /// The summary line's tail: where the admin URL comes from (never what it is), and what
    /// jobs are handed.
    pub fn describe(&self) -> String {
        format!(
            "admin_url {}, host {}:{}, sslmode {}",
            self.admin_url.describe(),
            self.host,
            self.port,
            self.sslmode.as_str()
        )
    }
}

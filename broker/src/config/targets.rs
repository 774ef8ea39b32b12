//! `targets:` in the config: the Postgres servers and AWS settings credentials are minted on,
//! their defaults, their validation and their summary line.

use crate::secret::SecretRef;
use crate::time::serde_duration;
use serde::Deserialize;
use std::fmt;
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

/// A target name as credentials name it in `target`: `[A-Za-z0-9_-]+`.
fn valid_target_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

impl TargetsConfig {
    /// Every problem, each naming its key (`targets.postgres.<name>.…`).
    pub fn validate(&self) -> Vec<String> {
        let mut p = Vec::new();
        for (name, t) in &self.postgres {
            let key = format!("targets.postgres.{name}");
            if !valid_target_name(name) {
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
        for (name, t) in &self.aws {
            let key = format!("targets.aws.{name}");
            if !valid_target_name(name) {
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
        p
    }
}

impl fmt::Display for TargetsConfig {
    /// One line per target: where its admin URL comes from, never what it is.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (name, t) in &self.postgres {
            writeln!(
                f,
                "targets.postgres.{name}: admin_url {}, host {}:{}, sslmode {}",
                t.admin_url.describe(),
                t.host,
                t.port,
                t.sslmode.as_str()
            )?;
        }
        for (name, t) in &self.aws {
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
    use crate::config::tests::base;
    use crate::config::{Config, Mode};

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
}

//! `targets:` in the config: the Postgres servers and AWS settings credentials are minted on, by
//! name. Each provider owns its own section (`providers::postgres::config`,
//! `providers::aws_sts::config`: keys, defaults, checks, summary); this file checks the names and
//! gathers the sections.

pub use crate::providers::aws_sts::config::{AwsTargetConfig, valid_aws_region};
pub use crate::providers::github_app::GithubAppConfig;
pub use crate::providers::postgres::config::{PostgresTargetConfig, SslMode};
pub use crate::providers::ssh_cert::SshCaConfig;
use serde::Deserialize;
use std::fmt;

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
    /// SSH user CAs by name (`ssh_cert:` credentials name one in `ca`).
    #[serde(default)]
    pub ssh_ca: std::collections::BTreeMap<String, SshCaConfig>,
    /// GitHub Apps by name (`github_app:` credentials name one in `app`).
    #[serde(default)]
    pub github_app: std::collections::BTreeMap<String, GithubAppConfig>,
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
            p.extend(t.validate(&key));
        }
        for (name, t) in &self.aws {
            let key = format!("targets.aws.{name}");
            if !valid_target_name(name) {
                p.push(format!("{key}: target names are [A-Za-z0-9_-]"));
            }
            p.extend(t.validate(&key));
        }
        for (name, t) in &self.ssh_ca {
            let key = format!("targets.ssh_ca.{name}");
            if !valid_target_name(name) {
                p.push(format!("{key}: target names are [A-Za-z0-9_-]"));
            }
            p.extend(t.validate(&key));
        }
        for (name, t) in &self.github_app {
            let key = format!("targets.github_app.{name}");
            if !valid_target_name(name) {
                p.push(format!("{key}: target names are [A-Za-z0-9_-]"));
            }
            p.extend(t.validate(&key));
        }
        p
    }
}

impl fmt::Display for TargetsConfig {
    /// One line per target: where its admin URL comes from, never what it is.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (name, t) in &self.postgres {
            writeln!(f, "targets.postgres.{name}: {}", t.describe())?;
        }
        for (name, t) in &self.aws {
            writeln!(f, "targets.aws.{name}: {}", t.describe())?;
        }
        for (name, t) in &self.ssh_ca {
            writeln!(f, "targets.ssh_ca.{name}: {}", t.describe())?;
        }
        for (name, t) in &self.github_app {
            writeln!(f, "targets.github_app.{name}: {}", t.describe())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::base;
    use crate::config::{Config, Mode};
    use time::Duration;

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
    fn ssh_ca_and_github_app_targets_parse_and_are_checked() {
        let d = tempfile::tempdir().unwrap();
        let key = ssh_key::PrivateKey::random(
            &mut ssh_key::rand_core::OsRng,
            ssh_key::Algorithm::Ed25519,
        )
        .unwrap();
        let key_path = d.path().join("ca");
        std::fs::write(&key_path, key.to_openssh(ssh_key::LineEnding::LF).unwrap()).unwrap();
        let rsa =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/keys/rsa-1.pem");
        let ok = format!(
            "{}targets:\n  ssh_ca:\n    main:\n      signing_key: {{file: {}}}\n  github_app:\n    rel:\n      app_id: 42\n      private_key: {{file: {}}}\n",
            base(d.path()),
            key_path.display(),
            rsa.display()
        );
        let cfg = Config::parse(&ok, "t").unwrap();
        assert!(
            cfg.validate(Mode::Serve).is_empty(),
            "{:?}",
            cfg.validate(Mode::Serve)
        );
        assert_eq!(cfg.targets.ssh_ca["main"].backdate, Duration::minutes(1));
        assert_eq!(
            cfg.targets.github_app["rel"].api_url,
            "https://api.github.com"
        );
        let shown = format!("{cfg}");
        assert!(
            shown.contains("targets.ssh_ca.main: signing_key file"),
            "{shown}"
        );
        assert!(
            shown.contains("targets.github_app.rel: app_id 42"),
            "{shown}"
        );
        assert!(!shown.contains("OPENSSH") && !format!("{cfg:?}").contains("OPENSSH"));
        let bad = format!(
            "{}targets:\n  ssh_ca:\n    main:\n      signing_key: {{file: {}}}\n      backdate: 1h\n  github_app:\n    rel:\n      app_id: 0\n      private_key: {{file: {}}}\n      api_url: 'ftp://x'\n",
            base(d.path()),
            rsa.display(),
            key_path.display()
        );
        let p = Config::parse(&bad, "t")
            .unwrap()
            .validate(Mode::Serve)
            .join("\n");
        for key in [
            "targets.ssh_ca.main.signing_key",
            "targets.ssh_ca.main.backdate",
            "targets.github_app.rel.app_id",
            "targets.github_app.rel.private_key",
            "targets.github_app.rel.api_url",
        ] {
            assert!(p.contains(key), "missing {key} in {p}");
        }
        assert!(!p.contains("BEGIN"), "no key material in errors");
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

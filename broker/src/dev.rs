//! `broker dev`: the broker on an embedded default, for trying it out. SQLite in a temp dir, the
//! built-in development issuers (GitHub- and GitLab-shaped, named `github` and `gitlab` so the
//! example policies apply unchanged), an ephemeral signing key.
//!
//! The development issuers sign with a key that is public (committed in the source). The config
//! loader refuses them outside dev mode (`danger_dev_issuer`), and every token they sign carries
//! an `iss` under `.invalid`, so nothing real can ever accept one.

use crate::config::{
    ApiTokenConfig, Config, GrantConfig, Limits, LogConfig, Mode, PolicyConfig, ReaperConfig,
    SecretRef, StoreConfig,
};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// The audience dev tokens carry and the dev broker requires.
pub const DEV_AUDIENCE: &str = "broker-dev";

/// The embedded dev config failed its own validation (a bug, or a bad `--listen`/data dir):
/// every problem, one a line.
#[derive(Debug, thiserror::Error)]
#[error("{}", .0.join("\n"))]
pub struct DevConfigError(pub Vec<String>);

/// Build the dev config. `data_dir` holds the SQLite file.
pub fn config(
    listen: SocketAddr,
    data_dir: &Path,
    policies: PathBuf,
) -> Result<Config, DevConfigError> {
    let db = data_dir.join("broker.db");
    let cfg = Config {
        listen,
        admin_listen: None,
        public_url: format!("http://{listen}"),
        audience: DEV_AUDIENCE.into(),
        store: StoreConfig {
            url: SecretRef::inline(format!("sqlite:{}", db.display())),
        },
        // Edits to the policy files take effect without a restart.
        policies: PolicyConfig {
            dir: policies,
            watch_interval: Some(time::Duration::seconds(2)),
        },
        issuers: vec![
            crate::oidc::dev::issuer_config("github", DEV_AUDIENCE),
            crate::oidc::dev::gitlab_issuer_config("gitlab", DEV_AUDIENCE),
        ],
        api_tokens: ApiTokenConfig::default(),
        targets: Default::default(),
        grants: GrantConfig::default(),
        limits: Limits::default(),
        reaper: ReaperConfig {
            interval: time::Duration::seconds(2),
            ..ReaperConfig::default()
        },
        log: LogConfig::default(),
        operators: Vec::new(),
        webhooks: Default::default(),
        // Local quickstart on one listener: keep `/metrics` and the detailed `/readyz` there.
        metrics: crate::config::MetricsConfig {
            danger_public_diagnostics: true,
            ..Default::default()
        },
        telemetry: Default::default(),
        refusals: Default::default(),
        leaks: Default::default(),
        audit: Default::default(),
    };
    let problems = cfg.validate(Mode::Dev);
    if problems.is_empty() {
        Ok(cfg)
    } else {
        Err(DevConfigError(problems))
    }
}

/// The quickstart printed when `broker dev` is up.
pub fn quickstart(addr: SocketAddr, data_dir: &Path) -> String {
    let exe = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "broker".into());
    let url = format!("http://{addr}");
    format!(
        r#"
broker dev is running at {url}
  DEVELOPMENT ONLY: built-in test issuers (public keys), SQLite at {data}/broker.db,
  policies from ./policies. Never expose this to a network.

Try it (in another terminal):

  # 1. a GitHub-shaped job token for acme/api on main, signed by the dev issuer
  TOKEN=$({exe} dev token --repo acme/api --ref refs/heads/main)

  # 2. exchange it for the `deploy-api` credential (an API token)
  curl -s -X POST {url}/v1/exchange -H "Authorization: Bearer $TOKEN" \
       -H 'content-type: application/json' -d '{{"credentials":["deploy-api"],"ttl":"10m"}}' | tee /tmp/grant.json

  # 3. introspect the API token (RFC 7662): active
  curl -s -X POST {url}/v1/introspect --data-urlencode "token=$(jq -r '.credentials["deploy-api"].token' /tmp/grant.json)"

  # 4. revoke the grant, then introspect again: inactive
  curl -s -X POST {url}/v1/revoke -H "Authorization: Bearer $(jq -r .revocation_token /tmp/grant.json)"

  # 5. the audit log: the exchange and the revocation
  {exe} audit list --store sqlite:{data}/broker.db

  # a denied one: another branch (403 policy_denied, audited too)
  curl -s -X POST {url}/v1/exchange -H "Authorization: Bearer $({exe} dev token --ref refs/heads/feature)" \
       -H 'content-type: application/json' -d '{{"credentials":["deploy-api"]}}'
"#,
        data = data_dir.display()
    )
}

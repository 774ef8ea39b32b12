//! `targets.github_app.<name>` in the broker config: one GitHub App (its id and private key) and
//! the API it talks to (github.com or a GitHub Enterprise Server). The provider owns this
//! section; `config` only gathers the targets by name.

use crate::secret::SecretRef;
use crate::time::serde_duration;
use serde::Deserialize;
use time::Duration;

fn default_api_url() -> String {
    "https://api.github.com".into()
}
fn default_timeout() -> Duration {
    Duration::seconds(10)
}

/// One GitHub App the broker mints installation tokens with (`targets.github_app.<name>`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GithubAppConfig {
    /// The App's id (`iss` of the App JWT).
    pub app_id: u64,
    /// The App's private key (PEM, as GitHub hands it out), from a file or an environment
    /// variable.
    pub private_key: SecretRef,
    /// The REST API's base URL: `https://api.github.com` (default), or
    /// `https://<host>/api/v3` for GitHub Enterprise Server.
    #[serde(default = "default_api_url")]
    pub api_url: String,
    /// Bound on each call to the API.
    #[serde(default = "default_timeout", with = "serde_duration")]
    pub timeout: Duration,
}

impl GithubAppConfig {
    /// Every problem of this App, each naming its key under `key` (`targets.github_app.<name>`).
    pub fn validate(&self, key: &str) -> Vec<String> {
        let mut p = Vec::new();
        match self.private_key.resolve() {
            Err(e) => p.push(format!("{key}.private_key: {e}")),
            Ok(pem) => {
                if jsonwebtoken::EncodingKey::from_rsa_pem(pem.expose().as_bytes()).is_err() {
                    p.push(format!(
                        "{key}.private_key: not an RSA private key in PEM (value not shown)"
                    ));
                }
            }
        }
        if self.app_id == 0 {
            p.push(format!("{key}.app_id: required (the App's numeric id)"));
        }
        match url::Url::parse(&self.api_url) {
            Ok(u) if matches!(u.scheme(), "https" | "http") && u.host().is_some() => {}
            _ => p.push(format!("{key}.api_url: must be an http(s) URL")),
        }
        if self.timeout <= Duration::ZERO || self.timeout > Duration::minutes(1) {
            p.push(format!("{key}.timeout: must be 1s to 1m"));
        }
        p
    }

    /// The summary line's tail: app id, API, where the key comes from (never what it is).
    pub fn describe(&self) -> String {
        format!(
            "app_id {}, api_url {}, private_key {}",
            self.app_id,
            self.api_url,
            self.private_key.describe()
        )
    }
}

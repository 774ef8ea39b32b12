//! `targets.ssh_ca.<name>` in the broker config: one SSH user CA, its signing key and how far
//! certificates are backdated. The provider owns this section; `config` only gathers the targets
//! by name (`config` imports `providers`, never the reverse).

use crate::secret::{SecretRef, Sensitive};
use crate::time::serde_duration;
use serde::Deserialize;
use ssh_key::PrivateKey;
use time::Duration;

fn default_backdate() -> Duration {
    Duration::minutes(1)
}

/// One SSH user CA the broker signs job certificates with (`targets.ssh_ca.<name>`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SshCaConfig {
    /// The CA's private key: an unencrypted OpenSSH Ed25519 key (`ssh-keygen -t ed25519 -N ''`),
    /// from a file or an environment variable.
    pub signing_key: SecretRef,
    /// How far before the exchange a certificate becomes valid, for hosts whose clocks run
    /// behind (default 1m, at most 10m).
    #[serde(default = "default_backdate", with = "serde_duration")]
    pub backdate: Duration,
}

/// Why a CA's key cannot be used. Names the source, never key material.
#[derive(Debug, thiserror::Error)]
pub enum SshCaConfigError {
    #[error("targets.ssh_ca.{ca}.signing_key: {reason}")]
    Key { ca: String, reason: String },
}

impl SshCaConfig {
    /// Every problem of this CA, each naming its key under `key` (`targets.ssh_ca.<name>`).
    pub fn validate(&self, key: &str) -> Vec<String> {
        let mut p = Vec::new();
        if let Err(e) = self.load_key() {
            p.push(format!("{key}.signing_key: {e}"));
        }
        if self.backdate < Duration::ZERO || self.backdate > Duration::minutes(10) {
            p.push(format!("{key}.backdate: must be 0s to 10m"));
        }
        p
    }

    /// The CA key, parsed. Errors are fixed text (the parser's could quote the file).
    pub fn load_key(&self) -> Result<PrivateKey, String> {
        let text: Sensitive = self.signing_key.resolve().map_err(|e| e.to_string())?;
        let key = PrivateKey::from_openssh(text.expose().trim())
            .map_err(|_| "not an OpenSSH private key (value not shown)".to_owned())?;
        if key.is_encrypted() {
            return Err("the key is encrypted: give an unencrypted key".into());
        }
        if key.algorithm() != ssh_key::Algorithm::Ed25519 {
            return Err(format!(
                "{} keys are not supported as a CA key: use Ed25519",
                key.algorithm()
            ));
        }
        Ok(key)
    }

    /// The summary line's tail: where the key comes from (never what it is).
    pub fn describe(&self) -> String {
        format!(
            "signing_key {}, backdate {}s",
            self.signing_key.describe(),
            self.backdate.whole_seconds()
        )
    }
}

//! The policy bundle in force: load, check against the providers, reload (SIGHUP, watch).

use super::Broker;
use crate::metrics;
use crate::policy::Bundle;
use crate::providers::{CredentialKind, Provider};
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::Arc;
use time::OffsetDateTime;

/// The loaded policy bundle and what happened at the last (re)load.
#[derive(Debug, Clone, Serialize)]
pub struct PolicyStatus {
    pub digest: String,
    #[serde(with = "time::serde::rfc3339")]
    pub loaded_at: OffsetDateTime,
    /// The last reload's error, if it was rejected (the previous bundle stays in force).
    pub last_error: Option<String>,
}

/// Fail closed on a bundle this broker cannot serve: every credential's kind needs a provider
/// here, and each provider checks its definitions (e.g. that a named target is configured).
/// Used at start and on every reload, so a reload cannot bring in what a start would refuse.
pub(super) fn check_bundle(
    bundle: &Bundle,
    providers: &BTreeMap<CredentialKind, Arc<dyn Provider>>,
) -> Result<(), String> {
    if let Some(def) = bundle
        .credentials()
        .iter()
        .find(|d| !providers.contains_key(&d.spec.kind()))
    {
        return Err(format!(
            "credential {:?} needs a {} provider, which this broker does not configure",
            def.name,
            def.spec.kind().as_str()
        ));
    }
    for p in providers.values() {
        p.check_definitions(bundle.credentials())?;
    }
    Ok(())
}

impl Broker {
    pub fn policies(&self) -> Arc<Bundle> {
        self.policies.load_full()
    }

    pub fn policy_status(&self) -> PolicyStatus {
        self.policy_status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Reload policies from disk. A bundle that fails to load is rejected whole; the old one
    /// stays in force and the error is kept for `/readyz`.
    pub fn reload_policies(&self) -> Result<String, String> {
        let result = Bundle::load_dir(&self.policy_dir, &self.policy_opts)
            .map_err(|e| e.to_string())
            .and_then(|b| check_bundle(&b, &self.providers).map(|()| b));
        let mut st = self.policy_status.lock().unwrap_or_else(|e| e.into_inner());
        match result {
            Ok(bundle) => {
                let digest = bundle.digest().to_owned();
                self.policies.store(Arc::new(bundle));
                *st = PolicyStatus {
                    digest: digest.clone(),
                    loaded_at: self.clock.now(),
                    last_error: None,
                };
                tracing::info!(digest = %digest, "policies reloaded");
                metrics::policy_reload(true);
                metrics::policy_loaded(&digest);
                Ok(digest)
            }
            Err(e) => {
                tracing::error!(error = %e, kept_digest = %st.digest, "policy reload rejected; previous bundle stays in force");
                st.last_error = Some(e.clone());
                metrics::policy_reload(false);
                Err(e)
            }
        }
    }
}

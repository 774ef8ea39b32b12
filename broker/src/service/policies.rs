//! The policy bundle in force: load, check against the providers, reload (SIGHUP, watch).

use super::Broker;
use crate::metrics;
use crate::policy::{Bundle, LoadErrors};
use crate::providers::{CredentialKind, DefinitionError, Provider};
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

/// Why a policy bundle was not put in force (at start the broker does not start; on reload the
/// previous bundle stays).
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// At start: the files did not load.
    #[error("policies in {dir} failed to load:\n{errors}")]
    StartLoad { dir: String, errors: LoadErrors },
    /// On reload: the files did not load.
    #[error("{0}")]
    Load(LoadErrors),
    #[error(
        "credential {credential:?} needs a {kind} provider, which this broker does not configure"
    )]
    NoProvider {
        credential: String,
        kind: &'static str,
    },
    #[error(transparent)]
    Definitions(#[from] DefinitionError),
}

/// Fail closed on a bundle this broker cannot serve: every credential's kind needs a provider
/// here, and each provider checks its definitions (e.g. that a named target is configured).
/// Used at start and on every reload, so a reload cannot bring in what a start would refuse.
pub(super) fn check_bundle(
    bundle: &Bundle,
    providers: &BTreeMap<CredentialKind, Arc<dyn Provider>>,
) -> Result<(), PolicyError> {
    if let Some(def) = bundle
        .credentials()
        .iter()
        .find(|d| !providers.contains_key(&d.spec.kind()))
    {
        return Err(PolicyError::NoProvider {
            credential: def.name.clone(),
            kind: def.spec.kind().as_str(),
        });
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
    pub fn reload_policies(&self) -> Result<String, PolicyError> {
        let result = Bundle::load_dir(&self.policy_dir, &self.policy_opts)
            .map_err(PolicyError::Load)
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
                st.last_error = Some(e.to_string());
                metrics::policy_reload(false);
                Err(e)
            }
        }
    }
}

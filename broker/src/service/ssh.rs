//! The SSH CAs' public surface: each CA's public key (for `TrustedUserCAKeys`) and its KRL of
//! revoked certificates (for `RevokedKeys`), built from the store on each request.

use super::{Broker, ServiceError};
use crate::providers::CredentialKind;
use crate::providers::ssh_cert::SshCertProvider;
use std::sync::Arc;
use time::Duration;

/// How long after a revoked certificate's expiry the KRL still lists it, for hosts whose clocks
/// run behind the broker's.
const KRL_SKEW: Duration = Duration::minutes(10);

impl Broker {
    /// The SSH user CAs to publish (none by default: the endpoints answer 404).
    pub fn set_ssh_cas(&mut self, cas: Option<Arc<SshCertProvider>>) {
        self.ssh_cas = cas;
    }

    /// The CA's public key line; `None`: no such CA.
    pub fn ssh_ca_public_key(&self, ca: &str) -> Option<String> {
        self.ssh_cas.as_ref()?.ca_public_key(ca)
    }

    /// The CA's KRL: the serials of every `ssh_cert` credential of a grant that is no longer
    /// active (revoked by its job, an operator, a webhook; failed) and whose certificate has not
    /// expired. `Ok(None)`: no such CA.
    pub async fn ssh_krl(&self, ca: &str) -> Result<Option<Vec<u8>>, ServiceError> {
        let Some(cas) = &self.ssh_cas else {
            return Ok(None);
        };
        if cas.ca_public_key(ca).is_none() {
            return Ok(None);
        }
        let now = self.clock.now();
        let revoked = self
            .store
            .revoked_resource_ids(CredentialKind::SshCert, now - KRL_SKEW)
            .await
            .map_err(ServiceError::Store)?;
        match cas.krl(ca, &revoked, now) {
            None => Ok(None),
            Some(Ok(krl)) => Ok(Some(krl)),
            Some(Err(error)) => Err(ServiceError::Provider {
                credential: String::new(),
                error,
            }),
        }
    }
}

//! The SSH certificate provider: signs a job's public key (or a pair it generates) with a
//! configured CA key, and builds each CA's KRL from the revoked grants' serials.

use super::config::{SshCaConfig, SshCaConfigError};
use super::krl::encode_krl;
use super::spec::valid_principal;
use crate::oidc::JobAttribution;
use crate::providers::template::Template;
use crate::providers::{
    CredentialDef, CredentialKind, CredentialSpec, DefinitionError, Field, IssuedCredential,
    MintRequest, Minted, Provider, ProviderError,
};
use crate::secret::Sensitive;
use async_trait::async_trait;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use ssh_key::certificate::{Builder, CertType};
use ssh_key::rand_core::OsRng;
use ssh_key::{Algorithm, HashAlg, LineEnding, PrivateKey, PublicKey};
use std::collections::BTreeMap;
use std::fmt;
use time::{Duration, OffsetDateTime};
use uuid::Uuid;

/// One configured CA, its key parsed once.
struct Ca {
    key: PrivateKey,
    backdate: Duration,
}

/// The `ssh_cert` provider: the configured CAs by name.
pub struct SshCertProvider {
    cas: BTreeMap<String, Ca>,
}

impl fmt::Debug for SshCertProvider {
    /// CA names and public fingerprints only.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let cas: BTreeMap<&str, String> = self
            .cas
            .iter()
            .map(|(n, c)| {
                let fp = c.key.public_key().fingerprint(HashAlg::Sha256).to_string();
                (n.as_str(), fp)
            })
            .collect();
        f.debug_struct("SshCertProvider")
            .field("cas", &cas)
            .finish()
    }
}

/// The certificate serial of a credential: the first 8 bytes of SHA-256 over the grant id and
/// credential name (so it is decided before signing and recorded in the grant intent), never 0
/// (a KRL cannot revoke serial 0).
pub fn serial_of(grant_id: Uuid, credential: &str) -> u64 {
    let mut h = Sha256::new();
    h.update(grant_id.as_bytes());
    h.update(b".");
    h.update(credential.as_bytes());
    let d = h.finalize();
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    u64::from_be_bytes(b).max(1)
}

/// `<ca>:<serial>` → (ca, serial).
fn split_resource_id(id: &str) -> Option<(&str, u64)> {
    let (ca, serial) = id.rsplit_once(':')?;
    Some((ca, serial.parse().ok()?))
}

/// A key id names the job, in sshd's log lines (`ID … (serial …)`): printable ASCII only.
fn key_id(req: &MintRequest<'_>) -> String {
    let job = JobAttribution::from_claims(req.claims);
    let part = |v: Option<&String>| v.map_or("-", String::as_str).to_owned();
    let id = format!(
        "broker grant={} credential={} repository={} run={} attempt={} job={}",
        req.grant_id,
        req.credential.name,
        part(job.repository.as_ref()),
        part(job.run_id.as_ref()),
        part(job.run_attempt.as_ref()),
        part(job.job_id.as_ref()),
    );
    id.chars()
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '_'
            }
        })
        .take(512)
        .collect()
}

fn bad(message: impl Into<String>) -> ProviderError {
    ProviderError::InvalidParameters(message.into())
}

/// The job's public key, checked: a plain key (not a certificate) of a type sshd accepts for
/// users, RSA of at least 2048 bits, DSA never.
fn job_public_key(line: &str) -> Result<PublicKey, ProviderError> {
    let key = PublicKey::from_openssh(line.trim())
        .map_err(|_| bad("public_key: not an OpenSSH public key line (ssh-ed25519 AAAA…)"))?;
    match key.algorithm() {
        Algorithm::Ed25519
        | Algorithm::Ecdsa { .. }
        | Algorithm::SkEd25519
        | Algorithm::SkEcdsaSha2NistP256 => Ok(key),
        Algorithm::Rsa { .. } => {
            let bits = key
                .key_data()
                .rsa()
                .and_then(|k| k.n.as_positive_bytes())
                .map_or(0, |n| n.len() * 8);
            if bits >= 2048 {
                Ok(key)
            } else {
                Err(bad("public_key: RSA keys must have at least 2048 bits"))
            }
        }
        _ => Err(bad(
            "public_key: use an Ed25519, ECDSA or RSA (2048 bits or more) key",
        )),
    }
}

impl SshCertProvider {
    /// The configured CAs, each key parsed and checked.
    pub fn new(cfg: &BTreeMap<String, SshCaConfig>) -> Result<Self, SshCaConfigError> {
        let mut cas = BTreeMap::new();
        for (name, c) in cfg {
            let key = c.load_key().map_err(|reason| SshCaConfigError::Key {
                ca: name.clone(),
                reason,
            })?;
            cas.insert(
                name.clone(),
                Ca {
                    key,
                    backdate: c.backdate,
                },
            );
        }
        Ok(Self { cas })
    }

    /// A provider with one fresh in-memory CA (tests).
    pub fn ephemeral(name: &str) -> Result<Self, ssh_key::Error> {
        let key = PrivateKey::random(&mut OsRng, Algorithm::Ed25519)?;
        let ca = Ca {
            key,
            backdate: Duration::minutes(1),
        };
        Ok(Self {
            cas: BTreeMap::from([(name.to_owned(), ca)]),
        })
    }

    /// The CA's public key as one `authorized_keys`-style line, for `TrustedUserCAKeys`.
    pub fn ca_public_key(&self, ca: &str) -> Option<String> {
        let c = self.cas.get(ca)?;
        let mut public = c.key.public_key().clone();
        public.set_comment(format!("broker-ssh-ca:{ca}"));
        public.to_openssh().ok()
    }

    /// The KRL of `ca` revoking the serials among `revoked` (resource ids of revoked `ssh_cert`
    /// credentials, any CA); `None` for an unknown CA.
    pub fn krl(
        &self,
        ca: &str,
        revoked: &[String],
        now: OffsetDateTime,
    ) -> Option<Result<Vec<u8>, ProviderError>> {
        let c = self.cas.get(ca)?;
        let serials: Vec<u64> = revoked
            .iter()
            .filter_map(|id| split_resource_id(id))
            .filter(|(owner, _)| *owner == ca)
            .map(|(_, s)| s)
            .collect();
        let at = u64::try_from(now.unix_timestamp()).unwrap_or_default();
        Some(
            encode_krl(
                c.key.public_key(),
                &serials,
                at,
                at,
                &format!("broker KRL for ssh_ca {ca}"),
            )
            .map_err(|_| ProviderError::Internal("could not encode the KRL".into())),
        )
    }

    fn spec(def: &CredentialDef) -> Result<&super::SshCertSpec, ProviderError> {
        match &def.spec {
            CredentialSpec::SshCert(s) => Ok(s),
            _ => Err(ProviderError::Misconfigured(
                "not an ssh_cert credential".into(),
            )),
        }
    }

    /// Parse the request parameters: `{"public_key": "<line>"}`, or none to have a pair
    /// generated when the policy allows it.
    fn parameters(
        spec: &super::SshCertSpec,
        params: &Value,
    ) -> Result<Option<PublicKey>, ProviderError> {
        let line = match params {
            Value::Null => None,
            Value::Object(m) => {
                if let Some(k) = m.keys().find(|k| k.as_str() != "public_key") {
                    return Err(bad(format!(
                        "unknown parameter {k:?} (ssh_cert takes public_key)"
                    )));
                }
                match m.get("public_key") {
                    None => None,
                    Some(Value::String(s)) => Some(s.as_str()),
                    Some(_) => return Err(bad("public_key: must be a string")),
                }
            }
            _ => return Err(bad("parameters must be an object")),
        };
        match line {
            Some(l) => job_public_key(l).map(Some),
            None if spec.allow_generated_key => Ok(None),
            None => Err(bad(
                "public_key: required (this credential does not let the broker generate keys)",
            )),
        }
    }
}

#[async_trait]
impl Provider for SshCertProvider {
    fn kind(&self) -> CredentialKind {
        CredentialKind::SshCert
    }

    /// A signature: nothing exists outside this process until the response is sent.
    fn mints_in_memory(&self) -> bool {
        true
    }

    /// Revocation is the grant's status in the store: the KRL lists revoked grants' serials.
    fn revoked_in_store(&self) -> bool {
        true
    }

    /// `<ca>:<serial>`: the serial is what hosts see and what the KRL lists, so the audit
    /// event's resource ids name it.
    fn resource_id(&self, grant_id: Uuid, credential: &CredentialDef) -> String {
        let ca = Self::spec(credential).map_or("-", |s| s.ca.as_str());
        format!("{ca}:{}", serial_of(grant_id, &credential.name))
    }

    fn check_parameters(
        &self,
        credential: &CredentialDef,
        params: &Value,
    ) -> Result<(), ProviderError> {
        Self::parameters(Self::spec(credential)?, params).map(|_| ())
    }

    async fn mint(&self, req: MintRequest<'_>) -> Result<Minted, ProviderError> {
        self.mint_with(req, &Value::Null).await
    }

    async fn mint_with(
        &self,
        req: MintRequest<'_>,
        params: &Value,
    ) -> Result<Minted, ProviderError> {
        let spec = Self::spec(req.credential)?;
        let ca = self.cas.get(&spec.ca).ok_or_else(|| {
            ProviderError::Misconfigured(format!("ssh_ca {:?} is not configured", spec.ca))
        })?;
        let (public, generated) = match Self::parameters(spec, params)? {
            Some(k) => (k, None),
            None => {
                let pair = PrivateKey::random(&mut OsRng, Algorithm::Ed25519)
                    .map_err(|_| ProviderError::Internal("could not generate a key".into()))?;
                (pair.public_key().clone(), Some(pair))
            }
        };
        let render = |t: &Template| {
            t.render(req.claims)
                .map_err(|e| ProviderError::InvalidClaim(e.to_string()))
                .and_then(|p| {
                    if valid_principal(&p) {
                        Ok(p)
                    } else {
                        Err(ProviderError::InvalidClaim(
                            "a principal must be printable ASCII without ',' or spaces".into(),
                        ))
                    }
                })
        };
        let principals = spec
            .principals
            .iter()
            .map(render)
            .collect::<Result<Vec<_>, _>>()?;
        let serial: u64 = split_resource_id(req.resource_id)
            .map(|(_, s)| s)
            .ok_or_else(|| ProviderError::Internal("resource id without a serial".into()))?;
        let unix = |t: OffsetDateTime| u64::try_from(t.unix_timestamp()).unwrap_or_default();
        let valid_after = unix(req.now - ca.backdate);
        let valid_before = unix(req.expires_at);
        let key_id = key_id(&req);
        let sign_err = |_| ProviderError::Internal("could not build the certificate".into());
        let mut b = Builder::new_with_random_nonce(
            &mut OsRng,
            public.key_data().clone(),
            valid_after,
            valid_before,
        )
        .map_err(sign_err)?;
        b.serial(serial).map_err(sign_err)?;
        b.cert_type(CertType::User).map_err(sign_err)?;
        b.key_id(key_id.clone()).map_err(sign_err)?;
        for p in &principals {
            b.valid_principal(p.clone()).map_err(sign_err)?;
        }
        for e in &spec.extensions {
            b.extension(e.as_str(), "").map_err(sign_err)?;
        }
        if let Some(cmd) = &spec.force_command {
            b.critical_option("force-command", cmd.clone())
                .map_err(sign_err)?;
        }
        if !spec.source_address.is_empty() {
            b.critical_option("source-address", spec.source_address.join(","))
                .map_err(sign_err)?;
        }
        b.comment(format!("broker serial {serial}"))
            .map_err(sign_err)?;
        let cert = b.sign(&ca.key).map_err(sign_err)?;
        let cert_line = cert.to_openssh().map_err(sign_err)?;
        let fingerprint = public.fingerprint(HashAlg::Sha256).to_string();
        let public_line = public.to_openssh().map_err(sign_err)?;
        let rfc3339 = |t: OffsetDateTime| {
            t.format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default()
        };
        let mut fields = vec![
            ("certificate".into(), Field::Public(json!(cert_line))),
            ("public_key".into(), Field::Public(json!(public_line))),
        ];
        let generated_key = generated.is_some();
        if let Some(pair) = generated {
            let pem = pair
                .to_openssh(LineEnding::LF)
                .map_err(|_| ProviderError::Internal("could not encode the key".into()))?;
            fields.push((
                "private_key".into(),
                Field::Secret(Sensitive::new(pem.to_string())),
            ));
        }
        fields.extend([
            // A string: JSON numbers above 2^53 lose digits in JavaScript.
            ("serial".into(), Field::Public(json!(serial.to_string()))),
            ("key_id".into(), Field::Public(json!(key_id))),
            ("principals".into(), Field::Public(json!(principals))),
            (
                "valid_after".into(),
                Field::Public(json!(rfc3339(req.now - ca.backdate))),
            ),
        ]);
        Ok(Minted {
            fields,
            expires_at: req.expires_at,
            details: json!({
                "ca": spec.ca,
                "serial": serial.to_string(),
                "key_id": key_id,
                "principals": principals,
                "public_key_fingerprint": fingerprint,
                "generated_key": generated_key,
            }),
        })
    }

    /// The KRL is built from the store (revoked grants' serials): nothing to do here.
    async fn revoke(&self, _credential: &IssuedCredential) -> Result<(), ProviderError> {
        Ok(())
    }

    fn revoke_description(&self, credential: &IssuedCredential) -> Option<String> {
        let (ca, serial) = split_resource_id(&credential.resource_id)?;
        Some(format!("serial {serial} listed in the KRL of ssh_ca {ca}"))
    }

    fn check_definitions(&self, defs: &[CredentialDef]) -> Result<(), DefinitionError> {
        for d in defs {
            if let CredentialSpec::SshCert(s) = &d.spec
                && !self.cas.contains_key(&s.ca)
            {
                return Err(DefinitionError::Refused {
                    credential: d.name.clone(),
                    reason: format!("ssh_ca {:?} is not configured under targets.ssh_ca", s.ca),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oidc::{Platform, VerifiedClaims};
    use crate::providers::ssh_cert::{Extension, SshCertSpec};
    use ssh_key::Certificate;

    fn def(principals: &[&str], allow_generated_key: bool) -> CredentialDef {
        CredentialDef {
            name: "deploy-ssh".into(),
            description: None,
            max_ttl: Duration::minutes(15),
            spec: CredentialSpec::SshCert(SshCertSpec {
                ca: "main".into(),
                principals: principals
                    .iter()
                    .map(|p| Template::parse(p).unwrap())
                    .collect(),
                extensions: vec![Extension::PermitPty],
                force_command: Some("/bin/deploy".into()),
                source_address: vec!["10.0.0.0/8".into()],
                allow_generated_key,
            }),
        }
    }

    fn claims(owner: &str) -> VerifiedClaims {
        VerifiedClaims {
            issuer: "github".into(),
            platform: Platform::Github,
            iss: "https://token.actions.githubusercontent.com".into(),
            sub: "repo:acme/api:ref:refs/heads/main".into(),
            jti: Some("j".into()),
            exp: OffsetDateTime::from_unix_timestamp(2_000_000_000).unwrap(),
            iat: None,
            single_use: true,
            replay_until: OffsetDateTime::from_unix_timestamp(2_000_000_000).unwrap(),
            claims: json!({"repository": "acme/api", "repository_owner": owner, "run_id": "42"})
                .as_object()
                .cloned()
                .unwrap(),
        }
    }

    async fn mint(
        p: &SshCertProvider,
        d: &CredentialDef,
        c: &VerifiedClaims,
        params: Value,
    ) -> Result<(Minted, String), ProviderError> {
        let now = OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
        let gid = Uuid::now_v7();
        let rid = p.resource_id(gid, d);
        p.check_parameters(d, &params)?;
        let m = p
            .mint_with(
                MintRequest {
                    grant_id: gid,
                    credential: d,
                    resource_id: &rid,
                    claims: c,
                    now,
                    expires_at: now + Duration::minutes(10),
                },
                &params,
            )
            .await?;
        Ok((m, rid))
    }

    fn field<'a>(m: &'a Minted, k: &str) -> Option<&'a Field> {
        m.fields.iter().find(|(n, _)| n == k).map(|(_, f)| f)
    }

    #[tokio::test]
    async fn certificate_carries_the_policy_and_verifies_against_the_ca() {
        let p = SshCertProvider::ephemeral("main").unwrap();
        let d = def(&["deploy", "ci-${repository_owner}"], true);
        let job = PrivateKey::random(&mut OsRng, Algorithm::Ed25519).unwrap();
        let line = job.public_key().to_openssh().unwrap();
        let (m, rid) = mint(&p, &d, &claims("acme"), json!({"public_key": line}))
            .await
            .unwrap();
        assert!(field(&m, "private_key").is_none());
        let Some(Field::Public(cert)) = field(&m, "certificate") else {
            panic!("certificate is public")
        };
        let cert = Certificate::from_openssh(cert.as_str().unwrap()).unwrap();
        let ca_fp = p.cas["main"].key.public_key().fingerprint(HashAlg::Sha256);
        cert.validate_at(1_800_000_000, [&ca_fp]).unwrap();
        assert!(
            cert.validate_at(1_800_000_000 + 601, [&ca_fp]).is_err(),
            "ends at the TTL"
        );
        assert_eq!(cert.valid_after(), 1_800_000_000 - 60, "backdated a minute");
        assert_eq!(cert.valid_principals(), ["deploy", "ci-acme"]);
        assert_eq!(cert.cert_type(), CertType::User);
        assert_eq!(rid, format!("main:{}", cert.serial()));
        assert!(cert.key_id().contains("repository=acme/api") && cert.key_id().contains("run=42"));
        assert_eq!(cert.extensions().keys().collect::<Vec<_>>(), ["permit-pty"]);
        assert_eq!(cert.critical_options()["force-command"], "/bin/deploy");
        assert_eq!(cert.critical_options()["source-address"], "10.0.0.0/8");
        assert_eq!(cert.public_key(), job.public_key().key_data());
        assert_eq!(m.details["serial"], json!(cert.serial().to_string()));

        // A pair made by the broker: the private key is secret and matches the certificate.
        let (m, _) = mint(&p, &d, &claims("acme"), Value::Null).await.unwrap();
        let Some(Field::Secret(k)) = field(&m, "private_key") else {
            panic!("private key is secret")
        };
        let k = PrivateKey::from_openssh(k.expose()).unwrap();
        let Some(Field::Public(cert)) = field(&m, "certificate") else {
            panic!()
        };
        let cert = Certificate::from_openssh(cert.as_str().unwrap()).unwrap();
        assert_eq!(cert.public_key(), k.public_key().key_data());
        assert!(
            !format!("{m:?}").contains("OPENSSH PRIVATE"),
            "Debug redacts it"
        );
    }

    #[tokio::test]
    async fn refusals() {
        let p = SshCertProvider::ephemeral("main").unwrap();
        // A claim that cannot be a principal.
        let d = def(&["${repository_owner}"], true);
        let err = mint(&p, &d, &claims("a,b"), Value::Null).await.unwrap_err();
        assert_eq!(err.reason_code(), "invalid_claim_value");
        // The job must send its key when the policy says so.
        let d = def(&["deploy"], false);
        let err = mint(&p, &d, &claims("acme"), Value::Null)
            .await
            .unwrap_err();
        assert_eq!(err.reason_code(), "invalid_parameters");
        let short_rsa = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAAQQC7 x";
        for bad in [
            json!({"public_key": short_rsa}),
            json!({"public_key": "nope"}),
            json!([]),
        ] {
            assert_eq!(
                mint(&p, &d, &claims("acme"), bad)
                    .await
                    .unwrap_err()
                    .reason_code(),
                "invalid_parameters"
            );
        }
        // An unknown CA is refused at policy load.
        let mut other = def(&["deploy"], true);
        if let CredentialSpec::SshCert(s) = &mut other.spec {
            s.ca = "other".into();
        }
        assert!(p.check_definitions(&[other]).is_err());
        assert!(p.check_definitions(&[def(&["deploy"], true)]).is_ok());
    }

    #[test]
    fn krl_lists_only_this_cas_serials() {
        let p = SshCertProvider::ephemeral("main").unwrap();
        let now = OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
        let ids = vec!["main:7".to_owned(), "other:9".to_owned(), "junk".to_owned()];
        let krl = p.krl("main", &ids, now).unwrap().unwrap();
        assert!(krl.ends_with(&7u64.to_be_bytes()));
        assert!(!krl.windows(8).any(|w| w == 9u64.to_be_bytes()));
        assert!(p.krl("other", &ids, now).is_none(), "not a CA here");
        assert!(p.ca_public_key("main").unwrap().starts_with("ssh-ed25519 "));
        assert_ne!(serial_of(Uuid::nil(), "a"), serial_of(Uuid::nil(), "b"));
        assert!(!format!("{p:?}").contains("PRIVATE"));
    }
}

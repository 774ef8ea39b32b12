//! The provider boundary: one trait that every credential kind implements.
//!
//! A credential definition in a policy file selects its kind by key (`api_token:`, later
//! `postgres:`, `aws_sts:`); [`CredentialSpec`] is the closed set of kinds. A kind without a
//! provider configured in this broker fails closed at load.

pub mod api_token;
pub mod aws_sts;
pub mod github_app;
pub mod postgres;
pub mod ssh_cert;
pub mod template;

use crate::oidc::VerifiedClaims;
use crate::reason::ReasonCode;
use crate::secret::Sensitive;
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use time::{Duration, OffsetDateTime};
use uuid::Uuid;

pub use api_token::ApiTokenSpec;
pub use aws_sts::AwsStsSpec;
pub use github_app::GithubAppSpec;
pub use postgres::PostgresSpec;
pub use ssh_cert::SshCertSpec;

/// Credential kinds, as stored in grants and audit events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CredentialKind {
    ApiToken,
    Postgres,
    AwsSts,
    SshCert,
    GithubApp,
}

impl CredentialKind {
    /// Every kind this build knows.
    pub const ALL: [CredentialKind; 5] = [
        CredentialKind::ApiToken,
        CredentialKind::Postgres,
        CredentialKind::AwsSts,
        CredentialKind::SshCert,
        CredentialKind::GithubApp,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            CredentialKind::ApiToken => "api_token",
            CredentialKind::Postgres => "postgres",
            CredentialKind::AwsSts => "aws_sts",
            CredentialKind::SshCert => "ssh_cert",
            CredentialKind::GithubApp => "github_app",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "api_token" => Some(CredentialKind::ApiToken),
            "postgres" => Some(CredentialKind::Postgres),
            "aws_sts" => Some(CredentialKind::AwsSts),
            "ssh_cert" => Some(CredentialKind::SshCert),
            "github_app" => Some(CredentialKind::GithubApp),
            _ => None,
        }
    }
}

/// Kind-specific parameters of a credential definition (from a policy file).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CredentialSpec {
    ApiToken(ApiTokenSpec),
    Postgres(PostgresSpec),
    AwsSts(AwsStsSpec),
    SshCert(SshCertSpec),
    GithubApp(GithubAppSpec),
}

impl CredentialSpec {
    pub fn kind(&self) -> CredentialKind {
        match self {
            CredentialSpec::ApiToken(_) => CredentialKind::ApiToken,
            CredentialSpec::Postgres(_) => CredentialKind::Postgres,
            CredentialSpec::AwsSts(_) => CredentialKind::AwsSts,
            CredentialSpec::SshCert(_) => CredentialKind::SshCert,
            CredentialSpec::GithubApp(_) => CredentialKind::GithubApp,
        }
    }
}

/// A named credential definition, as loaded from `policies/`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CredentialDef {
    pub name: String,
    pub description: Option<String>,
    /// Upper bound on any grant's TTL for this credential.
    #[serde(with = "crate::time::serde_duration")]
    pub max_ttl: Duration,
    pub spec: CredentialSpec,
}

/// One value in a minted credential's response.
#[derive(Debug, Clone)]
pub enum Field {
    /// Shown as-is (host, username, expiry).
    Public(serde_json::Value),
    /// A secret: masked by clients, never logged or audited.
    Secret(Sensitive),
}

/// What `mint` produced.
#[derive(Debug)]
pub struct Minted {
    /// Response fields in order.
    pub fields: Vec<(String, Field)>,
    /// When the credential really stops working (may be later than asked, e.g. AWS's 900 s).
    pub expires_at: OffsetDateTime,
    /// Non-secret details kept with the grant (needed to revoke; shown in audit).
    pub details: serde_json::Value,
}

/// Inputs to a mint.
#[derive(Debug)]
pub struct MintRequest<'a> {
    pub grant_id: Uuid,
    pub credential: &'a CredentialDef,
    /// Decided before minting and already recorded in the grant intent.
    pub resource_id: &'a str,
    pub claims: &'a VerifiedClaims,
    pub now: OffsetDateTime,
    pub expires_at: OffsetDateTime,
}

/// Key of `Minted::details` holding the lowercase hex SHA-256 of the credential's secret, where
/// the broker invented it (Postgres passwords, opaque API tokens): what a leak report and
/// introspection find the grant by. Safe to keep: the secrets are about 190 bits of randomness,
/// so the hash reveals nothing.
pub const SECRET_HASH_KEY: &str = "secret_sha256";

/// A credential recorded in a grant, as the reaper and revoke path see it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IssuedCredential {
    pub name: String,
    pub kind: CredentialKind,
    pub resource_id: String,
    /// Non-secret details from the intent (and from `Minted::details` once active).
    pub details: serde_json::Value,
}

/// Provider failures, each with a stable reason code.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// The target system could not be reached or refused the operation transiently.
    #[error("target unavailable: {0}")]
    TargetUnavailable(String),
    /// A claim value could not be used in a template.
    #[error("invalid claim value: {0}")]
    InvalidClaim(String),
    /// The definition cannot be served by this broker's configuration.
    #[error("misconfigured: {0}")]
    Misconfigured(String),
    #[error("internal provider error: {0}")]
    Internal(String),
    /// The request's parameters for this credential are malformed or not accepted by its kind
    /// (the message names the parameter, never its value).
    #[error("invalid parameters: {0}")]
    InvalidParameters(String),
    /// The request's parameters ask for more than the policy allows (a permission, a level, a
    /// repository).
    #[error("parameters exceed the policy: {0}")]
    ExceedsPolicy(String),
}

impl ProviderError {
    pub fn reason(&self) -> ReasonCode {
        match self {
            ProviderError::TargetUnavailable(_) => ReasonCode::TargetUnavailable,
            ProviderError::InvalidClaim(_) => ReasonCode::InvalidClaimValue,
            ProviderError::Misconfigured(_) => ReasonCode::ProviderMisconfigured,
            ProviderError::Internal(_) => ReasonCode::ProviderError,
            ProviderError::InvalidParameters(_) => ReasonCode::InvalidParameters,
            ProviderError::ExceedsPolicy(_) => ReasonCode::ParametersExceedPolicy,
        }
    }

    /// [`ProviderError::reason`] as its wire string.
    pub fn reason_code(&self) -> &'static str {
        self.reason().as_str()
    }
}

/// Why a provider cannot serve a policy bundle's credential definitions (the bundle is rejected
/// whole, at start or on reload).
#[derive(Debug, thiserror::Error)]
pub enum DefinitionError {
    #[error(transparent)]
    Postgres(#[from] postgres::PostgresConfigError),
    #[error(transparent)]
    AwsSts(#[from] aws_sts::AwsConfigError),
    /// Any other provider's refusal of one definition.
    #[error("credential {credential:?}: {reason}")]
    Refused { credential: String, reason: String },
}

/// Health of a provider for `/readyz`.
#[derive(Debug, Clone, Serialize)]
pub struct Health {
    pub ok: bool,
    pub detail: Option<String>,
}

/// Outcome of a provider-wide revoke-all.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RevokeAllReport {
    pub revoked: u64,
    pub failed: u64,
    /// Non-secret account of what was done, one line per target (for the audit event).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub details: Vec<String>,
}

/// What checking a revoked credential on its target found (`Provider::verify_revoked`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verification {
    /// The target cannot be asked (or the kind lives only in the broker's store).
    NotApplicable,
    /// The old access no longer works, as far as the target shows.
    Verified,
    /// It could not be shown: why, in words (never a secret).
    Unverified(String),
}

/// A lock every broker replica respects, for a provider's read-modify-write of state kept
/// outside the broker (an AWS role's deny policy). Owned here so that providers depend on this
/// interface, never on the broker's store; `app.rs` hands them the store's implementation.
#[async_trait]
pub trait ReplicaLock: Send + Sync + std::fmt::Debug {
    /// Run `work` while holding the lock named `key` (waiting for it, within a bound the
    /// implementation sets). An error: the lock could not be taken, and `work` may not have run.
    async fn run_locked(
        &self,
        key: &str,
        work: futures::future::BoxFuture<'_, ()>,
    ) -> Result<(), LockError>;
}

/// A [`ReplicaLock`] that could not be taken (its message names no secret).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct LockError(pub String);

/// The one trait at the provider boundary.
#[async_trait]
pub trait Provider: Send + Sync + std::fmt::Debug {
    fn kind(&self) -> CredentialKind;

    /// Decide the resource id before minting (recorded in the grant intent so a crash between
    /// mint and finalise leaves a revocation path). Deterministic from the grant.
    fn resource_id(&self, grant_id: Uuid, credential: &CredentialDef) -> String;

    /// Non-secret details to record with the intent (e.g. target name).
    fn intent_details(&self, _credential: &CredentialDef) -> serde_json::Value {
        serde_json::Value::Null
    }

    async fn mint(&self, req: MintRequest<'_>) -> Result<Minted, ProviderError>;

    /// Check the parameters a request sends for one credential (`parameters.<name>` of the
    /// exchange body; `null` when none), before anything is recorded. Kinds that take none
    /// refuse any.
    fn check_parameters(
        &self,
        credential: &CredentialDef,
        params: &serde_json::Value,
    ) -> Result<(), ProviderError> {
        if params.is_null() {
            Ok(())
        } else {
            Err(ProviderError::InvalidParameters(format!(
                "{} credentials take no parameters",
                credential.spec.kind().as_str()
            )))
        }
    }

    /// [`Provider::mint`] with the request's parameters (already passed through
    /// [`Provider::check_parameters`]); kinds that take parameters override this.
    async fn mint_with(
        &self,
        req: MintRequest<'_>,
        _params: &serde_json::Value,
    ) -> Result<Minted, ProviderError> {
        self.mint(req).await
    }

    /// True if `mint` only computes in this process (no side effect anywhere else, e.g. a
    /// signed token): an exchange made only of such credentials mints first and commits the
    /// grant, jti and audit event in one transaction, since a credential that never left the
    /// process needs no revocation path. Anything that creates state elsewhere (a database
    /// user, a cloud session) must keep the default, so its intent is committed before minting.
    fn mints_in_memory(&self) -> bool {
        false
    }

    /// True if revoking this kind is nothing but the grant's status in the broker's own store
    /// (`revoke` does nothing outside it): revoke-all then revokes such grants set-based, a
    /// page of them per store transaction, instead of one claim and finish per grant.
    fn revoked_in_store(&self) -> bool {
        false
    }

    /// Revoke one credential. Idempotent: already gone is success.
    async fn revoke(&self, credential: &IssuedCredential) -> Result<(), ProviderError>;

    /// Check the loaded policy bundle's definitions of this kind against this broker's
    /// configuration (e.g. a named target exists) and note what the provider must know about
    /// them (e.g. the roles revoke-all covers). Called at start and on every reload; an error
    /// rejects the bundle.
    fn check_definitions(&self, _defs: &[CredentialDef]) -> Result<(), DefinitionError> {
        Ok(())
    }

    /// What `revoke` writes for this credential, in words, for the revocation's audit event
    /// (e.g. the deny statement put on an AWS role). Never a secret.
    fn revoke_description(&self, _credential: &IssuedCredential) -> Option<String> {
        None
    }

    /// After a successful `revoke`, check on the target that the old access no longer works
    /// (Postgres: the role is gone or cannot log in and has no session; AWS: the deny
    /// statement covering the session reads back). Default: not applicable.
    async fn verify_revoked(&self, _credential: &IssuedCredential) -> Verification {
        Verification::NotApplicable
    }

    /// Revoke every credential of this kind that is still alive (an operator's kill switch).
    /// Kinds whose credentials die with their grants need nothing beyond the grants' revocation.
    async fn revoke_all(&self) -> Result<RevokeAllReport, ProviderError> {
        Ok(RevokeAllReport::default())
    }

    async fn health(&self) -> Health {
        Health {
            ok: true,
            detail: None,
        }
    }
}

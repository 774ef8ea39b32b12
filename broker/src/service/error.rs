//! Why a call into the service did not succeed: one enum for exchange, revoke, introspection
//! and the refusals the HTTP layer hands over. `http/error.rs` turns it into a response.

use crate::audit::Outcome;
use crate::oidc::VerifyError;
use crate::providers::ProviderError;
use crate::reason::ReasonCode;
use crate::store::StoreError;

/// Why an exchange, revoke or introspection did not succeed. Each maps to one HTTP status and
/// stable code in `http::error`.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("bad request: {message}")]
    BadRequest { code: ReasonCode, message: String },
    /// Request text the store cannot hold (see `store::text`); the detail shows it escaped.
    #[error("invalid text: {}", .0.detail())]
    InvalidText(#[from] crate::store::text::TextError),
    #[error("token rejected: {0}")]
    Token(#[from] VerifyError),
    #[error("token already used")]
    Replayed,
    /// The job token expires (GitLab: the job ends) before any useful TTL.
    #[error("token expires too soon to grant anything")]
    TokenExhausted,
    #[error("credential {credential:?} denied ({reason})")]
    Denied {
        credential: String,
        reason: ReasonCode,
    },
    #[error("credential {credential:?} could not be issued: {error}")]
    Provider {
        credential: String,
        error: ProviderError,
    },
    #[error("invalid revocation token")]
    BadRevocationToken,
    /// A broker secret (revocation token, opaque token) with a wrong prefix, length or
    /// checksum: refused offline, before any store lookup.
    #[error("malformed broker secret: {0}")]
    MalformedSecret(crate::secret_format::FormatError),
    /// Too many exchanges for this repository; retry after the given seconds.
    #[error("rate limited")]
    RateLimited { retry_after_secs: u64 },
    /// No usable `Authorization: Bearer` header.
    #[error("missing bearer token")]
    MissingToken,
    #[error("revocation failed and will be retried")]
    RevokePending,
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// An operator froze exchanges matching this one (`POST /v1/admin/freeze`).
    #[error("exchanges are frozen by an operator")]
    Frozen,
    /// This client sent too many requests that failed verification; retry after the given
    /// seconds (`refusals.rs`).
    #[error("too many failed verifications from this client")]
    TooManyFailures { retry_after_secs: u64 },
}

impl ServiceError {
    /// The reason code (also the audit `reason`). A policy denial keeps its specific reason
    /// here (`no_matching_rule`, ...); `http/error.rs` answers it as `policy_denied`.
    pub fn reason(&self) -> ReasonCode {
        match self {
            ServiceError::BadRequest { code, .. } => *code,
            ServiceError::InvalidText(_) => ReasonCode::InvalidText,
            ServiceError::Token(e) => e.reason(),
            ServiceError::Replayed => ReasonCode::TokenReplayed,
            ServiceError::TokenExhausted => ReasonCode::TokenExpired,
            ServiceError::Denied { reason, .. } => *reason,
            ServiceError::Provider { error, .. } => error.reason(),
            ServiceError::BadRevocationToken => ReasonCode::InvalidRevocationToken,
            ServiceError::MalformedSecret(_) => ReasonCode::MalformedSecret,
            ServiceError::MissingToken => ReasonCode::MissingToken,
            ServiceError::RateLimited { .. } => ReasonCode::RateLimited,
            ServiceError::RevokePending => ReasonCode::RevokePending,
            ServiceError::Store(e) => store_reason(e),
            ServiceError::Frozen => ReasonCode::Frozen,
            ServiceError::TooManyFailures { .. } => ReasonCode::TooManyFailures,
        }
    }

    /// [`ServiceError::reason`] as its wire string.
    pub fn reason_code(&self) -> &'static str {
        self.reason().as_str()
    }

    pub(crate) fn outcome(&self) -> Outcome {
        match self {
            ServiceError::Provider { .. }
            | ServiceError::Store(_)
            | ServiceError::RevokePending => Outcome::Error,
            _ => Outcome::Deny,
        }
    }
}

/// The code a store failure is answered with: a replay, this request's data refused, or an
/// outage.
pub(crate) fn store_reason(e: &StoreError) -> ReasonCode {
    match e {
        StoreError::Replayed => ReasonCode::TokenReplayed,
        StoreError::Rejected(_) => ReasonCode::StoreRejected,
        _ => ReasonCode::StoreUnavailable,
    }
}

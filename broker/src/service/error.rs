//! Why a call into the service did not succeed: one enum for exchange, revoke, introspection
//! and the refusals the HTTP layer hands over. `http/error.rs` turns it into a response.

use crate::audit::Outcome;
use crate::oidc::VerifyError;
use crate::providers::ProviderError;
use crate::store::StoreError;

/// Why an exchange, revoke or introspection did not succeed. Each maps to one HTTP status and
/// stable code in `http::error`.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("bad request: {message}")]
    BadRequest { code: &'static str, message: String },
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
        reason: &'static str,
    },
    #[error("credential {credential:?} could not be issued: {error}")]
    Provider {
        credential: String,
        error: ProviderError,
    },
    #[error("invalid revocation token")]
    BadRevocationToken,
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
    /// Stable reason code (also the audit `reason`).
    pub fn reason_code(&self) -> &'static str {
        match self {
            ServiceError::BadRequest { code, .. } => code,
            ServiceError::InvalidText(t) => t.reason_code(),
            ServiceError::Token(e) => e.reason_code(),
            ServiceError::Replayed => "token_replayed",
            ServiceError::TokenExhausted => "token_expired",
            ServiceError::Denied { reason, .. } => reason,
            ServiceError::Provider { error, .. } => error.reason_code(),
            ServiceError::BadRevocationToken => "invalid_revocation_token",
            ServiceError::MissingToken => "missing_token",
            ServiceError::RateLimited { .. } => "rate_limited",
            ServiceError::RevokePending => "revoke_pending",
            ServiceError::Store(StoreError::Replayed) => "token_replayed",
            ServiceError::Store(e @ StoreError::Rejected(_)) => e.reason_code(),
            ServiceError::Store(_) => "store_unavailable",
            ServiceError::Frozen => "frozen",
            ServiceError::TooManyFailures { .. } => crate::refusals::TOO_MANY_FAILURES,
        }
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

//! Errors of token verification and of verifier construction.
//!
//! Invariant: no message here ever contains the token, a claim value copied from the token, or
//! key material. Messages name the check that failed; `reason_code` is the stable form that goes
//! into audit events and HTTP problem bodies.

use crate::reason::ReasonCode;
use thiserror::Error;

/// Why a token was refused. Every variant fails closed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum VerifyError {
    /// Not three base64url segments of JSON objects, or a header we refuse to interpret.
    #[error("malformed token: {0}")]
    MalformedToken(&'static str),
    /// Larger than the configured byte limit; refused before any decoding.
    #[error("token too large")]
    TokenTooLarge,
    /// `iss` is not exactly one of the configured issuer URLs.
    #[error("unknown issuer")]
    UnknownIssuer,
    /// `alg` is not pinned for this issuer, or does not fit the selected key.
    #[error("unsupported algorithm")]
    UnsupportedAlgorithm,
    /// No key with this `kid` in the issuer's key set (after at most one refetch).
    #[error("unknown signing key")]
    UnknownKey,
    #[error("bad signature")]
    BadSignature,
    #[error("audience does not include this broker")]
    BadAudience,
    #[error("token expired")]
    TokenExpired,
    #[error("token not yet valid")]
    TokenNotYetValid,
    #[error("token issued too long ago")]
    TokenTooOld,
    /// A required claim is absent; the claim *name* is fixed text, never token input.
    #[error("missing claim {0}")]
    MissingClaim(&'static str),
    #[error("invalid claim {0}")]
    InvalidClaim(&'static str),
    /// The issuer's keys could not be fetched and none are cached.
    #[error("issuer keys unavailable")]
    IssuerUnavailable,
}

impl VerifyError {
    /// Stable code for audit events and problem responses (`crate::reason`).
    pub fn reason(&self) -> ReasonCode {
        match self {
            VerifyError::MalformedToken(_) => ReasonCode::MalformedToken,
            VerifyError::TokenTooLarge => ReasonCode::TokenTooLarge,
            VerifyError::UnknownIssuer => ReasonCode::UnknownIssuer,
            VerifyError::UnsupportedAlgorithm => ReasonCode::UnsupportedAlgorithm,
            VerifyError::UnknownKey => ReasonCode::UnknownKey,
            VerifyError::BadSignature => ReasonCode::BadSignature,
            VerifyError::BadAudience => ReasonCode::BadAudience,
            VerifyError::TokenExpired => ReasonCode::TokenExpired,
            VerifyError::TokenNotYetValid => ReasonCode::TokenNotYetValid,
            VerifyError::TokenTooOld => ReasonCode::TokenTooOld,
            VerifyError::MissingClaim(_) => ReasonCode::MissingClaim,
            VerifyError::InvalidClaim(_) => ReasonCode::InvalidClaim,
            VerifyError::IssuerUnavailable => ReasonCode::IssuerUnavailable,
        }
    }

    /// [`VerifyError::reason`] as its wire string.
    pub fn reason_code(&self) -> &'static str {
        self.reason().as_str()
    }

    /// True when the failure is ours (or the issuer's), not the caller's: HTTP maps it to 503.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, VerifyError::IssuerUnavailable)
    }
}

/// Why a [`super::Verifier`] could not be built from configuration.
#[derive(Debug, Error)]
pub enum VerifyConfigError {
    #[error("broker audience must not be empty")]
    EmptyAudience,
    #[error("issuer {issuer}: {}", problems.join("; "))]
    InvalidIssuer {
        issuer: String,
        problems: Vec<String>,
    },
    #[error("issuer name {0} is configured twice")]
    DuplicateName(String),
    #[error("issuer URL {0} is configured twice")]
    DuplicateUrl(String),
    #[error("issuer {issuer}: static key set unusable: {reason}")]
    StaticJwks { issuer: String, reason: String },
    #[error("http client: {0}")]
    HttpClient(String),
}

impl VerifyConfigError {
    pub fn reason_code(&self) -> &'static str {
        match self {
            VerifyConfigError::EmptyAudience => "empty_audience",
            VerifyConfigError::InvalidIssuer { .. } => "invalid_issuer_config",
            VerifyConfigError::DuplicateName(_) => "duplicate_issuer_name",
            VerifyConfigError::DuplicateUrl(_) => "duplicate_issuer_url",
            VerifyConfigError::StaticJwks { .. } => "static_jwks_unusable",
            VerifyConfigError::HttpClient(_) => "http_client",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_codes_are_stable() {
        let all = [
            (VerifyError::MalformedToken("x"), "malformed_token"),
            (VerifyError::TokenTooLarge, "token_too_large"),
            (VerifyError::UnknownIssuer, "unknown_issuer"),
            (VerifyError::UnsupportedAlgorithm, "unsupported_algorithm"),
            (VerifyError::UnknownKey, "unknown_key"),
            (VerifyError::BadSignature, "bad_signature"),
            (VerifyError::BadAudience, "bad_audience"),
            (VerifyError::TokenExpired, "token_expired"),
            (VerifyError::TokenNotYetValid, "token_not_yet_valid"),
            (VerifyError::TokenTooOld, "token_too_old"),
            (VerifyError::MissingClaim("jti"), "missing_claim"),
            (VerifyError::InvalidClaim("sub"), "invalid_claim"),
            (VerifyError::IssuerUnavailable, "issuer_unavailable"),
        ];
        for (e, code) in all {
            assert_eq!(e.reason_code(), code);
            assert_eq!(e.is_unavailable(), code == "issuer_unavailable");
        }
    }
}

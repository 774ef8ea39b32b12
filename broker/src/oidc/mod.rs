//! Job token verification: configured issuers only, discovery + JWKS with a bounded cache,
//! pinned algorithms, exact issuer, required audience, time checks with a small leeway.
//!
//! Trust boundary: a raw bearer string becomes [`VerifiedClaims`] only through
//! [`Verifier::verify`]. Nothing outside this module can construct `VerifiedClaims` from
//! unverified input (the testkit is compiled only for tests).
//!
//! INTERFACE CONTRACT (other modules rely on these names; the implementation behind them is
//! owned by this module).

mod attribution;
mod config;
pub mod dev;
mod error;
mod fetch;
mod jwks;
#[cfg(any(test, feature = "testkit"))]
pub mod testkit;
mod unverified;
pub use unverified::claims_for_display as unverified_claims_for_display;
mod verifier;

pub use attribution::JobAttribution;
pub use config::{GITHUB_ISSUER, GITHUB_JWKS, IssuerConfig, validate_issuers};
pub use error::{VerifyConfigError, VerifyError};
pub use verifier::{IssuerHealth, Verifier, VerifierOptions};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use time::OffsetDateTime;

/// CI platform of an issuer; decides claim names and defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Platform {
    Github,
    Gitlab,
}

impl Platform {
    pub fn as_str(self) -> &'static str {
        match self {
            Platform::Github => "github",
            Platform::Gitlab => "gitlab",
        }
    }
}

/// Claims of a token whose signature, issuer, audience and times were checked.
#[derive(Debug, Clone)]
pub struct VerifiedClaims {
    /// Configured issuer name (e.g. `github`), what policies refer to.
    pub issuer: String,
    pub platform: Platform,
    /// The exact `iss` value.
    pub iss: String,
    pub sub: String,
    /// `jti`, when the token has one.
    pub jti: Option<String>,
    pub exp: OffsetDateTime,
    pub iat: Option<OffsetDateTime>,
    /// Whether this issuer's tokens are single-use (replay protection by `jti`).
    pub single_use: bool,
    /// How long a `jti` record must be kept: `exp` + leeway.
    pub replay_until: OffsetDateTime,
    /// All claims as sent, for policies (`claims` in CEL).
    pub claims: Map<String, Value>,
}

//! The security team's surface: operator authentication, emergency revoke-all and the freeze
//! switch. HTTP lives in `http/admin.rs`; this module holds the rules.
//!
//! Invariants:
//! - Operator endpoints never accept a job token (see [`operators`]).
//! - Every operator call, allowed or refused, writes one `admin` audit event with
//!   `actor: operator:<name>` (or no actor when the caller is not an operator); if it cannot be
//!   written the call fails with 503.
//! - A freeze is kept in the store; each replica re-reads it at most every
//!   [`FREEZE_REFRESH`] and fails closed on a freeze it cannot parse.

mod actions;
pub mod audit_client;
pub mod audit_query;
pub mod audit_tail;
pub mod client;
pub mod filter;
pub mod operators;

pub use actions::{Freeze, RevokeAllReport, RevokeFailure, RevokeTally};
pub use audit_query::AuditQueryPage;
pub use filter::GrantFilter;
pub use operators::{OPERATOR_PREFIX, Operator, OperatorConfig, Operators, Role};

use crate::reason::ReasonCode;
use crate::store::StoreError;
use std::sync::Mutex;
use time::{Duration, OffsetDateTime};

/// How stale a replica's view of the freeze may be: a freeze (or unfreeze) set on one replica
/// applies on every other replica within this time. The replica that sets it applies it at once.
pub const FREEZE_REFRESH: Duration = Duration::seconds(5);

/// Grants a revoke-all reads per store page (selected in SQL, keyset-paged). Grants revoked in
/// the store alone (API tokens) are revoked a page per transaction, so this also bounds how
/// long one such transaction holds the audit chain head.
pub const REVOKE_ALL_PAGE: u32 = 1000;

/// How long one revoke-all call keeps taking new pages. A run that needs longer answers
/// `complete: false` with its counts; the next call continues (what is revoked is no longer
/// active, so it is not selected again) and `broker admin revoke-all` calls until complete.
/// Well inside the default request timeout (15 s), so the answer is never lost to it.
pub const REVOKE_ALL_CALL_BUDGET: std::time::Duration = std::time::Duration::from_secs(8);

/// Revocations with effects outside the store (database users, cloud sessions) a revoke-all
/// runs at once.
pub const REVOKE_ALL_PARALLELISM: usize = 16;

/// Longest operator-supplied `reason` kept (characters).
pub const MAX_REASON: usize = 500;

/// Why an operator call did not succeed. Each maps to one status and code in `http::error`.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("missing bearer token")]
    MissingToken,
    /// Unknown token, or not an operator token at all (a job token).
    #[error("not a valid operator token")]
    Unauthorized,
    /// A `brk_op_` token with a wrong length or checksum: refused offline, before any hash
    /// comparison.
    #[error("malformed operator token: {0}")]
    MalformedToken(crate::secret_format::FormatError),
    /// A single-use job token (OIDC operator) presented a second time.
    #[error("operator {name:?}: job token already used")]
    Replayed { name: String },
    #[error("operator {name:?} lacks the {needed} role")]
    Forbidden { name: String, needed: &'static str },
    #[error("bad request: {0}")]
    BadRequest(String),
    /// A filter names an issuer, credential or kind that does not exist here.
    #[error("filter.{field}: unknown {field} {value:?}; known: {}", known.join(", "))]
    UnknownFilterValue {
        field: &'static str,
        value: String,
        known: Vec<String>,
    },
    /// Request text the store cannot hold (see `store::text`).
    #[error("invalid text: {}", .0.detail())]
    InvalidText(#[from] crate::store::text::TextError),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// The audit stream was asked to resume before the newest prune cut: events are gone.
    #[error("audit events through sequence number {pruned_through} were pruned")]
    AuditGap { pruned_through: i64 },
    /// This client sent too many requests without a valid operator token (`refusals.rs`).
    #[error("too many failed verifications from this client")]
    TooManyFailures { retry_after_secs: u64 },
}

impl AdminError {
    /// Stable reason code (also the audit `reason`).
    pub fn reason(&self) -> ReasonCode {
        match self {
            AdminError::MissingToken => ReasonCode::MissingToken,
            AdminError::Unauthorized => ReasonCode::OperatorUnauthorized,
            AdminError::MalformedToken(_) => ReasonCode::MalformedSecret,
            AdminError::Replayed { .. } => ReasonCode::TokenReplayed,
            AdminError::Forbidden { .. } => ReasonCode::OperatorForbidden,
            AdminError::BadRequest(_) => ReasonCode::BadRequest,
            AdminError::UnknownFilterValue { .. } => ReasonCode::UnknownFilterValue,
            AdminError::InvalidText(_) => ReasonCode::InvalidText,
            AdminError::Store(StoreError::Rejected(_)) => ReasonCode::StoreRejected,
            AdminError::Store(_) => ReasonCode::StoreUnavailable,
            AdminError::TooManyFailures { .. } => ReasonCode::TooManyFailures,
            AdminError::AuditGap { .. } => ReasonCode::AuditGap,
        }
    }

    /// [`AdminError::reason`] as its wire string.
    pub fn reason_code(&self) -> &'static str {
        self.reason().as_str()
    }
}

/// Operator and freeze state held by the broker.
#[derive(Debug, Default)]
pub struct AdminState {
    pub(crate) operators: Operators,
    /// The freeze as last read from the store, and when it was read (broker clock).
    pub(crate) freeze: Mutex<Option<(OffsetDateTime, Option<Freeze>)>>,
}

impl AdminState {
    pub fn new(operators: Operators) -> Self {
        Self {
            operators,
            freeze: Mutex::new(None),
        }
    }
}

/// Operator-supplied text for the audit log: bounded, no control characters.
pub(crate) fn clean_reason(s: &str) -> String {
    s.chars()
        .filter(|c| !c.is_control())
        .take(MAX_REASON)
        .collect::<String>()
        .trim()
        .to_owned()
}

#[cfg(test)]
mod tests;

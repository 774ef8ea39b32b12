//! Policies: YAML files under `policies/` declaring credentials, CEL rules and test cases.
//! Compiled once at load; evaluated per exchange. Default deny; a matching deny rule wins.
//!
//! INTERFACE CONTRACT (other modules rely on these names).

mod bundle;
pub mod cli;
pub mod diff;
mod explain;
pub mod expr;
mod lint;
mod load;
pub mod schema;
mod testing;

pub use bundle::{
    ANY_CREDENTIAL, Bundle, CredentialDecision, Decision, Effect, Evaluation, Rule, TestCase,
};
pub use explain::{ConjunctResult, Explanation, RuleExplanation, RuleStatus};
pub use lint::LintFinding;
pub use load::{LoadError, LoadErrorKind, LoadErrors, LoadOptions};
pub use testing::{CaseResult, Expected, Mismatch, TestReport};

use crate::oidc::Platform;
use serde_json::{Map, Value};

/// What a policy sees of one exchange.
#[derive(Debug, Clone, Copy)]
pub struct PolicyInput<'a> {
    /// Configured issuer name.
    pub issuer: &'a str,
    pub platform: Platform,
    /// Verified claims (`claims` in CEL).
    pub claims: &'a Map<String, Value>,
}

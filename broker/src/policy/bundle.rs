//! The compiled policy bundle and its decision procedure.
//!
//! Semantics (the contract the exchange relies on):
//! - only rules whose `issuer` equals the exchange's issuer apply;
//! - per requested credential, a matching deny rule that lists it (or `*`) wins;
//! - else the first matching allow rule that lists it, in file-path then position order, allows,
//!   with TTL `min(rule.max_ttl, credential.max_ttl)`;
//! - else no rule: denied (default deny);
//! - fail closed on evaluation errors: an allow rule that errors does not match, a deny rule
//!   that errors does match;
//! - claims over the size bounds are refused before any expression runs.

use super::PolicyInput;
use super::expr::{self, Activation, ClaimsUsed, CompiledExpr, EvalError, RegexTable};
use crate::providers::CredentialDef;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::sync::Arc;
use time::Duration;

/// Deny rules may list this instead of credential names to cover every credential.
pub const ANY_CREDENTIAL: &str = "*";

/// Whether a matching rule grants or refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Effect {
    #[default]
    Allow,
    Deny,
}

impl Effect {
    pub fn as_str(self) -> &'static str {
        match self {
            Effect::Allow => "allow",
            Effect::Deny => "deny",
        }
    }
}

/// A compiled rule.
#[derive(Debug, Clone)]
pub struct Rule {
    pub name: String,
    pub description: Option<String>,
    /// Configured issuer name this rule applies to.
    pub issuer: String,
    pub effect: Effect,
    /// Credential names, or [`ANY_CREDENTIAL`] (deny rules only).
    pub credentials: Vec<String>,
    pub max_ttl: Option<Duration>,
    /// Relative path of the file that defines it, and the 1-based line of the rule.
    pub file: String,
    pub line: u64,
    pub(super) when: CompiledExpr,
}

impl Rule {
    /// The `when` source as written.
    pub fn when(&self) -> &str {
        self.when.source()
    }
    pub fn expr(&self) -> &CompiledExpr {
        &self.when
    }
    /// Whether this rule speaks about `credential`.
    pub fn covers(&self, credential: &str) -> bool {
        self.credentials
            .iter()
            .any(|c| c == credential || c == ANY_CREDENTIAL)
    }
}

/// A test case from a policy file.
#[derive(Debug, Clone)]
pub struct TestCase {
    pub name: String,
    pub description: Option<String>,
    pub issuer: String,
    pub platform: crate::oidc::Platform,
    pub claims: Map<String, Value>,
    /// Credentials requested; defaults to `expect_allow` ∪ `expect_deny`.
    pub request: Vec<String>,
    pub expect_allow: Vec<String>,
    pub expect_deny: Vec<String>,
    pub file: String,
    pub line: u64,
}

/// The outcome for one requested credential.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Decision {
    Allow { rule: String },
    DenyRule { rule: String },
    NoRule,
    UnknownCredential,
    ClaimsRejected,
}

impl Decision {
    /// Stable reason code, as audited (`crate::reason`).
    pub fn reason(&self) -> crate::reason::ReasonCode {
        use crate::reason::ReasonCode;
        match self {
            Decision::Allow { .. } => ReasonCode::Ok,
            Decision::DenyRule { .. } => ReasonCode::DeniedByRule,
            Decision::NoRule => ReasonCode::NoMatchingRule,
            Decision::UnknownCredential => ReasonCode::UnknownCredential,
            Decision::ClaimsRejected => ReasonCode::ClaimsTooLarge,
        }
    }

    /// [`Decision::reason`] as its wire string.
    pub fn reason_code(&self) -> &'static str {
        self.reason().as_str()
    }
    pub fn is_allow(&self) -> bool {
        matches!(self, Decision::Allow { .. })
    }
}

impl std::fmt::Display for Decision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Decision::Allow { rule } => write!(f, "allow (rule {rule})"),
            Decision::DenyRule { rule } => write!(f, "deny (rule {rule})"),
            Decision::NoRule => f.write_str("deny (no matching rule)"),
            Decision::UnknownCredential => f.write_str("deny (unknown credential)"),
            Decision::ClaimsRejected => f.write_str("deny (claims too large)"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CredentialDecision {
    pub credential: String,
    pub outcome: Decision,
    /// For an allow: the TTL ceiling, `min(rule.max_ttl, credential.max_ttl)`.
    #[serde(with = "crate::time::serde_duration::option")]
    pub max_ttl: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Evaluation {
    pub decisions: Vec<CredentialDecision>,
    /// Rules that matched (deny rules that errored included), in evaluation order. Only rules
    /// that apply to the issuer and list a requested credential (or `*`) are evaluated.
    pub rules_matched: Vec<String>,
}

impl Evaluation {
    /// Whether every requested credential was allowed (and at least one was requested).
    pub fn all_allowed(&self) -> bool {
        !self.decisions.is_empty() && self.decisions.iter().all(|d| d.outcome.is_allow())
    }
}

/// A loaded, compiled policy bundle. Immutable; shared behind `Arc`.
///
/// `Send + Sync`: compiled expressions are plain ASTs (owned data), the CEL environment holds
/// only `fn` pointers, and regexes are `Sync`. The per-evaluation CEL `Context` is built fresh
/// on the evaluating task and never shared.
pub struct Bundle {
    pub(super) digest: String,
    pub(super) credentials: Vec<CredentialDef>,
    pub(super) credential_index: HashMap<String, usize>,
    pub(super) rules: Vec<Rule>,
    pub(super) tests: Vec<TestCase>,
    pub(super) env: Arc<cel::Env>,
    pub(super) regexes: Arc<RegexTable>,
    /// The claims the rules can read (converted per exchange; the others are not).
    pub(super) claims_used: ClaimsUsed,
}

impl std::fmt::Debug for Bundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bundle")
            .field("digest", &self.digest)
            .field("credentials", &self.credentials.len())
            .field("rules", &self.rules.len())
            .field("tests", &self.tests.len())
            .field("regexes", &self.regexes.len())
            .finish()
    }
}

const _: fn() = || {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Bundle>();
};

/// Result of one rule's `when` for one exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Outcome {
    True,
    False,
    Error(EvalError),
}

impl Bundle {
    /// sha256 (hex) over the sorted relative paths and contents of the files loaded.
    pub fn digest(&self) -> &str {
        &self.digest
    }
    pub fn credential(&self, name: &str) -> Option<&CredentialDef> {
        self.credential_index
            .get(name)
            .and_then(|i| self.credentials.get(*i))
    }
    /// Credential definitions in load order.
    pub fn credentials(&self) -> &[CredentialDef] {
        &self.credentials
    }
    /// Rules in evaluation order (file path, then position).
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }
    pub fn tests(&self) -> &[TestCase] {
        &self.tests
    }
    /// Number of distinct regex patterns compiled at load.
    pub fn regex_count(&self) -> usize {
        self.regexes.len()
    }

    pub(super) fn activation(&self, input: &PolicyInput<'_>) -> Result<Activation, EvalError> {
        expr::check_claims(input.claims)?;
        Activation::new(
            &self.env,
            &self.regexes,
            input.claims,
            &self.claims_used,
            input.issuer,
            input.platform.as_str(),
        )
    }

    pub(super) fn run_rule(act: &Activation, rule: &Rule) -> Outcome {
        match act.eval(&rule.when) {
            Ok(true) => Outcome::True,
            Ok(false) => Outcome::False,
            Err(e) => Outcome::Error(e),
        }
    }

    /// Decide every requested credential for one exchange.
    pub fn evaluate(&self, input: &PolicyInput<'_>, requested: &[String]) -> Evaluation {
        let act = match self.activation(input) {
            Ok(a) => a,
            Err(_) => {
                return Evaluation {
                    decisions: requested
                        .iter()
                        .map(|c| CredentialDecision {
                            credential: c.clone(),
                            outcome: Decision::ClaimsRejected,
                            max_ttl: None,
                        })
                        .collect(),
                    rules_matched: Vec::new(),
                };
            }
        };
        // Each applicable rule relevant to the request runs at most once, in bundle order.
        let mut matched: Vec<Option<bool>> = vec![None; self.rules.len()];
        let mut rules_matched = Vec::new();
        for (i, rule) in self.rules.iter().enumerate() {
            if rule.issuer != input.issuer || !requested.iter().any(|c| rule.covers(c)) {
                continue;
            }
            let m = match Self::run_rule(&act, rule) {
                Outcome::True => true,
                Outcome::False => false,
                // Fail closed: an erroring deny rule denies, an erroring allow rule allows nothing.
                Outcome::Error(_) => rule.effect == Effect::Deny,
            };
            if m {
                rules_matched.push(rule.name.clone());
            }
            matched[i] = Some(m);
        }
        let decisions = requested
            .iter()
            .map(|name| self.decide(name, &matched))
            .collect();
        Evaluation {
            decisions,
            rules_matched,
        }
    }

    fn decide(&self, name: &str, matched: &[Option<bool>]) -> CredentialDecision {
        let deny = |outcome| CredentialDecision {
            credential: name.to_owned(),
            outcome,
            max_ttl: None,
        };
        let Some(def) = self.credential(name) else {
            return deny(Decision::UnknownCredential);
        };
        let hits = || {
            self.rules
                .iter()
                .zip(matched)
                .filter(|(r, m)| **m == Some(true) && r.covers(name))
                .map(|(r, _)| r)
        };
        if let Some(r) = hits().find(|r| r.effect == Effect::Deny) {
            return deny(Decision::DenyRule {
                rule: r.name.clone(),
            });
        }
        match hits().find(|r| r.effect == Effect::Allow) {
            Some(r) => CredentialDecision {
                credential: name.to_owned(),
                outcome: Decision::Allow {
                    rule: r.name.clone(),
                },
                max_ttl: Some(match r.max_ttl {
                    Some(t) => t.min(def.max_ttl),
                    None => def.max_ttl,
                }),
            },
            None => deny(Decision::NoRule),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oidc::Platform;
    use crate::policy::LoadOptions;
    use serde_json::json;

    const POLICY: &str = r#"
credentials:
  - name: a
    max_ttl: 15m
    api_token: { audience: x }
  - name: b
    max_ttl: 5m
    api_token: { audience: x }
rules:
  - name: allow-a
    issuer: github
    credentials: [a, b]
    max_ttl: 10m
    when: claims.ref == "refs/heads/main"
  - name: allow-a-too
    issuer: github
    credentials: [a]
    when: claims.ref.startsWith("refs/heads/")
  - name: deny-fork
    issuer: github
    effect: deny
    credentials: ["*"]
    when: has(claims.fork) && claims.fork == true
  - name: gitlab-allow
    issuer: gitlab
    credentials: [a]
    when: "true"
  - name: allow-on-error
    issuer: github
    credentials: [b]
    when: claims.missing == "x"
  - name: deny-b-on-error
    issuer: github
    effect: deny
    credentials: [b]
    when: claims.flag == "x"
  - name: not-bool
    issuer: github
    credentials: [a]
    when: claims.ref
"#;

    fn bundle() -> Bundle {
        Bundle::load_files(&[("p.yaml".into(), POLICY.into())], &LoadOptions::default()).unwrap()
    }

    fn run(b: &Bundle, issuer: &str, claims: Value, req: &[&str]) -> Evaluation {
        let claims = claims.as_object().cloned().unwrap_or_default();
        let input = PolicyInput {
            issuer,
            platform: Platform::Github,
            claims: &claims,
        };
        let req: Vec<String> = req.iter().map(|s| s.to_string()).collect();
        b.evaluate(&input, &req)
    }

    fn outcomes(e: &Evaluation) -> Vec<(String, &'static str)> {
        e.decisions
            .iter()
            .map(|d| (d.credential.clone(), d.outcome.reason_code()))
            .collect()
    }

    #[test]
    fn first_allow_wins_and_ttl_is_the_minimum() {
        let b = bundle();
        let e = run(
            &b,
            "github",
            json!({"ref": "refs/heads/main", "flag": "y"}),
            &["a", "b"],
        );
        assert_eq!(
            e.decisions[0].outcome,
            Decision::Allow {
                rule: "allow-a".into()
            }
        );
        assert_eq!(
            e.decisions[0].max_ttl,
            Some(Duration::minutes(10)),
            "rule caps below credential"
        );
        assert_eq!(
            e.decisions[1].outcome,
            Decision::Allow {
                rule: "allow-a".into()
            }
        );
        assert_eq!(
            e.decisions[1].max_ttl,
            Some(Duration::minutes(5)),
            "credential caps below rule"
        );
        let e = run(
            &b,
            "github",
            json!({"ref": "refs/heads/dev", "flag": "y"}),
            &["a"],
        );
        assert_eq!(
            e.decisions[0].outcome,
            Decision::Allow {
                rule: "allow-a-too".into()
            }
        );
        assert_eq!(e.decisions[0].max_ttl, Some(Duration::minutes(15)));
        assert_eq!(e.rules_matched, vec!["allow-a-too".to_owned()]);
    }

    #[test]
    fn deny_wins_over_allow() {
        let b = bundle();
        let e = run(
            &b,
            "github",
            json!({"ref": "refs/heads/main", "fork": true, "flag": "y"}),
            &["a"],
        );
        assert_eq!(
            e.decisions[0].outcome,
            Decision::DenyRule {
                rule: "deny-fork".into()
            }
        );
        assert_eq!(e.decisions[0].max_ttl, None);
        assert!(e.rules_matched.contains(&"allow-a".to_owned()));
        assert!(!e.all_allowed());
    }

    #[test]
    fn evaluation_errors_fail_closed_both_ways() {
        let b = bundle();
        // `claims.flag` missing: the deny rule errors and so matches; `claims.missing` errors so
        // the allow rule does not match.
        let e = run(&b, "github", json!({"ref": "refs/tags/v1"}), &["b"]);
        assert_eq!(
            e.decisions[0].outcome,
            Decision::DenyRule {
                rule: "deny-b-on-error".into()
            }
        );
        let e = run(
            &b,
            "github",
            json!({"ref": "refs/tags/v1", "flag": "y"}),
            &["b"],
        );
        assert_eq!(e.decisions[0].outcome, Decision::NoRule);
        // A non-bool result is an error, so the allow rule `not-bool` never matches.
        let e = run(
            &b,
            "github",
            json!({"ref": "refs/tags/v1", "flag": "y"}),
            &["a"],
        );
        assert_eq!(outcomes(&e), vec![("a".into(), "no_matching_rule")]);
    }

    #[test]
    fn issuer_scopes_rules_and_unknown_credentials() {
        let b = bundle();
        let e = run(
            &b,
            "gitlab",
            json!({"ref": "refs/heads/main", "fork": true}),
            &["a", "zzz"],
        );
        assert_eq!(
            e.decisions[0].outcome,
            Decision::Allow {
                rule: "gitlab-allow".into()
            }
        );
        assert_eq!(outcomes(&e)[1], ("zzz".into(), "unknown_credential"));
        let e = run(&b, "other", json!({"ref": "refs/heads/main"}), &["a"]);
        assert_eq!(outcomes(&e), vec![("a".into(), "no_matching_rule")]);
    }

    #[test]
    fn oversized_claims_are_rejected_for_every_credential() {
        let b = bundle();
        let list: Vec<u32> = (0..100).collect();
        let e = run(
            &b,
            "github",
            json!({"ref": "refs/heads/main", "l": list}),
            &["a", "b"],
        );
        assert_eq!(
            outcomes(&e),
            vec![
                ("a".into(), "claims_too_large"),
                ("b".into(), "claims_too_large")
            ]
        );
        assert!(e.rules_matched.is_empty());
    }

    #[test]
    fn bundle_is_shareable() {
        let b = std::sync::Arc::new(bundle());
        let h = std::thread::spawn({
            let b = b.clone();
            move || {
                run(
                    &b,
                    "github",
                    json!({"ref": "refs/heads/main", "flag": "y"}),
                    &["a"],
                )
            }
        });
        let e = h.join().unwrap();
        assert!(e.all_allowed());
    }

    #[test]
    fn worst_case_claims_within_bounds_evaluate_quickly() {
        let policy = r#"
credentials:
  - name: a
    max_ttl: 1m
    api_token: { audience: x }
rules:
  - name: heavy
    issuer: github
    credentials: [a]
    when: >
      claims.l.exists(x, x.matches("^(a|b)*c$")) ||
      claims.l.filter(x, x.startsWith("a")).size() > 100
"#;
        let b = Bundle::load_files(&[("h.yaml".into(), policy.into())], &LoadOptions::default())
            .unwrap();
        let l: Vec<String> = (0..64).map(|_| "ab".repeat(490)).collect();
        let claims = json!({ "l": l });
        let start = std::time::Instant::now();
        let e = run(&b, "github", claims, &["a"]);
        assert_eq!(outcomes(&e), vec![("a".into(), "no_matching_rule")]);
        assert!(
            start.elapsed() < std::time::Duration::from_secs(2),
            "{:?}",
            start.elapsed()
        );
    }
}

//! Explanations: every rule's result for one set of claims, and for a rule that did not match,
//! which of its top-level `&&` conjuncts were false, so an operator sees *why*.

use super::PolicyInput;
use super::bundle::{Bundle, Effect, Evaluation, Outcome};
use super::expr::EvalError;
use std::fmt;

/// The result of one conjunct, evaluated on its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConjunctResult {
    pub source: String,
    pub result: Result<bool, EvalError>,
}

/// What one rule did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuleStatus {
    /// The rule is for another issuer and was not evaluated.
    IssuerMismatch,
    Matched,
    /// Not matched; the conjuncts that were false or failed on their own.
    NotMatched {
        failing: Vec<ConjunctResult>,
    },
    /// Evaluation failed: a deny rule counts as matched, an allow rule does not.
    Error {
        error: EvalError,
        failing: Vec<ConjunctResult>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleExplanation {
    pub rule: String,
    pub file: String,
    pub line: u64,
    pub issuer: String,
    pub effect: Effect,
    pub credentials: Vec<String>,
    /// Whether the rule lists a requested credential (only those take part in the decision).
    pub relevant: bool,
    pub status: RuleStatus,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explanation {
    pub digest: String,
    pub issuer: String,
    pub platform: String,
    /// Why claims were refused before any rule ran, if they were.
    pub claims_rejected: Option<EvalError>,
    pub rules: Vec<RuleExplanation>,
    pub evaluation: Evaluation,
}

impl Bundle {
    /// Explain a decision. `requested`: `None` means every credential of the bundle.
    pub fn explain(&self, input: &PolicyInput<'_>, requested: Option<&[String]>) -> Explanation {
        let requested: Vec<String> = match requested {
            Some(r) => r.to_vec(),
            None => self.credentials().iter().map(|c| c.name.clone()).collect(),
        };
        let evaluation = self.evaluate(input, &requested);
        let mut out = Explanation {
            digest: self.digest().to_owned(),
            issuer: input.issuer.to_owned(),
            platform: input.platform.as_str().to_owned(),
            claims_rejected: None,
            rules: Vec::new(),
            evaluation,
        };
        let act = match self.activation(input) {
            Ok(a) => a,
            Err(e) => {
                out.claims_rejected = Some(e);
                return out;
            }
        };
        for rule in self.rules() {
            let status = if rule.issuer != input.issuer {
                RuleStatus::IssuerMismatch
            } else {
                let failing = || {
                    rule.expr()
                        .conjuncts()
                        .iter()
                        .map(|c| ConjunctResult {
                            source: c.source.clone(),
                            result: act.eval_conjunct(c),
                        })
                        .filter(|c| c.result != Ok(true))
                        .collect()
                };
                match Self::run_rule(&act, rule) {
                    Outcome::True => RuleStatus::Matched,
                    Outcome::False => RuleStatus::NotMatched { failing: failing() },
                    Outcome::Error(error) => RuleStatus::Error {
                        error,
                        failing: failing(),
                    },
                }
            };
            out.rules.push(RuleExplanation {
                rule: rule.name.clone(),
                file: rule.file.clone(),
                line: rule.line,
                issuer: rule.issuer.clone(),
                effect: rule.effect,
                credentials: rule.credentials.clone(),
                relevant: requested.iter().any(|c| rule.covers(c)),
                status,
            });
        }
        out
    }
}

fn write_failing(f: &mut fmt::Formatter<'_>, failing: &[ConjunctResult]) -> fmt::Result {
    for c in failing {
        match &c.result {
            Ok(_) => writeln!(f, "        false: {}", c.source)?,
            Err(e) => writeln!(f, "        error: {}  ({e})", c.source)?,
        }
    }
    Ok(())
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "policy digest: {}", self.digest)?;
        writeln!(f, "issuer: {} (platform {})", self.issuer, self.platform)?;
        if let Some(why) = &self.claims_rejected {
            writeln!(f, "claims rejected before evaluation: {why}")?;
        }
        writeln!(f, "rules:")?;
        for r in &self.rules {
            write!(
                f,
                "  [{}] {} ({}:{}) -> {}: ",
                r.effect.as_str(),
                r.rule,
                r.file,
                r.line,
                r.credentials.join(", ")
            )?;
            let note = if r.relevant {
                ""
            } else {
                " (no requested credential)"
            };
            match &r.status {
                RuleStatus::IssuerMismatch => {
                    writeln!(f, "skipped, rule is for issuer {:?}", r.issuer)?
                }
                RuleStatus::Matched => writeln!(f, "MATCHED{note}")?,
                RuleStatus::NotMatched { failing } => {
                    writeln!(f, "not matched{note}")?;
                    write_failing(f, failing)?;
                }
                RuleStatus::Error { error, failing } => {
                    let counts = match r.effect {
                        Effect::Deny => "counts as matched: deny rules fail closed",
                        Effect::Allow => "counts as not matched",
                    };
                    writeln!(f, "ERROR ({counts}){note}: {error}")?;
                    write_failing(f, failing)?;
                }
            }
        }
        writeln!(f, "decisions:")?;
        if self.evaluation.decisions.is_empty() {
            writeln!(f, "  (no credentials)")?;
        }
        for d in &self.evaluation.decisions {
            match d.max_ttl {
                Some(t) => writeln!(
                    f,
                    "  {}: {}, max ttl {}",
                    d.credential,
                    d.outcome,
                    crate::time::format_duration(t)
                )?,
                None => writeln!(f, "  {}: {}", d.credential, d.outcome)?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::oidc::Platform;
    use crate::policy::{Bundle, LoadOptions, PolicyInput};
    use serde_json::json;

    const POLICY: &str = r#"
credentials:
  - name: c
    max_ttl: 5m
    api_token: { audience: x }
rules:
  - name: main-push
    issuer: github
    credentials: [c]
    when: >
      claims.repository_id == "1" &&
      claims.ref == "refs/heads/main" &&
      claims.event_name == "push"
  - name: deny-missing
    issuer: github
    effect: deny
    credentials: ["*"]
    when: claims.nope == "x"
  - name: gl
    issuer: gitlab
    credentials: [c]
    when: "true"
"#;

    #[test]
    fn names_the_false_conjunct_and_errors() {
        let b = Bundle::load_files(&[("e.yaml".into(), POLICY.into())], &LoadOptions::default())
            .unwrap();
        let claims = json!({"repository_id": "1", "ref": "refs/heads/dev", "event_name": "push"});
        let claims = claims.as_object().cloned().unwrap();
        let input = PolicyInput {
            issuer: "github",
            platform: Platform::Github,
            claims: &claims,
        };
        let x = b.explain(&input, None);
        match &x.rules[0].status {
            super::RuleStatus::NotMatched { failing } => {
                assert_eq!(failing.len(), 1);
                assert_eq!(failing[0].source, r#"claims.ref == "refs/heads/main""#);
                assert_eq!(failing[0].result, Ok(false));
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(x.rules[1].status, super::RuleStatus::Error { .. }));
        assert_eq!(x.rules[2].status, super::RuleStatus::IssuerMismatch);
        let text = x.to_string();
        assert!(
            text.contains(r#"false: claims.ref == "refs/heads/main""#),
            "{text}"
        );
        assert!(text.contains("deny rules fail closed"), "{text}");
        assert!(text.contains("c: deny (rule deny-missing)"), "{text}");
        assert!(
            text.contains("skipped, rule is for issuer \"gitlab\""),
            "{text}"
        );
    }
}

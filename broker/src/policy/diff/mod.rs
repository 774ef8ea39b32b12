//! `broker policy diff BASE HEAD`: what a policy change does to access, for reviewers.
//!
//! Two loaded bundles are compared three ways:
//! - **definitions and rules** by name: credentials and rules added, removed or changed, field
//!   by field;
//! - **effective access** by evaluating both bundles over a corpus of concrete claim sets
//!   ([`corpus`]): every claim set a credential is now granted for and was not (and the
//!   reverse), and every one whose TTL ceiling rose or fell;
//! - **lint findings** the head introduces (present in head, absent in base, compared by rule,
//!   code and message so moved lines do not count).
//!
//! "Widened" is evidence-based: some claim set is newly allowed or gets a longer TTL ceiling,
//! or a credential definition changed in a way that can grant more (a higher `max_ttl`, a
//! parameter added or changed; removing list entries only narrows). A rule change that no
//! claim set of the corpus reaches is listed as unexercised, so a reviewer knows the corpus did
//! not cover it; a test case that reaches it closes that gap.

pub mod corpus;
mod report;
pub mod source;

pub use corpus::{Origin, Sample, Seed};
pub use report::render_markdown;

use super::{Bundle, Decision, PolicyInput};
use serde::Serialize;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use time::Duration;

/// Exit status of `broker policy diff` when access did not widen.
pub const EXIT_NOT_WIDENED: u8 = 0;
/// Exit status when access widened (so CI can require another approver).
pub const EXIT_WIDENED: u8 = 10;
/// Exit status when the diff could not be made (a bundle does not load, git or the audit
/// query failed).
pub const EXIT_ERROR: u8 = 2;

/// Examples kept per credential and direction; the totals are always exact.
pub const MAX_EXAMPLES: usize = 50;

/// How one thing changed between base and head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Change {
    Added,
    Removed,
    Changed,
    /// Same definition; listed because its access changed through rules.
    Unchanged,
}

impl Change {
    pub fn as_str(self) -> &'static str {
        match self {
            Change::Added => "added",
            Change::Removed => "removed",
            Change::Changed => "changed",
            Change::Unchanged => "unchanged",
        }
    }
}

/// One field of a definition or rule, before and after (`None`: absent).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldChange {
    pub field: String,
    pub base: Option<String>,
    pub head: Option<String>,
    /// Whether this change alone can grant more.
    pub widens: bool,
}

/// One claim set whose decision for a credential differs.
#[derive(Debug, Clone, Serialize)]
pub struct AccessChange {
    #[serde(flatten)]
    pub sample: Sample,
    /// The decisions as `broker policy explain` words them.
    pub base: String,
    pub head: String,
    #[serde(with = "crate::time::serde_duration::option")]
    pub base_ttl: Option<Duration>,
    #[serde(with = "crate::time::serde_duration::option")]
    pub head_ttl: Option<Duration>,
}

/// Up to [`MAX_EXAMPLES`] examples and the exact total.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Examples {
    pub total: usize,
    pub examples: Vec<AccessChange>,
}

impl Examples {
    fn push(&mut self, c: AccessChange) {
        self.total += 1;
        if self.examples.len() < MAX_EXAMPLES {
            self.examples.push(c);
        }
    }
    pub fn is_empty(&self) -> bool {
        self.total == 0
    }
}

/// Everything that changed for one credential.
#[derive(Debug, Clone, Serialize)]
pub struct CredentialChange {
    pub name: String,
    /// Kind in head (base when removed).
    pub kind: &'static str,
    pub change: Change,
    pub definition: Vec<FieldChange>,
    /// Names of added, removed or changed rules that list this credential (or `*`).
    pub rules: Vec<String>,
    pub newly_allowed: Examples,
    pub newly_denied: Examples,
    pub longer_ttl: Examples,
    pub shorter_ttl: Examples,
    pub widened: bool,
    pub narrowed: bool,
}

/// One added, removed or changed rule.
#[derive(Debug, Clone, Serialize)]
pub struct RuleChange {
    pub name: String,
    pub change: Change,
    pub issuer: String,
    pub effect: &'static str,
    /// `file:line` in head (base when removed).
    pub location: String,
    pub fields: Vec<FieldChange>,
    /// True when no claim set of the corpus was decided by this rule in either bundle while
    /// its decision changed: the corpus says nothing about this change.
    pub unexercised: bool,
}

/// A lint finding new in head.
#[derive(Debug, Clone, Serialize)]
pub struct NewLint {
    pub location: String,
    pub rule: String,
    pub code: &'static str,
    pub message: String,
}

/// Counts describing the corpus.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CorpusStats {
    pub test_seeds: usize,
    pub audit_seeds: usize,
    pub claim_sets: usize,
}

/// The whole diff.
#[derive(Debug, Clone, Serialize)]
pub struct PolicyDiff {
    pub base_digest: String,
    pub head_digest: String,
    pub widened: bool,
    pub narrowed: bool,
    pub corpus: CorpusStats,
    /// Credentials whose definition or access changed, by name.
    pub credentials: Vec<CredentialChange>,
    pub rules: Vec<RuleChange>,
    pub new_lint_findings: Vec<NewLint>,
}

impl PolicyDiff {
    /// The exit status the CLI returns for this diff.
    pub fn exit_code(&self) -> u8 {
        if self.widened {
            EXIT_WIDENED
        } else {
            EXIT_NOT_WIDENED
        }
    }
    /// Whether nothing at all changed that a reviewer needs to see.
    pub fn is_empty(&self) -> bool {
        self.credentials.is_empty() && self.rules.is_empty() && self.new_lint_findings.is_empty()
    }
}

fn dur(d: Duration) -> String {
    crate::time::format_duration(d)
}

/// Flatten a JSON value into `path → compact JSON` leaves (arrays are leaves, compared as
/// sets of entries for widening).
fn flatten(prefix: &str, v: &Value, out: &mut BTreeMap<String, Value>) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, v) in m {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&p, v, out);
            }
        }
        Value::Null => {}
        _ => {
            out.insert(prefix.to_owned(), v.clone());
        }
    }
}

fn show(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Whether replacing `base` by `head` at a kind parameter can grant more: anything but
/// removing entries from a list.
fn param_widens(base: Option<&Value>, head: Option<&Value>) -> bool {
    match (base, head) {
        (_, None) => false,
        (Some(Value::Array(b)), Some(Value::Array(h))) => h.iter().any(|x| !b.contains(x)),
        _ => true,
    }
}

fn definition_changes(
    base: &crate::providers::CredentialDef,
    head: &crate::providers::CredentialDef,
) -> Vec<FieldChange> {
    let mut out = Vec::new();
    if base.max_ttl != head.max_ttl {
        out.push(FieldChange {
            field: "max_ttl".to_owned(),
            base: Some(dur(base.max_ttl)),
            head: Some(dur(head.max_ttl)),
            widens: head.max_ttl > base.max_ttl,
        });
    }
    if base.description != head.description {
        out.push(FieldChange {
            field: "description".to_owned(),
            base: base.description.clone(),
            head: head.description.clone(),
            widens: false,
        });
    }
    let (mut b, mut h) = (BTreeMap::new(), BTreeMap::new());
    flatten(
        "",
        &serde_json::to_value(&base.spec).unwrap_or_default(),
        &mut b,
    );
    flatten(
        "",
        &serde_json::to_value(&head.spec).unwrap_or_default(),
        &mut h,
    );
    let keys: BTreeSet<&String> = b.keys().chain(h.keys()).collect();
    for k in keys {
        let (bv, hv) = (b.get(k), h.get(k));
        if bv != hv {
            out.push(FieldChange {
                field: k.clone(),
                base: bv.map(show),
                head: hv.map(show),
                widens: param_widens(bv, hv),
            });
        }
    }
    out
}

fn rule_fields(base: &super::Rule, head: &super::Rule) -> Vec<FieldChange> {
    let mut out = Vec::new();
    let mut field = |name: &str, b: Option<String>, h: Option<String>| {
        if b != h {
            out.push(FieldChange {
                field: name.to_owned(),
                base: b,
                head: h,
                // Rule changes are judged by their effect on the corpus, not in isolation.
                widens: false,
            });
        }
    };
    field(
        "issuer",
        Some(base.issuer.clone()),
        Some(head.issuer.clone()),
    );
    field(
        "effect",
        Some(base.effect.as_str().to_owned()),
        Some(head.effect.as_str().to_owned()),
    );
    field(
        "credentials",
        Some(base.credentials.join(", ")),
        Some(head.credentials.join(", ")),
    );
    field("max_ttl", base.max_ttl.map(dur), head.max_ttl.map(dur));
    field(
        "when",
        Some(base.when().to_owned()),
        Some(head.when().to_owned()),
    );
    field(
        "description",
        base.description.clone(),
        head.description.clone(),
    );
    out
}

fn rule_changes(base: &Bundle, head: &Bundle) -> Vec<RuleChange> {
    let loc = |r: &super::Rule| format!("{}:{}", r.file, r.line);
    let find = |b: &Bundle, n: &str| b.rules().iter().find(|r| r.name == n).cloned();
    let mut out = Vec::new();
    for h in head.rules() {
        match find(base, &h.name) {
            None => out.push(RuleChange {
                name: h.name.clone(),
                change: Change::Added,
                issuer: h.issuer.clone(),
                effect: h.effect.as_str(),
                location: loc(h),
                fields: Vec::new(),
                unexercised: false,
            }),
            Some(b) => {
                let fields = rule_fields(&b, h);
                // Order matters for allow rules (the first match grants, and sets the TTL).
                let moved = base.rules().iter().position(|r| r.name == h.name)
                    != head.rules().iter().position(|r| r.name == h.name);
                if !fields.is_empty() {
                    out.push(RuleChange {
                        name: h.name.clone(),
                        change: Change::Changed,
                        issuer: h.issuer.clone(),
                        effect: h.effect.as_str(),
                        location: loc(h),
                        fields,
                        unexercised: false,
                    });
                } else if moved && h.effect == super::Effect::Allow && h.max_ttl.is_some() {
                    out.push(RuleChange {
                        name: h.name.clone(),
                        change: Change::Changed,
                        issuer: h.issuer.clone(),
                        effect: h.effect.as_str(),
                        location: loc(h),
                        fields: vec![FieldChange {
                            field: "position".to_owned(),
                            base: Some(loc(&b)),
                            head: Some(loc(h)),
                            widens: false,
                        }],
                        unexercised: false,
                    });
                }
            }
        }
    }
    for b in base.rules() {
        if find(head, &b.name).is_none() {
            out.push(RuleChange {
                name: b.name.clone(),
                change: Change::Removed,
                issuer: b.issuer.clone(),
                effect: b.effect.as_str(),
                location: loc(b),
                fields: Vec::new(),
                unexercised: false,
            });
        }
    }
    out
}

fn decision_rule(d: &Decision) -> Option<&str> {
    match d {
        Decision::Allow { rule } | Decision::DenyRule { rule } => Some(rule),
        _ => None,
    }
}

/// Compare `base` and `head` over the test cases of both plus `extra_seeds` (audit records)
/// and their variations.
pub fn diff(base: &Bundle, head: &Bundle, extra_seeds: &[Seed]) -> PolicyDiff {
    let mut seeds = corpus::test_seeds(base, head);
    let test_seeds = seeds.len();
    seeds.extend(extra_seeds.iter().cloned());
    let samples = corpus::build(base, head, &seeds);

    // Every credential of either bundle, head order first, then those only in base.
    let mut names: Vec<String> = head.credentials().iter().map(|c| c.name.clone()).collect();
    for c in base.credentials() {
        if !names.contains(&c.name) {
            names.push(c.name.clone());
        }
    }
    let rules = rule_changes(base, head);
    let mut creds: Vec<CredentialChange> = names
        .iter()
        .map(|name| {
            let (b, h) = (base.credential(name), head.credential(name));
            let (change, definition) = match (b, h) {
                (None, _) => (Change::Added, Vec::new()),
                (_, None) => (Change::Removed, Vec::new()),
                (Some(b), Some(h)) => {
                    let d = definition_changes(b, h);
                    let c = if d.is_empty() {
                        Change::Unchanged
                    } else {
                        Change::Changed
                    };
                    (c, d)
                }
            };
            let kind = h.or(b).map(|c| c.spec.kind().as_str()).unwrap_or("");
            let covers = |r: &super::Rule| r.covers(name);
            let rule_names = rules
                .iter()
                .filter(|rc| {
                    let in_b = base.rules().iter().find(|r| r.name == rc.name);
                    let in_h = head.rules().iter().find(|r| r.name == rc.name);
                    in_b.is_some_and(covers) || in_h.is_some_and(covers)
                })
                .map(|rc| rc.name.clone())
                .collect();
            CredentialChange {
                name: name.clone(),
                kind,
                change,
                definition,
                rules: rule_names,
                newly_allowed: Examples::default(),
                newly_denied: Examples::default(),
                longer_ttl: Examples::default(),
                shorter_ttl: Examples::default(),
                widened: false,
                narrowed: false,
            }
        })
        .collect();

    // Rules that decided some claim set whose decision changed.
    let mut exercised: BTreeSet<String> = BTreeSet::new();
    for s in &samples {
        let input = PolicyInput {
            issuer: &s.issuer,
            platform: s.platform,
            claims: &s.claims,
        };
        let (eb, eh) = (base.evaluate(&input, &names), head.evaluate(&input, &names));
        for ((db, dh), cc) in eb.decisions.iter().zip(&eh.decisions).zip(creds.iter_mut()) {
            let (ab, ah) = (db.outcome.is_allow(), dh.outcome.is_allow());
            let longer = ab && ah && dh.max_ttl > db.max_ttl;
            let shorter = ab && ah && dh.max_ttl < db.max_ttl;
            if ab == ah && !longer && !shorter {
                continue;
            }
            exercised.extend(decision_rule(&db.outcome).map(str::to_owned));
            exercised.extend(decision_rule(&dh.outcome).map(str::to_owned));
            let change = AccessChange {
                sample: s.clone(),
                base: db.outcome.to_string(),
                head: dh.outcome.to_string(),
                base_ttl: db.max_ttl,
                head_ttl: dh.max_ttl,
            };
            match (ab, ah) {
                (false, true) => cc.newly_allowed.push(change),
                (true, false) => cc.newly_denied.push(change),
                _ if longer => cc.longer_ttl.push(change),
                _ => cc.shorter_ttl.push(change),
            }
        }
    }
    let mut rules = rules;
    for r in &mut rules {
        let decides = r.fields.iter().any(|f| f.field != "description");
        r.unexercised = (r.change != Change::Changed || decides) && !exercised.contains(&r.name);
    }
    for c in &mut creds {
        c.widened = !c.newly_allowed.is_empty()
            || !c.longer_ttl.is_empty()
            || c.definition.iter().any(|f| f.widens);
        c.narrowed = !c.newly_denied.is_empty()
            || !c.shorter_ttl.is_empty()
            || c.change == Change::Removed
            || c.definition
                .iter()
                .any(|f| f.field == "max_ttl" && !f.widens);
    }
    creds.retain(|c| {
        c.change != Change::Unchanged || c.widened || c.narrowed || !c.rules.is_empty()
    });

    let key = |f: &super::LintFinding| (f.rule.clone(), f.code, f.message.clone());
    let before: BTreeSet<_> = base.lint().iter().map(key).collect();
    let new_lint_findings = head
        .lint()
        .into_iter()
        .filter(|f| !before.contains(&key(f)))
        .map(|f| NewLint {
            location: format!("{}:{}", f.file, f.line),
            rule: f.rule,
            code: f.code,
            message: f.message,
        })
        .collect();

    PolicyDiff {
        base_digest: base.digest().to_owned(),
        head_digest: head.digest().to_owned(),
        widened: creds.iter().any(|c| c.widened),
        narrowed: creds.iter().any(|c| c.narrowed),
        corpus: CorpusStats {
            test_seeds,
            audit_seeds: extra_seeds.len(),
            claim_sets: samples.len(),
        },
        credentials: creds,
        rules,
        new_lint_findings,
    }
}

#[cfg(test)]
mod tests;

//! Lints: rules that load and run but are probably too permissive. Findings are warnings; the
//! facts come from the CEL AST (claims read, patterns used, literals compared), not substrings.
//!
//! An issuer's platform is taken from the bundle's test cases for that issuer, else guessed from
//! its name (`github…` / `gitlab…`); rules for an issuer of unknown platform get only the
//! platform-neutral lints.

use super::bundle::{Bundle, Effect, Rule};
use crate::oidc::Platform;
use std::collections::HashMap;
use std::fmt;

/// Claims naming *which* repository/project a job belongs to: patterns on them admit look-alikes.
const IDENTITY_CLAIMS: [&str; 7] = [
    "repository",
    "repository_owner",
    "project_path",
    "namespace_path",
    "sub",
    "job_workflow_ref",
    "ci_config_ref_uri",
];
/// Claims naming a git ref: a prefix admits any branch/tag an attacker can push.
const REF_CLAIMS: [&str; 4] = ["ref", "ref_name", "base_ref", "head_ref"];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LintFinding {
    pub file: String,
    pub line: u64,
    pub rule: String,
    /// Stable code: `unpinned_repository`, `unpinned_project`, `unpinned_event`,
    /// `allows_pull_request_target`, `wildcard_pattern`.
    pub code: &'static str,
    pub message: String,
}

impl fmt::Display for LintFinding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}: warning[{}]: rule {:?}: {}",
            self.file, self.line, self.code, self.rule, self.message
        )
    }
}

fn guess_platform(issuer: &str) -> Option<Platform> {
    let i = issuer.to_ascii_lowercase();
    if i.starts_with("github") {
        Some(Platform::Github)
    } else if i.starts_with("gitlab") {
        Some(Platform::Gitlab)
    } else {
        None
    }
}

/// A regex pattern anchored at both ends admits exactly what it spells out.
fn anchored(pattern: &str) -> bool {
    pattern.starts_with('^') && pattern.ends_with('$') && !pattern.ends_with("\\$")
}

impl Bundle {
    /// Every lint finding, in rule order.
    pub fn lint(&self) -> Vec<LintFinding> {
        let mut platforms: HashMap<&str, Platform> = HashMap::new();
        for t in self.tests() {
            platforms.entry(t.issuer.as_str()).or_insert(t.platform);
        }
        let mut out = Vec::new();
        for rule in self.rules() {
            let platform = platforms
                .get(rule.issuer.as_str())
                .copied()
                .or_else(|| guess_platform(&rule.issuer));
            lint_rule(rule, platform, &mut out);
        }
        out
    }
}

fn lint_rule(rule: &Rule, platform: Option<Platform>, out: &mut Vec<LintFinding>) {
    let mut push = |code: &'static str, message: String| {
        out.push(LintFinding {
            file: rule.file.clone(),
            line: rule.line,
            rule: rule.name.clone(),
            code,
            message,
        })
    };
    let e = rule.expr();
    let reads = |c: &str| e.claims().contains(c);
    if rule.effect == Effect::Allow {
        match platform {
            Some(Platform::Github) => {
                if !reads("repository_id") && !reads("repository_owner_id") {
                    push(
                        "unpinned_repository",
                        "allow rule does not check claims.repository_id or \
                         claims.repository_owner_id; names can be re-registered by others"
                            .to_owned(),
                    );
                }
                if !reads("event_name") {
                    push(
                        "unpinned_event",
                        "allow rule does not check claims.event_name".to_owned(),
                    );
                }
            }
            Some(Platform::Gitlab) if !reads("project_id") && !reads("namespace_id") => {
                push(
                    "unpinned_project",
                    "allow rule does not check claims.project_id or claims.namespace_id; \
                     paths can be re-registered by others"
                        .to_owned(),
                );
            }
            Some(Platform::Gitlab) | None => {}
        }
        if e.positive_literals().contains("pull_request_target") {
            push(
                "allows_pull_request_target",
                "allow rule admits pull_request_target, which runs with the base repository's \
                 permissions on code from a fork"
                    .to_owned(),
            );
        }
    }
    for p in e.patterns() {
        let identity = IDENTITY_CLAIMS.contains(&p.claim.as_str());
        let git_ref = REF_CLAIMS.contains(&p.claim.as_str());
        let exact_regex = p.function == "matches" && p.pattern.as_deref().is_some_and(anchored);
        if identity || (git_ref && !exact_regex) {
            push(
                "wildcard_pattern",
                format!(
                    "{}() on claims.{} admits look-alike values; compare with == (or an \
                     anchored ^...$ pattern for refs)",
                    p.function, p.claim
                ),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::policy::{Bundle, LoadOptions};

    fn codes(policy: &str) -> Vec<(String, &'static str)> {
        let b = Bundle::load_files(&[("l.yaml".into(), policy.into())], &LoadOptions::default())
            .unwrap();
        b.lint().into_iter().map(|f| (f.rule, f.code)).collect()
    }

    const HEAD: &str =
        "credentials:\n  - name: c\n    max_ttl: 5m\n    api_token: { audience: x }\nrules:\n";

    #[test]
    fn flags_unpinned_and_wildcard_rules() {
        let p = format!(
            "{HEAD}{}",
            r#"  - name: loose
    issuer: github
    credentials: [c]
    when: claims.repository.startsWith("acme/") && claims.event_name in ["push", "pull_request_target"]
  - name: tight
    issuer: github
    credentials: [c]
    when: >
      claims.repository_id == "1" && claims.event_name == "push" &&
      claims.ref.matches("^refs/tags/v[0-9]+$") && claims.event_name != "pull_request_target"
  - name: ref-prefix
    issuer: github
    credentials: [c]
    when: claims.repository_owner_id == "9" && claims.event_name == "push" && claims.ref.startsWith("refs/heads/")
  - name: gl
    issuer: gitlab
    credentials: [c]
    when: claims.project_path == "acme/api"
  - name: gl-ok
    issuer: gitlab
    credentials: [c]
    when: claims.project_id == "2"
  - name: deny-any
    issuer: github
    effect: deny
    credentials: ["*"]
    when: claims.event_name == "pull_request_target"
"#
        );
        assert_eq!(
            codes(&p),
            vec![
                ("loose".to_owned(), "unpinned_repository"),
                ("loose".to_owned(), "allows_pull_request_target"),
                ("loose".to_owned(), "wildcard_pattern"),
                ("ref-prefix".to_owned(), "wildcard_pattern"),
                ("gl".to_owned(), "unpinned_project"),
            ]
        );
    }
}

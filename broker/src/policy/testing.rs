//! The policy test runner: every `tests:` case of a bundle, evaluated exactly as an exchange
//! would be, with a CI-friendly report.

use super::PolicyInput;
use super::bundle::{Bundle, CredentialDecision, Decision};
use std::fmt;

/// What a case expected of one credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expected {
    Allow,
    Deny,
}

/// One credential whose decision differed from the expectation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    pub credential: String,
    pub expected: Expected,
    pub got: Decision,
}

/// The result of one test case.
#[derive(Debug, Clone)]
pub struct CaseResult {
    pub name: String,
    pub file: String,
    pub line: u64,
    pub decisions: Vec<CredentialDecision>,
    pub mismatches: Vec<Mismatch>,
}

impl CaseResult {
    pub fn passed(&self) -> bool {
        self.mismatches.is_empty()
    }
}

/// Results of every case, in bundle order.
#[derive(Debug, Clone, Default)]
pub struct TestReport {
    pub cases: Vec<CaseResult>,
}

impl TestReport {
    pub fn passed(&self) -> usize {
        self.cases.iter().filter(|c| c.passed()).count()
    }
    pub fn failed(&self) -> usize {
        self.cases.len() - self.passed()
    }
    /// True when every case passed.
    pub fn ok(&self) -> bool {
        self.failed() == 0
    }
}

impl fmt::Display for TestReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in &self.cases {
            let status = if c.passed() { "ok  " } else { "FAIL" };
            writeln!(f, "{status} {}:{}: {}", c.file, c.line, c.name)?;
            for m in &c.mismatches {
                let want = match m.expected {
                    Expected::Allow => "allow",
                    Expected::Deny => "deny",
                };
                writeln!(f, "       {}: expected {want}, got {}", m.credential, m.got)?;
            }
        }
        write!(
            f,
            "test result: {}. {} passed; {} failed",
            if self.ok() { "ok" } else { "FAILED" },
            self.passed(),
            self.failed()
        )
    }
}

impl Bundle {
    /// Run every test case of the bundle.
    pub fn run_tests(&self) -> TestReport {
        let cases = self
            .tests()
            .iter()
            .map(|t| {
                let input = PolicyInput {
                    issuer: &t.issuer,
                    platform: t.platform,
                    claims: &t.claims,
                };
                let eval = self.evaluate(&input, &t.request);
                let got = |name: &str| {
                    eval.decisions
                        .iter()
                        .find(|d| d.credential == name)
                        .map(|d| d.outcome.clone())
                        // Expected but not requested: nothing was granted.
                        .unwrap_or(Decision::NoRule)
                };
                let mut mismatches = Vec::new();
                for c in &t.expect_allow {
                    let g = got(c);
                    if !g.is_allow() {
                        mismatches.push(Mismatch {
                            credential: c.clone(),
                            expected: Expected::Allow,
                            got: g,
                        });
                    }
                }
                for c in &t.expect_deny {
                    let g = got(c);
                    if g.is_allow() {
                        mismatches.push(Mismatch {
                            credential: c.clone(),
                            expected: Expected::Deny,
                            got: g,
                        });
                    }
                }
                CaseResult {
                    name: t.name.clone(),
                    file: t.file.clone(),
                    line: t.line,
                    decisions: eval.decisions,
                    mismatches,
                }
            })
            .collect();
        TestReport { cases }
    }
}

#[cfg(test)]
mod tests {
    use crate::policy::{Bundle, LoadOptions};

    const POLICY: &str = r#"
credentials:
  - name: c
    max_ttl: 5m
    api_token: { audience: x }
rules:
  - name: main
    issuer: github
    credentials: [c]
    when: claims.ref == "refs/heads/main"
tests:
  - name: main allowed
    issuer: github
    claims: { ref: refs/heads/main }
    expect: { allow: [c] }
  - name: wrong expectation
    issuer: github
    claims: { ref: refs/heads/dev }
    expect: { allow: [c] }
  - name: dev denied
    issuer: github
    claims: { ref: refs/heads/dev }
    expect: { deny: [c] }
"#;

    #[test]
    fn reports_pass_and_fail_with_expected_and_got() {
        let b = Bundle::load_files(&[("t.yaml".into(), POLICY.into())], &LoadOptions::default())
            .unwrap();
        let r = b.run_tests();
        assert_eq!((r.passed(), r.failed()), (2, 1));
        assert!(!r.ok());
        let text = r.to_string();
        assert!(text.contains("ok   t.yaml:12: main allowed"), "{text}");
        assert!(text.contains("FAIL t.yaml:16: wrong expectation"), "{text}");
        assert!(
            text.contains("c: expected allow, got deny (no matching rule)"),
            "{text}"
        );
        assert!(
            text.ends_with("test result: FAILED. 2 passed; 1 failed"),
            "{text}"
        );
    }
}

/// The example policies shipped in `policies/` must load, lint clean and pass their own tests.
#[cfg(test)]
mod example_policies {
    use crate::policy::{Bundle, LoadOptions};
    use std::path::Path;

    fn examples() -> Bundle {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
        let opts = LoadOptions {
            known_issuers: Some(["github".to_owned(), "gitlab".to_owned()].into()),
        };
        match Bundle::load_dir(&dir, &opts) {
            Ok(b) => b,
            Err(e) => panic!("example policies do not load:\n{e}"),
        }
    }

    #[test]
    fn every_example_case_passes() {
        let b = examples();
        let report = b.run_tests();
        assert!(report.ok(), "{report}");
        for file in ["github.yaml", "gitlab.yaml"] {
            let n = report.cases.iter().filter(|c| c.file == file).count();
            assert!(n >= 6, "{file} has only {n} test cases");
        }
    }

    #[test]
    fn examples_lint_clean() {
        let findings = examples().lint();
        let text: Vec<String> = findings.iter().map(ToString::to_string).collect();
        assert!(findings.is_empty(), "{}", text.join("\n"));
    }
}

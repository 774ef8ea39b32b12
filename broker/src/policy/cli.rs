//! Command-line helpers (`broker policy check|test|explain`): load, report, and return whether
//! the command succeeded so the caller sets the exit status.

use super::{Bundle, LoadOptions, PolicyInput};
use crate::oidc::Platform;
use std::collections::BTreeSet;
use std::io::Write;
use std::path::Path;

fn load(dir: &Path, opts: &LoadOptions, out: &mut dyn Write) -> Option<Bundle> {
    match Bundle::load_dir(dir, opts) {
        Ok(b) => Some(b),
        Err(errors) => {
            let n = errors.0.len();
            let _ = writeln!(out, "{errors}");
            let _ = writeln!(out, "error: {} problem(s) in {}", n, dir.display());
            None
        }
    }
}

/// Load and lint. Succeeds when the bundle loads; lint findings are printed as warnings.
pub fn check(dir: &Path, known_issuers: Option<BTreeSet<String>>, out: &mut dyn Write) -> bool {
    let opts = LoadOptions { known_issuers };
    let Some(b) = load(dir, &opts, out) else {
        return false;
    };
    let findings = b.lint();
    let written = (|| -> std::io::Result<()> {
        for f in &findings {
            writeln!(out, "{f}")?;
        }
        writeln!(
            out,
            "ok: {} credential(s), {} rule(s), {} test(s), {} warning(s); digest {}",
            b.credentials().len(),
            b.rules().len(),
            b.tests().len(),
            findings.len(),
            b.digest()
        )
    })();
    written.is_ok()
}

/// Load and run every test case. Succeeds when all pass.
pub fn test(dir: &Path, out: &mut dyn Write) -> bool {
    let Some(b) = load(dir, &LoadOptions::default(), out) else {
        return false;
    };
    let report = b.run_tests();
    writeln!(out, "{report}").is_ok() && report.ok()
}

/// Explain the decision for `claims_json` (a JSON object) presented by `issuer`, over every
/// credential of the bundle. Succeeds when an explanation was produced, whatever it decided.
pub fn explain(
    dir: &Path,
    claims_json: &serde_json::Value,
    issuer: &str,
    platform: Platform,
    out: &mut dyn Write,
) -> bool {
    let Some(claims) = claims_json.as_object() else {
        let _ = writeln!(out, "error: claims must be a JSON object");
        return false;
    };
    let Some(b) = load(dir, &LoadOptions::default(), out) else {
        return false;
    };
    let input = PolicyInput {
        issuer,
        platform,
        claims,
    };
    write!(out, "{}", b.explain(&input, None)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = r#"credentials:
  - name: c
    max_ttl: 5m
    api_token: { audience: x }
rules:
  - name: r
    issuer: github
    credentials: [c]
    when: claims.ref == "refs/heads/main"
tests:
  - name: main
    issuer: github
    claims: { ref: refs/heads/main }
    expect: { allow: [c] }
"#;

    fn run(
        f: impl FnOnce(&Path, &mut dyn Write) -> bool,
        files: &[(&str, &str)],
    ) -> (bool, String) {
        let dir = tempfile::tempdir().unwrap();
        for (p, c) in files {
            std::fs::write(dir.path().join(p), c).unwrap();
        }
        let mut out = Vec::new();
        let ok = f(dir.path(), &mut out);
        (ok, String::from_utf8(out).unwrap())
    }

    #[test]
    fn check_reports_problems_and_warnings() {
        let known: BTreeSet<String> = ["gitlab".to_owned()].into();
        let (ok, text) = run(|d, o| check(d, Some(known), o), &[("p.yaml", POLICY)]);
        assert!(!ok);
        assert!(
            text.contains("p.yaml:7: rule \"r\" names unknown issuer \"github\""),
            "{text}"
        );
        let (ok, text) = run(|d, o| check(d, None, o), &[("p.yaml", POLICY)]);
        assert!(ok, "{text}");
        assert!(text.contains("warning[unpinned_repository]"), "{text}");
        assert!(
            text.contains("ok: 1 credential(s), 1 rule(s), 1 test(s)"),
            "{text}"
        );
    }

    #[test]
    fn test_and_explain() {
        let (ok, text) = run(test, &[("p.yaml", POLICY)]);
        assert!(ok, "{text}");
        let failing = POLICY.replace("allow: [c]", "deny: [c]");
        let (ok, text) = run(test, &[("p.yaml", &failing)]);
        assert!(!ok);
        assert!(text.contains("FAIL"), "{text}");
        let claims = serde_json::json!({"ref": "refs/heads/dev"});
        let (ok, text) = run(
            |d, o| explain(d, &claims, "github", Platform::Github, o),
            &[("p.yaml", POLICY)],
        );
        assert!(ok);
        assert!(
            text.contains("false: claims.ref == \"refs/heads/main\""),
            "{text}"
        );
        let (ok, _) = run(
            |d, o| explain(d, &serde_json::json!([1]), "github", Platform::Github, o),
            &[("p.yaml", POLICY)],
        );
        assert!(!ok);
    }
}

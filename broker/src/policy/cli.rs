//! Command-line helpers (`broker policy check|test|explain|diff|schema`): load, report, and
//! return whether the command succeeded (or, for `diff`, its exit status) so the caller sets
//! the exit status.

use super::{Bundle, LoadOptions, PolicyInput, diff};
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

/// Validate every file against the JSON Schema (`broker policy schema`). Violations in a file
/// the loader refuses as malformed YAML are the same problem, reported once by the loader with
/// its line; others are printed here. Returns whether every file conforms.
fn check_schema(dir: &Path, out: &mut dyn Write) -> bool {
    let Ok(files) = super::load::read_dir_files(dir) else {
        // The loader reports the unreadable tree.
        return true;
    };
    let mut ok = true;
    for (path, content) in &files {
        let errors = super::schema::validate_yaml(content);
        if errors.is_empty() {
            continue;
        }
        ok = false;
        let single = [(path.clone(), content.clone())];
        let loader_says_malformed = Bundle::load_files(&single, &LoadOptions::default())
            .err()
            .is_some_and(|e| e.iter().any(|e| e.kind.reason_code() == "yaml_invalid"));
        if !loader_says_malformed {
            for e in errors {
                let _ = writeln!(out, "{path}:0: {e}");
            }
        }
    }
    ok
}

/// Check the schema, load and lint. Succeeds when every file conforms to the schema and the
/// bundle loads; lint findings are printed as warnings.
pub fn check(dir: &Path, known_issuers: Option<BTreeSet<String>>, out: &mut dyn Write) -> bool {
    let opts = LoadOptions { known_issuers };
    let schema_ok = check_schema(dir, out);
    let Some(b) = load(dir, &opts, out) else {
        return false;
    };
    if !schema_ok {
        let _ = writeln!(
            out,
            "error: {} does not conform to the policy schema",
            dir.display()
        );
        return false;
    }
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

/// Output of `broker policy diff`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiffFormat {
    Markdown,
    Json,
}

/// A `--format` that is neither.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("one of markdown, json")]
pub struct UnknownDiffFormat;

impl std::str::FromStr for DiffFormat {
    type Err = UnknownDiffFormat;
    fn from_str(s: &str) -> Result<Self, UnknownDiffFormat> {
        match s {
            "markdown" | "md" => Ok(Self::Markdown),
            "json" => Ok(Self::Json),
            _ => Err(UnknownDiffFormat),
        }
    }
}

/// Diff two policy directories over their test cases, `seeds` (audit records) and generated
/// variations. Returns the exit status: [`diff::EXIT_NOT_WIDENED`], [`diff::EXIT_WIDENED`], or
/// [`diff::EXIT_ERROR`] when a side does not load (its problems are printed).
pub fn diff(
    base: &Path,
    head: &Path,
    seeds: &[diff::Seed],
    format: DiffFormat,
    out: &mut dyn Write,
) -> u8 {
    let opts = LoadOptions::default();
    let (Some(b), Some(h)) = (load(base, &opts, out), load(head, &opts, out)) else {
        return diff::EXIT_ERROR;
    };
    let d = diff::diff(&b, &h, seeds);
    let text = match format {
        DiffFormat::Markdown => diff::render_markdown(&d),
        DiffFormat::Json => match serde_json::to_string_pretty(&d) {
            Ok(s) => s + "\n",
            Err(e) => {
                let _ = writeln!(out, "error: {e}");
                return diff::EXIT_ERROR;
            }
        },
    };
    match out.write_all(text.as_bytes()) {
        Ok(()) => d.exit_code(),
        Err(_) => diff::EXIT_ERROR,
    }
}

/// Print the JSON Schema of policy files.
pub fn schema(out: &mut dyn Write) -> bool {
    out.write_all(super::schema::schema_json().as_bytes())
        .is_ok()
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
    fn check_applies_the_schema() {
        // YAML turns the number into a string for the loader; the schema (and so an editor)
        // says it is not one, and check fails with the schema's words.
        let sloppy = POLICY.replace("audience: x", "audience: 5");
        let (ok, text) = run(|d, o| check(d, None, o), &[("p.yaml", &sloppy)]);
        assert!(!ok, "{text}");
        assert!(
            text.contains("p.yaml:0: schema: at /credentials/0/api_token/audience: 5 is not of type \"string\""),
            "{text}"
        );
        assert!(
            text.contains("does not conform to the policy schema"),
            "{text}"
        );
        // A problem both see is reported once, by the loader, with its line.
        let unknown = POLICY.replace("    when:", "    bogus: 1\n    when:");
        let (ok, text) = run(|d, o| check(d, None, o), &[("p.yaml", &unknown)]);
        assert!(!ok);
        assert!(text.contains("p.yaml:9: unknown field `bogus`"), "{text}");
        assert!(!text.contains("schema:"), "{text}");
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

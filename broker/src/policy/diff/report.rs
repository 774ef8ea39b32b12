//! Markdown rendering of a [`PolicyDiff`], for a pull-request comment.
//!
//! Claim values come from test cases and from the audit log, i.e. from job tokens an attacker
//! can shape (branch names, environment names). Every such value is printed inside a code span
//! after [`code`] removed control characters and backticks and bounded its length, so a branch
//! name cannot inject Markdown, HTML, mentions or links into the comment.

use super::{AccessChange, Change, CredentialChange, Examples, Origin, PolicyDiff};
use crate::oidc::Platform;
use std::fmt::Write;

/// Examples shown per list in Markdown (the JSON carries up to `MAX_EXAMPLES`).
const SHOWN: usize = 10;
/// Longest value printed in a code span.
const MAX_VALUE: usize = 80;

/// Claims shown for a claim set, per platform: the ones reviewers recognise a job by.
fn key_claims(p: Platform) -> &'static [&'static str] {
    match p {
        Platform::Github => &[
            "repository",
            "repository_id",
            "ref",
            "event_name",
            "environment",
            "head_ref",
            "repository_fork",
        ],
        Platform::Gitlab => &[
            "project_path",
            "project_id",
            "ref",
            "pipeline_source",
            "environment",
            "ref_protected",
        ],
    }
}

/// A value as a safe inline code span.
fn code(s: &str) -> String {
    let mut clean: String = s
        .chars()
        .filter(|c| !c.is_control())
        .map(|c| if c == '`' { '\'' } else { c })
        .collect();
    if clean.chars().count() > MAX_VALUE {
        clean = clean.chars().take(MAX_VALUE).collect::<String>() + "…";
    }
    if clean.is_empty() {
        "` `".to_owned()
    } else {
        format!("`{clean}`")
    }
}

/// Free text built from policy content (lint messages name claims the rule reads, which a
/// rule may spell with any characters): no control characters, code spans or HTML.
fn plain(s: &str) -> String {
    s.chars()
        .filter(|c| !c.is_control())
        .map(|c| match c {
            '`' => '\'',
            '<' => '‹',
            '>' => '›',
            c => c,
        })
        .collect()
}

/// Table cell text: no line breaks or pipes.
fn cell(s: &str) -> String {
    s.replace(['\n', '\r'], " ").replace('|', "\\|")
}

fn short(digest: &str) -> &str {
    digest.get(..12).unwrap_or(digest)
}

fn claims_line(c: &AccessChange) -> String {
    let mut parts = Vec::new();
    for k in key_claims(c.sample.platform) {
        let Some(v) = c.sample.claims.get(*k) else {
            continue;
        };
        let v = match v {
            serde_json::Value::String(s) if s.is_empty() => continue,
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        parts.push(format!("{k}={}", code(&v)));
    }
    parts.join(" ")
}

fn source_line(c: &AccessChange) -> String {
    let from = match &c.sample.origin {
        Origin::Test { name } => format!("test {}", code(name)),
        Origin::Audit { repository } => format!("audit log ({})", code(repository)),
    };
    if c.sample.variation.is_empty() {
        from
    } else {
        let v: Vec<String> = c.sample.variation.iter().map(|v| code(v)).collect();
        format!("{from} with {}", v.join(", "))
    }
}

fn examples(out: &mut String, title: &str, ex: &Examples, ttl: bool) {
    if ex.is_empty() {
        return;
    }
    let _ = writeln!(out, "\n**{title}**: {} claim set(s)", ex.total);
    let _ = writeln!(out);
    if ttl {
        let _ = writeln!(out, "| claim set | key claims | base TTL | head TTL |");
    } else {
        let _ = writeln!(out, "| claim set | key claims | base | head |");
    }
    let _ = writeln!(out, "|---|---|---|---|");
    // Variations of different seeds often land on the same key claims: show each once.
    let mut seen = std::collections::HashSet::new();
    let mut shown = 0;
    for c in &ex.examples {
        if shown == SHOWN {
            break;
        }
        let (b, h) = if ttl {
            let t =
                |d: Option<time::Duration>| d.map(crate::time::format_duration).unwrap_or_default();
            (t(c.base_ttl), t(c.head_ttl))
        } else {
            (c.base.clone(), c.head.clone())
        };
        let claims = claims_line(c);
        if !seen.insert((claims.clone(), b.clone(), h.clone())) {
            continue;
        }
        shown += 1;
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} |",
            cell(&source_line(c)),
            cell(&claims),
            cell(&b),
            cell(&h)
        );
    }
    if ex.total > shown {
        let _ = writeln!(
            out,
            "\n{} more, or alike in the claims shown (see `--format json`).",
            ex.total - shown
        );
    }
}

fn credential(out: &mut String, c: &CredentialChange) {
    let verdict = match (c.widened, c.narrowed) {
        (true, true) => "access **widened** and narrowed",
        (true, false) => "access **widened**",
        (false, true) => "access narrowed",
        (false, false) => "no change in access found",
    };
    let _ = writeln!(
        out,
        "\n### Credential `{}` ({}, {}): {verdict}",
        c.name,
        c.kind,
        c.change.as_str()
    );
    if !c.definition.is_empty() {
        let _ = writeln!(out, "\n| field | base | head | |");
        let _ = writeln!(out, "|---|---|---|---|");
        for f in &c.definition {
            let v = |x: &Option<String>| x.as_deref().map(code).unwrap_or_else(|| "–".into());
            let mark = if f.widens { "widens" } else { "" };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {mark} |",
                cell(&f.field),
                cell(&v(&f.base)),
                cell(&v(&f.head))
            );
        }
    }
    if !c.rules.is_empty() {
        let names: Vec<String> = c.rules.iter().map(|r| format!("`{r}`")).collect();
        let _ = writeln!(out, "\nRules changed: {}", names.join(", "));
    }
    examples(out, "Now allowed, denied before", &c.newly_allowed, false);
    examples(out, "Now denied, allowed before", &c.newly_denied, false);
    examples(out, "Longer TTL ceiling", &c.longer_ttl, true);
    examples(out, "Shorter TTL ceiling", &c.shorter_ttl, true);
}

/// Render for a pull-request comment.
pub fn render_markdown(d: &PolicyDiff) -> String {
    let mut out = String::new();
    let verdict = if d.widened {
        "access **widened**: needs a security review"
    } else if d.narrowed {
        "access narrowed only"
    } else if d.is_empty() {
        "no change"
    } else {
        "no change in access found"
    };
    let _ = writeln!(out, "## Policy diff: {verdict}");
    let _ = writeln!(
        out,
        "\nBase `{}` → head `{}`. {} claim sets evaluated ({} from test cases, {} from the audit \
         log, the rest generated variations).",
        short(&d.base_digest),
        short(&d.head_digest),
        d.corpus.claim_sets,
        d.corpus.test_seeds,
        d.corpus.audit_seeds
    );
    for c in &d.credentials {
        credential(&mut out, c);
    }
    if !d.rules.is_empty() {
        let _ = writeln!(out, "\n### Rules\n");
        let _ = writeln!(out, "| rule | change | issuer | effect | at | fields |");
        let _ = writeln!(out, "|---|---|---|---|---|---|");
        for r in &d.rules {
            let fields: Vec<&str> = r.fields.iter().map(|f| f.field.as_str()).collect();
            let _ = writeln!(
                out,
                "| `{}` | {} | {} | {} | {} | {} |",
                r.name,
                r.change.as_str(),
                code(&r.issuer),
                r.effect,
                code(&r.location),
                fields.join(", ")
            );
        }
        for r in d.rules.iter().filter(|r| r.change == Change::Changed) {
            for f in r.fields.iter().filter(|f| f.field == "when") {
                let _ = writeln!(out, "\n`{}` when:\n\n```diff", r.name);
                for (sign, v) in [("-", &f.base), ("+", &f.head)] {
                    for line in v.as_deref().unwrap_or("").lines() {
                        let _ = writeln!(out, "{sign} {}", line.replace("```", "'''"));
                    }
                }
                let _ = writeln!(out, "```");
            }
        }
        let unexercised: Vec<String> = d
            .rules
            .iter()
            .filter(|r| r.unexercised)
            .map(|r| format!("`{}`", r.name))
            .collect();
        if !unexercised.is_empty() {
            let _ = writeln!(
                out,
                "\nNo evaluated claim set is decided differently by {}: add a test case that \
                 reaches the change.",
                unexercised.join(", ")
            );
        }
    }
    if !d.new_lint_findings.is_empty() {
        let _ = writeln!(out, "\n### New lint findings\n");
        for f in &d.new_lint_findings {
            let _ = writeln!(
                out,
                "- {} `{}` rule `{}`: {}",
                code(&f.location),
                f.code,
                f.rule,
                plain(&f.message)
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_cannot_break_out_of_code_spans() {
        assert_eq!(code("a`b\n<img>"), "`a'b<img>`");
        assert_eq!(code(""), "` `");
        assert!(code(&"x".repeat(200)).ends_with("…`"));
        assert_eq!(cell("a|b\nc"), "a\\|b c");
        assert_eq!(plain("claims.`x`<b>\n"), "claims.'x'‹b›");
    }
}

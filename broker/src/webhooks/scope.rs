//! Which repositories (GitHub) or projects (GitLab) one webhook secret may speak for.
//!
//! A webhook secret is shared with whoever configures the webhook on the CI platform: an
//! organisation's owners, a group's maintainers. Without a scope, the holder of any configured
//! secret could sign a delivery naming another organisation's repository id and end its jobs.
//! Each secret therefore carries a required `scope`, and a delivery is acted on only when both
//! the repository it names and every grant it would revoke (the repository from the grant's
//! verified job token) fall inside the scope of the secret that verified it.
//!
//! Patterns (compared without regard to ASCII case, as both platforms treat paths):
//!
//! | platform | pattern | matches |
//! |---|---|---|
//! | both | `*` | any repository / project (the behaviour before scopes; explicit only) |
//! | GitHub | `owner/*` | every repository of `owner` |
//! | GitHub | `owner/repo` | that repository |
//! | GitLab | `group/*`, `group/sub/*` | every project below that group, at any depth |
//! | GitLab | `group/project`, `group/sub/project` | that project |
//!
//! No other wildcard exists: `*` stands alone or as the whole last segment.

use crate::oidc::Platform;

/// One parsed pattern; paths are kept in ASCII lower case.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pattern {
    Any,
    /// `prefix/*`: `prefix` with its trailing `/`.
    Below(String),
    Exact(String),
}

/// The parsed `scope` of one secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    platform: Platform,
    patterns: Vec<Pattern>,
}

/// A path segment as both platforms allow them: letters, digits, `-`, `_`, `.`, not `.`/`..`.
fn segment_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 100
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// The segments of a repository or project path, lower-cased, if it is well formed.
fn segments(path: &str) -> Option<Vec<String>> {
    if path.len() > 1024 {
        return None;
    }
    let segs: Vec<String> = path.split('/').map(str::to_ascii_lowercase).collect();
    segs.iter().all(|s| segment_ok(s)).then_some(segs)
}

impl Scope {
    /// Parse a configured list. Each problem names the entry; nothing here is secret.
    pub fn parse(entries: &[String], platform: Platform) -> Result<Scope, Vec<String>> {
        let mut problems = Vec::new();
        let mut patterns = Vec::new();
        if entries.is_empty() {
            problems.push("must list at least one pattern (\"*\" for any repository)".into());
        }
        let form = match platform {
            Platform::Github => "\"*\", \"owner/*\" or \"owner/repo\"",
            Platform::Gitlab => "\"*\", \"group/*\" or \"group/project\" (subgroups allowed)",
        };
        for (i, e) in entries.iter().enumerate() {
            let e = e.trim();
            if e == "*" {
                patterns.push(Pattern::Any);
                continue;
            }
            let (body, below) = match e.strip_suffix("/*") {
                Some(b) => (b, true),
                None => (e, false),
            };
            let ok = segments(body).is_some_and(|segs| match (platform, below) {
                (Platform::Github, true) => segs.len() == 1,
                (Platform::Github, false) => segs.len() == 2,
                (Platform::Gitlab, true) => !segs.is_empty(),
                (Platform::Gitlab, false) => segs.len() >= 2,
            });
            if !ok {
                problems.push(format!(
                    "[{i}] {:?}: expected {form}",
                    e.chars().take(80).collect::<String>()
                ));
                continue;
            }
            let body = body.to_ascii_lowercase();
            patterns.push(if below {
                Pattern::Below(format!("{body}/"))
            } else {
                Pattern::Exact(body)
            });
        }
        if problems.is_empty() {
            Ok(Scope { platform, patterns })
        } else {
            Err(problems)
        }
    }

    /// Whether `path` (`owner/repo`, `group/sub/project`) is inside the scope. A malformed
    /// path is never inside, not even of `*`.
    pub fn allows(&self, path: &str) -> bool {
        let Some(segs) = segments(path) else {
            return false;
        };
        let shaped = match self.platform {
            Platform::Github => segs.len() == 2,
            Platform::Gitlab => segs.len() >= 2,
        };
        if !shaped {
            return false;
        }
        let path = segs.join("/");
        self.patterns.iter().any(|p| match p {
            Pattern::Any => true,
            Pattern::Exact(x) => *x == path,
            Pattern::Below(prefix) => path.len() > prefix.len() && path.starts_with(prefix),
        })
    }

    /// Whether `path` (the name a delivery or a grant gives, if any) is inside the scope: a
    /// missing name is inside only `*`, which allows any repository anyway.
    pub fn allows_named(&self, path: Option<&str>) -> bool {
        match path {
            Some(p) => self.allows(p),
            None => self.patterns.contains(&Pattern::Any),
        }
    }

    /// The patterns as configured (lower-cased), for logs and the audit detail.
    pub fn describe(&self) -> String {
        let p: Vec<String> = self
            .patterns
            .iter()
            .map(|p| match p {
                Pattern::Any => "*".to_owned(),
                Pattern::Below(prefix) => format!("{prefix}*"),
                Pattern::Exact(x) => x.clone(),
            })
            .collect();
        format!("[{}]", p.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope(p: Platform, entries: &[&str]) -> Scope {
        Scope::parse(
            &entries.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>(),
            p,
        )
        .unwrap()
    }

    #[test]
    fn github_patterns() {
        let s = scope(Platform::Github, &["acme/*", "Other/App"]);
        for yes in ["acme/api", "ACME/Web.site", "other/app", "OTHER/APP"] {
            assert!(s.allows(yes), "{yes}");
        }
        for no in [
            "other/app2",
            "acme",
            "acme/",
            "acmeco/api",
            "acme/api/x",
            "acme/..",
            "evil/acme/api",
            "",
            "acme/a b",
        ] {
            assert!(!s.allows(no), "{no}");
        }
        let any = scope(Platform::Github, &["*"]);
        assert!(any.allows("anyone/anything"));
        assert!(!any.allows("not a path"));
        assert!(any.allows_named(None) && !s.allows_named(None));
        assert!(s.allows_named(Some("acme/api")));
        assert_eq!(s.describe(), "[acme/*, other/app]");
    }

    #[test]
    fn gitlab_patterns() {
        let s = scope(
            Platform::Gitlab,
            &["acme/*", "ops/infra/deploy", "eng/team-a/*"],
        );
        for yes in [
            "acme/api",
            "acme/sub/deep/project",
            "ops/infra/deploy",
            "eng/team-a/svc",
        ] {
            assert!(s.allows(yes), "{yes}");
        }
        for no in [
            "acme",
            "ops/infra",
            "ops/infra/deploy2",
            "eng/team-b/svc",
            "eng/team-a",
            "acme/../ops/x",
        ] {
            assert!(!s.allows(no), "{no}");
        }
    }

    #[test]
    fn bad_patterns_are_named() {
        let bad = |p, e: &[&str]| {
            Scope::parse(&e.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>(), p).unwrap_err()
        };
        assert_eq!(bad(Platform::Github, &[]).len(), 1);
        let p = bad(
            Platform::Github,
            &[
                "acme",
                "acme/*/x",
                "a*/b",
                "acme/api/*",
                "/x",
                "**",
                "acme/api",
                "x/**",
            ],
        );
        assert_eq!(p.len(), 7, "{p:?}");
        assert!(p[0].starts_with("[0] \"acme\": expected"), "{p:?}");
        let p = bad(Platform::Gitlab, &["acme", "*/x", "g/p/"]);
        assert_eq!(p.len(), 3, "{p:?}");
        assert!(Scope::parse(&["g/sub/*".into(), "*".into()], Platform::Gitlab).is_ok());
    }
}

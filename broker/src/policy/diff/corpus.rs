//! The corpus a policy diff evaluates: concrete claim sets ("samples") that both bundles are
//! asked about.
//!
//! Seeds are the test cases of both bundles and, optionally, jobs recorded in a broker's audit
//! log. Each seed is then varied one aspect at a time, the way an attacker or a careless rule
//! would: another branch or a tag, another event (`pull_request_target` included), another
//! environment, a fork, a look-alike repository name or a re-created repository id, and the
//! literal values and prefixes the rules of either bundle compare claims with. A variation
//! keeps the claims that belong together consistent (`ref` with `ref_type` and `sub`).
//!
//! The corpus is a search, not a proof: a change that no sample reaches is not reported as an
//! access change (the rule and definition diffs still show it).

use super::super::Bundle;
use crate::audit::JobAttribution;
use crate::oidc::Platform;
use serde::Serialize;
use serde_json::{Map, Value};
use std::borrow::Cow;
use std::collections::{BTreeSet, HashSet};

/// Upper bound on samples, so a large audit log cannot make a diff run for ever.
pub const MAX_SAMPLES: usize = 50_000;

/// Where a sample came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "source", rename_all = "snake_case")]
pub enum Origin {
    /// A test case of the base or head bundle.
    Test { name: String },
    /// A job recorded in the audit log.
    Audit { repository: String },
}

/// One claim set, as an issuer would present it.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub issuer: String,
    pub platform: Platform,
    pub origin: Origin,
    /// What was changed from the seed, e.g. `ref=refs/heads/dev`; empty for the seed itself.
    pub variation: Vec<String>,
    pub claims: Map<String, Value>,
}

/// A seed before variation.
#[derive(Debug, Clone)]
pub struct Seed {
    pub issuer: String,
    pub platform: Platform,
    pub origin: Origin,
    pub claims: Map<String, Value>,
}

/// Seeds from the test cases of both bundles (base first), duplicates of the same claims
/// dropped.
pub fn test_seeds(base: &Bundle, head: &Bundle) -> Vec<Seed> {
    let mut seen = HashSet::new();
    base.tests()
        .iter()
        .chain(head.tests())
        .filter(|t| {
            seen.insert(format!(
                "{}\u{0}{}",
                t.issuer,
                Value::Object(t.claims.clone())
            ))
        })
        .map(|t| Seed {
            issuer: t.issuer.clone(),
            platform: t.platform,
            origin: Origin::Test {
                name: t.name.clone(),
            },
            claims: t.claims.clone(),
        })
        .collect()
}

/// A seed rebuilt from an audit record's job attribution: the audit log keeps the claims that
/// identify the job (repository, ids, ref, event, environment), under platform-neutral names
/// that are mapped back here. Records without issuer or platform are skipped.
pub fn audit_seed(job: &JobAttribution) -> Option<Seed> {
    let issuer = job.issuer.clone()?;
    let platform = match job.platform.as_deref()? {
        "github" => Platform::Github,
        "gitlab" => Platform::Gitlab,
        _ => return None,
    };
    let (repo, repo_id, owner, owner_id, event, workflow) = match platform {
        Platform::Github => (
            "repository",
            "repository_id",
            "repository_owner",
            "repository_owner_id",
            "event_name",
            "workflow",
        ),
        Platform::Gitlab => (
            "project_path",
            "project_id",
            "namespace_path",
            "namespace_id",
            "pipeline_source",
            "ci_config_ref_uri",
        ),
    };
    let mut claims = Map::new();
    let mut put = |k: &str, v: &Option<String>| {
        if let Some(v) = v {
            claims.insert(k.to_owned(), Value::String(v.clone()));
        }
    };
    put("iss", &job.iss);
    put("sub", &job.sub);
    put(repo, &job.repository);
    put(repo_id, &job.repository_id);
    put(owner, &job.owner);
    put(owner_id, &job.owner_id);
    put("ref", &job.git_ref);
    put("sha", &job.sha);
    put(workflow, &job.workflow);
    if platform == Platform::Github {
        put("job_workflow_ref", &job.job_workflow_ref);
    }
    put(event, &job.event);
    put("environment", &job.environment);
    put("runner_environment", &job.runner_environment);
    if let Some(r) = &job.git_ref {
        let tag = r.starts_with("refs/tags/");
        let kind = if tag { "tag" } else { "branch" };
        claims.insert("ref_type".to_owned(), Value::String(kind.to_owned()));
    }
    Some(Seed {
        issuer,
        platform,
        origin: Origin::Audit {
            repository: job.repository.clone().unwrap_or_default(),
        },
        claims,
    })
}

/// Values the rules of either bundle compare claims with, per claim they read: equality and
/// membership literals are tried on every claim the same rule reads; prefixes, suffixes and
/// substrings are extended into a value they admit.
#[derive(Debug, Default)]
struct RuleValues {
    /// (claim, value)
    values: BTreeSet<(String, String)>,
}

impl RuleValues {
    fn from_bundles(bundles: [&Bundle; 2]) -> Self {
        let mut values = BTreeSet::new();
        for b in bundles {
            for r in b.rules() {
                let e = r.expr();
                for claim in e.claims() {
                    for lit in e.positive_literals() {
                        values.insert((claim.clone(), lit.clone()));
                    }
                }
                for p in e.patterns() {
                    let Some(pat) = &p.pattern else { continue };
                    let v = match p.function.as_str() {
                        "startsWith" => format!("{pat}x"),
                        "endsWith" => format!("x{pat}"),
                        "contains" => format!("x{pat}x"),
                        // A regex is not a value; its literal prefix often is a useful one.
                        _ => pat
                            .trim_start_matches('^')
                            .split(['[', '(', '.', '*', '+', '?', '$', '\\', '{', '|'])
                            .next()
                            .unwrap_or("")
                            .to_owned(),
                    };
                    if !v.is_empty() {
                        values.insert((p.claim.clone(), v));
                    }
                }
            }
        }
        Self { values }
    }
}

const GITHUB_REFS: [&str; 4] = [
    "refs/heads/main",
    "refs/heads/feature/x",
    "refs/heads/release/1.0",
    "refs/tags/v1.2.3",
];
const GITLAB_REFS: [&str; 3] = ["main", "feature/x", "v1.2.3"];
const GITHUB_EVENTS: [&str; 6] = [
    "push",
    "pull_request",
    "pull_request_target",
    "workflow_dispatch",
    "schedule",
    "release",
];
const GITLAB_SOURCES: [&str; 5] = ["push", "merge_request_event", "web", "schedule", "trigger"];
const ENVIRONMENTS: [&str; 3] = ["production", "staging", "development"];

/// One change to a seed: claim → new value (`None` removes the claim).
type Edit = Vec<(Cow<'static, str>, Option<String>)>;

fn s(v: &str) -> Option<String> {
    Some(v.to_owned())
}

fn str_claim<'a>(c: &'a Map<String, Value>, k: &str) -> Option<&'a str> {
    c.get(k).and_then(Value::as_str)
}

/// Set `ref` and the claims that follow it (`ref_type`, `ref_path`, `sub`).
fn ref_edit(platform: Platform, claims: &Map<String, Value>, new_ref: &str) -> Edit {
    let tag = match platform {
        Platform::Github => new_ref.starts_with("refs/tags/"),
        Platform::Gitlab => new_ref
            .strip_prefix('v')
            .is_some_and(|r| r.starts_with(|c: char| c.is_ascii_digit())),
    };
    let mut e: Edit = vec![
        ("ref".into(), s(new_ref)),
        ("ref_type".into(), s(if tag { "tag" } else { "branch" })),
    ];
    if platform == Platform::Gitlab && claims.contains_key("ref_path") {
        let kind = if tag { "tags" } else { "heads" };
        e.push(("ref_path".into(), Some(format!("refs/{kind}/{new_ref}"))));
    }
    if let (Some(sub), Some(old)) = (str_claim(claims, "sub"), str_claim(claims, "ref"))
        && !old.is_empty()
        && sub.contains(old)
    {
        e.push(("sub".into(), Some(sub.replace(old, new_ref))));
    }
    e
}

fn edits(seed: &Seed, rule_values: &RuleValues) -> Vec<Edit> {
    let c = &seed.claims;
    let mut out: Vec<Edit> = Vec::new();
    match seed.platform {
        Platform::Github => {
            for r in GITHUB_REFS {
                out.push(ref_edit(seed.platform, c, r));
            }
            for ev in GITHUB_EVENTS {
                out.push(vec![("event_name".into(), s(ev))]);
            }
            // A pull request from a fork: head_ref set, the fork flag a forwarding layer adds.
            out.push(vec![
                ("event_name".into(), s("pull_request")),
                ("head_ref".into(), s("feature/x")),
                ("ref".into(), s("refs/pull/1/merge")),
            ]);
            out.push(vec![("repository_fork".into(), s("true"))]);
            if let Some(repo) = str_claim(c, "repository") {
                out.push(vec![("repository".into(), Some(format!("{repo}-evil")))]);
                if let Some((owner, name)) = repo.split_once('/') {
                    out.push(vec![
                        ("repository".into(), Some(format!("{owner}-evil/{name}"))),
                        ("repository_owner".into(), Some(format!("{owner}-evil"))),
                    ]);
                }
            }
            out.push(vec![("repository_id".into(), s("999999999"))]);
            out.push(vec![("repository_owner_id".into(), s("999999999"))]);
            out.push(vec![("ref_protected".into(), s("false"))]);
        }
        Platform::Gitlab => {
            for r in GITLAB_REFS {
                out.push(ref_edit(seed.platform, c, r));
            }
            for src in GITLAB_SOURCES {
                out.push(vec![("pipeline_source".into(), s(src))]);
            }
            if let Some(path) = str_claim(c, "project_path") {
                out.push(vec![("project_path".into(), Some(format!("{path}-evil")))]);
                if let Some((ns, name)) = path.split_once('/') {
                    out.push(vec![
                        ("project_path".into(), Some(format!("{ns}-evil/{name}"))),
                        ("namespace_path".into(), Some(format!("{ns}-evil"))),
                    ]);
                }
            }
            out.push(vec![("project_id".into(), s("999999999"))]);
            out.push(vec![("namespace_id".into(), s("999999999"))]);
            out.push(vec![("ref_protected".into(), s("false"))]);
        }
    }
    for env in ENVIRONMENTS {
        out.push(vec![("environment".into(), s(env))]);
    }
    out.push(vec![("environment".into(), None)]);
    for (claim, value) in &rule_values.values {
        // Identity claims only vary through the look-alikes above: a rule's own repository id
        // put into another seed says nothing new.
        if claim == "ref" {
            out.push(ref_edit(seed.platform, c, value));
            continue;
        }
        match c.get(claim.as_str()) {
            Some(Value::String(_)) | None => {}
            // Booleans and numbers are compared through string() in policies; keep them.
            Some(_) => continue,
        }
        out.push(vec![(Cow::Owned(claim.clone()), Some(value.clone()))]);
    }
    out
}

fn apply(seed: &Seed, edit: &Edit) -> Option<Sample> {
    let mut claims = seed.claims.clone();
    let mut variation = Vec::new();
    for (k, v) in edit {
        let old = claims.get(&**k);
        match v {
            Some(v) => {
                if old.and_then(Value::as_str) == Some(v.as_str()) {
                    continue;
                }
                variation.push(format!("{k}={v}"));
                claims.insert(k.to_string(), Value::String(v.clone()));
            }
            None => {
                if old.is_none() {
                    continue;
                }
                variation.push(format!("-{k}"));
                claims.remove(&**k);
            }
        }
    }
    // `sub` follows other claims; an edit that only moved it is no variation of its own.
    if variation.iter().all(|v| v.starts_with("sub=")) {
        return None;
    }
    variation.retain(|v| !v.starts_with("sub="));
    Some(Sample {
        issuer: seed.issuer.clone(),
        platform: seed.platform,
        origin: seed.origin.clone(),
        variation,
        claims,
    })
}

/// Seeds and their variations, deduplicated by (issuer, claims); at most [`MAX_SAMPLES`].
pub fn build(base: &Bundle, head: &Bundle, seeds: &[Seed]) -> Vec<Sample> {
    let rule_values = RuleValues::from_bundles([base, head]);
    let mut seen: HashSet<String> = HashSet::new();
    let mut out = Vec::new();
    let mut push = |sample: Sample, out: &mut Vec<Sample>| {
        if out.len() >= MAX_SAMPLES {
            return;
        }
        let key = format!(
            "{}\u{0}{}",
            sample.issuer,
            Value::Object(sample.claims.clone())
        );
        if seen.insert(key) {
            out.push(sample);
        }
    };
    // Every seed first, so a seed is never reported as some other seed's variation.
    for seed in seeds {
        let sample = Sample {
            issuer: seed.issuer.clone(),
            platform: seed.platform,
            origin: seed.origin.clone(),
            variation: Vec::new(),
            claims: seed.claims.clone(),
        };
        push(sample, &mut out);
    }
    for seed in seeds {
        for edit in edits(seed, &rule_values) {
            if let Some(sample) = apply(seed, &edit) {
                push(sample, &mut out);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::LoadOptions;

    const POLICY: &str = r#"credentials:
  - name: c
    max_ttl: 5m
    api_token: { audience: x }
rules:
  - name: r
    issuer: github
    credentials: [c]
    when: claims.ref.startsWith("refs/heads/rel-") || claims.environment == "prod-eu"
tests:
  - name: main
    issuer: github
    claims: { ref: refs/heads/main, sub: "repo:acme/api:ref:refs/heads/main", repository: acme/api }
    expect: { deny: [c] }
"#;

    #[test]
    fn variations_cover_fixed_aspects_and_rule_values() {
        let b = Bundle::load_files(&[("p.yaml".into(), POLICY.into())], &LoadOptions::default())
            .unwrap();
        let samples = build(&b, &b, &test_seeds(&b, &b));
        // The same test in both bundles is one seed.
        assert_eq!(samples.iter().filter(|s| s.variation.is_empty()).count(), 1);
        let find = |v: &str| samples.iter().find(|s| s.variation.iter().any(|x| x == v));
        let tag = find("ref=refs/tags/v1.2.3").unwrap();
        assert_eq!(tag.claims["ref_type"], "tag");
        assert_eq!(tag.claims["sub"], "repo:acme/api:ref:refs/tags/v1.2.3");
        assert!(find("event_name=pull_request_target").is_some());
        assert!(find("repository=acme/api-evil").is_some());
        assert!(find("repository_fork=true").is_some());
        assert!(find("ref=refs/heads/rel-x").is_some(), "prefix of the rule");
        assert!(find("environment=prod-eu").is_some(), "literal of the rule");
        let keys: HashSet<String> = samples
            .iter()
            .map(|s| Value::Object(s.claims.clone()).to_string())
            .collect();
        assert_eq!(keys.len(), samples.len(), "no duplicate claim sets");
    }

    #[test]
    fn audit_records_become_seeds() {
        let job = JobAttribution {
            issuer: Some("gitlab".into()),
            platform: Some("gitlab".into()),
            repository: Some("acme/web".into()),
            repository_id: Some("7".into()),
            git_ref: Some("main".into()),
            event: Some("push".into()),
            ..Default::default()
        };
        let seed = audit_seed(&job).unwrap();
        assert_eq!(seed.claims["project_path"], "acme/web");
        assert_eq!(seed.claims["project_id"], "7");
        assert_eq!(seed.claims["pipeline_source"], "push");
        assert_eq!(seed.claims["ref_type"], "branch");
        assert!(audit_seed(&JobAttribution::default()).is_none());
    }
}

//! Known bundle pairs under `broker/tests/fixtures/policy-diff/<case>/{base,head}` and the
//! report and exit code each must produce.

use super::*;
use crate::policy::LoadOptions;
use std::path::PathBuf;

fn fixture(case: &str) -> PolicyDiff {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/policy-diff");
    let load = |side: &str| {
        Bundle::load_dir(&dir.join(case).join(side), &LoadOptions::default())
            .unwrap_or_else(|e| panic!("{case}/{side}: {e}"))
    };
    diff(&load("base"), &load("head"), &[])
}

fn credential<'a>(d: &'a PolicyDiff, name: &str) -> &'a CredentialChange {
    d.credentials
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no change for {name}"))
}

#[test]
fn rule_widened_to_another_branch() {
    let d = fixture("branch-widened");
    assert_eq!(d.exit_code(), EXIT_WIDENED);
    let c = credential(&d, "deploy-api");
    assert!(c.widened && !c.narrowed);
    assert!(c.definition.is_empty());
    assert_eq!(c.rules, ["main-deploy"]);
    let refs: Vec<&str> = c
        .newly_allowed
        .examples
        .iter()
        .map(|e| e.sample.claims["ref"].as_str().unwrap())
        .collect();
    assert!(refs.contains(&"refs/heads/release/1.0"), "{refs:?}");
    assert!(
        refs.iter().all(|r| r.starts_with("refs/heads/release/")),
        "{refs:?}"
    );
    assert!(
        c.newly_allowed
            .examples
            .iter()
            .all(|e| e.head == "allow (rule main-deploy)")
    );
    assert_eq!(d.rules.len(), 1);
    assert_eq!(d.rules[0].fields[0].field, "when");
    assert!(!d.rules[0].unexercised);
    let lint: Vec<&str> = d.new_lint_findings.iter().map(|f| f.code).collect();
    assert_eq!(lint, ["wildcard_pattern"]);
    insta::assert_snapshot!("branch_widened", render_markdown(&d));
}

#[test]
fn credential_ttl_raised() {
    let d = fixture("ttl-raised");
    assert_eq!(d.exit_code(), EXIT_WIDENED);
    let c = credential(&d, "deploy-api");
    assert_eq!(c.change, Change::Changed);
    assert_eq!(
        c.definition,
        [FieldChange {
            field: "max_ttl".into(),
            base: Some("15m".into()),
            head: Some("2h".into()),
            widens: true,
        }]
    );
    assert!(c.newly_allowed.is_empty() && c.newly_denied.is_empty());
    assert!(
        c.longer_ttl.total >= 1,
        "the main push now gets a longer ceiling"
    );
    assert!(d.rules.is_empty() && d.new_lint_findings.is_empty());
    insta::assert_snapshot!("ttl_raised", render_markdown(&d));
}

#[test]
fn deny_rule_removed() {
    let d = fixture("deny-removed");
    assert_eq!(d.exit_code(), EXIT_WIDENED);
    let c = credential(&d, "deploy-api");
    assert!(c.widened);
    let prt = c.newly_allowed.examples.iter().find(|e| {
        e.sample.variation == ["event_name=pull_request_target"]
            && e.sample.claims["ref"] == "refs/heads/main"
    });
    let prt = prt.expect("pull_request_target on main is newly allowed");
    assert_eq!(prt.base, "deny (rule deny-untrusted)");
    assert_eq!(prt.head, "allow (rule main-deploy)");
    assert_eq!(d.rules.len(), 1);
    assert_eq!(
        (d.rules[0].change, d.rules[0].effect),
        (Change::Removed, "deny")
    );
    insta::assert_snapshot!("deny_removed", render_markdown(&d));
}

#[test]
fn deny_rule_added_narrows_only() {
    let d = fixture("deny-added");
    assert_eq!(d.exit_code(), EXIT_NOT_WIDENED);
    assert!(d.narrowed && !d.widened);
    let c = credential(&d, "deploy-api");
    assert!(c.newly_allowed.is_empty());
    assert!(
        c.newly_denied
            .examples
            .iter()
            .all(|e| e.sample.claims["environment"] == "staging")
    );
    assert!(c.newly_denied.total >= 1);
    insta::assert_snapshot!("deny_added", render_markdown(&d));
}

#[test]
fn nothing_changed() {
    let d = fixture("unchanged");
    assert_eq!(d.exit_code(), EXIT_NOT_WIDENED);
    assert!(d.is_empty(), "{d:#?}");
    assert!(!d.widened && !d.narrowed);
    assert_ne!(d.base_digest, d.head_digest, "a comment changed the files");
    insta::assert_snapshot!("unchanged", render_markdown(&d));
}

#[test]
fn json_carries_the_claims_and_the_verdict() {
    let d = fixture("deny-removed");
    let v = serde_json::to_value(&d).unwrap();
    assert_eq!(v["widened"], true);
    let ex = &v["credentials"][0]["newly_allowed"];
    assert!(ex["total"].as_u64().unwrap() >= 1);
    let first = &ex["examples"][0];
    assert_eq!(first["issuer"], "github");
    assert_eq!(first["origin"]["source"], "test");
    assert!(first["claims"]["repository_id"].is_string());
    assert!(first["base"].as_str().unwrap().starts_with("deny"));
}

#[test]
fn audit_seeds_join_the_corpus() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/policy-diff");
    let load = |side: &str| {
        Bundle::load_dir(
            &dir.join("branch-widened").join(side),
            &LoadOptions::default(),
        )
        .unwrap()
    };
    // A real job of another repository id on a release branch: the rule now lets it in only
    // if it has the pinned id, so only the seed with that id is reported.
    let job = crate::audit::JobAttribution {
        issuer: Some("github".into()),
        platform: Some("github".into()),
        repository: Some("acme/api".into()),
        repository_id: Some("1000001".into()),
        git_ref: Some("refs/heads/release/7.1".into()),
        event: Some("push".into()),
        ..Default::default()
    };
    let seed = corpus::audit_seed(&job).unwrap();
    let d = diff(&load("base"), &load("head"), &[seed]);
    assert_eq!(d.corpus.audit_seeds, 1);
    let c = credential(&d, "deploy-api");
    assert!(c.newly_allowed.examples.iter().any(|e| {
        matches!(&e.sample.origin, Origin::Audit { repository } if repository == "acme/api")
            && e.sample.variation.is_empty()
            && e.sample.claims["ref"] == "refs/heads/release/7.1"
    }));
}

#[test]
fn kind_parameters_widen_when_added_or_changed_and_narrow_when_removed() {
    let policy = |scopes: &str, audience: &str| {
        format!(
            "credentials:\n  - name: c\n    max_ttl: 5m\n    api_token:\n      audience: {audience}\n      scopes: [{scopes}]\n"
        )
    };
    let load = |text: String| {
        Bundle::load_files(&[("p.yaml".into(), text)], &LoadOptions::default()).unwrap()
    };
    let base = load(policy("\"read\", \"write\"", "a"));
    let fields = |head: String| {
        let d = diff(&base, &load(head), &[]);
        (d.exit_code(), d.credentials[0].definition.clone())
    };
    let (code, f) = fields(policy("\"read\"", "a"));
    assert_eq!(code, EXIT_NOT_WIDENED);
    assert_eq!(
        (f[0].field.as_str(), f[0].widens),
        ("api_token.scopes", false)
    );
    let (code, f) = fields(policy("\"read\", \"write\", \"admin\"", "a"));
    assert_eq!(code, EXIT_WIDENED);
    assert_eq!(
        (f[0].field.as_str(), f[0].widens),
        ("api_token.scopes", true)
    );
    let (code, f) = fields(policy("\"read\", \"write\"", "b"));
    assert_eq!(code, EXIT_WIDENED);
    assert_eq!(f[0].field, "api_token.audience");
    assert_eq!(
        (f[0].base.as_deref(), f[0].head.as_deref()),
        (Some("a"), Some("b"))
    );
}

/// Speed of a diff of the shipped example policies against themselves (every claim set is
/// decided by both bundles). Prints figures; asserts nothing about time.
/// `cargo test -p broker --lib policy::diff::tests::bench -- --ignored --nocapture`
#[test]
#[ignore]
fn bench_diff_of_the_example_policies() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../policies");
    let b = Bundle::load_dir(&dir, &LoadOptions::default()).unwrap();
    let started = std::time::Instant::now();
    let rounds = 5;
    let mut sets = 0;
    for _ in 0..rounds {
        let d = diff(&b, &b, &[]);
        assert!(d.is_empty());
        sets = d.corpus.claim_sets;
    }
    let per = started.elapsed().as_secs_f64() / f64::from(rounds);
    eprintln!(
        "policy diff: {sets} claim sets x {} credentials x 2 bundles in {:.1} ms ({:.0} claim sets/s)",
        b.credentials().len(),
        per * 1000.0,
        sets as f64 / per
    );
}

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a failed expectation is a failed test
//! `broker policy diff` as CI runs it: the real binary, its exit codes (0 not widened, 10
//! widened, 2 error), git revisions of a policy directory, and jobs taken from a running
//! broker's audit log.

use broker::oidc::testkit::{self, TestIssuer, TestKey};
use broker::store::testdb::TestDb;
use integration::{
    BrokerProcess, BrokerSetup, acme_api_claims, broker_bin, github_issuer_yaml, repo_root,
};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::Command;

const AUD: &str = "https://broker.test";

fn fixtures() -> PathBuf {
    repo_root().join("broker/tests/fixtures/policy-diff")
}

fn run(cwd: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(broker_bin())
        .current_dir(cwd)
        .args(args)
        .output()
        .expect("run broker");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn diff_case(case: &str, format: &str) -> (i32, String, String) {
    let dir = fixtures().join(case);
    let (b, h) = (dir.join("base"), dir.join("head"));
    run(
        &repo_root(),
        &[
            "policy",
            "diff",
            b.to_str().unwrap(),
            h.to_str().unwrap(),
            "--format",
            format,
        ],
    )
}

#[test]
fn exit_codes_say_whether_access_widened() {
    for (case, want) in [
        ("branch-widened", 10),
        ("ttl-raised", 10),
        ("deny-removed", 10),
        ("deny-added", 0),
        ("unchanged", 0),
    ] {
        let (code, out, err) = diff_case(case, "markdown");
        assert_eq!(code, want, "{case}:\n{out}\n{err}");
        assert!(out.starts_with("## Policy diff: "), "{case}: {out}");
        let (code, out, _) = diff_case(case, "json");
        assert_eq!(code, want, "{case} (json)");
        let v: Value = serde_json::from_str(&out).expect("json output");
        assert_eq!(v["widened"], want == 10, "{case}");
    }
}

#[test]
fn errors_exit_2_and_never_look_like_no_change() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("p.yaml"), "rules: [\n").unwrap();
    let base = fixtures().join("unchanged/base");
    let (code, out, _) = run(
        &repo_root(),
        &[
            "policy",
            "diff",
            base.to_str().unwrap(),
            tmp.path().to_str().unwrap(),
        ],
    );
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("p.yaml:1:"), "{out}");
    let (code, _, err) = run(
        &repo_root(),
        &[
            "policy",
            "diff",
            base.to_str().unwrap(),
            "/nonexistent/policies",
        ],
    );
    assert_eq!(code, 2);
    assert!(
        err.contains("not a directory, and not a git revision"),
        "{err}"
    );
    let (code, _, _) = run(
        &repo_root(),
        &[
            "policy",
            "diff",
            base.to_str().unwrap(),
            base.to_str().unwrap(),
            "--format",
            "html",
        ],
    );
    assert_eq!(code, 2, "clap refuses an unknown format with 2 as well");
}

fn git(dir: &Path, args: &[&str]) {
    let st = Command::new("git")
        .current_dir(dir)
        .args(args)
        .env("GIT_AUTHOR_NAME", "t")
        .env("GIT_AUTHOR_EMAIL", "t@example.invalid")
        .env("GIT_COMMITTER_NAME", "t")
        .env("GIT_COMMITTER_EMAIL", "t@example.invalid")
        .status()
        .unwrap();
    assert!(st.success(), "git {args:?}");
}

#[test]
fn git_revisions_of_the_policy_directory() {
    let repo = tempfile::tempdir().unwrap();
    let r = repo.path();
    git(r, &["init", "-q"]);
    std::fs::create_dir(r.join("policies")).unwrap();
    let case = fixtures().join("branch-widened");
    std::fs::copy(
        case.join("base/policy.yaml"),
        r.join("policies/policy.yaml"),
    )
    .unwrap();
    git(r, &["add", "."]);
    git(r, &["commit", "-q", "-m", "base"]);
    std::fs::copy(
        case.join("head/policy.yaml"),
        r.join("policies/policy.yaml"),
    )
    .unwrap();
    git(r, &["commit", "-q", "-am", "head"]);

    let (code, out, err) = run(r, &["policy", "diff", "git:HEAD~1", "git:HEAD"]);
    assert_eq!(code, 10, "{out}\n{err}");
    assert!(out.contains("refs/heads/release/"), "{out}");
    // REV:PATH against the work tree gives the same report.
    let (code2, out2, _) = run(r, &["policy", "diff", "HEAD~1:policies", "policies"]);
    assert_eq!((code2, &out2), (10, &out));
    let (code, _, _) = run(r, &["policy", "diff", "git:HEAD", "policies"]);
    assert_eq!(code, 0);
    let (code, _, err) = run(r, &["policy", "diff", "--", "-x:policies", "policies"]);
    assert_eq!(code, 2, "{err}");
}

/// A job the broker saw (a release branch, refused by the base policy) is in the audit log; a
/// diff with `--audit-url` reports that real job as newly allowed by the head policy.
#[tokio::test]
async fn audit_log_jobs_join_the_corpus() {
    let db = TestDb::postgres().await;
    let issuer = TestIssuer::start().await;
    let operator_token = format!("brk_op_{}", broker::secret::random_token(32));
    let base = fixtures().join("branch-widened/base");
    let head = fixtures().join("branch-widened/head");
    let mut broker = BrokerProcess::start(&BrokerSetup {
        store_url: db.url(),
        policies_dir: &base,
        issuers_yaml: github_issuer_yaml(&issuer.url()),
        audience: AUD,
        extra_yaml: format!(
            "operators:\n  - name: reviewer\n    role: auditor\n    token_sha256: {}\n",
            broker::secret::sha256_hex(operator_token.as_bytes())
        ),
        env: Vec::new(),
    })
    .await
    .expect("broker starts");

    let mut claims = acme_api_claims(&issuer.url(), AUD);
    claims["ref"] = json!("refs/heads/release/9.9");
    claims["sub"] = json!("repo:acme/api:ref:refs/heads/release/9.9");
    let token = testkit::sign(TestKey::Rsa1, &claims);
    let r = reqwest::Client::new()
        .post(format!("{}/v1/exchange", broker.url))
        .bearer_auth(&token)
        .json(&json!({"credentials": ["deploy-api"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status().as_u16(),
        403,
        "the base policy refuses the release branch"
    );

    let tmp = tempfile::tempdir().unwrap();
    let token_file = tmp.path().join("auditor.token");
    std::fs::write(&token_file, &operator_token).unwrap();
    let url = broker.url.clone();
    let args: Vec<String> = [
        "policy",
        "diff",
        base.to_str().unwrap(),
        head.to_str().unwrap(),
        "--format",
        "json",
        "--audit-url",
        &url,
        "--auditor-token-file",
        token_file.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let out = tokio::task::spawn_blocking(move || {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        run(&repo_root(), &a)
    })
    .await
    .unwrap();
    let (code, stdout, stderr) = out;
    assert_eq!(code, 10, "{stdout}\n{stderr}");
    assert!(stderr.contains("1 distinct job(s)"), "{stderr}");
    let v: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["corpus"]["audit_seeds"], 1);
    let examples = v["credentials"][0]["newly_allowed"]["examples"]
        .as_array()
        .unwrap();
    let real = examples.iter().find(|e| e["origin"]["source"] == "audit");
    let real = real.unwrap_or_else(|| panic!("no audit sample in {stdout}"));
    assert_eq!(real["claims"]["ref"], "refs/heads/release/9.9");
    assert_eq!(real["origin"]["repository"], "acme/api");
    assert!(!stdout.contains(&operator_token) && !stderr.contains(&operator_token));

    // A wrong token is an error (2), not "no change".
    std::fs::write(&token_file, "brk_op_wrong").unwrap();
    let args = [
        "policy".to_owned(),
        "diff".to_owned(),
        base.to_str().unwrap().to_owned(),
        head.to_str().unwrap().to_owned(),
        "--audit-url".to_owned(),
        url.clone(),
        "--auditor-token-file".to_owned(),
        token_file.to_str().unwrap().to_owned(),
    ];
    let (code, _, stderr) = tokio::task::spawn_blocking(move || {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        run(&repo_root(), &a)
    })
    .await
    .unwrap();
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("401"), "{stderr}");

    broker.kill();
    issuer.shutdown().await;
    db.cleanup().await;
}

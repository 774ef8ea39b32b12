//! `broker policy diff` as CI runs it: the real binary, its exit codes (0 not widened, 10
//! widened, 2 error), git revisions of a policy directory, and jobs taken from a running
//! broker's audit log.

use broker::oidc::testkit::{self, TestIssuer, TestKey};
use broker::store::testdb::TestDb;
use integration::tools::gitlab_tools;
use integration::{
    AUD, BrokerProcess, BrokerSetup, acme_api_claims, broker_bin, broker_cli, github_issuer_yaml,
    repo_root,
};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::Command;

fn fixtures() -> PathBuf {
    repo_root().join("broker/tests/fixtures/policy-diff")
}

fn run(cwd: &Path, args: &[&str]) -> (i32, String, String) {
    let r = broker_cli(Some(cwd), args);
    (r.code, r.stdout, r.stderr)
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
    let mut broker = BrokerProcess::start(
        &BrokerSetup::new(db.url(), &base, github_issuer_yaml(&issuer.url())).extra(format!(
            "operators:\n  - name: reviewer\n    role: auditor\n    token_sha256: {}\n",
            broker::secret::sha256_hex(operator_token.as_bytes())
        )),
    )
    .await
    .expect("broker starts");

    let mut claims = acme_api_claims(&issuer.url(), AUD);
    claims["ref"] = json!("refs/heads/release/9.9");
    claims["sub"] = json!("repo:acme/api:ref:refs/heads/release/9.9");
    let token = testkit::sign(TestKey::Rsa1, &claims);
    let r = integration::http::client()
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

    // A wrong token is refused (3), never "no change".
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
    assert_eq!(code, 3, "{stderr}");
    assert!(stderr.contains("401"), "{stderr}");

    broker.kill();
    issuer.shutdown().await;
    db.cleanup().await;
}

type Notes = std::sync::Arc<std::sync::Mutex<Vec<(String, String, String)>>>;

/// Plays GitLab's notes API: records (path, PRIVATE-TOKEN, body) of every POST.
async fn notes_api() -> (String, Notes) {
    use axum::extract::{Form, State};
    use axum::http::{HeaderMap, StatusCode, Uri};
    let notes: Notes = Default::default();
    let app = axum::Router::new()
        .fallback(
            |State(n): State<Notes>,
             uri: Uri,
             headers: HeaderMap,
             Form(form): Form<std::collections::HashMap<String, String>>| async move {
                let token = headers
                    .get("private-token")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned();
                let body = form.get("body").cloned().unwrap_or_default();
                n.lock().unwrap().push((uri.path().to_owned(), token, body));
                (StatusCode::CREATED, "{}")
            },
        )
        .with_state(notes.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/api/v4", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, notes)
}

/// The shipped GitLab example (`examples/policy-repo/.gitlab-ci.yml`) run by gitlab-ci-local in
/// a merge request of a policy repository that widens a rule: check and test pass, the diff
/// against the target branch is posted as a note with the project token, and the job ends
/// "allowed to fail" with exit 10.
#[tokio::test]
async fn gitlab_example_posts_the_diff_as_a_merge_request_note() {
    let Some(tools) = gitlab_tools() else {
        println!(
            "SKIPPED: gitlab-ci-local not installed (scripts/test runs `npm ci` in action/tools)"
        );
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let origin = work.path().join("origin.git");
    let repo = work.path().join("repo");
    std::fs::create_dir_all(repo.join("policies")).unwrap();
    git(
        work.path(),
        &["init", "-q", "--bare", origin.to_str().unwrap()],
    );
    git(&repo, &["init", "-q", "-b", "main"]);
    let case = fixtures().join("branch-widened");
    std::fs::copy(
        case.join("base/policy.yaml"),
        repo.join("policies/policy.yaml"),
    )
    .unwrap();
    std::fs::copy(
        repo_root().join("examples/policy-repo/.gitlab-ci.yml"),
        repo.join(".gitlab-ci.yml"),
    )
    .unwrap();
    git(&repo, &["add", "."]);
    git(&repo, &["commit", "-q", "-m", "base"]);
    git(
        &repo,
        &["remote", "add", "origin", origin.to_str().unwrap()],
    );
    git(&repo, &["push", "-q", "origin", "main"]);
    git(&repo, &["checkout", "-q", "-b", "release-deploys"]);
    std::fs::copy(
        case.join("head/policy.yaml"),
        repo.join("policies/policy.yaml"),
    )
    .unwrap();
    git(
        &repo,
        &["commit", "-q", "-am", "deploy from release branches"],
    );

    let (api, notes) = notes_api().await;
    let bin_dir = broker_bin().parent().unwrap().to_path_buf();
    let path = format!(
        "{}:{}:{}",
        bin_dir.display(),
        tools.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut cmd = tokio::process::Command::new(tools.join("gitlab-ci-local"));
    cmd.current_dir(&repo)
        .env("PATH", path)
        .arg("--force-shell-executor");
    for v in [
        "CI_PIPELINE_SOURCE=merge_request_event".to_owned(),
        "CI_MERGE_REQUEST_TARGET_BRANCH_NAME=main".to_owned(),
        format!("CI_API_V4_URL={api}"),
        "CI_PROJECT_ID=42".to_owned(),
        "CI_MERGE_REQUEST_IID=7".to_owned(),
        "POLICY_REVIEW_TOKEN=glpat-test-only".to_owned(),
    ] {
        cmd.arg("--variable").arg(v);
    }
    cmd.arg("policy-review").kill_on_drop(true);
    let out = tokio::time::timeout(std::time::Duration::from_secs(300), cmd.output())
        .await
        .expect("gitlab-ci-local finishes")
        .expect("gitlab-ci-local runs");
    let log = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "exit 10 is an allowed failure: {log}"
    );
    assert!(
        log.contains("WARN 10"),
        "the job is marked as widened: {log}"
    );
    assert!(log.contains("test result: ok. 1 passed"), "{log}");
    let notes = notes.lock().unwrap().clone();
    assert_eq!(notes.len(), 1, "{log}");
    let (path, token, body) = &notes[0];
    assert_eq!(path, "/api/v4/projects/42/merge_requests/7/notes");
    assert_eq!(token, "glpat-test-only");
    assert!(
        body.starts_with("## Policy diff: access **widened**"),
        "{body}"
    );
    assert!(body.contains("`refs/heads/release/1.0`"), "{body}");
}

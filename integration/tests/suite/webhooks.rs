//! End to end for job-end webhooks, OIDC break-glass operators and the separate operator
//! listener: the real `broker` binary, a Postgres store, a local issuer, and a real Postgres
//! target whose job users must stop working when the job's `completed` delivery arrives.

use broker::oidc::testkit::{self, TestIssuer, TestKey};
use broker::store::AuditFilter;
use broker::store::testdb::TestDb;
use integration::http::{self, Api};
use integration::pg::{PgApp, login};
use integration::{
    AUD, BrokerProcess, BrokerSetup, acme_api_claims, broker_bin, example_issuers_yaml, free_port,
};
use serde_json::{Value, json};
use sqlx::Connection;

const GH_SECRET_OLD: &str = "gh-old-secret-0123456789";
const GH_SECRET: &str = "gh-new-secret-0123456789";
const GL_TOKEN: &str = "gl-hook-token-0123456789";

fn policy(owner: &str) -> String {
    format!(
        r#"credentials:
  - name: api
    max_ttl: 15m
    api_token: {{audience: https://deploy.example}}
  - name: pg-job
    max_ttl: 15m
    postgres: {{target: main, database: postgres, owner: {owner}}}
rules:
  - name: acme-api
    issuer: github
    credentials: [api, pg-job]
    when: claims.repository_id == "1000001"
  - name: acme-gitlab
    issuer: gitlab
    credentials: [api]
    when: claims.project_id == "2000001"
"#
    )
}

struct Env {
    pg: PgApp,
    github: TestIssuer,
    gitlab: TestIssuer,
    db: TestDb,
    broker: BrokerProcess,
    api: Api,
    admin_url: String,
    _policies: tempfile::TempDir,
}

/// A broker with both webhook endpoints, a Postgres target, an OIDC operator rule for the
/// `acme/security` repository's main branch, and the operator API on its own port.
async fn env() -> Env {
    let pg = PgApp::new("w", &[], &["owner"]).await;
    let db = TestDb::postgres().await;
    let github = TestIssuer::start().await;
    let gitlab = TestIssuer::start().await;
    let policies = tempfile::tempdir().unwrap();
    std::fs::write(policies.path().join("p.yaml"), policy(&pg.group("owner"))).unwrap();
    let admin_port = free_port();
    let extra = format!(
        "{target}admin_listen: 127.0.0.1:{admin_port}\n\
         webhooks:\n  github:\n    secrets: [{{value: {GH_SECRET_OLD}, scope: [\"acme/*\"]}}, \
         {{value: {GH_SECRET}, scope: [\"acme/*\"]}}]\n  \
         gitlab:\n    tokens: [{{value: {GL_TOKEN}, scope: [\"acme/api\"]}}]\n\
         operators:\n  - name: secjob\n    role: admin\n    oidc:\n      issuer: github\n      \
         rule: claims.repository == \"acme/security\" && claims.ref == \"refs/heads/main\"\n",
        target = pg.target_yaml(""),
    );
    let broker = BrokerProcess::start(
        &BrokerSetup::new(
            db.url(),
            policies.path(),
            example_issuers_yaml(&github.url(), &gitlab.url()),
        )
        .extra(extra),
    )
    .await
    .expect("broker starts");
    let api = Api::new(http::client(), &broker.url);
    Env {
        pg,
        github,
        gitlab,
        db,
        broker,
        api,
        admin_url: format!("http://127.0.0.1:{admin_port}"),
        _policies: policies,
    }
}

impl Env {
    /// A GitHub job token of `acme/api` run 77 attempt 1, job (check run) `check_run_id`.
    fn github_token(&self, check_run_id: u64) -> String {
        let mut c = acme_api_claims(&self.github.url(), AUD);
        c["check_run_id"] = json!(check_run_id.to_string());
        testkit::sign(TestKey::Rsa1, &c)
    }

    fn gitlab_token(&self, job_id: u64) -> String {
        let now = broker::time::Clock::now(&broker::time::SystemClock);
        let mut c = testkit::gitlab_claims(&self.gitlab.url(), AUD, now);
        c["project_id"] = json!("2000001");
        c["project_path"] = json!("acme/api");
        c["job_id"] = json!(job_id.to_string());
        testkit::sign(TestKey::Rsa1, &c)
    }

    async fn exchange(&self, token: &str, creds: &[&str]) -> Value {
        let (status, body) = self
            .api
            .exchange(Some(token), &json!({"credentials": creds, "ttl": "10m"}))
            .await;
        assert_eq!(status, 200, "{body}");
        body
    }

    async fn active(&self, api_token: &str) -> bool {
        self.api.active(api_token).await
    }

    async fn deliver(&self, path: &str, headers: &[(&str, String)], body: &[u8]) -> (u16, Value) {
        self.api.deliver(path, headers, body).await
    }

    async fn github_delivery(
        &self,
        id: &str,
        secret: &str,
        event: &str,
        body: &Value,
    ) -> (u16, Value) {
        let bytes = serde_json::to_vec(body).unwrap();
        self.api.github_delivery(id, secret, event, &bytes).await
    }

    async fn webhook_events(&self, reason: &str) -> Vec<broker::audit::AuditEvent> {
        self.db
            .store()
            .audit_events(&AuditFilter {
                reason: Some(reason.into()),
                ..AuditFilter::default()
            })
            .await
            .unwrap()
    }

    async fn finish(self) {
        let Env {
            pg,
            github,
            gitlab,
            db,
            mut broker,
            ..
        } = self;
        broker.kill();
        github.shutdown().await;
        gitlab.shutdown().await;
        db.cleanup().await;
        pg.cleanup().await;
    }
}

fn workflow_job(action: &str, check_run_id: u64) -> Value {
    json!({
        "action": action,
        "workflow_job": {
            "id": check_run_id, "run_id": 77, "run_attempt": 1, "name": "deploy",
            "check_run_url": format!("https://api.example/repos/acme/api/check-runs/{check_run_id}"),
            "status": "completed", "conclusion": "failure"
        },
        "repository": {"id": 1000001, "full_name": "acme/api"}
    })
}

/// A signed `completed` delivery revokes that job's API token and Postgres user (and nothing of
/// the run's other job); a forged one revokes nothing and is audited; a replay is refused.
#[tokio::test]
async fn github_completed_job_revokes_its_grants_only() {
    let e = env().await;
    let mine = e.exchange(&e.github_token(501), &["api", "pg-job"]).await;
    let other = e.exchange(&e.github_token(502), &["api"]).await;
    let api = mine["credentials"]["api"]["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let db_url = mine["credentials"]["pg-job"]["database_url"]
        .as_str()
        .unwrap()
        .to_owned();
    let other_api = other["credentials"]["api"]["token"]
        .as_str()
        .unwrap()
        .to_owned();
    login(&db_url)
        .await
        .expect("job user logs in")
        .close()
        .await
        .unwrap();
    assert!(e.active(&api).await);
    assert_eq!(e.pg.roles().await, 1);

    // Forged: signed with a secret the broker does not have, or not signed at all.
    let done = workflow_job("completed", 501);
    let (status, body) = e
        .github_delivery(
            "d-forged",
            "not-the-secret-0123456789",
            "workflow_job",
            &done,
        )
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("bad_signature"))
    );
    let bytes = serde_json::to_vec(&done).unwrap();
    let (status, _) = e
        .deliver(
            "/v1/hooks/github",
            &[
                ("x-github-event", "workflow_job".into()),
                ("x-github-delivery", "d-unsigned".into()),
            ],
            &bytes,
        )
        .await;
    assert_eq!(status, 401);
    assert!(e.active(&api).await, "a forged delivery revokes nothing");
    login(&db_url)
        .await
        .expect("still logs in")
        .close()
        .await
        .unwrap();
    let forged = e.webhook_events("bad_signature").await;
    assert_eq!(forged.len(), 2);
    assert_eq!(forged[0].actor.as_deref(), Some("webhook:github"));

    // Not completed yet: verified, ignored, nothing recorded.
    let (status, body) = e
        .github_delivery(
            "d-queued",
            GH_SECRET,
            "workflow_job",
            &workflow_job("in_progress", 501),
        )
        .await;
    assert_eq!((status, body["status"].as_str()), (202, Some("ignored")));
    assert!(e.active(&api).await);

    // The real one, signed with the old secret (rotation): revokes exactly this job's grant.
    let started = std::time::Instant::now();
    let (status, body) = e
        .github_delivery("d-1", GH_SECRET_OLD, "workflow_job", &done)
        .await;
    eprintln!(
        "webhook: completed delivery revoked an API token and a Postgres user in {:.1} ms",
        started.elapsed().as_secs_f64() * 1000.0
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["report"]["matched"], 1, "{body}");
    assert_eq!(body["report"]["revoked_grants"], 1, "{body}");
    assert_eq!(body["report"]["revoked"]["postgres"], 1, "{body}");
    assert!(!e.active(&api).await, "the API token is inactive");
    let err = login(&db_url)
        .await
        .expect_err("the job user can no longer log in");
    assert!(matches!(err, sqlx::Error::Database(_)), "{err}");
    assert_eq!(e.pg.roles().await, 0);
    assert!(
        e.active(&other_api).await,
        "the run's other job keeps its token"
    );
    let ended = e.webhook_events("job_ended").await;
    assert_eq!(ended.len(), 1);
    assert_eq!(ended[0].job.job_id.as_deref(), Some("501"));
    let revokes =
        e.db.store()
            .audit_events(&AuditFilter {
                actor: Some("webhook:github".into()),
                reason: Some("requested".into()),
                ..AuditFilter::default()
            })
            .await
            .unwrap();
    assert_eq!(revokes.len(), 1, "the grant's revocation names the webhook");

    // Replayed: refused and audited.
    let (status, body) = e
        .github_delivery("d-1", GH_SECRET, "workflow_job", &done)
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (409, Some("replayed_delivery"))
    );
    assert_eq!(e.webhook_events("replayed_delivery").await.len(), 1);
    assert!(
        !e.broker.log().contains(GH_SECRET) && !e.broker.log().contains(GH_SECRET_OLD),
        "a webhook secret reached the log"
    );
    e.finish().await;
}

#[tokio::test]
async fn gitlab_job_event_revokes_that_job_and_refuses_bad_tokens_and_replays() {
    let e = env().await;
    let mine = e.exchange(&e.gitlab_token(4242), &["api"]).await;
    let other = e.exchange(&e.gitlab_token(4243), &["api"]).await;
    let api = mine["credentials"]["api"]["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let other_api = other["credentials"]["api"]["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let body = serde_json::to_vec(&json!({
        "object_kind": "build", "build_id": 4242, "build_status": "success",
        "build_name": "deploy", "project_id": 2000001, "pipeline_id": 9,
        "project": {"id": 2000001, "path_with_namespace": "acme/api"}
    }))
    .unwrap();
    let hdrs = |token: &str, key: &str| {
        vec![
            ("x-gitlab-event", "Job Hook".to_owned()),
            ("x-gitlab-token", token.to_owned()),
            ("idempotency-key", key.to_owned()),
        ]
    };
    let (status, r) = e
        .deliver(
            "/v1/hooks/gitlab",
            &hdrs("wrong-token-0123456789", "k-0"),
            &body,
        )
        .await;
    assert_eq!((status, r["error"].as_str()), (401, Some("bad_signature")));
    assert!(e.active(&api).await);
    assert_eq!(e.webhook_events("bad_signature").await.len(), 1);

    // The token is scoped to acme/api: a delivery naming another project is refused, audited,
    // and keeps no id (k-1 is used below).
    let mut elsewhere: Value = serde_json::from_slice(&body).unwrap();
    elsewhere["project"]["path_with_namespace"] = json!("other-group/api");
    let elsewhere = serde_json::to_vec(&elsewhere).unwrap();
    let (status, r) = e
        .deliver("/v1/hooks/gitlab", &hdrs(GL_TOKEN, "k-1"), &elsewhere)
        .await;
    assert_eq!(
        (status, r["error"].as_str()),
        (403, Some("webhook_out_of_scope"))
    );
    assert!(e.active(&api).await);
    assert_eq!(e.webhook_events("webhook_out_of_scope").await.len(), 1);

    let (status, r) = e
        .deliver("/v1/hooks/gitlab", &hdrs(GL_TOKEN, "k-1"), &body)
        .await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["report"]["revoked_grants"], 1, "{r}");
    assert!(!e.active(&api).await);
    assert!(e.active(&other_api).await, "another job keeps its token");

    let (status, r) = e
        .deliver("/v1/hooks/gitlab", &hdrs(GL_TOKEN, "k-1"), &body)
        .await;
    assert_eq!(
        (status, r["error"].as_str()),
        (409, Some("replayed_delivery"))
    );
    // Over the body limit (1 MiB by default): refused before anything else.
    let big = vec![b' '; 2 * 1024 * 1024];
    let (status, r) = e
        .deliver("/v1/hooks/gitlab", &hdrs(GL_TOKEN, "k-2"), &big)
        .await;
    assert_eq!(
        (status, r["error"].as_str()),
        (413, Some("payload_too_large"))
    );
    assert!(
        !e.broker.log().contains(GL_TOKEN),
        "the hook token reached the log"
    );
    e.finish().await;
}

/// The operator API lives only on `admin_listen`; there a job token matching the OIDC
/// operator rule may revoke everything (also through `broker admin revoke-all
/// --id-token-file`), while a job token of any other repository is refused.
#[tokio::test]
async fn oidc_operator_breaks_glass_on_the_admin_listener_only() {
    let e = env().await;
    let grant = e.exchange(&e.github_token(601), &["api"]).await;
    let api = grant["credentials"]["api"]["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let security = |sub_ref: &str| {
        let mut c = acme_api_claims(&e.github.url(), AUD);
        c["repository"] = json!("acme/security");
        c["ref"] = json!(sub_ref);
        c["sub"] = json!(format!("repo:acme/security:ref:{sub_ref}"));
        testkit::sign(TestKey::Rsa1, &c)
    };
    let revoke_all = |base: String, token: String| {
        let api = Api::new(e.api.http.clone(), &base);
        async move { api.revoke_all(&token, &json!({"reason": "drill"})).await }
    };
    // Absent on the public listener, whoever asks.
    let (status, body) = revoke_all(e.broker.url.clone(), security("refs/heads/main")).await;
    assert_eq!((status, body["error"].as_str()), (404, Some("not_found")));
    let (status, _) = e
        .api
        .http
        .get(format!("{}/v1/audit", e.broker.url))
        .send()
        .await
        .map(|r| (r.status().as_u16(), ()))
        .unwrap();
    assert_eq!(status, 404);
    // A plain job token, or the security repository on another branch: refused.
    for t in [e.github_token(602), security("refs/heads/feature")] {
        let (status, body) = revoke_all(e.admin_url.clone(), t).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (401, Some("operator_unauthorized"))
        );
    }
    assert!(e.active(&api).await);
    // The reviewed pipeline, through the CLI.
    let dir = tempfile::tempdir().unwrap();
    let tok = dir.path().join("id-token");
    std::fs::write(&tok, security("refs/heads/main")).unwrap();
    let out = std::process::Command::new(broker_bin())
        .args(["admin", "revoke-all", "--reason", "incident 42", "--url"])
        .arg(&e.admin_url)
        .arg("--id-token-file")
        .arg(&tok)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_str(&stdout).unwrap();
    assert!(report["revoked_grants"].as_u64().unwrap() >= 1, "{report}");
    assert!(!e.active(&api).await);
    let ev =
        e.db.store()
            .audit_events(&AuditFilter {
                reason: Some("revoke_all".into()),
                ..AuditFilter::default()
            })
            .await
            .unwrap();
    assert_eq!(
        ev[0].actor.as_deref(),
        Some("operator:secjob (repo:acme/security:ref:refs/heads/main)")
    );
    e.finish().await;
}

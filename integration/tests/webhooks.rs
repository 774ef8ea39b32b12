#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a failed expectation is a failed test
//! End to end for job-end webhooks, OIDC break-glass operators and the separate operator
//! listener: the real `broker` binary, a Postgres store, a local issuer, and a real Postgres
//! target whose job users must stop working when the job's `completed` delivery arrives.

use broker::oidc::testkit::{self, TestIssuer, TestKey};
use broker::store::AuditFilter;
use broker::store::testdb::{DEFAULT_PG_URL, PG_URL_ENV, TestDb};
use broker::webhooks::signature::github_sign;
use integration::{
    BrokerProcess, BrokerSetup, acme_api_claims, broker_bin, free_port, github_issuer_yaml,
    gitlab_issuer_yaml,
};
use serde_json::{Value, json};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{ConnectOptions, Connection};
use std::str::FromStr;

const AUD: &str = "https://broker.test";
const GH_SECRET_OLD: &str = "gh-old-secret-0123456789";
const GH_SECRET: &str = "gh-new-secret-0123456789";
const GL_TOKEN: &str = "gl-hook-token-0123456789";

fn admin_url() -> String {
    std::env::var(PG_URL_ENV)
        .ok()
        .filter(|u| !u.trim().is_empty())
        .unwrap_or_else(|| DEFAULT_PG_URL.to_owned())
}

/// The app side: an owner role and a role prefix on the test server, removed afterwards.
struct Pg {
    admin: PgPool,
    url: String,
    tag: String,
}

impl Pg {
    async fn new() -> Self {
        let url = admin_url();
        let admin = PgPoolOptions::new()
            .max_connections(2)
            .connect_with(PgConnectOptions::from_str(&url).unwrap())
            .await
            .expect("admin connects");
        let tag = format!("w{:08x}", (uuid::Uuid::new_v4().as_u128() >> 64) as u32);
        sqlx::raw_sql(&format!("CREATE ROLE {tag}g_owner NOLOGIN"))
            .execute(&admin)
            .await
            .unwrap();
        Self { admin, url, tag }
    }

    fn target_yaml(&self) -> String {
        let opts = PgConnectOptions::from_str(&self.url).unwrap();
        format!(
            "targets:\n  postgres:\n    main:\n      admin_url: {{value: \"{url}\"}}\n      host: {host}\n      port: {port}\n      sslmode: disable\n      role_prefix: {tag}u_\n",
            url = self.url,
            host = opts.get_host(),
            port = opts.get_port(),
            tag = self.tag,
        )
    }

    async fn roles(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM pg_roles WHERE starts_with(rolname, $1)")
            .bind(format!("{}u_", self.tag))
            .fetch_one(&self.admin)
            .await
            .unwrap()
    }

    async fn cleanup(self) {
        let left: Vec<String> =
            sqlx::query_scalar("SELECT rolname::text FROM pg_roles WHERE starts_with(rolname, $1)")
                .bind(&self.tag)
                .fetch_all(&self.admin)
                .await
                .unwrap();
        for r in left {
            let _ = sqlx::raw_sql(&format!("DROP OWNED BY {r}; DROP ROLE {r}"))
                .execute(&self.admin)
                .await;
        }
        self.admin.close().await;
    }
}

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
    pg: Pg,
    github: TestIssuer,
    gitlab: TestIssuer,
    db: TestDb,
    broker: BrokerProcess,
    http: reqwest::Client,
    admin_url: String,
    _policies: tempfile::TempDir,
}

/// A broker with both webhook endpoints, a Postgres target, an OIDC operator rule for the
/// `acme/security` repository's main branch, and the operator API on its own port.
async fn env() -> Env {
    let pg = Pg::new().await;
    let db = TestDb::postgres().await;
    let github = TestIssuer::start().await;
    let gitlab = TestIssuer::start().await;
    let policies = tempfile::tempdir().unwrap();
    std::fs::write(
        policies.path().join("p.yaml"),
        policy(&format!("{}g_owner", pg.tag)),
    )
    .unwrap();
    let admin_port = free_port();
    let extra = format!(
        "{target}admin_listen: 127.0.0.1:{admin_port}\n\
         webhooks:\n  github:\n    secrets: [{{value: {GH_SECRET_OLD}, scope: [\"acme/*\"]}}, \
         {{value: {GH_SECRET}, scope: [\"acme/*\"]}}]\n  \
         gitlab:\n    tokens: [{{value: {GL_TOKEN}, scope: [\"acme/api\"]}}]\n\
         operators:\n  - name: secjob\n    role: admin\n    oidc:\n      issuer: github\n      \
         rule: claims.repository == \"acme/security\" && claims.ref == \"refs/heads/main\"\n",
        target = pg.target_yaml(),
    );
    let broker = BrokerProcess::start(&BrokerSetup {
        store_url: db.url(),
        policies_dir: policies.path(),
        issuers_yaml: format!(
            "{}{}",
            github_issuer_yaml(&github.url()),
            gitlab_issuer_yaml(&gitlab.url())
        ),
        audience: AUD,
        extra_yaml: extra,
        env: Vec::new(),
    })
    .await
    .expect("broker starts");
    Env {
        pg,
        github,
        gitlab,
        db,
        broker,
        http: reqwest::Client::new(),
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
        let r = self
            .http
            .post(format!("{}/v1/exchange", self.broker.url))
            .bearer_auth(token)
            .json(&json!({"credentials": creds, "ttl": "10m"}))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let body: Value = r.json().await.unwrap();
        assert_eq!(status, 200, "{body}");
        body
    }

    async fn active(&self, api_token: &str) -> bool {
        let r: Value = self
            .http
            .post(format!("{}/v1/introspect", self.broker.url))
            .form(&[("token", api_token)])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        r["active"] == true
    }

    async fn deliver(&self, path: &str, headers: &[(&str, String)], body: &[u8]) -> (u16, Value) {
        let mut req = self
            .http
            .post(format!("{}{path}", self.broker.url))
            .header("content-type", "application/json")
            .body(body.to_vec());
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        let r = req.send().await.unwrap();
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    async fn github_delivery(
        &self,
        id: &str,
        secret: &str,
        event: &str,
        body: &Value,
    ) -> (u16, Value) {
        let bytes = serde_json::to_vec(body).unwrap();
        let headers = [
            ("x-github-event", event.to_owned()),
            ("x-github-delivery", id.to_owned()),
            ("x-hub-signature-256", github_sign(secret, &bytes)),
        ];
        self.deliver("/v1/hooks/github", &headers, &bytes).await
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

async fn login(url: &str) -> Result<sqlx::PgConnection, sqlx::Error> {
    let opts = PgConnectOptions::from_str(url)?.disable_statement_logging();
    sqlx::PgConnection::connect_with(&opts).await
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
        let http = e.http.clone();
        async move {
            let r = http
                .post(format!("{base}/v1/admin/revoke-all"))
                .bearer_auth(token)
                .json(&json!({"reason": "drill"}))
                .send()
                .await
                .unwrap();
            (
                r.status().as_u16(),
                r.json::<Value>().await.unwrap_or(Value::Null),
            )
        }
    };
    // Absent on the public listener, whoever asks.
    let (status, body) = revoke_all(e.broker.url.clone(), security("refs/heads/main")).await;
    assert_eq!((status, body["error"].as_str()), (404, Some("not_found")));
    let (status, _) = e
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

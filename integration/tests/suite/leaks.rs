//! Leak response end to end: the real broker's secrets are recognisable (a real scanner with
//! the shipped rules finds every one and no look-alike), a GitHub-format report signed with a
//! test key served from a local key URL revokes a live job's Postgres user and API token within
//! a second, forged and garbage reports are refused and change nothing, and an operator's
//! report (`broker leak report`) revokes an opaque API token.

use base64::Engine;
use broker::oidc::testkit::TestIssuer;
use broker::secret_format::{self, SecretKind};
use broker::store::testdb::TestDb;
use integration::http::{self, Api, json_string as s};
use integration::leak_keys::KeyServer;
use integration::pg::{self, PgRoleTarget};
use integration::store_db::audit_log;
use integration::{
    BrokerProcess, BrokerSetup, Secrets, acme_token_with, broker_cli, github_issuer_yaml,
};
use serde_json::{Value, json};
use std::time::{Duration, Instant};

/// A fixed, well-formed operator token for these tests.
const OPERATOR_TOKEN: &str = "brk_op_leakResponseE2eOperator000000000_46NWdK";

/// A policy: `pg-app` (from the target), `api` (a signed JWT) and `api-opaque`.
fn policy(pg: &PgRoleTarget) -> String {
    let base = pg.policy();
    let (creds, rules) = base.split_once("rules:\n").expect("a rules section");
    format!(
        "{creds}  - name: api\n    max_ttl: 15m\n    api_token:\n      audience: https://deploy.example\n      scopes: [\"deploy:${{repository}}\"]\n  - name: api-opaque\n    max_ttl: 15m\n    api_token:\n      audience: https://deploy.example\n      format: opaque\nrules:\n{}",
        rules.replace(
            "credentials: [pg-app]",
            "credentials: [pg-app, api, api-opaque]"
        )
    )
}

struct Env {
    pg: PgRoleTarget,
    issuer: TestIssuer,
    db: TestDb,
    broker: BrokerProcess,
    keys: KeyServer,
    api: Api,
    _policies: tempfile::TempDir,
}

async fn env() -> Env {
    let pg = PgRoleTarget::new().await.expect("pg target");
    let db = TestDb::postgres().await;
    let issuer = TestIssuer::start().await;
    let keys = KeyServer::start().await;
    let policies = tempfile::tempdir().unwrap();
    std::fs::write(policies.path().join("p.yaml"), policy(&pg)).unwrap();
    let extra = format!(
        "{}\noperators:\n  - name: secteam\n    role: admin\n    token_sha256: {}\nleaks:\n  github:\n    keys_url: {}\n    refresh_cooldown: 2s\n  freeze_repository: true\n",
        pg.yaml(),
        broker::secret::sha256_hex(OPERATOR_TOKEN.as_bytes()),
        keys.url
    );
    let broker = BrokerProcess::start(
        &BrokerSetup::new(db.url(), policies.path(), github_issuer_yaml(&issuer.url()))
            .extra(extra),
    )
    .await
    .expect("broker starts");
    let api = Api::new(http::client(), &broker.url);
    Env {
        pg,
        issuer,
        db,
        broker,
        keys,
        api,
        _policies: policies,
    }
}

impl Env {
    /// A token of the example job `acme/api` with GitHub job id `job` (`check_run_id`).
    fn job_token(&self, job: u64) -> String {
        acme_token_with(&self.issuer.url(), |c| {
            c["check_run_id"] = json!(job.to_string());
        })
    }

    async fn exchange(&self, token: &str, creds: &[&str]) -> Value {
        let (status, body) = self
            .api
            .exchange(Some(token), &json!({"credentials": creds, "ttl": "10m"}))
            .await;
        assert_eq!(status, 200, "{body}");
        body
    }

    async fn report(&self, key_id: &str, signature: &str, body: &[u8]) -> (u16, Value) {
        self.api
            .deliver(
                "/v1/leaks/github",
                &[
                    ("github-public-key-identifier", key_id.to_owned()),
                    ("github-public-key-signature", signature.to_owned()),
                ],
                body,
            )
            .await
    }

    fn pg_url(&self, body: &Value) -> String {
        s(&body["credentials"]["pg-app"]["database_url"])
    }

    async fn finish(self) {
        let Env {
            pg,
            issuer,
            db,
            mut broker,
            keys,
            ..
        } = self;
        broker.kill();
        keys.task.abort();
        issuer.shutdown().await;
        db.cleanup().await;
        pg.cleanup().await;
    }
}

/// Poll `check` every 20 ms until it holds or `limit` passes; how long it took.
async fn within(limit: Duration, mut check: impl AsyncFnMut() -> bool) -> Option<Duration> {
    let started = Instant::now();
    loop {
        if check().await {
            return Some(started.elapsed());
        }
        if started.elapsed() > limit {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The done-when test: a signed GitHub report of a live job's Postgres password and API token
/// kills both within 1 s (login refused, introspection inactive), the audit names the job and
/// the leak URL, the job's repository is frozen; forged, unknown-key and garbage reports are
/// refused (401) and leave a legitimate job of the same repository untouched.
#[tokio::test]
async fn a_signed_github_report_revokes_a_live_job_within_a_second() {
    let e = env().await;
    // The leaking job holds two grants (two exchanges of one job); the bystander is another job.
    let leaky_pg = e.exchange(&e.job_token(4001), &["pg-app"]).await;
    let leaky_api = e.exchange(&e.job_token(4001), &["api"]).await;
    let bystander = e.exchange(&e.job_token(4002), &["pg-app", "api"]).await;
    let password = s(&leaky_pg["credentials"]["pg-app"]["password"]);
    let api_token = s(&leaky_api["credentials"]["api"]["token"]);
    assert!(password.starts_with("brk_pg_"));
    assert_eq!(
        secret_format::parse(&password),
        Ok(SecretKind::PostgresPassword)
    );
    assert!(pg::login(&e.pg_url(&leaky_pg)).await.is_ok());
    assert!(e.api.active(&api_token).await);

    // Forged reports first, with the legitimate traffic still live.
    let body = json!([
        {"token": password, "type": "broker_postgres_password", "url": "https://github.com/acme/api/blob/abc/ci.log", "source": "content"},
        {"token": api_token, "type": "broker_api_token", "url": "https://github.com/acme/api/issues/7", "source": "issue_comment"},
        {"token": "ghp_notOursAtAll000000000000000000000000", "type": "broker_api_token", "url": "https://github.com/acme/api/blob/abc/x", "source": "content"}
    ])
    .to_string();
    let b = body.as_bytes();
    let stranger_sig = KeyServer::sign_with(&e.keys.stranger, b);
    for (key_id, sig, payload) in [
        ("test-key-1", stranger_sig.clone(), b.to_vec()),
        (
            "no-such-key",
            KeyServer::sign_with(&e.keys.key, b),
            b.to_vec(),
        ),
        (
            "test-key-1",
            KeyServer::sign_with(&e.keys.key, b"[]"),
            b.to_vec(),
        ),
        (
            "test-key-1",
            "garbage".to_owned(),
            b"\x00\xffnot json".to_vec(),
        ),
        ("", String::new(), b.to_vec()),
    ] {
        let (status, answer) = e.report(key_id, &sig, &payload).await;
        assert_eq!(status, 401, "{key_id}: {answer}");
        assert_eq!(answer["error"], "bad_signature", "{answer}");
    }
    assert!(
        e.api.active(&api_token).await,
        "a forged report revoked nothing"
    );
    assert!(pg::login(&e.pg_url(&leaky_pg)).await.is_ok());

    // The real report.
    let started = Instant::now();
    let (status, answer) = e
        .report("test-key-1", &KeyServer::sign_with(&e.keys.key, b), b)
        .await;
    assert_eq!(status, 200, "{answer}");
    let labels: Vec<(&str, &str)> = answer
        .as_array()
        .unwrap()
        .iter()
        .map(|a| (a["label"].as_str().unwrap(), a["status"].as_str().unwrap()))
        .collect();
    // Every token is looked up before anything is revoked: both were live when reported.
    assert_eq!(labels[0], ("true_positive", "revoked"), "{answer}");
    assert_eq!(labels[1], ("true_positive", "revoked"), "{answer}");
    assert_eq!(labels[2], ("false_positive", "unknown"));
    assert_eq!(
        answer[0]["token_hash"],
        broker::secret::sha256_hex(password.as_bytes())
    );
    let pg_url = e.pg_url(&leaky_pg);
    let dead_in = within(Duration::from_secs(1), async || {
        pg::login(&pg_url).await.is_err() && !e.api.active(&api_token).await
    })
    .await;
    let dead_in = dead_in.expect("both credentials dead within 1 s of the report");
    eprintln!(
        "leak report: answered in {:.0} ms, both credentials dead {:.0} ms after the answer",
        started.elapsed().as_secs_f64() * 1000.0 - dead_in.as_secs_f64() * 1000.0,
        dead_in.as_secs_f64() * 1000.0
    );
    // The same job's grants are both revoked; the bystander's are untouched.
    let bystander_api = s(&bystander["credentials"]["api"]["token"]);
    assert!(
        e.api.active(&bystander_api).await,
        "another job's token is untouched"
    );
    assert!(
        pg::login(&e.pg_url(&bystander)).await.is_ok(),
        "another job's user is untouched"
    );
    // A second report of the same tokens: ours, already inactive.
    let (status, again) = e
        .report("test-key-1", &KeyServer::sign_with(&e.keys.key, b), b)
        .await;
    assert_eq!(status, 200);
    assert_eq!(again[0]["status"], "already_inactive", "{again}");
    // The repository is frozen: a new exchange of it is refused.
    let (status, refused) = e
        .api
        .exchange(Some(&e.job_token(4003)), &json!({"credentials": ["api"]}))
        .await;
    assert_eq!(
        (status, refused["error"].as_str()),
        (403, Some("frozen")),
        "{refused}"
    );

    // The audit: one leak_reported per token of ours, naming the job and the URL; no token.
    let events = audit_log(&e.db, 500).await;
    let leak: Vec<_> = events
        .iter()
        .filter(|ev| ev.action.as_str() == "leak_reported" && ev.reason == "leak_reported")
        .collect();
    assert_eq!(leak.len(), 4, "two tokens, reported twice");
    let first = leak
        .iter()
        .find(|ev| {
            ev.detail
                .as_deref()
                .unwrap_or("")
                .contains("postgres password")
                && ev
                    .detail
                    .as_deref()
                    .unwrap_or("")
                    .contains("revoked: grant")
        })
        .expect("the password's event of the first report");
    assert_eq!(first.job.repository.as_deref(), Some("acme/api"));
    assert_eq!(first.job.run_id.as_deref(), Some("77"));
    assert!(
        first.job.workflow.is_some() && first.job.actor.is_some() && first.job.git_ref.is_some()
    );
    assert_eq!(first.actor.as_deref(), Some("leak:github"));
    let detail = first.detail.clone().unwrap();
    assert!(
        detail.contains("https://github.com/acme/api/blob/abc/ci.log"),
        "{detail}"
    );
    assert!(detail.contains("revoked: grant"), "{detail}");
    assert!(detail.contains("live "), "{detail}");
    assert!(events.iter().any(|ev| ev.reason == "leak_false_positive"));
    // The revocation was proved on the target: the role is gone, its event says verified.
    let pg_grant = s(&leaky_pg["grant_id"]);
    let revoke = events
        .iter()
        .find(|ev| {
            ev.action.as_str() == "revoke"
                && ev.grant_id.map(|g| g.to_string()) == Some(pg_grant.clone())
        })
        .expect("the Postgres grant's revocation event");
    assert_eq!(revoke.verified, Some(true), "{revoke:?}");
    assert_eq!(revoke.actor.as_deref(), Some("leak:github"));
    assert!(
        events
            .iter()
            .filter(|ev| ev.action.as_str() == "leak_reported" && ev.reason == "bad_signature")
            .count()
            >= 1,
        "forged reports are audited"
    );
    // Nothing the test saw, reported tokens included, is in the broker's log or store.
    let mut secrets = Secrets::default();
    for body in [&leaky_pg, &leaky_api, &bystander] {
        secrets.add_response(body);
    }
    secrets.add(OPERATOR_TOKEN);
    secrets.assert_not_leaked(&e.broker, e.db.url()).await;
    let all = serde_json::to_string(&events).unwrap();
    let log = e.broker.log();
    for secret in [&password, &api_token] {
        assert!(
            !all.contains(secret.as_str()),
            "a token reached the audit log"
        );
        assert!(
            !log.contains(secret.as_str()),
            "a token reached the broker's log"
        );
    }
    e.finish().await;
}

/// An operator's report through `broker leak report <file>`: the opaque API token picked out of
/// a log is revoked (introspection inactive); a malformed revocation token is refused offline.
#[tokio::test]
async fn an_operator_report_from_a_file_revokes_an_opaque_token() {
    let e = env().await;
    let body = e.exchange(&e.job_token(5001), &["api-opaque"]).await;
    let opaque = s(&body["credentials"]["api-opaque"]["token"]);
    assert_eq!(secret_format::parse(&opaque), Ok(SecretKind::ApiToken));
    let intro = e.api.introspect(&opaque).await;
    assert_eq!(intro["active"], true, "{intro}");
    assert_eq!(intro["aud"], "https://deploy.example");
    assert_eq!(intro["job"]["repository"], "acme/api");
    // A typo is inactive without a lookup; so is a well-formed token nobody issued.
    let typo = format!("{}x", &opaque[..opaque.len() - 1]);
    assert_eq!(e.api.introspect(&typo).await["active"], false);
    let stranger = secret_format::generate(SecretKind::ApiToken);
    assert_eq!(e.api.introspect(stranger.expose()).await["active"], false);

    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("job.log");
    std::fs::write(
        &log,
        format!("step 3\nAPI_TOKEN={opaque} curl ...\nnoise brk_at_short\n"),
    )
    .unwrap();
    let token_file = dir.path().join("operator");
    std::fs::write(&token_file, OPERATOR_TOKEN).unwrap();
    let run = broker_cli(
        None,
        &[
            "leak",
            "report",
            log.to_str().unwrap(),
            "--url",
            &e.broker.url,
            "--token-file",
            token_file.to_str().unwrap(),
            "--found-at",
            "https://ci.example/job/5001",
        ],
    );
    assert_eq!(run.code, 0, "{}", run.output());
    let answer: Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(answer.as_array().unwrap().len(), 1, "{answer}");
    assert_eq!(answer[0]["status"], "revoked");
    assert!(!run.output().contains(&opaque), "the CLI printed the token");
    assert_eq!(e.api.introspect(&opaque).await["active"], false);
    let events = audit_log(&e.db, 200).await;
    let ev = events
        .iter()
        .find(|ev| ev.reason == "leak_reported")
        .expect("leak_reported");
    assert_eq!(ev.actor.as_deref(), Some("leak:operator:secteam"));
    assert!(
        ev.detail
            .as_deref()
            .unwrap()
            .contains("https://ci.example/job/5001")
    );

    // Without an operator token: refused.
    let (status, _) = e.api.deliver("/v1/leaks", &[], br#"[{"token":"x"}]"#).await;
    assert_eq!(status, 401);
    // A truncated revocation token is refused before any lookup.
    let rvk = s(&body["revocation_token"]);
    let (status, err) = e.api.revoke(&rvk[..rvk.len() - 1]).await;
    assert_eq!(
        (status, err["error"].as_str()),
        (401, Some("malformed_secret"))
    );
    // The real one still works.
    let (status, _) = e.api.revoke(&rvk).await;
    assert_eq!(status, 200);
    e.finish().await;
}

/// The scanner rules: detect-secrets (installed by `scripts/test`) with the shipped plugin over
/// a fixture of real secrets the broker made and look-alikes finds every real one and flags no
/// look-alike.
#[tokio::test]
async fn a_real_scanner_finds_every_broker_secret_and_no_look_alike() {
    let e = env().await;
    let body = e
        .exchange(&e.job_token(6001), &["pg-app", "api-opaque"])
        .await;
    let mut real: Vec<String> = vec![
        s(&body["credentials"]["pg-app"]["password"]),
        s(&body["credentials"]["api-opaque"]["token"]),
        s(&body["revocation_token"]),
        OPERATOR_TOKEN.to_owned(),
    ];
    let op = broker_cli(None, &["operator-token"]);
    let op_token = op
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("token:"))
        .map(|t| t.trim().to_owned())
        .expect("broker operator-token prints a token");
    real.push(op_token);
    for kind in [SecretKind::MysqlPassword, SecretKind::RedisPassword] {
        real.push(secret_format::generate(kind).expose().to_owned());
    }
    // Legacy operator / revocation tokens (43 base64url characters).
    real.push(format!("brk_rvk_{}", broker::secret::random_token(32)));
    e.finish().await;

    let flip = |t: &str| {
        let last = t.chars().last().unwrap();
        let c = if last == 'a' { 'b' } else { 'a' };
        format!("{}{c}", &t[..t.len() - 1])
    };
    let pg = &real[0];
    let mut look_alikes: Vec<String> = vec![
        flip(pg),                             // wrong checksum
        flip(&real[2]),                       // wrong checksum (revocation)
        pg[..pg.len() - 1].to_owned(),        // truncated
        pg[..pg.len() - 8].to_owned(),        // checksum cut off
        format!("{pg}0"),                     // one character too many
        pg.replacen("brk_pg_", "brk_zz_", 1), // unknown tag
        pg.replacen("brk_pg_", "BRK_PG_", 1), // other case
        format!("x{pg}"),                     // inside a longer word
        "ghp_16C7e42F292c6912E7710c838347Ae178B4a".into(),
        "glpat-xXx1y2Z3a4B5c6D7e8F9".into(),
        "AKIAIOSFODNN7EXAMPLE".into(),
        "xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx".into(),
        "sk_live_4eC39HqLyjWDarjtT1zdp7dc".into(),
        "npm_1234567890abcdefghijABCDEFGHIJ123456".into(),
        "pypi-AgEIcHlwaS5vcmcCJGE4ZjQxNzE3LTk4NjYtNGU0Yy1iZjQ5LTQ4ZjY0ZjQ1".into(),
        base64::engine::general_purpose::STANDARD.encode([0x5au8; 48]),
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(b"brk_pg_0123456789ABCDEFGHIJabcdefghij01_1AAAAA"),
        "brk_pg_0123456789ABCDEFGHIJabcdefghij01_9zzzzz".into(),
        "brk_at_short".into(),
    ];
    // Legacy look-alikes: one character short, and one of the wrong alphabet.
    let legacy = real.last().unwrap().clone();
    look_alikes.push(legacy[..legacy.len() - 1].to_owned());
    look_alikes.push(format!("{}+", &legacy[..legacy.len() - 1]));

    // One candidate per line, in the kinds of text secrets leak in.
    let dir = tempfile::tempdir().unwrap();
    let mut text = String::new();
    let mut real_lines = Vec::new();
    for (i, t) in real.iter().enumerate() {
        let line = match i % 3 {
            0 => format!("export TOKEN={t}"),
            1 => format!("  \"password\": \"{t}\","),
            _ => format!("curl -H 'Authorization: Bearer {t}' https://x"),
        };
        text.push_str(&line);
        text.push('\n');
        real_lines.push(text.lines().count());
    }
    for t in &look_alikes {
        text.push_str(&format!("value: {t}\n"));
    }
    std::fs::write(dir.path().join("fixture.txt"), &text).unwrap();

    let scanner = std::env::var("BROKER_TEST_DETECT_SECRETS").unwrap_or_else(|_| {
        integration::issuer::repo_root()
            .join("target/scanner-venv/bin/detect-secrets")
            .to_string_lossy()
            .into_owned()
    });
    assert!(
        std::path::Path::new(&scanner).exists(),
        "detect-secrets is not installed at {scanner}: run scripts/test, which installs it"
    );
    let plugin = integration::issuer::repo_root().join("deploy/scanners/detect_secrets_broker.py");
    let out = std::process::Command::new(&scanner)
        .current_dir(dir.path())
        .args(["scan", "--all-files", "--plugin"])
        .arg(&plugin)
        .arg("fixture.txt")
        .output()
        .expect("detect-secrets runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).expect("detect-secrets JSON");
    let mut found: Vec<usize> = report["results"]["fixture.txt"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter(|r| r["type"].as_str().is_some_and(|t| t.starts_with("Broker")))
        .map(|r| r["line_number"].as_u64().unwrap() as usize)
        .collect();
    found.sort_unstable();
    assert_eq!(
        found, real_lines,
        "every broker secret found (lines {real_lines:?}), no look-alike flagged"
    );
}

//! Two broker processes on one Postgres store, the way the Helm chart runs them: exchanges
//! spread over both, an operator action sent to one reaches what the other minted, both reapers
//! run and still revoke every expired grant exactly once, and a freeze set through one is
//! honoured by the other within its documented bound (`admin::FREEZE_REFRESH`, 5 s).
//!
//! Credentials are real on both sides: API tokens (introspected through either replica, which
//! share one signing key as the chart's Secret provides) and Postgres users on the machine's
//! Postgres (`BROKER_TEST_PG_URL`), counted in `pg_roles`.

use broker::oidc::testkit::TestIssuer;
use broker::store::testdb::TestDb;
use integration::http::{self, Api};
use integration::pg::PgApp;
use integration::{BrokerProcess, BrokerSetup, acme_token, github_issuer_yaml};
use serde_json::{Value, json};
use sqlx::Row;
use sqlx::postgres::PgPool;
use std::time::{Duration, Instant};

/// Write `files` the way the kubelet projects a ConfigMap: a timestamped hidden directory,
/// `..data` pointing at it, and visible symlinks `name -> ..data/name`. A later call swaps
/// `..data` atomically (rename), as a ConfigMap update does.
fn project_configmap(dir: &std::path::Path, generation: u32, files: &[(&str, &str)]) {
    let data = format!("..2026_11_23_00_00_0{generation}");
    std::fs::create_dir(dir.join(&data)).unwrap();
    for (name, content) in files {
        std::fs::write(dir.join(&data).join(name), content).unwrap();
        let link = dir.join(name);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(format!("..data/{name}"), link).unwrap();
        }
    }
    let tmp = dir.join("..data_tmp");
    std::os::unix::fs::symlink(&data, &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
}

fn policy(app: &PgApp, pg_rule: bool) -> String {
    format!(
        r#"credentials:
  - name: deploy-api
    max_ttl: 15m
    api_token: {{audience: https://deploy.acme.example, scopes: ["deploy:${{repository}}"]}}
  - name: pg-app
    max_ttl: 15m
    postgres: {{target: main, database: {db}, owner: {owner}}}
rules:
  - name: acme-main
    issuer: github
    credentials: [deploy-api{pg}]
    when: claims.repository_id == "1000001" && claims.ref == "refs/heads/main"
"#,
        db = app.db("app"),
        owner = app.group("owner"),
        pg = if pg_rule { ", pg-app" } else { "" },
    )
}

struct Cluster {
    app: PgApp,
    policies: std::path::PathBuf,
    issuer: TestIssuer,
    db: TestDb,
    replicas: [BrokerProcess; 2],
    operator_token: String,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl Cluster {
    async fn start() -> Self {
        let app = PgApp::new("r", &["app"], &["owner"]).await;
        let issuer = TestIssuer::start().await;
        let db = TestDb::postgres().await;
        let dir = tempfile::tempdir().unwrap();
        let policies = dir.path().join("policies");
        std::fs::create_dir(&policies).unwrap();
        project_configmap(&policies, 1, &[("replicas.yaml", &policy(&app, true))]);
        // One signing key for both replicas (the chart mounts it from one Secret): a token
        // minted by one must introspect on the other.
        let key = integration::write_signing_key(dir.path());
        let operator_token = format!("brk_op_{}", broker::secret::random_token(32));
        let extra = format!(
            "api_tokens:\n  signing_key: {{file: {key}}}\n\
             {targets}\
             operators:\n  - name: secteam\n    role: admin\n    token_sha256: {hash}\n\
             reaper:\n  interval: 1s\n\
             limits:\n  exchanges_per_minute_per_repository: 0\n\
             metrics:\n  danger_public_diagnostics: true\n",
            key = key.display(),
            targets = app.target_yaml(""),
            hash = broker::secret::sha256_hex(operator_token.as_bytes()),
        );
        let setup = BrokerSetup::new(db.url(), &policies, github_issuer_yaml(&issuer.url()))
            .extra(extra)
            // One public URL (the API tokens' `iss`) for both, as behind one Service.
            .env(vec![
                (
                    "BROKER_PUBLIC_URL".to_owned(),
                    "https://broker.replicas.test".to_owned(),
                ),
                // As the chart configures it (policies.watch_interval), only faster.
                ("BROKER_POLICIES_WATCH_INTERVAL".to_owned(), "1s".to_owned()),
            ]);
        // The second replica starts after the first has migrated the store, as after the
        // chart's migration hook.
        let a = BrokerProcess::start(&setup)
            .await
            .expect("replica a starts");
        let b = BrokerProcess::start(&setup)
            .await
            .expect("replica b starts");
        Self {
            app,
            policies,
            issuer,
            db,
            replicas: [a, b],
            operator_token,
            http: http::client(),
            _dir: dir,
        }
    }

    fn url(&self, replica: usize) -> &str {
        &self.replicas[replica % 2].url
    }

    async fn post(&self, url: String, token: &str, body: Value) -> (u16, Value) {
        let r = self
            .http
            .post(url)
            .bearer_auth(token)
            .json(&body)
            .send()
            .await
            .expect("request");
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    async fn exchange(&self, replica: usize, ttl: &str) -> (u16, Value) {
        self.exchange_for(replica, &["deploy-api", "pg-app"], ttl)
            .await
    }

    async fn exchange_for(&self, replica: usize, creds: &[&str], ttl: &str) -> (u16, Value) {
        let token = acme_token(&self.issuer.url());
        self.post(
            format!("{}/v1/exchange", self.url(replica)),
            &token,
            json!({"credentials": creds, "ttl": ttl}),
        )
        .await
    }

    /// The policy digest a replica serves (`/readyz`).
    async fn digest(&self, replica: usize) -> String {
        let v: Value = self
            .http
            .get(format!("{}/readyz", self.url(replica)))
            .send()
            .await
            .expect("readyz")
            .json()
            .await
            .expect("readyz json");
        v["policies"]["digest"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    async fn admin(&self, replica: usize, action: &str, body: Value) -> (u16, Value) {
        self.post(
            format!("{}/v1/admin/{action}", self.url(replica)),
            &self.operator_token,
            body,
        )
        .await
    }

    async fn introspect(&self, replica: usize, token: &str) -> bool {
        Api::new(self.http.clone(), self.url(replica))
            .active(token)
            .await
    }

    /// `(grant id, API token)` of `n` exchanges, alternating replicas, all asserted 200.
    async fn mint(&self, n: usize, ttl: &str) -> Vec<(String, String, usize)> {
        let mut out = Vec::new();
        for i in 0..n {
            let (status, body) = self.exchange(i, ttl).await;
            assert_eq!(status, 200, "replica {}: {body}", i % 2);
            out.push((
                body["grant_id"].as_str().unwrap().to_owned(),
                body["credentials"]["deploy-api"]["token"]
                    .as_str()
                    .unwrap()
                    .to_owned(),
                i % 2,
            ));
        }
        out
    }

    /// Audit events of `action` per grant (from the shared store).
    async fn audit_counts(&self, action: &str) -> std::collections::BTreeMap<String, i64> {
        let pool = PgPool::connect(self.db.url()).await.expect("store");
        let rows = sqlx::query(
            "SELECT grant_id::text, count(*) FROM audit_events WHERE action = $1 AND grant_id IS NOT NULL GROUP BY grant_id",
        )
        .bind(action)
        .fetch_all(&pool)
        .await
        .expect("audit counts");
        pool.close().await;
        rows.into_iter().map(|r| (r.get(0), r.get(1))).collect()
    }

    async fn finish(self) {
        let Cluster {
            app,
            issuer,
            db,
            replicas,
            ..
        } = self;
        drop(replicas);
        issuer.shutdown().await;
        db.cleanup().await;
        app.cleanup().await;
    }
}

/// Exchanges on both replicas; tokens introspect on either; revoke-all sent to replica A drops
/// the users and deactivates the tokens replica B minted; a freeze set through B stops A.
#[tokio::test]
async fn two_replicas_share_grants_revoke_all_and_freeze() {
    let c = Cluster::start().await;
    let minted = c.mint(8, "10m").await;
    assert_eq!(c.app.roles().await, 8, "one Postgres user per grant");
    let allows = c.audit_counts("exchange").await;
    assert_eq!(allows.len(), 8, "every grant audited once: {allows:?}");
    for (_, token, by) in &minted {
        assert!(
            c.introspect(1 - by, token).await,
            "active on the other replica"
        );
    }

    // Revoke-all through replica A reaches what B minted.
    let (status, report) = c
        .admin(0, "revoke-all", json!({"reason": "replica drill"}))
        .await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(
        c.app.wait_roles(0, 300).await,
        0,
        "every Postgres user dropped"
    );
    for (grant, token, by) in &minted {
        assert!(
            !c.introspect(*by, token).await && !c.introspect(1 - by, token).await,
            "grant {grant} (minted by replica {by}) still active"
        );
    }
    let revoked = c.audit_counts("revoke").await;
    for (grant, _, by) in &minted {
        assert_eq!(
            revoked.get(grant),
            Some(&1),
            "grant {grant} of replica {by} revoked once"
        );
    }

    // A freeze set through B is honoured by A within FREEZE_REFRESH (5 s); we allow 15 s so a
    // slow machine does not fail the test, and report how long it took.
    let (status, body) = c
        .admin(1, "freeze", json!({"reason": "replica drill"}))
        .await;
    assert_eq!(status, 200, "{body}");
    let started = Instant::now();
    let mut refused = None;
    while started.elapsed() < Duration::from_secs(15) {
        let (status, body) = c.exchange(0, "10m").await;
        if status == 403 {
            refused = Some(body);
            break;
        }
        assert_eq!(status, 200, "{body}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let refused = refused.expect("replica A honours B's freeze");
    assert_eq!(refused["error"], "frozen", "{refused}");
    eprintln!(
        "freeze set on B refused on A after {:.1}s",
        started.elapsed().as_secs_f64()
    );
    // Unfreeze through A; B issues again.
    let (status, body) = c
        .admin(0, "unfreeze", json!({"reason": "drill over"}))
        .await;
    assert_eq!(status, 200, "{body}");
    let started = Instant::now();
    let mut ok = false;
    while started.elapsed() < Duration::from_secs(15) {
        if c.exchange(1, "10m").await.0 == 200 {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(ok, "replica B issues again after the unfreeze");
    c.finish().await;
}

/// Both reapers run (interval 1 s) against the same expiring grants: each grant is revoked
/// exactly once (one `expire` event, no failure), every Postgres user is dropped, and the
/// `/metrics` of either replica shows no active grant and no lag once they are done.
#[tokio::test]
async fn both_reapers_revoke_every_expired_grant_exactly_once() {
    let c = Cluster::start().await;
    const N: usize = 16;
    let minted = c.mint(N, "2s").await;
    assert_eq!(c.app.roles().await, N as i64);
    assert_eq!(
        c.app.wait_roles(0, 300).await,
        0,
        "the reapers dropped every user"
    );
    // Wait until the store has no live grant, then count.
    let store = c.db.store();
    let started = Instant::now();
    loop {
        let s = store.stats().await.expect("stats");
        if s.active_grants == 0 && s.issuing_grants == 0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "grants still live: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let expired = c.audit_counts("expire").await;
    for (grant, token, by) in &minted {
        assert_eq!(
            expired.get(grant),
            Some(&1),
            "grant {grant} (replica {by}) expired exactly once: {expired:?}"
        );
        assert!(!c.introspect(*by, token).await);
    }
    assert_eq!(expired.len(), N, "no other grant expired");
    assert!(
        c.audit_counts("revoke_failed").await.is_empty(),
        "no revocation failed"
    );
    for replica in 0..2 {
        let text = http::get_text(&c.http, &format!("{}/metrics", c.url(replica))).await;
        assert_eq!(
            series(&text, r#"broker_active_grants{kind="postgres"}"#),
            Some(0.0),
            "{text}"
        );
        assert_eq!(series(&text, "broker_reaper_lag_seconds "), Some(0.0));
        assert_eq!(
            series(
                &text,
                r#"broker_exchanges_total{outcome="allow",reason="ok",kind="mixed"}"#
            ),
            Some((N / 2) as f64),
            "replica {replica} counted its own exchanges: {text}"
        );
    }
    c.finish().await;
}

/// The value of the first series line starting with `prefix` in a metrics text.
fn series(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// A ConfigMap update (the kubelet's atomic `..data` swap) reaches both replicas without a
/// restart (`policies.watch_interval`): both serve the new digest and apply the new rules; a
/// broken update is rejected and both keep serving the last good bundle.
#[tokio::test]
async fn policy_configmap_update_reaches_both_replicas_without_restart() {
    let c = Cluster::start().await;
    let before = c.digest(0).await;
    assert_eq!(before, c.digest(1).await);
    assert_eq!(c.exchange_for(1, &["pg-app"], "5m").await.0, 200);
    let pids = [c.replicas[0].pid(), c.replicas[1].pid()];

    // Withdraw pg-app from the rule.
    project_configmap(&c.policies, 2, &[("replicas.yaml", &policy(&c.app, false))]);
    let started = Instant::now();
    let after = loop {
        let (a, b) = (c.digest(0).await, c.digest(1).await);
        if a != before && a == b {
            break a;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "replicas still serve {a} / {b}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!(
        "policy update served by both replicas after {:.1}s",
        started.elapsed().as_secs_f64()
    );
    for replica in 0..2 {
        let (status, body) = c.exchange_for(replica, &["pg-app"], "5m").await;
        assert_eq!(status, 403, "replica {replica}: {body}");
        assert_eq!(c.exchange_for(replica, &["deploy-api"], "5m").await.0, 200);
    }

    // A broken update is refused by both; the last good bundle stays in force.
    project_configmap(&c.policies, 3, &[("replicas.yaml", "rules: [unclosed\n")]);
    let started = Instant::now();
    loop {
        let mut rejected = 0;
        for replica in 0..2 {
            let v: Value = http::get_json(&c.http, &format!("{}/readyz", c.url(replica))).await;
            assert_eq!(v["policies"]["digest"], after.as_str(), "{v}");
            if v["policies"]["last_error"].is_string() {
                rejected += 1;
            }
        }
        if rejected == 2 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "broken update not reported"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(c.exchange_for(0, &["deploy-api"], "5m").await.0, 200);
    assert_eq!(
        [c.replicas[0].pid(), c.replicas[1].pid()],
        pids,
        "no replica restarted"
    );
    c.finish().await;
}

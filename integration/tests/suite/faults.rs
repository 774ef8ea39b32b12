//! Faults against the running binary: the store cut or hung (through a TCP proxy the test
//! controls), the broker SIGKILLed at every step of an exchange and of a revocation, the
//! issuer's JWKS endpoint down and flooded with unknown `kid`s. Each time: a clean stable
//! error, nothing issued that is not recorded, and after recovery nothing left behind.
//!
//! Covered elsewhere (not repeated): a credential target down mid-exchange is all or nothing
//! (`postgres_provider.rs`: `target_down_is_target_unavailable_and_leaves_nothing`); key
//! rotation after the unknown-`kid` cooldown and stale-while-down expiry with an injected clock
//! (`broker/src/oidc/verifier/tests.rs`).

use broker::oidc::testkit::{self, TestIssuer, TestKey};
use broker::store::testdb::TestDb;
use broker::store::{AuditFilter, GrantStatus};
use integration::store_db::audit_log;
use integration::wait::eventually;
use integration::{
    AUD, BrokerProcess, BrokerSetup, FaultProxy, PgRoleTarget, ProxyMode, Secrets, acme_api_claims,
    acme_token, github_issuer_yaml, github_policies,
};
use serde_json::{Value, json};
use std::time::Duration;

const REAPER: &str = "reaper:\n  interval: 1s\n  stale_issuing_after: 2s\n  lease: 3s\n";

struct Client {
    http: reqwest::Client,
    url: String,
}

impl Client {
    fn new(broker: &BrokerProcess) -> Self {
        Self {
            http: integration::http::client_with_timeout(Duration::from_secs(30)),
            url: broker.url.clone(),
        }
    }

    /// (status, Retry-After, body); status 0 when the connection broke.
    async fn post(
        &self,
        path: &str,
        token: &str,
        body: Option<Value>,
    ) -> (u16, Option<u64>, Value) {
        let mut req = self
            .http
            .post(format!("{}{path}", self.url))
            .bearer_auth(token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        match req.send().await {
            Ok(r) => {
                let retry = r
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok());
                (
                    r.status().as_u16(),
                    retry,
                    r.json().await.unwrap_or(Value::Null),
                )
            }
            Err(e) => (0, None, json!({"client_error": e.to_string()})),
        }
    }

    async fn exchange(
        &self,
        token: &str,
        credential: &str,
        ttl: &str,
    ) -> (u16, Option<u64>, Value) {
        self.post(
            "/v1/exchange",
            token,
            Some(json!({"credentials": [credential], "ttl": ttl})),
        )
        .await
    }

    async fn ready(&self) -> u16 {
        match self.http.get(format!("{}/readyz", self.url)).send().await {
            Ok(r) => r.status().as_u16(),
            Err(_) => 0,
        }
    }
}

fn token(issuer: &TestIssuer) -> String {
    acme_token(&issuer.url())
}

fn host_port(url: &str) -> String {
    let u = url::Url::parse(url).expect("url");
    format!(
        "{}:{}",
        u.host_str().unwrap_or("127.0.0.1"),
        u.port().unwrap_or(5432)
    )
}

/// The store (Postgres) cut, then hung, with the broker running throughout: 503 with a stable
/// code and `Retry-After` while it is away, nothing minted, readiness says so; served again
/// once it is back, without a restart. A hung store also exercises the request timeout and the
/// concurrency limit (load shedding).
#[tokio::test]
async fn store_down_or_stalled_is_503_then_recovers_without_restart() {
    let issuer = TestIssuer::start().await;
    let db = TestDb::postgres().await;
    let proxy = FaultProxy::start(host_port(db.url())).await.expect("proxy");
    let via = proxy.url_via(db.url()).expect("proxy url");
    let policies = github_policies().unwrap();
    let mut broker = BrokerProcess::start(&BrokerSetup::new(
        &via,
        policies.path(),
        github_issuer_yaml(&issuer.url()),
    )
    .extra(format!(
        "{REAPER}limits:\n  request_timeout: 2s\n  max_concurrency: 2\n  exchanges_per_minute_per_repository: 0\n"
    )))
    .await
    .expect("broker starts");
    let pid = broker.pid();
    let c = Client::new(&broker);
    let mut secrets = Secrets::default();
    let mut granted = Vec::new();
    let grant = |body: &Value, secrets: &mut Secrets, granted: &mut Vec<String>| {
        secrets.add_response(body);
        granted.push(body["revocation_token"].as_str().unwrap().to_owned());
    };

    let t = token(&issuer);
    secrets.add(t.clone());
    let (status, _, body) = c.exchange(&t, "deploy-api", "5m").await;
    assert_eq!(status, 200, "{body}");
    grant(&body, &mut secrets, &mut granted);

    // --- down ---
    proxy.set(ProxyMode::Down);
    for _ in 0..3 {
        let t = token(&issuer);
        secrets.add(t.clone());
        let (status, retry, body) = c.exchange(&t, "deploy-api", "5m").await;
        assert_eq!(
            (status, body["error"].as_str()),
            (503, Some("store_unavailable")),
            "{body}"
        );
        assert!(retry.is_some(), "503 carries Retry-After");
        assert!(body.get("credentials").is_none() && body.get("revocation_token").is_none());
    }
    assert_eq!(c.ready().await, 503, "readiness reports the store");
    // A revocation cannot be recorded either: refused, retried later by the job.
    let (status, _, body) = c.post("/v1/revoke", &granted[0], None).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (503, Some("store_unavailable"))
    );

    // --- back up: served again by the same process ---
    proxy.set(ProxyMode::Up);
    let mut back = None;
    for _ in 0..50 {
        let t = token(&issuer);
        secrets.add(t.clone());
        let (status, _, body) = c.exchange(&t, "deploy-api", "5m").await;
        if status == 200 {
            back = Some(body);
            break;
        }
        assert_eq!(
            (status, body["error"].as_str()),
            (503, Some("store_unavailable"))
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    grant(
        &back.expect("served again after the store came back"),
        &mut secrets,
        &mut granted,
    );
    assert_eq!(c.ready().await, 200);

    // --- stalled: the request timeout answers, and with both slots taken the limit sheds ---
    proxy.set(ProxyMode::Stall);
    let t = token(&issuer);
    secrets.add(t.clone());
    let (status, retry, body) = c.exchange(&t, "deploy-api", "5m").await;
    assert_eq!(status, 503, "{body}");
    // The request timeout (2 s) is shorter than the store's acquire timeout (3 s): it answers.
    assert_eq!(body["error"], "timeout", "{body}");
    assert!(retry.is_some());
    // Two requests hang in both concurrency slots; the next one is shed at once. The head start
    // is not a timing assertion: if the probe itself got a slot (a slow machine), it times out
    // and the round is tried again.
    let mut shed = None;
    for _round in 0..3 {
        let hung: Vec<_> = (0..2)
            .map(|_| {
                let t = token(&issuer);
                secrets.add(t.clone());
                let c = Client::new(&broker);
                tokio::spawn(async move { c.exchange(&t, "deploy-api", "5m").await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(700)).await;
        let t = token(&issuer);
        secrets.add(t.clone());
        let (status, retry, body) = c.exchange(&t, "deploy-api", "5m").await;
        for h in hung {
            let (status, _, body) = h.await.expect("task");
            assert_eq!(
                (status, body["error"].as_str()),
                (503, Some("timeout")),
                "{body}"
            );
        }
        if body["error"] == "overloaded" {
            shed = Some((status, retry));
            break;
        }
        assert_eq!(
            (status, body["error"].as_str()),
            (503, Some("timeout")),
            "{body}"
        );
    }
    assert_eq!(shed, Some((503, Some(1))), "the third request was shed");

    // --- back again ---
    proxy.set(ProxyMode::Up);
    let mut back = None;
    for _ in 0..50 {
        let t = token(&issuer);
        secrets.add(t.clone());
        let (status, _, body) = c.exchange(&t, "deploy-api", "5m").await;
        if status == 200 {
            back = Some(body);
            break;
        }
        assert_eq!(status, 503, "{body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    grant(
        &back.expect("served again after the stall"),
        &mut secrets,
        &mut granted,
    );
    assert_eq!(broker.pid(), pid, "never restarted");

    // Exactly the grants that were answered 200 exist (a request cut by the timeout after its
    // intent was written is `issuing` and the reaper fails it); each has its allow event.
    let store = db.store();
    assert!(
        eventually(|| async { store.stats().await.unwrap().issuing_grants == 0 }).await,
        "no grant left issuing"
    );
    let st = store.stats().await.unwrap();
    assert_eq!(st.active_grants as usize, granted.len());
    let events = store
        .audit_events(&AuditFilter {
            limit: 1000,
            ..AuditFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(
        events.iter().filter(|e| e.reason == "ok").count(),
        granted.len()
    );
    for r in &granted {
        let (status, _, body) = c.post("/v1/revoke", r, None).await;
        assert_eq!(status, 200, "{body}");
    }
    assert_eq!(store.stats().await.unwrap().active_grants, 0);
    secrets.assert_not_leaked(&broker, db.url()).await;
    broker.kill();
    drop(proxy);
    issuer.shutdown().await;
    db.cleanup().await;
}

fn fault(point: &str) -> Vec<(String, String)> {
    vec![("BROKER_FAULT_POINT".into(), point.into())]
}

/// SIGKILL-like abort at each fault point of an exchange and of a revocation, with a real
/// Postgres target: after a restart (same config, no fault) the reaper leaves zero roles with
/// the prefix, and every grant ends final.
#[tokio::test]
async fn crash_at_every_step_leaves_no_orphaned_credential() {
    let pg = PgRoleTarget::new().await.expect("pg target");
    let issuer = TestIssuer::start().await;
    let db = TestDb::postgres().await;
    let policies = tempfile::tempdir().unwrap();
    std::fs::write(policies.path().join("pg.yaml"), pg.policy()).unwrap();
    let mut broker = BrokerProcess::start(
        &BrokerSetup::new(db.url(), policies.path(), github_issuer_yaml(&issuer.url()))
            .extra(format!("{}{REAPER}", pg.yaml())),
    )
    .await
    .expect("broker starts");
    let store = db.store();
    let mut secrets = Secrets::default();
    let mut report = Vec::new();

    // Exchange steps: the exchange never succeeds; what was done is undone after restart.
    for point in ["after_intent", "after_mint", "after_activate"] {
        broker.restart(&fault(point)).await.expect("restart");
        let c = Client::new(&broker);
        let t = token(&issuer);
        secrets.add(t.clone());
        // A short TTL so that a grant activated before the crash expires within the test.
        let (status, _, body) = c.exchange(&t, "pg-app", "3s").await;
        assert_ne!(status, 200, "{point}: the crashed exchange answered {body}");
        assert!(broker.wait_exit().await.is_some(), "{point}: aborted");
        let roles_at_crash = pg.roles().await;
        broker.restart(&[]).await.expect("restart");
        let clean = eventually(|| async {
            let s = store.stats().await.unwrap();
            pg.roles().await == 0 && s.issuing_grants == 0 && s.active_grants == 0
        })
        .await;
        assert!(clean, "{point}: roles or grants left behind");
        report.push(format!(
            "{point}: {roles_at_crash} role(s) at the crash, 0 after"
        ));
    }

    // Revocation steps: the grant is active, the revoke crashes; after restart the reaper
    // takes the lapsed lease and finishes it.
    for point in ["before_revoke", "after_revoke"] {
        broker.restart(&[]).await.expect("restart");
        let c = Client::new(&broker);
        let t = token(&issuer);
        secrets.add(t.clone());
        let (status, _, body) = c.exchange(&t, "pg-app", "10m").await;
        assert_eq!(status, 200, "{point}: {body}");
        secrets.add_response(&body);
        let grant_id: uuid::Uuid = body["grant_id"].as_str().unwrap().parse().unwrap();
        assert_eq!(pg.roles().await, 1);
        broker.restart(&fault(point)).await.expect("restart");
        let c = Client::new(&broker);
        let (status, _, _) = c
            .post(
                "/v1/revoke",
                body["revocation_token"].as_str().unwrap(),
                None,
            )
            .await;
        assert_ne!(status, 200, "{point}: the crashed revoke answered");
        assert!(broker.wait_exit().await.is_some(), "{point}: aborted");
        let roles_at_crash = pg.roles().await;
        broker.restart(&[]).await.expect("restart");
        let done = eventually(|| async {
            pg.roles().await == 0
                && store.grant(grant_id).await.unwrap().unwrap().status == GrantStatus::Revoked
        })
        .await;
        assert!(done, "{point}: role left or grant not revoked");
        report.push(format!(
            "{point}: {roles_at_crash} role(s) at the crash, 0 after"
        ));
    }
    eprintln!("crash recovery: {}", report.join("; "));

    let s = store.stats().await.unwrap();
    assert_eq!((s.active_grants, s.issuing_grants), (0, 0));
    // Every grant ended with an audited final event (recover / expire / revoke).
    let events = store
        .audit_events(&AuditFilter {
            limit: 1000,
            ..AuditFilter::default()
        })
        .await
        .unwrap();
    let finals = events
        .iter()
        .filter(|e| {
            matches!(
                json!(e.action).as_str(),
                Some("recover" | "expire" | "revoke")
            ) && json!(e.outcome) == json!("success")
        })
        .count();
    assert_eq!(finals, 5, "one final event per crashed grant");
    secrets.assert_not_leaked(&broker, db.url()).await;
    broker.kill();
    issuer.shutdown().await;
    db.cleanup().await;
    pg.cleanup().await;
}

/// The issuer's JWKS endpoint down: keys fetched before keep verifying. A flood of unknown
/// `kid`s (issuer down, then up) costs at most one fetch per cooldown window, counted at the
/// issuer; each is refused `unknown_key` and audited.
#[tokio::test]
async fn jwks_down_serves_cached_keys_and_kid_floods_are_not_amplified() {
    let issuer = TestIssuer::start().await;
    let db = TestDb::postgres().await;
    let policies = github_policies().unwrap();
    let broker = BrokerProcess::start(&BrokerSetup::new(
        db.url(),
        policies.path(),
        github_issuer_yaml(&issuer.url()),
    )
    // A 1 s refusal window: the flood's aggregate audit events land within the test.
    .extra("limits:\n  exchanges_per_minute_per_repository: 0\nrefusals:\n  audit_window: 1s\n"))
    .await
    .expect("broker starts");
    let c = Client::new(&broker);
    let mut secrets = Secrets::default();
    let mut revocations = Vec::new();
    let t = token(&issuer);
    secrets.add(t.clone());
    let (status, _, body) = c.exchange(&t, "deploy-api", "5m").await;
    assert_eq!(status, 200, "{body}");
    secrets.add_response(&body);
    revocations.push(body["revocation_token"].as_str().unwrap().to_owned());

    issuer.set_down(true);
    let t = token(&issuer);
    secrets.add(t.clone());
    let (status, _, body) = c.exchange(&t, "deploy-api", "5m").await;
    assert_eq!(
        status, 200,
        "cached keys verify while the issuer is down: {body}"
    );
    secrets.add_response(&body);
    revocations.push(body["revocation_token"].as_str().unwrap().to_owned());

    const FLOOD: usize = 100;
    let flood = |round: usize| {
        let iss = issuer.url();
        let c = Client::new(&broker);
        async move {
            let futs = (0..FLOOD).map(|i| {
                let c = &c;
                let t = testkit::sign_raw(
                    &json!({"alg": "RS256", "typ": "JWT", "kid": format!("flood-{round}-{i}")}),
                    &acme_api_claims(&iss, AUD),
                    testkit::SignWith::Key(TestKey::Rsa2),
                );
                async move { c.exchange(&t, "deploy-api", "5m").await }
            });
            futures::future::join_all(futs).await
        }
    };
    for (round, down) in [(0, true), (1, false)] {
        issuer.set_down(down);
        let before = issuer.requests();
        let results = flood(round).await;
        // Unknown keys are failed verifications: past the client's failure burst they are
        // answered 429 (after the same verification, so the fetch bound below still holds).
        for (status, _, body) in &results {
            assert!(
                matches!(
                    (*status, body["error"].as_str()),
                    (401, Some("unknown_key")) | (429, Some("too_many_failures"))
                ),
                "{body}"
            );
        }
        let fetched = issuer.requests() - before;
        eprintln!(
            "kid flood ({}): {FLOOD} unknown kids → {fetched} request(s) at the issuer",
            if down { "issuer down" } else { "issuer up" }
        );
        assert!(fetched <= 1, "{fetched} fetches for one cooldown window");
    }
    // Every refusal is audited: one row each up to the window's row budget, the rest counted
    // in aggregate events (written once their 1 s window ends).
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    let events = audit_log(&db, 1000).await;
    let flood_events = events
        .iter()
        .filter(|e| ["unknown_key", "too_many_failures"].contains(&e.reason.as_str()));
    let accounted: u64 = flood_events
        .map(|e| e.aggregate.as_ref().map_or(1, |a| a.count))
        .sum();
    assert_eq!(accounted, 2 * FLOOD as u64);
    for r in &revocations {
        let (status, _, _) = c.post("/v1/revoke", r, None).await;
        assert_eq!(status, 200);
    }
    secrets.assert_not_leaked(&broker, db.url()).await;
    drop(broker);
    issuer.shutdown().await;
    db.cleanup().await;
}

//! Load against the running binary: 64 concurrent clients, each exchanging a job token for an
//! API token or a Postgres user and revoking it, over and over. Asserts: zero unexpected
//! errors, one audit event per request (none lost), every grant revoked and every job user gone
//! at the end. Prints throughput and the broker's RSS at the start and the end (figures, not
//! assertions: machines differ).
//!
//! `load_short` (10 s) runs with the suite; `load_long` is the 60 s run:
//!   cargo test -p integration --test suite load::load_long -- --ignored --nocapture
//! `BROKER_LOAD_SECS` and `BROKER_LOAD_CLIENTS` override duration and concurrency of both.
//!
//! Also here: the HTTP limits not covered by other suites (header size, per-repository rate
//! limit with `Retry-After`). Body size is in `e2e.rs`; the request timeout and the
//! concurrency limit (load shedding) need a hung store and are in `faults.rs`.

use broker::oidc::testkit::{self, TestIssuer, TestKey};
use broker::store::testdb::TestDb;
use integration::store_db::audit_log;
use integration::wait::env_num;
use integration::{
    AUD, BrokerProcess, BrokerSetup, PgRoleTarget, Secrets, acme_api_claims, acme_token,
    github_issuer_yaml, github_policies,
};
use serde_json::{Value, json};
use sqlx::{Connection, Row};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// `VmRSS` of a process, in KiB.
fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

#[derive(Default)]
struct Counts {
    exchanges: AtomicUsize,
    revokes: AtomicUsize,
    api: AtomicUsize,
    pg: AtomicUsize,
}

async fn run_load(default_secs: u64) {
    let secs = env_num("BROKER_LOAD_SECS", default_secs);
    let clients = env_num("BROKER_LOAD_CLIENTS", 64) as usize;
    let issuer = TestIssuer::start().await;
    let db = TestDb::postgres().await;
    let pg = PgRoleTarget::new().await.expect("pg target");
    let policies = github_policies().unwrap();
    std::fs::write(policies.path().join("pg.yaml"), pg.policy()).unwrap();
    let broker = BrokerProcess::start(
        &BrokerSetup::new(db.url(), policies.path(), github_issuer_yaml(&issuer.url()))
            .extra(format!(
                "{}limits:\n  exchanges_per_minute_per_repository: 0\n",
                pg.yaml()
            ))
            // Info, not debug: a debug log of thousands of requests measures the disk.
            .env(vec![("BROKER_LOG".into(), "info".into())]),
    )
    .await
    .expect("broker starts");
    let pid = broker.pid().unwrap();
    let rss_start = rss_kib(pid);
    let counts = Arc::new(Counts::default());
    let iss = issuer.url();
    let url = broker.url.clone();
    let deadline = Instant::now() + Duration::from_secs(secs);
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|i| {
            let counts = counts.clone();
            let iss = iss.clone();
            let url = url.clone();
            tokio::spawn(async move {
                let http = integration::http::client();
                let mut errors = Vec::new();
                let mut secrets = Vec::new();
                while Instant::now() < deadline {
                    // Every fourth client asks for a Postgres user, the rest API tokens.
                    let cred = if i % 4 == 0 { "pg-app" } else { "deploy-api" };
                    let tok = acme_token(&iss);
                    let r = http
                        .post(format!("{url}/v1/exchange"))
                        .bearer_auth(&tok)
                        .json(&json!({"credentials": [cred], "ttl": "10m"}))
                        .send()
                        .await;
                    counts.exchanges.fetch_add(1, Ordering::SeqCst);
                    let body: Value = match r {
                        Ok(r) if r.status() == 200 => r.json().await.unwrap_or(Value::Null),
                        Ok(r) => {
                            let s = r.status();
                            errors.push(format!(
                                "exchange {s}: {}",
                                r.text().await.unwrap_or_default()
                            ));
                            continue;
                        }
                        Err(e) => {
                            errors.push(format!("exchange: {e}"));
                            continue;
                        }
                    };
                    if cred == "pg-app" {
                        counts.pg.fetch_add(1, Ordering::SeqCst);
                    } else {
                        counts.api.fetch_add(1, Ordering::SeqCst);
                    }
                    // Every secret of the run goes to the leak search (one pass, however many).
                    secrets.push(Value::String(tok));
                    secrets.push(body.clone());
                    let rvk = body["revocation_token"].as_str().unwrap_or_default();
                    let r = http
                        .post(format!("{url}/v1/revoke"))
                        .bearer_auth(rvk)
                        .send()
                        .await;
                    counts.revokes.fetch_add(1, Ordering::SeqCst);
                    match r {
                        Ok(r) if r.status() == 200 => {}
                        Ok(r) => {
                            let s = r.status();
                            errors.push(format!(
                                "revoke {s}: {}",
                                r.text().await.unwrap_or_default()
                            ));
                        }
                        Err(e) => errors.push(format!("revoke: {e}")),
                    }
                }
                (errors, secrets)
            })
        })
        .collect();
    let mut errors = Vec::new();
    let mut secrets = Secrets::default();
    let mut rss_peak = rss_start;
    for t in tasks {
        let (e, s) = t.await.expect("client task");
        errors.extend(e);
        for v in s {
            match v {
                Value::String(tok) => secrets.add(tok),
                body => secrets.add_response(&body),
            }
        }
        rss_peak = rss_peak.max(rss_kib(pid));
    }
    let elapsed = started.elapsed().as_secs_f64();
    let rss_end = rss_kib(pid);
    let ex = counts.exchanges.load(Ordering::SeqCst);
    let rv = counts.revokes.load(Ordering::SeqCst);
    eprintln!(
        "load: {clients} clients, {elapsed:.1}s: {ex} exchanges ({} API token, {} Postgres user) + {rv} revokes = {:.1} requests/s; RSS start {} KiB, end {} KiB",
        counts.api.load(Ordering::SeqCst),
        counts.pg.load(Ordering::SeqCst),
        (ex + rv) as f64 / elapsed,
        rss_start.unwrap_or(0),
        rss_end.unwrap_or(0),
    );
    assert!(
        errors.is_empty(),
        "{} unexpected errors, first: {:?}",
        errors.len(),
        errors.iter().take(5).collect::<Vec<_>>()
    );
    assert!(ex > 0 && counts.pg.load(Ordering::SeqCst) > 0);

    // None lost: one audit event per request (allow per exchange, success per revoke).
    let mut c = sqlx::PgConnection::connect(db.url()).await.unwrap();
    let row = sqlx::query(
        "SELECT count(*), count(*) FILTER (WHERE action = 'exchange' AND outcome = 'allow'), \
         count(*) FILTER (WHERE action = 'revoke' AND outcome = 'success') FROM audit_events",
    )
    .fetch_one(&mut c)
    .await
    .unwrap();
    let (total, allows, revokes): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    assert_eq!(
        (total, allows, revokes),
        ((ex + rv) as i64, ex as i64, rv as i64),
        "audit events == requests"
    );
    let left: i64 = sqlx::query("SELECT count(*) FROM grants WHERE status <> 'revoked'")
        .fetch_one(&mut c)
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0, "every grant revoked");
    assert_eq!(pg.roles().await, 0, "every job user dropped");
    let _ = c.close().await;
    // The store's hash chain / audit API still answer after the run.
    assert!(!audit_log(&db, 1).await.is_empty());
    secrets.assert_not_leaked(&broker, db.url()).await;
    drop(broker);
    issuer.shutdown().await;
    db.cleanup().await;
    pg.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_short() {
    run_load(10).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long load run (60 s): run explicitly"]
async fn load_long() {
    run_load(60).await;
}

/// Header size and the per-repository rate limit, each with its status, code and audit.
#[tokio::test]
async fn header_size_and_rate_limits() {
    let issuer = TestIssuer::start().await;
    let db = TestDb::postgres().await;
    let policies = github_policies().unwrap();
    let broker = BrokerProcess::start(
        &BrokerSetup::new(db.url(), policies.path(), github_issuer_yaml(&issuer.url()))
            .extra("limits:\n  exchanges_per_minute_per_repository: 3\n"),
    )
    .await
    .expect("broker starts");
    let http = integration::http::client();
    let url = format!("{}/v1/exchange", broker.url);
    let mut secrets = Secrets::default();
    let body = json!({"credentials": ["deploy-api"], "ttl": "1m"});

    // Too many header bytes in total (not one large token): refused by the server, 431.
    let mut req = http.post(&url).json(&body);
    for i in 0..64 {
        req = req.header(format!("x-pad-{i}"), "h".repeat(8 * 1024));
    }
    match req.send().await {
        Ok(r) => assert_eq!(r.status().as_u16(), 431),
        Err(e) => assert!(e.is_request() || e.is_body(), "{e}"),
    }

    // Rate limit: a burst of 3 per minute for one repository; the 4th waits.
    let mut revocations = Vec::new();
    for i in 0..4 {
        let tok = acme_token(&issuer.url());
        secrets.add(tok.clone());
        let r = http
            .post(&url)
            .bearer_auth(&tok)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let retry: Option<u64> = r
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let b: Value = r.json().await.unwrap();
        if i < 3 {
            assert_eq!(status, 200, "{b}");
            secrets.add_response(&b);
            revocations.push(b["revocation_token"].as_str().unwrap().to_owned());
        } else {
            assert_eq!(
                (status, b["error"].as_str()),
                (429, Some("rate_limited")),
                "{b}"
            );
            assert!(retry.is_some_and(|s| (1..=60).contains(&s)), "{retry:?}");
            // The job token was not consumed by the refusal.
            assert!(b.get("credentials").is_none());
        }
    }
    // Another repository has its own bucket.
    let mut other = acme_api_claims(&issuer.url(), AUD);
    other["repository_id"] = json!("1000002");
    let r = http
        .post(&url)
        .bearer_auth(testkit::sign(TestKey::Rsa1, &other))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status().as_u16(),
        403,
        "policy, not the rate limit, answers"
    );
    let events = audit_log(&db, 100).await;
    assert_eq!(
        events.iter().filter(|e| e.reason == "rate_limited").count(),
        1
    );
    for r in &revocations {
        let s = http
            .post(format!("{}/v1/revoke", broker.url))
            .bearer_auth(r)
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(s.as_u16(), 200);
    }
    secrets.assert_not_leaked(&broker, db.url()).await;
    drop(broker);
    issuer.shutdown().await;
    db.cleanup().await;
}

//! Emergency revoke-all at scale: filters in SQL, paged, resumable.
//!
//! The attack is the incident itself: a store holding far more active grants than one call can
//! read (before: the oldest 100,000 were loaded and filtered in memory, so newer matching
//! grants were never found, and SQLite's per-grant credential loads hit the store's call limit).
//! Per backend (Postgres 100,000 grants, SQLite 50,000, inserted in bulk; more with
//! `REVOKE_ALL_SCALE_PG` / `REVOKE_ALL_SCALE_SQLITE`, see `scripts/revoke-all-scale`):
//!
//! 1. a filter naming an issuer that does not exist is refused (400 `unknown_filter_value`);
//! 2. a filtered revoke-all matching the 1,000 newest bulk grants revokes exactly those, while
//!    honest jobs exchange (their grants do not match and must stay active, their exchanges
//!    must succeed);
//! 3. an unfiltered API-token revoke-all, with the broker killed (SIGKILL) mid-run and started
//!    again, then called until complete, while honest jobs exchange and revoke their own
//!    grants: every grant ends revoked with exactly one revocation event, every honest request
//!    succeeded, and the audit chain verifies.
//!
//! Times are printed, never asserted.

use broker::oidc::testkit::TestIssuer;
use broker::store::Store;
use broker::store::testdb::TestDb;
use integration::http::Api;
use integration::store_db::StoreDb;
use integration::wait::env_num;
use integration::{BrokerProcess, BrokerSetup, acme_token, github_issuer_yaml};
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

const OPERATOR_TOKEN: &str = "brk_op_revokeAllScaleAdmin0000000000000_1xzwYx";
/// Bulk grants matched by the filtered run: the newest ones.
const HOT: i64 = 1000;
/// Honest jobs running beside each run.
const HONEST_WORKERS: usize = 3;
/// Most revoke-all calls one run may take (each stops after its time budget).
const MAX_CALLS: usize = 200;

/// `n` active grants with one API token each, `HOT` newest in `bulk/hot`, the rest in
/// `bulk/old`, created a millisecond apart and ending before `now_ms`.
async fn bulk_insert(db: &StoreDb, n: i64, now_ms: i64) {
    match db {
        StoreDb::Pg(p) => {
            let mut tx = p.begin().await.unwrap();
            sqlx::query(
                "INSERT INTO grants (id, status, issuer, subject, repository, repository_id, job,
                                         bundle_digest, revocation_hash, created_at, expires_at)
                     SELECT ('00000000-0000-4000-8000-' || lpad(to_hex(i), 12, '0'))::uuid,
                            'active', 'github', 'repo:bulk',
                            CASE WHEN i > $1 - $2 THEN 'bulk/hot' ELSE 'bulk/old' END,
                            CASE WHEN i > $1 - $2 THEN '2000002' ELSE '2000001' END,
                            '{}'::jsonb, 'bulk', 'bulk-' || i,
                            to_timestamp(($3 - ($1 - i) - 1) / 1000.0),
                            to_timestamp(($3 + 7200000) / 1000.0)
                     FROM generate_series(1::bigint, $1) AS i",
            )
            .bind(n)
            .bind(HOT)
            .bind(now_ms)
            .execute(&mut *tx)
            .await
            .unwrap();
            sqlx::query(
                    "INSERT INTO grant_credentials (grant_id, position, name, kind, resource_id, details)
                     SELECT id, 0, 'api', 'api_token', replace(id::text, '-', '') || '.api', 'null'::jsonb
                     FROM grants WHERE bundle_digest = 'bulk'",
                )
                .execute(&mut *tx)
                .await
                .unwrap();
            tx.commit().await.unwrap();
            sqlx::query("ANALYZE").execute(p).await.unwrap();
        }
        StoreDb::Lite(p) => {
            let mut tx = p.begin().await.unwrap();
            sqlx::query(
                    "WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < $1)
                     INSERT INTO grants (id, status, issuer, subject, repository, repository_id, job,
                                         bundle_digest, revocation_hash, created_at, expires_at)
                     SELECT printf('00000000-0000-4000-8000-%012x', i), 'active', 'github',
                            'repo:bulk',
                            CASE WHEN i > $1 - $2 THEN 'bulk/hot' ELSE 'bulk/old' END,
                            CASE WHEN i > $1 - $2 THEN '2000002' ELSE '2000001' END,
                            '{}', 'bulk', 'bulk-' || i, $3 - ($1 - i) - 1, $3 + 7200000
                     FROM s",
                )
                .bind(n)
                .bind(HOT)
                .bind(now_ms)
                .execute(&mut *tx)
                .await
                .unwrap();
            sqlx::query(
                    "INSERT INTO grant_credentials (grant_id, position, name, kind, resource_id, details)
                     SELECT id, 0, 'api', 'api_token', replace(id, '-', '') || '.api', 'null'
                     FROM grants WHERE bundle_digest = 'bulk'",
                )
                .execute(&mut *tx)
                .await
                .unwrap();
            tx.commit().await.unwrap();
            sqlx::query("ANALYZE").execute(p).await.unwrap();
        }
    }
}

/// What the honest jobs saw: HTTP statuses of their exchanges and of their own revokes.
#[derive(Default)]
struct Honest {
    exchanges: Vec<u16>,
    revokes: Vec<u16>,
    errors: Vec<String>,
}

/// Honest jobs exchanging (and, with `revoke_own`, revoking their grant) until `stop`.
fn honest_traffic(
    url: String,
    issuer: String,
    stop: Arc<AtomicBool>,
    revoke_own: bool,
) -> tokio::task::JoinHandle<Honest> {
    tokio::spawn(async move {
        let http = integration::http::client_with_timeout(Duration::from_secs(30));
        let workers = (0..HONEST_WORKERS).map(|_| {
            let (http, url, issuer, stop) =
                (http.clone(), url.clone(), issuer.clone(), stop.clone());
            async move {
                let mut h = Honest::default();
                while !stop.load(Ordering::Relaxed) {
                    let token = acme_token(&issuer);
                    let r = http
                        .post(format!("{url}/v1/exchange"))
                        .bearer_auth(token)
                        .json(&json!({"credentials": ["api"]}))
                        .send()
                        .await;
                    let (status, body) = match r {
                        Ok(r) => (
                            r.status().as_u16(),
                            r.json::<Value>().await.unwrap_or(Value::Null),
                        ),
                        Err(e) => {
                            h.errors.push(format!("exchange: {e}"));
                            continue;
                        }
                    };
                    h.exchanges.push(status);
                    if status != 200 {
                        h.errors.push(format!("exchange {status}: {body}"));
                    }
                    if revoke_own && let Some(rt) = body["revocation_token"].as_str() {
                        match http
                            .post(format!("{url}/v1/revoke"))
                            .bearer_auth(rt)
                            .send()
                            .await
                        {
                            Ok(r) => h.revokes.push(r.status().as_u16()),
                            Err(e) => h.errors.push(format!("revoke: {e}")),
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                h
            }
        });
        let mut all = Honest::default();
        for h in futures::future::join_all(workers).await {
            all.exchanges.extend(h.exchanges);
            all.revokes.extend(h.revokes);
            all.errors.extend(h.errors);
        }
        all
    })
}

async fn revoke_all_call(http: &reqwest::Client, url: &str, filter: &Value) -> (u16, Value) {
    Api::new(http.clone(), url)
        .revoke_all(
            OPERATOR_TOKEN,
            &json!({"reason": "revoke_all_scale: simulated compromise", "filter": filter}),
        )
        .await
}

/// Call revoke-all until it answers `complete: true` (at most `MAX_CALLS` calls). Returns the
/// calls made and the grants revoked in total.
async fn revoke_all_until_complete(
    http: &reqwest::Client,
    url: &str,
    filter: &Value,
) -> (usize, u64) {
    let mut revoked = 0;
    for calls in 1..=MAX_CALLS {
        let (status, body) = revoke_all_call(http, url, filter).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["failures"], json!([]), "{body}");
        revoked += body["revoked_grants"].as_u64().unwrap();
        if body["complete"] == true {
            return (calls, revoked);
        }
    }
    panic!("revoke-all did not complete in {MAX_CALLS} calls");
}

async fn scale(db: TestDb, n: i64, label: &str) {
    let issuer = TestIssuer::start().await;
    let policies = tempfile::tempdir().unwrap();
    std::fs::write(
        policies.path().join("scale.yaml"),
        "credentials:\n  - name: api\n    max_ttl: 2h\n    api_token:\n      audience: https://svc.test\n      scopes: [\"deploy\"]\n\
         rules:\n  - name: acme\n    issuer: github\n    credentials: [api]\n    when: claims.repository_id == \"1000001\"\n",
    )
    .unwrap();
    let store = StoreDb::connect(db.url()).await;
    let now_ms = i64::try_from(
        std::time::SystemTime::UNIX_EPOCH
            .elapsed()
            .unwrap()
            .as_millis(),
    )
    .unwrap();
    let t = Instant::now();
    bulk_insert(&store, n, now_ms).await;
    eprintln!(
        "[{label}] inserted {n} active grants in bulk in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let env: Vec<(String, String)> = vec![("BROKER_LOG".into(), "info".into())];
    let mut broker = BrokerProcess::start(
        &BrokerSetup::new(db.url(), policies.path(), github_issuer_yaml(&issuer.url()))
            .extra(format!(
                "limits:\n  exchanges_per_minute_per_repository: 0\n\
         operators:\n  - name: secteam\n    role: admin\n    token_sha256: {}\n",
                broker::secret::sha256_hex(OPERATOR_TOKEN.as_bytes())
            ))
            .env(env.clone()),
    )
    .await
    .expect("broker starts");
    let http = integration::http::client_with_timeout(Duration::from_secs(60));

    // ---- 1. unknown names are refused, listing what exists --------------------------------
    let (s, body) = revoke_all_call(&http, &broker.url, &json!({"issuer": "githb"})).await;
    assert_eq!(s, 400, "{body}");
    assert_eq!(body["error"], "unknown_filter_value");
    assert!(
        body["message"].as_str().unwrap().contains("github"),
        "{body}"
    );
    let (s, body) = {
        let r = http
            .post(format!("{}/v1/admin/freeze", broker.url))
            .bearer_auth(OPERATOR_TOKEN)
            .json(&json!({"reason": "typo", "filter": {"credential": "apii"}}))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json::<Value>().await.unwrap())
    };
    assert_eq!(s, 400, "{body}");
    assert_eq!(body["error"], "unknown_filter_value");
    assert_eq!(store.number("SELECT count(*) FROM broker_freeze").await, 0);

    // ---- 2. filtered: exactly the 1,000 newest, beside honest exchanges -------------------
    let stop = Arc::new(AtomicBool::new(false));
    let honest = honest_traffic(broker.url.clone(), issuer.url(), stop.clone(), false);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t = Instant::now();
    let (calls, revoked) =
        revoke_all_until_complete(&http, &broker.url, &json!({"repository": "bulk/hot"})).await;
    let filtered = t.elapsed();
    stop.store(true, Ordering::Relaxed);
    let seen = tokio::time::timeout(Duration::from_secs(60), honest)
        .await
        .expect("honest traffic stops")
        .unwrap();
    eprintln!(
        "[{label}] filtered revoke-all of the {HOT} newest among {n}: {revoked} revoked in {:.2} s \
         ({calls} call(s)); honest exchanges meanwhile: {}",
        filtered.as_secs_f64(),
        seen.exchanges.len()
    );
    assert_eq!(revoked, HOT as u64);
    assert!(seen.errors.is_empty(), "{:?}", seen.errors);
    assert!(!seen.exchanges.is_empty());
    assert_eq!(
        store
            .number(
                "SELECT count(*) FROM grants WHERE repository = 'bulk/hot' AND status = 'revoked'"
            )
            .await,
        HOT
    );
    assert_eq!(
        store
            .number(
                "SELECT count(*) FROM grants WHERE repository = 'bulk/old' AND status = 'active'"
            )
            .await,
        n - HOT
    );
    assert_eq!(
        store
            .number(
                "SELECT count(*) FROM grants WHERE repository = 'acme/api' AND status = 'active'"
            )
            .await,
        seen.exchanges.len() as i64,
        "honest grants do not match and stay active"
    );
    assert_eq!(
        store
            .number(
                "SELECT count(DISTINCT grant_id) FROM audit_events WHERE reason = 'requested'
                 AND actor = 'operator:secteam'
                 AND grant_id IN (SELECT id FROM grants WHERE repository = 'bulk/hot')"
            )
            .await,
        HOT
    );
    assert_eq!(
        store
            .number("SELECT count(*) FROM audit_events WHERE reason = 'requested'")
            .await,
        HOT,
        "one revocation event per revoked grant, none other"
    );

    // ---- 3. unfiltered API-token run, broker killed mid-run, resumed ----------------------
    let killed_run = {
        let (http, url) = (http.clone(), broker.url.clone());
        tokio::spawn(async move {
            // The kill cuts this call: no answer is the expected outcome.
            let r = http
                .post(format!("{url}/v1/admin/revoke-all"))
                .bearer_auth(OPERATOR_TOKEN)
                .json(&json!({"reason": "revoke_all_scale: cut", "filter": {"kind": "api_token"}}))
                .send()
                .await
                .ok()?;
            let status = r.status().as_u16();
            Some((status, r.json::<Value>().await.ok()?))
        })
    };
    let started = Instant::now();
    let wait = Instant::now();
    loop {
        let done = store
            .number(
                "SELECT count(*) FROM grants WHERE repository = 'bulk/old' AND status = 'revoked'",
            )
            .await;
        if done > 0 {
            break;
        }
        assert!(
            wait.elapsed() < Duration::from_secs(60),
            "the run revoked nothing in 60 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    broker.kill();
    let before_kill = started.elapsed();
    let cut = tokio::time::timeout(Duration::from_secs(30), killed_run)
        .await
        .expect("the killed call ends")
        .unwrap();
    if let Some((s, b)) = &cut {
        // Only possible if the call's budget ended just before the kill.
        assert!(*s == 200 && b["complete"] == false, "{s} {b}");
    }
    let at_kill = store
        .number("SELECT count(*) FROM grants WHERE bundle_digest = 'bulk' AND status = 'revoked'")
        .await;
    eprintln!(
        "[{label}] killed the broker {:.2} s into the API-token run: {at_kill} of {n} bulk grants revoked",
        before_kill.as_secs_f64()
    );
    assert!(at_kill < n, "killed mid-run");
    // Every page is one transaction: what is revoked is audited, nothing is half done.
    assert_eq!(
        store
            .number("SELECT count(*) FROM grants WHERE status IN ('revoking', 'issuing')")
            .await,
        0
    );
    assert_eq!(
        store
            .number(
                "SELECT count(*) FROM audit_events WHERE reason = 'requested'
                 AND grant_id IN (SELECT id FROM grants WHERE bundle_digest = 'bulk')"
            )
            .await,
        at_kill
    );
    broker.restart(&env).await.expect("broker restarts");
    let stop = Arc::new(AtomicBool::new(false));
    let honest = honest_traffic(broker.url.clone(), issuer.url(), stop.clone(), true);
    let t = Instant::now();
    let (calls, revoked) =
        revoke_all_until_complete(&http, &broker.url, &json!({"kind": "api_token"})).await;
    let resumed = t.elapsed();
    stop.store(true, Ordering::Relaxed);
    let seen = tokio::time::timeout(Duration::from_secs(60), honest)
        .await
        .expect("honest traffic stops")
        .unwrap();
    eprintln!(
        "[{label}] API-token revoke-all resumed after restart: {revoked} revoked in {:.2} s \
         ({calls} calls); whole run {:.2} s without the restart; honest exchange+revoke pairs \
         meanwhile: {}",
        resumed.as_secs_f64(),
        resumed.as_secs_f64() + before_kill.as_secs_f64(),
        seen.exchanges.len()
    );
    assert!(seen.errors.is_empty(), "{:?}", seen.errors);
    assert!(seen.exchanges.iter().all(|s| *s == 200));
    assert_eq!(seen.revokes.len(), seen.exchanges.len());
    assert!(
        seen.revokes.iter().all(|s| *s == 200),
        "a job's own revoke succeeds even when revoke-all got there first: {:?}",
        seen.revokes
    );
    assert_eq!(
        store
            .number("SELECT count(*) FROM grants WHERE status <> 'revoked'")
            .await,
        0,
        "every grant revoked, none left half way"
    );
    // Exactly one revocation event per grant (bulk and honest alike), whoever revoked it.
    let grants = store.number("SELECT count(*) FROM grants").await;
    assert_eq!(
        store
            .number("SELECT count(*) FROM audit_events WHERE reason = 'requested'")
            .await,
        grants
    );
    assert_eq!(
        store
            .number("SELECT count(DISTINCT grant_id) FROM audit_events WHERE reason = 'requested'")
            .await,
        grants
    );
    drop(broker);
    store.close().await;
    let t = Instant::now();
    let check = Store::connect(db.url()).await.unwrap();
    let report = check.verify_audit_chain().await.unwrap();
    assert!(report.is_intact(), "{report:?}");
    eprintln!(
        "[{label}] audit chain verified: {} events in {:.1} s",
        report.events_checked,
        t.elapsed().as_secs_f64()
    );
    check.close().await;
    issuer.shutdown().await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_all_scale_postgres() {
    let db = TestDb::postgres().await;
    scale(
        db,
        env_num::<i64>("REVOKE_ALL_SCALE_PG", 100_000),
        "postgres",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_all_scale_sqlite() {
    let db = TestDb::sqlite().await;
    scale(
        db,
        env_num::<i64>("REVOKE_ALL_SCALE_SQLITE", 50_000),
        "sqlite",
    )
    .await;
}

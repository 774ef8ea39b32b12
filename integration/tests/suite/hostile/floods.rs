//! Unauthenticated writes that grow without bound: floods of refusals beside honest jobs.
//!
//! Before: every refusal of a request that proved nothing wrote a full audit row (300 rows in
//! 0.5 s of garbage tokens from one client), requested credential names were stored at full
//! length (60,000 characters → 59 KiB per row), and forged webhook deliveries wrote a row each.
//! Names over 1,024 bytes are now refused at the text boundary (`store_text.rs`), so the flood
//! sends 1,000-character ones, which reach the field caps.
//!
//! Here one attacker address (127.0.0.2: Linux routes all of 127/8 to loopback) floods garbage
//! job tokens, 1,000-character credential names, bad revocation tokens, badly signed
//! webhook deliveries and badly signed leak reports (`/v1/leaks/github`), with a 1,000-character request id and user agent, while honest jobs
//! exchange and revoke from 127.0.0.1 and, behind the attacker's own address (a shared NAT),
//! with valid tokens. Asserted:
//!
//! - every honest exchange and revoke succeeds, including those from the attacker's address;
//! - every attack gets its refusal (400/401) or 429 `too_many_failures` with `Retry-After`;
//! - rows written for the attacker are bounded by the configuration (failure burst + rate ×
//!   duration, and rows per key per window), aggregate events included;
//! - rows + aggregate counts account for every attack request exactly, and the metrics counted
//!   every one;
//! - aggregates of ended windows are written while the broker runs, the rest at shutdown
//!   (SIGTERM);
//! - no stored request-controlled field exceeds its cap; cut ones are flagged in `truncated`.
//!
//! Figures are printed, never asserted against a timer.

use broker::oidc::testkit::{TestIssuer, TestKey};
use broker::store::testdb::TestDb;
use broker::webhooks::signature::github_sign;
use futures::StreamExt;
use integration::http;
use integration::leak_keys::{KEY_ID, KeyServer};
use integration::{
    BrokerProcess, BrokerSetup, Secrets, acme_token, github_issuer_yaml, github_policies,
};
use serde_json::{Value, json};
use sqlx::Connection;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

const HOOK_SECRET: &str = "floods-hook-secret-0123456789";
const ATTACKER: &str = "127.0.0.2";

// The configuration under test (the defaults, with a short window so the test sees windows
// end while it runs).
const PER_MINUTE: u64 = 600;
const BURST: u64 = 120;
const ROWS_PER_WINDOW: u64 = 20;
const WINDOW_SECS: u64 = 2;

/// Attack requests of each kind.
const GARBAGE_TOKENS: usize = 1000;
const LONG_NAMES: usize = 500;
const BAD_WEBHOOKS: usize = 500;
const BAD_REVOCATIONS: usize = 200;
const BAD_LEAK_REPORTS: usize = 200;
const ATTACK_CONCURRENCY: usize = 16;
/// Honest workers on 127.0.0.1, and honest jobs behind the attacker's address.
const HONEST_WORKERS: usize = 3;
const HONEST_PER_WORKER: usize = 60;
const HONEST_BEHIND_NAT: usize = 20;
/// Garbage tokens sent right before shutdown.
const SECOND_BURST: usize = 100;

#[derive(Clone, Copy, Debug)]
enum Attack {
    GarbageToken,
    LongNames,
    BadWebhook,
    BadRevocation,
    BadLeakReport,
}

fn plan() -> Vec<Attack> {
    let mut v = Vec::new();
    v.extend(std::iter::repeat_n(Attack::GarbageToken, GARBAGE_TOKENS));
    v.extend(std::iter::repeat_n(Attack::LongNames, LONG_NAMES));
    v.extend(std::iter::repeat_n(Attack::BadWebhook, BAD_WEBHOOKS));
    v.extend(std::iter::repeat_n(Attack::BadRevocation, BAD_REVOCATIONS));
    v.extend(std::iter::repeat_n(Attack::BadLeakReport, BAD_LEAK_REPORTS));
    // Interleave deterministically (a stride coprime with the length).
    let n = v.len();
    (0..n).map(|i| v[(i * 7919) % n]).collect()
}

async fn send_attack(http: &reqwest::Client, url: &str, a: Attack, i: usize) -> (u16, String) {
    let r = match a {
        Attack::GarbageToken => http
            .post(format!("{url}/v1/exchange"))
            .bearer_auth(format!("garbage.{i}.token"))
            .json(&json!({"credentials": ["deploy-api"]})),
        Attack::LongNames => http
            .post(format!("{url}/v1/exchange"))
            .bearer_auth(format!("eyJnot.a.jwt{i}"))
            .json(&json!({"credentials": ["x".repeat(1_000)]})),
        Attack::BadWebhook => {
            let body = format!(r#"{{"action":"completed","n":{i}}}"#);
            http.post(format!("{url}/v1/hooks/github"))
                .header("x-github-event", "workflow_job")
                .header("x-github-delivery", format!("forged-{i}"))
                .header(
                    "x-hub-signature-256",
                    github_sign("wrong-secret-0123456789", body.as_bytes()),
                )
                .body(body)
        }
        Attack::BadRevocation => http
            .post(format!("{url}/v1/revoke"))
            .bearer_auth(format!("brk_rvk_forged{i}")),
        // A known key id with a signature that does not verify, or an unknown key id.
        Attack::BadLeakReport => http
            .post(format!("{url}/v1/leaks/github"))
            .header(
                "github-public-key-identifier",
                if i.is_multiple_of(2) {
                    KEY_ID.to_owned()
                } else {
                    format!("forged-{i}")
                },
            )
            .header("github-public-key-signature", "MEUCIQDforged")
            .body(format!(
                r#"[{{"token":"brk_rvk_x{i}","type":"t","url":"u","source":"content"}}]"#
            )),
    };
    let resp = r.send().await.expect("attack request");
    let status = resp.status().as_u16();
    let retry_after = resp.headers().contains_key("retry-after");
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    let code = body["error"].as_str().unwrap_or("").to_owned();
    if status == 429 {
        assert!(retry_after, "429 without Retry-After");
    }
    (status, code)
}

/// One honest job: a fresh token, exchange, revoke. `Err` names what failed.
async fn honest_job(http: &reqwest::Client, url: &str, iss: &str) -> Result<String, String> {
    let token = acme_token(iss);
    let r = http
        .post(format!("{url}/v1/exchange"))
        .bearer_auth(&token)
        .json(&json!({"credentials": ["deploy-api"]}))
        .send()
        .await
        .map_err(|e| format!("exchange: {e}"))?;
    let status = r.status().as_u16();
    let body: Value = r.json().await.unwrap_or(Value::Null);
    if status != 200 {
        return Err(format!("exchange {status} {}", body["error"]));
    }
    let rvk = body["revocation_token"].as_str().unwrap_or("").to_owned();
    let r = http
        .post(format!("{url}/v1/revoke"))
        .bearer_auth(&rvk)
        .send()
        .await
        .map_err(|e| format!("revoke: {e}"))?;
    if r.status().as_u16() != 200 {
        return Err(format!("revoke {}", r.status()));
    }
    Ok(rvk)
}

/// Sum of `broker_refusals_total` samples whose labels contain every `filter`.
fn refusals_metric(text: &str, filters: &[&str]) -> u64 {
    text.lines()
        .filter(|l| l.starts_with("broker_refusals_total{"))
        .filter(|l| filters.iter().all(|f| l.contains(f)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

async fn attacker_events(db_url: &str) -> Vec<Value> {
    let mut c = sqlx::PgConnection::connect(db_url).await.expect("store");
    let rows: Vec<(Value,)> = sqlx::query_as(
        "SELECT event FROM audit_events WHERE event->>'client_addr' = $1 ORDER BY seq",
    )
    .bind(ATTACKER)
    .fetch_all(&mut c)
    .await
    .expect("audit rows");
    rows.into_iter().map(|r| r.0).collect()
}

fn len_of(v: &Value) -> usize {
    v.as_str().map_or(0, str::len)
}

#[tokio::test]
async fn refusal_floods_are_bounded_counted_and_leave_honest_jobs_alone() {
    let issuer = TestIssuer::start_with(&[TestKey::Rsa1]).await;
    let db = TestDb::postgres().await;
    let policies = github_policies().unwrap();
    let key_server = KeyServer::start().await;
    let extra = format!(
        "leaks:\n  github:\n    keys_url: {}\n    refresh_cooldown: 1s\n\
         webhooks:\n  github:\n    secrets: [{{value: {HOOK_SECRET}, scope: [\"*\"]}}]\n\
         refusals:\n  failures_per_minute_per_client: {PER_MINUTE}\n  \
         failure_burst_per_client: {BURST}\n  audit_rows_per_window: {ROWS_PER_WINDOW}\n  \
         audit_window: {WINDOW_SECS}s\n\
         metrics:\n  danger_public_diagnostics: true\n",
        key_server.url
    );
    let mut broker = BrokerProcess::start(
        &BrokerSetup::new(db.url(), policies.path(), github_issuer_yaml(&issuer.url()))
            .extra(extra),
    )
    .await
    .expect("broker starts");
    let url = broker.url.clone();
    let iss = issuer.url();
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert("x-request-id", "r".repeat(1000).parse().unwrap());
    let attacker = integration::http::builder()
        .local_address(ATTACKER.parse::<std::net::IpAddr>().unwrap())
        .user_agent("u".repeat(1000))
        .default_headers(headers)
        .build()
        .unwrap();
    let honest = integration::http::client();

    // Honest jobs run for as long as the flood does, from 127.0.0.1 and from the attacker's
    // own address.
    let flooding = Arc::new(AtomicBool::new(true));
    let mut workers = Vec::new();
    for w in 0..=HONEST_WORKERS {
        let (http, n) = if w == HONEST_WORKERS {
            (attacker.clone(), HONEST_BEHIND_NAT)
        } else {
            (honest.clone(), HONEST_PER_WORKER)
        };
        let (url, iss, flooding) = (url.clone(), iss.clone(), flooding.clone());
        workers.push(tokio::spawn(async move {
            let mut done = Vec::new();
            let mut failed = Vec::new();
            while done.len() + failed.len() < n {
                match honest_job(&http, &url, &iss).await {
                    Ok(rvk) => done.push(rvk),
                    Err(e) => failed.push(e),
                }
                if !flooding.load(Ordering::Relaxed) && done.len() + failed.len() >= n / 2 {
                    break;
                }
            }
            (done, failed)
        }));
    }

    let plan = plan();
    let sent = plan.len() as u64;
    let started = Instant::now();
    let results: Vec<(Attack, u16, String)> = futures::stream::iter(plan.into_iter().enumerate())
        .map(|(i, a)| {
            let (http, url) = (attacker.clone(), url.clone());
            async move {
                let (s, c) = send_attack(&http, &url, a, i).await;
                (a, s, c)
            }
        })
        .buffer_unordered(ATTACK_CONCURRENCY)
        .collect()
        .await;
    let flood_secs = started.elapsed().as_secs_f64();
    flooding.store(false, Ordering::Relaxed);

    // Every attack got its refusal, or 429 once over the failure limit.
    let mut limited = 0u64;
    for (a, status, code) in &results {
        assert!(*status != 200, "{a:?} succeeded");
        let expected: (u16, &str) = match a {
            Attack::GarbageToken => (401, "malformed_token"),
            Attack::LongNames => (400, "bad_request"),
            Attack::BadWebhook => (401, "bad_signature"),
            Attack::BadRevocation => (401, "malformed_secret"),
            Attack::BadLeakReport => (401, "bad_signature"),
        };
        if (*status, code.as_str()) == (429, "too_many_failures") {
            limited += 1;
        } else {
            assert_eq!((*status, code.as_str()), expected, "{a:?}");
        }
    }

    // The honest side is untouched.
    let mut secrets = Secrets::default();
    let mut honest_ok = 0;
    for w in workers {
        let (done, failed) = w.await.unwrap();
        assert!(failed.is_empty(), "honest jobs failed: {failed:?}");
        honest_ok += done.len();
        for r in done {
            secrets.add(r);
        }
    }
    assert!(honest_ok >= HONEST_WORKERS * HONEST_PER_WORKER / 2);

    // Metrics counted every refusal (honest jobs caused none).
    let metrics = http::get_text(&honest, &format!("{url}/metrics")).await;
    let counted = refusals_metric(&metrics, &[]);
    assert_eq!(
        counted, sent,
        "every refusal counted in broker_refusals_total"
    );
    assert_eq!(
        refusals_metric(&metrics, &["audit=\"limited\""]),
        limited,
        "429s counted as limited"
    );
    assert!(limited > 0, "the flood outran the failure limit");

    // Windows that ended are written while the broker runs.
    tokio::time::sleep(Duration::from_secs(WINDOW_SECS) + Duration::from_millis(1500)).await;
    let running = attacker_events(db.url()).await;
    let aggregates_while_running = running
        .iter()
        .filter(|e| e.get("aggregate").is_some())
        .count();
    assert!(
        aggregates_while_running > 0,
        "no aggregate written at window end"
    );

    // A second burst, all over the limit by now: its aggregate is still open at shutdown and
    // must be written then.
    let second: Vec<(u16, String)> = futures::stream::iter(0..SECOND_BURST)
        .map(|i| {
            let (http, url) = (attacker.clone(), url.clone());
            async move { send_attack(&http, &url, Attack::GarbageToken, 100_000 + i).await }
        })
        .buffer_unordered(ATTACK_CONCURRENCY)
        .collect()
        .await;
    let second_limited = second.iter().filter(|(s, _)| *s == 429).count() as u64;
    assert!(second_limited > 0);
    limited += second_limited;
    let sent = sent + SECOND_BURST as u64;

    // The rest at shutdown.
    let pid = broker.pid().expect("running");
    let term = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(term.success());
    let exit = broker.wait_exit().await.expect("broker stops on SIGTERM");
    assert!(exit.success(), "{exit:?}");

    let events = attacker_events(db.url()).await;
    let (aggregates, rows): (Vec<&Value>, Vec<&Value>) =
        events.iter().partition(|e| e.get("aggregate").is_some());
    let in_aggregates: u64 = aggregates
        .iter()
        .map(|e| e["aggregate"]["count"].as_u64().unwrap())
        .sum();
    // Besides refusals, only the honest jobs behind the attacker's address have rows with it.
    let refusal_rows = rows.iter().filter(|e| e["outcome"] == "deny").count() as u64;
    assert!(
        rows.iter()
            .all(|e| ["deny", "allow", "success"].contains(&e["outcome"].as_str().unwrap_or(""))),
        "unexpected attacker-address rows"
    );
    assert_eq!(
        refusal_rows + in_aggregates,
        sent,
        "every attack is a row or in an aggregate count"
    );
    assert!(
        aggregates.len() > aggregates_while_running,
        "the open window's aggregate was not written at shutdown"
    );
    let limited_counted: u64 = aggregates
        .iter()
        .filter(|e| e["reason"] == "too_many_failures")
        .map(|e| e["aggregate"]["count"].as_u64().unwrap())
        .sum();
    assert_eq!(
        limited_counted, limited,
        "aggregates report the exact 429 count"
    );
    for a in &aggregates {
        let g = &a["aggregate"];
        assert!(g["first_seen"].as_str() <= g["last_seen"].as_str());
        assert!(a["detail"].as_str().unwrap().contains("similar refusals"));
    }

    // Bounded by the configuration, not by the request rate. Every refusal row spent a token
    // of the attacker's failure bucket.
    let span = started.elapsed().as_secs() + 1;
    let by_limiter = BURST + PER_MINUTE * span / 60;
    assert!(
        refusal_rows <= by_limiter,
        "{refusal_rows} refusal rows > burst + rate × {span}s = {by_limiter}"
    );
    // At most rows_per_window per (action, reason) key and window, and one aggregate each.
    let keys = 5 + 4; // the five refusal reasons, and too_many_failures per action
    let windows = span / WINDOW_SECS + 2;
    assert!(refusal_rows <= keys * windows * ROWS_PER_WINDOW);
    assert!(
        (aggregates.len() as u64) <= keys * windows,
        "{} aggregates",
        aggregates.len()
    );

    // No stored field over its cap; cut ones flagged.
    let mut max_bytes = 0;
    let mut flagged = std::collections::BTreeSet::new();
    for e in &events {
        max_bytes = max_bytes.max(e.to_string().len());
        assert!(len_of(&e["request_id"]) <= 128, "{e}");
        assert!(len_of(&e["user_agent"]) <= 256, "{e}");
        assert!(len_of(&e["detail"]) <= 512, "{e}");
        for n in e["credentials_requested"].as_array().into_iter().flatten() {
            assert!(len_of(n) <= 64, "{e}");
        }
        let truncated: Vec<&str> = e["truncated"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        // The caller's 1,000-character X-Request-Id is not an id of the strict short shape:
        // the broker's own id stands, and the caller's is not kept at all.
        assert!(
            !e["request_id"].as_str().unwrap_or("").starts_with("rrrr"),
            "{e}"
        );
        assert!(e.get("client_request_id").is_none_or(Value::is_null), "{e}");
        if e["credentials_requested"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|n| n.as_str().is_some_and(|s| s.ends_with('…')))
        {
            assert!(truncated.contains(&"credentials_requested"), "{e}");
        }
        flagged.extend(truncated.into_iter().map(str::to_owned));
    }
    for f in ["user_agent", "credentials_requested"] {
        assert!(flagged.contains(f), "no row flags {f}: {flagged:?}");
    }

    println!(
        "floods: {sent} attack requests ({SECOND_BURST} of them just before shutdown), the flood in {flood_secs:.2} s ({:.0}/s) beside {honest_ok} honest jobs (all 200); \
         {limited} answered 429; audit rows for the attacker: {refusal_rows} refusals + {} aggregates \
         ({aggregates_while_running} written at window end, the rest at shutdown) standing for {in_aggregates}; \
         largest attacker row {max_bytes} bytes; flood start to shutdown {:.1} s",
        (sent - SECOND_BURST as u64) as f64 / flood_secs,
        aggregates.len(),
        started.elapsed().as_secs_f64(),
    );

    secrets.add(HOOK_SECRET);
    secrets.assert_not_leaked(&broker, db.url()).await;
    drop(broker);
    issuer.shutdown().await;
    db.cleanup().await;
}

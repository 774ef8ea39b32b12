//! Text the store cannot hold: NUL bytes, control characters and over-long values beside honest
//! jobs.
//!
//! The attack (before): a NUL in a requested credential name, in a JSON key of the body, in a
//! signed claim or in an audit query parameter reached Postgres, which refuses it (22021 in
//! `text`, 22P05 in `jsonb`); the caller got 503 `store_unavailable`, the refusal was not
//! audited, and because the write rode a group commit, the honest exchanges and revokes batched
//! with it failed too.
//!
//! Per backend (SQLite file, fresh Postgres database), at once:
//! - 50 honest jobs: exchange, then revoke their own grant;
//! - 200 poisoned writes, 40 of each: a NUL in a requested credential name, a NUL in a JSON key
//!   of the body, a 5,000-byte credential name, a NUL in an audit query parameter (operator
//!   `GET /v1/audit`), and a job token whose *signed* claims carry a NUL, an escape sequence,
//!   DEL and a C1 control (sub, workflow, actor, ref, jti).
//!
//! Asserted: 50/50 honest exchanges and 50/50 revokes succeed, no 5xx anywhere; every poisoned
//! request is 400 `invalid_text` except the signed ones, which are decided normally (allowed),
//! stored escaped (`\u{0}`, never dropped, never raw) and revocable; every refusal has its
//! audit event (the value shown escaped); no raw NUL in any stored row; the audit chain
//! verifies. Times are printed, never asserted.

use broker::oidc::testkit::{self, TestIssuer, TestKey};
use broker::store::Store;
use broker::store::testdb::TestDb;
use integration::store_db::StoreDb;
use integration::{
    AUD, BrokerProcess, BrokerSetup, Secrets, acme_api_claims, acme_token, github_issuer_yaml,
};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::{Duration, Instant};

const OPERATOR_TOKEN: &str = "brk_op_storeTextAuditorToken00000000000_3w9NnK";
const HONEST: usize = 50;
/// Poisoned requests per kind (five kinds).
const PER_KIND: usize = 40;
/// Requests in flight at once (honest and poisoned interleaved).
const IN_FLIGHT: usize = 24;

/// Rows of `grants` whose subject contains `needle` (no LIKE: `\` is its escape).
async fn subjects_containing(db: &StoreDb, needle: &str) -> i64 {
    let sql = match db {
        StoreDb::Pg(_) => "SELECT count(*) FROM grants WHERE strpos(subject, $1) > 0",
        StoreDb::Lite(_) => "SELECT count(*) FROM grants WHERE instr(subject, $1) > 0",
    };
    db.number_with(sql, &[needle]).await
}

/// Rows holding a raw NUL anywhere in the grant, credential, jti and audit tables (SQLite
/// would keep one; Postgres cannot hold one at all, 22021, so there the grants found escaped
/// are the proof).
async fn raw_nuls(db: &StoreDb) -> i64 {
    match db {
        StoreDb::Pg(_) => 0,
        StoreDb::Lite(_) => {
            db.number_with(
                "SELECT (SELECT count(*) FROM grants WHERE instr(subject, $1) > 0
                            OR instr(coalesce(repository, ''), $1) > 0 OR instr(job, $1) > 0)
                      + (SELECT count(*) FROM used_jti WHERE instr(jti, $1) > 0)
                      + (SELECT count(*) FROM audit_events WHERE instr(event, $1) > 0)",
                &["\0"],
            )
            .await
        }
    }
}

/// What one request was and what it got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Honest,
    NulName,
    NulKey,
    LongName,
    NulQuery,
    SignedOdd,
}

#[derive(Debug)]
struct Seen {
    kind: Kind,
    /// Exchange (or audit query) status and error code.
    status: u16,
    code: String,
    /// Revoke status, for requests that were issued a grant.
    revoke: Option<u16>,
    grant_id: Option<String>,
    body: Value,
}

fn odd_claims(issuer: &str, i: usize) -> Value {
    let mut c = acme_api_claims(issuer, AUD);
    // Signed by the issuer: facts about the job, to be kept (escaped), not refused.
    c["sub"] = json!(format!("repo:acme/api:ref:refs/heads/main\u{0}{i}"));
    c["workflow"] = json!("ci\u{0}.yml");
    c["actor"] = json!("mallory\u{1b}[31m\u{7f}\u{85}");
    c["ref"] = json!("refs/heads/main\u{0}");
    c["jti"] = json!(format!("odd\u{0}{}", uuid::Uuid::new_v4()));
    c
}

async fn one(http: reqwest::Client, url: String, issuer: String, kind: Kind, i: usize) -> Seen {
    let token = || acme_token(&issuer);
    let exchange = |token: String, body: String| {
        http.post(format!("{url}/v1/exchange"))
            .bearer_auth(token)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let r = match kind {
        Kind::Honest => exchange(token(), json!({"credentials": ["api"]}).to_string()),
        // `\u0000` inside JSON text: what serde accepts and Postgres refuses.
        Kind::NulName => exchange(token(), r#"{"credentials": ["ap\u0000i"]}"#.to_owned()),
        Kind::NulKey => exchange(
            token(),
            r#"{"credentials": ["api"], "tt\u0000l": "5m"}"#.to_owned(),
        ),
        Kind::LongName => exchange(
            token(),
            json!({"credentials": ["a".repeat(5000)]}).to_string(),
        ),
        Kind::NulQuery => http
            .get(format!(
                "{url}/v1/audit?repository=acme%2Fapi%00{i}&limit=5"
            ))
            .bearer_auth(OPERATOR_TOKEN)
            .send(),
        Kind::SignedOdd => exchange(
            testkit::sign(TestKey::Rsa1, &odd_claims(&issuer, i)),
            json!({"credentials": ["api"]}).to_string(),
        ),
    }
    .await
    .expect("request answered");
    let status = r.status().as_u16();
    let body: Value = r.json().await.unwrap_or(Value::Null);
    let code = body["error"].as_str().unwrap_or("").to_owned();
    let mut revoke = None;
    if let Some(rt) = body["revocation_token"].as_str() {
        let r = http
            .post(format!("{url}/v1/revoke"))
            .bearer_auth(rt)
            .send()
            .await
            .expect("revoke answered");
        revoke = Some(r.status().as_u16());
    }
    Seen {
        kind,
        status,
        code,
        revoke,
        grant_id: body["grant_id"].as_str().map(str::to_owned),
        body,
    }
}

async fn run(db: TestDb, label: &str) {
    let issuer = TestIssuer::start().await;
    let policies = tempfile::tempdir().unwrap();
    std::fs::write(
        policies.path().join("text.yaml"),
        "credentials:\n  - name: api\n    max_ttl: 1h\n    api_token:\n      audience: https://svc.test\n      scopes: [\"deploy\"]\n\
         rules:\n  - name: acme\n    issuer: github\n    credentials: [api]\n    when: claims.repository_id == \"1000001\"\n",
    )
    .unwrap();
    let broker = BrokerProcess::start(
        &BrokerSetup::new(db.url(), policies.path(), github_issuer_yaml(&issuer.url())).extra(
            format!(
                // Every refusal keeps a row of its own here (the refusal limits and aggregates
                // have their own test, `floods.rs`), so each one can be found and checked.
                "limits:\n  exchanges_per_minute_per_repository: 0\n\
         refusals:\n  failure_burst_per_client: 100000\n  \
         failures_per_minute_per_client: 100000\n  audit_rows_per_window: 100000\n\
         operators:\n  - name: auditor\n    role: auditor\n    token_sha256: {}\n",
                broker::secret::sha256_hex(OPERATOR_TOKEN.as_bytes())
            ),
        ),
    )
    .await
    .expect("broker starts");
    let http = integration::http::client_with_timeout(Duration::from_secs(30));

    // Honest and poisoned interleaved: every sixth request is honest until 50 are queued.
    let poisoned = [
        Kind::NulName,
        Kind::NulKey,
        Kind::LongName,
        Kind::NulQuery,
        Kind::SignedOdd,
    ];
    let mut plan: Vec<Kind> = Vec::new();
    let (mut honest, mut bad) = (0, 0);
    while honest < HONEST || bad < PER_KIND * poisoned.len() {
        if honest < HONEST && (plan.len().is_multiple_of(5) || bad == PER_KIND * poisoned.len()) {
            plan.push(Kind::Honest);
            honest += 1;
        } else {
            plan.push(poisoned[bad % poisoned.len()]);
            bad += 1;
        }
    }
    let gate = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
    let t = Instant::now();
    let tasks: Vec<_> = plan
        .iter()
        .enumerate()
        .map(|(i, kind)| {
            let (http, url, iss, gate, kind) = (
                http.clone(),
                broker.url.clone(),
                issuer.url(),
                gate.clone(),
                *kind,
            );
            tokio::spawn(async move {
                let _permit = gate.acquire_owned().await.unwrap();
                one(http, url, iss, kind, i).await
            })
        })
        .collect();
    let mut seen = Vec::with_capacity(tasks.len());
    for task in tasks {
        seen.push(task.await.unwrap());
    }
    let elapsed = t.elapsed();
    eprintln!(
        "[{label}] {HONEST} honest exchange+revoke pairs + {} poisoned requests in {:.2} s",
        bad,
        elapsed.as_secs_f64()
    );

    // ---- the honest side is untouched --------------------------------------------------------
    let of = |k: Kind| seen.iter().filter(move |s| s.kind == k);
    let fives: Vec<&Seen> = seen
        .iter()
        .filter(|s| s.status >= 500 || s.revoke.is_some_and(|r| r >= 500))
        .collect();
    let ok_pairs = of(Kind::Honest)
        .filter(|s| s.status == 200 && s.revoke == Some(200))
        .count();
    eprintln!(
        "[{label}] honest exchange+revoke pairs that succeeded: {ok_pairs}/{HONEST}; \
         responses with 5xx: {} ({} honest)",
        fives.len(),
        fives.iter().filter(|s| s.kind == Kind::Honest).count()
    );
    assert!(
        fives.is_empty(),
        "no 5xx anywhere: {:?}",
        fives
            .iter()
            .map(|s| (s.kind, s.status, s.code.as_str(), s.revoke))
            .collect::<Vec<_>>()
    );
    assert_eq!(
        ok_pairs,
        HONEST,
        "{:?}",
        of(Kind::Honest).collect::<Vec<_>>()
    );

    // ---- every poisoned request refused with its reason, or decided normally (signed) ---------
    for k in [Kind::NulName, Kind::NulKey, Kind::LongName, Kind::NulQuery] {
        let all: Vec<&Seen> = of(k).collect();
        assert_eq!(all.len(), PER_KIND);
        for s in &all {
            assert_eq!((s.status, s.code.as_str()), (400, "invalid_text"), "{s:?}");
            let msg = s.body["message"].as_str().unwrap_or("");
            assert!(!msg.contains('\0'), "the message never echoes the value");
        }
    }
    let odd: Vec<&Seen> = of(Kind::SignedOdd).collect();
    assert_eq!(odd.len(), PER_KIND);
    for s in &odd {
        assert_eq!((s.status, s.revoke), (200, Some(200)), "{s:?}");
    }
    let refused = PER_KIND * 4;
    eprintln!(
        "[{label}] poisoned: {refused} refused 400 invalid_text, {} signed-odd exchanges decided \
         normally (issued and revoked)",
        odd.len()
    );

    // ---- every refusal audited, escaped ------------------------------------------------------
    let store = StoreDb::connect(db.url()).await;
    let exchange_refusals = store
        .number_with(
            "SELECT count(*) FROM audit_events WHERE reason = $1 AND action = 'exchange'",
            &["invalid_text"],
        )
        .await;
    let query_refusals = store
        .number_with(
            "SELECT count(*) FROM audit_events WHERE reason = $1 AND action = 'admin' \
             AND actor = 'operator:auditor'",
            &["invalid_text"],
        )
        .await;
    eprintln!(
        "[{label}] refusals audited: {exchange_refusals} exchange, {query_refusals} audit query"
    );
    assert_eq!(exchange_refusals, (PER_KIND * 3) as i64);
    assert_eq!(query_refusals, PER_KIND as i64);
    // Each refusal shows the offending value escaped and cut short, never raw.
    let r = http
        .get(format!(
            "{}/v1/audit?reason=invalid_text&limit=1000",
            broker.url
        ))
        .bearer_auth(OPERATOR_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let page: Value = r.json().await.unwrap();
    let events = page["events"].as_array().unwrap();
    assert_eq!(events.len(), refused);
    for ev in events {
        let detail = ev["detail"].as_str().unwrap_or("");
        assert!(
            (detail.contains("\\u{0}") || detail.contains("(5000 bytes)"))
                && !detail.contains('\0')
                && detail.len() < 400,
            "{ev}"
        );
    }

    // ---- the signed odd claims are stored escaped, never dropped or raw -----------------------
    assert_eq!(subjects_containing(&store, "\\u{0}").await, PER_KIND as i64);
    assert_eq!(raw_nuls(&store).await, 0, "no raw NUL in any stored row");
    let revoked = store
        .number_with(
            "SELECT count(*) FROM grants WHERE status = $1",
            &["revoked"],
        )
        .await;
    assert_eq!(revoked, (HONEST + PER_KIND) as i64, "every grant revoked");
    let gid = odd[0].grant_id.clone().unwrap();
    let r = http
        .get(format!("{}/v1/audit?grant_id={gid}", broker.url))
        .bearer_auth(OPERATOR_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let page: Value = r.json().await.unwrap();
    let events = page["events"].as_array().unwrap();
    assert_eq!(events.len(), 2, "allow and revoke: {page}");
    for ev in events {
        let sub = ev["job"]["sub"].as_str().unwrap();
        assert!(sub.contains("\\u{0}") && !sub.contains('\0'), "{sub:?}");
    }
    let allow = events.iter().find(|e| e["outcome"] == "allow").unwrap();
    assert_eq!(allow["job"]["workflow"], "ci\\u{0}.yml");
    assert_eq!(allow["job"]["actor"], "mallory\\u{1b}[31m\\u{7f}\\u{85}");

    // ---- no secret anywhere, chain intact ----------------------------------------------------
    let mut secrets = Secrets::default();
    secrets.add(OPERATOR_TOKEN);
    for s in &seen {
        secrets.add_response(&s.body);
    }
    secrets.assert_not_leaked(&broker, db.url()).await;
    drop(broker);
    store.close().await;
    let check = Store::connect(db.url()).await.unwrap();
    let report = check.verify_audit_chain().await.unwrap();
    assert!(report.is_intact(), "{report:?}");
    eprintln!(
        "[{label}] audit chain verified: {} events",
        report.events_checked
    );
    check.close().await;
    issuer.shutdown().await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_text_sqlite() {
    run(TestDb::sqlite().await, "sqlite").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_text_postgres() {
    run(TestDb::postgres().await, "postgres").await;
}

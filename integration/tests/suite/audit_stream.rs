//! The audit stream end to end: `broker audit tail --follow` (the real CLI, run as a log shipper
//! runs it, naming both replicas) reads `GET /v1/audit/stream` while exchanges go to two broker
//! processes on one Postgres store. Replica A is killed and restarted, then replica B is killed;
//! the consumer ends with exactly the events in the store: each once, in order, each line a
//! CloudEvents envelope whose chain hash is the store's.

use broker::oidc::testkit::TestIssuer;
use broker::secret_format::{SecretKind, generate};
use broker::store::testdb::TestDb;
use integration::{BrokerProcess, BrokerSetup, acme_token, broker_bin};
use serde_json::{Value, json};
use sqlx::Row;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncBufReadExt;

async fn exchange(http: &reqwest::Client, issuer: &TestIssuer, url: &str) {
    let r = http
        .post(format!("{url}/v1/exchange"))
        .bearer_auth(acme_token(&issuer.url()))
        .json(&json!({"credentials": ["deploy-api"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "exchange on {url}");
}

/// The store's events: `(seq, hash)` in order.
async fn stored(db: &TestDb) -> Vec<(i64, Option<String>)> {
    let pool = sqlx::postgres::PgPool::connect(db.url()).await.unwrap();
    let rows = sqlx::query("SELECT seq, hash FROM audit_events ORDER BY seq")
        .fetch_all(&pool)
        .await
        .unwrap();
    pool.close().await;
    rows.iter().map(|r| (r.get("seq"), r.get("hash"))).collect()
}

/// Wait until the consumer has printed the store's newest event.
async fn wait_caught_up(lines: &Mutex<Vec<Value>>, db: &TestDb, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let newest = stored(db).await.last().map(|e| e.0);
        let seen = lines
            .lock()
            .unwrap()
            .last()
            .map(|l| l["seq"].as_i64().unwrap());
        if newest.is_some() && seen >= newest {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: consumer at {seen:?}, store at {newest:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_following_consumer_survives_a_restart_and_a_replica_switch_with_every_event_once() {
    let db = TestDb::postgres().await;
    let issuer = TestIssuer::start().await;
    let gitlab = TestIssuer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let key = integration::write_signing_key(dir.path());
    let token = generate(SecretKind::Operator);
    let token_file = dir.path().join("auditor.token");
    std::fs::write(&token_file, token.expose()).unwrap();
    let setup = BrokerSetup::examples(db.url(), &issuer.url(), &gitlab.url()).extra(format!(
        "api_tokens:\n  signing_key: {{file: {key}}}\n\
         operators:\n  - name: siem\n    role: auditor\n    token_sha256: {hash}\n\
         limits:\n  exchanges_per_minute_per_repository: 0\n",
        key = key.display(),
        hash = broker::secret::sha256_hex(token.expose().as_bytes()),
    ));
    let mut a = BrokerProcess::start(&setup).await.unwrap();
    let mut b = BrokerProcess::start(&setup).await.unwrap();
    let http = integration::http::client();
    for i in 0..6 {
        exchange(&http, &issuer, if i % 2 == 0 { &a.url } else { &b.url }).await;
    }

    let mut tail = tokio::process::Command::new(broker_bin())
        .args(["audit", "tail", "--follow", "--url"])
        .arg(format!("{},{}", a.url, b.url))
        .arg("--token-file")
        .arg(&token_file)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let lines: Arc<Mutex<Vec<Value>>> = Arc::default();
    let mut out = tokio::io::BufReader::new(tail.stdout.take().unwrap()).lines();
    let sink = lines.clone();
    let reader = tokio::spawn(async move {
        while let Ok(Some(line)) = out.next_line().await {
            let v: Value = serde_json::from_str(&line).expect("each line is JSON");
            sink.lock().unwrap().push(v);
        }
    });
    let mut err = tokio::io::BufReader::new(tail.stderr.take().unwrap()).lines();
    let notes: Arc<Mutex<Vec<String>>> = Arc::default();
    let note_sink = notes.clone();
    let note_reader = tokio::spawn(async move {
        while let Ok(Some(line)) = err.next_line().await {
            note_sink.lock().unwrap().push(line);
        }
    });

    // The backlog, then live events from both replicas.
    wait_caught_up(&lines, &db, "backlog").await;
    for i in 0..6 {
        exchange(&http, &issuer, if i % 2 == 0 { &a.url } else { &b.url }).await;
    }
    wait_caught_up(&lines, &db, "live").await;

    // Replica A (the one the consumer reads from) dies; events keep coming through B.
    a.kill();
    for _ in 0..5 {
        exchange(&http, &issuer, &b.url).await;
    }
    wait_caught_up(&lines, &db, "after A died").await;
    a.restart(&[]).await.unwrap();

    // Now B dies; A, restarted, serves the consumer again.
    b.kill();
    for _ in 0..5 {
        exchange(&http, &issuer, &a.url).await;
    }
    wait_caught_up(&lines, &db, "after B died").await;

    let pid = tail.id().expect("tail runs");
    std::process::Command::new("kill")
        .arg(pid.to_string())
        .status()
        .unwrap();
    let _ = tail.wait().await;
    let _ = reader.await;
    let _ = note_reader.await;

    let got = lines.lock().unwrap().clone();
    let want = stored(&db).await;
    let got_seqs: Vec<i64> = got.iter().map(|l| l["seq"].as_i64().unwrap()).collect();
    let want_seqs: Vec<i64> = want.iter().map(|e| e.0).collect();
    assert_eq!(
        got_seqs,
        want_seqs,
        "the consumer holds exactly the store's events, once each, in order; its notes: {:?}",
        notes.lock().unwrap()
    );
    // At least 22 exchanges and the stream openings were audited.
    assert!(got.len() >= 22, "{} events", got.len());
    for (line, (_, hash)) in got.iter().zip(&want) {
        assert_eq!(line["specversion"], "1.0");
        assert!(
            line["type"]
                .as_str()
                .unwrap()
                .starts_with("dev.broker.audit.")
        );
        assert_eq!(line["id"], line["data"]["id"]);
        assert_eq!(line["chainhash"].as_str(), hash.as_deref());
    }
    // Each reconnection was said on stderr, and each stream opening was audited.
    let notes = notes.lock().unwrap().clone();
    assert!(
        notes.iter().filter(|n| n.contains("reconnecting")).count() >= 2,
        "{notes:?}"
    );
    let openings = got
        .iter()
        .filter(|l| l["data"]["reason"] == "audit_stream")
        .count();
    assert!(openings >= 3, "{openings} stream openings audited");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_refuses_bad_callers_and_a_resume_point_that_was_pruned() {
    let db = TestDb::postgres().await;
    let issuer = TestIssuer::start().await;
    let gitlab = TestIssuer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let token = generate(SecretKind::Operator);
    let setup = BrokerSetup::examples(db.url(), &issuer.url(), &gitlab.url()).extra(format!(
        "operators:\n  - name: siem\n    role: auditor\n    token_sha256: {hash}\n",
        hash = broker::secret::sha256_hex(token.expose().as_bytes()),
    ));
    let broker = BrokerProcess::start(&setup).await.unwrap();
    let http = integration::http::client();
    for _ in 0..4 {
        exchange(&http, &issuer, &broker.url).await;
    }
    let get = |q: &str, bearer: Option<&str>| {
        let mut r = http.get(format!("{}/v1/audit/stream?{q}", broker.url));
        if let Some(t) = bearer {
            r = r.bearer_auth(t);
        }
        r.send()
    };
    // No token, a job token, a bad query: refused with reason codes.
    let r = get("", None).await.unwrap();
    assert_eq!(r.status(), 401);
    let r = get("", Some(&acme_token(&issuer.url()))).await.unwrap();
    assert_eq!(r.status(), 401);
    let r = get("after=-3", Some(token.expose())).await.unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "bad_request");

    // Without follow: every event, then the answer ends.
    let r = get("after=0", Some(token.expose())).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["content-type"].to_str().unwrap(),
        "application/x-ndjson"
    );
    let body = r.text().await.unwrap();
    let seqs: Vec<i64> = body
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["seq"]
                .as_i64()
                .unwrap()
        })
        .collect();
    assert!(
        seqs.len() >= 4 && seqs.windows(2).all(|w| w[0] < w[1]),
        "{seqs:?}"
    );

    // Prune everything but the newest events; resuming before the cut is refused with the cut.
    let cut = seqs[2];
    let pool = sqlx::postgres::PgPool::connect(db.url()).await.unwrap();
    let cut_time: time::OffsetDateTime =
        sqlx::query("SELECT time FROM audit_events WHERE seq = $1")
            .bind(seqs[3])
            .fetch_one(&pool)
            .await
            .unwrap()
            .get("time");
    pool.close().await;
    let store = broker::store::Store::connect(db.url()).await.unwrap();
    store
        .prune_audit(
            cut_time,
            broker::time::Clock::now(&broker::time::SystemClock),
            "test",
        )
        .await
        .unwrap();
    let pruned_through = store.audit_pruned_through().await.unwrap().unwrap();
    assert!(pruned_through >= cut, "{pruned_through} {cut}");
    let r = get("after=0", Some(token.expose())).await.unwrap();
    assert_eq!(r.status(), 410);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"], "audit_gap");
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains(&format!("after={pruned_through}")),
        "{v}"
    );
    // From the cut on, the rest streams.
    let r = get(&format!("after={pruned_through}"), Some(token.expose()))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let first: Value =
        serde_json::from_str(r.text().await.unwrap().lines().next().unwrap()).unwrap();
    assert!(first["seq"].as_i64().unwrap() > pruned_through);
    drop(dir);
}

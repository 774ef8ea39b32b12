//! A quick throughput figure for API-token exchanges against the real binary and Postgres.
//! Not a timed assertion: it prints what it measured. Run:
//!   cargo build --release -p broker && BROKER_BIN=target/release/broker \
//!   cargo test --release -p integration --test suite bench:: -- --ignored --nocapture

use broker::oidc::testkit::{self, TestIssuer, TestKey};
use broker::store::testdb::TestDb;
use integration::{BrokerProcess, BrokerSetup, acme_api_claims};
use std::time::Instant;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run explicitly"]
async fn api_token_exchange_throughput() {
    let n: usize = std::env::var("BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let conc: usize = std::env::var("BENCH_C")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    let issuer = TestIssuer::start().await;
    let gitlab = TestIssuer::start().await;
    let db = TestDb::postgres().await;
    let broker = BrokerProcess::start(
        &BrokerSetup::examples(db.url(), &issuer.url(), &gitlab.url())
            .extra("limits:\n  exchanges_per_minute_per_repository: 0\n")
            .env(vec![("BROKER_LOG".into(), "warn".into())]),
    )
    .await
    .unwrap();
    let tokens: Vec<String> = (0..n)
        .map(|_| {
            testkit::sign(
                TestKey::Rsa1,
                &acme_api_claims(&issuer.url(), "https://broker.test"),
            )
        })
        .collect();
    let client = integration::http::client();
    let url = format!("{}/v1/exchange", broker.url);
    let queue = std::sync::Arc::new(tokio::sync::Mutex::new(tokens));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..conc {
        let (q, c, u) = (queue.clone(), client.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            loop {
                let Some(t) = q.lock().await.pop() else { break };
                let t0 = Instant::now();
                let r = c
                    .post(&u)
                    .bearer_auth(t)
                    .json(&serde_json::json!({"credentials": ["deploy-api"]}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200);
                lat.push(t0.elapsed());
            }
            lat
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.unwrap());
    }
    let elapsed = start.elapsed();
    lat.sort();
    let p = |q: f64| lat[((lat.len() as f64 * q) as usize).min(lat.len() - 1)];
    eprintln!(
        "api_token exchanges: n={n} c={conc} {:.0}/s p50={:?} p99={:?} (Postgres store, durable audit)",
        n as f64 / elapsed.as_secs_f64(),
        p(0.50),
        p(0.99)
    );
    let stats = db.store().stats().await.unwrap();
    assert_eq!(stats.active_grants as usize, n);
    drop(broker);
    issuer.shutdown().await;
    gitlab.shutdown().await;
    db.cleanup().await;
}

//! Emergency revoke-all at scale, end to end: 1,000 active grants of mixed kinds (Postgres job
//! users on a real target database, API tokens, AWS sessions on a local moto server), then one
//! `POST /v1/admin/revoke-all`, then proof from each side: no role with the test's prefix left
//! in `pg_roles`, every API token inactive at introspection, the deny policy on the AWS role.
//! Prints the time the call took.
//!
//! AWS needs moto at target/test-venv (installed by scripts/test); without it the AWS part is
//! SKIPPED (printed) and the 1,000 grants are Postgres users and API tokens only.

use broker::oidc::testkit::TestIssuer;
use broker::store::testdb::TestDb;
use integration::http::{self, Api};
use integration::moto;
use integration::moto::Moto;
use integration::pg::PgApp;
use integration::{BrokerProcess, BrokerSetup, acme_token, github_issuer_yaml};
use serde_json::{Value, json};
use sqlx::postgres::PgPoolOptions;
use std::sync::Arc;
use std::time::Instant;

const OPERATOR_TOKEN: &str = "brk_op_revokeAllMixedE2eAdmin0000000000_0DFieD";
const GRANTS: usize = 1000;
/// Exchanges in flight while building the grants.
const CONCURRENCY: usize = 12;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_all_kills_a_thousand_mixed_grants() {
    let pg = PgApp::new("r", &["app"], &["reader", "owner"]).await;
    let tag = pg.tag.clone();
    let moto = Moto::start().await;
    let aws_role = format!("deploy-{tag}");
    let aws_arn = match &moto {
        Some(m) => Some(m.create_role(&aws_role).await),
        None => None,
    };
    let db = TestDb::postgres().await;
    let issuer = TestIssuer::start().await;
    let policies = tempfile::tempdir().expect("tmp");
    let mut creds = format!(
        r#"credentials:
  - name: pg-job
    max_ttl: 30m
    postgres:
      target: main
      database: {db}
      roles: [{reader}]
      owner: {owner}
  - name: api
    max_ttl: 30m
    api_token:
      audience: https://svc.test
      scopes: ["deploy:${{repository}}"]
"#,
        db = pg.db("app"),
        reader = pg.group("reader"),
        owner = pg.group("owner"),
    );
    let mut names = vec!["pg-job", "api"];
    if let Some(arn) = &aws_arn {
        creds.push_str(&format!(
            "  - name: aws\n    max_ttl: 30m\n    aws_sts:\n      target: main\n      role_arn: {arn}\n"
        ));
        names.push("aws");
    }
    let policy = format!(
        "{creds}rules:\n  - name: acme\n    issuer: github\n    credentials: [{}]\n    when: claims.repository_id == \"1000001\"\n",
        names.join(", ")
    );
    std::fs::write(policies.path().join("mixed.yaml"), policy).expect("policy");
    let mut targets = pg.target_yaml("      pool_size: 8\n      connect_timeout: 5s\n");
    if let Some(m) = &moto {
        targets.push_str(&format!(
            "  aws:\n    main:\n      region: us-east-1\n      endpoint_url: {}\n",
            m.url
        ));
    }
    let mut envs = moto::broker_env();
    envs.push(("BROKER_LOG".to_owned(), "warn".to_owned()));
    let broker = BrokerProcess::start(&BrokerSetup::new(
        db.url(),
        policies.path(),
        github_issuer_yaml(&issuer.url()),
    )
    .extra(format!(
        "{targets}limits:\n  exchanges_per_minute_per_repository: 0\n  request_timeout: 120s\n\
         operators:\n  - name: secteam\n    role: admin\n    token_sha256: {}\n",
        broker::secret::sha256_hex(OPERATOR_TOKEN.as_bytes())
    ))
    .env(envs))
    .await
    .expect("broker starts");
    let http = http::client();

    // ---- 1,000 grants, one credential each, kinds in turn ---------------------------------
    // With AWS: 500 Postgres users, 400 API tokens, 100 AWS sessions; without: 500 + 500.
    let kind_of = |i: usize| -> &'static str {
        if aws_arn.is_some() && i % 10 == 9 {
            "aws"
        } else if i.is_multiple_of(2) {
            "pg-job"
        } else {
            "api"
        }
    };
    let started = Instant::now();
    let sem = Arc::new(tokio::sync::Semaphore::new(CONCURRENCY));
    let mut tasks = Vec::new();
    for i in 0..GRANTS {
        let kind = kind_of(i);
        let token = acme_token(&issuer.url());
        let (http, url, sem) = (http.clone(), broker.url.clone(), sem.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire_owned().await.unwrap();
            let r = http
                .post(format!("{url}/v1/exchange"))
                .bearer_auth(token)
                .json(&json!({"credentials": [kind]}))
                .send()
                .await
                .expect("exchange");
            let status = r.status().as_u16();
            let body: Value = r.json().await.unwrap_or(Value::Null);
            assert_eq!(status, 200, "{kind}: {body}");
            let api_token = body["credentials"]["api"]["token"]
                .as_str()
                .map(str::to_owned);
            (kind, api_token)
        }));
    }
    let mut api_tokens = Vec::new();
    let mut per_kind = std::collections::BTreeMap::<&str, usize>::new();
    for t in tasks {
        let (kind, tok) = t.await.expect("exchange task");
        *per_kind.entry(kind).or_default() += 1;
        api_tokens.extend(tok);
    }
    println!(
        "created {GRANTS} grants {per_kind:?} in {:.1} s (concurrency {CONCURRENCY})",
        started.elapsed().as_secs_f64()
    );
    let pg_grants = per_kind["pg-job"] as i64;
    assert_eq!(
        pg.roles().await,
        pg_grants,
        "one login role per Postgres grant"
    );
    let store_pool = PgPoolOptions::new()
        .max_connections(1)
        .connect(db.url())
        .await
        .unwrap();
    let active: i64 = sqlx::query_scalar("SELECT count(*) FROM grants WHERE status = 'active'")
        .fetch_one(&store_pool)
        .await
        .unwrap();
    assert_eq!(active, GRANTS as i64);
    if let Some(m) = &moto {
        assert!(m.deny_policy(&aws_role).await.is_none(), "no deny yet");
    }
    // Spot-check that API tokens are live before the call.
    let introspect = |token: String| {
        let (http, url) = (http.clone(), broker.url.clone());
        async move {
            let v = Api::new(http, &url).introspect(&token).await;
            v["active"].as_bool().expect("active is a bool")
        }
    };
    assert!(introspect(api_tokens[0].clone()).await);

    // ---- one call ----------------------------------------------------------------------------
    let t0 = Instant::now();
    let (status, report) = Api::new(http.clone(), &broker.url)
        .revoke_all(
            OPERATOR_TOKEN,
            &json!({"reason": "revoke_all_mixed e2e: simulated compromise"}),
        )
        .await;
    let elapsed = t0.elapsed();
    assert_eq!(status, 200, "{report}");
    println!(
        "revoke-all: {} grants in {:.2} s; revoked per kind {}; failures {}; provider-wide {}",
        report["revoked_grants"],
        elapsed.as_secs_f64(),
        report["revoked"],
        report["failures"].as_array().map_or(0, Vec::len),
        report.get("provider_wide").cloned().unwrap_or(Value::Null)
    );
    assert_eq!(report["matched"], GRANTS);
    assert_eq!(report["revoked_grants"], GRANTS, "{report}");
    assert_eq!(report["failures"], json!([]));
    assert_eq!(report["truncated"], false);

    // ---- proof from each side ----------------------------------------------------------------
    assert_eq!(pg.roles().await, 0, "every job role is dropped");
    let mut still_active = 0;
    for chunk in api_tokens.chunks(CONCURRENCY) {
        let checks: Vec<_> = chunk.iter().cloned().map(&introspect).collect();
        for c in checks {
            still_active += usize::from(c.await);
        }
    }
    assert_eq!(still_active, 0, "every API token is inactive");
    println!("checked {} API tokens: all inactive", api_tokens.len());
    match &moto {
        Some(m) => {
            let doc = m.deny_policy(&aws_role).await.expect("deny policy written");
            let text = doc.to_string();
            assert!(text.contains("Deny"), "{text}");
            // The provider-wide kill switch: no session issued before the call survives.
            assert!(text.contains("aws:TokenIssueTime"), "{text}");
            println!(
                "AWS role {aws_role}: deny policy written ({} chars)",
                text.len()
            );
        }
        None => println!("SKIPPED (AWS part): no AWS grants to check"),
    }
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM grants WHERE status = 'active'")
        .fetch_one(&store_pool)
        .await
        .unwrap();
    assert_eq!(left, 0);
    store_pool.close().await;

    drop(broker);
    issuer.shutdown().await;
    db.cleanup().await;
    pg.cleanup().await;
    drop(moto);
}

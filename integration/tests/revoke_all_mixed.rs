#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a failed expectation is a failed test
//! Emergency revoke-all at scale, end to end: 1,000 active grants of mixed kinds (Postgres job
//! users on a real target database, API tokens, AWS sessions on a local moto server), then one
//! `POST /v1/admin/revoke-all`, then proof from each side: no role with the test's prefix left
//! in `pg_roles`, every API token inactive at introspection, the deny policy on the AWS role.
//! Prints the time the call took.
//!
//! AWS needs moto at target/test-venv (installed by scripts/test); without it the AWS part is
//! SKIPPED (printed) and the 1,000 grants are Postgres users and API tokens only.

use broker::oidc::testkit::{self, TestIssuer, TestKey};
use broker::store::testdb::{DEFAULT_PG_URL, PG_URL_ENV, TestDb};
use integration::moto::Moto;
use integration::{BrokerProcess, BrokerSetup, acme_api_claims, github_issuer_yaml};
use serde_json::{Value, json};
use sqlx::Row;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Instant;

const AUD: &str = "https://broker.test";
const OPERATOR_TOKEN: &str = "brk_op_revoke-all-mixed-e2e-admin";
const GRANTS: usize = 1000;
/// Exchanges in flight while building the grants.
const CONCURRENCY: usize = 12;

fn admin_url() -> String {
    std::env::var(PG_URL_ENV)
        .ok()
        .filter(|u| !u.trim().is_empty())
        .unwrap_or_else(|| DEFAULT_PG_URL.to_owned())
}

fn tag() -> String {
    format!("r{:08x}", (uuid::Uuid::new_v4().as_u128() >> 64) as u32)
}

async fn exec(pool: &PgPool, sql: String) {
    sqlx::raw_sql(&sql)
        .execute(pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// The target side: an app database, a group role, an owner role and a role prefix, all named
/// after the test's tag and dropped afterwards.
struct PgTarget {
    url: String,
    admin: PgPool,
    tag: String,
    prefix: String,
    app_db: String,
    reader: String,
    owner: String,
    host: String,
    port: u16,
}

impl PgTarget {
    async fn new(tag: &str) -> Self {
        let url = admin_url();
        let opts = PgConnectOptions::from_str(&url).expect("admin url");
        let admin = PgPoolOptions::new()
            .max_connections(2)
            .connect_with(opts.clone())
            .await
            .expect("admin connects");
        let t = Self {
            prefix: format!("{tag}u_"),
            app_db: format!("{tag}_app"),
            reader: format!("{tag}g_reader"),
            owner: format!("{tag}g_owner"),
            host: opts.get_host().to_owned(),
            port: opts.get_port(),
            admin,
            tag: tag.to_owned(),
            url,
        };
        exec(&t.admin, format!("CREATE DATABASE {}", t.app_db)).await;
        for r in [&t.reader, &t.owner] {
            exec(&t.admin, format!("CREATE ROLE {r} NOLOGIN")).await;
        }
        t
    }

    async fn our_roles(&self) -> i64 {
        sqlx::query("SELECT count(*) FROM pg_roles WHERE starts_with(rolname, $1)")
            .bind(&self.prefix)
            .fetch_one(&self.admin)
            .await
            .expect("count roles")
            .get(0)
    }

    async fn cleanup(self) {
        exec(
            &self.admin,
            format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.app_db),
        )
        .await;
        let left: Vec<String> =
            sqlx::query("SELECT rolname::text FROM pg_roles WHERE starts_with(rolname, $1)")
                .bind(&self.tag)
                .fetch_all(&self.admin)
                .await
                .expect("roles")
                .into_iter()
                .map(|r| r.get(0))
                .collect();
        for r in left {
            exec(&self.admin, format!("DROP OWNED BY {r}; DROP ROLE {r}")).await;
        }
        self.admin.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_all_kills_a_thousand_mixed_grants() {
    let tag = tag();
    let pg = PgTarget::new(&tag).await;
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
        db = pg.app_db,
        reader = pg.reader,
        owner = pg.owner
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
    let mut targets = format!(
        "targets:\n  postgres:\n    main:\n      admin_url: {{value: \"{url}\"}}\n      host: {host}\n      port: {port}\n      sslmode: disable\n      pool_size: 8\n      connect_timeout: 5s\n      role_prefix: {prefix}\n",
        url = pg.url,
        host = pg.host,
        port = pg.port,
        prefix = pg.prefix
    );
    if let Some(m) = &moto {
        targets.push_str(&format!(
            "  aws:\n    main:\n      region: us-east-1\n      endpoint_url: {}\n",
            m.url
        ));
    }
    let envs = [
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_EC2_METADATA_DISABLED", "true"),
        ("AWS_CONFIG_FILE", "/nonexistent/aws-config"),
        (
            "AWS_SHARED_CREDENTIALS_FILE",
            "/nonexistent/aws-credentials",
        ),
        ("BROKER_LOG", "warn"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    let broker = BrokerProcess::start(&BrokerSetup {
        store_url: db.url(),
        policies_dir: policies.path(),
        issuers_yaml: github_issuer_yaml(&issuer.url()),
        audience: AUD,
        extra_yaml: format!(
            "{targets}limits:\n  exchanges_per_minute_per_repository: 0\n  request_timeout: 120s\n\
             operators:\n  - name: secteam\n    role: admin\n    token_sha256: {}\n",
            broker::secret::sha256_hex(OPERATOR_TOKEN.as_bytes())
        ),
        env: envs,
    })
    .await
    .expect("broker starts");
    let http = reqwest::Client::new();

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
        let token = testkit::sign(TestKey::Rsa1, &acme_api_claims(&issuer.url(), AUD));
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
        pg.our_roles().await,
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
            let v: Value = http
                .post(format!("{url}/v1/introspect"))
                .form(&[("token", token.as_str())])
                .send()
                .await
                .expect("introspect")
                .json()
                .await
                .expect("introspect json");
            v["active"].as_bool().expect("active is a bool")
        }
    };
    assert!(introspect(api_tokens[0].clone()).await);

    // ---- one call ----------------------------------------------------------------------------
    let t0 = Instant::now();
    let r = http
        .post(format!("{}/v1/admin/revoke-all", broker.url))
        .bearer_auth(OPERATOR_TOKEN)
        .json(&json!({"reason": "revoke_all_mixed e2e: simulated compromise"}))
        .send()
        .await
        .expect("revoke-all");
    let status = r.status().as_u16();
    let report: Value = r.json().await.expect("report");
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
    assert_eq!(pg.our_roles().await, 0, "every job role is dropped");
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

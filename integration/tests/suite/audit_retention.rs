//! End to end for audit checkpoints and retention, through the real binary's CLI against a
//! real Postgres store: `broker audit checkpoint` signs where the chain stands, `broker audit
//! verify --checkpoint` proves the log still passes through it (with the config's keys or the
//! published JWKS), `broker audit prune` cuts old events and verify starts from the cut, and an
//! attacker who edits after the cut, or truncates and repairs the head, is caught.

use broker::oidc::testkit::TestIssuer;
use broker::store::testdb::TestDb;
use integration::http;
use integration::{BrokerProcess, BrokerSetup, acme_token, broker_cli};
use serde_json::json;
use std::path::Path;

struct Ran {
    code: i32,
    out: String,
}

fn cli(args: &[&str]) -> Ran {
    let r = broker_cli(None, args);
    Ran {
        code: r.code,
        out: r.output(),
    }
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_prove_the_log_across_prune_and_catch_tampering() {
    let db = TestDb::postgres().await;
    let issuer = TestIssuer::start().await;
    let gitlab = TestIssuer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let key = integration::write_signing_key(dir.path());
    let broker = BrokerProcess::start(
        &BrokerSetup::examples(db.url(), &issuer.url(), &gitlab.url()).extra(format!(
            "api_tokens:\n  signing_key: {{file: {}}}\n",
            key.display()
        )),
    )
    .await
    .unwrap();
    let http = integration::http::client();
    let exchange = || async {
        let token = acme_token(&issuer.url());
        let r = http
            .post(format!("{}/v1/exchange", broker.url))
            .bearer_auth(token)
            .json(&json!({"credentials": ["deploy-api"]}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    };
    for _ in 0..3 {
        exchange().await;
    }
    let config = broker.config_path.clone();
    let cp = dir.path().join("cp.jwt");
    let made = cli(&[
        "audit",
        "checkpoint",
        "--config",
        s(&config),
        "--out",
        s(&cp),
    ]);
    assert_eq!(made.code, 0, "{}", made.out);
    assert!(made.out.contains("3 events"), "{}", made.out);
    let token = std::fs::read_to_string(&cp).unwrap();
    assert!(token.starts_with("eyJ"), "a JWT");
    let jwks = dir.path().join("jwks.json");
    let published = http::get_text(&http, &format!("{}/.well-known/jwks.json", broker.url)).await;
    std::fs::write(&jwks, published).unwrap();

    // Both ways of checking the signature; the chain passes through the checkpoint.
    let v = cli(&[
        "audit",
        "verify",
        "--config",
        s(&config),
        "--checkpoint",
        s(&cp),
    ]);
    assert_eq!(v.code, 0, "{}", v.out);
    assert!(v.out.contains("checkpoint matched"), "{}", v.out);
    let v = cli(&[
        "audit",
        "verify",
        "--store",
        db.url(),
        "--checkpoint",
        s(&cp),
        "--jwks",
        s(&jwks),
    ]);
    assert_eq!(v.code, 0, "{}", v.out);

    // A checkpoint signed by another key is refused before any walk.
    let other = broker::providers::api_token::SigningKeys::ephemeral().unwrap();
    let forged_cp = dir.path().join("forged.jwt");
    let jwks_doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&jwks).unwrap()).unwrap();
    let claims = broker::audit::checkpoint::verify(
        broker::audit::checkpoint::VerifyingKeys::Jwks(&jwks_doc),
        &token,
    )
    .unwrap();
    assert_eq!(claims.event_count, 3);
    std::fs::write(
        &forged_cp,
        other
            .sign_document(broker::audit::checkpoint::CHECKPOINT_TYPE, &claims)
            .unwrap(),
    )
    .unwrap();
    let v = cli(&[
        "audit",
        "verify",
        "--store",
        db.url(),
        "--checkpoint",
        s(&forged_cp),
        "--jwks",
        s(&jwks),
    ]);
    assert_ne!(v.code, 0, "{}", v.out);
    assert!(v.out.contains("not a checkpoint signed"), "{}", v.out);

    // Prune everything so far (a future date is refused), then more events.
    let future = cli(&[
        "audit",
        "prune",
        "--config",
        s(&config),
        "--before",
        "2999-01-01",
    ]);
    assert_ne!(future.code, 0, "{}", future.out);
    let now = broker::time::Clock::now(&broker::time::SystemClock)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let p = cli(&["audit", "prune", "--config", s(&config), "--before", &now]);
    assert_eq!(p.code, 0, "{}", p.out);
    assert!(p.out.contains("pruned 3 events"), "{}", p.out);
    exchange().await;
    let v = cli(&[
        "audit",
        "verify",
        "--config",
        s(&config),
        "--checkpoint",
        s(&cp),
    ]);
    assert_eq!(v.code, 0, "{}", v.out);
    assert!(v.out.contains("walk started at the prune cut"), "{}", v.out);
    assert!(v.out.contains("checkpoint matched"), "{}", v.out);

    // A newer checkpoint; then an attacker with table rights cuts the newest event and
    // repairs the head: the chain alone is intact, the checkpoint is not.
    let cp2 = dir.path().join("cp2.jwt");
    let made = cli(&[
        "audit",
        "checkpoint",
        "--config",
        s(&config),
        "--out",
        s(&cp2),
    ]);
    assert_eq!(made.code, 0, "{}", made.out);
    let admin = sqlx::PgPool::connect(db.url()).await.unwrap();
    sqlx::raw_sql(
        "ALTER TABLE audit_events DISABLE TRIGGER USER;
         DELETE FROM audit_events WHERE seq = (SELECT max(seq) FROM audit_events);
         UPDATE audit_chain_head SET seq = (SELECT max(seq) FROM audit_events),
             hash = (SELECT hash FROM audit_events ORDER BY seq DESC LIMIT 1);
         ALTER TABLE audit_events ENABLE TRIGGER USER;",
    )
    .execute(&admin)
    .await
    .unwrap();
    let plain = cli(&["audit", "verify", "--config", s(&config)]);
    assert_eq!(plain.code, 0, "{}", plain.out);
    let v = cli(&[
        "audit",
        "verify",
        "--config",
        s(&config),
        "--checkpoint",
        s(&cp2),
    ]);
    assert_eq!(v.code, 1, "{}", v.out);
    assert!(v.out.contains("audit_event_deleted"), "{}", v.out);

    // An edit after the cut is still detected.
    sqlx::raw_sql(
        "ALTER TABLE audit_events DISABLE TRIGGER USER;
         UPDATE audit_events SET reason = 'forged'
             WHERE seq = (SELECT max(seq) FROM audit_events);
         ALTER TABLE audit_events ENABLE TRIGGER USER;",
    )
    .execute(&admin)
    .await
    .unwrap();
    let v = cli(&["audit", "verify", "--config", s(&config)]);
    assert_eq!(v.code, 1, "{}", v.out);
    assert!(v.out.contains("audit_event_modified"), "{}", v.out);
    admin.close().await;

    drop(broker);
    issuer.shutdown().await;
    gitlab.shutdown().await;
    db.cleanup().await;
}

/// The broker takes signed checkpoints itself: at start when none is recent, into its log, a
/// directory and a URL; a second replica on the same store does not take another inside the
/// period; the exported file verifies against the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_checkpoints_are_taken_once_per_period_and_exported() {
    use std::sync::{Arc, Mutex};
    let db = TestDb::postgres().await;
    let issuer = TestIssuer::start().await;
    let gitlab = TestIssuer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let key = integration::write_signing_key(dir.path());
    let out = dir.path().join("checkpoints");
    std::fs::create_dir(&out).unwrap();
    // The export URL: a local receiver that keeps every body it is sent.
    let received: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let sink = received.clone();
    let app = axum::Router::new().route(
        "/checkpoints",
        axum::routing::post(move |headers: axum::http::HeaderMap, body: String| {
            let sink = sink.clone();
            async move {
                let ct = headers
                    .get("content-type")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned();
                sink.lock().unwrap().push((ct, body));
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let receiver = format!("http://{}/checkpoints", listener.local_addr().unwrap());
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    let setup = BrokerSetup::examples(db.url(), &issuer.url(), &gitlab.url()).extra(format!(
        "api_tokens:\n  signing_key: {{file: {key}}}\n\
         audit:\n  checkpoints:\n    every: 1h\n    export_dir: {out}\n    export_url: {receiver}\n",
        key = key.display(),
        out = out.display(),
    ));
    let a = BrokerProcess::start(&setup).await.unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let file = loop {
        let files: Vec<_> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        if let [f] = files.as_slice() {
            break f.clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no checkpoint file: {files:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    // The second replica starts inside the period: it takes none.
    let b = BrokerProcess::start(&setup).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 1);
    let store = broker::store::Store::connect(db.url()).await.unwrap();
    let cps = store.audit_checkpoints(100).await.unwrap();
    assert_eq!(cps.len(), 1, "{cps:?}");

    // The same JWT went to the URL and into the log, and it verifies against the store.
    let jwt = std::fs::read_to_string(&file).unwrap();
    let got = received.lock().unwrap().clone();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].0, "application/jwt");
    assert_eq!(got[0].1, jwt.trim());
    assert!(
        a.log().contains(jwt.trim()),
        "the log carries the checkpoint"
    );
    assert!(!b.log().contains(jwt.trim()));
    let v = cli(&[
        "audit",
        "verify",
        "--config",
        s(&a.config_path),
        "--checkpoint",
        s(&file),
    ]);
    assert_eq!(v.code, 0, "{}", v.out);
    assert!(v.out.contains("checkpoint matched"), "{}", v.out);
    server.abort();
}

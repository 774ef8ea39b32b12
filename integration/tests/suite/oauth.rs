//! The standard OAuth shapes (issue 25) driven by an off-the-shelf client: Authlib (PyPI, in
//! `target/oauth-venv`, installed by `scripts/test`) runs `integration/scripts/oauth_client.py`
//! against the live broker and a local test issuer: RFC 8414 discovery, RFC 8693 exchange,
//! RFC 7662 introspection, RFC 7009 revocation (by access token and by revocation handle),
//! then the RFCs' error answers. This test asserts on what the client saw AND on the store:
//! the grants, their revocation, and the audit events of every exchange and refusal.

use broker::oidc::testkit::TestIssuer;
use broker::store::testdb::TestDb;
use broker::store::{AuditFilter, GrantStatus};
use integration::{
    BrokerProcess, BrokerSetup, Secrets, acme_token, example_issuers_yaml, repo_root,
};
use serde_json::{Value, json};
use std::io::Write;

const DEPLOY_AUD: &str = "https://deploy.acme.example";

async fn authlib_flow(db: TestDb) {
    let Some(python) = integration::tools::oauth_python() else {
        eprintln!("SKIPPED: no target/oauth-venv (scripts/test installs Authlib there)");
        return;
    };
    let issuer = TestIssuer::start().await;
    let gitlab = TestIssuer::start().await;
    let mut broker = BrokerProcess::start(&BrokerSetup::new(
        db.url(),
        &repo_root().join("policies"),
        example_issuers_yaml(&issuer.url(), &gitlab.url()),
    ))
    .await
    .expect("broker starts");

    // A job token exchanged natively first: the OAuth path must refuse it as replayed.
    let used = acme_token(&issuer.url());
    let (status, native) = integration::http::Api::new(integration::http::client(), &broker.url)
        .exchange(Some(&used), &json!({"credentials": ["deploy-api"]}))
        .await;
    assert_eq!(status, 200, "{native}");
    let tokens: Vec<String> = (0..6).map(|_| acme_token(&issuer.url())).collect();
    let input = json!({
        "broker": broker.url,
        "audience": DEPLOY_AUD,
        "tokens": tokens,
        "used": used,
    });
    let mut child = std::process::Command::new(&python)
        .arg(repo_root().join("integration/scripts/oauth_client.py"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python runs");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.to_string().as_bytes())
        .expect("input written");
    let run = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .expect("join")
        .expect("python finishes");
    assert!(
        run.status.success(),
        "the Authlib client failed: {}\n{}",
        String::from_utf8_lossy(&run.stderr),
        broker.log()
    );
    let out: Value = serde_json::from_slice(&run.stdout).expect("client output is JSON");

    // Discovery names the endpoints on this broker.
    let meta = &out["metadata"];
    assert_eq!(
        meta["token_endpoint"],
        format!("{}/oauth2/token", broker.url)
    );
    assert_eq!(
        meta["revocation_endpoint"],
        format!("{}/oauth2/revoke", broker.url)
    );
    assert_eq!(
        meta["introspection_endpoint"],
        format!("{}/v1/introspect", broker.url)
    );
    assert_eq!(
        meta["jwks_uri"],
        format!("{}/.well-known/jwks.json", broker.url)
    );

    // Exchange: RFC 8693's answer, the token's claims, introspection active then inactive.
    let ex = &out["exchange"];
    assert_eq!(
        ex["issued_token_type"],
        "urn:ietf:params:oauth:token-type:access_token"
    );
    assert_eq!(ex["scope"], "deploy:acme/api");
    assert_eq!(out["claims"]["aud"], DEPLOY_AUD);
    assert_eq!(out["claims"]["scope"], "deploy:acme/api");
    let grant1: uuid::Uuid = ex["grant_id"]
        .as_str()
        .expect("grant id")
        .parse()
        .expect("uuid");
    assert_eq!(out["claims"]["gid"], grant1.to_string());
    assert_eq!(out["introspect_before"]["active"], true);
    assert_eq!(out["introspect_before"]["grant_id"], grant1.to_string());
    assert_eq!(out["revoke_status"], 200);
    assert_eq!(out["revoke_cache_control"], "no-store");
    assert_eq!(out["introspect_after"], json!({"active": false}));
    assert_eq!(out["revoke_again_status"], 200);
    assert_eq!(out["revoke_unknown_status"], 200);
    let ex2 = &out["exchange2"];
    assert_eq!(
        ex2["issued_token_type"],
        "urn:ietf:params:oauth:token-type:jwt"
    );
    let grant2: uuid::Uuid = ex2["grant_id"]
        .as_str()
        .expect("grant id")
        .parse()
        .expect("uuid");
    assert_eq!(
        out["handle_revoke"],
        json!({"active_before": true, "status": 200, "active_after": false})
    );

    // Errors, as the client library read them.
    assert_eq!(
        out["errors"],
        json!({
            "replayed": "invalid_grant",
            "not_allowed": "invalid_target",
            "unknown_target": "invalid_target",
            "scope_not_offered": "invalid_scope",
            "bad_subject_type": "invalid_request",
            "garbage_token": "invalid_grant",
            "grant_type": "unsupported_grant_type",
        })
    );
    let raw = &out["raw_error"];
    assert_eq!(raw["status"], 400);
    assert_eq!(raw["cache_control"], "no-store");
    assert_eq!(raw["content_type"], "application/json");
    assert_eq!(raw["body"]["error"], "unsupported_grant_type");
    assert_eq!(raw["body"]["reason"], "unsupported_grant_type");

    // The store: both OAuth grants revoked by the job; every exchange and refusal audited.
    let store = db.store();
    for g in [grant1, grant2] {
        let row = store.grant(g).await.expect("store").expect("grant row");
        assert_eq!(row.status, GrantStatus::Revoked, "{g}");
        assert_eq!(row.repository.as_deref(), Some("acme/api"));
    }
    let events = store
        .audit_events(&AuditFilter {
            limit: 500,
            ..AuditFilter::default()
        })
        .await
        .expect("audit");
    let reasons: Vec<(String, String)> = events
        .iter()
        .map(|ev| {
            (
                json!(ev.action).as_str().unwrap_or("").to_owned(),
                ev.reason.clone(),
            )
        })
        .collect();
    let count = |action: &str, reason: &str| {
        reasons
            .iter()
            .filter(|(a, r)| a == action && r == reason)
            .count()
    };
    // The native exchange and the two OAuth ones.
    assert_eq!(count("exchange", "ok"), 3, "{reasons:?}");
    assert_eq!(count("revoke", "requested"), 2, "{reasons:?}");
    for reason in [
        "token_replayed",
        "no_matching_rule",
        "unknown_credential",
        "scope_not_offered",
        "unsupported_grant_type",
        "unsupported_token_type",
        "malformed_token",
    ] {
        assert!(
            count("exchange", reason) >= 1,
            "{reason} audited: {reasons:?}"
        );
    }
    // A refused target is audited with the verified job's attribution.
    let unknown = events
        .iter()
        .find(|ev| ev.reason == "unknown_credential")
        .expect("unknown target event");
    assert_eq!(unknown.job.repository_id.as_deref(), Some("1000001"));
    assert_eq!(
        unknown.credentials_requested,
        vec!["https://nowhere.example".to_owned()]
    );

    let mut secrets = Secrets::default();
    secrets.add_response(&native);
    secrets.add(used);
    for t in tokens {
        secrets.add(t);
    }
    for s in out["secrets"].as_array().expect("secrets") {
        secrets.add(s.as_str().expect("secret").to_owned());
    }
    assert_eq!(secrets.len(), 13);
    secrets.assert_not_leaked(&broker, db.url()).await;
    broker.kill();
    gitlab.shutdown().await;
    issuer.shutdown().await;
    db.cleanup().await;
}

#[tokio::test]
async fn authlib_exchange_introspect_revoke_postgres() {
    authlib_flow(TestDb::postgres().await).await;
}

#[tokio::test]
async fn authlib_exchange_introspect_revoke_sqlite() {
    authlib_flow(TestDb::sqlite().await).await;
}

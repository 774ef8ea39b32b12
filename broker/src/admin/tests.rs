// Long on purpose: test file (one scenario per operator endpoint through the real router).
//! Operator endpoints through the real router: authentication, roles, job tokens refused,
//! audit of every call, freeze/unfreeze, and revoke-all over 1,000 grants.

use super::*;
use crate::audit::Action;
use crate::config::{GrantConfig, ReaperConfig};
use crate::http::{HttpLimits, router};
use crate::oidc::{Verifier, VerifierOptions, dev};
use crate::policy::LoadOptions;
use crate::providers::api_token::{ApiTokenProvider, SigningKeys};
use crate::secret::Sensitive;
use crate::service::{Broker, BrokerParts, ExchangeRequest, RequestCtx};
use crate::store::{AuditFilter, GrantStatus, testdb::TestDb};
use crate::time::{Clock, ManualClock, SharedClock};
use axum::body::Body;
use axum::http::{Request, StatusCode};
use serde_json::{Value, json};
use std::sync::Arc;
use tower::ServiceExt;

const AUD: &str = "https://broker.test";
const POLICY: &str = r#"
credentials:
  - name: deploy-api
    max_ttl: 1h
    api_token: {audience: https://deploy.example, scopes: ["deploy:${repository}"]}
rules:
  - name: acme-api
    issuer: github
    credentials: [deploy-api]
    when: claims.repository_owner_id == "9000001"
"#;

struct H {
    broker: Arc<Broker>,
    app: axum::Router,
    clock: Arc<ManualClock>,
    admin: Sensitive,
    auditor: Sensitive,
    _db: TestDb,
    _dir: tempfile::TempDir,
}

async fn harness() -> H {
    harness_with(Vec::new()).await
}

async fn harness_with(extra_operators: Vec<OperatorConfig>) -> H {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("p.yaml"), POLICY).unwrap();
    let clock = Arc::new(ManualClock::at_unix(1_900_000_000));
    let shared: SharedClock = clock.clone();
    let verifier = Verifier::new(
        AUD.into(),
        vec![dev::issuer_config("github", AUD)],
        shared.clone(),
        VerifierOptions::default(),
    )
    .unwrap();
    let keys = Arc::new(SigningKeys::ephemeral().unwrap());
    let db = TestDb::sqlite().await;
    let mut broker = Broker::new(BrokerParts {
        verifier: Arc::new(verifier),
        store: db.store(),
        clock: shared,
        api_tokens: Arc::new(ApiTokenProvider::new(keys, AUD.into())),
        extra_providers: Vec::new(),
        policy_dir: dir.path().to_path_buf(),
        policy_opts: LoadOptions::default(),
        grants: GrantConfig::default(),
        reaper: ReaperConfig::default(),
        max_credentials: 16,
        rate_per_minute: 0,
    })
    .unwrap();
    let (admin, admin_hash) = operators::new_token();
    let (auditor, auditor_hash) = operators::new_token();
    let mut ops = vec![
        OperatorConfig {
            name: "alice".into(),
            role: Role::Admin,
            token_sha256: Some(admin_hash),
            oidc: None,
        },
        OperatorConfig {
            name: "bob".into(),
            role: Role::Auditor,
            token_sha256: Some(auditor_hash),
            oidc: None,
        },
    ];
    ops.extend(extra_operators);
    broker.set_operators(
        Operators::from_config_with_oidc(
            &ops,
            &[dev::issuer_config("github", AUD)],
            AUD,
            clock.clone(),
        )
        .unwrap(),
    );
    let broker = Arc::new(broker);
    let limits = HttpLimits {
        max_body_bytes: 64 * 1024,
        request_timeout: std::time::Duration::from_secs(120),
        max_concurrency: 64,
    };
    H {
        app: router(broker.clone(), &limits),
        broker,
        clock,
        admin,
        auditor,
        _db: db,
        _dir: dir,
    }
}

fn job_token(h: &H, repo: &str, repo_id: u64) -> Sensitive {
    let job = dev::DevJob {
        repository: repo.into(),
        repository_id: repo_id,
        ..dev::DevJob::acme_api(AUD, h.clock.now())
    };
    Sensitive::new(dev::sign(&dev::github_claims(&job)).unwrap())
}

async fn call(
    h: &H,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Value,
) -> (StatusCode, Value) {
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", "application/json");
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let body = if body.is_null() {
        Body::empty()
    } else {
        Body::from(body.to_string())
    };
    let resp = h
        .app
        .clone()
        .oneshot(req.body(body).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .unwrap();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

async fn exchange(h: &H, repo: &str, repo_id: u64) -> (StatusCode, Value) {
    let tok = job_token(h, repo, repo_id);
    call(
        h,
        "POST",
        "/v1/exchange",
        Some(tok.expose()),
        json!({"credentials": ["deploy-api"]}),
    )
    .await
}

async fn admin_events(h: &H) -> Vec<crate::audit::AuditEvent> {
    h.broker
        .store
        .audit_events(&AuditFilter::default())
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.action == Action::Admin)
        .collect()
}

#[tokio::test]
async fn unauthenticated_wrong_role_and_job_token_calls_are_refused_and_audited() {
    let h = harness().await;
    let job = job_token(&h, "acme/api", 1);
    let (other, _) = operators::new_token();
    let cases: [(Option<&str>, StatusCode, &str); 4] = [
        (None, StatusCode::UNAUTHORIZED, "missing_token"),
        (
            Some(job.expose()),
            StatusCode::UNAUTHORIZED,
            "operator_unauthorized",
        ),
        (
            Some(other.expose()),
            StatusCode::UNAUTHORIZED,
            "operator_unauthorized",
        ),
        (
            Some(h.auditor.expose()),
            StatusCode::FORBIDDEN,
            "operator_forbidden",
        ),
    ];
    for path in [
        "/v1/admin/revoke-all",
        "/v1/admin/freeze",
        "/v1/admin/unfreeze",
    ] {
        for (tok, status, code) in &cases {
            let (s, body) = call(&h, "POST", path, *tok, json!({"reason": "x"})).await;
            assert_eq!(s, *status, "{path} {body}");
            assert_eq!(body["error"], *code, "{path}");
            // The token is never echoed.
            if let Some(t) = tok {
                assert!(!body.to_string().contains(t));
            }
        }
    }
    // GET freeze status: auditors may, job tokens may not.
    let (s, body) = call(
        &h,
        "GET",
        "/v1/admin/freeze",
        Some(h.auditor.expose()),
        Value::Null,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["frozen"], false);
    let (s, _) = call(
        &h,
        "GET",
        "/v1/admin/freeze",
        Some(job.expose()),
        Value::Null,
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);

    let events = admin_events(&h).await;
    assert_eq!(events.len(), 3 * 4 + 2);
    let refused: Vec<_> = events
        .iter()
        .filter(|e| e.reason == "operator_forbidden")
        .collect();
    assert_eq!(refused.len(), 3);
    assert!(
        refused
            .iter()
            .all(|e| e.actor.as_deref() == Some("operator:bob"))
    );
    assert!(
        events
            .iter()
            .any(|e| e.reason == "freeze_status" && e.actor.as_deref() == Some("operator:bob"))
    );
    let all = serde_json::to_string(&events).unwrap();
    assert!(!all.contains(job.expose()) && !all.contains(h.auditor.expose()));
    // Nothing was frozen or revoked by the refused calls.
    assert!(h.broker.store.freeze_state().await.unwrap().is_none());
}

#[tokio::test]
async fn freeze_refuses_exchanges_until_unfreeze() {
    let h = harness().await;
    let (s, body) = exchange(&h, "acme/api", 1).await;
    assert_eq!(s, StatusCode::OK, "{body}");

    // A reason is required.
    let (s, body) = call(
        &h,
        "POST",
        "/v1/admin/freeze",
        Some(h.admin.expose()),
        json!({}),
    )
    .await;
    assert_eq!(
        (s, body["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("bad_request"))
    );

    // Frozen for one repository only.
    let (s, body) = call(
        &h,
        "POST",
        "/v1/admin/freeze",
        Some(h.admin.expose()),
        json!({"reason": "incident 7", "filter": {"repository": "acme/api"}}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let (s, body) = exchange(&h, "acme/api", 1).await;
    assert_eq!(
        (s, body["error"].as_str()),
        (StatusCode::FORBIDDEN, Some("frozen"))
    );
    let (s, _) = exchange(&h, "acme/web", 2).await;
    assert_eq!(s, StatusCode::OK);

    // Frozen for everything.
    let (s, _) = call(
        &h,
        "POST",
        "/v1/admin/freeze",
        Some(h.admin.expose()),
        json!({"reason": "all"}),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let (s, body) = exchange(&h, "acme/web", 2).await;
    assert_eq!(
        (s, body["error"].as_str()),
        (StatusCode::FORBIDDEN, Some("frozen"))
    );
    let denied = h
        .broker
        .store
        .audit_events(&AuditFilter {
            reason: Some("frozen".into()),
            ..AuditFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(denied.len(), 2);

    let (s, body) = call(
        &h,
        "POST",
        "/v1/admin/unfreeze",
        Some(h.admin.expose()),
        Value::Null,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["was_frozen"], true);
    let (s, _) = exchange(&h, "acme/api", 1).await;
    assert_eq!(s, StatusCode::OK);
    let events = admin_events(&h).await;
    assert!(
        events
            .iter()
            .filter(|e| e.reason == "freeze" || e.reason == "unfreeze")
            .all(|e| e.actor.as_deref() == Some("operator:alice"))
    );
    assert!(
        h.broker
            .store
            .verify_audit_chain()
            .await
            .unwrap()
            .is_intact()
    );
}

#[tokio::test]
async fn a_freeze_set_elsewhere_applies_within_the_refresh_bound() {
    let h = harness().await;
    // Prime this replica's cache (not frozen).
    assert_eq!(exchange(&h, "acme/api", 1).await.0, StatusCode::OK);
    // Another replica freezes: written straight to the store.
    let rec = crate::store::FreezeRecord {
        filter: json!({}),
        reason: "elsewhere".into(),
        actor: "operator:carol".into(),
        since: h.clock.now(),
    };
    let ev = crate::audit::AuditEvent::new(
        h.clock.now(),
        Action::Admin,
        crate::audit::Outcome::Success,
        "freeze",
    );
    h.broker.store.set_freeze(Some(&rec), &ev).await.unwrap();
    h.clock.advance(FREEZE_REFRESH);
    assert_eq!(exchange(&h, "acme/api", 1).await.0, StatusCode::FORBIDDEN);
    // A freeze this build cannot read freezes everything (fail closed).
    let rec = crate::store::FreezeRecord {
        filter: json!({"future_field": 1}),
        ..rec
    };
    let ev = crate::audit::AuditEvent::new(
        h.clock.now(),
        Action::Admin,
        crate::audit::Outcome::Success,
        "freeze",
    );
    h.broker.store.set_freeze(Some(&rec), &ev).await.unwrap();
    h.clock.advance(FREEZE_REFRESH);
    assert_eq!(exchange(&h, "acme/web", 2).await.0, StatusCode::FORBIDDEN);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_all_revokes_a_thousand_grants_in_one_call() {
    let h = harness().await;
    const N: usize = 1000;
    let mut tokens = Vec::with_capacity(N);
    let ctx = RequestCtx::default();
    for i in 0..N {
        let repo = if i % 10 == 0 { "acme/web" } else { "acme/api" };
        let resp = h
            .broker
            .exchange(
                ExchangeRequest {
                    token: job_token(&h, repo, 1),
                    credentials: vec!["deploy-api".into()],
                    ttl: None,
                    parameters: Default::default(),
                },
                &ctx,
            )
            .await
            .unwrap();
        let crate::providers::Field::Secret(s) = &resp.credentials[0]
            .fields
            .iter()
            .find(|(k, _)| k == "token")
            .unwrap()
            .1
        else {
            panic!("token field is secret")
        };
        tokens.push(s.expose().to_owned());
    }
    assert_eq!(
        h.broker.introspect(&tokens[0]).await.unwrap()["active"],
        true
    );

    // A filtered call first: only acme/web (every tenth grant).
    let (s, body) = call(
        &h,
        "POST",
        "/v1/admin/revoke-all",
        Some(h.admin.expose()),
        json!({"reason": "web leak", "filter": {"repository": "acme/web"}}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["revoked"]["api_token"], N / 10);
    assert_eq!(
        h.broker.introspect(&tokens[0]).await.unwrap()["active"],
        false
    );
    assert_eq!(
        h.broker.introspect(&tokens[1]).await.unwrap()["active"],
        true
    );

    let started = std::time::Instant::now();
    let (s, body) = call(
        &h,
        "POST",
        "/v1/admin/revoke-all",
        Some(h.admin.expose()),
        json!({"reason": "break glass"}),
    )
    .await;
    let elapsed = started.elapsed();
    eprintln!("revoke-all: {} grants revoked in {elapsed:?}", N - N / 10);
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["matched"], N - N / 10);
    assert_eq!(body["revoked_grants"], N - N / 10);
    assert_eq!(body["failures"], json!([]));
    for t in &tokens {
        assert_eq!(h.broker.introspect(t).await.unwrap()["active"], false);
    }
    assert!(h.broker.store.active_grants(10).await.unwrap().is_empty());
    let g = h
        .broker
        .store
        .audit_events(&AuditFilter {
            reason: Some("requested".into()),
            limit: 1,
            ..AuditFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(g[0].actor.as_deref(), Some("operator:alice"));
    let grant = h
        .broker
        .store
        .grant(g[0].grant_id.unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(grant.status, GrantStatus::Revoked);
    let summary = admin_events(&h).await;
    assert!(
        summary[0]
            .detail
            .as_deref()
            .unwrap()
            .contains("break glass")
    );
    assert!(
        h.broker
            .store
            .verify_audit_chain()
            .await
            .unwrap()
            .is_intact()
    );
}

#[tokio::test]
async fn audit_query_is_for_operators_only_and_audited() {
    let h = harness().await;
    let (s, _) = exchange(&h, "acme/api", 1).await;
    assert_eq!(s, StatusCode::OK);
    let job = job_token(&h, "acme/api", 1);
    for (tok, status) in [
        (None, StatusCode::UNAUTHORIZED),
        (Some(job.expose()), StatusCode::UNAUTHORIZED),
    ] {
        let (s, body) = call(&h, "GET", "/v1/audit", tok, Value::Null).await;
        assert_eq!(s, status, "{body}");
        assert!(body.get("events").is_none(), "nothing leaks: {body}");
    }
    // Auditor and admin both may.
    for tok in [&h.auditor, &h.admin] {
        let (s, body) = call(&h, "GET", "/v1/audit", Some(tok.expose()), Value::Null).await;
        assert_eq!(s, StatusCode::OK, "{body}");
        assert!(body["events"].as_array().is_some_and(|e| !e.is_empty()));
        assert!(body["next_cursor"].is_null());
    }
    let events = admin_events(&h).await;
    let queries: Vec<_> = events
        .iter()
        .filter(|e| e.reason == "audit_query")
        .collect();
    assert_eq!(queries.len(), 2, "each answered query audited");
    assert_eq!(queries[0].actor.as_deref(), Some("operator:alice"));
    assert_eq!(queries[1].actor.as_deref(), Some("operator:bob"));
    assert_eq!(
        events
            .iter()
            .filter(|e| e.reason == "missing_token" || e.reason == "operator_unauthorized")
            .count(),
        2,
        "refusals audited"
    );
    // A malformed filter is a 400, audited with the operator.
    let (s, body) = call(
        &h,
        "GET",
        "/v1/audit?repo=acme%2Fapi",
        Some(h.auditor.expose()),
        Value::Null,
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{body}");
    assert!(admin_events(&h).await.iter().any(|e| {
        e.reason == "bad_request"
            && e.actor.as_deref() == Some("operator:bob")
            && e.detail
                .as_deref()
                .is_some_and(|d| d.starts_with("audit_query"))
    }));
}

#[tokio::test]
async fn audit_query_filters_and_follows_cursors() {
    let h = harness().await;
    for i in 0..5 {
        let (s, _) = exchange(&h, "acme/api", 1).await;
        assert_eq!(s, StatusCode::OK);
        h.clock.advance(time::Duration::seconds(1));
        let (s, _) = exchange(&h, &format!("acme/other{i}"), 2).await;
        assert_eq!(s, StatusCode::OK);
        h.clock.advance(time::Duration::seconds(1));
    }
    let mut seen = Vec::new();
    let mut path = "/v1/audit?repository=acme%2Fapi&outcome=allow&limit=2".to_owned();
    let mut pages = 0;
    loop {
        let (s, body) = call(&h, "GET", &path, Some(h.auditor.expose()), Value::Null).await;
        assert_eq!(s, StatusCode::OK, "{body}");
        pages += 1;
        for e in body["events"].as_array().unwrap() {
            assert_eq!(e["job"]["repository"], "acme/api");
            assert_eq!(e["outcome"], "allow");
            seen.push(e["id"].as_str().unwrap().to_owned());
        }
        match body["next_cursor"].as_str() {
            Some(c) => {
                path = format!("/v1/audit?repository=acme%2Fapi&outcome=allow&limit=2&cursor={c}")
            }
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(seen.len(), 5);
    let mut dedup = seen.clone();
    dedup.sort();
    dedup.dedup();
    assert_eq!(dedup.len(), 5, "no duplicates across pages");
    let (s, body) = call(
        &h,
        "GET",
        "/v1/audit?action=exchange",
        Some(h.auditor.expose()),
        Value::Null,
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "unknown parameter: {body}");
    // Time range: the first two seconds hold one exchange per repository.
    let (s, body) = call(
        &h,
        "GET",
        "/v1/audit?since=2030-03-17T17:46:40Z&until=2030-03-17T17:46:42Z&credential=deploy-api&kind=api_token",
        Some(h.auditor.expose()),
        Value::Null,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let repos: Vec<_> = body["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["job"]["repository"].as_str().unwrap_or("").to_owned())
        .collect();
    assert_eq!(repos, vec!["acme/other0", "acme/api"]);
}

/// The CLI's client over a real socket: follows cursors, stops at `max` with a cursor to
/// resume from, and reports refusals without the token.
#[tokio::test]
async fn audit_client_follows_cursors_up_to_max() {
    use super::audit_client::query;
    let h = harness().await;
    for _ in 0..7 {
        let (s, _) = exchange(&h, "acme/api", 1).await;
        assert_eq!(s, StatusCode::OK);
        h.clock.advance(time::Duration::seconds(1));
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let app = h.app.clone();
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let filters = vec![("repository".to_owned(), "acme/api".to_owned())];

    let mut ids = Vec::new();
    let all = query(&base, &h.auditor, &filters, None, 100, |e| {
        ids.push(e.id);
        Ok(())
    })
    .await
    .unwrap();
    assert_eq!(all.fetched, 7);
    assert_eq!(all.next_cursor, None);

    let mut first = Vec::new();
    let part = query(&base, &h.auditor, &filters, None, 4, |e| {
        first.push(e.id);
        Ok(())
    })
    .await
    .unwrap();
    assert_eq!(part.fetched, 4);
    let cursor = part.next_cursor.expect("more to come");
    let mut rest = Vec::new();
    query(&base, &h.auditor, &filters, Some(cursor), 100, |e| {
        rest.push(e.id);
        Ok(())
    })
    .await
    .unwrap();
    first.extend(rest);
    assert_eq!(
        first, ids,
        "resuming from the cursor continues without gap or repeat"
    );

    let job = job_token(&h, "acme/api", 1);
    let err = query(&base, &job, &filters, None, 10, |_| Ok(()))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("401") && !err.contains(job.expose()), "{err}");
    let bad = vec![("since".to_owned(), "yesterday".to_owned())];
    let err = query(&base, &h.auditor, &bad, None, 10, |_| Ok(()))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("400"), "{err}");
    server.abort();
}

/// An OIDC operator rule admits job tokens whose verified claims satisfy it, and only those;
/// the audit names the rule's operator and the job's subject.
#[tokio::test]
async fn oidc_operator_rule_admits_only_matching_job_tokens() {
    let h = harness_with(vec![OperatorConfig {
        name: "secjob".into(),
        role: Role::Admin,
        token_sha256: None,
        oidc: Some(operators::OidcOperatorConfig {
            issuer: "github".into(),
            audience: None,
            rule: r#"claims.repository == "acme/security" && claims.ref == "refs/heads/main""#
                .into(),
        }),
    }])
    .await;
    let (status, _) = exchange(&h, "acme/api", 1).await;
    assert_eq!(status, StatusCode::OK);
    for t in [
        job_token(&h, "acme/api", 1),
        job_token(&h, "acme/security-fork", 2),
    ] {
        let (status, body) = call(
            &h,
            "POST",
            "/v1/admin/revoke-all",
            Some(t.expose()),
            json!({"reason": "x"}),
        )
        .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
        assert_eq!(body["error"], "operator_unauthorized");
    }
    // Another audience than the broker's: refused.
    let other_aud = dev::DevJob {
        repository: "acme/security".into(),
        audience: "https://elsewhere.test".into(),
        ..dev::DevJob::acme_api(AUD, h.clock.now())
    };
    let t = dev::sign(&dev::github_claims(&other_aud)).unwrap();
    let (status, _) = call(
        &h,
        "POST",
        "/v1/admin/revoke-all",
        Some(&t),
        json!({"reason": "x"}),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    let sec = job_token(&h, "acme/security", 3);
    let (status, body) = call(
        &h,
        "POST",
        "/v1/admin/revoke-all",
        Some(sec.expose()),
        json!({"reason": "break glass"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["revoked_grants"], 1);
    // The job token is single-use: a second call with it is refused.
    let (status, body) = call(
        &h,
        "POST",
        "/v1/admin/freeze",
        Some(sec.expose()),
        json!({"reason": "again"}),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("token_replayed"))
    );
    let ev = admin_events(&h).await;
    assert_eq!(ev[0].reason, "token_replayed");
    assert_eq!(ev[0].actor.as_deref(), Some("operator:secjob"));
    let ev: Vec<_> = ev.into_iter().skip(1).collect();
    assert_eq!(ev[0].reason, "revoke_all");
    assert_eq!(
        ev[0].actor.as_deref(),
        Some("operator:secjob (repo:acme/security:ref:refs/heads/main)")
    );
    assert_eq!(
        ev.iter()
            .filter(|e| e.reason == "operator_unauthorized")
            .count(),
        3
    );
}

#[test]
fn oidc_operator_config_is_checked() {
    let rule = |issuer: &str, rule: &str| OperatorConfig {
        name: "x".into(),
        role: Role::Admin,
        token_sha256: None,
        oidc: Some(operators::OidcOperatorConfig {
            issuer: issuer.into(),
            audience: None,
            rule: rule.into(),
        }),
    };
    let issuers = [dev::issuer_config("github", AUD)];
    let clock: SharedClock = Arc::new(ManualClock::at_unix(1_900_000_000));
    let err =
        Operators::from_config_with_oidc(&[rule("nope", "true")], &issuers, AUD, clock.clone())
            .unwrap_err()
            .to_string();
    assert!(err.contains("operators[0].oidc.issuer"), "{err}");
    let err = Operators::from_config_with_oidc(
        &[rule("github", "claims.(")],
        &issuers,
        AUD,
        clock.clone(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("operators[0].oidc.rule"), "{err}");
    let both = OperatorConfig {
        token_sha256: Some(operators::new_token().1),
        ..rule("github", "true")
    };
    let err = Operators::from_config_with_oidc(&[both], &issuers, AUD, clock)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("exactly one of token_sha256 and oidc"),
        "{err}"
    );
    assert!(Operators::from_config(&[rule("github", "true")]).is_err());
}

/// A filter naming an issuer, credential or kind that does not exist answers 400
/// `unknown_filter_value` listing what exists (before: revoke-all `matched: 0` and a freeze
/// `200 frozen: true` that froze nothing), audited, and leaves no freeze behind; honest
/// exchanges still work after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_filter_values_are_refused_listing_what_exists() {
    let h = harness().await;
    for (path, filter, listed) in [
        (
            "/v1/admin/revoke-all",
            json!({"issuer": "gitlab"}),
            "github",
        ),
        ("/v1/admin/freeze", json!({"issuer": "gitlab"}), "github"),
        (
            "/v1/admin/revoke-all",
            json!({"credential": "deploy"}),
            "deploy-api",
        ),
        ("/v1/admin/freeze", json!({"kind": "nuclear"}), "api_token"),
    ] {
        let (s, body) = call(
            &h,
            "POST",
            path,
            Some(h.admin.expose()),
            json!({"reason": "incident", "filter": filter}),
        )
        .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{path} {filter}: {body}");
        assert_eq!(body["error"], "unknown_filter_value", "{body}");
        let msg = body["message"].as_str().unwrap();
        assert!(msg.contains(listed), "{msg}");
    }
    assert!(h.broker.store.freeze_state().await.unwrap().is_none());
    let refused = h
        .broker
        .store
        .audit_events(&AuditFilter {
            reason: Some("unknown_filter_value".into()),
            limit: 10,
            ..AuditFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(refused.len(), 4);
    assert!(
        refused
            .iter()
            .all(|e| e.actor.as_deref() == Some("operator:alice"))
    );
    assert_eq!(exchange(&h, "acme/api", 1).await.0, StatusCode::OK);
}

/// More matching grants than one store page: the filter is applied in SQL and the pages are
/// walked to the end, so the newest matching grants (behind 2,000 older ones that do not
/// match) are found and revoked, and nothing else is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_all_finds_the_newest_matching_grants_past_the_first_page() {
    let h = harness().await;
    let ctx = RequestCtx::default();
    let n = REVOKE_ALL_PAGE as usize * 2 + 50;
    for i in 0..n {
        let repo = if i >= n - 30 { "acme/hot" } else { "acme/api" };
        h.clock.advance(time::Duration::milliseconds(2));
        h.broker
            .exchange(
                ExchangeRequest {
                    token: job_token(&h, repo, 1),
                    credentials: vec!["deploy-api".into()],
                    ttl: None,
                    parameters: Default::default(),
                },
                &ctx,
            )
            .await
            .unwrap();
    }
    let (s, body) = call(
        &h,
        "POST",
        "/v1/admin/revoke-all",
        Some(h.admin.expose()),
        json!({"reason": "hot leak", "filter": {"repository": "acme/hot"}}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["matched"], 30, "{body}");
    assert_eq!(body["revoked_grants"], 30, "{body}");
    assert_eq!(body["revoked_in_store"], 30, "{body}");
    assert_eq!(body["complete"], true, "{body}");
    let (s, body) = call(
        &h,
        "POST",
        "/v1/admin/revoke-all",
        Some(h.admin.expose()),
        json!({"reason": "all", "filter": {"kind": "api_token"}}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["revoked_grants"], n - 30, "{body}");
    assert_eq!(body["pages"], 3, "{body}");
    assert!(h.broker.store.active_grants(10).await.unwrap().is_empty());
    // One revoke event per grant, and the chain still verifies.
    let events = h
        .broker
        .store
        .audit_events(&AuditFilter {
            reason: Some("requested".into()),
            limit: 1000,
            ..AuditFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(events.len(), 1000);
    assert!(events.iter().all(|e| e.grant_id.is_some()));
    assert!(
        h.broker
            .store
            .verify_audit_chain()
            .await
            .unwrap()
            .is_intact()
    );
}

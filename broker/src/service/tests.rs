//! The exchange, revoke and reaper paths with a manual clock, the dev issuers (static keys,
//! no network) and a real SQLite store.
use super::*;
use crate::audit::Outcome;
use crate::config::{GrantConfig, ReaperConfig};
use crate::oidc::Verifier;
use crate::oidc::{VerifierOptions, dev};
use crate::policy::LoadOptions;
use crate::providers::api_token::ApiTokenProvider;
use crate::providers::api_token::SigningKeys;
use crate::providers::{
    CredentialKind, Field, IssuedCredential, MintRequest, Minted, Provider, ProviderError,
};
use crate::secret::Sensitive;
use crate::store::GrantStatus;
use crate::store::{AuditFilter, testdb::TestDb};
use crate::time::SharedClock;
use crate::time::{Clock, ManualClock};
use async_trait::async_trait;
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use time::{Duration, OffsetDateTime};
use uuid::Uuid;

const AUD: &str = "https://broker.test";

const POLICY: &str = r#"
credentials:
  - name: deploy-api
    max_ttl: 15m
    api_token: {audience: https://deploy.example, scopes: ["deploy:${repository}"]}
  - name: flaky
    max_ttl: 1h
    api_token: {audience: https://flaky.example}
  - name: gl-api
    max_ttl: 1h
    api_token: {audience: https://deploy.example, scopes: ["deploy:${project_path}"]}
rules:
  - name: acme-api
    issuer: github
    credentials: [deploy-api, flaky]
    max_ttl: 10m
    when: claims.repository_id == "1000001" && claims.repository_owner_id == "9000001" && claims.event_name == "push"
  - name: acme-gitlab
    issuer: gitlab
    credentials: [gl-api]
    when: claims.project_id == "2000001" && claims.namespace_id == "3000001"
"#;

/// The API-token provider, except that minting `flaky` fails with `target_unavailable`
/// and the first `fail_revokes` revocations fail.
#[derive(Debug)]
struct Flaky {
    inner: ApiTokenProvider,
    fail_revokes: AtomicUsize,
    revoked: std::sync::Mutex<Vec<String>>,
    /// What `mints_in_memory` answers (off: the intent-first path).
    in_memory: std::sync::atomic::AtomicBool,
}

#[async_trait]
impl Provider for Flaky {
    fn kind(&self) -> CredentialKind {
        CredentialKind::ApiToken
    }
    fn mints_in_memory(&self) -> bool {
        self.in_memory.load(Ordering::SeqCst)
    }
    fn resource_id(&self, grant_id: Uuid, credential: &crate::providers::CredentialDef) -> String {
        self.inner.resource_id(grant_id, credential)
    }
    fn check_definitions(
        &self,
        defs: &[crate::providers::CredentialDef],
    ) -> Result<(), crate::providers::DefinitionError> {
        match defs.iter().find(|d| d.name == "refused") {
            Some(_) => Err(crate::providers::DefinitionError::Refused {
                credential: "refused".into(),
                reason: "its target is not configured".into(),
            }),
            None => Ok(()),
        }
    }
    async fn mint(&self, req: MintRequest<'_>) -> Result<Minted, ProviderError> {
        if req.credential.name == "flaky" {
            return Err(ProviderError::TargetUnavailable(
                "connection refused".into(),
            ));
        }
        self.inner.mint(req).await
    }
    async fn revoke(&self, c: &IssuedCredential) -> Result<(), ProviderError> {
        if self.fail_revokes.load(Ordering::SeqCst) > 0 {
            self.fail_revokes.fetch_sub(1, Ordering::SeqCst);
            return Err(ProviderError::TargetUnavailable("down".into()));
        }
        self.revoked.lock().unwrap().push(c.resource_id.clone());
        Ok(())
    }
}

struct Harness {
    broker: Broker,
    clock: Arc<ManualClock>,
    flaky: Arc<Flaky>,
    _db: TestDb,
    _dir: tempfile::TempDir,
}

async fn harness() -> Harness {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("p.yaml"), POLICY).unwrap();
    let clock = Arc::new(ManualClock::at_unix(1_900_000_000));
    let shared: SharedClock = clock.clone();
    let verifier = Verifier::new(
        AUD.into(),
        vec![
            dev::issuer_config("github", AUD),
            dev::gitlab_issuer_config("gitlab", AUD),
        ],
        shared.clone(),
        VerifierOptions::default(),
    )
    .unwrap();
    let keys = Arc::new(SigningKeys::ephemeral().unwrap());
    let api = Arc::new(ApiTokenProvider::new(
        keys.clone(),
        "https://broker.test".into(),
    ));
    let flaky = Arc::new(Flaky {
        inner: ApiTokenProvider::new(keys, "https://broker.test".into()),
        fail_revokes: AtomicUsize::new(0),
        revoked: std::sync::Mutex::new(Vec::new()),
        in_memory: std::sync::atomic::AtomicBool::new(false),
    });
    let db = TestDb::sqlite().await;
    let broker = Broker::new(BrokerParts {
        verifier: Arc::new(verifier),
        store: db.store(),
        clock: shared,
        api_tokens: api,
        extra_providers: vec![flaky.clone()],
        policy_dir: dir.path().to_path_buf(),
        policy_opts: LoadOptions::default(),
        grants: GrantConfig::default(),
        reaper: ReaperConfig::default(),
        max_credentials: 16,
        rate_per_minute: 3,
    })
    .unwrap();
    Harness {
        broker,
        clock,
        flaky,
        _db: db,
        _dir: dir,
    }
}

fn job(now: OffsetDateTime, ttl: Duration) -> dev::DevJob {
    dev::DevJob {
        ttl,
        ..dev::DevJob::acme_api(AUD, now)
    }
}

impl Harness {
    fn github_token(&self) -> Sensitive {
        Sensitive::new(
            dev::sign(&dev::github_claims(&job(
                self.clock.now(),
                Duration::minutes(5),
            )))
            .unwrap(),
        )
    }
    fn gitlab_token(&self, ttl: Duration) -> Sensitive {
        let mut j = job(self.clock.now(), ttl);
        j.repository_id = 2_000_001;
        j.owner_id = 3_000_001;
        Sensitive::new(dev::sign(&dev::gitlab_claims(&j)).unwrap())
    }
    async fn exchange(
        &self,
        token: &Sensitive,
        creds: &[&str],
        ttl: Option<&str>,
    ) -> Result<ExchangeResponse, ServiceError> {
        let req = ExchangeRequest {
            token: token.clone(),
            credentials: creds.iter().map(|s| (*s).to_owned()).collect(),
            ttl: ttl.map(str::to_owned),
            parameters: Default::default(),
        };
        self.broker.exchange(req, &RequestCtx::default()).await
    }
    async fn audit(&self) -> Vec<crate::audit::AuditEvent> {
        self.broker
            .store
            .audit_events(&AuditFilter::default())
            .await
            .unwrap()
    }
}

#[tokio::test]
async fn ttl_is_the_minimum_of_request_rule_and_credential() {
    let h = harness().await;
    let now = h.clock.now();
    let r = h
        .exchange(&h.github_token(), &["deploy-api"], Some("1h"))
        .await
        .unwrap();
    assert_eq!(
        r.expires_at,
        now + Duration::minutes(10),
        "rule max_ttl 10m wins over 1h asked"
    );
    let r = h
        .exchange(&h.github_token(), &["deploy-api"], Some("2m"))
        .await
        .unwrap();
    assert_eq!(r.expires_at, now + Duration::minutes(2));
    let r = h
        .exchange(&h.github_token(), &["deploy-api"], None)
        .await
        .unwrap();
    assert_eq!(
        r.expires_at,
        now + Duration::minutes(10),
        "default 15m capped by the rule"
    );
}

#[tokio::test]
async fn a_reload_the_providers_refuse_keeps_the_old_bundle() {
    let h = harness().await;
    let before = h.broker.policy_status().digest;
    std::fs::write(
        h._dir.path().join("more.yaml"),
        "credentials: [{name: refused, max_ttl: 5m, api_token: {audience: x}}]",
    )
    .unwrap();
    let err = h.broker.reload_policies().unwrap_err().to_string();
    assert!(err.contains("not configured"), "{err}");
    assert_eq!(h.broker.policy_status().digest, before);
}

#[tokio::test]
async fn each_repository_has_its_own_rate_limit() {
    let h = harness().await;
    for _ in 0..3 {
        h.exchange(&h.github_token(), &["deploy-api"], None)
            .await
            .unwrap();
    }
    let err = h
        .exchange(&h.github_token(), &["deploy-api"], None)
        .await
        .unwrap_err();
    assert!(matches!(err, ServiceError::RateLimited { retry_after_secs } if retry_after_secs >= 1));
    assert_eq!(h.audit().await[0].reason, "rate_limited");
    // Another repository (the GitLab project) is not affected.
    h.exchange(&h.gitlab_token(Duration::minutes(5)), &["gl-api"], None)
        .await
        .unwrap();
}

#[tokio::test]
async fn gitlab_grants_never_outlive_the_job_token() {
    let h = harness().await;
    let now = h.clock.now();
    let r = h
        .exchange(
            &h.gitlab_token(Duration::seconds(120)),
            &["gl-api"],
            Some("15m"),
        )
        .await
        .unwrap();
    assert_eq!(r.expires_at, now + Duration::seconds(120));
}

#[tokio::test]
async fn a_failed_mint_issues_nothing_and_does_not_consume_the_token() {
    let h = harness().await;
    let token = h.github_token();
    let err = h
        .exchange(&token, &["deploy-api", "flaky"], None)
        .await
        .unwrap_err();
    assert_eq!(err.reason_code(), "target_unavailable");
    // Both credentials of the grant were revoked (the minted one and the never-minted one).
    assert_eq!(h.flaky.revoked.lock().unwrap().len(), 2);
    let ev = h.audit().await;
    assert_eq!(ev.len(), 1);
    assert_eq!(
        (ev[0].outcome, ev[0].reason.as_str()),
        (Outcome::Error, "target_unavailable")
    );
    let grant = h
        .broker
        .store
        .grant(ev[0].grant_id.unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(grant.status, GrantStatus::Failed);
    // The same job token still works: nothing was issued for it.
    let ok = h.exchange(&token, &["deploy-api"], None).await.unwrap();
    assert_eq!(ok.credentials.len(), 1);
    // ...and now it is consumed.
    let again = h.exchange(&token, &["deploy-api"], None).await.unwrap_err();
    assert_eq!(again.reason_code(), "token_replayed");
}

/// In-memory credentials skip the intent: one store write makes the grant `active` with its
/// allow event; a failed mint leaves no grant and does not consume the token; a replay is
/// refused and writes no second grant.
#[tokio::test]
async fn in_memory_credentials_are_issued_in_one_store_write() {
    let h = harness().await;
    h.flaky.in_memory.store(true, Ordering::SeqCst);
    let token = h.github_token();
    let err = h
        .exchange(&token, &["deploy-api", "flaky"], None)
        .await
        .unwrap_err();
    assert_eq!(err.reason_code(), "target_unavailable");
    assert!(
        h.flaky.revoked.lock().unwrap().is_empty(),
        "nothing left the process, so nothing to revoke"
    );
    let ev = h.audit().await;
    assert_eq!(ev.len(), 1);
    assert_eq!(
        (ev[0].outcome, ev[0].reason.as_str()),
        (Outcome::Error, "target_unavailable")
    );
    let grant_id = ev[0].grant_id.unwrap();
    assert_eq!(h.broker.store.grant(grant_id).await.unwrap(), None);

    let ok = h.exchange(&token, &["deploy-api"], None).await.unwrap();
    let grant = h.broker.store.grant(ok.grant_id).await.unwrap().unwrap();
    assert_eq!(grant.status, GrantStatus::Active);
    assert_eq!(grant.expires_at, ok.expires_at);
    assert_ne!(grant.credentials[0].details, serde_json::Value::Null);
    let ev = h.audit().await;
    assert_eq!(ev.len(), 2);
    assert_eq!(
        (ev[0].outcome, ev[0].grant_id),
        (Outcome::Allow, Some(ok.grant_id))
    );

    let again = h.exchange(&token, &["deploy-api"], None).await.unwrap_err();
    assert_eq!(again.reason_code(), "token_replayed");
    let ev = h.audit().await;
    assert_eq!(ev.len(), 3);
    let refused = ev[0].grant_id.unwrap();
    assert_eq!(h.broker.store.grant(refused).await.unwrap(), None);
}

#[tokio::test]
async fn expired_tokens_are_refused_by_the_injected_clock() {
    let h = harness().await;
    let token = h.github_token();
    h.clock.advance(Duration::minutes(10));
    let err = h.exchange(&token, &["deploy-api"], None).await.unwrap_err();
    assert_eq!(err.reason_code(), "token_expired");
    assert_eq!(h.audit().await[0].reason, "token_expired");
}

#[tokio::test]
async fn failed_revocation_is_retried_by_the_reaper() {
    let h = harness().await;
    let r = h
        .exchange(&h.github_token(), &["deploy-api"], None)
        .await
        .unwrap();
    h.flaky.fail_revokes.store(1, Ordering::SeqCst);
    let err = h
        .broker
        .revoke_by_token(&r.revocation_token, &RequestCtx::default())
        .await
        .unwrap_err();
    assert_eq!(err.reason_code(), "revoke_pending");
    let g = h.broker.store.grant(r.grant_id).await.unwrap().unwrap();
    assert_eq!((g.status, g.revoke_attempts), (GrantStatus::Revoking, 1));
    assert_eq!(
        h.broker
            .store
            .stats()
            .await
            .unwrap()
            .revoke_failures_pending,
        1
    );
    // Not before the retry time...
    assert_eq!(h.broker.reap_once().await.unwrap(), 0);
    h.clock.advance(Duration::seconds(3));
    assert_eq!(h.broker.reap_once().await.unwrap(), 1);
    let g = h.broker.store.grant(r.grant_id).await.unwrap().unwrap();
    assert_eq!(
        g.status,
        GrantStatus::Revoked,
        "the original cause (requested) is kept"
    );
    let reasons: Vec<String> = h
        .audit()
        .await
        .iter()
        .map(|e| format!("{:?}/{}", e.action, e.reason))
        .collect();
    assert!(
        reasons.contains(&"RevokeFailed/target_unavailable".to_owned()),
        "{reasons:?}"
    );
    assert!(
        reasons.contains(&"Revoke/requested".to_owned()),
        "{reasons:?}"
    );
}

#[tokio::test]
async fn reaper_expires_grants_exactly_at_their_ttl() {
    let h = harness().await;
    let r = h
        .exchange(&h.github_token(), &["deploy-api"], Some("2m"))
        .await
        .unwrap();
    let token = match &r.credentials[0].fields[0].1 {
        Field::Secret(s) => s.expose().to_owned(),
        Field::Public(_) => panic!("token must be secret"),
    };
    assert_eq!(h.broker.introspect(&token).await.unwrap()["active"], true);
    h.clock.advance(Duration::seconds(119));
    assert_eq!(h.broker.reap_once().await.unwrap(), 0);
    h.clock.advance(Duration::seconds(1));
    assert_eq!(h.broker.reap_once().await.unwrap(), 1);
    assert_eq!(
        h.broker
            .store
            .grant(r.grant_id)
            .await
            .unwrap()
            .unwrap()
            .status,
        GrantStatus::Expired
    );
    assert_eq!(
        h.broker.introspect(&token).await.unwrap(),
        json!({"active": false})
    );
}

#[tokio::test]
async fn bad_requests_are_refused_and_audited() {
    let h = harness().await;
    let t = h.github_token();
    for (creds, ttl) in [
        (vec![], None),
        (vec!["Deploy API"], None),
        (vec!["deploy-api", "deploy-api"], None),
        (vec!["deploy-api"], Some("0s")),
        (vec!["deploy-api"], Some("soon")),
    ] {
        let err = h.exchange(&t, &creds, ttl).await.unwrap_err();
        assert_eq!(err.reason_code(), "bad_request", "{creds:?} {ttl:?}");
    }
    assert_eq!(h.audit().await.len(), 5);
    // None of them consumed the token.
    assert!(h.exchange(&t, &["deploy-api"], None).await.is_ok());
}

/// A name the store could not hold (a NUL, an over-long one) is refused as `invalid_text`
/// and audited with the name escaped and cut short, never raw.
#[tokio::test]
async fn text_the_store_cannot_hold_is_refused_and_audited_escaped() {
    let h = harness().await;
    let t = h.github_token();
    let long = "a".repeat(crate::store::text::MAX_TEXT + 1);
    for name in ["deploy\0api", long.as_str()] {
        let err = h.exchange(&t, &[name], None).await.unwrap_err();
        assert_eq!(err.reason_code(), "invalid_text");
    }
    let events = h.audit().await;
    assert_eq!(events.len(), 2);
    for ev in &events {
        assert_eq!(ev.reason, "invalid_text");
        let shown = &ev.credentials_requested[0];
        assert!(!shown.contains('\0') && shown.len() < 100, "{shown:?}");
    }
    assert!(
        events
            .iter()
            .any(|e| e.credentials_requested[0] == "deploy\\u{0}api")
    );
    assert!(h.exchange(&t, &["deploy-api"], None).await.is_ok());
}

#[tokio::test]
async fn policy_reload_keeps_the_old_bundle_on_error() {
    let h = harness().await;
    let before = h.broker.policy_status().digest;
    std::fs::write(
        h._dir.path().join("bad.yaml"),
        "rules: [{name: x, issuer: github, credentials: [nope], when: 'true'}]",
    )
    .unwrap();
    let err = h.broker.reload_policies().unwrap_err().to_string();
    assert!(err.contains("bad.yaml"), "{err}");
    let st = h.broker.policy_status();
    assert_eq!(st.digest, before);
    assert!(st.last_error.is_some());
    assert!(
        h.exchange(&h.github_token(), &["deploy-api"], None)
            .await
            .is_ok()
    );
    std::fs::remove_file(h._dir.path().join("bad.yaml")).unwrap();
    std::fs::write(
        h._dir.path().join("more.yaml"),
        "credentials: [{name: more, max_ttl: 5m, api_token: {audience: x}}]",
    )
    .unwrap();
    let digest = h.broker.reload_policies().unwrap();
    assert_ne!(digest, before);
    assert!(h.broker.policy_status().last_error.is_none());
}

/// Revocation tokens are checked offline: a truncated or mistyped one is refused as
/// `malformed_secret` (audited) without a lookup, and one of the legacy shape (grants live
/// during an upgrade) still revokes its grant by hash.
#[tokio::test]
async fn revocation_tokens_are_checked_offline_and_the_legacy_shape_still_revokes() {
    let h = harness().await;
    let r = h
        .exchange(&h.github_token(), &["deploy-api"], None)
        .await
        .unwrap();
    let t = r.revocation_token.expose().to_owned();
    assert!(
        t.starts_with("brk_rvk_") && t.len() == 47,
        "the recognisable shape"
    );
    let last = if t.ends_with('0') { "1" } else { "0" };
    for bad in [&t[..t.len() - 1], &format!("{}{last}", &t[..t.len() - 1])] {
        let err = h
            .broker
            .revoke_by_token(&Sensitive::new(bad), &RequestCtx::default())
            .await
            .unwrap_err();
        assert_eq!(err.reason_code(), "malformed_secret");
    }
    assert_eq!(h.audit().await[0].reason, "malformed_secret");
    let g = h.broker.store.grant(r.grant_id).await.unwrap().unwrap();
    assert_eq!(
        g.status,
        GrantStatus::Active,
        "nothing revoked by a malformed token"
    );

    // A grant whose revocation token has the legacy shape (no checksum).
    let legacy = format!("brk_rvk_{}", crate::secret::random_token(32));
    let now = h.clock.now();
    let id = Uuid::now_v7();
    h.broker
        .store
        .begin_grant(
            &crate::store::NewGrant {
                id,
                revocation_hash: crate::secret::sha256_hex(legacy.as_bytes()),
                issuer: "github".into(),
                subject: "repo:acme/api:ref:refs/heads/main".into(),
                repository: Some("acme/api".into()),
                repository_id: Some("1000001".into()),
                job: json!({}),
                bundle_digest: "d".into(),
                created_at: now,
                expires_at: now + Duration::minutes(5),
                credentials: vec![IssuedCredential {
                    name: "deploy-api".into(),
                    kind: CredentialKind::ApiToken,
                    resource_id: format!("{}.deploy-api", id.simple()),
                    details: json!({}),
                }],
            },
            None,
        )
        .await
        .unwrap();
    let (gid, status) = h
        .broker
        .revoke_by_token(&Sensitive::new(legacy), &RequestCtx::default())
        .await
        .unwrap();
    assert_eq!(gid, id);
    assert!(status.is_final(), "{status:?}");
}

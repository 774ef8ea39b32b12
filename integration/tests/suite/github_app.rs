//! End to end for GitHub App installation tokens: the real `broker` binary against a local
//! fake of GitHub's App API ([`integration::github_fake`]), which checks the App JWT (RS256
//! against the App's public key, `iss`, `exp` at most 10 minutes), records each request body,
//! and answers for the token's use and revocation.

use broker::oidc::testkit::TestIssuer;
use broker::store::testdb::TestDb;
use integration::github_fake::{FakeGithub, app_private_key_path};
use integration::http::{self, Api, json_string as s};
use integration::store_db::audit_log;
use integration::{BrokerProcess, BrokerSetup, Secrets, acme_token, github_issuer_yaml};
use serde_json::{Value, json};

const APP_ID: u64 = 4242;

const POLICY: &str = r#"credentials:
  - name: gh-release
    max_ttl: 30m
    github_app:
      app: main
      owner: '${repository_owner}'
      repositories: [api, web]
      permissions: {contents: write, pull_requests: read}
  - name: gh-org
    max_ttl: 30m
    github_app:
      app: main
      owner: acme
      permissions: {metadata: read}
  - name: gh-nowhere
    max_ttl: 30m
    github_app:
      app: main
      owner: nobody
      repositories: [x]
      permissions: {contents: read}
rules:
  - name: acme-main
    issuer: github
    credentials: [gh-release, gh-org, gh-nowhere]
    when: claims.repository_id == "1000001" && claims.ref == "refs/heads/main"
"#;

struct Env {
    github: FakeGithub,
    issuer: TestIssuer,
    db: TestDb,
    broker: BrokerProcess,
    api: Api,
    http: reqwest::Client,
    _policies: tempfile::TempDir,
}

async fn env(extra: &str, envs: Vec<(String, String)>) -> Env {
    let github = FakeGithub::start(APP_ID, &[("acme", 7001, &["api", "web", "secret-repo"])]).await;
    let db = TestDb::postgres().await;
    let issuer = TestIssuer::start().await;
    let policies = tempfile::tempdir().expect("tmp");
    std::fs::write(policies.path().join("gh.yaml"), POLICY).expect("policy");
    let broker = BrokerProcess::start(
        &BrokerSetup::new(db.url(), policies.path(), github_issuer_yaml(&issuer.url()))
            .extra(format!(
                "targets:\n  github_app:\n    main:\n      app_id: {APP_ID}\n      private_key: {{file: {}}}\n      api_url: {}/\n{extra}",
                app_private_key_path().display(),
                github.url
            ))
            .env(envs),
    )
    .await
    .expect("broker starts");
    let http = http::client();
    Env {
        api: Api::new(http.clone(), &broker.url),
        github,
        issuer,
        db,
        broker,
        http,
        _policies: policies,
    }
}

impl Env {
    async fn exchange(&self, body: Value) -> (u16, Value) {
        self.api
            .exchange(Some(&acme_token(&self.issuer.url())), &body)
            .await
    }

    /// `GET /repos/acme/<repo>` with the token: the fake's stand-in for using it.
    async fn use_token(&self, token: &str, repo: &str) -> u16 {
        self.http
            .get(format!("{}/repos/acme/{repo}", self.github.url))
            .bearer_auth(token)
            .send()
            .await
            .expect("fake answers")
            .status()
            .as_u16()
    }

    async fn finish(self) {
        let Env {
            issuer,
            db,
            mut broker,
            ..
        } = self;
        broker.kill();
        issuer.shutdown().await;
        db.cleanup().await;
    }
}

fn sha256_hex(s: &str) -> String {
    broker::secret::sha256_hex(s.as_bytes())
}

/// A token limited to what the job asked within the policy: the fake saw a valid App JWT and
/// exactly that body; the token works for `api` only; the audit names its hash; after
/// `/v1/revoke` GitHub was told to delete it and it no longer works.
#[tokio::test]
async fn token_is_limited_used_and_revoked() {
    let e = env("", Vec::new()).await;
    let mut secrets = Secrets::default();
    let (status, body) = e
        .exchange(json!({
            "credentials": ["gh-release"],
            "parameters": {"gh-release": {"repositories": ["api"], "permissions": {"contents": "read"}}}
        }))
        .await;
    assert_eq!(status, 200, "{body}");
    secrets.add_response(&body);
    let c = &body["credentials"]["gh-release"];
    let token = s(&c["token"]);
    assert!(token.starts_with("ghs_"), "{token}");
    assert_eq!(c["repositories"], json!(["api"]));
    assert_eq!(c["permissions"], json!({"contents": "read"}));

    let seen = e.github.seen();
    let paths: Vec<&str> = seen.iter().map(|r| r.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "/repos/acme/api/installation",
            "/app/installations/7001/access_tokens"
        ]
    );
    assert!(
        seen.iter().all(|r| r.jwt_ok),
        "the App JWT verified: {seen:?}"
    );
    assert!(
        seen.iter()
            .all(|r| r.api_version.as_deref() == Some("2022-11-28"))
    );
    assert_eq!(
        seen[1].body,
        json!({"repositories": ["api"], "permissions": {"contents": "read"}})
    );
    for c in e.github.jwt_claims() {
        assert_eq!(c["iss"], json!(APP_ID.to_string()));
        let (iat, exp) = (c["iat"].as_i64().unwrap(), c["exp"].as_i64().unwrap());
        assert!(exp - iat <= 600, "exp at most 10 minutes after iat: {c}");
        let now = broker::time::Clock::now(&broker::time::SystemClock).unix_timestamp();
        assert!(iat <= now - 50, "iat backdated about 60 s: {c}");
    }

    assert_eq!(e.use_token(&token, "api").await, 200);
    assert_eq!(
        e.use_token(&token, "web").await,
        404,
        "not a repository it was given"
    );

    let events = audit_log(&e.db, 50).await;
    let hash = sha256_hex(&token);
    let ex = events
        .iter()
        .find(|ev| ev.action.as_str() == "exchange" && ev.reason == "ok")
        .expect("exchange audited");
    assert!(
        ex.detail.as_deref().unwrap_or_default().contains(&hash),
        "the exchange's audit names the token's SHA-256: {:?}",
        ex.detail
    );

    let (status, r) = e.api.revoke(&s(&body["revocation_token"])).await;
    assert_eq!(
        (status, r["status"].as_str()),
        (200, Some("revoked")),
        "{r}"
    );
    assert!(
        e.github.tokens()[0].revoked,
        "DELETE /installation/token reached GitHub"
    );
    assert_eq!(
        e.use_token(&token, "api").await,
        401,
        "a revoked token no longer works"
    );
    let events = audit_log(&e.db, 50).await;
    let rv = events
        .iter()
        .find(|ev| ev.action.as_str() == "revoke")
        .expect("revocation audited");
    let d = rv.detail.clone().unwrap_or_default();
    assert!(
        d.contains("DELETE /installation/token") && d.contains(&hash),
        "{d}"
    );

    secrets.assert_not_leaked(&e.broker, e.db.url()).await;
    e.finish().await;
}

/// Without parameters the policy's repositories and permissions are asked for; an owner-wide
/// credential finds the organization's installation and names no repository; the reaper
/// deletes the token at the grant's end.
#[tokio::test]
async fn policy_defaults_owner_installation_and_expiry() {
    let e = env("reaper:\n  interval: 1s\n", Vec::new()).await;
    let (status, body) = e
        .exchange(json!({"credentials": ["gh-release", "gh-org"], "ttl": "2s"}))
        .await;
    assert_eq!(status, 200, "{body}");
    let seen = e.github.seen();
    let bodies: Vec<&Value> = seen
        .iter()
        .filter(|r| r.method == "POST")
        .map(|r| &r.body)
        .collect();
    assert!(bodies.contains(&&json!({"repositories": ["api", "web"], "permissions": {"contents": "write", "pull_requests": "read"}})), "{bodies:?}");
    assert!(
        bodies.contains(&&json!({"permissions": {"metadata": "read"}})),
        "{bodies:?}"
    );
    assert!(seen.iter().any(|r| r.path == "/orgs/acme/installation"));
    let org_token = s(&body["credentials"]["gh-org"]["token"]);
    assert_eq!(
        e.use_token(&org_token, "secret-repo").await,
        200,
        "owner-wide"
    );
    // The grant ends after 2 s; the reaper deletes both tokens.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while e.github.tokens().iter().any(|t| !t.revoked) {
        assert!(
            std::time::Instant::now() < deadline,
            "the reaper did not delete the tokens"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert_eq!(e.use_token(&org_token, "secret-repo").await, 401);
    e.finish().await;
}

/// More than the policy allows is refused (403) and mints nothing; malformed parameters are
/// 400; an owner without the App installed is a configuration error and mints nothing.
#[tokio::test]
async fn more_than_the_policy_and_bad_input_are_refused() {
    let e = env("", Vec::new()).await;
    for (params, status, code) in [
        (
            json!({"permissions": {"pull_requests": "write"}}),
            403,
            "parameters_exceed_policy",
        ),
        (
            json!({"permissions": {"actions": "read"}}),
            403,
            "parameters_exceed_policy",
        ),
        (
            json!({"repositories": ["secret-repo"]}),
            403,
            "parameters_exceed_policy",
        ),
        (
            json!({"permissions": {"contents": "owner"}}),
            400,
            "invalid_parameters",
        ),
        (json!({"repositories": ["../x"]}), 400, "invalid_parameters"),
        (json!({"installation_id": 7001}), 400, "invalid_parameters"),
    ] {
        let (st, body) = e
            .exchange(json!({"credentials": ["gh-release"], "parameters": {"gh-release": params}}))
            .await;
        assert_eq!(
            (st, s(&body["error"]).as_str()),
            (status, code),
            "{params}: {body}"
        );
    }
    let (st, body) = e.exchange(json!({"credentials": ["gh-nowhere"]})).await;
    assert_eq!(
        (st, s(&body["error"]).as_str()),
        (500, "provider_misconfigured"),
        "{body}"
    );
    assert!(e.github.tokens().is_empty(), "nothing was minted");
    let st = e.db.store().stats().await.expect("stats");
    assert_eq!((st.active_grants, st.issuing_grants), (0, 0));
    e.finish().await;
}

/// A broker killed after minting: the token exists at GitHub, the grant is left `issuing`; the
/// restarted broker's reaper finishes the grant. The new process never held the token, so it
/// cannot delete it (GitHub authenticates the delete with the token, which the broker never
/// stores): the revocation's audit event says so, and the token ends at GitHub's expiry.
#[tokio::test]
async fn crash_after_mint_is_recovered_and_says_what_it_could_not_do() {
    let reaper = "reaper:\n  interval: 1s\n  stale_issuing_after: 2s\n  lease: 5s\n";
    let mut e = env(
        reaper,
        vec![("BROKER_FAULT_POINT".into(), "after_mint".into())],
    )
    .await;
    assert!(
        e.api
            .exchange_fails(
                &acme_token(&e.issuer.url()),
                &json!({"credentials": ["gh-release"]})
            )
            .await
    );
    assert!(
        e.broker.wait_exit().await.is_some(),
        "aborted at the fault point"
    );
    assert_eq!(e.github.tokens().len(), 1, "minted before the crash");
    e.broker.restart(&[]).await.expect("restart");
    // The grant leaves `issuing` when the reaper claims it; its audit event follows with the
    // finish, so wait for the event itself.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let rv = loop {
        let events = audit_log(&e.db, 50).await;
        if let Some(ev) = events
            .into_iter()
            .find(|ev| ev.action.as_str() == "recover")
        {
            break ev;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the reaper did not recover the grant"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    assert_eq!(e.db.store().stats().await.expect("stats").issuing_grants, 0);
    let d = rv.detail.clone().unwrap_or_default();
    assert!(d.contains("not held by this process"), "{d}");
    assert!(
        !e.github.tokens()[0].revoked,
        "the limit, stated: a token not held is not deleted"
    );
    e.finish().await;
}

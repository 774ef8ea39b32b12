//! End to end for the AWS STS provider: the real `broker` binary assuming roles on a local
//! moto server (STS + IAM in server mode, installed by `scripts/test` under
//! `target/test-venv/`). moto does not check trust policies and will "assume" roles that do not
//! exist, so each test creates its role first and asserts on what the broker sent (visible in
//! `GetCallerIdentity`) and wrote (`GetRolePolicy`), not on moto refusing anything.
//!
//! When moto is not installed (no network when the venv was made), each test says why and
//! returns; the provider's logic is covered by the unit tests in `broker/src/providers/aws_sts`.

use broker::oidc::testkit::TestIssuer;
use broker::providers::aws_sts::AwsStsProvider;
use broker::providers::aws_sts::deny::DenyDocument;
use broker::providers::aws_sts::spec::{AwsStsSpec, RoleArn};
use broker::providers::{
    CredentialDef, CredentialKind, CredentialSpec, IssuedCredential, Provider,
};
use broker::secret::Sensitive;
use broker::store::AuditFilter;
use broker::store::testdb::TestDb;
use integration::http::{self, Api, json_string as s};
use integration::moto::{ACCOUNT, KEY_ID, Moto, SECRET};
use integration::{BrokerProcess, BrokerSetup, acme_token_with, free_port, github_issuer_yaml};
use serde_json::{Value, json};
use std::sync::Arc;

struct Env {
    moto: Moto,
    issuer: TestIssuer,
    db: TestDb,
    broker: BrokerProcess,
    http: reqwest::Client,
    role: String,
    _policies: tempfile::TempDir,
}

async fn env() -> Option<Env> {
    let moto = Moto::start().await?;
    let role = format!("deploy-{}", integration::tag(""));
    let arn = moto.create_role(&role).await;
    let db = TestDb::sqlite().await;
    let issuer = TestIssuer::start().await;
    let policies = tempfile::tempdir().expect("tmp");
    let policy = format!(
        r#"credentials:
  - name: aws-deploy
    max_ttl: 30m
    aws_sts:
      target: main
      role_arn: {arn}
      region: eu-west-1
      session_policy:
        Version: "2012-10-17"
        Statement:
          - Effect: Allow
            Action: ["s3:GetObject"]
            Resource: "arn:aws:s3:::artifacts/${{repository_id}}/*"
  - name: aws-down
    max_ttl: 30m
    aws_sts:
      target: down
      role_arn: {arn}
rules:
  - name: acme
    issuer: github
    credentials: [aws-deploy, aws-down]
    when: claims.repository_id == "1000001"
"#
    );
    std::fs::write(policies.path().join("aws.yaml"), policy).expect("policy");
    let targets = format!(
        "targets:\n  aws:\n    main:\n      region: us-east-1\n      endpoint_url: {}\n    down:\n      region: us-east-1\n      endpoint_url: http://127.0.0.1:{}\n",
        moto.url,
        free_port()
    );
    let envs = integration::moto::broker_env();
    let broker = BrokerProcess::start(
        &BrokerSetup::new(db.url(), policies.path(), github_issuer_yaml(&issuer.url()))
            .extra(format!(
                "{targets}operators:\n  - name: secteam\n    role: admin\n    token_sha256: {}\n",
                broker::secret::sha256_hex(OPERATOR_TOKEN.as_bytes())
            ))
            .env(envs),
    )
    .await
    .expect("broker starts");
    Some(Env {
        moto,
        issuer,
        db,
        broker,
        http: http::client(),
        role,
        _policies: policies,
    })
}

impl Env {
    fn token_with(&self, f: impl FnOnce(&mut Value)) -> String {
        acme_token_with(&self.issuer.url(), f)
    }

    async fn exchange(&self, token: &str, body: Value) -> (u16, Value) {
        self.api().exchange(Some(token), &body).await
    }

    async fn revoke(&self, token: &str) -> u16 {
        self.api().revoke(token).await.0
    }

    fn api(&self) -> Api {
        Api::new(self.http.clone(), &self.broker.url)
    }

    /// Who the minted credentials are, per moto.
    async fn caller_arn(&self, c: &Value) -> String {
        let sdk = self
            .moto
            .sdk(
                &s(&c["access_key_id"]),
                &s(&c["secret_access_key"]),
                Some(&s(&c["session_token"])),
            )
            .await;
        aws_sdk_sts::Client::new(&sdk)
            .get_caller_identity()
            .send()
            .await
            .expect("GetCallerIdentity")
            .arn()
            .expect("arn")
            .to_owned()
    }

    async fn finish(self) {
        let Env {
            issuer,
            db,
            mut broker,
            moto,
            ..
        } = self;
        broker.kill();
        issuer.shutdown().await;
        db.cleanup().await;
        drop(moto);
    }
}

fn rfc3339(v: &Value) -> time::OffsetDateTime {
    time::OffsetDateTime::parse(&s(v), &time::format_description::well_known::Rfc3339)
        .expect("rfc3339")
}

/// Exchange returns working credentials for the assumed role with a session name derived from
/// the job; a 5-minute grant reports AWS's real 15-minute expiry (response and audit); revoke
/// writes the deny for exactly that session, readable back with GetRolePolicy.
#[tokio::test]
async fn exchange_returns_working_credentials_and_revoke_denies_the_session() {
    let Some(e) = env().await else { return };
    let before = broker::time::Clock::now(&broker::time::SystemClock);
    let (status, body) = e
        .exchange(
            &e.token_with(|_| {}),
            json!({"credentials": ["aws-deploy"], "ttl": "5m"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let c = &body["credentials"]["aws-deploy"];
    assert_eq!(c["kind"], "aws_sts");
    assert_eq!(c["region"], "eu-west-1");
    assert_eq!(c["account_id"], ACCOUNT, "the role's account, not secret");
    for k in [
        "access_key_id",
        "secret_access_key",
        "session_token",
        "expiration",
    ] {
        assert!(c[k].as_str().is_some_and(|v| !v.is_empty()), "{k} missing");
    }
    // Asked for 5 minutes; AWS's floor is 900 s and that is what is reported.
    let expiration = rfc3339(&c["expiration"]);
    assert!(
        expiration >= before + time::Duration::seconds(890),
        "{expiration}"
    );
    assert!(rfc3339(&body["expires_at"]) >= expiration - time::Duration::seconds(1));

    let arn = e.caller_arn(c).await;
    let prefix = format!(
        "arn:aws:sts::{ACCOUNT}:assumed-role/{}/acme.api@77.brk-",
        e.role
    );
    assert!(arn.starts_with(&prefix), "{arn}");
    let session = arn.rsplit('/').next().unwrap().to_owned();
    let rid = session.rsplit('.').next().unwrap().to_owned();
    assert!(rid.starts_with("brk-") && rid.len() == 20, "{rid}");

    // The allow event reports the real expiry and the resource id.
    let grant: uuid::Uuid = s(&body["grant_id"]).parse().unwrap();
    let events =
        e.db.store()
            .audit_events(&AuditFilter {
                grant_id: Some(grant),
                limit: 10,
                ..AuditFilter::default()
            })
            .await
            .unwrap();
    let allow = events
        .iter()
        .find(|ev| ev.outcome == broker::audit::Outcome::Allow)
        .expect("allow event");
    assert!(allow.expires_at.unwrap() >= expiration - time::Duration::seconds(1));
    assert!(
        allow.resource_ids.contains(&rid),
        "{:?}",
        allow.resource_ids
    );

    // No deny before revoke; after it, both statements name this session.
    assert!(e.moto.deny_policy(&e.role).await.is_none());
    assert_eq!(e.revoke(&s(&body["revocation_token"])).await, 200);
    let doc = e
        .moto
        .deny_policy(&e.role)
        .await
        .expect("deny policy written");
    let text = doc.to_string();
    let pattern = format!("*{rid}");
    let stmts = doc["Statement"].as_array().unwrap();
    assert_eq!(stmts.len(), 2, "{text}");
    assert!(
        stmts
            .iter()
            .all(|s| s["Effect"] == "Deny" && s["Action"] == "*")
    );
    assert_eq!(
        stmts[0]["Condition"]["StringLike"]["aws:userid"][0],
        pattern
    );
    assert_eq!(
        stmts[1]["Condition"]["StringLike"]["sts:SourceIdentity"][0],
        pattern
    );
    assert!(session.ends_with(&rid));
    // The revocation's audit event says what was written, and where.
    let events =
        e.db.store()
            .audit_events(&AuditFilter {
                grant_id: Some(grant),
                limit: 10,
                ..AuditFilter::default()
            })
            .await
            .unwrap();
    let revoked = events
        .iter()
        .find(|ev| ev.action == broker::audit::Action::Revoke)
        .expect("revoke event");
    // The deny statement was read back after writing it: the revocation is verified.
    assert_eq!(revoked.verified, Some(true), "{revoked:?}");
    let detail = revoked.detail.as_deref().unwrap_or_default();
    assert!(
        detail.contains(&rid)
            && detail.contains("broker-revoked-sessions")
            && detail.contains(&e.role),
        "{detail}"
    );
    // Revoking again is a no-op success.
    assert_eq!(e.revoke(&s(&body["revocation_token"])).await, 200);

    // No secret reached the broker's debug log.
    let log = e.broker.log();
    for k in ["secret_access_key", "session_token"] {
        assert!(!log.contains(&s(&c[k])), "{k} reached the log");
    }
    e.finish().await;
}

/// Hostile repository, workflow and ref claims give a session name in AWS's alphabet, within
/// 64 characters, still ending with the grant's resource id.
#[tokio::test]
async fn hostile_claims_give_sanitised_session_names() {
    let Some(e) = env().await else { return };
    let token = e.token_with(|c| {
        c["repository"] = json!(format!("ev!l/\"*?{}☃", "x".repeat(80)));
        c["workflow"] = json!("w\n\"}");
        c["ref"] = json!("refs/heads/ünï*");
        c["run_id"] = json!("1 2/3");
    });
    let (status, body) = e
        .exchange(&token, json!({"credentials": ["aws-deploy"], "ttl": "20m"}))
        .await;
    assert_eq!(status, 200, "{body}");
    let arn = e.caller_arn(&body["credentials"]["aws-deploy"]).await;
    let session = arn.rsplit('/').next().unwrap();
    assert!(session.len() <= 64, "{session}");
    assert!(
        session
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_+=,.@-".contains(c)),
        "{session}"
    );
    assert!(session.starts_with("ev_l."), "{session}");
    assert!(session.contains("@1_2.3.brk-"), "{session}");
    assert_eq!(e.revoke(&s(&body["revocation_token"])).await, 200);
    e.finish().await;
}

/// An STS endpoint nobody answers on: 503 `target_unavailable`, no credentials, audited.
#[tokio::test]
async fn endpoint_down_is_target_unavailable_and_issues_nothing() {
    let Some(e) = env().await else { return };
    let (status, body) = e
        .exchange(
            &e.token_with(|_| {}),
            json!({"credentials": ["aws-deploy", "aws-down"], "ttl": "5m"}),
        )
        .await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"], "target_unavailable", "{body}");
    assert!(body.get("credentials").is_none() && body.get("revocation_token").is_none());
    let events =
        e.db.store()
            .audit_events(&AuditFilter {
                reason: Some("target_unavailable".into()),
                limit: 10,
                ..AuditFilter::default()
            })
            .await
            .unwrap();
    assert!(!events.is_empty());
    // The aws-deploy session minted alongside was undone: denied on the role.
    let doc = e.moto.deny_policy(&e.role).await;
    assert!(
        doc.is_some_and(|d| d.to_string().contains("*brk-")),
        "the sibling session was not denied"
    );
    e.finish().await;
}

/// Operator token configured for the broker under test (test-only).
const OPERATOR_TOKEN: &str = "brk_op_testOperatorTokenForAwsE2e000000_4ZgGRt";

/// The emergency endpoint, unfiltered, puts the `aws:TokenIssueTime` deny on every brokered
/// role (sessions issued before now die, whoever holds them) and says so in its report.
#[tokio::test]
async fn admin_revoke_all_denies_every_earlier_session_of_the_role() {
    let Some(e) = env().await else {
        return;
    };
    let (status, body) = e
        .exchange(
            &e.token_with(|_| {}),
            json!({"credentials": ["aws-deploy"]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, report) = e
        .api()
        .revoke_all(OPERATOR_TOKEN, &json!({"reason": "incident drill"}))
        .await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["revoked_grants"], 1, "{report}");
    assert_eq!(report["provider_wide"]["aws_sts"]["revoked"], 1, "{report}");
    let doc = e.moto.deny_policy(&e.role).await.expect("deny policy");
    let all = doc["Statement"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["Sid"] == "BrokerRevokeAll")
        .expect("revoke-all statement");
    assert!(all.to_string().contains("aws:TokenIssueTime"), "{all}");
    e.finish().await;
}

/// Revoke-all writes the `aws:TokenIssueTime` deny next to the per-session denies; a burst of
/// revocations keeps the policy under IAM's limit.
#[tokio::test]
async fn revoke_all_writes_the_token_issue_time_deny_and_the_policy_stays_bounded() {
    let Some(moto) = Moto::start().await else {
        return;
    };
    let role = format!("deploy-{}", integration::tag(""));
    let arn = moto.create_role(&role).await;
    let mut targets = std::collections::BTreeMap::new();
    targets.insert(
        "main".to_owned(),
        broker::config::AwsTargetConfig {
            region: "us-east-1".into(),
            endpoint_url: Some(moto.url.clone()),
            role_max_session: time::Duration::hours(1),
        },
    );
    let clock = Arc::new(broker::time::SystemClock);
    let p =
        AwsStsProvider::with_static_credentials(&targets, clock, KEY_ID, &Sensitive::new(SECRET))
            .await;
    let def = CredentialDef {
        name: "aws-deploy".into(),
        description: None,
        max_ttl: time::Duration::minutes(30),
        spec: CredentialSpec::AwsSts(AwsStsSpec {
            target: "main".into(),
            role_arn: RoleArn::parse(&arn).unwrap(),
            region: None,
            session_policy: None,
            managed_policy_arns: Vec::new(),
        }),
    };
    p.check_definitions(std::slice::from_ref(&def)).unwrap();
    // 150 revocations (intent details only: each denied for the role's full hour).
    let mut rids = Vec::new();
    for _ in 0..150 {
        let rid = p.resource_id(uuid::Uuid::new_v4(), &def);
        p.revoke(&IssuedCredential {
            name: def.name.clone(),
            kind: CredentialKind::AwsSts,
            resource_id: rid.clone(),
            details: p.intent_details(&def),
        })
        .await
        .unwrap();
        rids.push(rid);
    }
    let report = p.revoke_all().await.unwrap();
    assert_eq!((report.revoked, report.failed), (1, 0), "{report:?}");
    assert!(report.details[0].contains("aws:TokenIssueTime"));
    let doc = moto.deny_policy(&role).await.expect("deny policy");
    let text = doc.to_string();
    assert!(text.len() <= 10_240, "{}", text.len());
    let all = doc["Statement"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["Sid"] == "BrokerRevokeAll")
        .expect("revoke-all statement");
    assert_eq!(all["Effect"], "Deny");
    assert!(all["Condition"]["DateLessThan"]["aws:TokenIssueTime"].is_string());
    let parsed = DenyDocument::parse(&text).unwrap();
    let until = broker::time::Clock::now(&broker::time::SystemClock) + time::Duration::minutes(50);
    for rid in &rids {
        assert!(parsed.denies(rid, until), "{rid} lost");
    }
}

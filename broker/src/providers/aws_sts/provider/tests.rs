//! Tests of `providers::aws_sts::provider`.

use super::*;
use crate::time::ManualClock;

async fn test_provider(
    targets: &BTreeMap<String, AwsTargetConfig>,
    clock: SharedClock,
) -> AwsStsProvider {
    AwsStsProvider::with_static_credentials(targets, clock, "AKIDTEST", &Sensitive::new("dummy"))
        .await
}

#[test]
fn durations_are_clamped_to_aws_range() {
    let max = Duration::hours(1);
    assert_eq!(session_seconds(Duration::minutes(5), max), 900);
    assert_eq!(session_seconds(Duration::minutes(30), max), 1800);
    assert_eq!(session_seconds(Duration::hours(5), max), 3600);
    assert_eq!(session_seconds(Duration::seconds(-3), max), 900);
    assert_eq!(
        session_seconds(Duration::hours(13), Duration::hours(12)),
        43200
    );
}

fn def(yaml: &str) -> CredentialDef {
    CredentialDef {
        name: "aws-deploy".into(),
        description: None,
        max_ttl: Duration::minutes(30),
        spec: CredentialSpec::AwsSts(serde_saphyr::from_str(yaml).unwrap()),
    }
}

/// Mint `d` for five minutes from `now`.
async fn mint_5m(
    p: &AwsStsProvider,
    grant_id: Uuid,
    d: &CredentialDef,
    rid: &str,
    claims: &crate::oidc::VerifiedClaims,
    now: OffsetDateTime,
) -> Result<Minted, ProviderError> {
    p.mint(MintRequest {
        grant_id,
        credential: d,
        resource_id: rid,
        claims,
        now,
        expires_at: now + Duration::minutes(5),
    })
    .await
}

#[tokio::test]
async fn endpoint_down_is_target_unavailable_and_the_undo_needs_no_call() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut targets = BTreeMap::new();
    targets.insert(
        "main".to_owned(),
        AwsTargetConfig {
            region: "us-east-1".into(),
            endpoint_url: Some(format!("http://127.0.0.1:{port}")),
            role_max_session: Duration::hours(1),
        },
    );
    let now = OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
    let clock: SharedClock = Arc::new(ManualClock::new(now));
    let p = test_provider(&targets, clock).await;
    assert!(!format!("{p:?}").is_empty());
    let d = def("target: main\nrole_arn: arn:aws:iam::123456789012:role/deploy\n");
    p.check_definitions(std::slice::from_ref(&d)).unwrap();
    assert_eq!(p.known_roles().len(), 1);
    let bad = def("target: nope\nrole_arn: arn:aws:iam::123456789012:role/deploy\n");
    assert_eq!(
        p.check_definitions(&[bad]).unwrap_err().reason_code(),
        "unknown_target"
    );
    let gid = Uuid::now_v7();
    let rid = p.resource_id(gid, &d);
    let claims = super::super::session_policy::tests::claims(
        json!({"repository": "acme/api", "run_id": "7"}),
    );
    let err = mint_5m(&p, gid, &d, &rid, &claims, now).await.unwrap_err();
    assert_eq!(err.reason_code(), "target_unavailable", "{err}");
    let ic = IssuedCredential {
        name: d.name.clone(),
        kind: CredentialKind::AwsSts,
        resource_id: rid.clone(),
        details: p.intent_details(&d),
    };
    // Whether or not the refusal was recognised, a later revoke must go to IAM.
    let _ = p.revoke(&ic).await;
    assert_eq!(
        p.revoke(&ic).await.unwrap_err().reason_code(),
        "target_unavailable"
    );
    let report = p.revoke_all().await.unwrap();
    assert_eq!((report.revoked, report.failed), (0, 1));
    assert!(report.details[0].contains("target_unavailable"));
}

#[tokio::test]
async fn hostile_claims_in_the_session_policy_fail_before_any_call() {
    let mut targets = BTreeMap::new();
    targets.insert(
        "main".to_owned(),
        AwsTargetConfig {
            region: "us-east-1".into(),
            // Nothing listens here; the call must not even be tried.
            endpoint_url: Some("http://127.0.0.1:9".into()),
            role_max_session: Duration::hours(1),
        },
    );
    let now = OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
    let p = test_provider(&targets, Arc::new(ManualClock::new(now))).await;
    let d = def(
        "target: main\nrole_arn: arn:aws:iam::123456789012:role/deploy\nsession_policy: {Version: '2012-10-17', Statement: [{Effect: Allow, Action: 's3:*', Resource: 'arn:aws:s3:::b/${repository}'}]}\n",
    );
    let claims =
        super::super::session_policy::tests::claims(json!({"repository": "x\",\"Resource\":\"*"}));
    let rid = p.resource_id(Uuid::now_v7(), &d);
    let err = mint_5m(&p, Uuid::now_v7(), &d, &rid, &claims, now)
        .await
        .unwrap_err();
    assert_eq!(err.reason_code(), "invalid_claim_value");
}

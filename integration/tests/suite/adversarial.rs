//! Hostile job tokens against the running binary. Every attack is one row of a table: the
//! status and stable code it must get, and then, for the whole table, one audit event per
//! attack, no grant row of any kind, no request to a URL named in a token, and no secret in
//! the log or the store. Verifier unit tests cover the same checks with an injected clock;
//! this suite proves they hold through HTTP, the service and the store.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use broker::oidc::testkit::{self, SignWith, TestIssuer, TestKey};
use broker::store::testdb::TestDb;
use integration::http::Api;
use integration::store_db::audit_log;
use integration::{
    AUD, BrokerProcess, BrokerSetup, Secrets, acme_api_claims, acme_token, github_issuer_yaml,
    github_policies,
};
use serde_json::{Value, json};
use sqlx::Row;

/// A token whose payload is these exact bytes (to send what `serde_json::Value` cannot hold,
/// such as duplicate members), signed with `key`.
fn sign_payload_bytes(header: &Value, payload: &str, key: TestKey) -> String {
    let h = URL_SAFE_NO_PAD.encode(serde_json::to_vec(header).unwrap());
    let p = URL_SAFE_NO_PAD.encode(payload.as_bytes());
    let msg = format!("{h}.{p}");
    let sig = jsonwebtoken::crypto::sign(msg.as_bytes(), &key.encoding_key(), key.alg()).unwrap();
    format!("{msg}.{sig}")
}

/// `acme_api_claims` as JSON text with one more member appended verbatim.
fn claims_text_with(iss: &str, extra_member: &str) -> String {
    let base = serde_json::to_string(&acme_api_claims(iss, AUD)).unwrap();
    format!("{},{extra_member}}}", &base[..base.len() - 1])
}

struct Case {
    what: &'static str,
    token: String,
    status: u16,
    code: &'static str,
}

fn case(what: &'static str, token: String, status: u16, code: &'static str) -> Case {
    Case {
        what,
        token,
        status,
        code,
    }
}

async fn grant_rows(db_url: &str) -> i64 {
    use sqlx::Connection;
    let mut c = sqlx::PgConnection::connect(db_url).await.expect("store");
    sqlx::query("SELECT (SELECT count(*) FROM grants) + (SELECT count(*) FROM grant_credentials)")
        .fetch_one(&mut c)
        .await
        .expect("count")
        .get(0)
}

#[tokio::test]
async fn hostile_tokens_are_refused_audited_and_grant_nothing() {
    // The issuer publishes an RSA and an EC key; only RS256 is pinned for it.
    let issuer = TestIssuer::start_with(&[TestKey::Rsa1, TestKey::Ec1]).await;
    // An attacker's server publishing the key the attacker signs with: never contacted.
    let attacker = TestIssuer::start_with(&[TestKey::Rsa2]).await;
    let db = TestDb::postgres().await;
    let policies = github_policies().unwrap();
    let broker = BrokerProcess::start(&BrokerSetup::new(
        db.url(),
        policies.path(),
        github_issuer_yaml(&issuer.url()),
    ))
    .await
    .expect("broker starts");
    let iss = issuer.url();
    let evil = attacker.url();
    let claims = || acme_api_claims(&iss, AUD);
    let with = |f: &dyn Fn(&mut Value)| {
        let mut c = claims();
        f(&mut c);
        testkit::sign(TestKey::Rsa1, &c)
    };
    let rsa1 = testkit::header_for(TestKey::Rsa1);
    let header_with = |k: &str, v: Value| {
        let mut h = rsa1.clone();
        h[k] = v;
        h
    };
    let now = broker::time::Clock::now(&broker::time::SystemClock).unix_timestamp();
    let public_pem = TestKey::Rsa1.public_jwk_json().as_bytes().to_vec();
    let rsa_n = TestKey::Rsa1.public_jwk()["n"]
        .as_str()
        .unwrap()
        .as_bytes()
        .to_vec();
    let deep = |depth: usize| {
        let mut v = json!("leaf");
        for _ in 0..depth {
            v = json!({ "n": v });
        }
        v
    };

    let cases = vec![
        // --- algorithm confusion ---
        case(
            "HS256 keyed with the issuer's public JWK",
            testkit::sign_raw(
                &json!({"alg": "HS256", "typ": "JWT", "kid": "test-rsa-1"}),
                &claims(),
                SignWith::Hs256(public_pem),
            ),
            401,
            "unsupported_algorithm",
        ),
        case(
            "HS256 keyed with the RSA modulus",
            testkit::sign_raw(
                &json!({"alg": "HS256", "typ": "JWT", "kid": "test-rsa-1"}),
                &claims(),
                SignWith::Hs256(rsa_n),
            ),
            401,
            "unsupported_algorithm",
        ),
        case(
            "alg none",
            testkit::sign_raw(
                &json!({"alg": "none", "kid": "test-rsa-1"}),
                &claims(),
                SignWith::Unsigned,
            ),
            401,
            "unsupported_algorithm",
        ),
        case(
            "alg NoNe",
            testkit::sign_raw(
                &json!({"alg": "NoNe", "kid": "test-rsa-1"}),
                &claims(),
                SignWith::Unsigned,
            ),
            401,
            "unsupported_algorithm",
        ),
        case(
            "alg empty",
            testkit::sign_raw(
                &json!({"alg": "", "kid": "test-rsa-1"}),
                &claims(),
                SignWith::Key(TestKey::Rsa1),
            ),
            401,
            "unsupported_algorithm",
        ),
        case(
            "PS256 header over an RS256 signature",
            testkit::sign_raw(
                &header_with("alg", json!("PS256")),
                &claims(),
                SignWith::Key(TestKey::Rsa1),
            ),
            401,
            "unsupported_algorithm",
        ),
        case(
            "ES256 with the issuer's own (published, unpinned) EC key",
            testkit::sign(TestKey::Ec1, &claims()),
            401,
            "unsupported_algorithm",
        ),
        case(
            "RS256 header naming the EC key",
            testkit::sign_raw(
                &json!({"alg": "RS256", "kid": "test-ec-1"}),
                &claims(),
                SignWith::Key(TestKey::Rsa1),
            ),
            401,
            "unsupported_algorithm",
        ),
        case(
            "RS256 header over an EC signature",
            testkit::sign_raw(&rsa1, &claims(), SignWith::Key(TestKey::Ec1)),
            401,
            "bad_signature",
        ),
        case(
            "garbage signature",
            testkit::sign_raw(&rsa1, &claims(), SignWith::Garbage),
            401,
            "bad_signature",
        ),
        // --- key-header injection: the attacker's key, offered every way ---
        case(
            "jku to the attacker's JWKS",
            testkit::sign_raw(
                &json!({"alg": "RS256", "kid": "test-rsa-2", "jku": attacker.jwks_url()}),
                &claims(),
                SignWith::Key(TestKey::Rsa2),
            ),
            401,
            "unknown_key",
        ),
        case(
            "x5u to the attacker",
            testkit::sign_raw(
                &json!({"alg": "RS256", "kid": "test-rsa-2", "x5u": format!("{evil}/cert.pem")}),
                &claims(),
                SignWith::Key(TestKey::Rsa2),
            ),
            401,
            "unknown_key",
        ),
        case(
            "embedded jwk",
            testkit::sign_raw(
                &json!({"alg": "RS256", "kid": "test-rsa-2", "jwk": TestKey::Rsa2.public_jwk()}),
                &claims(),
                SignWith::Key(TestKey::Rsa2),
            ),
            401,
            "unknown_key",
        ),
        case(
            "embedded jwk without kid",
            testkit::sign_raw(
                &json!({"alg": "RS256", "jwk": TestKey::Rsa2.public_jwk()}),
                &claims(),
                SignWith::Key(TestKey::Rsa2),
            ),
            401,
            "unknown_key",
        ),
        case(
            "x5c chain",
            testkit::sign_raw(
                &json!({"alg": "RS256", "kid": "test-rsa-2", "x5c": ["MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8A"]}),
                &claims(),
                SignWith::Key(TestKey::Rsa2),
            ),
            401,
            "unknown_key",
        ),
        case(
            "real kid, attacker's signature, jku",
            testkit::sign_raw(
                &header_with("jku", json!(attacker.jwks_url())),
                &claims(),
                SignWith::Key(TestKey::Rsa2),
            ),
            401,
            "bad_signature",
        ),
        case(
            "kid path traversal",
            testkit::sign_raw(
                &header_with("kid", json!("../../../../etc/passwd")),
                &claims(),
                SignWith::Key(TestKey::Rsa1),
            ),
            401,
            "unknown_key",
        ),
        case(
            "kid SQL",
            testkit::sign_raw(
                &header_with("kid", json!("x' OR '1'='1'; DROP TABLE grants; --")),
                &claims(),
                SignWith::Key(TestKey::Rsa1),
            ),
            401,
            "unknown_key",
        ),
        case(
            "kid NUL and newline",
            testkit::sign_raw(
                &header_with("kid", json!("test-rsa-1\u{0}\nlevel=error")),
                &claims(),
                SignWith::Key(TestKey::Rsa1),
            ),
            401,
            "unknown_key",
        ),
        case(
            "kid not a string",
            testkit::sign_raw(
                &header_with("kid", json!(["test-rsa-1"])),
                &claims(),
                SignWith::Key(TestKey::Rsa1),
            ),
            401,
            "malformed_token",
        ),
        case(
            "kid of 300 characters",
            testkit::sign_raw(
                &header_with("kid", json!("k".repeat(300))),
                &claims(),
                SignWith::Key(TestKey::Rsa1),
            ),
            401,
            "malformed_token",
        ),
        case(
            "crit header",
            testkit::sign_raw(
                &header_with("crit", json!(["exp"])),
                &claims(),
                SignWith::Key(TestKey::Rsa1),
            ),
            401,
            "malformed_token",
        ),
        // --- look-alike issuers (none of them is contacted) ---
        case(
            "issuer with trailing slash",
            with(&|c| c["iss"] = json!(format!("{iss}/"))),
            401,
            "unknown_issuer",
        ),
        case(
            "issuer with suffix domain",
            with(&|c| c["iss"] = json!(format!("{iss}.evil.example"))),
            401,
            "unknown_issuer",
        ),
        case(
            "issuer in upper case",
            with(&|c| c["iss"] = json!(iss.to_uppercase())),
            401,
            "unknown_issuer",
        ),
        case(
            "issuer with userinfo",
            with(&|c| {
                c["iss"] = json!(iss.replace("http://", "http://evil@"));
            }),
            401,
            "unknown_issuer",
        ),
        case(
            "issuer with full-width dots",
            with(&|c| c["iss"] = json!(iss.replace('.', "\u{ff0e}"))),
            401,
            "unknown_issuer",
        ),
        case(
            "the attacker's own issuer",
            testkit::sign(TestKey::Rsa2, &acme_api_claims(&evil, AUD)),
            401,
            "unknown_issuer",
        ),
        case(
            "issuer as a list",
            with(&|c| c["iss"] = json!([iss.clone()])),
            401,
            "unknown_issuer",
        ),
        // --- audiences ---
        case(
            "audience list without ours",
            with(&|c| c["aud"] = json!(["https://github.com/acme", "https://other.test"])),
            401,
            "bad_audience",
        ),
        case(
            "empty audience list",
            with(&|c| c["aud"] = json!([])),
            401,
            "bad_audience",
        ),
        case(
            "our audience nested in a list",
            with(&|c| c["aud"] = json!([[AUD]])),
            401,
            "bad_audience",
        ),
        case(
            "our audience as a prefix",
            with(&|c| c["aud"] = json!(format!("{AUD}.evil"))),
            401,
            "bad_audience",
        ),
        case(
            "audience as an object",
            with(&|c| c["aud"] = json!({"0": AUD})),
            401,
            "bad_audience",
        ),
        case(
            "no audience",
            with(&|c| {
                c.as_object_mut().unwrap().remove("aud");
            }),
            401,
            "bad_audience",
        ),
        // --- duplicate members: each reader would see something else ---
        case(
            "duplicate repository_id",
            sign_payload_bytes(
                &rsa1,
                &claims_text_with(&iss, r#""repository_id":"1000002""#),
                TestKey::Rsa1,
            ),
            401,
            "malformed_token",
        ),
        case(
            "duplicate iss",
            sign_payload_bytes(
                &rsa1,
                &claims_text_with(&iss, &format!(r#""iss":"{evil}""#)),
                TestKey::Rsa1,
            ),
            401,
            "malformed_token",
        ),
        case(
            "duplicate alg in the header",
            {
                let h =
                    URL_SAFE_NO_PAD.encode(r#"{"alg":"none","kid":"test-rsa-1","alg":"RS256"}"#);
                let p = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims()).unwrap());
                let msg = format!("{h}.{p}");
                let sig = jsonwebtoken::crypto::sign(
                    msg.as_bytes(),
                    &TestKey::Rsa1.encoding_key(),
                    TestKey::Rsa1.alg(),
                )
                .unwrap();
                format!("{msg}.{sig}")
            },
            401,
            "malformed_token",
        ),
        // --- wrong claim types ---
        case(
            "sub as a number",
            with(&|c| c["sub"] = json!(42)),
            401,
            "invalid_claim",
        ),
        case(
            "empty sub",
            with(&|c| c["sub"] = json!("")),
            401,
            "invalid_claim",
        ),
        case(
            "exp as a string",
            with(&|c| c["exp"] = json!((now + 600).to_string())),
            401,
            "invalid_claim",
        ),
        case(
            "iat as a float",
            with(&|c| c["iat"] = json!(now as f64 + 0.5)),
            401,
            "invalid_claim",
        ),
        case(
            "jti as a number",
            with(&|c| c["jti"] = json!(7)),
            401,
            "invalid_claim",
        ),
        case(
            "no exp",
            with(&|c| {
                c.as_object_mut().unwrap().remove("exp");
            }),
            401,
            "missing_claim",
        ),
        case(
            "repository_id as a number",
            with(&|c| c["repository_id"] = json!(1000001)),
            403,
            "policy_denied",
        ),
        case(
            "ref as a list",
            with(&|c| c["ref"] = json!(["refs/heads/main"])),
            403,
            "policy_denied",
        ),
        case(
            "owner id as an operator object",
            with(&|c| c["repository_owner_id"] = json!({"$ne": ""})),
            403,
            "policy_denied",
        ),
        case(
            "event_name null",
            with(&|c| c["event_name"] = Value::Null),
            403,
            "policy_denied",
        ),
        // --- size and depth ---
        case(
            "token over the issuer's byte limit",
            with(&|c| c["pad"] = json!("p".repeat(20 * 1024))),
            431,
            "token_too_large",
        ),
        case(
            "claims nested 200 deep",
            {
                let mut c = claims();
                c["deep"] = deep(200);
                testkit::sign(TestKey::Rsa1, &c)
            },
            401,
            "malformed_token",
        ),
        case(
            "claims nested 100 deep (parses, too deep for policy)",
            {
                let mut c = claims();
                c["deep"] = deep(100);
                testkit::sign(TestKey::Rsa1, &c)
            },
            403,
            "claims_too_large",
        ),
        // --- unicode confusables ---
        case(
            "Cyrillic look-alike repository and ids",
            with(&|c| {
                c["repository"] = json!("\u{0430}\u{0441}me/api");
                c["repository_id"] = json!("1000002");
            }),
            403,
            "policy_denied",
        ),
        case(
            "full-width digits in repository_id",
            with(&|c| c["repository_id"] = json!("\u{ff11}000001")),
            403,
            "policy_denied",
        ),
        case(
            "zero-width space in repository_id",
            with(&|c| c["repository_id"] = json!("1000001\u{200b}")),
            403,
            "policy_denied",
        ),
        case(
            "Cyrillic a in the ref",
            with(&|c| c["ref"] = json!("refs/heads/m\u{0430}in")),
            403,
            "policy_denied",
        ),
        case(
            "RTL override in the ref",
            with(&|c| c["ref"] = json!("refs/heads/\u{202e}niam")),
            403,
            "policy_denied",
        ),
        // --- time ---
        case(
            "expired an hour ago",
            with(&|c| {
                c["exp"] = json!(now - 3600);
                c["iat"] = json!(now - 3900);
                c["nbf"] = json!(now - 3900);
            }),
            401,
            "token_expired",
        ),
        case(
            "issued in the future",
            with(&|c| {
                c["iat"] = json!(now + 3600);
                c["nbf"] = json!(now + 3600);
                c["exp"] = json!(now + 7200);
            }),
            401,
            "token_not_yet_valid",
        ),
        case(
            "exp beyond i64",
            with(&|c| c["exp"] = json!(u64::MAX)),
            401,
            "invalid_claim",
        ),
    ];

    let http = integration::http::client();
    let mut secrets = Secrets::default();
    let mut failures = Vec::new();
    let mut answers = Vec::new();
    let api = Api::new(http.clone(), &broker.url);
    for c in &cases {
        secrets.add(c.token.clone());
        let (status, body) = api
            .exchange(Some(&c.token), &json!({"credentials": ["deploy-api"]}))
            .await;
        answers.push(json!({"case": c.what, "status": status, "body": body}));
        if (status, body["error"].as_str()) != (c.status, Some(c.code)) {
            failures.push(format!(
                "{}: want {} {}, got {status} {body}",
                c.what, c.status, c.code
            ));
        }
        assert!(body.get("credentials").is_none(), "{}: {body}", c.what);
        assert!(body.get("revocation_token").is_none(), "{}", c.what);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // Each attack's whole answer: the code and its fixed message, nothing of the token.
    insta::assert_json_snapshot!("hostile_token_refusals", answers);

    // 1 MiB in the Authorization header: refused by the HTTP server's header limit before the
    // broker sees it (so there is nothing to audit), never a 200 or a 5xx.
    let huge = format!("{}.{}.sig", "e".repeat(512 * 1024), "f".repeat(512 * 1024));
    let r = http
        .post(format!("{}/v1/exchange", broker.url))
        .bearer_auth(&huge)
        .json(&json!({"credentials": ["deploy-api"]}))
        .send()
        .await;
    match r {
        Ok(r) => assert_eq!(r.status().as_u16(), 431, "1 MiB token"),
        // The server may close the connection while the client is still sending.
        Err(e) => assert!(e.is_request() || e.is_body(), "1 MiB token: {e}"),
    }

    // One audit event per (table) attack; none names a grant or a credential.
    let events = audit_log(&db, 1000).await;
    assert_eq!(events.len(), cases.len(), "one audit event per attack");
    for ev in &events {
        assert!(ev.grant_id.is_none() && ev.credentials_granted.is_empty());
        assert_ne!(ev.reason, "ok");
    }
    let mut reasons: Vec<&str> = events.iter().map(|e| e.reason.as_str()).collect();
    reasons.sort_unstable();
    reasons.dedup();
    assert!(reasons.contains(&"unsupported_algorithm") && reasons.contains(&"malformed_token"));
    assert_eq!(grant_rows(db.url()).await, 0, "an attack left a grant row");
    assert_eq!(attacker.requests(), 0, "a URL from a token was fetched");
    // The table above is all refusals: the broker still serves an honest token.
    let r = http
        .post(format!("{}/v1/exchange", broker.url))
        .bearer_auth(testkit::sign(TestKey::Rsa1, &claims()))
        .json(&json!({"credentials": ["deploy-api"]}))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status().as_u16(), 200);
    secrets.add_response(&r.json().await.expect("json"));

    secrets.assert_not_leaked(&broker, db.url()).await;
    drop(broker);
    attacker.shutdown().await;
    issuer.shutdown().await;
    db.cleanup().await;
}

/// A token is good once: after a successful exchange (and revoke) it is `token_replayed`, and
/// a token that expired is `token_expired` however often it is replayed. Each refusal audited.
#[tokio::test]
async fn consumed_and_expired_tokens_are_refused_on_replay() {
    let issuer = TestIssuer::start().await;
    let db = TestDb::postgres().await;
    let policies = github_policies().unwrap();
    let broker = BrokerProcess::start(&BrokerSetup::new(
        db.url(),
        policies.path(),
        github_issuer_yaml(&issuer.url()),
    ))
    .await
    .expect("broker starts");
    let http = integration::http::client();
    let exchange = |tok: String| {
        let http = http.clone();
        let url = format!("{}/v1/exchange", broker.url);
        async move {
            let r = http
                .post(url)
                .bearer_auth(tok)
                .json(&json!({"credentials": ["deploy-api"]}))
                .send()
                .await
                .expect("request");
            (
                r.status().as_u16(),
                r.json::<Value>().await.unwrap_or(Value::Null),
            )
        }
    };
    let mut secrets = Secrets::default();
    let token = acme_token(&issuer.url());
    secrets.add(token.clone());
    let (status, body) = exchange(token.clone()).await;
    assert_eq!(status, 200, "{body}");
    secrets.add_response(&body);
    let r = http
        .post(format!("{}/v1/revoke", broker.url))
        .bearer_auth(body["revocation_token"].as_str().unwrap())
        .send()
        .await
        .expect("revoke");
    assert_eq!(r.status().as_u16(), 200);
    for _ in 0..3 {
        let (status, body) = exchange(token.clone()).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (401, Some("token_replayed"))
        );
    }
    let now = broker::time::Clock::now(&broker::time::SystemClock).unix_timestamp();
    let mut c = acme_api_claims(&issuer.url(), AUD);
    // Past exp plus the largest leeway an issuer may have (5 minutes).
    c["exp"] = json!(now - 400);
    c["iat"] = json!(now - 700);
    c["nbf"] = json!(now - 700);
    let expired = testkit::sign(TestKey::Rsa1, &c);
    secrets.add(expired.clone());
    for _ in 0..3 {
        let (status, body) = exchange(expired.clone()).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (401, Some("token_expired")),
            "{body}"
        );
    }
    let events = audit_log(&db, 100).await;
    let count = |r: &str| events.iter().filter(|e| e.reason == r).count();
    assert_eq!((count("token_replayed"), count("token_expired")), (3, 3));
    let st = db.store().stats().await.expect("stats");
    assert_eq!((st.active_grants, st.issuing_grants), (0, 0));
    secrets.assert_not_leaked(&broker, db.url()).await;
    drop(broker);
    issuer.shutdown().await;
    db.cleanup().await;
}

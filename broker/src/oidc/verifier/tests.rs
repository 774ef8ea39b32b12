// Long on purpose: test file (one case per verification rule, against a real local issuer).
//! Verifier tests against a real local issuer (`testkit::TestIssuer`) and a manual clock.

use std::sync::Arc;

use serde_json::{Value, json};
use time::{Duration, OffsetDateTime};

use super::*;
use crate::oidc::testkit::{
    SignWith, TestIssuer, TestKey, github_claims, gitlab_claims, header_for, sign, sign_raw,
};
use crate::time::{Clock, ManualClock};

const NOW: i64 = 1_750_000_000;
const AUD: &str = "https://broker.example";

fn now() -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(NOW).unwrap()
}

fn clock() -> Arc<ManualClock> {
    Arc::new(ManualClock::at_unix(NOW))
}

fn verifier(issuers: Vec<IssuerConfig>, clock: Arc<ManualClock>) -> Verifier {
    Verifier::new(AUD.into(), issuers, clock, VerifierOptions::default()).unwrap()
}

async fn github_setup() -> (TestIssuer, Verifier, Arc<ManualClock>) {
    let issuer = TestIssuer::start().await;
    let c = clock();
    let v = verifier(
        vec![issuer.issuer_config("github", Platform::Github)],
        c.clone(),
    );
    (issuer, v, c)
}

fn claims(issuer: &TestIssuer) -> Value {
    github_claims(&issuer.url(), AUD, now())
}

async fn code(v: &Verifier, token: &str) -> &'static str {
    match v.verify(token).await {
        Ok(_) => "ok",
        Err(e) => e.reason_code(),
    }
}

#[tokio::test]
async fn valid_github_token() {
    let (issuer, v, _) = github_setup().await;
    let c = v
        .verify(&sign(TestKey::Rsa1, &claims(&issuer)))
        .await
        .unwrap();
    assert_eq!(c.issuer, "github");
    assert_eq!(c.platform, Platform::Github);
    assert_eq!(c.iss, issuer.url());
    assert_eq!(c.sub, "repo:acme/app:ref:refs/heads/main");
    assert!(c.jti.is_some() && c.single_use);
    assert_eq!(c.exp.unix_timestamp(), NOW + 300);
    assert_eq!(c.iat.map(|t| t.unix_timestamp()), Some(NOW));
    assert_eq!(c.replay_until.unix_timestamp(), NOW + 300 + 60);
    assert_eq!(c.claims["repository"], "acme/app");
    // Second token: served from cache.
    v.verify(&sign(TestKey::Rsa1, &claims(&issuer)))
        .await
        .unwrap();
    assert_eq!(v.jwks_fetch_count("github"), 1);
    assert_eq!(issuer.jwks_fetches(), 1);
    assert_eq!(issuer.discovery_fetches(), 1);
}

#[tokio::test]
async fn valid_gitlab_token() {
    let issuer = TestIssuer::start().await;
    let v = verifier(
        vec![issuer.issuer_config("gitlab", Platform::Gitlab)],
        clock(),
    );
    let t = sign(TestKey::Rsa1, &gitlab_claims(&issuer.url(), AUD, now()));
    let c = v.verify(&t).await.unwrap();
    assert_eq!(c.platform, Platform::Gitlab);
    assert_eq!(c.sub, "project_path:acme/app:ref_type:branch:ref:main");
    assert_eq!(c.claims["project_path"], "acme/app");
}

#[tokio::test]
async fn gitlab_tokens_may_be_a_day_old_github_not() {
    let issuer = TestIssuer::start().await;
    let c = clock();
    let v = verifier(
        vec![issuer.issuer_config("gitlab", Platform::Gitlab)],
        c.clone(),
    );
    let mut cl = gitlab_claims(&issuer.url(), AUD, now());
    cl["exp"] = json!(NOW + 2 * 86_400);
    let t = sign(TestKey::Rsa1, &cl);
    c.advance(Duration::hours(5));
    assert_eq!(code(&v, &t).await, "ok");
    c.advance(Duration::hours(20));
    assert_eq!(code(&v, &t).await, "token_too_old");
}

#[tokio::test]
async fn time_checks_use_the_injected_clock() {
    let (issuer, v, clock) = github_setup().await;
    // exp within leeway: accepted; beyond: expired.
    let mut c = claims(&issuer);
    c["exp"] = json!(NOW - 30);
    assert_eq!(code(&v, &sign(TestKey::Rsa1, &c)).await, "ok");
    c["exp"] = json!(NOW - 61);
    assert_eq!(code(&v, &sign(TestKey::Rsa1, &c)).await, "token_expired");
    // nbf in the future.
    let mut c = claims(&issuer);
    c["nbf"] = json!(NOW + 120);
    assert_eq!(
        code(&v, &sign(TestKey::Rsa1, &c)).await,
        "token_not_yet_valid"
    );
    // iat in the future beyond leeway.
    let mut c = claims(&issuer);
    c["iat"] = json!(NOW + 120);
    assert_eq!(
        code(&v, &sign(TestKey::Rsa1, &c)).await,
        "token_not_yet_valid"
    );
    // iat too old even though exp is fine.
    let mut c = claims(&issuer);
    c["iat"] = json!(NOW - 2 * 3600);
    c["nbf"] = json!(NOW - 2 * 3600);
    assert_eq!(code(&v, &sign(TestKey::Rsa1, &c)).await, "token_too_old");
    // The same valid token expires when the clock moves.
    let t = sign(TestKey::Rsa1, &claims(&issuer));
    assert_eq!(code(&v, &t).await, "ok");
    clock.advance(Duration::seconds(300 + 61));
    assert_eq!(code(&v, &t).await, "token_expired");
}

#[tokio::test]
async fn audience_checks() {
    let (issuer, v, _) = github_setup().await;
    let mut c = claims(&issuer);
    c["aud"] = json!("https://someone-else.example");
    assert_eq!(code(&v, &sign(TestKey::Rsa1, &c)).await, "bad_audience");
    c["aud"] = json!(["https://someone-else.example", AUD]);
    assert_eq!(code(&v, &sign(TestKey::Rsa1, &c)).await, "ok");
    c["aud"] = json!(["https://someone-else.example"]);
    assert_eq!(code(&v, &sign(TestKey::Rsa1, &c)).await, "bad_audience");
    c["aud"] = json!([]);
    assert_eq!(code(&v, &sign(TestKey::Rsa1, &c)).await, "bad_audience");
    c.as_object_mut().unwrap().remove("aud");
    assert_eq!(code(&v, &sign(TestKey::Rsa1, &c)).await, "bad_audience");
}

#[tokio::test]
async fn per_issuer_audience_override() {
    let issuer = TestIssuer::start().await;
    let mut cfg = issuer.issuer_config("github", Platform::Github);
    cfg.audience = Some("custom-aud".into());
    let v = verifier(vec![cfg], clock());
    assert_eq!(
        code(&v, &sign(TestKey::Rsa1, &claims(&issuer))).await,
        "bad_audience"
    );
    let mut c = claims(&issuer);
    c["aud"] = json!("custom-aud");
    assert_eq!(code(&v, &sign(TestKey::Rsa1, &c)).await, "ok");
}

#[tokio::test]
async fn unknown_and_look_alike_issuers_cause_no_requests() {
    let issuer = TestIssuer::start().await;
    let gh = IssuerConfig::new("github", Platform::Github, None);
    let v = verifier(
        vec![gh, issuer.issuer_config("local", Platform::Github)],
        clock(),
    );
    let looks = [
        "https://token.actions.githubusercontent.com.evil.example".to_owned(),
        "https://token.actions.githubusercontent.com/".to_owned(),
        "HTTPS://token.actions.githubusercontent.com".to_owned(),
        format!("{}/", issuer.url()),
        format!("{}.evil.example", issuer.url()),
        format!("{}/.well-known/jwks", issuer.url()),
        "https://evil.example".to_owned(),
    ];
    for iss in looks {
        let mut c = claims(&issuer);
        c["iss"] = json!(iss);
        assert_eq!(
            code(&v, &sign(TestKey::Rsa1, &c)).await,
            "unknown_issuer",
            "{iss}"
        );
    }
    let mut c = claims(&issuer);
    c.as_object_mut().unwrap().remove("iss");
    assert_eq!(code(&v, &sign(TestKey::Rsa1, &c)).await, "unknown_issuer");
    c["iss"] = json!(["https://token.actions.githubusercontent.com"]);
    assert_eq!(code(&v, &sign(TestKey::Rsa1, &c)).await, "unknown_issuer");
    assert_eq!(
        issuer.requests(),
        0,
        "no request may be caused by an unknown iss"
    );
    assert_eq!(
        v.jwks_fetch_count("github") + v.jwks_fetch_count("local"),
        0
    );
}

#[tokio::test]
async fn alg_none_and_hmac_with_public_key_are_refused() {
    let (issuer, v, _) = github_setup().await;
    let c = claims(&issuer);
    let mut h = header_for(TestKey::Rsa1);
    for none in ["none", "None", "NONE"] {
        h["alg"] = json!(none);
        let t = sign_raw(&h, &c, SignWith::Unsigned);
        assert_eq!(code(&v, &t).await, "unsupported_algorithm", "{none}");
    }
    // HS256 keyed with the issuer's public key, in the forms an attacker could obtain it.
    h["alg"] = json!("HS256");
    let jwk = TestKey::Rsa1.public_jwk();
    let secrets: Vec<Vec<u8>> = vec![
        TestKey::Rsa1.public_jwk_json().as_bytes().to_vec(),
        serde_json::to_vec(&jwk).unwrap(),
        jwk["n"].as_str().unwrap().as_bytes().to_vec(),
    ];
    for s in secrets {
        let t = sign_raw(&h, &c, SignWith::Hs256(s));
        assert_eq!(code(&v, &t).await, "unsupported_algorithm");
    }
    h["alg"] = json!("EdDSA");
    assert_eq!(
        code(&v, &sign_raw(&h, &c, SignWith::Garbage)).await,
        "unsupported_algorithm"
    );
    // Refused before keys were needed.
    assert_eq!(issuer.requests(), 0);
}

#[tokio::test]
async fn rsa_and_ec_keys_cannot_be_swapped() {
    let issuer = TestIssuer::start_with(&[TestKey::Rsa1, TestKey::Ec1]).await;
    let c = claims(&issuer);
    // Default pin RS256: an ES256 token is refused outright.
    let v = verifier(
        vec![issuer.issuer_config("github", Platform::Github)],
        clock(),
    );
    assert_eq!(
        code(&v, &sign(TestKey::Ec1, &c)).await,
        "unsupported_algorithm"
    );

    let mut cfg = issuer.issuer_config("github", Platform::Github);
    cfg.algorithms = vec!["RS256".into(), "ES256".into()];
    let v = verifier(vec![cfg], clock());
    assert_eq!(code(&v, &sign(TestKey::Ec1, &c)).await, "ok");
    assert_eq!(code(&v, &sign(TestKey::Rsa1, &c)).await, "ok");
    // Header says ES256 but names the RSA key.
    let mut h = header_for(TestKey::Ec1);
    h["kid"] = json!(TestKey::Rsa1.kid());
    let t = sign_raw(&h, &c, SignWith::Key(TestKey::Ec1));
    assert_eq!(code(&v, &t).await, "unsupported_algorithm");
    // Header says RS256 but names the EC key.
    let mut h = header_for(TestKey::Rsa1);
    h["kid"] = json!(TestKey::Ec1.kid());
    let t = sign_raw(&h, &c, SignWith::Key(TestKey::Rsa1));
    assert_eq!(code(&v, &t).await, "unsupported_algorithm");
}

#[tokio::test]
async fn bad_signatures() {
    let (issuer, v, _) = github_setup().await;
    let c = claims(&issuer);
    // Right kid, wrong key.
    let t = sign_raw(&header_for(TestKey::Rsa1), &c, SignWith::Key(TestKey::Rsa2));
    assert_eq!(code(&v, &t).await, "bad_signature");
    // Garbage signature.
    let t = sign_raw(&header_for(TestKey::Rsa1), &c, SignWith::Garbage);
    assert_eq!(code(&v, &t).await, "bad_signature");
    // Payload swapped after signing.
    let good = sign(TestKey::Rsa1, &c);
    let mut evil = c.clone();
    evil["repository"] = json!("acme/other");
    let forged = sign(TestKey::Rsa1, &evil);
    let g: Vec<&str> = good.split('.').collect();
    let f: Vec<&str> = forged.split('.').collect();
    let t = format!("{}.{}.{}", g[0], f[1], g[2]);
    assert_eq!(code(&v, &t).await, "bad_signature");
}

#[tokio::test]
async fn rotation_is_picked_up_after_cooldown() {
    let (issuer, v, clock) = github_setup().await;
    assert_eq!(code(&v, &sign(TestKey::Rsa1, &claims(&issuer))).await, "ok");
    issuer.rotate_to(TestKey::Rsa2);
    // Within the cooldown of the first fetch: no refetch, unknown key.
    let t2 = sign(TestKey::Rsa2, &claims(&issuer));
    assert_eq!(code(&v, &t2).await, "unknown_key");
    assert_eq!(issuer.jwks_fetches(), 1);
    clock.advance(Duration::seconds(61));
    let t2 = sign(
        TestKey::Rsa2,
        &github_claims(&issuer.url(), AUD, clock.now()),
    );
    assert_eq!(code(&v, &t2).await, "ok");
    assert_eq!(issuer.jwks_fetches(), 2);
    // The retired key is gone from the new set.
    let t1 = sign(
        TestKey::Rsa1,
        &github_claims(&issuer.url(), AUD, clock.now()),
    );
    assert_eq!(code(&v, &t1).await, "unknown_key");
    assert_eq!(issuer.jwks_fetches(), 2);
}

#[tokio::test]
async fn random_kid_flood_fetches_at_most_once_per_cooldown() {
    let (issuer, v, clock) = github_setup().await;
    assert_eq!(code(&v, &sign(TestKey::Rsa1, &claims(&issuer))).await, "ok");
    clock.advance(Duration::seconds(61));
    let c = github_claims(&issuer.url(), AUD, clock.now());
    let tokens: Vec<String> = (0..100)
        .map(|i| {
            let mut h = header_for(TestKey::Rsa1);
            h["kid"] = json!(format!("random-{i}-{}", crate::secret::random_token(8)));
            sign_raw(&h, &c, SignWith::Key(TestKey::Rsa1))
        })
        .collect();
    let results = futures::future::join_all(tokens.iter().map(|t| v.verify(t))).await;
    assert!(
        results
            .iter()
            .all(|r| r.as_ref().err().map(VerifyError::reason_code) == Some("unknown_key"))
    );
    assert_eq!(
        issuer.jwks_fetches(),
        2,
        "one initial fetch plus at most one for the flood"
    );
    // Sequential floods inside the window cost nothing either.
    for t in &tokens[..10] {
        assert_eq!(code(&v, t).await, "unknown_key");
    }
    assert_eq!(issuer.jwks_fetches(), 2);
    // Known keys keep working throughout.
    assert_eq!(code(&v, &sign(TestKey::Rsa1, &c)).await, "ok");
}

#[tokio::test]
async fn issuer_down_keeps_serving_cached_keys_until_max_stale() {
    let (issuer, v, clock) = github_setup().await;
    assert_eq!(code(&v, &sign(TestKey::Rsa1, &claims(&issuer))).await, "ok");
    issuer.set_down(true);
    clock.advance(Duration::hours(1));
    v.refresh_all().await;
    let h = &v.health()[0];
    assert_eq!(h.keys_loaded, 1);
    assert_eq!(h.last_error.as_deref(), Some("http_status"));
    assert_eq!(h.last_refresh.map(|t| t.unix_timestamp()), Some(NOW));
    let fresh = || {
        sign(
            TestKey::Rsa1,
            &github_claims(&issuer.url(), AUD, clock.now()),
        )
    };
    assert_eq!(code(&v, &fresh()).await, "ok");
    // Unknown kid while down: the refetch fails, cached keys stay, answer is unknown_key.
    clock.advance(Duration::seconds(61));
    let t2 = sign(
        TestKey::Rsa2,
        &github_claims(&issuer.url(), AUD, clock.now()),
    );
    assert_eq!(code(&v, &t2).await, "unknown_key");
    assert_eq!(code(&v, &fresh()).await, "ok");
    // Past max_stale the keys are no longer trusted.
    clock.advance(Duration::hours(24));
    let e = v.verify(&fresh()).await.unwrap_err();
    assert_eq!(e.reason_code(), "issuer_unavailable");
    assert!(e.is_unavailable());
    assert_eq!(v.health()[0].keys_loaded, 0);
    // Back up: recovers after the cooldown.
    issuer.set_down(false);
    clock.advance(Duration::seconds(61));
    assert_eq!(code(&v, &fresh()).await, "ok");
    assert_eq!(v.health()[0].last_error, None);
}

#[tokio::test]
async fn unreachable_issuer_is_unavailable_and_not_hammered() {
    let issuer = TestIssuer::start().await;
    issuer.set_down(true);
    let c = clock();
    let v = verifier(
        vec![issuer.issuer_config("github", Platform::Github)],
        c.clone(),
    );
    v.warm_up().await;
    let t = sign(TestKey::Rsa1, &claims(&issuer));
    for _ in 0..5 {
        assert_eq!(code(&v, &t).await, "issuer_unavailable");
    }
    assert_eq!(issuer.requests(), 1, "retries wait for the cooldown");
    issuer.set_down(false);
    c.advance(Duration::seconds(61));
    let t = sign(TestKey::Rsa1, &github_claims(&issuer.url(), AUD, c.now()));
    assert_eq!(code(&v, &t).await, "ok");
}

#[tokio::test]
async fn embedded_key_headers_are_ignored() {
    let issuer = TestIssuer::start().await;
    let attacker = TestIssuer::start_with(&[TestKey::Rsa2]).await;
    let v = verifier(
        vec![issuer.issuer_config("github", Platform::Github)],
        clock(),
    );
    let c = claims(&issuer);
    let mut h = header_for(TestKey::Rsa1);
    h["jku"] = json!(attacker.jwks_url());
    h["x5u"] = json!(format!("{}/cert.pem", attacker.url()));
    h["jwk"] = TestKey::Rsa2.public_jwk();
    h["x5c"] = json!(["MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA"]);
    // Signed with the attacker's key it names in jwk/jku: refused.
    let t = sign_raw(&h, &c, SignWith::Key(TestKey::Rsa2));
    assert_eq!(code(&v, &t).await, "bad_signature");
    h["kid"] = json!(TestKey::Rsa2.kid());
    let t = sign_raw(&h, &c, SignWith::Key(TestKey::Rsa2));
    assert_eq!(code(&v, &t).await, "unknown_key");
    // The same headers on a genuinely signed token change nothing.
    h["kid"] = json!(TestKey::Rsa1.kid());
    let t = sign_raw(&h, &c, SignWith::Key(TestKey::Rsa1));
    assert_eq!(code(&v, &t).await, "ok");
    assert_eq!(attacker.requests(), 0, "jku/x5u must never be fetched");
}

#[tokio::test]
async fn oversized_and_garbage_tokens() {
    let (issuer, v, _) = github_setup().await;
    let mut c = claims(&issuer);
    c["padding"] = json!("x".repeat(17 * 1024));
    let t = sign(TestKey::Rsa1, &c);
    assert_eq!(code(&v, &t).await, "token_too_large");
    assert_eq!(code(&v, &"a".repeat(1 << 20)).await, "token_too_large");
    for g in [
        "",
        " ",
        "Bearer x",
        "not.a.jwt",
        "...",
        "eyJhbGciOiJSUzI1NiJ9",
        "eyJhbGciOiJSUzI1NiJ9.eyJpc3MiOiJ4In0",
        "eyJhbGciOiJSUzI1NiJ9.e30.e30.e30.e30",
        "\u{0}\u{1}.\u{2}.\u{3}",
        "ŧøķëñ.ŧøķëñ.ŧøķëñ",
    ] {
        assert_eq!(code(&v, g).await, "malformed_token", "{g:?}");
    }
    assert_eq!(issuer.requests(), 0);
}

#[tokio::test]
async fn per_issuer_size_limit_applies_after_routing() {
    let issuer = TestIssuer::start().await;
    let mut small = issuer.issuer_config("small", Platform::Github);
    small.max_token_bytes = 1024;
    let other = IssuerConfig::new("github", Platform::Github, None);
    let v = verifier(vec![small, other], clock());
    let t = sign(TestKey::Rsa1, &claims(&issuer));
    assert!(t.len() > 1024);
    assert_eq!(code(&v, &t).await, "token_too_large");
}

#[tokio::test]
async fn required_claims() {
    let issuer = TestIssuer::start().await;
    let v = verifier(
        vec![issuer.issuer_config("github", Platform::Github)],
        clock(),
    );
    let cases: [(&str, Value, &str); 8] = [
        ("jti", Value::Null, "missing_claim"),
        ("sub", Value::Null, "missing_claim"),
        ("exp", Value::Null, "missing_claim"),
        ("iat", Value::Null, "missing_claim"),
        ("sub", json!(""), "invalid_claim"),
        ("jti", json!(12), "invalid_claim"),
        ("exp", json!("tomorrow"), "invalid_claim"),
        ("iat", json!(1.5), "invalid_claim"),
    ];
    for (claim, value, want) in cases {
        let mut c = claims(&issuer);
        if value.is_null() {
            c.as_object_mut().unwrap().remove(claim);
        } else {
            c[claim] = value;
        }
        assert_eq!(code(&v, &sign(TestKey::Rsa1, &c)).await, want, "{claim}");
    }
    // Without single_use a missing jti is fine.
    let mut cfg = issuer.issuer_config("github", Platform::Github);
    cfg.single_use = false;
    let v = verifier(vec![cfg], clock());
    let mut c = claims(&issuer);
    c.as_object_mut().unwrap().remove("jti");
    let ok = v.verify(&sign(TestKey::Rsa1, &c)).await.unwrap();
    assert!(ok.jti.is_none() && !ok.single_use);
}

#[tokio::test]
async fn discovery_with_mismatching_issuer_is_refused() {
    let issuer = TestIssuer::start().await;
    issuer.set_discovery_issuer(Some("https://token.actions.githubusercontent.com".into()));
    let v = verifier(
        vec![issuer.issuer_config("github", Platform::Github)],
        clock(),
    );
    let e = v
        .verify(&sign(TestKey::Rsa1, &claims(&issuer)))
        .await
        .unwrap_err();
    assert_eq!(e.reason_code(), "issuer_unavailable");
    assert_eq!(
        issuer.jwks_fetches(),
        0,
        "jwks_uri of a mismatching document is not used"
    );
    assert_eq!(
        v.health()[0].last_error.as_deref(),
        Some("discovery_issuer_mismatch")
    );
}

#[tokio::test]
async fn jwks_url_override_skips_discovery() {
    let issuer = TestIssuer::start().await;
    let mut cfg = issuer.issuer_config("github", Platform::Github);
    cfg.jwks_url = Some(issuer.jwks_url());
    let v = verifier(vec![cfg], clock());
    assert_eq!(code(&v, &sign(TestKey::Rsa1, &claims(&issuer))).await, "ok");
    assert_eq!(issuer.discovery_fetches(), 0);
    assert_eq!(issuer.jwks_fetches(), 1);
}

#[tokio::test]
async fn static_jwks_file_needs_no_network() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ghes-jwks.json");
    std::fs::write(
        &path,
        crate::oidc::testkit::jwks(&[TestKey::Rsa1]).to_string(),
    )
    .unwrap();
    let iss = "https://ghes.internal.invalid/_services/token";
    let mut cfg = IssuerConfig::new("ghes", Platform::Github, Some(iss.into()));
    cfg.static_jwks_file = Some(path);
    let v = verifier(vec![cfg], clock());
    v.warm_up().await;
    let t = sign(TestKey::Rsa1, &github_claims(iss, AUD, now()));
    assert_eq!(code(&v, &t).await, "ok");
    let t = sign(TestKey::Rsa2, &github_claims(iss, AUD, now()));
    assert_eq!(code(&v, &t).await, "unknown_key");
    assert_eq!(v.jwks_fetch_count("ghes"), 0);
    let h = &v.health()[0];
    assert!(h.static_keys && h.keys_loaded == 1);
}

#[tokio::test]
async fn refresh_all_only_refreshes_when_due() {
    let (issuer, v, clock) = github_setup().await;
    v.warm_up().await;
    assert_eq!(issuer.jwks_fetches(), 1);
    v.refresh_all().await;
    assert_eq!(issuer.jwks_fetches(), 1);
    clock.advance(Duration::minutes(10));
    v.refresh_all().await;
    assert_eq!(issuer.jwks_fetches(), 2);
    assert_eq!(v.issuer_names(), vec!["github".to_owned()]);
}

#[tokio::test]
async fn errors_never_contain_the_token() {
    let (issuer, v, _) = github_setup().await;
    let mut c = claims(&issuer);
    c["aud"] = json!("elsewhere");
    let t = sign(TestKey::Rsa1, &c);
    let e = v.verify(&t).await.unwrap_err();
    let shown = format!("{e} {e:?}");
    for part in t.split('.') {
        assert!(!shown.contains(part), "{shown}");
    }
    assert!(!format!("{v:?}").contains("BEGIN"));
}

#[test]
fn construction_rejects_bad_configs() {
    let c: SharedClock = clock();
    let ok = IssuerConfig::new("github", Platform::Github, None);
    let mk = |cfgs: Vec<IssuerConfig>, aud: &str| {
        Verifier::new(aud.into(), cfgs, c.clone(), VerifierOptions::default())
    };
    assert!(mk(vec![ok.clone()], AUD).is_ok());
    assert_eq!(
        mk(vec![ok.clone()], " ").unwrap_err().reason_code(),
        "empty_audience"
    );
    let mut bad = ok.clone();
    bad.algorithms = vec!["HS256".into()];
    assert_eq!(
        mk(vec![bad], AUD).unwrap_err().reason_code(),
        "invalid_issuer_config"
    );
    let mut other = ok.clone();
    other.name = "github2".into();
    assert_eq!(
        mk(vec![ok.clone(), other], AUD).unwrap_err().reason_code(),
        "duplicate_issuer_url"
    );
    let mut other = ok.clone();
    other.enterprise_slug = Some("acme".into());
    assert_eq!(
        mk(vec![ok.clone(), other], AUD).unwrap_err().reason_code(),
        "duplicate_issuer_name"
    );
    let mut missing = ok.clone();
    missing.static_jwks_file = Some("/nonexistent/jwks.json".into());
    assert_eq!(
        mk(vec![missing], AUD).unwrap_err().reason_code(),
        "static_jwks_unusable"
    );
    let mut inline = ok;
    inline.inline_jwks = Some("{\"keys\":[]}".into());
    assert_eq!(
        mk(vec![inline], AUD).unwrap_err().reason_code(),
        "static_jwks_unusable"
    );
}

#[tokio::test]
async fn no_issuers_means_unknown_issuer() {
    let v = verifier(vec![], clock());
    let t = sign(
        TestKey::Rsa1,
        &github_claims("https://token.actions.githubusercontent.com", AUD, now()),
    );
    assert_eq!(code(&v, &t).await, "unknown_issuer");
    assert!(v.health().is_empty() && v.issuer_names().is_empty());
}

#[test]
fn retry_window_backs_off_then_caps() {
    let o = VerifierOptions::default();
    let secs = |n| retry_window(&o, n).whole_seconds();
    assert_eq!(secs(0), 60, "after a success: the unknown-kid cooldown");
    assert_eq!(
        [secs(1), secs(2), secs(3), secs(4), secs(5), secs(u32::MAX)],
        [1, 2, 4, 4, 4, 4]
    );
}

/// An issuer unreachable at start is retried at 0, 1, 3, 7, 11, ... s (backoff 1, 2, 4 s, then
/// every 4 s) whatever the traffic, and used again at the first attempt after it returns.
#[tokio::test]
async fn issuer_down_at_start_is_retried_with_capped_backoff() {
    let issuer = TestIssuer::start().await;
    issuer.set_down(true);
    let c = clock();
    let v = verifier(
        vec![issuer.issuer_config("github", Platform::Github)],
        c.clone(),
    );
    assert_eq!(v.refresh_tick(), Duration::seconds(1));
    v.warm_up().await;
    assert_eq!(issuer.requests(), 1);
    let token = |c: &ManualClock| sign(TestKey::Rsa1, &github_claims(&issuer.url(), AUD, c.now()));
    let mut unknown = header_for(TestKey::Rsa1);
    unknown["kid"] = json!("no-such-key");
    let stranger = |c: &ManualClock| {
        sign_raw(
            &unknown,
            &github_claims(&issuer.url(), AUD, c.now()),
            SignWith::Key(TestKey::Rsa1),
        )
    };
    // 20 s in 250 ms steps: each step a refresh tick and a flood of honest and unknown-kid
    // tokens; record when the issuer was asked.
    let mut asked_at_ms = vec![0];
    for step in 1..=80i64 {
        c.advance(Duration::milliseconds(250));
        let before = issuer.requests();
        v.refresh_all().await;
        let v = &v;
        let flood = (0..10).map(|i| {
            let t = if i % 2 == 0 { token(&c) } else { stranger(&c) };
            async move { code(v, &t).await }
        });
        for r in futures::future::join_all(flood).await {
            assert_eq!(r, "issuer_unavailable");
        }
        if issuer.requests() > before {
            assert_eq!(issuer.requests(), before + 1, "one request per window");
            asked_at_ms.push(step * 250);
        }
    }
    assert_eq!(asked_at_ms, [0, 1000, 3000, 7000, 11000, 15000, 19000]);
    assert_eq!(v.health()[0].last_error.as_deref(), Some("http_status"));

    // Back at 20 s: the attempt due at 23 s succeeds, with or without traffic.
    issuer.set_down(false);
    let back = c.now();
    while code(&v, &token(&c)).await != "ok" {
        c.advance(Duration::milliseconds(250));
        v.refresh_all().await;
        assert!(
            c.now() - back <= Duration::seconds(4),
            "not recovered in 4 s"
        );
    }
    assert_eq!(c.now() - back, Duration::seconds(3));
    assert_eq!(v.health()[0].last_error, None);

    // Healthy again: unknown kids are back to one fetch per 60 s cooldown.
    let fetches = issuer.jwks_fetches();
    for _ in 0..3 {
        c.advance(Duration::seconds(20));
        v.refresh_all().await;
        let v = &v;
        let flood = (0..50).map(|_| {
            let t = stranger(&c);
            async move { code(v, &t).await }
        });
        for r in futures::future::join_all(flood).await {
            assert_eq!(r, "unknown_key");
        }
        assert_eq!(code(v, &token(&c)).await, "ok");
    }
    assert_eq!(issuer.jwks_fetches(), fetches + 1, "60 s: one fetch");
}

/// A failure after a healthy period starts the backoff again from 1 s; cached keys keep
/// verifying meanwhile.
#[tokio::test]
async fn failed_refresh_backs_off_and_keeps_cached_keys() {
    let (issuer, v, clock) = github_setup().await;
    v.warm_up().await;
    issuer.set_down(true);
    clock.advance(Duration::minutes(10));
    v.refresh_all().await;
    let after_fail = issuer.requests();
    clock.advance(Duration::milliseconds(900));
    v.refresh_all().await;
    assert_eq!(issuer.requests(), after_fail, "inside the 1 s window");
    clock.advance(Duration::milliseconds(100));
    v.refresh_all().await;
    assert_eq!(issuer.requests(), after_fail + 1, "retried after 1 s");
    let t = sign(
        TestKey::Rsa1,
        &github_claims(&issuer.url(), AUD, clock.now()),
    );
    assert_eq!(code(&v, &t).await, "ok");
    issuer.set_down(false);
    clock.advance(Duration::seconds(2));
    v.refresh_all().await;
    assert_eq!(v.health()[0].last_error, None);
}

//! Fuzz entry points (feature `testkit`): what each `fuzz/` target feeds arbitrary bytes to, and
//! what the corpus regression test below replays from `fuzz/corpus/<target>/` and
//! `fuzz/regressions/<target>/` in every ordinary `cargo test`. Each function must never panic
//! on any input; where an invariant is cheap to state it is asserted, so breaking it is a crash
//! the fuzzer reports.
//!
//! Everything runs against the real code: the verifier with the committed test keys, the
//! example policy bundle, the axum router over a SQLite store.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a fuzz harness signals by panicking

use std::sync::{Arc, OnceLock};

use axum::body::Body;
use axum::http::Request;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Map, Value};
use tower::ServiceExt;

use crate::admin::{OperatorConfig, Operators, Role};
use crate::config::{Config, GrantConfig, Mode, ReaperConfig};
use crate::http::{HttpLimits, router};
use crate::oidc::testkit::TestKey;
use crate::oidc::{IssuerConfig, Platform, Verifier, VerifierOptions, dev, testkit};
use crate::policy::{Bundle, LoadOptions, PolicyInput};
use crate::providers::api_token::{ApiTokenProvider, SigningKeys};
use crate::service::{Broker, BrokerParts};
use crate::store::testdb::TestDb;
use crate::time::{ManualClock, SharedClock};

/// The fuzz issuer: static keys (never fetched), GitHub-shaped, named `github` so the example
/// policies apply.
pub const ISSUER: &str = "https://fuzz-issuer.broker.invalid";
pub const AUDIENCE: &str = "https://broker.test";
/// A fixed "now" (2030-03-17), so a seed token stays valid forever.
const NOW: i64 = 1_900_000_000;

struct Harness {
    rt: tokio::runtime::Runtime,
    verifier: Arc<Verifier>,
    bundle: Bundle,
    app: axum::Router,
    /// A valid job token and an operator token, chosen by the request target's selector byte.
    job_token: String,
    operator_token: String,
    _db: TestDb,
    _policies: std::path::PathBuf,
}

fn policies_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies")
}

fn harness() -> &'static Harness {
    static H: OnceLock<Harness> = OnceLock::new();
    H.get_or_init(|| {
        // Multi-threaded: the replay test calls targets from several test threads at once.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let clock: SharedClock = Arc::new(ManualClock::at_unix(NOW));
        let mut issuer = IssuerConfig::new("github", Platform::Github, Some(ISSUER.to_owned()));
        issuer.inline_jwks = Some(testkit::jwks(&[TestKey::Rsa1, TestKey::Ec1]).to_string());
        let verifier = Arc::new(
            Verifier::new(
                AUDIENCE.into(),
                vec![issuer],
                clock.clone(),
                VerifierOptions::default(),
            )
            .unwrap(),
        );
        let bundle = Bundle::load_dir(&policies_dir(), &LoadOptions::default()).unwrap();
        let db = rt.block_on(TestDb::sqlite());
        let keys = Arc::new(SigningKeys::ephemeral().unwrap());
        let mut broker = Broker::new(BrokerParts {
            verifier: verifier.clone(),
            store: db.store(),
            clock: clock.clone(),
            api_tokens: Arc::new(ApiTokenProvider::new(keys, AUDIENCE.into())),
            extra_providers: Vec::new(),
            policy_dir: policies_dir(),
            policy_opts: LoadOptions::default(),
            grants: GrantConfig::default(),
            reaper: ReaperConfig::default(),
            max_credentials: 16,
            rate_per_minute: 0,
        })
        .unwrap();
        let (operator, hash) = crate::admin::operators::new_token();
        broker.set_operators(
            Operators::from_config(&[OperatorConfig {
                name: "fuzz".into(),
                role: Role::Admin,
                token_sha256: Some(hash),
                oidc: None,
            }])
            .unwrap(),
        );
        let limits = HttpLimits {
            max_body_bytes: 64 * 1024,
            request_timeout: std::time::Duration::from_secs(30),
            max_concurrency: 16,
        };
        let app = router(Arc::new(broker), &limits);
        Harness {
            rt,
            verifier,
            bundle,
            app,
            job_token: testkit::sign(TestKey::Rsa1, &example_claims()),
            operator_token: operator.expose().to_owned(),
            _db: db,
            _policies: policies_dir(),
        }
    })
}

/// Claims the example policies allow (`acme/api`, push to main), issued at the fixed now.
pub fn example_claims() -> Value {
    let now = time::OffsetDateTime::from_unix_timestamp(NOW).unwrap();
    let mut c = dev::github_claims(&dev::DevJob::acme_api(AUDIENCE, now));
    c["iss"] = Value::String(ISSUER.to_owned());
    c
}

/// Target `token`: arbitrary bytes as the bearer token. Invariant: nothing verifies (the
/// fuzzer cannot sign with the issuer's key, so a success would be a forgery). Error texts
/// cannot echo the token by construction (`VerifyError` carries only static text).
pub fn token(data: &[u8]) {
    let h = harness();
    let s = String::from_utf8_lossy(data);
    assert!(
        h.rt.block_on(h.verifier.verify(&s)).is_err(),
        "unsigned bytes verified"
    );
}

/// Target `signed_token`: arbitrary header and claims bytes, signed with the issuer's real key
/// (`data[0]` = header length). Only what survives the signature check can test the later
/// checks. Invariants: a verified token is for our issuer and audience, has `sub`, and the
/// policy engine decides every credential asked for without panicking.
pub fn signed_token(data: &[u8]) {
    let h = harness();
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let (header, claims) = rest.split_at(usize::from(n).min(rest.len()));
    let msg = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(claims)
    );
    let key = if n % 2 == 0 {
        TestKey::Rsa1
    } else {
        TestKey::Ec1
    };
    let sig = jsonwebtoken::crypto::sign(msg.as_bytes(), &key.encoding_key(), key.alg()).unwrap();
    let token = format!("{msg}.{sig}");
    if let Ok(v) = h.rt.block_on(h.verifier.verify(&token)) {
        assert_eq!(v.iss, ISSUER);
        assert!(!v.sub.is_empty());
        let aud_ok = match v.claims.get("aud") {
            Some(Value::String(a)) => a == AUDIENCE,
            Some(Value::Array(l)) => l.iter().any(|a| a.as_str() == Some(AUDIENCE)),
            _ => false,
        };
        assert!(aud_ok, "verified a token for another audience");
        decide(&h.bundle, &v.claims);
    }
}

fn decide(bundle: &Bundle, claims: &Map<String, Value>) {
    let requested: Vec<String> = ["deploy-api", "release-api", "no-such-credential"]
        .map(String::from)
        .to_vec();
    let input = PolicyInput {
        issuer: "github",
        platform: Platform::Github,
        claims,
    };
    let eval = bundle.evaluate(&input, &requested);
    assert_eq!(eval.decisions.len(), requested.len());
    assert!(
        !eval.decisions[2].outcome.is_allow(),
        "an unknown credential was allowed"
    );
}

/// Target `cel`: the example bundle's CEL rules over arbitrary claims (`data` as a JSON object
/// laid over the allowed example claims, or as raw strings in `repository` and `ref`).
pub fn cel(data: &[u8]) {
    let h = harness();
    let mut claims = match example_claims() {
        Value::Object(m) => m,
        _ => unreachable!("claims are an object"),
    };
    match serde_json::from_slice::<Value>(data) {
        Ok(Value::Object(over)) => claims.extend(over),
        _ => {
            let s = String::from_utf8_lossy(data).into_owned();
            claims.insert("repository".into(), Value::String(s.clone()));
            claims.insert("ref".into(), Value::String(s));
        }
    }
    decide(&h.bundle, &claims);
}

/// Target `policy`: arbitrary text as a policy file. Loading compiles every CEL expression and
/// regex; a bundle that loads is then evaluated once.
pub fn policy(data: &[u8]) {
    let text = String::from_utf8_lossy(data).into_owned();
    let opts = LoadOptions {
        known_issuers: Some(["github".to_owned(), "gitlab".to_owned()].into()),
    };
    if let Ok(b) = Bundle::load_files(&[("fuzz.yaml".to_owned(), text)], &opts) {
        let claims = match example_claims() {
            Value::Object(m) => m,
            _ => unreachable!("claims are an object"),
        };
        let names: Vec<String> = b.credentials().iter().map(|c| c.name.clone()).collect();
        let input = PolicyInput {
            issuer: "github",
            platform: Platform::Github,
            claims: &claims,
        };
        let eval = b.evaluate(&input, &names);
        assert_eq!(eval.decisions.len(), names.len());
    }
}

/// Target `config`: arbitrary text as the config file, then env overrides and validation.
/// Invariant: the config's `Display` (what startup logs), its `Debug` and its problem report
/// never contain an inline secret it holds.
pub fn config(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let Ok(mut c) = Config::parse(&text, "fuzz.yaml") else {
        return;
    };
    let _ = c.apply_env(|_| None);
    let mut secrets: Vec<String> = Vec::new();
    let mut add = |r: &crate::config::SecretRef| {
        if let Some(v) = r.value.as_ref().filter(|v| v.len() >= 8) {
            secrets.push(v.clone());
        }
    };
    add(&c.store.url);
    if let Some(k) = &c.api_tokens.signing_key {
        add(k);
    }
    for t in c.targets.postgres.values() {
        add(&t.admin_url);
    }
    let mut shown = format!("{c}\n{c:?}");
    for m in [Mode::Serve, Mode::Dev] {
        shown.extend(c.validate(m));
    }
    for s in &secrets {
        // A secret that also appears as a public value (an issuer URL, say) is not a leak.
        let public = format!("{}\n{}", c.public_url, c.audience);
        assert!(
            public.contains(s.as_str()) || !shown.contains(s.as_str()),
            "config shows a secret"
        );
    }
}

/// Target `request`: an HTTP request to every endpoint through the real router. `data[0]`
/// picks the endpoint, `data[1]` the bearer (none, the valid job token, the operator token,
/// or the rest as raw bytes), the rest is the body. Invariants: never 500 (a bug), every error
/// is `{"error": <code>, "message": ...}`, and no response echoes the bearer.
pub fn request(data: &[u8]) {
    let h = harness();
    let (sel, rest) = match data {
        [a, b, rest @ ..] => ((*a, *b), rest),
        _ => return,
    };
    let (method, path, content_type) = match sel.0 % 9 {
        0 | 1 => ("POST", "/v1/exchange", "application/json"),
        2 => ("POST", "/v1/revoke", "application/json"),
        3 => (
            "POST",
            "/v1/introspect",
            "application/x-www-form-urlencoded",
        ),
        4 => ("POST", "/v1/introspect", "application/json"),
        5 => ("POST", "/v1/admin/revoke-all", "application/json"),
        6 => ("POST", "/v1/admin/freeze", "application/json"),
        7 => ("POST", "/v1/admin/unfreeze", "application/json"),
        _ => ("GET", "/v1/audit", "application/json"),
    };
    let raw = String::from_utf8_lossy(rest).into_owned();
    let bearer = match sel.1 % 4 {
        0 => None,
        1 => Some(h.job_token.clone()),
        2 => Some(h.operator_token.clone()),
        _ => Some(raw.clone()),
    };
    // GET /v1/audit takes its input as the query string.
    let uri = if method == "GET" {
        let q: String = url::form_urlencoded::byte_serialize(rest).collect();
        format!("{path}?limit=5&repository={q}")
    } else {
        path.to_owned()
    };
    let mut req = Request::builder()
        .method(method)
        .uri(uri)
        .header("content-type", content_type);
    if let Some(b) = &bearer {
        match axum::http::HeaderValue::from_str(&format!("Bearer {b}")) {
            Ok(v) => req = req.header("authorization", v),
            Err(_) => return, // not a header a client could send
        }
    }
    let body = if method == "GET" {
        Body::empty()
    } else {
        Body::from(rest.to_vec())
    };
    let resp =
        h.rt.block_on(h.app.clone().oneshot(req.body(body).unwrap()))
            .unwrap();
    let status = resp.status();
    let bytes =
        h.rt.block_on(axum::body::to_bytes(resp.into_body(), 1 << 20))
            .unwrap();
    assert_ne!(status.as_u16(), 500, "500 on {method} {path}: {bytes:?}");
    if status.is_client_error() || status.is_server_error() {
        let v: Value = serde_json::from_slice(&bytes).expect("error bodies are JSON");
        assert!(v["error"].is_string() && v["message"].is_string(), "{v}");
    }
    if let Some(b) = bearer.filter(|b| b.len() >= 16) {
        let text = String::from_utf8_lossy(&bytes);
        assert!(!text.contains(&b), "a response echoes the bearer");
    }
}

/// A fuzz target: takes any bytes, panics only when an invariant breaks.
pub type Target = fn(&[u8]);

/// Every fuzz target, by the name of its `fuzz/fuzz_targets/<name>.rs` and corpus directory.
pub const TARGETS: &[(&str, Target)] = &[
    ("token", token),
    ("signed_token", signed_token),
    ("cel", cel),
    ("policy", policy),
    ("config", config),
    ("request", request),
];

#[cfg(test)]
mod tests {
    use super::*;

    /// Replays every committed corpus file and crash reproducer through its target: the fuzz
    /// runs' findings stay fixed in the ordinary test suite, without a nightly toolchain.
    #[test]
    fn fuzz_corpora_and_regressions_replay_cleanly() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
        for (name, f) in TARGETS {
            let mut n = 0;
            for dir in ["corpus", "regressions"] {
                let Ok(entries) = std::fs::read_dir(root.join(dir).join(name)) else {
                    continue;
                };
                for e in entries.flatten() {
                    let data = std::fs::read(e.path()).unwrap();
                    f(&data);
                    n += 1;
                }
            }
            assert!(n > 0, "no corpus for fuzz target {name}");
        }
    }

    /// The seed job token verifies: the `signed_token` and `request` targets start from a
    /// token that gets past the signature.
    #[test]
    fn the_seed_token_is_valid_at_the_fixed_now() {
        let h = harness();
        assert!(h.rt.block_on(h.verifier.verify(&h.job_token)).is_ok());
    }
}

//! Test helpers: committed test-only keys, a real local OIDC issuer over HTTP, and a signer that
//! can produce hostile tokens. Compiled only for tests and the `testkit` feature.
//!
//! The keys under `testdata/keys/` are public; nothing but tests may trust them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test support: fail loudly

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::{Value, json};
use time::OffsetDateTime;

use super::dev::{DevJob, github_claims as dev_github, gitlab_claims as dev_gitlab};
use super::{IssuerConfig, Platform};

/// A committed test key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TestKey {
    /// RSA 2048, `kid` `test-rsa-1`, RS256. The default key of a [`TestIssuer`].
    Rsa1,
    /// RSA 2048, `kid` `test-rsa-2`, RS256. For rotation.
    Rsa2,
    /// EC P-256, `kid` `test-ec-1`, ES256. For algorithm mismatch.
    Ec1,
}

impl TestKey {
    pub fn kid(self) -> &'static str {
        match self {
            TestKey::Rsa1 => "test-rsa-1",
            TestKey::Rsa2 => "test-rsa-2",
            TestKey::Ec1 => "test-ec-1",
        }
    }
    pub fn alg(self) -> Algorithm {
        match self {
            TestKey::Ec1 => Algorithm::ES256,
            _ => Algorithm::RS256,
        }
    }
    pub fn private_pem(self) -> &'static str {
        match self {
            TestKey::Rsa1 => include_str!("../../../testdata/keys/rsa-1.pem"),
            TestKey::Rsa2 => include_str!("../../../testdata/keys/rsa-2.pem"),
            TestKey::Ec1 => include_str!("../../../testdata/keys/ec-1.pem"),
        }
    }
    /// The public JWK as published in a JWKS.
    pub fn public_jwk_json(self) -> &'static str {
        match self {
            TestKey::Rsa1 => include_str!("../../../testdata/keys/rsa-1.jwk.json"),
            TestKey::Rsa2 => include_str!("../../../testdata/keys/rsa-2.jwk.json"),
            TestKey::Ec1 => include_str!("../../../testdata/keys/ec-1.jwk.json"),
        }
    }
    pub fn public_jwk(self) -> Value {
        serde_json::from_str(self.public_jwk_json()).expect("committed JWK parses")
    }
    pub fn encoding_key(self) -> EncodingKey {
        let pem = self.private_pem().as_bytes();
        match self {
            TestKey::Ec1 => EncodingKey::from_ec_pem(pem),
            _ => EncodingKey::from_rsa_pem(pem),
        }
        .expect("committed PEM parses")
    }
}

/// A JWKS document holding these keys.
pub fn jwks(keys: &[TestKey]) -> Value {
    json!({ "keys": keys.iter().map(|k| k.public_jwk()).collect::<Vec<_>>() })
}

/// The header a well-behaved issuer would send for this key.
pub fn header_for(key: TestKey) -> Value {
    let alg = match key.alg() {
        Algorithm::ES256 => "ES256",
        _ => "RS256",
    };
    json!({ "alg": alg, "typ": "JWT", "kid": key.kid() })
}

/// Sign claims normally with a test key.
pub fn sign(key: TestKey, claims: &Value) -> String {
    sign_raw(&header_for(key), claims, SignWith::Key(key))
}

/// How [`sign_raw`] produces the signature segment. The header is used exactly as given, so the
/// header's `alg` can lie about the signature.
#[derive(Debug, Clone)]
pub enum SignWith {
    /// The key's own algorithm (RS256 / ES256), whatever the header says.
    Key(TestKey),
    /// HS256 with these bytes as the secret (e.g. the issuer's public key).
    Hs256(Vec<u8>),
    /// Empty signature, as `alg: none` tokens carry.
    Unsigned,
    /// Well-formed base64url that is no signature at all.
    Garbage,
}

/// Build a token from an arbitrary header (add `jku`, `jwk`, `x5u`, `x5c`, any `kid`, any `alg`).
pub fn sign_raw(header: &Value, claims: &Value, with: SignWith) -> String {
    let h = URL_SAFE_NO_PAD.encode(serde_json::to_vec(header).unwrap());
    let c = URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).unwrap());
    let message = format!("{h}.{c}");
    let sig = match with {
        SignWith::Key(k) => {
            jsonwebtoken::crypto::sign(message.as_bytes(), &k.encoding_key(), k.alg()).unwrap()
        }
        SignWith::Hs256(secret) => jsonwebtoken::crypto::sign(
            message.as_bytes(),
            &EncodingKey::from_secret(&secret),
            Algorithm::HS256,
        )
        .unwrap(),
        SignWith::Unsigned => String::new(),
        SignWith::Garbage => URL_SAFE_NO_PAD.encode(b"definitely not a signature"),
    };
    format!("{message}.{sig}")
}

/// GitHub-shaped claims (the dev builder's set) for issuer `iss`, audience `aud`, issued `now`.
pub fn github_claims(iss: &str, aud: &str, now: OffsetDateTime) -> Value {
    let mut c = dev_github(&DevJob::example(aud, now));
    c["iss"] = Value::String(iss.to_owned());
    c
}

/// GitLab-shaped claims for issuer `iss`, audience `aud`, issued `now`.
pub fn gitlab_claims(iss: &str, aud: &str, now: OffsetDateTime) -> Value {
    let mut c = dev_gitlab(&DevJob::example(aud, now));
    c["iss"] = Value::String(iss.to_owned());
    c
}

struct Shared {
    url: String,
    keys: Mutex<Vec<TestKey>>,
    down: AtomicBool,
    discovery_issuer: Mutex<Option<String>>,
    requests: AtomicUsize,
    discovery_fetches: AtomicUsize,
    jwks_fetches: AtomicUsize,
}

/// A local OIDC issuer on `127.0.0.1` serving discovery and JWKS over real HTTP.
pub struct TestIssuer {
    shared: Arc<Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl TestIssuer {
    /// Start on a free port, publishing [`TestKey::Rsa1`].
    pub async fn start() -> TestIssuer {
        Self::start_with(&[TestKey::Rsa1]).await
    }

    pub async fn start_with(keys: &[TestKey]) -> TestIssuer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            url: format!("http://{addr}"),
            keys: Mutex::new(keys.to_vec()),
            down: AtomicBool::new(false),
            discovery_issuer: Mutex::new(None),
            requests: AtomicUsize::new(0),
            discovery_fetches: AtomicUsize::new(0),
            jwks_fetches: AtomicUsize::new(0),
        });
        let app = Router::new()
            .route("/.well-known/openid-configuration", get(discovery))
            .route("/.well-known/jwks", get(jwks_doc))
            .fallback(not_found)
            .with_state(shared.clone());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await;
        });
        TestIssuer {
            shared,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// The issuer URL (`http://127.0.0.1:PORT`, no trailing slash): the `iss` to put in tokens.
    pub fn url(&self) -> String {
        self.shared.url.clone()
    }

    pub fn jwks_url(&self) -> String {
        format!("{}/.well-known/jwks", self.shared.url)
    }

    /// An issuer entry for this server (discovery, http allowed).
    pub fn issuer_config(&self, name: &str, platform: Platform) -> IssuerConfig {
        let mut c = IssuerConfig::new(name, platform, Some(self.url()));
        c.danger_allow_insecure_http = true;
        c
    }

    /// Publish exactly this key from now on.
    pub fn rotate_to(&self, key: TestKey) {
        self.set_keys(&[key]);
    }

    pub fn set_keys(&self, keys: &[TestKey]) {
        *self.shared.keys.lock().unwrap() = keys.to_vec();
    }

    /// While down, every request gets 503.
    pub fn set_down(&self, down: bool) {
        self.shared.down.store(down, Ordering::SeqCst);
    }

    /// Make discovery claim a different `issuer` (None: the real URL).
    pub fn set_discovery_issuer(&self, issuer: Option<String>) {
        *self.shared.discovery_issuer.lock().unwrap() = issuer;
    }

    /// Every HTTP request received, any path.
    pub fn requests(&self) -> usize {
        self.shared.requests.load(Ordering::SeqCst)
    }

    pub fn discovery_fetches(&self) -> usize {
        self.shared.discovery_fetches.load(Ordering::SeqCst)
    }

    pub fn jwks_fetches(&self) -> usize {
        self.shared.jwks_fetches.load(Ordering::SeqCst)
    }

    /// Sign GitHub-shaped claims for this issuer with `key`.
    pub fn github_token(&self, key: TestKey, aud: &str, now: OffsetDateTime) -> String {
        sign(key, &github_claims(&self.url(), aud, now))
    }

    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for TestIssuer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

fn unavailable(s: &Shared) -> Option<Response> {
    s.requests.fetch_add(1, Ordering::SeqCst);
    s.down
        .load(Ordering::SeqCst)
        .then(|| StatusCode::SERVICE_UNAVAILABLE.into_response())
}

async fn discovery(State(s): State<Arc<Shared>>) -> Response {
    if let Some(r) = unavailable(&s) {
        return r;
    }
    s.discovery_fetches.fetch_add(1, Ordering::SeqCst);
    let issuer = s
        .discovery_issuer
        .lock()
        .unwrap()
        .clone()
        .unwrap_or_else(|| s.url.clone());
    // Shaped like GitHub's document: note there is no authorization_endpoint.
    Json(json!({
        "issuer": issuer,
        "jwks_uri": format!("{}/.well-known/jwks", s.url),
        "subject_types_supported": ["public", "pairwise"],
        "response_types_supported": ["id_token"],
        "claims_supported": ["sub", "aud", "exp", "iat", "iss", "jti", "nbf", "ref", "repository"],
        "id_token_signing_alg_values_supported": ["RS256"],
        "scopes_supported": ["openid"],
    }))
    .into_response()
}

async fn jwks_doc(State(s): State<Arc<Shared>>) -> Response {
    if let Some(r) = unavailable(&s) {
        return r;
    }
    s.jwks_fetches.fetch_add(1, Ordering::SeqCst);
    let keys = s.keys.lock().unwrap().clone();
    Json(jwks(&keys)).into_response()
}

async fn not_found(State(s): State<Arc<Shared>>) -> Response {
    if let Some(r) = unavailable(&s) {
        return r;
    }
    StatusCode::NOT_FOUND.into_response()
}

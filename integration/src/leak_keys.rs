//! GitHub's secret scanning key list for tests: a local server publishing a test P-256 key in
//! GitHub's `{"public_keys": [...]}` shape, and report signing (ECDSA P-256 SHA-256, ASN.1 DER,
//! base64) as GitHub does it. A second key, never published, signs forgeries.

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair};
use base64::Engine;
use broker::leaks::github_keys::p256_pem;
use serde_json::json;

/// The identifier the published key has.
pub const KEY_ID: &str = "test-key-1";

/// GitHub's key list for these tests, served from a local port; signs reports.
pub struct KeyServer {
    /// The key list URL (`leaks.github.keys_url`).
    pub url: String,
    /// The published key.
    pub key: EcdsaKeyPair,
    /// A key GitHub never published.
    pub stranger: EcdsaKeyPair,
    pub task: tokio::task::JoinHandle<()>,
}

impl KeyServer {
    #[allow(clippy::unwrap_used)] // test harness
    pub async fn start() -> Self {
        let key = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_ASN1_SIGNING).unwrap();
        let stranger = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_ASN1_SIGNING).unwrap();
        let doc = json!({"public_keys": [
            {"key_identifier": KEY_ID, "key": p256_pem(key.public_key().as_ref()), "is_current": true}
        ]})
        .to_string();
        let app = axum::Router::new().route(
            "/meta/public_keys/secret_scanning",
            axum::routing::get(move || {
                let doc = doc.clone();
                async move { ([("content-type", "application/json")], doc) }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "http://{}/meta/public_keys/secret_scanning",
            listener.local_addr().unwrap()
        );
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            url,
            key,
            stranger,
            task,
        }
    }

    /// A GitHub-style signature of `body` with `k`.
    #[allow(clippy::unwrap_used)] // test harness
    pub fn sign_with(k: &EcdsaKeyPair, body: &[u8]) -> String {
        let sig = k.sign(&SystemRandom::new(), body).unwrap();
        base64::engine::general_purpose::STANDARD.encode(sig.as_ref())
    }
}

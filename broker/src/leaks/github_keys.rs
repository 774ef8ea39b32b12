//! GitHub's secret scanning signing keys, and the check of a report's signature.
//!
//! GitHub signs each report body with ECDSA P-256 / SHA-256: `Github-Public-Key-Signature` is
//! the ASN.1 DER signature in base64, `Github-Public-Key-Identifier` names the key, and the keys
//! are published as `{"public_keys": [{"key_identifier", "key" (PEM SubjectPublicKeyInfo),
//! "is_current"}]}` at the configured URL. The list is fetched through `outbound.rs` (no
//! redirects, a timeout, a size cap), cached, and refetched when a report names an identifier
//! the cache lacks, at most once per cooldown (so unsigned noise cannot make the broker hammer
//! GitHub). A fetch that fails keeps the keys already known.

use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1, UnparsedPublicKey};
use base64::Engine;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Largest key list read (GitHub's is a few KiB).
const MAX_KEYS_BYTES: usize = 256 * 1024;
/// Longest identifier and signature header looked at.
const MAX_HEADER: usize = 1024;
/// DER prefix of a P-256 SubjectPublicKeyInfo: SEQUENCE { SEQUENCE { id-ecPublicKey,
/// prime256v1 }, BIT STRING (0 unused bits) } followed by the 65-byte uncompressed point.
const P256_SPKI_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];

/// Why a report's signature was not accepted. Carries nothing the sender chose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("no Github-Public-Key-Identifier or Github-Public-Key-Signature header")]
    Missing,
    #[error("the key identifier is not among GitHub's published keys")]
    UnknownKey,
    #[error("the signature does not verify")]
    BadSignature,
    /// The key list could not be fetched and the identifier is not cached.
    #[error("GitHub's key list is unavailable")]
    KeysUnavailable,
}

struct State {
    /// key identifier → uncompressed P-256 point.
    keys: HashMap<String, Vec<u8>>,
    /// Last fetch attempt (success or not).
    fetched_at: Option<Instant>,
}

/// The cached key list of one configured URL.
pub struct GithubKeys {
    url: String,
    client: reqwest::Client,
    cooldown: Duration,
    state: tokio::sync::Mutex<State>,
}

impl std::fmt::Debug for GithubKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GithubKeys")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl GithubKeys {
    pub fn new(url: &str, cooldown: Duration) -> Result<Self, crate::outbound::BuildError> {
        let client = crate::outbound::Outbound::new(Duration::from_secs(10))
            .connect_timeout(Duration::from_secs(5))
            .build()?;
        Ok(Self {
            url: url.to_owned(),
            client,
            cooldown,
            state: tokio::sync::Mutex::new(State {
                keys: HashMap::new(),
                fetched_at: None,
            }),
        })
    }

    /// Check `signature` (base64 DER) over `body` with the key named `key_id`.
    pub async fn verify(
        &self,
        key_id: Option<&str>,
        signature: Option<&str>,
        body: &[u8],
    ) -> Result<(), SignatureError> {
        let (Some(key_id), Some(signature)) = (key_id, signature) else {
            return Err(SignatureError::Missing);
        };
        if key_id.len() > MAX_HEADER || signature.len() > MAX_HEADER {
            return Err(SignatureError::BadSignature);
        }
        let sig = base64::engine::general_purpose::STANDARD
            .decode(signature.trim())
            .map_err(|_| SignatureError::BadSignature)?;
        let point = self.key(key_id).await?;
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, &point)
            .verify(body, &sig)
            .map_err(|_| SignatureError::BadSignature)
    }

    /// The key named `key_id`: from the cache, or after one refetch per cooldown. Holding the
    /// lock across the fetch makes it single-flight: concurrent reports wait for one fetch.
    async fn key(&self, key_id: &str) -> Result<Vec<u8>, SignatureError> {
        let mut st = self.state.lock().await;
        if let Some(k) = st.keys.get(key_id) {
            return Ok(k.clone());
        }
        if st.fetched_at.is_some_and(|t| t.elapsed() < self.cooldown) {
            return Err(if st.keys.is_empty() {
                SignatureError::KeysUnavailable
            } else {
                SignatureError::UnknownKey
            });
        }
        st.fetched_at = Some(Instant::now());
        match self.fetch().await {
            Ok(keys) => st.keys = keys,
            Err(e) => {
                tracing::warn!(url = %self.url, error = %e, "GitHub secret scanning keys: fetch failed; keeping the keys known");
                if st.keys.is_empty() {
                    return Err(SignatureError::KeysUnavailable);
                }
            }
        }
        st.keys
            .get(key_id)
            .cloned()
            .ok_or(SignatureError::UnknownKey)
    }

    async fn fetch(&self) -> Result<HashMap<String, Vec<u8>>, String> {
        let mut resp = self
            .client
            .get(&self.url)
            .header("accept", "application/json")
            .send()
            .await
            .map_err(|e| format!("request: {e}"))?;
        if !resp.status().is_success() {
            return Err(format!("status {}", resp.status().as_u16()));
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| format!("body: {e}"))? {
            if body.len() + chunk.len() > MAX_KEYS_BYTES {
                return Err(format!("larger than {MAX_KEYS_BYTES} bytes"));
            }
            body.extend_from_slice(&chunk);
        }
        parse_keys(&body)
    }
}

/// GitHub's `{"public_keys": [{"key_identifier", "key", "is_current"}]}`: every P-256 key in
/// it (current or not: GitHub may still sign with a key it is phasing out). Others are skipped.
pub fn parse_keys(body: &[u8]) -> Result<HashMap<String, Vec<u8>>, String> {
    #[derive(serde::Deserialize)]
    struct Doc {
        public_keys: Vec<Key>,
    }
    #[derive(serde::Deserialize)]
    struct Key {
        key_identifier: String,
        key: String,
    }
    let doc: Doc = serde_json::from_slice(body).map_err(|_| "not a public_keys document")?;
    let mut out = HashMap::new();
    for k in doc.public_keys {
        if let Some(point) = p256_point_from_pem(&k.key) {
            out.insert(k.key_identifier, point);
        }
    }
    if out.is_empty() {
        return Err("no P-256 key in the document".into());
    }
    Ok(out)
}

/// The uncompressed point of a PEM `PUBLIC KEY` (SubjectPublicKeyInfo) on P-256.
fn p256_point_from_pem(pem: &str) -> Option<Vec<u8>> {
    if !pem.contains("-----BEGIN PUBLIC KEY-----") {
        return None;
    }
    let b64: String = pem
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with("-----") && !l.is_empty())
        .collect();
    let der = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
    let point = der.strip_prefix(&P256_SPKI_PREFIX[..])?;
    (point.len() == 65 && point[0] == 0x04).then(|| point.to_vec())
}

/// A PEM `PUBLIC KEY` for an uncompressed P-256 point (tests, and the test key server).
pub fn p256_pem(point: &[u8]) -> String {
    let mut der = P256_SPKI_PREFIX.to_vec();
    der.extend_from_slice(point);
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = String::from("-----BEGIN PUBLIC KEY-----\n");
    for line in b64.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(line));
        pem.push('\n');
    }
    pem.push_str("-----END PUBLIC KEY-----\n");
    pem
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::rand::SystemRandom;
    use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair};

    fn key() -> EcdsaKeyPair {
        EcdsaKeyPair::generate(&ECDSA_P256_SHA256_ASN1_SIGNING).unwrap()
    }

    fn doc(keys: &[(&str, &EcdsaKeyPair)]) -> Vec<u8> {
        let list: Vec<_> = keys
            .iter()
            .map(|(id, k)| serde_json::json!({"key_identifier": id, "key": p256_pem(k.public_key().as_ref()), "is_current": true}))
            .collect();
        serde_json::to_vec(&serde_json::json!({ "public_keys": list })).unwrap()
    }

    fn sign(k: &EcdsaKeyPair, body: &[u8]) -> String {
        let sig = k.sign(&SystemRandom::new(), body).unwrap();
        base64::engine::general_purpose::STANDARD.encode(sig.as_ref())
    }

    /// Keys served by a one-route local server; counts fetches.
    async fn serve(doc: Vec<u8>) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let hits = std::sync::Arc::new(AtomicUsize::new(0));
        let h = hits.clone();
        let app = axum::Router::new().route(
            "/keys",
            axum::routing::get(move || {
                let doc = doc.clone();
                h.fetch_add(1, Ordering::SeqCst);
                async move { doc }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/keys", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (url, hits)
    }

    #[tokio::test]
    async fn a_signed_report_verifies_and_a_tampered_one_does_not() {
        let (a, b) = (key(), key());
        let (url, hits) = serve(doc(&[("ka", &a), ("kb", &b)])).await;
        let keys = GithubKeys::new(&url, Duration::from_secs(60)).unwrap();
        let body = br#"[{"token":"x","type":"t","url":"u","source":"content"}]"#;
        assert_eq!(
            keys.verify(Some("ka"), Some(&sign(&a, body)), body).await,
            Ok(())
        );
        assert_eq!(
            keys.verify(Some("kb"), Some(&sign(&b, body)), body).await,
            Ok(())
        );
        // Signed by the other key, a changed body, garbage, nothing.
        assert_eq!(
            keys.verify(Some("ka"), Some(&sign(&b, body)), body).await,
            Err(SignatureError::BadSignature)
        );
        assert_eq!(
            keys.verify(Some("ka"), Some(&sign(&a, body)), b"[]").await,
            Err(SignatureError::BadSignature)
        );
        assert_eq!(
            keys.verify(Some("ka"), Some("not base64!"), body).await,
            Err(SignatureError::BadSignature)
        );
        assert_eq!(
            keys.verify(None, Some("x"), body).await,
            Err(SignatureError::Missing)
        );
        // One fetch served all of that.
        assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn unknown_identifiers_refetch_at_most_once_per_cooldown() {
        let a = key();
        let (url, hits) = serve(doc(&[("ka", &a)])).await;
        let keys = GithubKeys::new(&url, Duration::from_secs(60)).unwrap();
        let body = b"[]";
        for i in 0..20 {
            assert_eq!(
                keys.verify(Some(&format!("nope-{i}")), Some(&sign(&a, body)), body)
                    .await,
                Err(SignatureError::UnknownKey)
            );
        }
        assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 1);
        // A known key still verifies from the cache.
        assert_eq!(
            keys.verify(Some("ka"), Some(&sign(&a, body)), body).await,
            Ok(())
        );
        // After the cooldown an unknown identifier refetches again.
        let keys = GithubKeys::new(&url, Duration::from_millis(1)).unwrap();
        for i in 0..3 {
            let _ = keys
                .verify(Some(&format!("nope-{i}")), Some("AA=="), body)
                .await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn an_unreachable_key_list_refuses() {
        let keys = GithubKeys::new("http://127.0.0.1:9/keys", Duration::from_secs(60)).unwrap();
        assert_eq!(
            keys.verify(Some("k"), Some("AA=="), b"[]").await,
            Err(SignatureError::KeysUnavailable)
        );
    }

    #[test]
    fn key_documents_skip_what_is_not_p256() {
        let a = key();
        let mut d: serde_json::Value = serde_json::from_slice(&doc(&[("ka", &a)])).unwrap();
        d["public_keys"].as_array_mut().unwrap().push(serde_json::json!({
            "key_identifier": "rsa", "key": "-----BEGIN PUBLIC KEY-----\nMIIBIjANBg==\n-----END PUBLIC KEY-----\n", "is_current": false
        }));
        let keys = parse_keys(&serde_json::to_vec(&d).unwrap()).unwrap();
        assert_eq!(keys.len(), 1);
        assert_eq!(keys["ka"], a.public_key().as_ref());
        assert!(parse_keys(b"{}").is_err());
    }
}

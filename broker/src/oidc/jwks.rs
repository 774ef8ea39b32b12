//! Parsing an issuer's JWKS into verification keys.
//!
//! Lenient per key, strict per set: a key we cannot use (encryption key, unknown `kty`, weak
//! RSA, unsupported curve) is skipped so a new key type at the issuer does not break the others,
//! but a document with no usable key at all is an error and the previous set stays in use.

use std::collections::HashMap;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey};
use serde_json::Value;

/// Keys per document we are willing to hold; issuers publish a handful.
const MAX_KEYS: usize = 64;
/// RSA moduli shorter than this are refused (NIST SP 800-131A).
const MIN_RSA_MODULUS_BYTES: usize = 256;

/// Key type, which decides the algorithms a key may verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeyKind {
    Rsa,
    EcP256,
    EcP384,
}

impl KeyKind {
    pub(crate) fn fits(self, alg: Algorithm) -> bool {
        use Algorithm::*;
        match self {
            KeyKind::Rsa => matches!(alg, RS256 | RS384 | RS512 | PS256 | PS384 | PS512),
            KeyKind::EcP256 => alg == ES256,
            KeyKind::EcP384 => alg == ES384,
        }
    }
}

#[derive(Clone)]
pub(crate) struct VerifyKey {
    pub kind: KeyKind,
    /// The JWK's own `alg`, when it names one: the token must then use exactly that.
    pub alg: Option<Algorithm>,
    pub key: DecodingKey,
}

impl VerifyKey {
    pub(crate) fn accepts(&self, alg: Algorithm) -> bool {
        self.kind.fits(alg) && self.alg.is_none_or(|a| a == alg)
    }
}

/// A parsed key set. Keys without `kid` are kept apart: they are only used when the set holds
/// exactly one key and the token names none.
#[derive(Clone, Default)]
pub(crate) struct KeySet {
    by_kid: HashMap<String, VerifyKey>,
    anonymous: Vec<VerifyKey>,
}

impl std::fmt::Debug for KeySet {
    // Key ids only: public, and enough to debug rotation.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeySet")
            .field("kids", &self.by_kid.keys().collect::<Vec<_>>())
            .field("without_kid", &self.anonymous.len())
            .finish()
    }
}

impl KeySet {
    pub(crate) fn len(&self) -> usize {
        self.by_kid.len() + self.anonymous.len()
    }

    pub(crate) fn find(&self, kid: Option<&str>) -> Option<&VerifyKey> {
        match kid {
            Some(k) => self.by_kid.get(k),
            None if self.len() == 1 => self.by_kid.values().chain(self.anonymous.iter()).next(),
            None => None,
        }
    }

    /// Parse a JWKS document. The error is a short fixed reason, safe to surface in health.
    pub(crate) fn parse(bytes: &[u8]) -> Result<KeySet, &'static str> {
        let doc: Value = serde_json::from_slice(bytes).map_err(|_| "jwks_invalid_json")?;
        let keys = doc
            .get("keys")
            .and_then(Value::as_array)
            .ok_or("jwks_without_keys")?;
        let mut set = KeySet::default();
        for jwk in keys.iter().take(MAX_KEYS) {
            let Some(key) = parse_key(jwk) else { continue };
            match jwk.get("kid").and_then(Value::as_str) {
                Some(kid) if !kid.is_empty() => {
                    set.by_kid.insert(kid.to_owned(), key);
                }
                _ => set.anonymous.push(key),
            }
        }
        if set.len() == 0 {
            return Err("jwks_no_usable_keys");
        }
        Ok(set)
    }
}

fn parse_key(jwk: &Value) -> Option<VerifyKey> {
    let s = |k: &str| jwk.get(k).and_then(Value::as_str);
    if let Some(u) = s("use")
        && u != "sig"
    {
        return None;
    }
    // A JWK naming an algorithm we do not pin-able (HS*, none, EdDSA) is not ours to use.
    let alg = match s("alg") {
        Some(a) => Some(super::config::parse_allowed_algorithm(a)?),
        None => None,
    };
    let (kind, key) = match s("kty")? {
        "RSA" => {
            let n = s("n")?;
            let modulus = URL_SAFE_NO_PAD.decode(n).ok()?;
            let significant = modulus.iter().skip_while(|b| **b == 0).count();
            if significant < MIN_RSA_MODULUS_BYTES {
                return None;
            }
            (
                KeyKind::Rsa,
                DecodingKey::from_rsa_components(n, s("e")?).ok()?,
            )
        }
        "EC" => {
            let kind = match s("crv")? {
                "P-256" => KeyKind::EcP256,
                "P-384" => KeyKind::EcP384,
                _ => return None,
            };
            (
                kind,
                DecodingKey::from_ec_components(s("x")?, s("y")?).ok()?,
            )
        }
        _ => return None,
    };
    if let Some(a) = alg
        && !kind.fits(a)
    {
        return None;
    }
    Some(VerifyKey { kind, alg, key })
}

#[cfg(test)]
mod tests {
    use super::*;

    const RSA1: &str = include_str!("../../../testdata/keys/rsa-1.jwk.json");
    const EC1: &str = include_str!("../../../testdata/keys/ec-1.jwk.json");

    fn doc(keys: &[Value]) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({ "keys": keys })).unwrap()
    }

    #[test]
    fn parses_rsa_and_ec_and_skips_unusable() {
        let rsa: Value = serde_json::from_str(RSA1).unwrap();
        let ec: Value = serde_json::from_str(EC1).unwrap();
        let hmac = serde_json::json!({"kty":"oct","kid":"h","k":"c2VjcmV0"});
        let enc = serde_json::json!({"kty":"RSA","use":"enc","kid":"e","n":rsa["n"],"e":"AQAB"});
        let weak = serde_json::json!({"kty":"RSA","kid":"w","n":"AQAB","e":"AQAB"});
        let set = KeySet::parse(&doc(&[rsa, ec, hmac, enc, weak])).unwrap();
        assert_eq!(set.len(), 2);
        let r = set.find(Some("test-rsa-1")).unwrap();
        assert!(r.accepts(Algorithm::RS256));
        assert!(!r.accepts(Algorithm::ES256));
        assert!(!r.accepts(Algorithm::PS256), "JWK alg RS256 pins the key");
        let e = set.find(Some("test-ec-1")).unwrap();
        assert!(e.accepts(Algorithm::ES256) && !e.accepts(Algorithm::RS256));
        assert!(set.find(Some("h")).is_none());
        assert!(set.find(None).is_none(), "two keys: a kid is required");
    }

    #[test]
    fn bad_documents_fail() {
        assert_eq!(KeySet::parse(b"nope").err(), Some("jwks_invalid_json"));
        assert_eq!(KeySet::parse(b"{}").err(), Some("jwks_without_keys"));
        assert_eq!(KeySet::parse(&doc(&[])).err(), Some("jwks_no_usable_keys"));
    }

    #[test]
    fn single_key_without_kid_is_usable_without_kid() {
        let mut rsa: Value = serde_json::from_str(RSA1).unwrap();
        rsa.as_object_mut().unwrap().remove("kid");
        let set = KeySet::parse(&doc(&[rsa])).unwrap();
        assert!(set.find(None).is_some());
        assert!(set.find(Some("anything")).is_none());
    }
}

//! !!! UNTRUSTED INPUT !!!
//!
//! Decodes a JWT's header and payload WITHOUT checking anything cryptographic. Nothing returned
//! from here is trusted. It is used for exactly three things:
//!
//! 1. pick the configured issuer whose `iss` equals the token's `iss` byte for byte,
//! 2. pick that issuer's key by `kid` and check `alg` against the issuer's pinned list, and
//! 3. on the job side (`broker exchange`), show a person the claims of their own job token
//!    after the broker refused it ([`claims_for_display`]): never to decide anything.
//!
//! Inside the broker, claims are only handed to callers after [`super::verifier`] has verified
//! the signature over these exact bytes. Header members `jku`, `x5u`, `jwk` and `x5c` are not even read: keys come
//! only from the configured issuer's own key set.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Map, Value};

use super::VerifyError;

/// The parts of an unverified token needed to route it.
#[derive(Debug)]
pub(crate) struct Unverified {
    /// `alg` as written (may be `none`, `HS256`, anything).
    pub alg: String,
    pub kid: Option<String>,
    /// `iss` from the payload, if it is a string.
    pub iss: Option<String>,
}

/// Split and decode. Errors are deliberately coarse and never echo input.
pub(crate) fn peek(token: &str) -> Result<Unverified, VerifyError> {
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(VerifyError::MalformedToken("expected three segments"));
    };
    if h.is_empty() || p.is_empty() {
        return Err(VerifyError::MalformedToken("empty segment"));
    }
    // An empty signature is what `alg: none` tokens carry; it is refused later by alg pinning,
    // but the signature must at least be well-formed base64url.
    if URL_SAFE_NO_PAD.decode(s).is_err() {
        return Err(VerifyError::MalformedToken("signature is not base64url"));
    }
    let header = decode_object(h, "header")?;
    let payload = decode_object(p, "payload")?;

    let alg = match header.get("alg") {
        Some(Value::String(a)) => a.clone(),
        _ => return Err(VerifyError::MalformedToken("header alg missing")),
    };
    // `crit` lists extensions the verifier must understand; we understand none.
    if header.contains_key("crit") {
        return Err(VerifyError::MalformedToken("critical header extensions"));
    }
    let kid = match header.get("kid") {
        None => None,
        Some(Value::String(k)) if !k.is_empty() && k.len() <= 256 => Some(k.clone()),
        Some(_) => return Err(VerifyError::MalformedToken("header kid invalid")),
    };
    let iss = match payload.get("iss") {
        Some(Value::String(i)) => Some(i.clone()),
        _ => None,
    };
    Ok(Unverified { alg, kid, iss })
}

/// The payload of a JWT, decoded WITHOUT verification, for explaining a refusal to the job
/// that sent it: the claims are what the policy saw, and are not secret (the signature is what
/// makes the token a credential, and it is not returned). `None` when the payload is not a JSON
/// object (duplicate members included). Must never feed a decision.
pub fn claims_for_display(token: &str) -> Option<Map<String, Value>> {
    let payload = token.split('.').nth(1)?;
    decode_object(payload.trim_end_matches('='), "payload").ok()
}

fn decode_object(seg: &str, what: &'static str) -> Result<Map<String, Value>, VerifyError> {
    let bytes = URL_SAFE_NO_PAD.decode(seg).map_err(|_| {
        VerifyError::MalformedToken(if what == "header" {
            "header is not base64url"
        } else {
            "payload is not base64url"
        })
    })?;
    match serde_json::from_slice::<NoDuplicates>(&bytes) {
        Ok(NoDuplicates(Value::Object(m))) => Ok(m),
        _ => Err(VerifyError::MalformedToken(if what == "header" {
            "header is not a JSON object"
        } else {
            "payload is not a JSON object"
        })),
    }
}

/// A JSON value in which no object has the same member twice, at any depth.
///
/// Why: serde_json (here, in jsonwebtoken and in the policy engine's input) silently keeps the
/// last of duplicate members, and other JWT libraries keep the first. A token saying
/// `"repository_id":"1","repository_id":"2"` means different things to different readers, so
/// it means nothing: it is refused as malformed before anything else reads it. serde_json's
/// recursion limit still applies (deeply nested input is refused, not a stack overflow).
struct NoDuplicates(Value);

impl<'de> serde::Deserialize<'de> for NoDuplicates {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(NoDuplicatesVisitor).map(NoDuplicates)
    }
}

struct NoDuplicatesVisitor;

impl<'de> serde::de::Visitor<'de> for NoDuplicatesVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JSON without duplicate object members")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        // JSON text cannot spell NaN or infinity, so this never yields null in practice.
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(NoDuplicates(v)) = seq.next_element()? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(k) = map.next_key::<String>()? {
            let NoDuplicates(v) = map.next_value()?;
            if out.contains_key(&k) {
                // The member name is token input: not echoed.
                return Err(serde::de::Error::custom("duplicate object member"));
            }
            out.insert(k, v);
        }
        Ok(Value::Object(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(v: &str) -> String {
        URL_SAFE_NO_PAD.encode(v)
    }

    #[test]
    fn claims_for_display_are_the_payload_only() {
        let p = enc(r#"{"repository":"acme/api","ref":"refs/heads/x"}"#);
        let c = claims_for_display(&format!("h.{p}.sig")).unwrap();
        assert_eq!(c["ref"], "refs/heads/x");
        assert!(claims_for_display(&format!("h.{p}=.sig")).is_some());
        assert!(claims_for_display("garbage").is_none());
        assert!(claims_for_display(&format!("h.{}.s", enc("[1]"))).is_none());
        assert!(claims_for_display(&format!("h.{}.s", enc(r#"{"a":1,"a":2}"#))).is_none());
    }

    #[test]
    fn reads_alg_kid_iss() {
        let t = format!(
            "{}.{}.{}",
            enc(r#"{"alg":"RS256","kid":"k1","jku":"https://evil.example"}"#),
            enc(r#"{"iss":"https://i.example","sub":"x"}"#),
            enc("sig")
        );
        let u = peek(&t).unwrap();
        assert_eq!(u.alg, "RS256");
        assert_eq!(u.kid.as_deref(), Some("k1"));
        assert_eq!(u.iss.as_deref(), Some("https://i.example"));
    }

    #[test]
    fn garbage_is_malformed() {
        let cases = [
            String::new(),
            "abc".into(),
            "a.b".into(),
            "a.b.c.d.e".into(),
            "!!.??.**".into(),
            format!("{}.{}.", enc("[]"), enc("{}")),
            format!("{}.{}.", enc(r#"{"alg":"RS256"}"#), enc("null")),
            format!("{}.{}.", enc(r#"{"alg":1}"#), enc("{}")),
            format!("{}.{}.", enc(r#"{"alg":"RS256","kid":5}"#), enc("{}")),
            format!(
                "{}.{}.",
                enc(r#"{"alg":"RS256","crit":["b64"]}"#),
                enc("{}")
            ),
            format!("{}.{}.%%", enc(r#"{"alg":"RS256"}"#), enc("{}")),
            format!("{}..x", enc(r#"{"alg":"RS256"}"#)),
        ];
        for c in cases {
            let e = peek(&c).unwrap_err();
            assert_eq!(e.reason_code(), "malformed_token", "{c:?}");
        }
    }

    #[test]
    fn duplicate_members_at_any_depth_are_malformed() {
        let header = enc(r#"{"alg":"RS256","kid":"k1"}"#);
        for (h, p) in [
            (header.clone(), enc(r#"{"iss":"a","sub":"x","iss":"b"}"#)),
            (header.clone(), enc(r#"{"iss":"a","n":{"r":"1","r":"2"}}"#)),
            (
                header.clone(),
                enc(r#"{"iss":"a","l":[{"r":"1","r":"1"}]}"#),
            ),
            (
                enc(r#"{"alg":"none","alg":"RS256"}"#),
                enc(r#"{"iss":"a"}"#),
            ),
        ] {
            let e = peek(&format!("{h}.{p}.sig")).unwrap_err();
            assert_eq!(e.reason_code(), "malformed_token", "{p}");
        }
        // Same name in different objects is fine; numbers and nulls come through unchanged.
        let ok = format!(
            "{header}.{}.sig",
            enc(r#"{"iss":"a","x":{"iss":1.5,"n":null,"b":true,"u":18446744073709551615}}"#)
        );
        assert_eq!(peek(&ok).unwrap().iss.as_deref(), Some("a"));
    }

    #[test]
    fn deep_nesting_is_refused_not_a_stack_overflow() {
        let deep = format!(
            r#"{{"iss":"a","x":{}1{}}}"#,
            "[".repeat(10_000),
            "]".repeat(10_000)
        );
        let t = format!("{}.{}.sig", enc(r#"{"alg":"RS256"}"#), enc(&deep));
        assert_eq!(peek(&t).unwrap_err().reason_code(), "malformed_token");
    }

    #[test]
    fn error_never_echoes_input() {
        let t = format!(
            "{}.{}.sig",
            enc(r#"{"alg":"RS256"}"#),
            "c2VjcmV0LXRva2VuLXZhbHVl!"
        );
        let e = peek(&t).unwrap_err();
        assert!(!e.to_string().contains("c2VjcmV0"));
    }
}

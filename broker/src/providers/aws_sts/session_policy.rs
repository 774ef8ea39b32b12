//! Inline session policies: a JSON document in the policy file whose string values may hold
//! `${claim}` placeholders (the same validated templates as API-token scopes).
//!
//! Invariants:
//! - The document is JSON by construction: placeholders are only allowed inside string values,
//!   values are substituted into the parsed tree and the tree is serialised by `serde_json`, so
//!   a claim can never close a string or add a statement (and template values are restricted to
//!   `[A-Za-z0-9._/:@+=-]` anyway).
//! - The rendered document is checked against AWS's plaintext limit before any call; the packed
//!   limit (which also counts session tags and depends on AWS's compression) is reported by STS
//!   as `PackedPolicyTooLarge` and surfaces as a misconfiguration, never as a silent drop.

use crate::oidc::VerifiedClaims;
use crate::providers::template::{RenderError, Template};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

/// Longest inline session policy AWS accepts, in characters of compact JSON.
pub const MAX_POLICY_CHARS: usize = 2048;
/// Most managed session policy ARNs one AssumeRole accepts.
pub const MAX_MANAGED_POLICIES: usize = 10;
/// Deepest nesting accepted in a session policy (policies are shallow; this bounds recursion).
const MAX_DEPTH: usize = 16;

/// Why a session policy was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionPolicyError {
    #[error("session_policy is not valid JSON")]
    NotJson,
    #[error("session_policy must be a JSON object")]
    NotObject,
    #[error("session_policy is nested too deeply")]
    TooDeep,
    #[error("session_policy: {0}")]
    Template(crate::providers::template::TemplateError),
    #[error("session_policy is {0} characters; AWS accepts at most {MAX_POLICY_CHARS}")]
    TooLarge(usize),
    #[error("session_policy: claim {0:?} is missing")]
    MissingClaim(String),
    #[error("session_policy: claim {0:?} has a value not allowed in a policy")]
    InvalidClaim(String),
}

impl SessionPolicyError {
    pub fn reason_code(&self) -> &'static str {
        match self {
            SessionPolicyError::NotJson => "session_policy_not_json",
            SessionPolicyError::NotObject => "session_policy_not_object",
            SessionPolicyError::TooDeep => "session_policy_too_deep",
            SessionPolicyError::Template(_) => "session_policy_bad_template",
            SessionPolicyError::TooLarge(_) => "session_policy_too_large",
            SessionPolicyError::MissingClaim(_) => "claim_missing",
            SessionPolicyError::InvalidClaim(_) => "invalid_claim_value",
        }
    }
}

/// A validated session policy template.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionPolicy {
    doc: Value,
}

fn check(v: &Value, depth: usize) -> Result<(), SessionPolicyError> {
    if depth > MAX_DEPTH {
        return Err(SessionPolicyError::TooDeep);
    }
    match v {
        Value::String(s) => Template::parse(s)
            .map(|_| ())
            .map_err(SessionPolicyError::Template),
        Value::Array(a) => a.iter().try_for_each(|x| check(x, depth + 1)),
        Value::Object(o) => o.values().try_for_each(|x| check(x, depth + 1)),
        _ => Ok(()),
    }
}

fn render_value(v: &Value, claims: &VerifiedClaims) -> Result<Value, SessionPolicyError> {
    Ok(match v {
        Value::String(s) => {
            let t = Template::parse(s).map_err(SessionPolicyError::Template)?;
            Value::String(t.render(claims).map_err(|e| match e {
                RenderError::Missing(c) => SessionPolicyError::MissingClaim(c),
                RenderError::Invalid(c) => SessionPolicyError::InvalidClaim(c),
            })?)
        }
        Value::Array(a) => Value::Array(
            a.iter()
                .map(|x| render_value(x, claims))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(o) => Value::Object(
            o.iter()
                .map(|(k, x)| Ok((k.clone(), render_value(x, claims)?)))
                .collect::<Result<_, SessionPolicyError>>()?,
        ),
        other => other.clone(),
    })
}

impl SessionPolicy {
    /// Validate a document (a JSON object, or a string holding one).
    pub fn from_value(v: Value) -> Result<Self, SessionPolicyError> {
        let doc = match v {
            Value::String(s) => {
                serde_json::from_str::<Value>(&s).map_err(|_| SessionPolicyError::NotJson)?
            }
            other => other,
        };
        if !doc.is_object() {
            return Err(SessionPolicyError::NotObject);
        }
        check(&doc, 0)?;
        // Placeholders only grow the document: a template already over the limit never fits.
        let len = compact_len(&doc);
        if len > MAX_POLICY_CHARS {
            return Err(SessionPolicyError::TooLarge(len));
        }
        Ok(Self { doc })
    }

    /// The compact JSON sent to STS, claims substituted and size checked.
    pub fn render(&self, claims: &VerifiedClaims) -> Result<String, SessionPolicyError> {
        let out = render_value(&self.doc, claims)?.to_string();
        let len = out.chars().count();
        if len > MAX_POLICY_CHARS {
            return Err(SessionPolicyError::TooLarge(len));
        }
        Ok(out)
    }
}

fn compact_len(v: &Value) -> usize {
    v.to_string().chars().count()
}

impl<'de> Deserialize<'de> for SessionPolicy {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = Value::deserialize(d)?;
        SessionPolicy::from_value(v).map_err(serde::de::Error::custom)
    }
}

impl Serialize for SessionPolicy {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.doc.serialize(s)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::oidc::{Platform, VerifiedClaims};
    use serde_json::json;
    use time::OffsetDateTime;

    pub(crate) fn claims(extra: Value) -> VerifiedClaims {
        VerifiedClaims {
            issuer: "github".into(),
            platform: Platform::Github,
            iss: "https://token.actions.githubusercontent.com".into(),
            sub: "repo:acme/api:ref:refs/heads/main".into(),
            jti: None,
            exp: OffsetDateTime::UNIX_EPOCH,
            iat: None,
            single_use: true,
            replay_until: OffsetDateTime::UNIX_EPOCH,
            claims: extra.as_object().cloned().unwrap_or_default(),
        }
    }

    fn s3_policy() -> Value {
        json!({
            "Version": "2012-10-17",
            "Statement": [{
                "Effect": "Allow",
                "Action": ["s3:GetObject"],
                "Resource": "arn:aws:s3:::artifacts/${repository}/*"
            }]
        })
    }

    #[test]
    fn renders_claims_into_string_values_only() {
        let p = SessionPolicy::from_value(s3_policy()).unwrap();
        let out = p
            .render(&claims(json!({"repository": "acme/api"})))
            .unwrap();
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(
            v["Statement"][0]["Resource"],
            "arn:aws:s3:::artifacts/acme/api/*"
        );
        assert!(!out.contains(' '), "compact: {out}");
    }

    #[test]
    fn hostile_claims_cannot_break_out_and_missing_claims_fail() {
        let p = SessionPolicy::from_value(s3_policy()).unwrap();
        let hostile = claims(json!({"repository": "x\"},{\"Effect\":\"Allow\",\"Action\":\"*"}));
        let e = p.render(&hostile).unwrap_err();
        assert_eq!(e.reason_code(), "invalid_claim_value");
        let e = p.render(&claims(json!({}))).unwrap_err();
        assert_eq!(e.reason_code(), "claim_missing");
    }

    #[test]
    fn accepts_a_json_string_and_refuses_bad_documents() {
        let ok = SessionPolicy::from_value(Value::String(s3_policy().to_string())).unwrap();
        assert_eq!(ok, SessionPolicy::from_value(s3_policy()).unwrap());
        let bad = [
            (json!("{not json"), "session_policy_not_json"),
            (json!([1, 2]), "session_policy_not_object"),
            (
                json!({"Resource": "${bad name}"}),
                "session_policy_bad_template",
            ),
            (
                json!({"Resource": "x".repeat(MAX_POLICY_CHARS)}),
                "session_policy_too_large",
            ),
        ];
        for (v, code) in bad {
            assert_eq!(
                SessionPolicy::from_value(v.clone())
                    .unwrap_err()
                    .reason_code(),
                code,
                "{v}"
            );
        }
        let mut deep = json!("x");
        for _ in 0..20 {
            deep = json!({ "a": deep });
        }
        assert_eq!(
            SessionPolicy::from_value(deep).unwrap_err().reason_code(),
            "session_policy_too_deep"
        );
    }

    #[test]
    fn rendering_rechecks_the_size() {
        // 2000 characters of template, then a 256-byte claim pushes it over.
        let pad = "a".repeat(MAX_POLICY_CHARS - 60);
        let p = SessionPolicy::from_value(json!({"S": format!("{pad}${{repository}}")})).unwrap();
        let long = "r".repeat(200);
        let e = p
            .render(&claims(json!({ "repository": long })))
            .unwrap_err();
        assert_eq!(e.reason_code(), "session_policy_too_large");
        assert!(p.render(&claims(json!({"repository": "r"}))).is_ok());
    }
}

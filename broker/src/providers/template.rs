//! String templates over verified claims, used for API-token scopes and subjects (and later for
//! other kinds' parameters).
//!
//! Syntax: literal text with `${claim}` placeholders, where `claim` is a top-level claim name
//! (`${repository}`, `${ref}`), or `${issuer}` / `${platform}`. Parsed once at policy load.
//!
//! Invariant: a substituted value is validated before use: it must be a string (or number) of at
//! most 256 bytes made of `[A-Za-z0-9._/:@+=-]`. Anything else fails the mint with
//! `invalid_claim_value`; claims are never spliced unchecked into a credential.

use crate::oidc::VerifiedClaims;
use serde_json::Value;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Lit(String),
    Claim(String),
}

/// A parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    source: String,
    parts: Vec<Part>,
}

/// Why a template did not render.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    #[error("claim {0:?} is missing")]
    Missing(String),
    #[error("claim {0:?} has a value that is not allowed in this template")]
    Invalid(String),
}

const MAX_VALUE: usize = 256;

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

fn valid_value(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= MAX_VALUE
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._/:@+=-".contains(&b))
}

/// Why a template does not parse; names the template and the problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("template {0:?}: unclosed ${{")]
    Unclosed(String),
    #[error("template {template:?}: bad placeholder name {name:?}")]
    BadName { template: String, name: String },
}

impl Template {
    /// Parse `source`; errors name the problem.
    pub fn parse(source: &str) -> Result<Self, TemplateError> {
        let mut parts = Vec::new();
        let mut rest = source;
        while let Some(start) = rest.find("${") {
            if start > 0 {
                parts.push(Part::Lit(rest[..start].to_owned()));
            }
            let after = &rest[start + 2..];
            let end = after
                .find('}')
                .ok_or_else(|| TemplateError::Unclosed(source.to_owned()))?;
            let name = &after[..end];
            if !valid_name(name) {
                return Err(TemplateError::BadName {
                    template: source.to_owned(),
                    name: name.to_owned(),
                });
            }
            parts.push(Part::Claim(name.to_owned()));
            rest = &after[end + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Lit(rest.to_owned()));
        }
        Ok(Self {
            source: source.to_owned(),
            parts,
        })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Claim names this template reads.
    pub fn claims(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            Part::Claim(c) => Some(c.as_str()),
            Part::Lit(_) => None,
        })
    }

    /// Whether some claims could render this template to exactly `s`: its literal parts
    /// appear in order and each placeholder stands for a value [`Template::render`] accepts.
    /// Used to select a credential by a requested scope before any token is verified; the
    /// rendered value decides what is issued.
    pub fn could_render(&self, s: &str) -> bool {
        fn matches(parts: &[Part], s: &str) -> bool {
            match parts.split_first() {
                None => s.is_empty(),
                Some((Part::Lit(l), rest)) => {
                    s.strip_prefix(l.as_str()).is_some_and(|r| matches(rest, r))
                }
                Some((Part::Claim(_), rest)) => (1..=s.len().min(MAX_VALUE))
                    .filter(|&n| s.is_char_boundary(n))
                    .take_while(|&n| valid_value(&s[..n]))
                    .any(|n| matches(rest, &s[n..])),
            }
        }
        matches(&self.parts, s)
    }

    /// Render over verified claims.
    pub fn render(&self, claims: &VerifiedClaims) -> Result<String, RenderError> {
        let mut out = String::new();
        for p in &self.parts {
            match p {
                Part::Lit(s) => out.push_str(s),
                Part::Claim(name) => {
                    let v = match name.as_str() {
                        "issuer" => claims.issuer.clone(),
                        "platform" => claims.platform.as_str().to_owned(),
                        _ => match claims.claims.get(name) {
                            Some(Value::String(s)) => s.clone(),
                            Some(Value::Number(n)) => n.to_string(),
                            Some(_) => return Err(RenderError::Invalid(name.clone())),
                            None => return Err(RenderError::Missing(name.clone())),
                        },
                    };
                    if !valid_value(&v) {
                        return Err(RenderError::Invalid(name.clone()));
                    }
                    out.push_str(&v);
                }
            }
        }
        Ok(out)
    }
}

impl<'de> serde::Deserialize<'de> for Template {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Template::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl serde::Serialize for Template {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn could_render_matches_literals_in_order_and_valid_values() {
        let t = Template::parse("deploy:${repository}").unwrap();
        assert!(t.could_render("deploy:acme/api"));
        assert!(!t.could_render("deploy:"), "a placeholder is never empty");
        assert!(!t.could_render("release:acme/api"));
        assert!(
            !t.could_render("deploy:acme api"),
            "space is not a valid value"
        );
        let t = Template::parse("${a}-${b}:x").unwrap();
        assert!(t.could_render("p-q-r:x"));
        assert!(!t.could_render("pq:x"));
        let plain = Template::parse("read").unwrap();
        assert!(plain.could_render("read"));
        assert!(!plain.could_render("read2"));
        assert!(
            !Template::parse("${a}")
                .unwrap()
                .could_render(&"x".repeat(257))
        );
    }
    use crate::oidc::Platform;
    use time::OffsetDateTime;

    fn claims(v: Value) -> VerifiedClaims {
        VerifiedClaims {
            issuer: "github".into(),
            platform: Platform::Github,
            iss: "https://x".into(),
            sub: "s".into(),
            jti: None,
            exp: OffsetDateTime::UNIX_EPOCH,
            iat: None,
            single_use: true,
            replay_until: OffsetDateTime::UNIX_EPOCH,
            claims: v.as_object().cloned().unwrap_or_default(),
        }
    }

    #[test]
    fn renders_claims_and_literals() {
        let t = Template::parse("deploy:${repository}@${ref}").unwrap();
        let c = claims(serde_json::json!({"repository": "acme/api", "ref": "refs/heads/main"}));
        assert_eq!(t.render(&c).unwrap(), "deploy:acme/api@refs/heads/main");
        assert_eq!(t.claims().collect::<Vec<_>>(), vec!["repository", "ref"]);
    }

    #[test]
    fn refuses_hostile_values_and_bad_templates() {
        let t = Template::parse("repo:${repository}").unwrap();
        let c = claims(serde_json::json!({"repository": "acme/api\"; drop"}));
        assert_eq!(t.render(&c), Err(RenderError::Invalid("repository".into())));
        let c = claims(serde_json::json!({}));
        assert_eq!(t.render(&c), Err(RenderError::Missing("repository".into())));
        assert!(Template::parse("x${").is_err());
        assert!(Template::parse("${a b}").is_err());
    }
}

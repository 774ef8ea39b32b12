//! API-token provider: the broker signs a short-lived JWT (EdDSA / Ed25519) for a downstream
//! service, publishes its public keys at `/.well-known/jwks.json`, and answers RFC 7662
//! introspection with `active: false` once the grant is revoked or expired.
//!
//! Recognisable tokens: every token's JOSE header starts with `{"typ":"broker-at+jwt",`, so its
//! first 30 base64url characters are always `eyJ0eXAiOiJicm9rZXItYXQrand0Ii` (a secret scanner
//! can match that prefix). The token's `jti` is the grant credential's resource id; the store
//! keeps only that id, never the token.
//!
//! Key rotation: one active key signs; retired keys stay published (and accepted by
//! introspection) until every token they signed has expired; then they are removed from config.

use super::template::Template;
use super::{
    CredentialDef, CredentialKind, CredentialSpec, Field, IssuedCredential, MintRequest, Minted,
    Provider, ProviderError,
};
use crate::secret::Sensitive;
use async_trait::async_trait;
use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};
use base64::Engine;
use jsonwebtoken::{Algorithm, DecodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::fmt;
use std::sync::Arc;
use time::OffsetDateTime;
use uuid::Uuid;

/// `typ` header of every token we mint.
pub const TOKEN_TYPE: &str = "broker-at+jwt";

/// `api_token:` parameters of a credential definition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiTokenSpec {
    /// `aud` of the minted token: the service that will accept it.
    pub audience: String,
    /// `scope` entries, templated over claims (`deploy:${repository}`).
    #[serde(default)]
    pub scopes: Vec<Template>,
    /// `sub` of the minted token; defaults to the job token's `sub`.
    #[serde(default)]
    pub subject: Option<Template>,
    /// `jwt` (the default): a signed JWT a service may verify offline with the JWKS. `opaque`:
    /// a random reference token `brk_at_…` (see `secret_format`) that only introspection
    /// resolves, from its hash in the store.
    #[serde(default, skip_serializing_if = "TokenFormat::is_jwt")]
    pub format: TokenFormat,
}

/// How an API token is built (`api_token.format` in a credential definition).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenFormat {
    #[default]
    Jwt,
    Opaque,
}

impl TokenFormat {
    fn is_jwt(&self) -> bool {
        *self == TokenFormat::Jwt
    }
}

/// Errors loading signing keys.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("signing key is not an Ed25519 PKCS#8 key (PEM \"PRIVATE KEY\")")]
    BadKey,
    #[error("could not read signing key file {path}: {reason}")]
    Io { path: String, reason: String },
    #[error("signing failed")]
    Sign,
}

struct KeyEntry {
    kid: String,
    /// The private key, parsed once. (`jsonwebtoken::encode` takes an `EncodingKey` and builds a
    /// new signer from it on every call: parsing the PKCS#8 document and deriving the public
    /// key, a scalar multiplication as costly as the signature itself. That was 5 % of the
    /// broker's CPU under load, so tokens are signed here with this key pair instead.)
    pair: Ed25519KeyPair,
    decoding: DecodingKey,
    jwk: Value,
}

impl KeyEntry {
    fn from_pkcs8(der: &[u8]) -> Result<Self, KeyError> {
        let pair = Ed25519KeyPair::from_pkcs8(der).map_err(|_| KeyError::BadKey)?;
        let public = pair.public_key().as_ref().to_vec();
        let kid = crate::secret::sha256_hex(&public)[..16].to_owned();
        let x = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&public);
        let decoding = DecodingKey::from_ed_components(&x).map_err(|_| KeyError::BadKey)?;
        Ok(Self {
            jwk: json!({"kty": "OKP", "crv": "Ed25519", "x": x, "kid": kid, "alg": "EdDSA", "use": "sig"}),
            kid,
            pair,
            decoding,
        })
    }

    /// A compact JWS (RFC 7515): `b64url(header) . b64url(claims) . b64url(Ed25519 signature)`,
    /// with an EdDSA header naming this key.
    fn sign_jwt<T: Serialize>(&self, typ: &str, claims: &T) -> Result<String, KeyError> {
        let mut header = Header::new(Algorithm::EdDSA);
        header.typ = Some(typ.to_owned());
        header.kid = Some(self.kid.clone());
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let part = |v: Result<Vec<u8>, serde_json::Error>| v.map(|b| b64.encode(b));
        let mut jws = part(serde_json::to_vec(&header)).map_err(|_| KeyError::Sign)?;
        jws.push('.');
        jws.push_str(&part(serde_json::to_vec(claims)).map_err(|_| KeyError::Sign)?);
        let signature = self.pair.sign(jws.as_bytes());
        jws.push('.');
        jws.push_str(&b64.encode(signature.as_ref()));
        Ok(jws)
    }
}

/// The broker's API-token signing keys: one active, any number retired (verify-only).
pub struct SigningKeys {
    active: KeyEntry,
    retired: Vec<KeyEntry>,
}

impl fmt::Debug for SigningKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKeys")
            .field("active_kid", &self.active.kid)
            .field(
                "retired",
                &self.retired.iter().map(|k| &k.kid).collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// A new Ed25519 key as PKCS#8 PEM (for `broker keygen` and dev mode).
pub fn generate_pem() -> Result<Sensitive, KeyError> {
    let doc = Ed25519KeyPair::generate_pkcs8(&aws_lc_rs::rand::SystemRandom::new())
        .map_err(|_| KeyError::BadKey)?;
    let b64 = base64::engine::general_purpose::STANDARD.encode(doc.as_ref());
    let mut pem = String::from("-----BEGIN PRIVATE KEY-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(chunk));
        pem.push('\n');
    }
    pem.push_str("-----END PRIVATE KEY-----\n");
    Ok(Sensitive::new(pem))
}

fn pem_to_der(pem: &str) -> Result<Vec<u8>, KeyError> {
    let body: String = pem
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with("-----") && !l.is_empty())
        .collect();
    if !pem.contains("BEGIN PRIVATE KEY") {
        return Err(KeyError::BadKey);
    }
    base64::engine::general_purpose::STANDARD
        .decode(body)
        .map_err(|_| KeyError::BadKey)
}

impl SigningKeys {
    /// From PKCS#8 PEM texts: the active key and the retired ones.
    pub fn from_pems(active: &Sensitive, retired: &[Sensitive]) -> Result<Self, KeyError> {
        Ok(Self {
            active: KeyEntry::from_pkcs8(&pem_to_der(active.expose())?)?,
            retired: retired
                .iter()
                .map(|p| KeyEntry::from_pkcs8(&pem_to_der(p.expose())?))
                .collect::<Result<_, _>>()?,
        })
    }

    /// A fresh in-memory key (dev mode, tests). Tokens die with the process's key.
    pub fn ephemeral() -> Result<Self, KeyError> {
        Self::from_pems(&generate_pem()?, &[])
    }

    pub fn active_kid(&self) -> &str {
        &self.active.kid
    }

    /// The JWKS document (active key first).
    pub fn jwks(&self) -> Value {
        let keys: Vec<&Value> = std::iter::once(&self.active)
            .chain(self.retired.iter())
            .map(|k| &k.jwk)
            .collect();
        json!({ "keys": keys })
    }

    /// Sign `claims` as a JWT (EdDSA, active key) whose header `typ` names the document, for
    /// documents other than API tokens (e.g. audit checkpoints). The `typ` keeps one kind of
    /// document from being accepted as another.
    pub fn sign_document<T: Serialize>(&self, typ: &str, claims: &T) -> Result<String, KeyError> {
        self.active.sign_jwt(typ, claims)
    }

    /// Check a document from [`SigningKeys::sign_document`] against any of these keys: EdDSA,
    /// the given `typ`, a known `kid`, a valid signature. Documents do not expire.
    pub fn verify_document<T: serde::de::DeserializeOwned>(
        &self,
        typ: &str,
        token: &str,
    ) -> Result<T, TokenCheckError> {
        let header = document_header(typ, token)?;
        let key = header
            .kid
            .as_deref()
            .and_then(|kid| self.find(kid))
            .ok_or(TokenCheckError::NotOurs)?;
        decode_document(token, &key.decoding)
    }

    fn find(&self, kid: &str) -> Option<&KeyEntry> {
        std::iter::once(&self.active)
            .chain(self.retired.iter())
            .find(|k| k.kid == kid)
    }
}

fn document_header(typ: &str, token: &str) -> Result<Header, TokenCheckError> {
    let header = jsonwebtoken::decode_header(token).map_err(|_| TokenCheckError::NotOurs)?;
    if header.alg != Algorithm::EdDSA || header.typ.as_deref() != Some(typ) {
        return Err(TokenCheckError::NotOurs);
    }
    Ok(header)
}

fn decode_document<T: serde::de::DeserializeOwned>(
    token: &str,
    key: &DecodingKey,
) -> Result<T, TokenCheckError> {
    let mut v = Validation::new(Algorithm::EdDSA);
    v.validate_aud = false;
    v.validate_exp = false;
    v.validate_nbf = false;
    v.required_spec_claims.clear();
    jsonwebtoken::decode::<T>(token, key, &v)
        .map(|d| d.claims)
        .map_err(|_| TokenCheckError::NotOurs)
}

/// [`SigningKeys::verify_document`] against a published JWKS (`/.well-known/jwks.json`), for
/// checking without the private keys. Only Ed25519 keys are considered.
pub fn verify_document_with_jwks<T: serde::de::DeserializeOwned>(
    jwks: &Value,
    typ: &str,
    token: &str,
) -> Result<T, TokenCheckError> {
    let header = document_header(typ, token)?;
    let kid = header.kid.as_deref().ok_or(TokenCheckError::NotOurs)?;
    let x = jwks
        .get("keys")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .find(|k| {
            k.get("kid").and_then(Value::as_str) == Some(kid)
                && k.get("kty").and_then(Value::as_str) == Some("OKP")
                && k.get("crv").and_then(Value::as_str) == Some("Ed25519")
        })
        .and_then(|k| k.get("x").and_then(Value::as_str))
        .ok_or(TokenCheckError::NotOurs)?;
    let key = DecodingKey::from_ed_components(x).map_err(|_| TokenCheckError::NotOurs)?;
    decode_document(token, &key)
}

/// Claims of a token we mint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApiTokenClaims {
    pub iss: String,
    pub sub: String,
    pub aud: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub scope: String,
    pub exp: i64,
    pub iat: i64,
    pub nbf: i64,
    /// The credential's resource id (`<grant id>.<credential name>`).
    pub jti: String,
    /// Grant id.
    pub gid: String,
    /// Job attribution (non-secret claims of the job token).
    #[serde(default)]
    pub job: Value,
}

/// Why a presented API token is not ours or not valid.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenCheckError {
    #[error("not a token issued by this broker")]
    NotOurs,
    #[error("token expired")]
    Expired,
}

/// An opaque API token: random, recognisable (`brk_at_…`), resolved only by introspection.
/// What introspection answers (the claims a JWT would carry) is kept with the grant as the
/// credential's details, with the token's SHA-256 to find it by; the token itself is not kept.
fn mint_opaque(claims: ApiTokenClaims, expires_at: OffsetDateTime) -> Minted {
    let token = crate::secret_format::generate(crate::secret_format::SecretKind::ApiToken);
    let mut details = serde_json::to_value(&claims).unwrap_or(Value::Null);
    if let Value::Object(m) = &mut details {
        m.insert("format".into(), json!("opaque"));
        m.insert(
            super::SECRET_HASH_KEY.into(),
            json!(crate::secret::sha256_hex(token.expose().as_bytes())),
        );
    }
    Minted {
        fields: vec![
            ("token".into(), Field::Secret(token)),
            ("token_type".into(), Field::Public(json!("Bearer"))),
            ("audience".into(), Field::Public(json!(claims.aud))),
            ("scope".into(), Field::Public(json!(claims.scope))),
            ("token_id".into(), Field::Public(json!(claims.jti))),
        ],
        expires_at,
        details,
    }
}

/// The claims kept with an opaque token's grant (from [`mint_opaque`]'s details), for
/// introspection.
pub fn opaque_claims(details: &Value) -> Option<ApiTokenClaims> {
    if details.get("format").and_then(Value::as_str) != Some("opaque") {
        return None;
    }
    serde_json::from_value(details.clone()).ok()
}

/// The API-token provider.
pub struct ApiTokenProvider {
    keys: Arc<SigningKeys>,
    /// `iss` of minted tokens: the broker's public URL.
    issuer: String,
}

impl fmt::Debug for ApiTokenProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiTokenProvider")
            .field("issuer", &self.issuer)
            .field("keys", &self.keys)
            .finish()
    }
}

/// Attribution claims copied from the job token into minted tokens (never secrets).
const ATTRIBUTION: &[&str] = &[
    "repository",
    "repository_id",
    "repository_owner",
    "project_path",
    "project_id",
    "namespace_path",
    "ref",
    "sha",
    "workflow",
    "run_id",
    "run_attempt",
    "pipeline_id",
    "job_id",
    "environment",
    "actor",
];

impl ApiTokenProvider {
    pub fn new(keys: Arc<SigningKeys>, issuer: String) -> Self {
        Self { keys, issuer }
    }

    /// The broker's own issuer (its public URL), the `iss` of the tokens it signs.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    pub fn keys(&self) -> &SigningKeys {
        &self.keys
    }

    /// Check a presented token's signature (any published key), issuer and expiry against
    /// `now`. Revocation is checked by the caller against the store.
    pub fn check(
        &self,
        token: &str,
        now: OffsetDateTime,
    ) -> Result<ApiTokenClaims, TokenCheckError> {
        let claims = self.check_signature(token)?;
        if claims.exp <= now.unix_timestamp() {
            return Err(TokenCheckError::Expired);
        }
        Ok(claims)
    }

    /// A presented token's signature (any published key) and issuer, whatever its expiry: a
    /// leak report names the grant of an expired token too.
    pub fn check_signature(&self, token: &str) -> Result<ApiTokenClaims, TokenCheckError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenCheckError::NotOurs)?;
        if header.alg != Algorithm::EdDSA || header.typ.as_deref() != Some(TOKEN_TYPE) {
            return Err(TokenCheckError::NotOurs);
        }
        let key = header
            .kid
            .as_deref()
            .and_then(|kid| self.keys.find(kid))
            .ok_or(TokenCheckError::NotOurs)?;
        let mut v = Validation::new(Algorithm::EdDSA);
        v.set_issuer(&[&self.issuer]);
        v.validate_aud = false; // introspection answers for any audience of ours
        v.validate_exp = false; // checked below against the injected clock
        v.validate_nbf = false;
        v.set_required_spec_claims(&["exp", "iss", "jti"]);
        let data = jsonwebtoken::decode::<ApiTokenClaims>(token, &key.decoding, &v)
            .map_err(|_| TokenCheckError::NotOurs)?;
        Ok(data.claims)
    }
}

#[async_trait]
impl Provider for ApiTokenProvider {
    fn kind(&self) -> CredentialKind {
        CredentialKind::ApiToken
    }

    /// A signed JWT: nothing exists outside this process until the response is sent, and its
    /// validity at introspection is the grant's status in the store.
    fn mints_in_memory(&self) -> bool {
        true
    }

    /// Introspection answers from the grant's status, so a revoked grant is a revoked token.
    fn revoked_in_store(&self) -> bool {
        true
    }

    fn resource_id(&self, grant_id: Uuid, credential: &CredentialDef) -> String {
        format!("{}.{}", grant_id.simple(), credential.name)
    }

    async fn mint(&self, req: MintRequest<'_>) -> Result<Minted, ProviderError> {
        let CredentialSpec::ApiToken(spec) = &req.credential.spec else {
            return Err(ProviderError::Misconfigured(
                "not an api_token credential".into(),
            ));
        };
        let render = |t: &Template| {
            t.render(req.claims)
                .map_err(|e| ProviderError::InvalidClaim(e.to_string()))
        };
        let scopes = spec
            .scopes
            .iter()
            .map(render)
            .collect::<Result<Vec<_>, _>>()?;
        let sub = match &spec.subject {
            Some(t) => render(t)?,
            None => req.claims.sub.clone(),
        };
        let job: serde_json::Map<String, Value> = ATTRIBUTION
            .iter()
            .filter_map(|k| {
                req.claims
                    .claims
                    .get(*k)
                    .map(|v| ((*k).to_owned(), v.clone()))
            })
            .filter(|(_, v)| v.is_string() || v.is_number())
            .collect();
        let claims = ApiTokenClaims {
            iss: self.issuer.clone(),
            sub,
            aud: spec.audience.clone(),
            scope: scopes.join(" "),
            exp: req.expires_at.unix_timestamp(),
            iat: req.now.unix_timestamp(),
            nbf: req.now.unix_timestamp(),
            jti: req.resource_id.to_owned(),
            gid: req.grant_id.to_string(),
            job: Value::Object(job),
        };
        if spec.format == TokenFormat::Opaque {
            return Ok(mint_opaque(claims, req.expires_at));
        }
        let token = self
            .keys
            .active
            .sign_jwt(TOKEN_TYPE, &claims)
            .map_err(|e| ProviderError::Internal(e.to_string()))?;
        Ok(Minted {
            fields: vec![
                ("token".into(), Field::Secret(Sensitive::new(token))),
                ("token_type".into(), Field::Public(json!("Bearer"))),
                ("audience".into(), Field::Public(json!(claims.aud))),
                ("scope".into(), Field::Public(json!(claims.scope))),
                ("token_id".into(), Field::Public(json!(claims.jti))),
            ],
            expires_at: req.expires_at,
            details: json!({"audience": claims.aud, "scope": claims.scope, "kid": self.keys.active.kid}),
        })
    }

    /// Revocation of an API token is the grant's status in the store (introspection answers
    /// `active: false`); there is nothing to delete elsewhere.
    async fn revoke(&self, _credential: &IssuedCredential) -> Result<(), ProviderError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oidc::{Platform, VerifiedClaims};

    fn def() -> CredentialDef {
        CredentialDef {
            name: "deploy-api".into(),
            description: None,
            max_ttl: time::Duration::minutes(15),
            spec: CredentialSpec::ApiToken(ApiTokenSpec {
                audience: "https://deploy.example".into(),
                scopes: vec![Template::parse("deploy:${repository}").unwrap()],
                subject: None,
                format: TokenFormat::Jwt,
            }),
        }
    }

    fn claims(repo: &str) -> VerifiedClaims {
        VerifiedClaims {
            issuer: "github".into(),
            platform: Platform::Github,
            iss: "https://token.actions.githubusercontent.com".into(),
            sub: "repo:acme/api:ref:refs/heads/main".into(),
            jti: Some("j".into()),
            exp: OffsetDateTime::from_unix_timestamp(2_000_000_000).unwrap(),
            iat: None,
            single_use: true,
            replay_until: OffsetDateTime::from_unix_timestamp(2_000_000_000).unwrap(),
            claims: json!({"repository": repo, "repository_id": "1", "secret_looking": "x"})
                .as_object()
                .cloned()
                .unwrap(),
        }
    }

    #[tokio::test]
    async fn minted_token_checks_and_expires() {
        let p = ApiTokenProvider::new(
            Arc::new(SigningKeys::ephemeral().unwrap()),
            "https://broker.test".into(),
        );
        let now = OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
        let d = def();
        let gid = Uuid::now_v7();
        let rid = p.resource_id(gid, &d);
        let c = claims("acme/api");
        let m = p
            .mint(MintRequest {
                grant_id: gid,
                credential: &d,
                resource_id: &rid,
                claims: &c,
                now,
                expires_at: now + time::Duration::minutes(10),
            })
            .await
            .unwrap();
        let Field::Secret(tok) = &m.fields[0].1 else {
            panic!("token must be secret")
        };
        assert!(tok.expose().starts_with("eyJ0eXAiOiJicm9rZXItYXQrand0Ii"));
        let got = p.check(tok.expose(), now).unwrap();
        assert_eq!(got.jti, rid);
        assert_eq!(got.scope, "deploy:acme/api");
        assert_eq!(got.aud, "https://deploy.example");
        assert!(got.job.get("secret_looking").is_none());
        assert_eq!(
            p.check(tok.expose(), now + time::Duration::minutes(11)),
            Err(TokenCheckError::Expired)
        );
        // Another broker's key: not ours.
        let other = ApiTokenProvider::new(
            Arc::new(SigningKeys::ephemeral().unwrap()),
            "https://broker.test".into(),
        );
        assert_eq!(
            other.check(tok.expose(), now),
            Err(TokenCheckError::NotOurs)
        );
        assert_eq!(p.check("garbage", now), Err(TokenCheckError::NotOurs));
        // Debug never shows key material.
        assert!(!format!("{p:?}").contains("PRIVATE"));
    }

    #[tokio::test]
    async fn hostile_claim_fails_mint() {
        let p = ApiTokenProvider::new(
            Arc::new(SigningKeys::ephemeral().unwrap()),
            "https://b".into(),
        );
        let now = OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
        let d = def();
        let c = claims("acme/api\" or 1=1");
        let err = p
            .mint(MintRequest {
                grant_id: Uuid::now_v7(),
                credential: &d,
                resource_id: "r",
                claims: &c,
                now,
                expires_at: now,
            })
            .await
            .unwrap_err();
        assert_eq!(err.reason_code(), "invalid_claim_value");
    }

    #[test]
    fn retired_keys_stay_published_and_verifiable() {
        let old = generate_pem().unwrap();
        let new = generate_pem().unwrap();
        let keys = SigningKeys::from_pems(&new, std::slice::from_ref(&old)).unwrap();
        assert_eq!(keys.jwks()["keys"].as_array().unwrap().len(), 2);
        assert!(SigningKeys::from_pems(&Sensitive::new("nope"), &[]).is_err());
    }
}

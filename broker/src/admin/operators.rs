//! Operator authentication: bearer tokens kept in the config only as SHA-256 hashes, each with a
//! role; or, for break-glass through a reviewed pipeline, an OIDC rule: a CI job token from a
//! configured issuer whose verified claims satisfy a CEL rule (e.g. one workflow on the main
//! branch of a security repository).
//!
//! Invariants:
//! - A job token is never accepted on an operator endpoint unless an OIDC operator rule names
//!   its issuer and its verified claims satisfy that rule. Operator tokens carry the `brk_op_`
//!   prefix, so a JWT never matches a hash entry.
//! - Hash comparison runs over every configured hash in constant time (`subtle`), so timing
//!   reveals neither which operator matched nor how much of a hash did.
//! - OIDC rules go through the same verifier (configured issuer, pinned algorithms, audience,
//!   times) and the same CEL compile path (bounded, compiled once at start) as exchanges; a rule
//!   that errors does not match (fail closed).

use crate::oidc::{IssuerConfig, Verifier, VerifierOptions};
use crate::policy::expr::{self, Activation, ClaimsUsed, CompiledExpr, RegexTable};
use crate::secret::{Sensitive, sha256_hex};
use crate::store::JtiRecord;
use crate::time::SharedClock;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use subtle::ConstantTimeEq;

/// Prefix of operator tokens (so secret scanners can find leaked ones).
pub const OPERATOR_PREFIX: &str = "brk_op_";

/// What an operator may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Break glass: revoke-all, freeze, unfreeze; and everything an auditor may do.
    Admin,
    /// Read-only: freeze status (and audit queries).
    Auditor,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Auditor => "auditor",
        }
    }
    /// Whether this role includes `needed`.
    pub fn allows(self, needed: Role) -> bool {
        self == Role::Admin || self == needed
    }
}

/// One entry of the config's `operators:` list: exactly one of `token_sha256` and `oidc`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperatorConfig {
    /// Audited as `operator:<name>`.
    pub name: String,
    pub role: Role,
    /// Lowercase hex SHA-256 of the operator's token (`broker operator-token` prints both).
    #[serde(default)]
    pub token_sha256: Option<String>,
    /// Or: a CI job token matching this rule authenticates as this operator.
    #[serde(default)]
    pub oidc: Option<OidcOperatorConfig>,
}

/// `operators[].oidc`: which job tokens act as this operator.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OidcOperatorConfig {
    /// A configured issuer name (`issuers[].name`).
    pub issuer: String,
    /// The audience the token must carry; default: the broker's `audience`. A distinct one
    /// (e.g. `<audience>/admin`) keeps exchange tokens and operator tokens apart.
    #[serde(default)]
    pub audience: Option<String>,
    /// CEL over the verified claims, as in a policy rule's `when` (`claims`, `issuer`,
    /// `platform`), e.g. `claims.repository_id == "123" && claims.ref == "refs/heads/main"`.
    pub rule: String,
}

/// An authenticated operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operator {
    pub name: String,
    pub role: Role,
    /// For an OIDC operator: the job token's verified `sub`.
    pub subject: Option<String>,
}

impl Operator {
    /// The audit `actor`: `operator:<name>`, or `operator:<name> (<sub>)` for an OIDC
    /// operator, so every event it causes names the job that acted.
    pub fn actor(&self) -> String {
        match &self.subject {
            None => format!("operator:{}", self.name),
            Some(sub) => format!("operator:{} ({sub})", self.name),
        }
    }
}

/// One OIDC operator rule, ready to check tokens.
struct OidcOperator {
    name: String,
    role: Role,
    verifier: Verifier,
    env: Arc<cel::Env>,
    regexes: Arc<RegexTable>,
    claims_used: ClaimsUsed,
    rule: CompiledExpr,
}

impl std::fmt::Debug for OidcOperator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OidcOperator")
            .field("name", &self.name)
            .field("role", &self.role)
            .field("rule", &self.rule.source())
            .finish_non_exhaustive()
    }
}

/// The configured operators.
#[derive(Debug, Clone, Default)]
pub struct Operators {
    list: Vec<(Operator, [u8; 32])>,
    oidc: Vec<Arc<OidcOperator>>,
}

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'@'))
}

fn parse_hash(h: &str) -> Option<[u8; 32]> {
    if h.len() != 64 || h.bytes().any(|b| b.is_ascii_uppercase()) {
        return None;
    }
    hex::decode(h).ok()?.try_into().ok()
}

/// Every problem with the `operators:` list, each naming its key (never a hash's value).
pub fn validate(ops: &[OperatorConfig]) -> Vec<String> {
    let mut p = Vec::new();
    let mut names = std::collections::BTreeSet::new();
    let mut hashes = std::collections::BTreeSet::new();
    for (i, o) in ops.iter().enumerate() {
        if !valid_name(&o.name) {
            p.push(format!(
                "operators[{i}].name: 1-64 characters of letters, digits, - _ . @"
            ));
        }
        if !names.insert(o.name.clone()) {
            p.push(format!("operators[{i}].name: duplicate {:?}", o.name));
        }
        match (&o.token_sha256, &o.oidc) {
            (Some(h), None) => {
                if parse_hash(h).is_none() {
                    p.push(format!(
                        "operators[{i}].token_sha256: expected 64 lowercase hex characters (the \
                         token's SHA-256, not the token)"
                    ));
                } else if !hashes.insert(h.clone()) {
                    p.push(format!(
                        "operators[{i}].token_sha256: the same token is configured twice"
                    ));
                }
            }
            (None, Some(rule)) => {
                if rule.rule.trim().is_empty() {
                    p.push(format!("operators[{i}].oidc.rule: required"));
                } else if let Err(e) =
                    expr::compile(&expr::new_env(), &rule.rule, &mut RegexTable::default())
                {
                    p.push(format!("operators[{i}].oidc.rule: {e}"));
                }
                if rule
                    .audience
                    .as_deref()
                    .is_some_and(|a| a.trim().is_empty())
                {
                    p.push(format!("operators[{i}].oidc.audience: empty"));
                }
            }
            _ => p.push(format!(
                "operators[{i}]: give exactly one of token_sha256 and oidc"
            )),
        }
    }
    p
}

/// Every problem with the OIDC operators' issuers (needs the issuer list).
pub fn validate_issuers(ops: &[OperatorConfig], issuers: &[IssuerConfig]) -> Vec<String> {
    ops.iter()
        .enumerate()
        .filter_map(|(i, o)| {
            let rule = o.oidc.as_ref()?;
            (!issuers.iter().any(|c| c.name == rule.issuer)).then(|| {
                format!(
                    "operators[{i}].oidc.issuer: {:?} is not a configured issuer",
                    rule.issuer
                )
            })
        })
        .collect()
}

/// Why the configured operators cannot be used; names the entry (`operators[i]…`), never a
/// token or hash.
#[derive(Debug, thiserror::Error)]
pub enum OperatorsError {
    #[error("OIDC operators need the issuer configuration")]
    OidcNeedsIssuers,
    /// Every problem `validate` and `validate_issuers` found.
    #[error("{}", .0.join("; "))]
    Invalid(Vec<String>),
    #[error("operators[{index}].oidc: {source}")]
    Verifier {
        index: usize,
        source: crate::oidc::VerifyConfigError,
    },
    #[error("operators[{index}].oidc.rule: {source}")]
    Rule {
        index: usize,
        source: expr::ExprError,
    },
}

impl Operators {
    /// From validated config with token hashes only; an invalid entry (or an OIDC one: use
    /// [`Self::from_config_with_oidc`]) is an error naming it.
    pub fn from_config(ops: &[OperatorConfig]) -> Result<Self, OperatorsError> {
        if ops.iter().any(|o| o.oidc.is_some()) {
            return Err(OperatorsError::OidcNeedsIssuers);
        }
        Self::from_config_with_oidc(ops, &[], "-", Arc::new(crate::time::SystemClock))
    }

    /// From validated config; OIDC rules get a verifier for their issuer (with the rule's
    /// audience, else `audience`) and their CEL compiled once.
    pub fn from_config_with_oidc(
        ops: &[OperatorConfig],
        issuers: &[IssuerConfig],
        audience: &str,
        clock: SharedClock,
    ) -> Result<Self, OperatorsError> {
        let mut problems = validate(ops);
        problems.extend(validate_issuers(ops, issuers));
        if !problems.is_empty() {
            return Err(OperatorsError::Invalid(problems));
        }
        let mut list = Vec::new();
        let mut oidc = Vec::new();
        for (i, o) in ops.iter().enumerate() {
            if let Some(h) = o.token_sha256.as_deref().and_then(parse_hash) {
                let op = Operator {
                    name: o.name.clone(),
                    role: o.role,
                    subject: None,
                };
                list.push((op, h));
            }
            let Some(rule) = &o.oidc else { continue };
            let Some(mut issuer) = issuers.iter().find(|c| c.name == rule.issuer).cloned() else {
                continue;
            };
            if let Some(a) = &rule.audience {
                issuer.audience = Some(a.clone());
            }
            let verifier = Verifier::new(
                audience.to_owned(),
                vec![issuer],
                clock.clone(),
                VerifierOptions::default(),
            )
            .map_err(|source| OperatorsError::Verifier { index: i, source })?;
            let env = Arc::new(expr::new_env());
            let mut regexes = RegexTable::default();
            let compiled = expr::compile(&env, &rule.rule, &mut regexes)
                .map_err(|source| OperatorsError::Rule { index: i, source })?;
            oidc.push(Arc::new(OidcOperator {
                name: o.name.clone(),
                role: o.role,
                verifier,
                env,
                regexes: Arc::new(regexes),
                claims_used: ClaimsUsed::of([&compiled]),
                rule: compiled,
            }));
        }
        Ok(Self { list, oidc })
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty() && self.oidc.is_empty()
    }

    /// The operator this bearer token belongs to: an operator token by hash, else a job token
    /// that verifies for an OIDC operator's issuer and satisfies its rule (first in config
    /// order), with the token's replay record when its issuer makes tokens single-use (the
    /// caller must record it before acting). Anything else, including a valid job token
    /// matching no rule: `None`.
    pub async fn authenticate_any(
        &self,
        token: &Sensitive,
    ) -> Option<(Operator, Option<JtiRecord>)> {
        if token.expose().starts_with(OPERATOR_PREFIX) {
            return self.authenticate(token).map(|op| (op, None));
        }
        for o in &self.oidc {
            let Ok(claims) = o.verifier.verify(token.expose()).await else {
                continue;
            };
            if expr::check_claims(&claims.claims).is_err() {
                continue;
            }
            let Ok(act) = Activation::new(
                &o.env,
                &o.regexes,
                &claims.claims,
                &o.claims_used,
                &claims.issuer,
                claims.platform.as_str(),
            ) else {
                continue;
            };
            // An evaluation error is not a match (fail closed).
            if act.eval(&o.rule) == Ok(true) {
                let jti = match (&claims.jti, claims.single_use) {
                    (Some(j), true) => Some(JtiRecord {
                        iss: claims.iss.clone(),
                        jti: j.clone(),
                        expires_at: claims.replay_until,
                    }),
                    _ => None,
                };
                let op = Operator {
                    name: o.name.clone(),
                    role: o.role,
                    subject: Some(claims.sub.chars().take(256).collect()),
                };
                return Some((op, jti));
            }
        }
        None
    }

    /// The operator this token belongs to, if any.
    pub fn authenticate(&self, token: &Sensitive) -> Option<Operator> {
        let t = token.expose();
        if crate::secret_format::check(t, crate::secret_format::SecretKind::Operator).is_err() {
            return None;
        }
        let digest = parse_hash(&sha256_hex(t.as_bytes()))?;
        let mut found = None;
        // No early exit: every hash is compared whatever matched.
        for (op, hash) in &self.list {
            // (hash operators only; OIDC operators are checked in `authenticate_any`)
            if bool::from(hash.ct_eq(&digest)) {
                found = Some(op.clone());
            }
        }
        found
    }
}

/// A new operator token and the hash to put in the config.
pub fn new_token() -> (Sensitive, String) {
    let token = crate::secret_format::generate(crate::secret_format::SecretKind::Operator);
    let hash = sha256_hex(token.expose().as_bytes());
    (token, hash)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(name: &str, role: Role, hash: &str) -> OperatorConfig {
        OperatorConfig {
            name: name.into(),
            role,
            token_sha256: Some(hash.into()),
            oidc: None,
        }
    }

    #[test]
    fn tokens_authenticate_by_hash_only() {
        let (alice_tok, alice_hash) = new_token();
        let (bob_tok, bob_hash) = new_token();
        assert!(alice_tok.expose().starts_with(OPERATOR_PREFIX));
        let ops = Operators::from_config(&[
            cfg("alice", Role::Admin, &alice_hash),
            cfg("bob", Role::Auditor, &bob_hash),
        ])
        .unwrap();
        assert_eq!(
            ops.authenticate(&alice_tok),
            Some(Operator {
                name: "alice".into(),
                role: Role::Admin,
                subject: None,
            })
        );
        assert_eq!(ops.authenticate(&bob_tok).unwrap().role, Role::Auditor);
        // The hash itself is not a token.
        assert_eq!(ops.authenticate(&Sensitive::new(alice_hash.clone())), None);
        let (other, _) = new_token();
        assert_eq!(ops.authenticate(&other), None);
        // A job token (a JWT) never matches, whatever its content.
        assert_eq!(ops.authenticate(&Sensitive::new("eyJhbGciOi.x.y")), None);
        assert_eq!(Operators::default().authenticate(&alice_tok), None);
        // The legacy shape (`brk_op_` + 43 base64url characters, no checksum) still
        // authenticates by hash; a truncated current one never does.
        let legacy = format!("{OPERATOR_PREFIX}{}", crate::secret::random_token(32));
        let ops =
            Operators::from_config(&[cfg("old", Role::Admin, &sha256_hex(legacy.as_bytes()))])
                .unwrap();
        assert_eq!(
            ops.authenticate(&Sensitive::new(legacy)).unwrap().name,
            "old"
        );
        let t = alice_tok.expose();
        assert_eq!(ops.authenticate(&Sensitive::new(&t[..t.len() - 1])), None);
    }

    #[test]
    fn roles_nest() {
        assert!(Role::Admin.allows(Role::Auditor));
        assert!(Role::Admin.allows(Role::Admin));
        assert!(Role::Auditor.allows(Role::Auditor));
        assert!(!Role::Auditor.allows(Role::Admin));
    }

    #[test]
    fn validation_names_keys_and_never_echoes_values() {
        let (_, h) = new_token();
        let secretish = "brk_op_this-is-a-token-not-a-hash";
        let p = validate(&[
            cfg("alice", Role::Admin, &h),
            cfg("alice", Role::Auditor, secretish),
            cfg("bad name", Role::Admin, &h.to_uppercase()),
            cfg("carol", Role::Admin, &h),
        ]);
        let all = p.join("\n");
        assert!(all.contains("operators[1].name: duplicate"), "{all}");
        assert!(all.contains("operators[1].token_sha256"), "{all}");
        assert!(all.contains("operators[2].name"), "{all}");
        assert!(all.contains("operators[2].token_sha256"), "{all}");
        assert!(
            all.contains("operators[3].token_sha256: the same token"),
            "{all}"
        );
        assert!(!all.contains(secretish));
        assert!(Operators::from_config(&[cfg("x", Role::Admin, "00")]).is_err());
    }
}

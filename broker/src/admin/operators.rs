//! Operator authentication: bearer tokens kept in the config only as SHA-256 hashes, each with a
//! role. A job token is never an operator token: operator tokens carry the `brk_op_` prefix, so
//! a JWT cannot match, and nothing here ever verifies a JWT.
//!
//! Invariant: comparison runs over every configured hash in constant time (`subtle`), so timing
//! reveals neither which operator matched nor how much of a hash did.

use crate::secret::{Sensitive, random_token, sha256_hex};
use serde::{Deserialize, Serialize};
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

/// One entry of the config's `operators:` list.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperatorConfig {
    /// Audited as `operator:<name>`.
    pub name: String,
    pub role: Role,
    /// Lowercase hex SHA-256 of the operator's token (`broker operator-token` prints both).
    pub token_sha256: String,
}

/// An authenticated operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operator {
    pub name: String,
    pub role: Role,
}

impl Operator {
    /// The audit `actor`.
    pub fn actor(&self) -> String {
        format!("operator:{}", self.name)
    }
}

/// The configured operators.
#[derive(Debug, Clone, Default)]
pub struct Operators {
    list: Vec<(Operator, [u8; 32])>,
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
        if parse_hash(&o.token_sha256).is_none() {
            p.push(format!(
                "operators[{i}].token_sha256: expected 64 lowercase hex characters (the token's \
                 SHA-256, not the token)"
            ));
        } else if !hashes.insert(o.token_sha256.clone()) {
            p.push(format!(
                "operators[{i}].token_sha256: the same token is configured twice"
            ));
        }
    }
    p
}

impl Operators {
    /// From validated config; an invalid entry is an error naming it.
    pub fn from_config(ops: &[OperatorConfig]) -> Result<Self, String> {
        let problems = validate(ops);
        if !problems.is_empty() {
            return Err(problems.join("; "));
        }
        let list = ops
            .iter()
            .filter_map(|o| {
                parse_hash(&o.token_sha256).map(|h| {
                    (
                        Operator {
                            name: o.name.clone(),
                            role: o.role,
                        },
                        h,
                    )
                })
            })
            .collect();
        Ok(Self { list })
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// The operator this token belongs to, if any.
    pub fn authenticate(&self, token: &Sensitive) -> Option<Operator> {
        let t = token.expose();
        if !t.starts_with(OPERATOR_PREFIX) || t.len() > 256 {
            return None;
        }
        let digest = parse_hash(&sha256_hex(t.as_bytes()))?;
        let mut found = None;
        // No early exit: every hash is compared whatever matched.
        for (op, hash) in &self.list {
            if bool::from(hash.ct_eq(&digest)) {
                found = Some(op.clone());
            }
        }
        found
    }
}

/// A new operator token and the hash to put in the config.
pub fn new_token() -> (Sensitive, String) {
    let token = format!("{OPERATOR_PREFIX}{}", random_token(32));
    let hash = sha256_hex(token.as_bytes());
    (Sensitive::new(token), hash)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(name: &str, role: Role, hash: &str) -> OperatorConfig {
        OperatorConfig {
            name: name.into(),
            role,
            token_sha256: hash.into(),
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
                role: Role::Admin
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

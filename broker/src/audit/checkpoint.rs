//! Signed audit checkpoints: where the hash chain stood (head hash, event count, last event),
//! signed with the broker's Ed25519 key so a copy kept elsewhere can later prove that the log
//! was not cut or rewritten before that point (`broker audit verify --checkpoint`).
//!
//! Form: a JWT (EdDSA) whose header `typ` is `broker-checkpoint+jwt`, signed by the active
//! API-token key (same `kid`s as `/.well-known/jwks.json`), so it can be checked with the
//! published JWKS alone. The `typ` keeps a checkpoint from being taken for an API token and
//! the other way round. No SQL here: the store records and walks, this module signs and checks.
//!
//! The checkpoint types themselves ([`Checkpoint`], [`ChainAnchor`]) live here and the store
//! uses them, so `store` depends on `audit` and never the other way round.

use crate::providers::api_token::{SigningKeys, TokenCheckError, verify_document_with_jwks};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

/// Why a checkpoint was recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckpointKind {
    /// `broker audit checkpoint`: printed signed, to be kept off this database.
    Export,
    /// `broker audit prune`: the events up to `seq` were deleted in the same transaction.
    Prune,
}

impl CheckpointKind {
    /// The stored text (`audit_checkpoints.kind`).
    pub fn as_str(self) -> &'static str {
        match self {
            CheckpointKind::Export => "export",
            CheckpointKind::Prune => "prune",
        }
    }
}

/// Where the audit hash chain stood: the event at `seq` has chain hash `hash` and is the
/// `event_count`-th chained event ever written (pruned ones included).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub kind: CheckpointKind,
    pub created_at: OffsetDateTime,
    pub seq: i64,
    pub hash: String,
    pub event_count: u64,
    pub last_event_id: Option<Uuid>,
    pub last_event_time: Option<OffsetDateTime>,
}

impl Checkpoint {
    pub fn anchor(&self) -> ChainAnchor {
        ChainAnchor {
            seq: self.seq,
            hash: self.hash.clone(),
            count: self.event_count,
        }
    }
}

/// A point the chain must still pass through: from a checkpoint (see [`Checkpoint`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainAnchor {
    pub seq: i64,
    pub hash: String,
    /// Chained events from the first ever up to and including `seq`.
    pub count: u64,
}

/// Header `typ` of a checkpoint.
pub const CHECKPOINT_TYPE: &str = "broker-checkpoint+jwt";

/// What a signed checkpoint says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointClaims {
    /// The broker's public URL.
    pub iss: String,
    /// When the checkpoint was taken (unix seconds; `created_at` has the exact time).
    pub iat: i64,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// Hash of the newest chained event (64 zeros for an empty chain).
    pub chain_head: String,
    /// `seq` of that event.
    pub seq: i64,
    /// Chained events from the first ever up to and including it (pruned ones included).
    pub event_count: u64,
    pub last_event_id: Option<String>,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub last_event_time: Option<OffsetDateTime>,
}

impl CheckpointClaims {
    pub fn new(issuer: &str, cp: &Checkpoint) -> Self {
        Self {
            iss: issuer.to_owned(),
            iat: cp.created_at.unix_timestamp(),
            created_at: cp.created_at,
            chain_head: cp.hash.clone(),
            seq: cp.seq,
            event_count: cp.event_count,
            last_event_id: cp.last_event_id.map(|u| u.to_string()),
            last_event_time: cp.last_event_time,
        }
    }

    /// The point the chain must still pass through.
    pub fn anchor(&self) -> ChainAnchor {
        ChainAnchor {
            seq: self.seq,
            hash: self.chain_head.clone(),
            count: self.event_count,
        }
    }
}

/// Why a checkpoint cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("could not sign the checkpoint")]
    Sign,
    #[error("not a checkpoint signed by a key given (wrong key, wrong type or altered)")]
    BadSignature,
    #[error("the checkpoint's chain head is not a sha256 hex hash")]
    Malformed,
}

/// Sign `cp` with the active key.
pub fn sign(keys: &SigningKeys, issuer: &str, cp: &Checkpoint) -> Result<String, CheckpointError> {
    keys.sign_document(CHECKPOINT_TYPE, &CheckpointClaims::new(issuer, cp))
        .map_err(|_| CheckpointError::Sign)
}

/// The keys a checkpoint is checked against.
pub enum VerifyingKeys<'a> {
    /// The broker's own keys (from its config).
    Keys(&'a SigningKeys),
    /// A published JWKS document.
    Jwks(&'a serde_json::Value),
}

/// Check the signature and shape of a checkpoint and return what it says.
pub fn verify(keys: VerifyingKeys<'_>, token: &str) -> Result<CheckpointClaims, CheckpointError> {
    let token = token.trim();
    let claims: CheckpointClaims = match keys {
        VerifyingKeys::Keys(k) => k.verify_document(CHECKPOINT_TYPE, token),
        VerifyingKeys::Jwks(j) => verify_document_with_jwks(j, CHECKPOINT_TYPE, token),
    }
    .map_err(|_: TokenCheckError| CheckpointError::BadSignature)?;
    let hex_ok = claims.chain_head.len() == 64
        && claims
            .chain_head
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if !hex_ok {
        return Err(CheckpointError::Malformed);
    }
    Ok(claims)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cp() -> Checkpoint {
        Checkpoint {
            kind: CheckpointKind::Export,
            created_at: OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap(),
            seq: 42,
            hash: "ab".repeat(32),
            event_count: 40,
            last_event_id: Some(uuid::Uuid::from_u128(
                0x0192_f0c1_8d3e_7c44_9a1e_3f5b_2a6d_7e80,
            )),
            last_event_time: Some(OffsetDateTime::from_unix_timestamp(1_699_999_999).unwrap()),
        }
    }

    #[test]
    fn signed_checkpoint_verifies_with_keys_and_jwks() {
        let keys = SigningKeys::ephemeral().unwrap();
        let token = sign(&keys, "https://broker.example", &cp()).unwrap();
        let by_keys = verify(VerifyingKeys::Keys(&keys), &token).unwrap();
        assert_eq!(
            by_keys,
            CheckpointClaims::new("https://broker.example", &cp())
        );
        let jwks = keys.jwks();
        let by_jwks = verify(VerifyingKeys::Jwks(&jwks), &format!("{token}\n")).unwrap();
        assert_eq!(by_jwks, by_keys);
        assert_eq!(
            by_jwks.anchor(),
            ChainAnchor {
                seq: 42,
                hash: "ab".repeat(32),
                count: 40
            }
        );
    }

    #[test]
    fn other_keys_altered_claims_and_other_types_are_refused() {
        let keys = SigningKeys::ephemeral().unwrap();
        let token = sign(&keys, "b", &cp()).unwrap();
        let other = SigningKeys::ephemeral().unwrap();
        assert!(matches!(
            verify(VerifyingKeys::Keys(&other), &token),
            Err(CheckpointError::BadSignature)
        ));
        // Raise the count in the payload, keep the signature.
        let parts: Vec<&str> = token.split('.').collect();
        use base64::Engine;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let payload = String::from_utf8(b64.decode(parts[1]).unwrap()).unwrap();
        let forged = payload.replace("\"event_count\":40", "\"event_count\":4");
        assert_ne!(forged, payload);
        let forged = format!("{}.{}.{}", parts[0], b64.encode(forged), parts[2]);
        assert!(verify(VerifyingKeys::Keys(&keys), &forged).is_err());
        // A document of another type signed by the same key is not a checkpoint.
        let api_like = keys
            .sign_document("broker-at+jwt", &CheckpointClaims::new("b", &cp()))
            .unwrap();
        assert!(verify(VerifyingKeys::Keys(&keys), &api_like).is_err());
    }
}

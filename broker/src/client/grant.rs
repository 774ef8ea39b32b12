//! What `/v1/exchange` returned, parsed: every field is a secret unless its name is on a short
//! public list (fail closed for a new credential kind).

use super::ClientError;
use crate::secret::Sensitive;
use serde_json::Value;
use std::collections::BTreeMap;

/// Response fields that are shown as-is; everything else is a secret.
const PUBLIC_FIELDS: &[&str] = &[
    "kind",
    "expires_at",
    "token_type",
    "audience",
    "scope",
    "token_id",
    "username",
    "user",
    "host",
    "port",
    "database",
    "region",
    "role_arn",
    "session_name",
    "expiration",
    "account_id",
    // ssh_cert: the certificate and public key are public by nature (hosts log serial and key
    // id); a broker-made private key is not.
    "certificate",
    "public_key",
    "serial",
    "key_id",
    "principals",
    "valid_after",
    // github_app: what the token reaches (the token is secret).
    "owner",
    "repositories",
    "permissions",
    "api_url",
];

/// A value of a minted credential.
#[derive(Debug, Clone)]
pub enum FieldValue {
    Public(String),
    Secret(Sensitive),
}

impl FieldValue {
    pub fn expose(&self) -> &str {
        match self {
            FieldValue::Public(s) => s,
            FieldValue::Secret(s) => s.expose(),
        }
    }
    pub fn is_secret(&self) -> bool {
        matches!(self, FieldValue::Secret(_))
    }
}

/// One credential of a grant.
#[derive(Debug, Clone)]
pub struct Credential {
    pub name: String,
    pub kind: String,
    pub fields: BTreeMap<String, FieldValue>,
}

/// What `/v1/exchange` returned.
#[derive(Debug, Clone)]
pub struct Grant {
    pub grant_id: String,
    pub expires_at: String,
    pub revocation_token: Sensitive,
    pub credentials: Vec<Credential>,
}

impl Grant {
    /// Parse the broker's answer. Values that are not strings (numbers, lists) are kept as
    /// their JSON text.
    pub fn from_json(v: &Value) -> Result<Self, ClientError> {
        let s = |k: &str| {
            v.get(k)
                .and_then(Value::as_str)
                .map(str::to_owned)
                .ok_or_else(|| ClientError::BadResponse(format!("missing `{k}`")))
        };
        let grant_id = s("grant_id")?;
        let expires_at = s("expires_at")?;
        let revocation_token = Sensitive::new(s("revocation_token")?);
        let creds = v
            .get("credentials")
            .and_then(Value::as_object)
            .ok_or_else(|| ClientError::BadResponse("missing `credentials`".into()))?;
        let mut credentials = Vec::new();
        for (name, c) in creds {
            let obj = c
                .as_object()
                .ok_or_else(|| ClientError::BadResponse(format!("credential {name:?}")))?;
            let kind = obj
                .get("kind")
                .and_then(Value::as_str)
                .unwrap_or("unknown")
                .to_owned();
            let mut fields = BTreeMap::new();
            for (k, val) in obj {
                let text = match val {
                    Value::String(s) => s.clone(),
                    Value::Null => continue,
                    other => other.to_string(),
                };
                let fv = if PUBLIC_FIELDS.contains(&k.as_str()) {
                    FieldValue::Public(text)
                } else {
                    FieldValue::Secret(Sensitive::new(text))
                };
                fields.insert(k.clone(), fv);
            }
            credentials.push(Credential {
                name: name.clone(),
                kind,
                fields,
            });
        }
        Ok(Self {
            grant_id,
            expires_at,
            revocation_token,
            credentials,
        })
    }
}

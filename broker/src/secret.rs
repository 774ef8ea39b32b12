//! Secret values that cannot be printed.
//!
//! Invariant: a minted secret (password, API token, revocation token, AWS secret key) lives in a
//! [`Sensitive`] from the moment it is created. `Debug` and `Display` redact it, it is not
//! `Serialize` (so it cannot slip into an audit event or a log field by accident), and the only
//! way to read it is [`Sensitive::expose`], which the HTTP response builder calls once.
//!
//! Secrets the broker is configured with (the store URL, signing keys, webhook secrets, target
//! admin URLs) are given by reference, [`SecretRef`]: a file, an environment variable, or an
//! inline value; resolving one yields a [`Sensitive`], and its errors name the source only.

use serde::Deserialize;
use std::fmt;
use std::path::PathBuf;

/// A secret string. Redacted in `Debug`/`Display`; deliberately not `Serialize`.
#[derive(Clone, PartialEq, Eq)]
pub struct Sensitive(String);

impl Sensitive {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    /// The secret itself. Call only where the value must leave the process (a response body,
    /// an outgoing request).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Sensitive {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Sensitive([redacted])")
    }
}

impl fmt::Display for Sensitive {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// A secret given by reference: exactly one of `file`, `env` (or, for non-secret-bearing values
/// such as a SQLite path, `value`).
#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretRef {
    pub file: Option<PathBuf>,
    pub env: Option<String>,
    /// Inline value. Allowed, but a warning is logged if it looks like it holds a password.
    pub value: Option<String>,
}

impl fmt::Debug for SecretRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretRef")
            .field("file", &self.file)
            .field("env", &self.env)
            .field("value", &self.value.as_ref().map(|_| "[redacted]"))
            .finish()
    }
}

impl SecretRef {
    pub fn inline(v: impl Into<String>) -> Self {
        Self {
            value: Some(v.into()),
            ..Self::default()
        }
    }

    /// Read the secret. Errors name the source, never the value.
    pub fn resolve(&self) -> Result<Sensitive, SecretRefError> {
        match (&self.file, &self.env, &self.value) {
            (Some(p), None, None) => std::fs::read_to_string(p)
                .map(|s| Sensitive::new(s.trim_end_matches(['\n', '\r']).to_owned()))
                .map_err(|e| SecretRefError::File {
                    path: p.clone(),
                    kind: e.kind(),
                }),
            (None, Some(var), None) => std::env::var(var)
                .map(Sensitive::new)
                .map_err(|_| SecretRefError::EnvUnset(var.clone())),
            (None, None, Some(v)) => Ok(Sensitive::new(v.clone())),
            (None, None, None) => Err(SecretRefError::Unset),
            _ => Err(SecretRefError::Ambiguous),
        }
    }

    pub(crate) fn describe(&self) -> String {
        match (&self.file, &self.env, &self.value) {
            (Some(p), _, _) => format!("file {}", p.display()),
            (_, Some(v), _) => format!("env {v}"),
            (_, _, Some(_)) => "inline (set)".into(),
            _ => "unset".into(),
        }
    }
}

/// Why a [`SecretRef`] gave no secret. Names the source (a path, a variable name), never a
/// value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretRefError {
    #[error("cannot read file {}: {kind}", path.display())]
    File {
        path: PathBuf,
        kind: std::io::ErrorKind,
    },
    #[error("environment variable {0} is not set")]
    EnvUnset(String),
    #[error("no file, env or value given")]
    Unset,
    #[error("give exactly one of file, env, value")]
    Ambiguous,
}

/// Lowercase hex SHA-256 of a value: what the store keeps instead of a token.
pub fn sha256_hex(value: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(value))
}

/// `n` bytes from the operating system's CSPRNG, base64url without padding.
pub fn random_token(n: usize) -> String {
    use base64::Engine;
    use rand::RngCore;
    let mut buf = vec![0u8; n];
    // ThreadRng: a CSPRNG (ChaCha12) seeded and periodically reseeded from the OS.
    rand::rng().fill_bytes(&mut buf);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_redact() {
        let s = Sensitive::new("hunter2-very-secret");
        assert!(!format!("{s:?}").contains("hunter2"));
        assert!(!format!("{s}").contains("hunter2"));
        assert_eq!(s.expose(), "hunter2-very-secret");
    }

    #[test]
    fn secret_refs_resolve_from_one_source_and_never_echo_it() {
        let inline = SecretRef::inline("hunter2-inline");
        assert_eq!(inline.resolve().unwrap().expose(), "hunter2-inline");
        assert!(!format!("{inline:?}").contains("hunter2"));
        assert_eq!(inline.describe(), "inline (set)");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        std::fs::write(&path, "hunter2-file\n").unwrap();
        let file = SecretRef {
            file: Some(path),
            ..SecretRef::default()
        };
        assert_eq!(file.resolve().unwrap().expose(), "hunter2-file");
        let both = SecretRef {
            env: Some("X".into()),
            ..SecretRef::inline("hunter2")
        };
        assert_eq!(both.resolve(), Err(SecretRefError::Ambiguous));
        assert_eq!(SecretRef::default().resolve(), Err(SecretRefError::Unset));
        let missing = SecretRef {
            env: Some("BROKER_TEST_SURELY_UNSET_VARIABLE".into()),
            ..SecretRef::default()
        };
        assert_eq!(
            missing.resolve().unwrap_err().to_string(),
            "environment variable BROKER_TEST_SURELY_UNSET_VARIABLE is not set"
        );
    }

    #[test]
    fn random_tokens_differ_and_have_entropy() {
        let a = random_token(32);
        let b = random_token(32);
        assert_ne!(a, b);
        assert_eq!(a.len(), 43);
    }
}

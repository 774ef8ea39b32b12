//! Secret values that cannot be printed.
//!
//! Invariant: a minted secret (password, API token, revocation token, AWS secret key) lives in a
//! [`Sensitive`] from the moment it is created. `Debug` and `Display` redact it, it is not
//! `Serialize` (so it cannot slip into an audit event or a log field by accident), and the only
//! way to read it is [`Sensitive::expose`], which the HTTP response builder calls once.

use std::fmt;

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
    fn random_tokens_differ_and_have_entropy() {
        let a = random_token(32);
        let b = random_token(32);
        assert_ne!(a, b);
        assert_eq!(a.len(), 43);
    }
}

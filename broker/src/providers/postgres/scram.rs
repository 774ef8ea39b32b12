//! Passwords for minted users and the SCRAM-SHA-256 verifier sent in their place.
//!
//! `CREATE ROLE … PASSWORD 'SCRAM-SHA-256$…'` stores the verifier as-is (Postgres recognises the
//! format and does not hash again). The plaintext password therefore never reaches the database
//! server, so it cannot appear in its statement log or `pg_stat_activity`, and the PBKDF2 work
//! is done here rather than by the database. The verifier is still secret-ish (with a captured
//! authentication exchange it lets an attacker impersonate the user), so it is [`Sensitive`] too
//! and never logged.

use crate::secret::Sensitive;
use aws_lc_rs::{digest, hmac, pbkdf2};
use base64::Engine;
use rand::Rng;
use std::num::NonZeroU32;

/// Length of generated passwords: 40 characters of `[A-Za-z0-9]`, about 238 bits of entropy.
/// (The brief floor is 32 characters; alphanumerics only, so the password needs no escaping in
/// a URL, a shell or a `.pgpass` file, and SASLprep leaves it unchanged.)
pub const PASSWORD_LEN: usize = 40;

/// PBKDF2 iterations in the verifier.
///
/// Iterations slow down guessing a *human* password from a stolen verifier. Our passwords are
/// 40 random alphanumerics (≈ 238 bits), which no amount of guessing reaches, so iterations add
/// no security here; they only cost CPU on every mint (here) and on every login (the client runs
/// PBKDF2 with the count the server announces). We still use 4096 rather than 1, on purpose:
/// RFC 7677 says the announced count SHOULD be at least 4096 and some client libraries refuse
/// smaller counts, so anything lower would trade compatibility for a saving of about a
/// millisecond per mint. 4096 is also Postgres's own default, so our users look like any other.
pub const ITERATIONS: u32 = 4096;

/// Salt length in bytes (Postgres's own default).
const SALT_LEN: usize = 16;

/// A fresh random password from the thread CSPRNG (ChaCha, seeded and reseeded from the OS).
pub fn generate_password() -> Sensitive {
    let pw: String = rand::rng()
        .sample_iter(rand::distr::Alphanumeric)
        .take(PASSWORD_LEN)
        .map(char::from)
        .collect();
    Sensitive::new(pw)
}

/// The SCRAM-SHA-256 verifier for `password` with a random salt.
pub fn verifier(password: &Sensitive) -> Sensitive {
    let mut salt = [0u8; SALT_LEN];
    rand::rng().fill(&mut salt[..]);
    verifier_with(password.expose().as_bytes(), &salt, ITERATIONS)
}

/// `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>` (RFC 5802 / RFC 7677, as
/// Postgres stores it). The password must already be SASLprep-normalised; ours are ASCII
/// alphanumerics, which SASLprep leaves as they are.
fn verifier_with(password: &[u8], salt: &[u8], iterations: u32) -> Sensitive {
    let b64 = base64::engine::general_purpose::STANDARD;
    let iters = NonZeroU32::new(iterations).unwrap_or(NonZeroU32::MIN);
    let mut salted = [0u8; digest::SHA256_OUTPUT_LEN];
    pbkdf2::derive(
        pbkdf2::PBKDF2_HMAC_SHA256,
        iters,
        salt,
        password,
        &mut salted,
    );
    let key = hmac::Key::new(hmac::HMAC_SHA256, &salted);
    let client_key = hmac::sign(&key, b"Client Key");
    let stored_key = digest::digest(&digest::SHA256, client_key.as_ref());
    let server_key = hmac::sign(&key, b"Server Key");
    Sensitive::new(format!(
        "SCRAM-SHA-256${iters}:{}${}:{}",
        b64.encode(salt),
        b64.encode(stored_key.as_ref()),
        b64.encode(server_key.as_ref())
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_a_verifier_postgres_computed() {
        // Postgres 15: `SET password_encryption = 'scram-sha-256'; CREATE ROLE r PASSWORD
        // 'correct horse battery staple 0123456789'`, read back from pg_authid.
        let pg = "SCRAM-SHA-256$4096:08BXBAb5ZtOb5x3+x7V9Uw==$iRRcWzMNLC6+AzoMJ14IvJKTl9vR8fjTBmCHgQOOp6s=:nfhioisO58cWP6jOjgnljjT+DjrBK6LGXS6mdBRKzdo=";
        let salt = base64::engine::general_purpose::STANDARD
            .decode("08BXBAb5ZtOb5x3+x7V9Uw==")
            .unwrap();
        let ours = verifier_with(b"correct horse battery staple 0123456789", &salt, 4096);
        assert_eq!(ours.expose(), pg);
    }

    #[test]
    fn passwords_are_long_random_and_plain() {
        let a = generate_password();
        let b = generate_password();
        assert_ne!(a, b);
        assert_eq!(a.expose().len(), PASSWORD_LEN);
        assert!(a.expose().bytes().all(|c| c.is_ascii_alphanumeric()));
        let v1 = verifier(&a);
        let v2 = verifier(&a);
        // Random salt: the same password gives different verifiers.
        assert_ne!(v1, v2);
        assert!(v1.expose().starts_with("SCRAM-SHA-256$4096:"));
        assert!(!v1.expose().contains(a.expose()));
        assert!(!format!("{v1:?}").contains("SCRAM"));
    }
}

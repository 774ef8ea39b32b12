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

/// Length of generated passwords: the recognisable shape of `crate::secret_format`,
/// `brk_pg_<32 base62>_<checksum>`, 46 characters with about 190 bits of entropy. (The brief
/// floor is 32 random characters; alphanumerics and `_` only, so the password needs no escaping
/// in a URL, a shell or a `.pgpass` file, and SASLprep leaves it unchanged.)
pub const PASSWORD_LEN: usize = 46;

/// Default PBKDF2 iteration count in the verifier (`targets.postgres.<name>.scram_iterations`).
///
/// Why 1, on purpose. Iterations (key stretching) slow down guessing a *chosen* password from a
/// stolen verifier or a captured login. Ours carry 32 random base62 characters, about 190 bits: an
/// attacker would need about 2^189 guesses on average, and 4,096 iterations would only add 12
/// bits to a margin that is already beyond any computation. So stretching buys nothing here,
/// while it costs on every use:
/// - on the database server, at `CREATE ROLE`: Postgres checks that a supplied verifier is not
///   the verifier of the empty password, which runs PBKDF2 once with the verifier's own count
///   (measured on Postgres 15 here: 6.5 ms of server CPU per role at 4,096, 0.07 ms without a
///   password). That is the shared database's CPU, spent on every job;
/// - in the broker, to compute the verifier (about 1 ms at 4,096);
/// - in the job, on every login (the client runs PBKDF2 with the count the server announces).
///
/// What it does not change: the password is still never sent to the database (only the
/// verifier), the login is still SCRAM-SHA-256 with a random salt, and the verifier is still
/// kept secret ([`Sensitive`]). Postgres accepts counts from 1 (its own `scram_iterations`
/// setting, from version 16, goes down to 1), and so do libpq and the drivers built on it.
///
/// When to raise it: some client libraries refuse a count below 4,096, the figure RFC 7677
/// recommends for human passwords (for example the SCRAM library in older PostgreSQL JDBC
/// drivers). For a target whose jobs use such a client, set `scram_iterations: 4096`.
pub const DEFAULT_ITERATIONS: u32 = 1;

/// Largest accepted count (a typo such as an extra zero should not cost seconds per mint).
pub const MAX_ITERATIONS: u32 = 100_000;

/// Counts up to this are computed inline on the async runtime (microseconds); larger ones on
/// the blocking pool.
pub const INLINE_ITERATIONS: u32 = 64;

/// Salt length in bytes (Postgres's own default).
const SALT_LEN: usize = 16;

/// A fresh random password in the recognisable `brk_pg_` shape (so a secret scanner finds a
/// leaked one and a leak report can name it), random from the thread CSPRNG.
pub fn generate_password() -> Sensitive {
    crate::secret_format::generate(crate::secret_format::SecretKind::PostgresPassword)
}

/// The SCRAM-SHA-256 verifier for `password` with a random salt and `iterations` rounds.
pub fn verifier(password: &Sensitive, iterations: u32) -> Sensitive {
    let mut salt = [0u8; SALT_LEN];
    rand::rng().fill(&mut salt[..]);
    verifier_with(password.expose().as_bytes(), &salt, iterations)
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
        assert!(a.expose().starts_with("brk_pg_"));
        assert!(
            a.expose()
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'_')
        );
        assert_eq!(
            crate::secret_format::parse(a.expose()),
            Ok(crate::secret_format::SecretKind::PostgresPassword)
        );
        let v1 = verifier(&a, DEFAULT_ITERATIONS);
        let v2 = verifier(&a, DEFAULT_ITERATIONS);
        // Random salt: the same password gives different verifiers.
        assert_ne!(v1, v2);
        assert!(v1.expose().starts_with("SCRAM-SHA-256$1:"));
        assert!(
            verifier(&a, 4096)
                .expose()
                .starts_with("SCRAM-SHA-256$4096:")
        );
        assert!(!v1.expose().contains(a.expose()));
        assert!(!format!("{v1:?}").contains("SCRAM"));
    }
}

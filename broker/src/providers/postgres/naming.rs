//! Role names of minted users.
//!
//! `<prefix><credential slug>_<grant id, 32 hex>_<4 hex of the credential name's SHA-256>`.
//!
//! Invariants:
//! - Deterministic from the grant: decided before minting and recorded in the grant intent, so a
//!   crash after `CREATE ROLE` still leaves the name to drop.
//! - At most 63 bytes and only `[a-z0-9_]`: no quoting surprises, no silent truncation by
//!   Postgres, easy to match in `pg_roles` and logs.
//! - No claim ever reaches the name (the grant id, visible in the audit log, attributes it), so a
//!   hostile repository name cannot shape it. The credential name comes from the policy file;
//!   it is sanitised anyway and the hash keeps two names that sanitise alike apart.
//! - The prefix marks the broker's roles: revoke refuses to touch a role without it.

use uuid::Uuid;

/// Longest role name Postgres keeps without truncating.
pub const MAX_ROLE_BYTES: usize = 63;
/// Longest configurable prefix; leaves room for the grant id and hash.
pub const MAX_PREFIX_BYTES: usize = 16;
/// The default prefix.
pub const DEFAULT_PREFIX: &str = "brk_";

/// Why a configured role prefix is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrefixError {
    #[error(
        "role_prefix must be 1 to {MAX_PREFIX_BYTES} characters of [a-z0-9_] starting with a letter"
    )]
    Shape,
    #[error("role_prefix must not start with pg_ (reserved by Postgres)")]
    Reserved,
}

/// Check a configured role prefix: `[a-z][a-z0-9_]*`, at most 16 bytes, not `pg_` (reserved by
/// Postgres for its own roles).
pub fn check_prefix(prefix: &str) -> Result<(), PrefixError> {
    let ok = !prefix.is_empty()
        && prefix.len() <= MAX_PREFIX_BYTES
        && prefix
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase())
        && prefix
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if !ok {
        return Err(PrefixError::Shape);
    }
    if prefix.starts_with("pg_") {
        return Err(PrefixError::Reserved);
    }
    Ok(())
}

/// The role name for one credential of one grant.
pub fn role_name(prefix: &str, grant_id: Uuid, credential: &str) -> String {
    let gid = grant_id.simple().to_string();
    let hash = &crate::secret::sha256_hex(credential.as_bytes())[..4];
    // prefix + slug + "_" + 32 + "_" + 4
    let room = MAX_ROLE_BYTES.saturating_sub(prefix.len() + 1 + gid.len() + 1 + hash.len());
    let slug: String = credential
        .chars()
        .map(|c| match c {
            'a'..='z' | '0'..='9' | '_' => c,
            'A'..='Z' => c.to_ascii_lowercase(),
            _ => '_',
        })
        .take(room)
        .collect();
    let mut name = String::with_capacity(MAX_ROLE_BYTES);
    name.push_str(prefix);
    name.push_str(&slug);
    name.push('_');
    name.push_str(&gid);
    name.push('_');
    name.push_str(hash);
    name
}

/// Whether `name` is one of ours under `prefix` (checked before any revoke statement).
pub fn is_ours(prefix: &str, name: &str) -> bool {
    name.len() <= MAX_ROLE_BYTES
        && name.starts_with(prefix)
        && name.len() > prefix.len()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid(n: &str) -> bool {
        n.len() <= MAX_ROLE_BYTES
            && n.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    }

    #[test]
    fn names_are_deterministic_short_and_plain() {
        let g = Uuid::now_v7();
        let a = role_name("brk_", g, "db-migrator");
        assert_eq!(a, role_name("brk_", g, "db-migrator"));
        assert!(a.starts_with("brk_db_migrator_"), "{a}");
        assert!(a.contains(&g.simple().to_string()));
        assert!(valid(&a), "{a}");
        assert!(is_ours("brk_", &a));
        // Another grant, another name.
        assert_ne!(a, role_name("brk_", Uuid::now_v7(), "db-migrator"));
    }

    #[test]
    fn long_and_odd_credential_names_still_fit_and_differ() {
        let g = Uuid::now_v7();
        let long = "x".repeat(64);
        let n = role_name("longprefix_abcde", g, &long);
        assert_eq!(n.len(), MAX_ROLE_BYTES, "{n}");
        assert!(valid(&n));
        // Names that sanitise alike stay apart thanks to the hash.
        assert_ne!(role_name("brk_", g, "a-b"), role_name("brk_", g, "a_b"));
        let mut long2 = long.clone();
        long2.push('y');
        assert_ne!(
            role_name("longprefix_abcde", g, &long),
            role_name("longprefix_abcde", g, &long2)
        );
        // Whatever the input, the output is plain (defence in depth: names come from policies).
        for hostile in ["\"; DROP ROLE postgres; --", "ünïcødé☃", "", "A'B"] {
            let n = role_name("brk_", g, hostile);
            assert!(valid(&n), "{n}");
            assert!(!n.contains("drop role"));
        }
    }

    #[test]
    fn prefixes_are_checked_and_revoke_refuses_foreign_roles() {
        assert!(check_prefix("brk_").is_ok());
        assert!(check_prefix("t9a_").is_ok());
        for bad in ["", "Brk", "1brk", "pg_x", "brk-", &"a".repeat(17)] {
            assert!(check_prefix(bad).is_err(), "{bad}");
        }
        assert!(!is_ours("brk_", "postgres"));
        assert!(!is_ours("brk_", "brk_"));
        assert!(!is_ours("brk_", "brk_x\"; drop"));
        assert!(!is_ours("brk_", &format!("brk_{}", "a".repeat(60))));
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    fn prefix() -> impl Strategy<Value = String> {
        "[a-z][a-z0-9_]{0,15}".prop_filter("reserved", |p| !p.starts_with("pg_"))
    }

    proptest! {
        /// Whatever the credential name (policy input, sanitised anyway), the role name is plain,
        /// fits Postgres without truncation, is recognisably ours and names the grant.
        #[test]
        fn role_names_are_valid_for_any_input(
            prefix in prefix(),
            credential in any::<String>(),
            gid in any::<u128>(),
        ) {
            prop_assert!(check_prefix(&prefix).is_ok());
            let g = Uuid::from_u128(gid);
            let n = role_name(&prefix, g, &credential);
            prop_assert!(n.len() <= MAX_ROLE_BYTES, "{}", n);
            prop_assert!(n.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'), "{}", n);
            prop_assert!(n.starts_with(&prefix));
            prop_assert!(is_ours(&prefix, &n));
            prop_assert!(n.contains(&g.simple().to_string()));
            prop_assert_eq!(n.clone(), role_name(&prefix, g, &credential));
        }
    }
}

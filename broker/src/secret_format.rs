//! Recognisable secrets: every secret the broker invents has one documented shape,
//!
//! ```text
//! brk_<tag>_<32 random base62 characters>_<CRC-32 of everything before it, 6 base62 characters>
//! ```
//!
//! so that a secret scanner can match it with almost no false positives (a fixed prefix, a fixed
//! length, a checksum it can verify), and so that the broker can refuse a mistyped or truncated
//! one without a store lookup. The tag names the kind ([`SecretKind`]); the table of tags is
//! the one place they are defined, and `docs/leaks.md` lists it for scanner authors.
//!
//! 32 base62 characters carry about 190 bits from the operating system's CSPRNG; the checksum
//! adds no secrecy, it only tells a well-formed secret from a random string.

use crate::secret::Sensitive;

/// What a recognisable secret is for. The tag in its prefix says so.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SecretKind {
    /// An operator's admin API token.
    Operator,
    /// The revocation token a job uses to end its grant.
    Revocation,
    /// The password of a minted Postgres user.
    PostgresPassword,
    /// The password of a minted MySQL/MariaDB user.
    MysqlPassword,
    /// The password of a minted Redis ACL user.
    RedisPassword,
    /// An opaque API token (a reference token resolved by introspection).
    ApiToken,
}

/// Length of the random part, in base62 characters.
pub const RANDOM_LEN: usize = 32;
/// Length of the checksum, in base62 characters (a CRC-32 fits in 6).
pub const CHECKSUM_LEN: usize = 6;

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
const CRC32: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISO_HDLC);

impl SecretKind {
    pub const ALL: [SecretKind; 6] = [
        SecretKind::Operator,
        SecretKind::Revocation,
        SecretKind::PostgresPassword,
        SecretKind::MysqlPassword,
        SecretKind::RedisPassword,
        SecretKind::ApiToken,
    ];

    /// The prefix, tag included: `brk_<tag>_`.
    pub fn prefix(self) -> &'static str {
        match self {
            SecretKind::Operator => "brk_op_",
            SecretKind::Revocation => "brk_rvk_",
            SecretKind::PostgresPassword => "brk_pg_",
            SecretKind::MysqlPassword => "brk_my_",
            SecretKind::RedisPassword => "brk_rd_",
            SecretKind::ApiToken => "brk_at_",
        }
    }

    /// A short human name, for docs and audit.
    pub fn name(self) -> &'static str {
        match self {
            SecretKind::Operator => "operator_token",
            SecretKind::Revocation => "revocation_token",
            SecretKind::PostgresPassword => "postgres_password",
            SecretKind::MysqlPassword => "mysql_password",
            SecretKind::RedisPassword => "redis_password",
            SecretKind::ApiToken => "api_token",
        }
    }

    /// Total length of a secret of this kind (never empty: a kind has no `is_empty`).
    #[allow(clippy::len_without_is_empty)]
    pub fn len(self) -> usize {
        self.prefix().len() + RANDOM_LEN + 1 + CHECKSUM_LEN
    }
}

/// Why a string is not a well-formed broker secret. Carries no part of the string.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("no known broker secret prefix")]
    UnknownPrefix,
    #[error("wrong length or characters for a broker secret")]
    Malformed,
    #[error("checksum does not match (mistyped or truncated)")]
    Checksum,
}

/// A new secret of `kind`, random from the operating system's CSPRNG.
pub fn generate(kind: SecretKind) -> Sensitive {
    use rand::Rng;
    let mut rng = rand::rng();
    let mut s = String::with_capacity(kind.len());
    s.push_str(kind.prefix());
    for _ in 0..RANDOM_LEN {
        s.push(BASE62[rng.random_range(0..BASE62.len())] as char);
    }
    let sum = checksum(&s);
    s.push('_');
    s.push_str(&sum);
    Sensitive::new(s)
}

/// The kind of a well-formed secret, checked offline: prefix, length, alphabet and checksum.
pub fn parse(secret: &str) -> Result<SecretKind, FormatError> {
    let kind = SecretKind::ALL
        .into_iter()
        .find(|k| secret.starts_with(k.prefix()))
        .ok_or(FormatError::UnknownPrefix)?;
    if secret.len() != kind.len() {
        return Err(FormatError::Malformed);
    }
    let body_end = kind.prefix().len() + RANDOM_LEN;
    let (body, rest) = secret.split_at(body_end);
    let random = &body[kind.prefix().len()..];
    let Some(sum) = rest.strip_prefix('_') else {
        return Err(FormatError::Malformed);
    };
    if !random
        .bytes()
        .chain(sum.bytes())
        .all(|b| b.is_ascii_alphanumeric())
    {
        return Err(FormatError::Malformed);
    }
    if checksum(body) != sum {
        return Err(FormatError::Checksum);
    }
    Ok(kind)
}

/// Finds every well-formed broker secret in a text (a scanner's view; used by the leak CLI to
/// pick tokens out of a file).
pub fn find_all(text: &str) -> Vec<(SecretKind, &str)> {
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(off) = text[i..].find("brk_") {
        let start = i + off;
        let end = text[start..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map_or(text.len(), |e| start + e);
        let candidate = &text[start..end];
        if let Ok(kind) = parse(candidate) {
            out.push((kind, candidate));
        }
        i = end.max(start + 4);
    }
    out
}

/// Length of the random part of a legacy token (`brk_op_`/`brk_rvk_` + 32 random bytes in
/// base64url without padding), the shape operator and revocation tokens had before this format.
pub const LEGACY_LEN: usize = 43;

/// How a presented token of an expected kind is built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// `brk_<tag>_<32 base62>_<checksum>`, checksum verified.
    Current,
    /// The legacy shape, accepted for operator and revocation tokens only (operator tokens are
    /// long-lived; revocation tokens of grants live during an upgrade): `brk_op_`/`brk_rvk_` and
    /// 43 base64url characters. It has no checksum, so it is found by hash lookup alone.
    Legacy,
}

/// Check offline that `secret` is a token of `kind`: the current shape with a good checksum,
/// or (operator and revocation tokens only) the legacy shape. Nothing is looked up.
pub fn check(secret: &str, kind: SecretKind) -> Result<Shape, FormatError> {
    if !secret.starts_with(kind.prefix()) {
        return Err(FormatError::UnknownPrefix);
    }
    let legacy_kind = matches!(kind, SecretKind::Operator | SecretKind::Revocation);
    if legacy_kind && secret.len() == kind.prefix().len() + LEGACY_LEN {
        let rest = &secret[kind.prefix().len()..];
        return if rest
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            Ok(Shape::Legacy)
        } else {
            Err(FormatError::Malformed)
        };
    }
    match parse(secret)? {
        k if k == kind => Ok(Shape::Current),
        _ => Err(FormatError::UnknownPrefix),
    }
}

/// The CRC-32 (ISO-HDLC, as zlib) of `body`, in 6 base62 characters, most significant first.
fn checksum(body: &str) -> String {
    let mut n = CRC32.checksum(body.as_bytes());
    let mut digits = [b'0'; CHECKSUM_LEN];
    for d in digits.iter_mut().rev() {
        *d = BASE62[(n % 62) as usize];
        n /= 62;
    }
    digits.iter().map(|&b| char::from(b)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_secrets_parse_as_their_kind() {
        for kind in SecretKind::ALL {
            let s = generate(kind);
            assert_eq!(s.expose().len(), kind.len());
            assert!(s.expose().starts_with(kind.prefix()));
            assert_eq!(parse(s.expose()), Ok(kind), "{}", kind.name());
        }
        assert_ne!(
            generate(SecretKind::ApiToken).expose(),
            generate(SecretKind::ApiToken).expose()
        );
    }

    #[test]
    fn prefixes_are_unambiguous() {
        for a in SecretKind::ALL {
            for b in SecretKind::ALL {
                if a != b {
                    assert!(!a.prefix().starts_with(b.prefix()), "{a:?} {b:?}");
                }
            }
        }
    }

    #[test]
    fn a_typo_or_truncation_is_refused_offline() {
        let s = generate(SecretKind::PostgresPassword);
        let s = s.expose();
        assert_eq!(parse(&s[..s.len() - 1]), Err(FormatError::Malformed));
        // Change one character of the random part.
        let i = SecretKind::PostgresPassword.prefix().len() + 3;
        let c = if &s[i..=i] == "a" { "b" } else { "a" };
        let typo = format!("{}{c}{}", &s[..i], &s[i + 1..]);
        assert_eq!(parse(&typo), Err(FormatError::Checksum));
        assert_eq!(parse("brk_zz_whatever"), Err(FormatError::UnknownPrefix));
        assert_eq!(parse(""), Err(FormatError::UnknownPrefix));
        let bad_alphabet = format!("{}-{}", &s[..i], &s[i + 1..]);
        assert_eq!(parse(&bad_alphabet), Err(FormatError::Malformed));
    }

    #[test]
    fn check_accepts_the_legacy_shape_only_where_it_existed() {
        use base64::Engine;
        let legacy_body = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode([7u8; 32]);
        assert_eq!(legacy_body.len(), LEGACY_LEN);
        for kind in [SecretKind::Operator, SecretKind::Revocation] {
            let legacy = format!("{}{legacy_body}", kind.prefix());
            assert_eq!(check(&legacy, kind), Ok(Shape::Legacy));
            assert_eq!(
                check(&legacy[..legacy.len() - 1], kind),
                Err(FormatError::Malformed)
            );
            let bad = format!("{}{}+", kind.prefix(), &legacy_body[..LEGACY_LEN - 1]);
            assert_eq!(check(&bad, kind), Err(FormatError::Malformed));
            assert_eq!(check(generate(kind).expose(), kind), Ok(Shape::Current));
        }
        // No legacy shape for kinds that never had one.
        let at = format!("brk_at_{legacy_body}");
        assert_eq!(
            check(&at, SecretKind::ApiToken),
            Err(FormatError::Malformed)
        );
        // A secret of another kind is not this kind.
        let pg = generate(SecretKind::PostgresPassword);
        assert_eq!(
            check(pg.expose(), SecretKind::Revocation),
            Err(FormatError::UnknownPrefix)
        );
    }

    /// The regexes shipped in `deploy/scanners/` (gitleaks, TruffleHog, GitHub custom
    /// patterns) match a secret of every kind, with its exact extent, and no look-alike but a
    /// wrong checksum (a regex cannot compute a CRC-32; docs/leaks.md says so).
    #[test]
    fn shipped_scanner_rules_match_every_kind_and_no_look_alike() {
        let quoted = |text: &'static str, key: &str, open: &str, close: &str| -> Vec<String> {
            text.lines()
                .filter_map(|l| l.trim().strip_prefix(key))
                .filter_map(|l| l.trim().strip_prefix(open)?.strip_suffix(close))
                .map(str::to_owned)
                .collect()
        };
        let gitleaks = quoted(
            include_str!("../../deploy/scanners/gitleaks.toml"),
            "regex =",
            "'''",
            "'''",
        );
        let trufflehog = quoted(
            include_str!("../../deploy/scanners/trufflehog.yaml"),
            "secret:",
            "'",
            "'",
        );
        let github: Vec<String> = quoted(
            include_str!("../../deploy/scanners/github-custom-patterns.yaml"),
            "secret_format:",
            "'",
            "'",
        )
        .into_iter()
        // GitHub's before/after fields in the shape of the other rules' boundaries.
        .map(|f| format!(r"(?:^|[^0-9A-Za-z_-])({f})(?:[^0-9A-Za-z_-]|$)"))
        .collect();
        assert_eq!((gitleaks.len(), trufflehog.len(), github.len()), (8, 3, 3));
        for (file, rules) in [
            ("gitleaks", &gitleaks),
            ("trufflehog", &trufflehog),
            ("github", &github),
        ] {
            let rules: Vec<regex::Regex> = rules
                .iter()
                .map(|r| regex::Regex::new(r).unwrap())
                .collect();
            let matches = |text: &str| -> Vec<String> {
                rules
                    .iter()
                    .flat_map(|r| r.captures_iter(text))
                    .filter_map(|c| c.get(1).map(|m| m.as_str().to_owned()))
                    .collect()
            };
            for kind in SecretKind::ALL {
                let s = generate(kind);
                let s = s.expose();
                for text in [format!("TOKEN={s}\n"), format!("\"{s}\""), s.to_owned()] {
                    assert_eq!(matches(&text), vec![s.to_owned()], "{file} {kind:?}");
                }
                let i = kind.prefix().len() + 3;
                let flipped = if &s[i..=i] == "a" { "b" } else { "a" };
                let wrong_sum = format!("{}{flipped}{}", &s[..i], &s[i + 1..]);
                assert_eq!(parse(&wrong_sum), Err(FormatError::Checksum));
                assert_eq!(
                    matches(&wrong_sum).len(),
                    1,
                    "{file}: a regex cannot see the checksum"
                );
                for look_alike in [
                    s[..s.len() - 1].to_owned(),
                    format!("{s}0"),
                    format!("x{s}"),
                    s.replacen("brk_", "brk_zz", 1),
                    "ghp_16C7e42F292c6912E7710c838347Ae178B4a".to_owned(),
                    "AKIAIOSFODNN7EXAMPLE".to_owned(),
                ] {
                    assert_eq!(
                        matches(&look_alike),
                        Vec::<String>::new(),
                        "{file}: {look_alike}"
                    );
                }
            }
            let legacy = format!("brk_rvk_{}", crate::secret::random_token(32));
            assert_eq!(
                matches(&format!("t={legacy};")),
                vec![legacy.clone()],
                "{file} legacy"
            );
            assert!(
                matches(&legacy[..legacy.len() - 1]).is_empty(),
                "{file} legacy truncated"
            );
        }
    }

    #[test]
    fn the_checksum_is_a_known_crc32() {
        // CRC-32/ISO-HDLC's check value: "123456789" gives 0xCBF43926.
        let sum = checksum("123456789");
        let decoded = sum.bytes().fold(0u64, |n, b| {
            n * 62 + BASE62.iter().position(|&x| x == b).unwrap() as u64
        });
        assert_eq!(decoded, 0xCBF4_3926);
    }

    #[test]
    fn find_all_picks_secrets_out_of_text() {
        let a = generate(SecretKind::ApiToken);
        let b = generate(SecretKind::Revocation);
        let text = format!(
            "log: token={} and\n\"{}\", not brk_at_short nor brk_pg_{}",
            a.expose(),
            b.expose(),
            "x".repeat(40)
        );
        let found = find_all(&text);
        assert_eq!(
            found,
            vec![
                (SecretKind::ApiToken, a.expose()),
                (SecretKind::Revocation, b.expose())
            ]
        );
    }
}

//! Delivery authentication.
//!
//! - GitHub: `X-Hub-Signature-256: sha256=<hex>` is HMAC-SHA256 of the raw body under the
//!   webhook secret. Checked with `aws_lc_rs::hmac::verify` (constant time), against every
//!   configured secret with no early exit, so timing reveals neither which secret matched nor
//!   how much of a signature did.
//! - GitLab: `X-Gitlab-Token` is the configured secret itself. Both sides are hashed to fixed
//!   length and compared with `subtle`, again over every configured token.
//!
//! Invariant: the secrets and the presented token never reach an error, a log or the audit.
//! Which secret verified a delivery is returned as its position in the configuration (each
//! secret carries its own scope, see `scope.rs`); the position is found without branching on
//! any comparison result.

use crate::secret::Sensitive;
use aws_lc_rs::hmac;
use subtle::ConstantTimeEq;

/// Longest signature header looked at (`sha256=` + 64 hex).
const MAX_SIGNATURE_HEADER: usize = 7 + 64;

/// Whether `header` is a valid `sha256=<hex>` HMAC of `body` under any of `secrets`.
pub fn github_signature_ok(secrets: &[Sensitive], header: Option<&str>, body: &[u8]) -> bool {
    github_signature_match(secrets, header, body).is_some()
}

/// The position of the first of `secrets` under which `header` is a valid `sha256=<hex>` HMAC
/// of `body`, if any.
pub fn github_signature_match(
    secrets: &[Sensitive],
    header: Option<&str>,
    body: &[u8],
) -> Option<usize> {
    let h = header?;
    if h.len() > MAX_SIGNATURE_HEADER {
        return None;
    }
    let sig = hex::decode(h.strip_prefix("sha256=")?).ok()?;
    if sig.len() != 32 {
        return None;
    }
    first_match(secrets.iter().map(|s| {
        let key = hmac::Key::new(hmac::HMAC_SHA256, s.expose().as_bytes());
        subtle::Choice::from(u8::from(hmac::verify(&key, body, &sig).is_ok()))
    }))
}

/// The `X-Hub-Signature-256` value GitHub would send (tests, and `broker` docs examples).
pub fn github_sign(secret: &str, body: &[u8]) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes());
    format!("sha256={}", hex::encode(hmac::sign(&key, body).as_ref()))
}

/// Whether `token` equals any of `tokens`.
pub fn gitlab_token_ok(tokens: &[Sensitive], token: Option<&Sensitive>) -> bool {
    gitlab_token_match(tokens, token).is_some()
}

/// The position of the first of `tokens` equal to `token`, if any.
pub fn gitlab_token_match(tokens: &[Sensitive], token: Option<&Sensitive>) -> Option<usize> {
    let t = token?;
    if t.expose().is_empty() || t.expose().len() > 1024 {
        return None;
    }
    let presented = digest(t.expose());
    first_match(
        tokens
            .iter()
            .map(|want| digest(want.expose()).ct_eq(&presented)),
    )
}

/// The index of the first true `Choice`, computed over all of them without early exit or a
/// branch on any of them.
fn first_match(results: impl Iterator<Item = subtle::Choice>) -> Option<usize> {
    use subtle::ConditionallySelectable;
    let mut found = subtle::Choice::from(0);
    let mut index = 0u64;
    for (i, hit) in results.enumerate() {
        let take = hit & !found;
        index.conditional_assign(&(i as u64), take);
        found |= hit;
    }
    bool::from(found).then_some(index as usize)
}

fn digest(s: &str) -> [u8; 32] {
    use sha2::Digest;
    let mut out = [0u8; 32];
    out.copy_from_slice(&sha2::Sha256::digest(s.as_bytes()));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const BODY: &[u8] = br#"{"action":"completed"}"#;

    fn secrets() -> Vec<Sensitive> {
        vec![
            Sensitive::new("old-secret-0123456789"),
            Sensitive::new("new-secret-0123456789"),
        ]
    }

    #[test]
    fn github_accepts_any_configured_secret() {
        for s in ["old-secret-0123456789", "new-secret-0123456789"] {
            let sig = github_sign(s, BODY);
            assert!(github_signature_ok(&secrets(), Some(&sig), BODY));
        }
    }

    #[test]
    fn github_refuses_everything_else() {
        let good = github_sign("new-secret-0123456789", BODY);
        let wrong_secret = github_sign("other-secret-0123456789", BODY);
        let mut flipped = good.clone().into_bytes();
        let last = flipped.len() - 1;
        flipped[last] = if flipped[last] == b'0' { b'1' } else { b'0' };
        let flipped = String::from_utf8(flipped).unwrap();
        let sha1 = good.replacen("sha256=", "sha1=", 1);
        let upper_body = br#"{"action":"Completed"}"#;
        let cases: Vec<(Option<&str>, &[u8])> = vec![
            (None, BODY),
            (Some(""), BODY),
            (Some(&wrong_secret), BODY),
            (Some(&flipped), BODY),
            (Some(&sha1), BODY),
            (Some("sha256=zz"), BODY),
            (Some(&good[..good.len() - 2]), BODY),
            (Some(&good), upper_body),
        ];
        for (i, (h, body)) in cases.into_iter().enumerate() {
            assert!(!github_signature_ok(&secrets(), h, body), "case {i}");
        }
        assert!(!github_signature_ok(&[], Some(&good), BODY));
    }

    #[test]
    fn the_matching_secret_is_identified() {
        let s = secrets();
        let sig = github_sign("new-secret-0123456789", BODY);
        assert_eq!(github_signature_match(&s, Some(&sig), BODY), Some(1));
        let sig = github_sign("old-secret-0123456789", BODY);
        assert_eq!(github_signature_match(&s, Some(&sig), BODY), Some(0));
        let tok = Sensitive::new("new-secret-0123456789");
        assert_eq!(gitlab_token_match(&s, Some(&tok)), Some(1));
        // Two equal secrets: the first wins.
        let twice = vec![s[1].clone(), s[1].clone()];
        assert_eq!(gitlab_token_match(&twice, Some(&tok)), Some(0));
        assert_eq!(gitlab_token_match(&s, Some(&Sensitive::new("nope"))), None);
    }

    #[test]
    fn gitlab_token_compares_whole_values() {
        let t = |s: &str| Sensitive::new(s);
        assert!(gitlab_token_ok(
            &secrets(),
            Some(&t("old-secret-0123456789"))
        ));
        assert!(gitlab_token_ok(
            &secrets(),
            Some(&t("new-secret-0123456789"))
        ));
        for bad in ["", "old-secret-012345678", "old-secret-01234567890", "x"] {
            assert!(!gitlab_token_ok(&secrets(), Some(&t(bad))), "{bad:?}");
        }
        assert!(!gitlab_token_ok(&secrets(), None));
        assert!(!gitlab_token_ok(&[], Some(&t("old-secret-0123456789"))));
    }
}

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

use crate::secret::Sensitive;
use aws_lc_rs::hmac;
use subtle::ConstantTimeEq;

/// Longest signature header looked at (`sha256=` + 64 hex).
const MAX_SIGNATURE_HEADER: usize = 7 + 64;

/// Whether `header` is a valid `sha256=<hex>` HMAC of `body` under any of `secrets`.
pub fn github_signature_ok(secrets: &[Sensitive], header: Option<&str>, body: &[u8]) -> bool {
    let Some(h) = header else { return false };
    if h.len() > MAX_SIGNATURE_HEADER {
        return false;
    }
    let Some(hex_sig) = h.strip_prefix("sha256=") else {
        return false;
    };
    let Ok(sig) = hex::decode(hex_sig) else {
        return false;
    };
    if sig.len() != 32 {
        return false;
    }
    let mut ok = false;
    for s in secrets {
        let key = hmac::Key::new(hmac::HMAC_SHA256, s.expose().as_bytes());
        ok |= hmac::verify(&key, body, &sig).is_ok();
    }
    ok
}

/// The `X-Hub-Signature-256` value GitHub would send (tests, and `broker` docs examples).
pub fn github_sign(secret: &str, body: &[u8]) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes());
    format!("sha256={}", hex::encode(hmac::sign(&key, body).as_ref()))
}

/// Whether `token` equals any of `tokens`.
pub fn gitlab_token_ok(tokens: &[Sensitive], token: Option<&Sensitive>) -> bool {
    let Some(t) = token else { return false };
    if t.expose().is_empty() || t.expose().len() > 1024 {
        return false;
    }
    let presented = digest(t.expose());
    let mut ok = subtle::Choice::from(0);
    for want in tokens {
        ok |= digest(want.expose()).ct_eq(&presented);
    }
    ok.into()
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

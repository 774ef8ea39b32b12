//! Names the broker sends to STS: the resource id, the role session name (= source identity)
//! and the session tags.
//!
//! - Resource id: `brk-` + 16 hex of SHA-256(grant id, credential name). Deterministic from the
//!   grant, decided before minting (so a crash after `AssumeRole` still leaves what to deny),
//!   and free of claims.
//! - Session name: `<repository>@<run id>.<resource id>`, sanitised to `[\w+=,.@-]` and cut to
//!   64 characters by shortening the job part only. The resource id is always the suffix, so
//!   revoke can deny the session with the pattern `*<resource id>` without knowing the claims,
//!   and a hostile repository name cannot imitate another grant's suffix (the suffix is ours).
//!   The same value is the `SourceIdentity`, which AWS keeps across role chaining.
//! - Tags: AWS's session tag rules (key ≤ 128, value ≤ 256 characters of letters, digits,
//!   spaces and `_.:/=+-@`); anything else becomes `_`. Only ASCII is kept: CloudTrail and
//!   condition keys compare bytes, and look-alike Unicode has no business in a tag.

use crate::oidc::JobAttribution;
use uuid::Uuid;

/// Longest role session name and source identity AWS accepts.
pub const MAX_SESSION_NAME: usize = 64;
/// Longest session tag value.
pub const MAX_TAG_VALUE: usize = 256;
const RID_PREFIX: &str = "brk-";
const RID_HEX: usize = 16;

/// The resource id of one AWS credential of one grant.
pub fn resource_id(grant_id: Uuid, credential: &str) -> String {
    let mut input = grant_id.as_bytes().to_vec();
    input.extend_from_slice(credential.as_bytes());
    let h = crate::secret::sha256_hex(&input);
    format!("{RID_PREFIX}{}", &h[..RID_HEX])
}

/// Whether `s` has the shape of a resource id made by [`resource_id`] (checked before it is
/// put in a policy condition: no wildcard or quote can come through).
pub fn is_resource_id(s: &str) -> bool {
    s.len() == RID_PREFIX.len() + RID_HEX
        && s.starts_with(RID_PREFIX)
        && s[RID_PREFIX.len()..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn session_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "_+=,.@-".contains(c)
}

/// Map a claim onto the session-name alphabet (`/` and everything else outside it become `.`
/// and `_`), without runs of replacement characters.
fn sanitise_session_part(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        let m = if session_char(c) {
            c
        } else if c == '/' {
            '.'
        } else {
            '_'
        };
        if m == '_' && out.ends_with('_') {
            continue;
        }
        out.push(m);
    }
    out
}

/// The role session name (and source identity) for a job and a resource id.
pub fn session_name(job: &JobAttribution, rid: &str) -> String {
    let repo = sanitise_session_part(job.repository.as_deref().unwrap_or("job"));
    let run = sanitise_session_part(job.run_id.as_deref().unwrap_or(""));
    let room = MAX_SESSION_NAME.saturating_sub(rid.len() + 1);
    // The run id is the more useful part in CloudTrail once the repository is known to be
    // long; keep up to 20 characters of it, give the rest to the repository.
    let run: String = run.chars().take(20).collect();
    let run_part = if run.is_empty() {
        String::new()
    } else {
        format!("@{run}")
    };
    let repo_room = room.saturating_sub(run_part.len());
    let repo: String = repo.chars().take(repo_room).collect();
    let mut name = format!("{repo}{run_part}.{rid}");
    if name.len() > MAX_SESSION_NAME {
        name = name[name.len() - MAX_SESSION_NAME..].to_owned();
    }
    name
}

fn tag_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || " _.:/=+-@".contains(c)
}

/// A claim value as a session tag value.
pub fn tag_value(s: &str) -> String {
    s.chars()
        .map(|c| if tag_char(c) { c } else { '_' })
        .take(MAX_TAG_VALUE)
        .collect()
}

/// Session tags for a job: (key, value), only for claims the token has.
pub fn session_tags(job: &JobAttribution) -> Vec<(&'static str, String)> {
    [
        ("repository", &job.repository),
        ("repository_id", &job.repository_id),
        ("workflow", &job.workflow),
        ("run_id", &job.run_id),
        ("ref", &job.git_ref),
    ]
    .into_iter()
    .filter_map(|(k, v)| v.as_deref().map(|v| (k, tag_value(v))))
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid_session(s: &str) -> bool {
        (2..=MAX_SESSION_NAME).contains(&s.len()) && s.chars().all(session_char)
    }

    fn job(repo: &str, run: &str) -> JobAttribution {
        JobAttribution {
            repository: Some(repo.into()),
            run_id: Some(run.into()),
            ..Default::default()
        }
    }

    #[test]
    fn resource_ids_are_deterministic_and_distinct() {
        let g = Uuid::now_v7();
        let a = resource_id(g, "aws-deploy");
        assert_eq!(a, resource_id(g, "aws-deploy"));
        assert_ne!(a, resource_id(g, "aws-read"));
        assert_ne!(a, resource_id(Uuid::now_v7(), "aws-deploy"));
        assert!(is_resource_id(&a), "{a}");
        for bad in ["brk-*", "brk-0123456789abcdeF", "xbrk-0123456789abcdef", ""] {
            assert!(!is_resource_id(bad), "{bad}");
        }
    }

    #[test]
    fn session_names_carry_the_job_and_end_with_the_resource_id() {
        let rid = resource_id(Uuid::now_v7(), "c");
        let n = session_name(&job("acme/api", "1234567890"), &rid);
        assert_eq!(n, format!("acme.api@1234567890.{rid}"));
        assert!(valid_session(&n));
        assert_eq!(
            session_name(&JobAttribution::default(), &rid),
            format!("job.{rid}")
        );
    }

    #[test]
    fn hostile_claims_give_valid_bounded_names() {
        let rid = resource_id(Uuid::now_v7(), "c");
        for (repo, run) in [
            ("evil\"},{\"Effect\":\"Allow\"}/x", "1; rm -rf /"),
            ("ünïcødé/☃☃☃", "∞"),
            (&"a".repeat(300), &"9".repeat(300)),
            ("*", "?"),
            ("x/brk-0000000000000000", "1"),
        ] {
            let n = session_name(&job(repo, run), &rid);
            assert!(valid_session(&n), "{n}");
            assert!(n.ends_with(&rid), "{n}");
            assert!(!n.contains('*') && !n.contains('?') && !n.contains('"'));
        }
        let long = session_name(&job(&"a".repeat(300), &"9".repeat(300)), &rid);
        assert_eq!(long.len(), MAX_SESSION_NAME);
        assert!(long.contains(&format!("@{}", "9".repeat(20))), "{long}");
    }

    #[test]
    fn tags_follow_aws_rules() {
        let mut j = job("acme/api", "42");
        j.git_ref = Some("refs/heads/feat/ünï\"code\n".into());
        j.workflow = Some("x".repeat(400));
        let tags = session_tags(&j);
        let keys: Vec<&str> = tags.iter().map(|(k, _)| *k).collect();
        assert_eq!(keys, ["repository", "workflow", "run_id", "ref"]);
        for (_, v) in &tags {
            assert!(v.len() <= MAX_TAG_VALUE && v.chars().all(tag_char), "{v}");
        }
        assert_eq!(tags[3].1, "refs/heads/feat/_n__code_");
        assert_eq!(tags[0].1, "acme/api");
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    fn claim() -> impl Strategy<Value = Option<String>> {
        proptest::option::of(prop_oneof![
            any::<String>(),
            "[a-zA-Z0-9/._*?\"'{},@ -]{0,300}",
        ])
    }

    fn job() -> impl Strategy<Value = JobAttribution> {
        (claim(), claim(), claim(), claim(), claim()).prop_map(
            |(repository, repository_id, workflow, run_id, git_ref)| JobAttribution {
                repository,
                repository_id,
                workflow,
                run_id,
                git_ref,
                ..Default::default()
            },
        )
    }

    proptest! {
        /// For any claims: the session name (= SourceIdentity) fits AWS (2..=64 characters of
        /// `[\w+=,.@-]`) and ends with this grant's resource id, so the deny pattern
        /// `*<resource id>` matches it and no claim can imitate another grant's suffix.
        #[test]
        fn session_names_are_valid_for_any_claims(job in job(), gid in any::<u128>(), cred in "[a-z-]{1,20}") {
            let rid = resource_id(Uuid::from_u128(gid), &cred);
            prop_assert!(is_resource_id(&rid));
            let n = session_name(&job, &rid);
            prop_assert!((2..=MAX_SESSION_NAME).contains(&n.len()), "{}", n);
            prop_assert!(n.chars().all(session_char), "{}", n);
            prop_assert!(n.ends_with(&format!(".{rid}")), "{}", n);
        }

        /// Tags: fixed keys, values of at most 256 characters from AWS's tag alphabet, each
        /// character either the claim's own or `_` (nothing else is made up or let through).
        #[test]
        fn session_tags_are_valid_for_any_claims(job in job()) {
            for (k, v) in session_tags(&job) {
                prop_assert!(["repository", "repository_id", "workflow", "run_id", "ref"].contains(&k));
                prop_assert!(v.chars().count() <= MAX_TAG_VALUE && v.len() <= MAX_TAG_VALUE);
                prop_assert!(v.chars().all(tag_char), "{}", v);
                let src = match k {
                    "repository" => &job.repository,
                    "repository_id" => &job.repository_id,
                    "workflow" => &job.workflow,
                    "run_id" => &job.run_id,
                    _ => &job.git_ref,
                };
                let src = src.as_deref().unwrap_or_default();
                for (o, i) in v.chars().zip(src.chars()) {
                    prop_assert!(o == i || o == '_');
                }
            }
        }
    }
}

//! `GET /v1/audit`: auditors and admins read the audit log back, filtered and in cursor pages.
//!
//! Invariants:
//! - Parameters are parsed here into a [`crate::store::AuditFilter`]; the store applies every
//!   filter in SQL (bound parameters, never string-built), so a page is the same whatever the
//!   log size.
//! - Every query, answered or refused, is itself audited with the operator (an unanswerable
//!   audit write turns the call into 503, so nothing is read unrecorded).
//! - The cursor is opaque to callers: the decimal sequence number of the last event returned.

use crate::audit::AuditEvent;
use crate::providers::CredentialKind;
use crate::store::AuditFilter;
use serde::Serialize;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use uuid::Uuid;

/// Page size when the caller gives none.
pub const DEFAULT_AUDIT_LIMIT: u32 = 100;
/// Largest page a caller may ask for.
pub const MAX_AUDIT_LIMIT: u32 = 1000;
/// Longest accepted value of a string filter (bytes); real values are far shorter.
const MAX_VALUE: usize = 1024;

/// The query parameters `GET /v1/audit` accepts.
pub const AUDIT_PARAMS: [&str; 14] = [
    "since",
    "until",
    "repository",
    "repository_id",
    "actor",
    "credential",
    "kind",
    "outcome",
    "reason",
    "verified",
    "grant_id",
    "request_id",
    "limit",
    "cursor",
];

const OUTCOMES: [&str; 5] = ["allow", "deny", "error", "success", "failure"];

/// One page of the answer.
#[derive(Debug, Clone, Serialize)]
pub struct AuditQueryPage {
    pub events: Vec<AuditEvent>,
    /// Pass back as `cursor` for the next (older) page; absent on the last page.
    pub next_cursor: Option<String>,
}

/// Parse `(name, value)` query pairs into a filter. Unknown or repeated names, unparseable
/// values and out-of-range limits are refused (never silently ignored: a typo in a filter
/// must not widen the result).
/// Why `GET /v1/audit`'s parameters were refused (answered as 400 `bad_request`). The text names
/// the parameter, never more than 64 printable characters of what the caller sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuditQueryError {
    #[error("unknown parameter {0:?}")]
    UnknownParameter(String),
    #[error("{0}: given more than once")]
    Repeated(&'static str),
    #[error("{0}: must be 1 to {MAX_VALUE} bytes")]
    Length(&'static str),
    #[error("{0}: not an RFC 3339 time (e.g. 2026-01-31T12:00:00Z)")]
    Time(&'static str),
    #[error("kind: unknown kind {0:?}")]
    UnknownKind(String),
    #[error("outcome: one of {}", OUTCOMES.join(", "))]
    Outcome,
    #[error("verified: true or false")]
    Verified,
    #[error("grant_id: not a UUID")]
    GrantId,
    #[error("limit: an integer from 1 to {MAX_AUDIT_LIMIT}")]
    Limit,
    #[error("cursor: not a cursor this API returned")]
    Cursor,
    #[error("since: must be before until")]
    SinceAfterUntil,
}

pub fn parse_audit_query(pairs: &[(String, String)]) -> Result<AuditFilter, AuditQueryError> {
    let mut f = AuditFilter {
        limit: DEFAULT_AUDIT_LIMIT,
        ..AuditFilter::default()
    };
    let mut seen = std::collections::BTreeSet::new();
    for (name, value) in pairs {
        let Some(&name) = AUDIT_PARAMS.iter().find(|p| **p == name.as_str()) else {
            let shown: String = name.chars().filter(|c| !c.is_control()).take(64).collect();
            return Err(AuditQueryError::UnknownParameter(shown));
        };
        if !seen.insert(name) {
            return Err(AuditQueryError::Repeated(name));
        }
        if value.is_empty() || value.len() > MAX_VALUE {
            return Err(AuditQueryError::Length(name));
        }
        let text = Some(value.clone());
        match name {
            "since" => f.since = Some(parse_time(name, value)?),
            "until" => f.until = Some(parse_time(name, value)?),
            "repository" => f.repository = text,
            "repository_id" => f.repository_id = text,
            "actor" => f.actor = text,
            "credential" => f.credential = text,
            "kind" => {
                CredentialKind::parse(value)
                    .ok_or_else(|| AuditQueryError::UnknownKind(value.clone()))?;
                f.kind = text;
            }
            "outcome" => {
                if !OUTCOMES.contains(&value.as_str()) {
                    return Err(AuditQueryError::Outcome);
                }
                f.outcome = text;
            }
            "reason" => f.reason = text,
            "verified" => {
                f.verified = Some(match value.as_str() {
                    "true" => true,
                    "false" => false,
                    _ => return Err(AuditQueryError::Verified),
                });
            }
            "grant_id" => {
                f.grant_id = Some(Uuid::parse_str(value).map_err(|_| AuditQueryError::GrantId)?);
            }
            "request_id" => f.request_id = text,
            "limit" => {
                f.limit = value
                    .parse::<u32>()
                    .ok()
                    .filter(|n| (1..=MAX_AUDIT_LIMIT).contains(n))
                    .ok_or(AuditQueryError::Limit)?;
            }
            "cursor" => {
                f.cursor = Some(
                    value
                        .parse::<i64>()
                        .ok()
                        .filter(|n| *n > 0)
                        .ok_or(AuditQueryError::Cursor)?,
                );
            }
            _ => return Err(AuditQueryError::UnknownParameter(name.to_owned())),
        }
    }
    if let (Some(s), Some(u)) = (f.since, f.until)
        && s >= u
    {
        return Err(AuditQueryError::SinceAfterUntil);
    }
    Ok(f)
}

fn parse_time(name: &'static str, value: &str) -> Result<OffsetDateTime, AuditQueryError> {
    OffsetDateTime::parse(value, &Rfc3339).map_err(|_| AuditQueryError::Time(name))
}

/// The filter as audit detail: which filters were set (values are operator-supplied and
/// non-secret; JSON encoding escapes control characters).
pub(crate) fn describe(f: &AuditFilter) -> String {
    let time = |t: Option<OffsetDateTime>| t.and_then(|t| t.format(&Rfc3339).ok());
    let v = serde_json::json!({
        "since": time(f.since),
        "until": time(f.until),
        "repository": f.repository,
        "repository_id": f.repository_id,
        "actor": f.actor,
        "credential": f.credential,
        "kind": f.kind,
        "outcome": f.outcome,
        "reason": f.reason,
        "verified": f.verified,
        "grant_id": f.grant_id,
        "request_id": f.request_id,
        "cursor": f.cursor,
        "limit": f.limit,
    });
    let set: serde_json::Map<String, serde_json::Value> = v
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(_, v)| !v.is_null())
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    serde_json::Value::Object(set).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(pairs: &[(&str, &str)]) -> Result<AuditFilter, AuditQueryError> {
        let owned: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        parse_audit_query(&owned)
    }

    #[test]
    fn parses_every_filter() {
        let id = Uuid::now_v7().to_string();
        let f = q(&[
            ("since", "2026-01-01T00:00:00Z"),
            ("until", "2026-01-08T00:00:00+01:00"),
            ("repository", "acme/app"),
            ("repository_id", "42"),
            ("actor", "operator:alice"),
            ("credential", "deploy"),
            ("kind", "postgres"),
            ("outcome", "deny"),
            ("reason", "policy_denied"),
            ("grant_id", &id),
            ("request_id", "req-1"),
            ("limit", "1000"),
            ("cursor", "77"),
        ])
        .unwrap();
        assert_eq!(f.since.unwrap().unix_timestamp(), 1_767_225_600);
        assert_eq!(f.until.unwrap().unix_timestamp(), 1_767_826_800);
        assert_eq!(f.repository.as_deref(), Some("acme/app"));
        assert_eq!(f.repository_id.as_deref(), Some("42"));
        assert_eq!(f.actor.as_deref(), Some("operator:alice"));
        assert_eq!(f.credential.as_deref(), Some("deploy"));
        assert_eq!(f.kind.as_deref(), Some("postgres"));
        assert_eq!(f.outcome.as_deref(), Some("deny"));
        assert_eq!(f.reason.as_deref(), Some("policy_denied"));
        assert_eq!(f.grant_id.map(|g| g.to_string()), Some(id));
        assert_eq!(f.request_id.as_deref(), Some("req-1"));
        assert_eq!(f.limit, 1000);
        assert_eq!(f.cursor, Some(77));
    }

    #[test]
    fn defaults_to_a_bounded_page() {
        let f = q(&[]).unwrap();
        assert_eq!(f.limit, DEFAULT_AUDIT_LIMIT);
        assert!(f.cursor.is_none() && f.since.is_none() && f.repository.is_none());
    }

    #[test]
    fn refuses_what_would_widen_or_break_the_query() {
        for bad in [
            &[("repo", "acme/app")][..],
            &[("repository", "a"), ("repository", "b")],
            &[("repository", "")],
            &[("limit", "0")],
            &[("limit", "1001")],
            &[("limit", "-1")],
            &[("cursor", "abc")],
            &[("cursor", "0")],
            &[("since", "yesterday")],
            &[
                ("since", "2026-01-02T00:00:00Z"),
                ("until", "2026-01-01T00:00:00Z"),
            ],
            &[("kind", "ssh")],
            &[("outcome", "maybe")],
            &[("grant_id", "not-a-uuid")],
        ] {
            assert!(q(bad).is_err(), "{bad:?} accepted");
        }
        let long = "x".repeat(MAX_VALUE + 1);
        assert!(q(&[("actor", &long)]).is_err());
    }

    #[test]
    fn describe_lists_only_the_filters_set() {
        let f = q(&[("repository", "acme/app"), ("limit", "5")]).unwrap();
        assert_eq!(describe(&f), r#"{"limit":5,"repository":"acme/app"}"#);
    }
}

//! Text the store cannot hold: the one boundary that decides what outside text may reach it.
//!
//! Why: Postgres refuses a NUL anywhere in `text` (SQLSTATE 22021) and a `\u0000` escape in
//! `jsonb` (22P05). A refused statement aborts its whole transaction, and the chain-appending
//! writes ride a group commit (`group_commit.rs`), so one NUL in a credential name, a body key,
//! a claim or an audit query would fail a batch of honest exchanges with it, unaudited.
//!
//! Two rules, by where the text comes from:
//! - **Request text** (credential names, body keys and values, audit query parameters) is
//!   *checked* by [`check`] / [`check_json`]: a control character (NUL, C0, DEL, C1) or a value
//!   longer than [`MAX_TEXT`] bytes is refused with [`TextError`], which the HTTP layer answers
//!   with 400 `invalid_text` after auditing the refusal (with the value [`shown`] escaped,
//!   never raw). Lone surrogates cannot reach a Rust string: the JSON reader refuses them, and
//!   [`is_surrogate_error`] lets the HTTP layer give that refusal the same code.
//! - **Signed text** (claims the issuer signed, and whatever is derived from them: audit
//!   attribution, grant subject, job key, `jti`) is a fact about the job and must be recorded,
//!   so it is *escaped* by [`escape`], never dropped: every control character except tab,
//!   newline and carriage return becomes the visible `\u{XX}` form. The store applies
//!   [`escape_event`], [`escape_grant`] and [`escape_jti`] to everything it writes, on both
//!   backends, so no caller can bring a NUL to a statement. Escaping is deterministic, so a
//!   replayed `jti` still meets its own record, and filters are escaped the same way
//!   ([`escape_opt`]) so they find what was stored.
//!
//! Invariant: nothing this module returns or displays contains the raw offending character.

use super::{AuditFilter, FreezeRecord, GrantSelect, JobMatch, JtiRecord, NewGrant};
use crate::audit::AuditEvent;
use serde_json::Value;
use std::borrow::Cow;

/// Longest request-supplied string the broker accepts (bytes). Real credential names are at
/// most 64 bytes and filter values far shorter; anything longer is an attack or a bug.
pub const MAX_TEXT: usize = 1024;

/// Longest excerpt of a refused value kept in an audit event (bytes, before the ellipsis).
pub const MAX_SHOWN: usize = 64;

/// Request text the store cannot hold. Its `Display` names the field and the problem, never the
/// value (it is what the caller is told); [`TextError::detail`] adds the value as [`shown`],
/// for the audit event and the log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct TextError {
    /// Our own name for where the text came from (`credentials: a name`, `request body: a key`).
    pub field: String,
    pub problem: Problem,
    /// The value escaped and cut short ([`shown`]); never the raw value.
    pub shown: String,
}

/// What is wrong with the text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    /// A control character (U+0000-U+001F, U+007F-U+009F).
    #[error("contains control character U+{0:04X}")]
    Control(u32),
    /// Longer than [`MAX_TEXT`] bytes.
    #[error("longer than {MAX_TEXT} bytes")]
    TooLong,
    /// A `\u` escape naming half of a surrogate pair (not a character).
    #[error("contains a lone surrogate escape")]
    Surrogate,
}

impl TextError {
    pub(crate) fn new(field: &str, problem: Problem, value: &str) -> Self {
        Self {
            field: field.to_owned(),
            problem,
            shown: shown(value),
        }
    }

    /// Stable reason code (HTTP error body and audit `reason`).
    pub fn reason_code(&self) -> &'static str {
        "invalid_text"
    }

    /// For the audit event and the log: the problem and the value, escaped and cut short.
    pub fn detail(&self) -> String {
        format!("{self}; value \"{}\"", self.shown)
    }
}

/// Check one request-supplied string. `field` is our own name for where it came from.
pub fn check(field: &str, value: &str) -> Result<(), TextError> {
    if value.len() > MAX_TEXT {
        return Err(TextError::new(field, Problem::TooLong, value));
    }
    match value.chars().find(|c| c.is_control() && *c != '\t') {
        Some(c) => Err(TextError::new(field, Problem::Control(u32::from(c)), value)),
        None => Ok(()),
    }
}

/// Check every key and string value of a request body, at any depth (a tab is accepted in
/// values, never in keys).
pub fn check_json(field: &str, v: &Value) -> Result<(), TextError> {
    match v {
        Value::String(s) => check(field, s),
        Value::Array(items) => items.iter().try_for_each(|i| check_json(field, i)),
        Value::Object(map) => map.iter().try_for_each(|(k, inner)| {
            let key = format!("{field}: a key");
            check(&key, k)?;
            if k.contains('\t') {
                return Err(TextError::new(&key, Problem::Control(9), k));
            }
            check_json(field, inner)
        }),
        _ => Ok(()),
    }
}

/// Whether a JSON reader's error is a lone surrogate escape (`"\ud800"`), which is text the
/// store could not hold rather than malformed JSON. serde_json has no public error kind for it,
/// so its (stable) messages are matched.
pub fn is_surrogate_error(e: &serde_json::Error) -> bool {
    let m = e.to_string();
    m.contains("surrogate") || m.contains("end of hex escape")
}

fn needs_escape(c: char) -> bool {
    c.is_control() && !matches!(c, '\t' | '\n' | '\r')
}

/// Signed text made storable: control characters other than tab, newline and carriage return
/// become `\u{XX}` (visible, and never a NUL). Borrowed when nothing needs escaping.
pub fn escape(s: &str) -> Cow<'_, str> {
    if !s.chars().any(needs_escape) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if needs_escape(c) {
            out.push_str(&format!("\\u{{{:x}}}", u32::from(c)));
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// A refused value as an audit event may show it: escaped and cut to [`MAX_SHOWN`] bytes.
pub fn shown(s: &str) -> String {
    let e = escape(s);
    if e.len() <= MAX_SHOWN {
        return e.into_owned();
    }
    format!(
        "{}… ({} bytes)",
        &e[..e.floor_char_boundary(MAX_SHOWN)],
        s.len()
    )
}

fn dirty(s: &str) -> bool {
    s.chars().any(needs_escape)
}

fn dirty_opt(s: &Option<String>) -> bool {
    s.as_deref().is_some_and(dirty)
}

fn dirty_json(v: &Value) -> bool {
    match v {
        Value::String(s) => dirty(s),
        Value::Array(items) => items.iter().any(dirty_json),
        Value::Object(map) => map.iter().any(|(k, v)| dirty(k) || dirty_json(v)),
        _ => false,
    }
}

fn fix(s: &mut String) {
    if let Cow::Owned(e) = escape(s) {
        *s = e;
    }
}

fn fix_opt(s: &mut Option<String>) {
    if let Some(s) = s {
        fix(s);
    }
}

/// A filter value escaped like stored text, so it matches what was stored.
pub fn escape_opt(s: &Option<String>) -> Option<String> {
    s.as_deref().map(|s| escape(s).into_owned())
}

/// Every key and string of a JSON value escaped.
pub fn escape_json(v: &Value) -> Cow<'_, Value> {
    if !dirty_json(v) {
        return Cow::Borrowed(v);
    }
    Cow::Owned(escaped_json(v))
}

fn escaped_json(v: &Value) -> Value {
    match v {
        Value::String(s) => Value::String(escape(s).into_owned()),
        Value::Array(items) => Value::Array(items.iter().map(escaped_json).collect()),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (escape(k).into_owned(), escaped_json(v)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// An audit event with every string escaped (borrowed when nothing needs it, the common case).
pub fn escape_event(ev: &AuditEvent) -> Cow<'_, AuditEvent> {
    let j = &ev.job;
    let dirty_event = [
        &ev.request_id,
        &ev.client_addr,
        &ev.user_agent,
        &ev.actor,
        &ev.detail,
        &ev.bundle_digest,
        &j.issuer,
        &j.platform,
        &j.iss,
        &j.sub,
        &j.repository,
        &j.repository_id,
        &j.owner,
        &j.owner_id,
        &j.git_ref,
        &j.sha,
        &j.workflow,
        &j.job_workflow_ref,
        &j.run_id,
        &j.run_attempt,
        &j.job_id,
        &j.actor,
        &j.event,
        &j.environment,
        &j.runner_environment,
    ]
    .into_iter()
    .any(dirty_opt)
        || dirty(&ev.reason)
        || [
            &ev.rules_matched,
            &ev.credentials_requested,
            &ev.credentials_granted,
            &ev.resource_ids,
        ]
        .into_iter()
        .flatten()
        .any(|s| dirty(s));
    if !dirty_event {
        return Cow::Borrowed(ev);
    }
    let mut e = ev.clone();
    let j = &mut e.job;
    for s in [
        &mut e.request_id,
        &mut e.client_addr,
        &mut e.user_agent,
        &mut e.actor,
        &mut e.detail,
        &mut e.bundle_digest,
        &mut j.issuer,
        &mut j.platform,
        &mut j.iss,
        &mut j.sub,
        &mut j.repository,
        &mut j.repository_id,
        &mut j.owner,
        &mut j.owner_id,
        &mut j.git_ref,
        &mut j.sha,
        &mut j.workflow,
        &mut j.job_workflow_ref,
        &mut j.run_id,
        &mut j.run_attempt,
        &mut j.job_id,
        &mut j.actor,
        &mut j.event,
        &mut j.environment,
        &mut j.runner_environment,
    ] {
        fix_opt(s);
    }
    fix(&mut e.reason);
    for list in [
        &mut e.rules_matched,
        &mut e.credentials_requested,
        &mut e.credentials_granted,
        &mut e.resource_ids,
    ] {
        list.iter_mut().for_each(fix);
    }
    Cow::Owned(e)
}

/// A grant with every string escaped (its job key and credential details included).
pub fn escape_grant(g: &NewGrant) -> Cow<'_, NewGrant> {
    let dirty_grant = [&g.issuer, &g.subject, &g.bundle_digest, &g.revocation_hash]
        .into_iter()
        .any(|s| dirty(s))
        || dirty_opt(&g.repository)
        || dirty_opt(&g.repository_id)
        || dirty_json(&g.job)
        || g.credentials
            .iter()
            .any(|c| dirty(&c.name) || dirty(&c.resource_id) || dirty_json(&c.details));
    if !dirty_grant {
        return Cow::Borrowed(g);
    }
    let mut e = g.clone();
    for s in [
        &mut e.issuer,
        &mut e.subject,
        &mut e.bundle_digest,
        &mut e.revocation_hash,
    ] {
        fix(s);
    }
    fix_opt(&mut e.repository);
    fix_opt(&mut e.repository_id);
    e.job = escaped_json(&g.job);
    for c in &mut e.credentials {
        fix(&mut c.name);
        fix(&mut c.resource_id);
        c.details = escaped_json(&c.details);
    }
    Cow::Owned(e)
}

/// A replay record with its `iss` and `jti` escaped.
pub fn escape_jti(j: &JtiRecord) -> Cow<'_, JtiRecord> {
    if !dirty(&j.iss) && !dirty(&j.jti) {
        return Cow::Borrowed(j);
    }
    Cow::Owned(JtiRecord {
        iss: escape(&j.iss).into_owned(),
        jti: escape(&j.jti).into_owned(),
        expires_at: j.expires_at,
    })
}

/// Credential details (activation) with every string escaped.
pub fn escape_details(details: &[Value]) -> Cow<'_, [Value]> {
    if !details.iter().any(dirty_json) {
        return Cow::Borrowed(details);
    }
    Cow::Owned(details.iter().map(escaped_json).collect())
}

/// An audit filter with its text escaped as stored text is, so a filter value reaches SQL only
/// in a form the store can hold, and finds what was stored escaped.
pub fn escape_filter(f: &AuditFilter) -> AuditFilter {
    AuditFilter {
        request_id: escape_opt(&f.request_id),
        repository: escape_opt(&f.repository),
        outcome: escape_opt(&f.outcome),
        reason: escape_opt(&f.reason),
        repository_id: escape_opt(&f.repository_id),
        actor: escape_opt(&f.actor),
        credential: escape_opt(&f.credential),
        kind: escape_opt(&f.kind),
        ..f.clone()
    }
}

/// A revoke-all selection with its text escaped (as [`escape_filter`]).
pub fn escape_select(select: &GrantSelect) -> GrantSelect {
    GrantSelect {
        issuer: escape_opt(&select.issuer),
        repository: escape_opt(&select.repository),
        repository_id: escape_opt(&select.repository_id),
        credential: escape_opt(&select.credential),
        kind: escape_opt(&select.kind),
        ..select.clone()
    }
}

/// A job match with its text escaped (as [`escape_filter`]).
pub fn escape_job(job: &JobMatch) -> JobMatch {
    let e = |s: &str| escape(s).into_owned();
    JobMatch {
        issuers: job.issuers.iter().map(|s| e(s)).collect(),
        platform: e(&job.platform),
        repository_id: e(&job.repository_id),
        job_id: e(&job.job_id),
        run_id: escape_opt(&job.run_id),
        run_attempt: escape_opt(&job.run_attempt),
    }
}

/// A freeze with its text escaped.
pub fn escape_freeze(f: &FreezeRecord) -> FreezeRecord {
    FreezeRecord {
        filter: escape_json(&f.filter).into_owned(),
        reason: escape(&f.reason).into_owned(),
        actor: escape(&f.actor).into_owned(),
        since: f.since,
    }
}

/// Events escaped as [`escape_event`], copied only when one needs it (revoke-all pages hold a
/// thousand).
pub fn escape_events(audits: &[AuditEvent]) -> Cow<'_, [AuditEvent]> {
    if audits
        .iter()
        .any(|a| matches!(escape_event(a), Cow::Owned(_)))
    {
        Cow::Owned(
            audits
                .iter()
                .map(|a| escape_event(a).into_owned())
                .collect(),
        )
    } else {
        Cow::Borrowed(audits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{Action, Outcome};
    use serde_json::json;

    #[test]
    fn request_text_with_controls_or_too_long_is_refused() {
        assert!(check("name", "deploy").is_ok());
        assert!(check("name", "tab\tok").is_ok());
        assert!(check("name", &"x".repeat(MAX_TEXT)).is_ok());
        for (bad, code) in [
            ("a\0b", 0),
            ("bell\u{7}", 7),
            ("nl\n", 10),
            ("del\u{7f}", 0x7f),
            ("c1\u{85}", 0x85),
        ] {
            let e = check("name", bad).unwrap_err();
            assert_eq!(e.problem, Problem::Control(code));
            assert_eq!(e.field, "name");
            assert_eq!(e.reason_code(), "invalid_text");
            assert!(!e.to_string().contains(bad), "never echoes the value");
            assert!(!e.detail().chars().any(needs_escape), "{}", e.detail());
        }
        let e = check("name", &"x".repeat(MAX_TEXT + 1)).unwrap_err();
        assert_eq!(e.problem, Problem::TooLong);
        assert!(e.detail().len() < 200, "the detail shows a bounded excerpt");
    }

    #[test]
    fn json_keys_and_values_are_checked_at_any_depth() {
        assert!(check_json("body", &json!({"credentials": ["a"], "ttl": "15m"})).is_ok());
        for bad in [
            json!({"tt\u{0}l": "15m"}),
            json!({"credentials": ["ok", "n\u{0}ul"]}),
            json!({"a": {"b": [{"c\u{1b}": 1}]}}),
            json!({"k\tey": 1}),
            json!({"credentials": ["x".repeat(MAX_TEXT + 1)]}),
        ] {
            assert!(check_json("body", &bad).is_err(), "{bad} accepted");
        }
    }

    /// What serde_json does with surrogate escapes (checked, not assumed): a lone one is an
    /// error we recognise; a proper pair is a character; `\u0000` is accepted (hence [`check`]).
    #[test]
    fn json_reader_refuses_lone_surrogates_and_accepts_nul() {
        for lone in [
            r#""\ud800""#,
            r#""\udc00""#,
            r#""\ud800x""#,
            r#""\ud800\u0041""#,
        ] {
            let e = serde_json::from_str::<String>(lone).unwrap_err();
            assert!(is_surrogate_error(&e), "{lone}: {e}");
        }
        let pair: String = serde_json::from_str(r#""\ud83d\ude00""#).unwrap();
        assert_eq!(pair, "\u{1f600}");
        let nul: String = serde_json::from_str(r#""a\u0000b""#).unwrap();
        assert_eq!(nul, "a\0b");
        let other = serde_json::from_str::<String>("\"x").unwrap_err();
        assert!(!is_surrogate_error(&other));
    }

    #[test]
    fn signed_text_is_escaped_visibly_never_dropped() {
        assert!(matches!(escape("plain ünïcode"), Cow::Borrowed(_)));
        assert_eq!(escape("a\0b"), "a\\u{0}b");
        assert_eq!(escape("esc\u{1b}[31m"), "esc\\u{1b}[31m");
        assert_eq!(escape("keep\t\n\r"), "keep\t\n\r");
        assert_eq!(escape("\u{7f}\u{9f}"), "\\u{7f}\\u{9f}");
        // Deterministic, so a replayed jti meets its own record.
        assert_eq!(escape("j\0ti"), escape("j\0ti"));
    }

    #[test]
    fn shown_is_escaped_and_bounded() {
        assert_eq!(shown("a\0b"), "a\\u{0}b");
        let long = format!("{}\0", "é".repeat(600));
        let s = shown(&long);
        assert!(s.len() < MAX_SHOWN + 32, "{s}");
        assert!(s.ends_with("(1201 bytes)"), "{s}");
        assert!(!s.contains('\0'));
    }

    #[test]
    fn events_grants_and_jtis_are_escaped_everywhere() {
        let t = time::OffsetDateTime::UNIX_EPOCH;
        let clean = AuditEvent::new(t, Action::Exchange, Outcome::Deny, "bad_request");
        assert!(matches!(escape_event(&clean), Cow::Borrowed(_)));
        let mut ev = clean.clone();
        ev.credentials_requested = vec!["a\0".into()];
        ev.job.workflow = Some("w\0".into());
        ev.detail = Some("d\u{1}".into());
        let e = escape_event(&ev);
        assert_eq!(e.credentials_requested, vec!["a\\u{0}".to_owned()]);
        assert_eq!(e.job.workflow.as_deref(), Some("w\\u{0}"));
        assert_eq!(e.detail.as_deref(), Some("d\\u{1}"));
        let canonical = serde_json::to_string(&*e).unwrap();
        assert!(!canonical.contains("\\u0000") && !canonical.contains("\\u0001"));

        let g = NewGrant {
            id: uuid::Uuid::nil(),
            revocation_hash: "h".into(),
            issuer: "github".into(),
            subject: "repo:a\0".into(),
            repository: Some("acme/\0".into()),
            repository_id: Some("1".into()),
            job: json!({"run_id": "7\0", "k\0": null}),
            bundle_digest: "d".into(),
            created_at: t,
            expires_at: t,
            credentials: vec![],
        };
        let e = escape_grant(&g);
        assert_eq!(e.subject, "repo:a\\u{0}");
        assert_eq!(e.repository.as_deref(), Some("acme/\\u{0}"));
        assert_eq!(e.job, json!({"run_id": "7\\u{0}", "k\\u{0}": null}));
        let j = JtiRecord {
            iss: "i".into(),
            jti: "x\0".into(),
            expires_at: t,
        };
        assert_eq!(escape_jti(&j).jti, "x\\u{0}");
    }
}

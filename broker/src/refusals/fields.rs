//! Caps on the audit fields an unauthenticated caller controls.
//!
//! Invariant: a refusal's audit row costs the same whatever the caller sent. Every field whose
//! text comes from the request (header values, requested credential names, the refusal detail,
//! which may quote the request) is cut to a fixed number of bytes, on a character boundary, and
//! ends in `…` when cut; the event's `truncated` list names each field that was cut, so a
//! reader can tell a cut value from a short one. Values never exceed their cap, ellipsis
//! included. Events are capped where they are built from the request context (so allow events'
//! header fields too) and again, with the refusal's detail, before a refusal is audited.
//! (Control characters are a separate concern, handled at the store boundary.)

use crate::audit::AuditEvent;

/// `request_id` (the caller may send its own `X-Request-Id`).
pub const MAX_REQUEST_ID: usize = 128;
/// `user_agent`.
pub const MAX_USER_AGENT: usize = 256;
/// Each of `credentials_requested` (a valid name is at most 64 characters of `[a-z0-9_-]`).
pub const MAX_CREDENTIAL_NAME: usize = 64;
/// `detail` (fixed text plus at most a bounded quote of the request).
pub const MAX_DETAIL: usize = 512;

const ELLIPSIS: &str = "…";

/// `s` cut to at most `max` bytes (ellipsis included), or `None` if it already fits.
pub fn cut(s: &str, max: usize) -> Option<String> {
    if s.len() <= max {
        return None;
    }
    let end = s.floor_char_boundary(max.saturating_sub(ELLIPSIS.len()));
    Some(format!("{}{ELLIPSIS}", &s[..end]))
}

fn cap(field: &'static str, v: &mut String, max: usize, truncated: &mut Vec<String>) {
    if let Some(c) = cut(v, max) {
        *v = c;
        if !truncated.iter().any(|t| t == field) {
            truncated.push(field.to_owned());
        }
    }
}

/// Cap every request-controlled field of a refusal's event, flagging each one cut.
pub fn cap_event(ev: &mut AuditEvent) {
    let mut truncated = std::mem::take(&mut ev.truncated);
    if let Some(v) = ev.request_id.as_mut() {
        cap("request_id", v, MAX_REQUEST_ID, &mut truncated);
    }
    if let Some(v) = ev.user_agent.as_mut() {
        cap("user_agent", v, MAX_USER_AGENT, &mut truncated);
    }
    for v in &mut ev.credentials_requested {
        cap(
            "credentials_requested",
            v,
            MAX_CREDENTIAL_NAME,
            &mut truncated,
        );
    }
    if let Some(v) = ev.detail.as_mut() {
        cap("detail", v, MAX_DETAIL, &mut truncated);
    }
    ev.truncated = truncated;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{Action, Outcome};

    #[test]
    fn cut_keeps_short_values_and_bounds_long_ones_on_char_boundaries() {
        assert_eq!(cut("abc", 3), None);
        assert_eq!(cut("abcd", 3).as_deref(), Some("…"));
        let long = "é".repeat(100); // 200 bytes
        let c = cut(&long, 64).unwrap();
        assert!(c.len() <= 64, "{}", c.len());
        assert!(c.ends_with('…'));
        assert!(c.starts_with("éé"));
    }

    #[test]
    fn every_request_field_is_capped_and_flagged_once() {
        let mut ev = AuditEvent::new(
            time::OffsetDateTime::UNIX_EPOCH,
            Action::Exchange,
            Outcome::Deny,
            "bad_request",
        );
        ev.request_id = Some("r".repeat(1000));
        ev.user_agent = Some("u".repeat(256)); // exactly at the cap: kept
        ev.credentials_requested = vec!["x".repeat(60_000), "ok".into(), "y".repeat(65)];
        ev.detail = Some("d".repeat(600));
        cap_event(&mut ev);
        assert_eq!(ev.request_id.as_ref().unwrap().len(), MAX_REQUEST_ID);
        assert_eq!(ev.user_agent.as_ref().unwrap().len(), MAX_USER_AGENT);
        assert!(
            ev.credentials_requested
                .iter()
                .all(|n| n.len() <= MAX_CREDENTIAL_NAME)
        );
        assert_eq!(ev.credentials_requested[1], "ok");
        assert!(ev.detail.as_ref().unwrap().len() <= MAX_DETAIL);
        assert_eq!(
            ev.truncated,
            vec!["request_id", "credentials_requested", "detail"]
        );
        // Capping again changes nothing.
        let before = ev.clone();
        cap_event(&mut ev);
        assert_eq!(ev, before);
    }
}

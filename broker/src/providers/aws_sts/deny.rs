//! The broker's deny policy on a brokered role: how revocation works for sessions that AWS
//! cannot delete.
//!
//! One inline policy per role, named [`DENY_POLICY_NAME`], owned by the broker. Its statements:
//! - `BrokerRevokeAll`: deny everything to sessions whose `aws:TokenIssueTime` is earlier than
//!   a time (revoke-all, the same mechanism as the console's "revoke active sessions").
//! - `BrokerSessions<T>` / `BrokerSources<T>`: deny everything to the listed sessions, matched
//!   by `aws:userid` (`<role id>:<session name>`) and by `sts:SourceIdentity` (sticky across
//!   role chaining). Values are `*<resource id>`: every session name and source identity the
//!   broker sets ends with the grant's resource id (see `naming`). `T` (unix seconds) is an
//!   upper bound on the expiry of every session listed: once `T` has passed (plus a skew
//!   margin) the statement denies nothing alive and is pruned.
//!
//! Invariants:
//! - A deny is never shortened: a session moves only to a bucket with a later `T`; merging
//!   buckets (to stay under IAM's size limit) keeps the later `T`.
//! - Statements the broker did not write are kept as they are.
//! - The document stays under [`MAX_INLINE_CHARS`] (IAM counts characters without whitespace;
//!   the compact JSON written here has none outside values, and values have none); if it cannot,
//!   the caller gets an error rather than a document IAM would refuse or a dropped deny.

use serde_json::{Map, Value, json};
use std::collections::{BTreeMap, BTreeSet};
use time::format_description::well_known::Rfc3339;
use time::{Duration, OffsetDateTime};

/// The broker-owned inline policy on every brokered role.
pub const DENY_POLICY_NAME: &str = "broker-revoked-sessions";
/// IAM's limit on a role's inline policies, in characters without whitespace.
pub const MAX_INLINE_CHARS: usize = 10_240;
/// Width of a bucket of revoked sessions: one pair of statements per hour of expiries.
const BUCKET_SECONDS: i64 = 3600;
/// Margin for clock skew between the broker and AWS before a deny is pruned.
const PRUNE_MARGIN: Duration = Duration::minutes(5);
const SID_ALL: &str = "BrokerRevokeAll";
const SID_SESSIONS: &str = "BrokerSessions";
const SID_SOURCES: &str = "BrokerSources";

/// Why the document could not be read or written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DenyError {
    #[error("the role's {DENY_POLICY_NAME} policy is not a policy document the broker can read")]
    Unreadable,
    #[error(
        "the role's {DENY_POLICY_NAME} policy would be {0} characters even after merging; IAM allows {MAX_INLINE_CHARS}"
    )]
    TooLarge(usize),
}

impl DenyError {
    pub fn reason_code(&self) -> &'static str {
        match self {
            DenyError::Unreadable => "deny_policy_unreadable",
            DenyError::TooLarge(_) => "deny_policy_full",
        }
    }
}

/// The deny policy of one role, as a model.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DenyDocument {
    /// Sessions issued before this are denied.
    pub revoke_all_before: Option<OffsetDateTime>,
    /// Bucket end (unix seconds) → resource ids of sessions expiring by then.
    buckets: BTreeMap<i64, BTreeSet<String>>,
    /// Statements the broker did not write.
    foreign: Vec<Value>,
}

/// Decode IAM's RFC 3986 percent-encoding of policy documents (`GetRolePolicy` returns the
/// document encoded; some implementations return it plain).
pub fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn ceil_bucket(t: OffsetDateTime) -> i64 {
    let s = t.unix_timestamp();
    s.div_euclid(BUCKET_SECONDS) * BUCKET_SECONDS
        + if s.rem_euclid(BUCKET_SECONDS) == 0 {
            0
        } else {
            BUCKET_SECONDS
        }
}

fn values(cond: &Value, op: &str, key: &str) -> Option<Vec<String>> {
    match cond.get(op)?.get(key)? {
        Value::String(s) => Some(vec![s.clone()]),
        Value::Array(a) => a.iter().map(|v| v.as_str().map(str::to_owned)).collect(),
        _ => None,
    }
}

impl DenyDocument {
    /// Parse the stored document (plain or percent-encoded JSON).
    pub fn parse(raw: &str) -> Result<Self, DenyError> {
        let text = if raw.trim_start().starts_with('{') {
            raw.to_owned()
        } else {
            percent_decode(raw).ok_or(DenyError::Unreadable)?
        };
        let v: Value = serde_json::from_str(&text).map_err(|_| DenyError::Unreadable)?;
        let stmts = match v.get("Statement") {
            Some(Value::Array(a)) => a.clone(),
            Some(o @ Value::Object(_)) => vec![o.clone()],
            _ => return Err(DenyError::Unreadable),
        };
        let mut doc = DenyDocument::default();
        for s in stmts {
            let sid = s.get("Sid").and_then(Value::as_str).unwrap_or("");
            let cond = s.get("Condition").cloned().unwrap_or(Value::Null);
            if sid == SID_ALL {
                let t = values(&cond, "DateLessThan", "aws:TokenIssueTime")
                    .and_then(|v| v.into_iter().next())
                    .and_then(|t| OffsetDateTime::parse(&t, &Rfc3339).ok())
                    .ok_or(DenyError::Unreadable)?;
                doc.revoke_all_before = Some(t);
            } else if let Some((prefix, key)) = [
                (SID_SESSIONS, "aws:userid"),
                (SID_SOURCES, "sts:SourceIdentity"),
            ]
            .into_iter()
            .find(|(p, _)| {
                sid.strip_prefix(p)
                    .is_some_and(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()))
            }) {
                let until: i64 = sid[prefix.len()..]
                    .parse()
                    .map_err(|_| DenyError::Unreadable)?;
                let list = values(&cond, "StringLike", key).ok_or(DenyError::Unreadable)?;
                let bucket = doc.buckets.entry(until).or_default();
                for p in list {
                    let rid = p.strip_prefix('*').ok_or(DenyError::Unreadable)?;
                    bucket.insert(rid.to_owned());
                }
            } else {
                doc.foreign.push(s);
            }
        }
        Ok(doc)
    }

    /// Whether `rid` is denied until at least `until`.
    pub fn denies(&self, rid: &str, until: OffsetDateTime) -> bool {
        self.buckets
            .range(until.unix_timestamp()..)
            .any(|(_, set)| set.contains(rid))
    }

    /// Deny the session with resource id `rid`, which expires by `until`. Returns whether the
    /// document changed (already denied long enough: no change).
    pub fn deny_session(&mut self, rid: &str, until: OffsetDateTime) -> bool {
        if self.denies(rid, until) {
            return false;
        }
        for set in self.buckets.values_mut() {
            set.remove(rid);
        }
        self.buckets
            .entry(ceil_bucket(until))
            .or_default()
            .insert(rid.to_owned());
        self.buckets.retain(|_, s| !s.is_empty());
        true
    }

    /// Deny every session issued before `before`. Returns whether the document changed.
    pub fn revoke_all(&mut self, before: OffsetDateTime) -> bool {
        // Stored in whole seconds; rounding up never lets a session issued before `before` by.
        let before = if before.nanosecond() == 0 {
            before
        } else {
            before.replace_nanosecond(0).unwrap_or(before) + Duration::seconds(1)
        };
        if self.revoke_all_before.is_some_and(|t| t >= before) {
            return false;
        }
        self.revoke_all_before = Some(before);
        true
    }

    /// Drop what denies nothing alive any more: buckets whose sessions have all expired, and a
    /// revoke-all older than the longest session the role allows. Returns whether it changed.
    pub fn prune(&mut self, now: OffsetDateTime, max_session: Duration) -> bool {
        let before = self.buckets.len();
        let cutoff = (now - PRUNE_MARGIN).unix_timestamp();
        self.buckets.retain(|until, _| *until >= cutoff);
        let mut changed = self.buckets.len() != before;
        if self
            .revoke_all_before
            .is_some_and(|t| t + max_session + PRUNE_MARGIN < now)
        {
            self.revoke_all_before = None;
            changed = true;
        }
        changed
    }

    /// Number of sessions listed.
    pub fn session_count(&self) -> usize {
        self.buckets.values().map(BTreeSet::len).sum()
    }

    /// Whether there is nothing left in the document.
    pub fn is_empty(&self) -> bool {
        self.revoke_all_before.is_none() && self.buckets.is_empty() && self.foreign.is_empty()
    }

    fn to_value(&self) -> Value {
        let mut stmts = self.foreign.clone();
        if let Some(t) = self.revoke_all_before {
            let t = t
                .to_offset(time::UtcOffset::UTC)
                .replace_nanosecond(0)
                .unwrap_or(t)
                .format(&Rfc3339)
                .unwrap_or_default();
            stmts.push(json!({
                "Sid": SID_ALL, "Effect": "Deny", "Action": "*", "Resource": "*",
                "Condition": {"DateLessThan": {"aws:TokenIssueTime": t}}
            }));
        }
        for (until, set) in &self.buckets {
            let list: Vec<String> = set.iter().map(|r| format!("*{r}")).collect();
            for (sid, key) in [
                (SID_SESSIONS, "aws:userid"),
                (SID_SOURCES, "sts:SourceIdentity"),
            ] {
                let mut cond = Map::new();
                cond.insert(key.to_owned(), json!(list));
                stmts.push(json!({
                    "Sid": format!("{sid}{until}"), "Effect": "Deny", "Action": "*", "Resource": "*",
                    "Condition": {"StringLike": cond}
                }));
            }
        }
        json!({"Version": "2012-10-17", "Statement": stmts})
    }

    /// Compact JSON for `PutRolePolicy`, after merging the earliest buckets until it fits.
    pub fn render(&mut self) -> Result<String, DenyError> {
        loop {
            let out = self.to_value().to_string();
            let len = out.chars().filter(|c| !c.is_whitespace()).count();
            if len <= MAX_INLINE_CHARS {
                return Ok(out);
            }
            // Merge the two earliest buckets into the later one: denies only get longer.
            let mut keys = self.buckets.keys().copied();
            let (Some(a), Some(b)) = (keys.next(), keys.next()) else {
                return Err(DenyError::TooLarge(len));
            };
            let moved = self.buckets.remove(&a).unwrap_or_default();
            self.buckets.entry(b).or_default().extend(moved);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::aws_sts::naming::resource_id;
    use uuid::Uuid;

    fn t(s: i64) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_800_000_000 + s).unwrap()
    }

    #[test]
    fn deny_session_writes_both_statements_and_round_trips() {
        let mut d = DenyDocument::default();
        let rid = resource_id(Uuid::now_v7(), "aws");
        assert!(d.deny_session(&rid, t(100)));
        let json = d.render().unwrap();
        let v: Value = serde_json::from_str(&json).unwrap();
        let stmts = v["Statement"].as_array().unwrap();
        assert_eq!(stmts.len(), 2);
        assert_eq!(stmts[0]["Effect"], "Deny");
        assert_eq!(
            stmts[0]["Condition"]["StringLike"]["aws:userid"][0],
            format!("*{rid}")
        );
        assert_eq!(
            stmts[1]["Condition"]["StringLike"]["sts:SourceIdentity"][0],
            format!("*{rid}")
        );
        let until: i64 = stmts[0]["Sid"].as_str().unwrap()["BrokerSessions".len()..]
            .parse()
            .unwrap();
        assert!(until >= t(100).unix_timestamp() && until % 3600 == 0);
        // Parsed back (also percent-encoded, as IAM returns it), it is the same document.
        let back = DenyDocument::parse(&json).unwrap();
        assert_eq!(back, d);
        let enc: String = json
            .bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() {
                    char::from(b).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect();
        assert_eq!(DenyDocument::parse(&enc).unwrap(), d);
        // Already denied long enough: no change; a later expiry moves it to a later bucket.
        assert!(!d.deny_session(&rid, t(50)));
        assert!(d.deny_session(&rid, t(100 + 7200)));
        assert_eq!(d.session_count(), 1);
        assert!(d.denies(&rid, t(100 + 7200)));
    }

    #[test]
    fn pruning_drops_only_expired_buckets_and_old_revoke_all() {
        let mut d = DenyDocument::default();
        d.deny_session("brk-0000000000000001", t(0));
        d.deny_session("brk-0000000000000002", t(5 * 3600));
        d.revoke_all(t(0));
        assert!(!d.prune(t(60), Duration::hours(1)));
        assert!(d.prune(t(2 * 3600), Duration::hours(1)));
        assert_eq!(d.session_count(), 1);
        assert!(d.revoke_all_before.is_none());
        assert!(d.denies("brk-0000000000000002", t(5 * 3600)));
        assert!(d.prune(t(7 * 3600), Duration::hours(1)));
        assert!(d.is_empty());
    }

    #[test]
    fn many_sessions_stay_under_the_limit_by_merging_and_pruning() {
        let mut d = DenyDocument::default();
        let mut rids = Vec::new();
        // 12 hours of jobs, one revoked every 5 minutes, each session living an hour.
        let mut now = t(0);
        for i in 0..144 {
            let rid = resource_id(Uuid::from_u128(i), "aws");
            d.prune(now, Duration::hours(12));
            d.deny_session(&rid, now + Duration::hours(1));
            let json = d.render().unwrap();
            assert!(json.len() <= MAX_INLINE_CHARS);
            rids.push((rid, now + Duration::hours(1)));
            now += Duration::minutes(5);
        }
        // Every session still alive is still denied, and pruning kept the list short.
        for (rid, until) in &rids {
            if *until > now {
                assert!(d.denies(rid, *until), "{rid}");
            }
        }
        assert!(d.session_count() < 40, "{}", d.session_count());

        // Without pruning, a burst far over the limit merges buckets rather than losing any.
        let mut d = DenyDocument::default();
        let n = 180;
        for i in 0..n {
            d.deny_session(&resource_id(Uuid::from_u128(i), "x"), t(i as i64 * 600));
        }
        let before = d.buckets.len();
        let json = d.render().unwrap();
        assert!(json.len() <= MAX_INLINE_CHARS, "{}", json.len());
        assert!(d.buckets.len() < before);
        for i in 0..n {
            assert!(d.denies(&resource_id(Uuid::from_u128(i), "x"), t(i as i64 * 600)));
        }
        // Beyond what one bucket can hold: an error, not a dropped deny.
        for i in n..400 {
            d.deny_session(&resource_id(Uuid::from_u128(i), "x"), t(0));
        }
        assert_eq!(d.render().unwrap_err().reason_code(), "deny_policy_full");
    }

    #[test]
    fn foreign_statements_are_kept_and_garbage_is_refused() {
        let raw = r#"{"Version":"2012-10-17","Statement":[{"Sid":"Ops","Effect":"Deny","Action":"s3:*","Resource":"*"}]}"#;
        let mut d = DenyDocument::parse(raw).unwrap();
        d.revoke_all(t(0));
        let v: Value = serde_json::from_str(&d.render().unwrap()).unwrap();
        assert_eq!(v["Statement"][0]["Sid"], "Ops");
        assert_eq!(v["Statement"][1]["Sid"], "BrokerRevokeAll");
        assert_eq!(
            v["Statement"][1]["Condition"]["DateLessThan"]["aws:TokenIssueTime"],
            "2027-01-15T08:00:00Z"
        );
        // An older revoke-all does not replace a newer one.
        assert!(!d.revoke_all(t(-10)));
        for bad in [
            "",
            "%ZZ",
            "{\"Statement\":3}",
            "[]",
            "{\"Statement\":[{\"Sid\":\"BrokerRevokeAll\"}]}",
        ] {
            assert_eq!(
                DenyDocument::parse(bad).unwrap_err().reason_code(),
                "deny_policy_unreadable",
                "{bad}"
            );
        }
    }
}

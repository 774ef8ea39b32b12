//! The audit hash chain: how an event's hash is computed and how a walk over the stored rows
//! decides whether the log is intact. No SQL here; the backends fetch rows and keep the head.
//!
//! Scheme: `hash = sha256(prev_hash || canonical event JSON)` as lowercase hex, where `prev_hash`
//! is the previous chained event's hash (64 zeros for the first) and the canonical JSON is the
//! event's JSON with object keys sorted and no whitespace. Hashing the canonical form (not the
//! stored bytes) matters because Postgres `jsonb` does not keep key order; sorting keys from the
//! stored JSON (rather than re-serialising into `AuditEvent`) matters because a field an
//! attacker adds must change the hash, not be silently dropped.
//!
//! The Postgres backend computes the same link hash in SQL (`sha256()` over the canonical JSON
//! sent from here, see `postgres::insert_audits`) so a batch is appended in one statement; the
//! chain tests verify both backends with `link_hash`.
//!
//! Invariant: appenders hold the chain head (a locked row) while they append, so `seq` order is
//! chain order. A walk in `seq` order therefore sees every event's `prev_hash` equal to the hash
//! of the row before it, and the newest row's hash equal to the head's.

use super::StoreError;
use crate::audit::AuditEvent;
pub use crate::audit::checkpoint::ChainAnchor;
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

/// `prev_hash` of the first chained event.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Rows read per page while verifying (each page is one bounded store call).
pub(super) const VERIFY_PAGE: u32 = 2000;

/// Keys sorted, no whitespace, strings escaped as serde_json does.
pub(super) fn canonical_json(v: &Value) -> String {
    let mut out = String::new();
    write_canonical(v, &mut out);
    out
}

fn write_canonical(v: &Value, out: &mut String) {
    match v {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                if let Some(inner) = map.get(k) {
                    write_canonical(inner, out);
                }
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// `sha256(prev || canonical)` as lowercase hex.
pub(super) fn link_hash(prev: &str, canonical: &str) -> String {
    let mut h = Sha256::new();
    h.update(prev.as_bytes());
    h.update(canonical.as_bytes());
    hex::encode(h.finalize())
}

/// The hash an event gets when appended after `prev`.
#[cfg(test)]
pub(super) fn event_hash(prev: &str, audit: &AuditEvent) -> Result<String, StoreError> {
    Ok(link_hash(prev, &canonical_event(audit)?))
}

/// The canonical text an event's link hash covers (computable before the chain head is held).
pub(super) fn canonical_event(audit: &AuditEvent) -> Result<String, StoreError> {
    let v = serde_json::to_value(audit)
        .map_err(|_| StoreError::Unavailable("audit event not encodable".to_owned()))?;
    Ok(canonical_json(&v))
}

/// The `(prev_hash, hash)` of each event appended after `head`, in order, given the events'
/// canonical texts.
pub(super) fn links(head: String, canonical: &[String]) -> (Vec<String>, Vec<String>) {
    let mut prevs = Vec::with_capacity(canonical.len());
    let mut hashes = Vec::with_capacity(canonical.len());
    let mut prev = head;
    for c in canonical {
        let h = link_hash(&prev, c);
        prevs.push(std::mem::replace(&mut prev, h.clone()));
        hashes.push(h);
    }
    (prevs, hashes)
}

/// One stored audit row as the walk needs it (columns and the event JSON text).
#[derive(Debug, Clone)]
pub(super) struct ChainRow {
    pub seq: i64,
    pub id: String,
    pub time: OffsetDateTime,
    pub action: String,
    pub outcome: String,
    pub reason: String,
    pub grant_id: Option<String>,
    pub request_id: Option<String>,
    pub repository: Option<String>,
    pub repository_id: Option<String>,
    pub actor: Option<String>,
    pub event: String,
    pub prev_hash: Option<String>,
    pub hash: Option<String>,
}

/// The chain head row.
#[derive(Debug, Clone)]
pub(super) struct ChainHead {
    pub seq: i64,
    pub hash: String,
    pub legacy_max_seq: i64,
}

/// Where a walk starts: the genesis, or the newest prune cut (the events up to `seq` are gone and
/// the first stored event must follow `hash`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ChainBase {
    /// `seq` of the last pruned event (`None`: nothing pruned, start before the first row).
    pub seq: Option<i64>,
    pub hash: String,
    /// Chained events pruned.
    pub count: u64,
}

impl ChainBase {
    pub fn genesis() -> Self {
        Self {
            seq: None,
            hash: GENESIS.to_owned(),
            count: 0,
        }
    }
}

/// How the chain is broken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakKind {
    /// The named event's content (or a column copied from it) no longer matches its hash.
    Modified,
    /// One or more events before the named one (or after it, at the tail) are gone.
    Deleted,
    /// The named event is not where the chain puts it.
    Reordered,
}

impl BreakKind {
    /// Stable reason code.
    pub fn reason_code(self) -> &'static str {
        match self {
            BreakKind::Modified => "audit_event_modified",
            BreakKind::Deleted => "audit_event_deleted",
            BreakKind::Reordered => "audit_event_reordered",
        }
    }
}

/// The first place the chain breaks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChainBreak {
    pub kind: BreakKind,
    /// `seq` of the event named.
    pub seq: i64,
    /// Id of the event named (as stored).
    pub event_id: String,
    /// One sentence for operators.
    pub message: String,
}

/// Result of walking the chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChainReport {
    /// Chained events checked (up to the break, if any).
    pub events_checked: u64,
    /// Events written before the chain existed (no hash; not covered).
    pub legacy_events: u64,
    /// What the chain head records.
    pub head_seq: i64,
    pub head_hash: String,
    /// Chained events deleted by `broker audit prune`; the walk started after them.
    pub pruned_events: u64,
    /// `seq` of the last pruned event (the cut), if any.
    pub pruned_through_seq: Option<i64>,
    /// Whether a checkpoint was checked and the chain still passes through it.
    pub checkpoint_matched: Option<bool>,
    /// The first break, if any.
    pub broken: Option<ChainBreak>,
}

impl ChainReport {
    pub fn is_intact(&self) -> bool {
        self.broken.is_none()
    }
}

/// What checking one row found.
pub(super) enum Check {
    Ok,
    Broken(ChainBreak),
    /// The row is intact but does not follow the previous one: `prev_hash` must be looked up
    /// to tell a deletion from a reordering (see [`link_break`]).
    Link {
        row: Box<ChainRow>,
        prev: String,
    },
}

/// The walk's state, fed rows in `seq` order.
pub(super) struct Walker {
    head: ChainHead,
    base: ChainBase,
    expected_prev: String,
    last: Option<(i64, String)>,
    checked: u64,
    legacy: u64,
    /// A checkpoint still to be met, and whether it was.
    anchor: Option<ChainAnchor>,
    anchor_met: bool,
}

impl Walker {
    pub fn new(head: ChainHead, base: ChainBase) -> Self {
        Self {
            head,
            expected_prev: base.hash.clone(),
            base,
            last: None,
            checked: 0,
            legacy: 0,
            anchor: None,
            anchor_met: false,
        }
    }

    /// Also require the chain to pass through `anchor` (a checkpoint after the cut). An anchor
    /// at zero events (taken of an empty log) is met by any chain.
    pub fn with_anchor(mut self, anchor: ChainAnchor) -> Self {
        self.anchor_met = anchor.count == 0;
        self.anchor = Some(anchor);
        self
    }

    /// Mark the anchor as met outside the walk (it lies at or before the prune cut and the
    /// store's checkpoint record vouches for it).
    pub fn anchor_met_at_cut(&mut self) {
        self.anchor_met = true;
    }

    /// The `seq` the walk starts after.
    pub fn start_after(&self) -> i64 {
        self.base.seq.unwrap_or(i64::MIN)
    }

    /// Compare an intact, linked row with the anchor: the chain must hold the anchor's event
    /// with its hash at its count, and must not skip past it.
    fn check_anchor(&mut self, row: &ChainRow, hash: &str) -> Option<ChainBreak> {
        let anchor = self.anchor.as_ref().filter(|_| !self.anchor_met)?;
        if row.seq < anchor.seq {
            return None;
        }
        if row.seq > anchor.seq {
            return Some(ChainBreak {
                kind: BreakKind::Deleted,
                seq: anchor.seq,
                event_id: String::new(),
                message: format!(
                    "the checkpoint's event (seq {}) is gone: the log was cut or rewritten before event {} (seq {})",
                    anchor.seq, row.id, row.seq
                ),
            });
        }
        let count = self.base.count + self.checked;
        if hash != anchor.hash || count != anchor.count {
            return Some(brk(
                BreakKind::Modified,
                row,
                &format!(
                    "does not match the checkpoint (hash {}, {} events; the log has {count}): \
                     the log was rewritten at or before it",
                    anchor.hash, anchor.count
                ),
            ));
        }
        self.anchor_met = true;
        None
    }

    /// After the last row: a checkpoint the walk never reached means the log ends before it.
    pub fn anchor_break(&self) -> Option<ChainBreak> {
        let anchor = self.anchor.as_ref().filter(|_| !self.anchor_met)?;
        let (seq, id) = self.last.clone().unwrap_or((0, String::new()));
        Some(ChainBreak {
            kind: BreakKind::Deleted,
            seq,
            event_id: id,
            message: format!(
                "the log ends at seq {seq} but the checkpoint covers seq {} ({} events): events were deleted",
                anchor.seq, anchor.count
            ),
        })
    }

    pub fn check(&mut self, row: &ChainRow) -> Check {
        let (Some(prev), Some(hash)) = (&row.prev_hash, &row.hash) else {
            if row.seq <= self.head.legacy_max_seq && self.last.is_none() {
                self.legacy += 1;
                return Check::Ok;
            }
            return Check::Broken(brk(
                BreakKind::Modified,
                row,
                "has no hash although it is newer than the chain",
            ));
        };
        let content = match serde_json::from_str::<Value>(&row.event) {
            Ok(v) => v,
            Err(_) => {
                return Check::Broken(brk(BreakKind::Modified, row, "holds unreadable JSON"));
            }
        };
        if link_hash(prev, &canonical_json(&content)) != *hash {
            return Check::Broken(brk(
                BreakKind::Modified,
                row,
                "was modified: its content does not match its hash",
            ));
        }
        if let Some(col) = column_mismatch(row, &content) {
            return Check::Broken(brk(
                BreakKind::Modified,
                row,
                &format!("was modified: column {col} differs from the hashed event"),
            ));
        }
        if *prev != self.expected_prev {
            return Check::Link {
                row: Box::new(row.clone()),
                prev: prev.clone(),
            };
        }
        self.expected_prev = hash.clone();
        self.last = Some((row.seq, row.id.clone()));
        self.checked += 1;
        match self.check_anchor(row, hash) {
            Some(b) => Check::Broken(b),
            None => Check::Ok,
        }
    }

    /// After the last row: the newest chained event must be the one the head records. Returns
    /// the head hash to look up when it is not.
    pub fn tail_mismatch(&self) -> Option<String> {
        (self.expected_prev != self.head.hash).then(|| self.head.hash.clone())
    }

    /// The break at the tail, given where (if anywhere) the head's hash was found.
    pub fn tail_break(&self, head_found_at: Option<(i64, String)>) -> ChainBreak {
        let (seq, id) = self.last.clone().unwrap_or((0, String::new()));
        let at = if id.is_empty() {
            "the start of the chain".to_owned()
        } else {
            format!("event {id} (seq {seq})")
        };
        match head_found_at {
            Some((s, found)) => ChainBreak {
                kind: BreakKind::Reordered,
                seq: s,
                event_id: found.clone(),
                message: format!(
                    "event {found} (seq {s}) should be the newest but the chain ends at {at}"
                ),
            },
            None => ChainBreak {
                kind: BreakKind::Deleted,
                seq,
                event_id: id,
                message: format!(
                    "events after {at} were deleted: the chain head records seq {}",
                    self.head.seq
                ),
            },
        }
    }

    pub fn report(&self, broken: Option<ChainBreak>) -> ChainReport {
        ChainReport {
            events_checked: self.checked,
            legacy_events: self.legacy,
            head_seq: self.head.seq,
            head_hash: self.head.hash.clone(),
            pruned_events: self.base.count,
            pruned_through_seq: self.base.seq,
            checkpoint_matched: self
                .anchor
                .as_ref()
                .map(|_| self.anchor_met && broken.is_none()),
            broken,
        }
    }
}

/// A row that does not follow its predecessor: if its `prev_hash` belongs to an event stored
/// elsewhere, the rows were reordered; if to none, the predecessor was deleted.
pub(super) fn link_break(row: &ChainRow, prev_found_at: Option<(i64, String)>) -> ChainBreak {
    match prev_found_at {
        Some((s, pid)) => brk(
            BreakKind::Reordered,
            row,
            &format!("is out of order: the event it follows is {pid} at seq {s}"),
        ),
        None => brk(
            BreakKind::Deleted,
            row,
            "follows an event that was deleted (its prev_hash matches no stored event)",
        ),
    }
}

fn brk(kind: BreakKind, row: &ChainRow, what: &str) -> ChainBreak {
    ChainBreak {
        kind,
        seq: row.seq,
        event_id: row.id.clone(),
        message: format!("event {} (seq {}) {what}", row.id, row.seq),
    }
}

/// The indexed columns are copies of event fields; an edit to a column alone would mislead
/// every filtered query while the hash still matched, so each must equal the hashed JSON.
fn column_mismatch(row: &ChainRow, content: &Value) -> Option<&'static str> {
    let s = |key: &str| content.get(key).and_then(Value::as_str).map(str::to_owned);
    let job = |key: &str| {
        content
            .get("job")
            .and_then(|j| j.get(key))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    if s("id").as_deref() != Some(row.id.as_str()) {
        return Some("id");
    }
    if s("action").as_deref() != Some(row.action.as_str()) {
        return Some("action");
    }
    if s("outcome").as_deref() != Some(row.outcome.as_str()) {
        return Some("outcome");
    }
    if s("reason").as_deref() != Some(row.reason.as_str()) {
        return Some("reason");
    }
    if s("grant_id") != row.grant_id {
        return Some("grant_id");
    }
    if s("request_id") != row.request_id {
        return Some("request_id");
    }
    if s("actor") != row.actor {
        return Some("actor");
    }
    if job("repository") != row.repository {
        return Some("repository");
    }
    if job("repository_id") != row.repository_id {
        return Some("repository_id");
    }
    let time = s("time").and_then(|t| {
        OffsetDateTime::parse(&t, &time::format_description::well_known::Rfc3339).ok()
    });
    // The backends keep microseconds (Postgres) or milliseconds (SQLite).
    match time {
        Some(t) if (t - row.time).abs() < time::Duration::MILLISECOND => None,
        _ => Some("time"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{Action, Outcome};
    use serde_json::json;

    #[test]
    fn canonical_json_sorts_keys_recursively() {
        let a = json!({"b": 1, "a": {"z": [1, {"y": "x", "c": null}], "d": "é\"\n"}});
        assert_eq!(
            canonical_json(&a),
            r#"{"a":{"d":"é\"\n","z":[1,{"c":null,"y":"x"}]},"b":1}"#
        );
        let reordered: Value = serde_json::from_str(
            r#"{"a": {"z": [1, {"c": null, "y": "x"}], "d": "é\"\n"}, "b": 1}"#,
        )
        .unwrap();
        assert_eq!(canonical_json(&a), canonical_json(&reordered));
    }

    #[test]
    fn hashes_depend_on_content_and_predecessor() {
        let t = OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap();
        let ev = AuditEvent::new(t, Action::Exchange, Outcome::Allow, "ok");
        let h1 = event_hash(GENESIS, &ev).unwrap();
        assert_eq!(h1.len(), 64);
        assert_ne!(h1, event_hash(&h1, &ev).unwrap());
        let mut other = ev.clone();
        other.reason = "policy_denied".into();
        assert_ne!(h1, event_hash(GENESIS, &other).unwrap());
        // Deterministic.
        assert_eq!(h1, event_hash(GENESIS, &ev).unwrap());
    }
}

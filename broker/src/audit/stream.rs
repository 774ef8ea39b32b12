//! The audit stream's wire format: one CloudEvents 1.0 envelope per audit event, as a line of
//! JSON (`GET /v1/audit/stream`, `broker audit tail`).
//!
//! ```json
//! {"specversion":"1.0","id":"<event id>","source":"<broker public URL>",
//!  "type":"dev.broker.audit.exchange","time":"2026-12-06T06:00:00Z",
//!  "datacontenttype":"application/json","subject":"<grant id>",
//!  "seq":42,"chainhash":"…","chainprev":"…","data":{ …the audit event… }}
//! ```
//!
//! `seq` is the event's position in the store (strictly increasing, never reused): a consumer
//! resumes with `?after=<last seq it kept>` and gets every later event exactly once, whichever
//! replica it asks. `chainhash`/`chainprev` are the event's links in the tamper-evident hash
//! chain (see `store/chain.rs`), so a consumer can check the copy it keeps. `data` is the event
//! as the store holds it (the canonical JSON the chain hashes). The schema is documented in
//! `docs/audit-stream.md`.

use serde_json::{Value, json};

/// The CloudEvents `type` prefix; the audit action follows it.
pub const TYPE_PREFIX: &str = "dev.broker.audit.";

/// One stored audit event with its place in the chain.
#[derive(Debug, Clone, PartialEq)]
pub struct ChainedEvent {
    pub seq: i64,
    /// `None` for events written before the chain existed (legacy rows).
    pub hash: Option<String>,
    pub prev_hash: Option<String>,
    /// The event's canonical JSON, as stored.
    pub event: String,
}

/// The CloudEvents envelope of `ev`, `source` naming this broker (its public URL).
pub fn envelope(source: &str, ev: &ChainedEvent) -> Value {
    let data: Value = serde_json::from_str(&ev.event).unwrap_or_else(|_| json!({}));
    let field = |k: &str| data.get(k).cloned().unwrap_or(Value::Null);
    let action = data
        .get("action")
        .and_then(Value::as_str)
        .unwrap_or("event");
    let mut out = json!({
        "specversion": "1.0",
        "id": field("id"),
        "source": source,
        "type": format!("{TYPE_PREFIX}{action}"),
        "time": field("time"),
        "datacontenttype": "application/json",
        "seq": ev.seq,
        "chainhash": ev.hash,
        "chainprev": ev.prev_hash,
    });
    if let Some(grant) = data.get("grant_id").filter(|g| !g.is_null()) {
        out["subject"] = grant.clone();
    }
    out["data"] = data;
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_envelope_carries_the_event_and_its_place_in_the_chain() {
        let ev = ChainedEvent {
            seq: 7,
            hash: Some("h7".into()),
            prev_hash: Some("h6".into()),
            event: r#"{"id":"0b0e","time":"2026-12-06T06:00:00Z","action":"exchange","outcome":"allow","grant_id":"g1"}"#
                .into(),
        };
        let e = envelope("https://broker.example", &ev);
        assert_eq!(e["specversion"], "1.0");
        assert_eq!(e["id"], "0b0e");
        assert_eq!(e["type"], "dev.broker.audit.exchange");
        assert_eq!(e["time"], "2026-12-06T06:00:00Z");
        assert_eq!(e["subject"], "g1");
        assert_eq!(e["seq"], 7);
        assert_eq!(e["chainhash"], "h7");
        assert_eq!(e["chainprev"], "h6");
        assert_eq!(e["data"]["outcome"], "allow");
        assert_eq!(e["source"], "https://broker.example");
    }

    #[test]
    fn an_event_without_a_grant_has_no_subject() {
        let ev = ChainedEvent {
            seq: 1,
            hash: None,
            prev_hash: None,
            event: r#"{"id":"x","time":"t","action":"admin","grant_id":null}"#.into(),
        };
        let e = envelope("s", &ev);
        assert!(e.get("subject").is_none());
        assert!(e["chainhash"].is_null());
        assert_eq!(e["type"], "dev.broker.audit.admin");
    }
}

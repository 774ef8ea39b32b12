//! `GET /v1/audit/stream?after=SEQ&follow=true`: the audit log as newline-delimited JSON, one
//! CloudEvents envelope per event (`audit/stream.rs`), auditor or admin token.
//!
//! Without `follow` the answer ends when the consumer has caught up. With `follow` it stays
//! open: new events are sent as they are committed (polled every second), an empty line every
//! 15 s keeps idle proxies from closing it, and it ends after 15 minutes so that consumers
//! reconnect (with `after` = the last `seq` they kept) and spread over the replicas. A line of
//! type `dev.broker.audit.gap` (events pruned meanwhile) or `dev.broker.audit.error` (the store
//! failed) is the last of its answer.

use super::{bearer, ctx};
use crate::admin::Role;
use crate::audit::stream::{TYPE_PREFIX, envelope};
use crate::service::{Broker, StreamPage};
use axum::Extension;
use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Events read per store query.
const PAGE: u32 = 500;
/// How often a following stream asks the store for new events.
const POLL: Duration = Duration::from_secs(1);
/// An idle following stream sends an empty line this often.
const HEARTBEAT: Duration = Duration::from_secs(15);
/// A following stream ends after this long; the consumer reconnects.
const MAX_FOLLOW: Duration = Duration::from_secs(15 * 60);

pub(super) const CONTENT_TYPE: &str = "application/x-ndjson";

/// The query: `after` (default 0: from the oldest event kept) and `follow` (default false).
fn parse_query(query: Option<&str>) -> Result<(i64, bool), String> {
    let (mut after, mut follow) = (0, false);
    for (k, v) in url::form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match &*k {
            "after" => {
                after = v
                    .parse::<i64>()
                    .ok()
                    .filter(|n| *n >= 0)
                    .ok_or("after: a sequence number (0 or more) is required")?;
            }
            "follow" => {
                follow = match &*v {
                    "true" | "1" => true,
                    "false" | "0" => false,
                    _ => return Err("follow: true or false".to_owned()),
                };
            }
            _ => return Err("unknown parameter; known: after, follow".to_owned()),
        }
    }
    Ok((after, follow))
}

pub(super) async fn stream(
    State(b): State<Arc<Broker>>,
    addr: Option<Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Response, super::ApiError> {
    let ctx = ctx(&headers, addr.map(|a| (a.0).0));
    let op = b
        .authorize(bearer(&headers).ok(), Role::Auditor, "audit_stream", &ctx)
        .await?;
    let (after, follow) = match parse_query(query.as_deref()) {
        Ok(q) => q,
        Err(msg) => {
            return Err(b
                .admin_bad_request(&op, "audit_stream", msg, &ctx)
                .await
                .into());
        }
    };
    b.audit_stream_open(&op, after, follow, &ctx).await?;
    let cursor = Cursor {
        b,
        after,
        follow,
        started: Instant::now(),
        last_sent: Instant::now(),
        done: false,
    };
    let body = Body::from_stream(futures::stream::unfold(cursor, next_chunk));
    let mut resp = body.into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // Reverse proxies that buffer answers would hold a following stream back.
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(resp)
}

struct Cursor {
    b: Arc<Broker>,
    after: i64,
    follow: bool,
    started: Instant,
    last_sent: Instant,
    done: bool,
}

/// A last line saying why the answer ends early.
fn final_line(source: &str, kind: &str, data: serde_json::Value) -> Bytes {
    let line = json!({
        "specversion": "1.0",
        "id": uuid::Uuid::new_v4().to_string(),
        "source": source,
        "type": format!("{TYPE_PREFIX}{kind}"),
        "datacontenttype": "application/json",
        "data": data,
    });
    Bytes::from(format!("{line}\n"))
}

async fn next_chunk(mut c: Cursor) -> Option<(Result<Bytes, std::convert::Infallible>, Cursor)> {
    if c.done {
        return None;
    }
    loop {
        if c.follow && c.started.elapsed() >= MAX_FOLLOW {
            return None;
        }
        match c.b.audit_stream_next(c.after, PAGE).await {
            Ok(StreamPage::Events(events)) if !events.is_empty() => {
                let source = c.b.audit_source();
                let mut out = String::new();
                for ev in &events {
                    out.push_str(&envelope(source, ev).to_string());
                    out.push('\n');
                }
                c.after = events.last().map_or(c.after, |e| e.seq);
                c.last_sent = Instant::now();
                return Some((Ok(Bytes::from(out)), c));
            }
            Ok(StreamPage::Events(_)) if !c.follow => return None,
            Ok(StreamPage::Events(_)) => {
                if c.last_sent.elapsed() >= HEARTBEAT {
                    c.last_sent = Instant::now();
                    return Some((Ok(Bytes::from_static(b"\n")), c));
                }
                tokio::time::sleep(POLL).await;
            }
            Ok(StreamPage::Gap { pruned_through }) => {
                c.done = true;
                let data = json!({"error": "audit_gap", "after": c.after, "pruned_through": pruned_through});
                return Some((Ok(final_line(c.b.audit_source(), "gap", data)), c));
            }
            Err(e) => {
                tracing::warn!(error = %e, after = c.after, "audit stream: store read failed; ending the answer");
                c.done = true;
                let data = json!({"error": e.reason_code(), "after": c.after});
                return Some((Ok(final_line(c.b.audit_source(), "error", data)), c));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_query;

    #[test]
    fn the_query_takes_after_and_follow_only() {
        assert_eq!(parse_query(None), Ok((0, false)));
        assert_eq!(parse_query(Some("after=42&follow=true")), Ok((42, true)));
        assert_eq!(parse_query(Some("follow=0")), Ok((0, false)));
        assert!(parse_query(Some("after=-1")).is_err());
        assert!(parse_query(Some("after=x")).is_err());
        assert!(parse_query(Some("follow=yes")).is_err());
        assert!(parse_query(Some("limit=5")).is_err());
    }
}

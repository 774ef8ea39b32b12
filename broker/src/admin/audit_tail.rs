//! `broker audit tail`: read `GET /v1/audit/stream` and hand each event line on as it arrives.
//! With `follow` it never stops by itself: when an answer ends (the broker ends a followed
//! stream every 15 minutes, a replica restarts, a network fails) it reconnects, to the next of
//! its URLs, with `after` = the last `seq` it handed on, so no event is skipped or repeated.

use super::client::CallError;
use crate::outbound::Outbound;
use crate::secret::Sensitive;
use std::time::Duration;

/// Longest wait between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A followed stream sends at least an empty line every 15 s; silence this long is a dead link.
const IDLE: Duration = Duration::from_secs(45);

/// How one answer ended.
enum End {
    /// The broker ended it (caught up, or a followed stream's time was up).
    Done,
    /// Events after the cursor were pruned.
    Gap(i64),
    /// The broker's store failed mid-answer (its reason code).
    StoreFailed(String),
}

/// Stream events after `after` from `urls` (tried in turn) into `sink`, one JSON line each;
/// returns the last `seq` handed on. Without `follow` it returns once caught up. Errors never
/// include the token.
pub async fn tail(
    urls: &[String],
    token: &Sensitive,
    mut after: i64,
    follow: bool,
    mut sink: impl FnMut(&str) -> Result<(), CallError>,
    mut note: impl FnMut(&str),
) -> Result<i64, CallError> {
    if urls.is_empty() {
        return Err(CallError::BadUrl);
    }
    let client = Outbound::new(IDLE).streaming(IDLE).build()?;
    let mut attempt = 0usize;
    let mut backoff = Duration::from_secs(1);
    loop {
        let base = &urls[attempt % urls.len()];
        let before = after;
        let result = one_answer(&client, base, token, &mut after, follow, &mut sink).await;
        if after > before {
            backoff = Duration::from_secs(1);
        }
        let failure = match result {
            Ok(End::Done) if !follow => return Ok(after),
            Ok(End::Done) => continue,
            Ok(End::Gap(cut)) => {
                return Err(CallError::Status {
                    status: 410,
                    message: format!(
                        "events after {after} were pruned through {cut}; resume with --after {cut}"
                    ),
                    code: "audit_gap".to_owned(),
                });
            }
            Ok(End::StoreFailed(code)) => CallError::Status {
                status: 503,
                message: "the broker's store failed mid-stream".to_owned(),
                code,
            },
            // Refusals (bad token, role, a pruned resume point) do not heal by retrying.
            Err(e @ CallError::Status { status, .. }) if (400..500).contains(&status) => {
                return Err(e);
            }
            Err(e) => e,
        };
        if !follow {
            return Err(failure);
        }
        attempt += 1;
        note(&format!(
            "{failure}; reconnecting to {} after seq {after} in {}s",
            urls[attempt % urls.len()],
            backoff.as_secs()
        ));
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

async fn one_answer(
    client: &reqwest::Client,
    base: &str,
    token: &Sensitive,
    after: &mut i64,
    follow: bool,
    sink: &mut impl FnMut(&str) -> Result<(), CallError>,
) -> Result<End, CallError> {
    let mut url = reqwest::Url::parse(&format!("{}/v1/audit/stream", base.trim_end_matches('/')))
        .map_err(|_| CallError::BadUrl)?;
    url.query_pairs_mut()
        .append_pair("after", &after.to_string())
        .append_pair("follow", if follow { "true" } else { "false" });
    let mut resp = client
        .get(url)
        .bearer_auth(token.expose())
        .send()
        .await
        .map_err(|e| super::client::network("the broker", e))?;
    let status = resp.status().as_u16();
    if !(200..300).contains(&status) {
        let body = resp.json::<serde_json::Value>().await.unwrap_or_default();
        return Err(CallError::Status {
            status,
            message: super::audit_client::clean(body["message"].as_str().unwrap_or("")),
            code: super::audit_client::clean(body["error"].as_str().unwrap_or("no code")),
        });
    }
    let mut buf: Vec<u8> = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| super::client::network("the broker", e))?
    {
        buf.extend_from_slice(&chunk);
        while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=nl).collect();
            let line = String::from_utf8_lossy(&line[..nl]);
            let line = line.trim();
            if line.is_empty() {
                continue; // a heartbeat
            }
            let v: serde_json::Value = serde_json::from_str(line)
                .map_err(|_| CallError::BadAnswer("a stream line is not JSON".to_owned()))?;
            match v["type"].as_str() {
                Some("dev.broker.audit.gap") => {
                    return Ok(End::Gap(v["data"]["pruned_through"].as_i64().unwrap_or(0)));
                }
                Some("dev.broker.audit.error") => {
                    let code = v["data"]["error"].as_str().unwrap_or("store_unavailable");
                    return Ok(End::StoreFailed(super::audit_client::clean(code)));
                }
                _ => {}
            }
            let seq = v["seq"]
                .as_i64()
                .ok_or_else(|| CallError::BadAnswer("a stream line has no seq".to_owned()))?;
            if seq <= *after {
                continue; // already handed on (never expected: the broker resumes after it)
            }
            sink(line)?;
            *after = seq;
        }
    }
    Ok(End::Done)
}

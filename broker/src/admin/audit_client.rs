//! `broker audit query`: call `GET /v1/audit`, follow cursors up to a maximum, and render the
//! events as a table, JSON lines or CSV.
//!
//! Event fields come partly from job claims, which an attacker controls: the table strips
//! control characters (no terminal escape sequences reach the operator's screen) and CSV cells
//! that a spreadsheet would run as a formula are defused.

use super::audit_query::MAX_AUDIT_LIMIT;
use super::client::CallError;
use crate::audit::AuditEvent;
use crate::secret::Sensitive;
use serde::Deserialize;
use time::format_description::well_known::Rfc3339;

/// Output format of `broker audit query`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    Table,
    Jsonl,
    Csv,
}

/// An `--format` that is none of the three.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("one of table, jsonl, csv")]
pub struct UnknownFormat;

impl std::str::FromStr for OutputFormat {
    type Err = UnknownFormat;
    fn from_str(s: &str) -> Result<Self, UnknownFormat> {
        match s {
            "table" => Ok(Self::Table),
            "jsonl" => Ok(Self::Jsonl),
            "csv" => Ok(Self::Csv),
            _ => Err(UnknownFormat),
        }
    }
}

/// The page as the API returns it (the client side of `audit_query::AuditQueryPage`).
#[derive(Debug, Deserialize)]
struct Page {
    events: Vec<AuditEvent>,
    next_cursor: Option<String>,
}

/// What one `query` run fetched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryOutcome {
    pub fetched: usize,
    /// Set when `max` stopped the walk before the last page: resume with this cursor.
    pub next_cursor: Option<String>,
}

/// Fetch events newest first, page after page, until none are left or `max` were fetched;
/// each event goes to `sink` as it arrives. `filters` are `GET /v1/audit` parameters without
/// `limit` and `cursor` (pass the starting cursor as `cursor`). Errors never include the token.
pub async fn query(
    base: &str,
    token: &Sensitive,
    filters: &[(String, String)],
    mut cursor: Option<String>,
    max: usize,
    mut sink: impl FnMut(&AuditEvent) -> Result<(), CallError>,
) -> Result<QueryOutcome, CallError> {
    let client = super::client::http(std::time::Duration::from_secs(60))?;
    let mut fetched = 0usize;
    loop {
        let remaining = max.saturating_sub(fetched);
        if remaining == 0 {
            return Ok(QueryOutcome {
                fetched,
                next_cursor: cursor,
            });
        }
        let limit = remaining.min(MAX_AUDIT_LIMIT as usize);
        let mut url = reqwest::Url::parse(&format!("{}/v1/audit", base.trim_end_matches('/')))
            .map_err(|_| CallError::BadUrl)?;
        {
            let mut q = url.query_pairs_mut();
            for (k, v) in filters {
                q.append_pair(k, v);
            }
            q.append_pair("limit", &limit.to_string());
            if let Some(c) = &cursor {
                q.append_pair("cursor", c);
            }
        }
        let resp = client
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
                message: clean(body["message"].as_str().unwrap_or("")),
                code: clean(body["error"].as_str().unwrap_or("no code")),
            });
        }
        let page: Page = resp
            .json()
            .await
            .map_err(|e| CallError::BadAnswer(e.without_url().to_string()))?;
        for ev in &page.events {
            sink(ev)?;
        }
        fetched += page.events.len();
        match page.next_cursor {
            Some(c) if !page.events.is_empty() => cursor = Some(c),
            _ => {
                return Ok(QueryOutcome {
                    fetched,
                    next_cursor: None,
                });
            }
        }
    }
}

/// Column names of the table and CSV renderings.
pub const COLUMNS: [&str; 11] = [
    "time",
    "action",
    "outcome",
    "reason",
    "repository",
    "repository_id",
    "actor",
    "credentials",
    "grant_id",
    "request_id",
    "detail",
];

fn cells(ev: &AuditEvent) -> [String; 11] {
    let enum_str = |v: serde_json::Result<serde_json::Value>| {
        v.ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default()
    };
    let creds = if ev.credentials_granted.is_empty() {
        &ev.credentials_requested
    } else {
        &ev.credentials_granted
    };
    [
        ev.time.format(&Rfc3339).unwrap_or_default(),
        enum_str(serde_json::to_value(ev.action)),
        enum_str(serde_json::to_value(ev.outcome)),
        ev.reason.clone(),
        ev.job.repository.clone().unwrap_or_default(),
        ev.job.repository_id.clone().unwrap_or_default(),
        ev.actor.clone().unwrap_or_default(),
        creds.join(" "),
        ev.grant_id.map(|g| g.to_string()).unwrap_or_default(),
        ev.request_id.clone().unwrap_or_default(),
        ev.detail.clone().unwrap_or_default(),
    ]
}

/// Control characters (escape sequences, newlines) replaced so one event is one safe line.
pub(crate) fn clean(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// The header line of a format (none for JSON lines).
pub fn header(format: OutputFormat) -> Option<String> {
    match format {
        OutputFormat::Jsonl => None,
        OutputFormat::Table => Some(table_line(&COLUMNS.map(str::to_owned))),
        OutputFormat::Csv => Some(COLUMNS.join(",")),
    }
}

/// One event as one line of the format (without the newline).
pub fn render(format: OutputFormat, ev: &AuditEvent) -> Result<String, CallError> {
    match format {
        OutputFormat::Jsonl => serde_json::to_string(ev)
            .map_err(|_| CallError::Output("event not encodable".to_owned())),
        OutputFormat::Table => Ok(table_line(&cells(ev))),
        OutputFormat::Csv => Ok(cells(ev)
            .iter()
            .map(|c| csv_cell(c))
            .collect::<Vec<_>>()
            .join(",")),
    }
}

fn table_line(cells: &[String; 11]) -> String {
    // Widths fit the usual values; longer ones push the line, never cut it (an auditor must
    // see the whole value).
    const WIDTHS: [usize; 10] = [25, 13, 8, 24, 24, 13, 20, 20, 36, 36];
    let mut line = String::new();
    for (i, c) in cells.iter().enumerate() {
        let c = clean(if c.is_empty() { "-" } else { c });
        match WIDTHS.get(i) {
            Some(w) => line.push_str(&format!("{c:<w$} ")),
            None => line.push_str(&c),
        }
    }
    line.trim_end().to_owned()
}

/// RFC 4180 quoting, and a leading `'` on cells a spreadsheet would evaluate as a formula.
fn csv_cell(s: &str) -> String {
    let s = if s.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{s}")
    } else {
        s.to_owned()
    };
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{Action, Outcome};
    use time::OffsetDateTime;

    fn ev() -> AuditEvent {
        let mut e = AuditEvent::new(
            OffsetDateTime::from_unix_timestamp(1_767_225_600).unwrap(),
            Action::Exchange,
            Outcome::Deny,
            "policy_denied",
        );
        e.job.repository = Some("acme/\u{1b}[2Japp".into());
        e.credentials_requested = vec!["deploy".into(), "db".into()];
        e.detail = Some("=HYPERLINK(\"x\"), then \"quoted\"\nnext".into());
        e
    }

    #[test]
    fn formats_parse() {
        assert_eq!("csv".parse::<OutputFormat>(), Ok(OutputFormat::Csv));
        assert_eq!("jsonl".parse::<OutputFormat>(), Ok(OutputFormat::Jsonl));
        assert_eq!("table".parse::<OutputFormat>(), Ok(OutputFormat::Table));
        assert!("xml".parse::<OutputFormat>().is_err());
    }

    #[test]
    fn table_is_one_line_without_escape_sequences() {
        let line = render(OutputFormat::Table, &ev()).unwrap();
        assert!(!line.contains('\u{1b}') && !line.contains('\n'), "{line:?}");
        assert!(line.starts_with("2026-01-01T00:00:00Z"));
        assert!(line.contains("acme/?[2Japp") && line.contains("deploy db"));
        assert!(header(OutputFormat::Table).unwrap().starts_with("time "));
    }

    #[test]
    fn csv_quotes_and_defuses_formulas() {
        let line = render(OutputFormat::Csv, &ev()).unwrap();
        assert!(
            line.ends_with("\"'=HYPERLINK(\"\"x\"\"), then \"\"quoted\"\"\nnext\""),
            "{line}"
        );
        assert!(line.starts_with("2026-01-01T00:00:00Z,exchange,deny,policy_denied,"));
        assert_eq!(csv_cell("-1"), "'-1");
        assert_eq!(csv_cell("plain"), "plain");
        assert_eq!(header(OutputFormat::Csv).unwrap().split(',').count(), 11);
    }

    #[test]
    fn jsonl_round_trips() {
        let e = ev();
        let line = render(OutputFormat::Jsonl, &e).unwrap();
        assert!(!line.contains('\n'));
        assert_eq!(serde_json::from_str::<AuditEvent>(&line).unwrap(), e);
        assert!(header(OutputFormat::Jsonl).is_none());
    }
}

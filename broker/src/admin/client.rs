//! The operator CLI's HTTP side (`broker admin`, `broker audit query`, `broker policy diff
//! --audit-url`): reading the operator token, calling an operator endpoint, and the errors of
//! both. No error holds the token.

use crate::outbound::{BuildError, Outbound};
use crate::secret::Sensitive;
use serde_json::Value;
use std::path::Path;
use std::time::Duration;

/// Why an operator call failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("cannot read token file {path}: {kind}")]
    TokenFile {
        path: String,
        kind: std::io::ErrorKind,
    },
    #[error("token file {path} is empty")]
    EmptyTokenFile { path: String },
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error("--url: not a URL")]
    BadUrl,
    /// No answer: connection, TLS or timeout.
    #[error("calling {target}: {detail}")]
    Network { target: String, detail: String },
    /// An answer that is not a success.
    #[error("the broker answered {status}: {message} ({code})")]
    Status {
        status: u16,
        message: String,
        code: String,
    },
    #[error("unreadable answer: {0}")]
    BadAnswer(String),
    /// The caller's own output failed (writing an event).
    #[error("{0}")]
    Output(String),
}

/// An operator client: a long overall timeout (a revoke-all call runs up to its time budget)
/// and no redirects, so the token is never sent on to another address.
pub(crate) fn http(timeout: Duration) -> Result<reqwest::Client, CallError> {
    Ok(Outbound::new(timeout).build()?)
}

/// reqwest's error text without the URL.
pub(crate) fn network(target: &str, e: reqwest::Error) -> CallError {
    CallError::Network {
        target: target.to_owned(),
        detail: e.without_url().to_string(),
    }
}

/// POST `body` to `base` + `path` with the operator token; the status and the JSON answer.
pub async fn post(
    base: &str,
    path: &str,
    token: &Sensitive,
    body: &Value,
) -> Result<(u16, Value), CallError> {
    let url = format!("{}{path}", base.trim_end_matches('/'));
    let resp = http(Duration::from_secs(600))?
        .post(&url)
        .bearer_auth(token.expose())
        .json(body)
        .send()
        .await
        .map_err(|e| network(&url, e))?;
    let status = resp.status().as_u16();
    let v = resp.json::<Value>().await.unwrap_or(Value::Null);
    Ok((status, v))
}

/// Read an operator token from a file (first line, trimmed).
pub fn read_token(path: &Path) -> Result<Sensitive, CallError> {
    let text = std::fs::read_to_string(path).map_err(|e| CallError::TokenFile {
        path: path.display().to_string(),
        kind: e.kind(),
    })?;
    let t = text.lines().next().unwrap_or("").trim();
    if t.is_empty() {
        return Err(CallError::EmptyTokenFile {
            path: path.display().to_string(),
        });
    }
    Ok(Sensitive::new(t.to_owned()))
}

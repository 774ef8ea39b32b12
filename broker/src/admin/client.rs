//! The `broker admin` CLI's HTTP client: one call to an operator endpoint.

use crate::secret::Sensitive;
use serde_json::Value;

/// POST `body` to `base` + `path` with the operator token; the status and the JSON answer.
/// Errors never include the token.
pub async fn post(
    base: &str,
    path: &str,
    token: &Sensitive,
    body: &Value,
) -> Result<(u16, Value), String> {
    let url = format!("{}{path}", base.trim_end_matches('/'));
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(600))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| format!("cannot build an HTTP client: {e}"))?;
    let resp = client
        .post(&url)
        .bearer_auth(token.expose())
        .json(body)
        .send()
        .await
        .map_err(|e| format!("calling {url}: {}", e.without_url()))?;
    let status = resp.status().as_u16();
    let v = resp.json::<Value>().await.unwrap_or(Value::Null);
    Ok((status, v))
}

/// Read an operator token from a file (first line, trimmed).
pub fn read_token(path: &std::path::Path) -> Result<Sensitive, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read token file {}: {}", path.display(), e.kind()))?;
    let t = text.lines().next().unwrap_or("").trim();
    if t.is_empty() {
        return Err(format!("token file {} is empty", path.display()));
    }
    Ok(Sensitive::new(t.to_owned()))
}

//! Where the job's OIDC token comes from: a value, an environment variable, a file, or the
//! GitHub Actions runner's token endpoint.

use super::{ClientError, io_err};
use crate::outbound::Outbound;
use crate::secret::Sensitive;
use serde_json::Value;
use std::path::PathBuf;
use std::time::Duration;

/// The client for the GitHub runner's token endpoint (`broker admin --id-token-audience`; the
/// exchange uses its own client for it): 30 s, following redirects as the runner may send.
pub fn runner_http() -> Result<reqwest::Client, crate::outbound::BuildError> {
    Outbound::new(Duration::from_secs(30))
        .follow_redirects()
        .build()
}

/// Where the job's OIDC token comes from. Read again on every attempt, so a runner-issued token
/// is fresh each time (the broker refuses a replayed token).
#[derive(Debug, Clone)]
pub enum TokenSource {
    Value(Sensitive),
    /// An environment variable (GitLab: the `id_tokens:` variable).
    Env(String),
    File(PathBuf),
    /// GitHub Actions: `ACTIONS_ID_TOKEN_REQUEST_URL` / `ACTIONS_ID_TOKEN_REQUEST_TOKEN`.
    GithubRunner {
        audience: String,
    },
}

impl TokenSource {
    /// The token. `env` is the process environment (a parameter so tests need not mutate it).
    pub async fn fetch(
        &self,
        http: &reqwest::Client,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Sensitive, ClientError> {
        let tok = match self {
            TokenSource::Value(v) => v.clone(),
            TokenSource::Env(name) => Sensitive::new(env(name).ok_or_else(|| {
                ClientError::NoToken(format!("environment variable {name} is not set"))
            })?),
            TokenSource::File(p) => {
                Sensitive::new(std::fs::read_to_string(p).map_err(|e| io_err(p, e))?)
            }
            TokenSource::GithubRunner { audience } => {
                return github_runner_token(http, audience, env).await;
            }
        };
        let trimmed = tok.expose().trim();
        if trimmed.is_empty() {
            return Err(ClientError::NoToken("the job token is empty".into()));
        }
        Ok(Sensitive::new(trimmed.to_owned()))
    }
}

async fn github_runner_token(
    http: &reqwest::Client,
    audience: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Sensitive, ClientError> {
    let (Some(url), Some(bearer)) = (
        env("ACTIONS_ID_TOKEN_REQUEST_URL"),
        env("ACTIONS_ID_TOKEN_REQUEST_TOKEN"),
    ) else {
        return Err(ClientError::NoToken(
            "ACTIONS_ID_TOKEN_REQUEST_URL is not set: give the job `permissions: id-token: write`"
                .into(),
        ));
    };
    let mut u = url::Url::parse(&url).map_err(|_| {
        ClientError::RunnerToken("ACTIONS_ID_TOKEN_REQUEST_URL is not a URL".into())
    })?;
    u.query_pairs_mut().append_pair("audience", audience);
    let resp = http
        .get(u)
        .bearer_auth(bearer)
        .send()
        .await
        .map_err(|e| ClientError::RunnerToken(without_url(&e)))?;
    let status = resp.status();
    if !status.is_success() {
        return Err(ClientError::RunnerToken(format!(
            "HTTP {}",
            status.as_u16()
        )));
    }
    let body: Value = resp
        .json()
        .await
        .map_err(|_| ClientError::RunnerToken("the answer is not JSON".into()))?;
    match body.get("value").and_then(Value::as_str) {
        Some(v) if !v.is_empty() => Ok(Sensitive::new(v.to_owned())),
        _ => Err(ClientError::RunnerToken("the answer has no `value`".into())),
    }
}

/// reqwest's error text without the URL (a runner URL carries no secret, but keep it short).
pub(super) fn without_url(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection failed"
    } else {
        "request failed"
    };
    kind.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn token_sources() {
        let http = reqwest::Client::new();
        let env = |k: &str| (k == "ID").then(|| " tok.en.x \n".to_owned());
        let t = TokenSource::Env("ID".into())
            .fetch(&http, &env)
            .await
            .unwrap();
        assert_eq!(t.expose(), "tok.en.x");
        let e = TokenSource::Env("NOPE".into())
            .fetch(&http, &env)
            .await
            .unwrap_err();
        assert_eq!(e.reason_code(), "no_token");
        let e = TokenSource::GithubRunner {
            audience: "a".into(),
        }
        .fetch(&http, &env)
        .await
        .unwrap_err();
        assert!(e.to_string().contains("id-token: write"));
    }
}

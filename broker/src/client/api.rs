//! The calls to the broker: `POST /v1/exchange` and `POST /v1/revoke`, with retries on network
//! errors, 5xx and 429 (never on other 4xx).

use super::ClientError;
use super::grant::Grant;
use super::request::CredentialRequest;
use super::retry::RetryPolicy;
use super::token::{TokenSource, without_url};
use crate::outbound::{JOB_CLIENT_USER_AGENT, Outbound};
use crate::secret::Sensitive;
use serde_json::Value;
use std::time::Duration;

/// The broker endpoint and the retry schedule.
#[derive(Debug, Clone)]
pub struct Client {
    base: String,
    http: reqwest::Client,
    pub retry: RetryPolicy,
}

/// The outcome of a successful exchange: the parsed grant and the raw JSON.
#[derive(Debug)]
pub struct Exchanged {
    pub grant: Grant,
    raw: Value,
}

impl Exchanged {
    /// The broker's JSON answer (contains secrets).
    pub fn raw(&self) -> &Value {
        &self.raw
    }
}

/// Progress notices (a retry and its wait) for the caller to show; they never hold a secret.
pub type Notice = Box<dyn Fn(&str) + Send + Sync>;

impl Client {
    pub fn new(broker_url: &str, timeout: Duration) -> Result<Self, ClientError> {
        let u = url::Url::parse(broker_url)
            .map_err(|_| ClientError::Usage(format!("{broker_url:?} is not a URL")))?;
        if !matches!(u.scheme(), "http" | "https") {
            return Err(ClientError::Usage("the broker URL must be http(s)".into()));
        }
        // Redirects are followed as they always were; reqwest drops the token on one that
        // leaves the host.
        let http = Outbound::new(timeout)
            .follow_redirects()
            .user_agent(JOB_CLIENT_USER_AGENT)
            .build()
            .map_err(|e| ClientError::Usage(e.to_string()))?;
        Ok(Self {
            base: broker_url.trim_end_matches('/').to_owned(),
            http,
            retry: RetryPolicy::default(),
        })
    }

    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// `POST /v1/exchange`, with retries. The token is fetched anew on every attempt.
    pub async fn exchange(
        &self,
        token: &TokenSource,
        env: &(dyn Fn(&str) -> Option<String> + Sync),
        credentials: &[CredentialRequest],
        ttl: Option<&str>,
        notice: &Notice,
    ) -> Result<Exchanged, ClientError> {
        let mut body = serde_json::json!({
            "credentials": credentials.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(),
        });
        if let Some(t) = ttl {
            body["ttl"] = Value::String(t.to_owned());
        }
        let url = format!("{}/v1/exchange", self.base);
        let (u, b) = (&url, &body);
        let raw = self
            .with_retries(&url, notice, || async move {
                let tok = token.fetch(&self.http, env).await?;
                Ok(self.http.post(u).bearer_auth(tok.expose()).json(b))
            })
            .await?;
        let grant = Grant::from_json(&raw)?;
        Ok(Exchanged { grant, raw })
    }

    /// `POST /v1/revoke`, with retries. Returns the grant's status (`revoked`, ...).
    pub async fn revoke(
        &self,
        revocation_token: &Sensitive,
        notice: &Notice,
    ) -> Result<String, ClientError> {
        let url = format!("{}/v1/revoke", self.base);
        let u = &url;
        let v = self
            .with_retries(&url, notice, || async move {
                Ok(self.http.post(u).bearer_auth(revocation_token.expose()))
            })
            .await?;
        Ok(v.get("status")
            .and_then(Value::as_str)
            .unwrap_or("unknown")
            .to_owned())
    }

    async fn with_retries<F, Fut>(
        &self,
        url: &str,
        notice: &Notice,
        build: F,
    ) -> Result<Value, ClientError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<reqwest::RequestBuilder, ClientError>>,
    {
        // Zero tries would send nothing and could only "fail" without asking: refuse it
        // rather than quietly trying once.
        let attempts = self.retry.attempts;
        if attempts == 0 {
            return Err(ClientError::Usage(
                "attempts must be at least 1 (tries in all, the first included)".into(),
            ));
        }
        let mut n = 0;
        loop {
            n += 1;
            let (err, retry_after) = match build().await?.send().await {
                Err(e) => (
                    ClientError::Network {
                        url: url.to_owned(),
                        detail: without_url(&e),
                    },
                    None,
                ),
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    let retry_after = resp
                        .headers()
                        .get(reqwest::header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .map(Duration::from_secs);
                    let body: Value = resp.json().await.unwrap_or(Value::Null);
                    if (200..300).contains(&status) {
                        return Ok(body);
                    }
                    let err = refused(status, &body);
                    // `store_rejected`: the store refused this request's data; a retry fails
                    // the same way.
                    if !(status == 429 || status >= 500) || err.reason_code() == "store_rejected" {
                        return Err(err);
                    }
                    (err, retry_after)
                }
            };
            if n >= attempts {
                return Err(err);
            }
            let wait = self.retry.delay(n - 1, retry_after);
            notice(&format!(
                "attempt {n}/{attempts} failed ({}); retrying in {:.1}s",
                err.reason_code(),
                wait.as_secs_f64()
            ));
            tokio::time::sleep(wait).await;
        }
    }
}

/// The broker's `{"error", "message"}`; messages are fixed texts without secrets, but cap
/// their length in case something else answers on that address.
pub(super) fn refused(status: u16, body: &Value) -> ClientError {
    let field = |k: &str, default: &str| {
        body.get(k)
            .and_then(Value::as_str)
            .unwrap_or(default)
            .chars()
            .filter(|c| !c.is_control())
            .take(300)
            .collect::<String>()
    };
    ClientError::Refused {
        status,
        code: field("error", "http_error"),
        message: field("message", "no message"),
    }
}

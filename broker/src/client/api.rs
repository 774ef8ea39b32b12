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
        self.exchange_with(token, env, credentials, ttl, &Value::Null, notice)
            .await
    }

    /// [`Client::exchange`] with per-credential `parameters` (an object by credential name, or
    /// null for none): an SSH public key, a GitHub App token's narrower permissions.
    pub async fn exchange_with(
        &self,
        token: &TokenSource,
        env: &(dyn Fn(&str) -> Option<String> + Sync),
        credentials: &[CredentialRequest],
        ttl: Option<&str>,
        parameters: &Value,
        notice: &Notice,
    ) -> Result<Exchanged, ClientError> {
        let mut body = serde_json::json!({
            "credentials": credentials.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(),
        });
        if let Some(t) = ttl {
            body["ttl"] = Value::String(t.to_owned());
        }
        if !parameters.is_null() {
            body["parameters"] = parameters.clone();
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::tests::grant_json;
    use axum::Router;
    use axum::http::StatusCode;
    use axum::response::IntoResponse;
    use axum::routing::post;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn zero_attempts_are_refused_without_asking() {
        let (url, calls) = fake(vec![(200, grant_json())]).await;
        let mut c = fast(&url);
        c.retry.attempts = 0;
        let tok = TokenSource::Value(Sensitive::new("a.b.c"));
        let e = c
            .exchange(&tok, &no_env, &[], None, &quiet())
            .await
            .unwrap_err();
        assert_eq!(e.reason_code(), "usage");
        assert_eq!(calls.load(Ordering::SeqCst), 0);
        c.retry.attempts = 1;
        let fail = serde_json::json!({"error": "store_unavailable", "message": "m"});
        let (url, calls) = fake(vec![(503, fail)]).await;
        let mut c = fast(&url);
        c.retry.attempts = 1;
        c.exchange(&tok, &no_env, &[], None, &quiet())
            .await
            .unwrap_err();
        assert_eq!(calls.load(Ordering::SeqCst), 1, "1 = one try, no retry");
    }

    /// A broker stand-in answering from a script of statuses; counts calls.
    async fn fake(script: Vec<(u16, Value)>) -> (String, Arc<AtomicUsize>) {
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        let script = Arc::new(script);
        let handler = move || {
            let c = c.clone();
            let script = script.clone();
            async move {
                let i = c.fetch_add(1, Ordering::SeqCst).min(script.len() - 1);
                let (s, body) = script[i].clone();
                (StatusCode::from_u16(s).unwrap(), axum::Json(body)).into_response()
            }
        };
        let app = Router::new()
            .route("/v1/exchange", post(handler.clone()))
            .route("/v1/revoke", post(handler));
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(l, app).await.ok() });
        (format!("http://{addr}"), calls)
    }

    fn fast(url: &str) -> Client {
        let mut c = Client::new(url, Duration::from_secs(5)).unwrap();
        c.retry = RetryPolicy {
            attempts: 4,
            base: Duration::from_millis(1),
            max: Duration::from_millis(2),
        };
        c
    }

    fn quiet() -> Notice {
        Box::new(|_| {})
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[tokio::test]
    async fn retries_5xx_and_429_then_succeeds() {
        let unavailable = serde_json::json!({"error": "store_unavailable", "message": "m"});
        let (url, calls) = fake(vec![
            (503, unavailable.clone()),
            (429, unavailable),
            (200, grant_json()),
        ])
        .await;
        let tok = TokenSource::Value(Sensitive::new("a.b.c"));
        let reqs = vec!["deploy-api".parse().unwrap()];
        let ex = fast(&url)
            .exchange(&tok, &no_env, &reqs, Some("5m"), &quiet())
            .await
            .unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        assert_eq!(ex.grant.grant_id, "0190-abc");
    }

    #[tokio::test]
    async fn never_retries_401_or_403() {
        for status in [401u16, 403] {
            let (url, calls) = fake(vec![(
                status,
                serde_json::json!({"error": "policy_denied", "message": "m"}),
            )])
            .await;
            let tok = TokenSource::Value(Sensitive::new("a.b.c"));
            let err = fast(&url)
                .exchange(&tok, &no_env, &[], None, &quiet())
                .await
                .unwrap_err();
            assert_eq!(calls.load(Ordering::SeqCst), 1);
            assert_eq!(err.reason_code(), "policy_denied");
        }
    }

    #[tokio::test]
    async fn gives_up_after_the_last_attempt_with_the_broker_code() {
        let (url, calls) = fake(vec![(
            503,
            serde_json::json!({"error": "revoke_pending", "message": "later"}),
        )])
        .await;
        let notes = Arc::new(std::sync::Mutex::new(Vec::new()));
        let n2 = notes.clone();
        let notice: Notice = Box::new(move |m| n2.lock().unwrap().push(m.to_owned()));
        let err = fast(&url)
            .revoke(&Sensitive::new("brk_rvk_SECRET"), &notice)
            .await
            .unwrap_err();
        assert_eq!(calls.load(Ordering::SeqCst), 4);
        assert_eq!(err.reason_code(), "revoke_pending");
        let notes = notes.lock().unwrap();
        assert_eq!(notes.len(), 3);
        assert!(notes.iter().all(|n| !n.contains("SECRET")));
    }

    #[tokio::test]
    async fn network_errors_are_retried_and_reported_without_secrets() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let err = fast(&format!("http://127.0.0.1:{port}"))
            .revoke(&Sensitive::new("brk_rvk_SECRET"), &quiet())
            .await
            .unwrap_err();
        assert_eq!(err.reason_code(), "broker_unreachable");
        assert!(!err.to_string().contains("SECRET"));
    }
}

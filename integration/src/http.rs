//! The one place the tests build HTTP clients, and the broker's API calls they all make.

use serde_json::Value;
use std::time::Duration;

/// The client builder of every test: the tests talk to 127.0.0.1 only, so no proxy from the
/// environment is ever used.
pub fn builder() -> reqwest::ClientBuilder {
    reqwest::Client::builder().no_proxy()
}

/// A client from [`builder`].
pub fn client() -> reqwest::Client {
    build(builder())
}

/// A client from [`builder`] whose requests give up after `timeout` (a hung broker fails the
/// test instead of hanging it).
pub fn client_with_timeout(timeout: Duration) -> reqwest::Client {
    build(builder().timeout(timeout))
}

/// Build a client from [`builder`] with more settings.
#[allow(clippy::expect_used)] // test harness: a client that cannot be built fails the test
pub fn build(builder: reqwest::ClientBuilder) -> reqwest::Client {
    builder.build().expect("an HTTP client")
}

/// Status and JSON body (`Null` when the body is not JSON) of a response.
pub async fn status_json(r: reqwest::Response) -> (u16, Value) {
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

/// A JSON value that must be a string (a credential field, a timestamp), owned; panics naming
/// the value when it is not one.
#[allow(clippy::panic)] // test harness: a missing field fails the test
pub fn json_string(v: &Value) -> String {
    v.as_str()
        .unwrap_or_else(|| panic!("not a string: {v}"))
        .to_owned()
}

/// `GET url` and its JSON body.
#[allow(clippy::expect_used)] // test harness: a request that cannot be sent fails the test
pub async fn get_json(http: &reqwest::Client, url: &str) -> Value {
    http.get(url)
        .send()
        .await
        .expect("GET request")
        .json()
        .await
        .expect("a JSON body")
}

/// `GET url` and its body as text.
#[allow(clippy::expect_used)] // test harness: a request that cannot be sent fails the test
pub async fn get_text(http: &reqwest::Client, url: &str) -> String {
    http.get(url)
        .send()
        .await
        .expect("GET request")
        .text()
        .await
        .expect("a text body")
}

/// The broker's public API at `url`, spoken with one client.
#[derive(Clone)]
pub struct Api {
    pub http: reqwest::Client,
    pub url: String,
}

#[allow(clippy::expect_used)] // test harness: a request that cannot be sent fails the test
impl Api {
    pub fn new(http: reqwest::Client, url: &str) -> Self {
        Self {
            http,
            url: url.to_owned(),
        }
    }

    /// `POST /v1/exchange` with `token` (if any) as the bearer and `body`.
    pub async fn exchange(&self, token: Option<&str>, body: &Value) -> (u16, Value) {
        let mut req = self
            .http
            .post(format!("{}/v1/exchange", self.url))
            .json(body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        status_json(req.send().await.expect("exchange request")).await
    }

    /// `POST /v1/exchange` to a broker that crashes on the way (a fault point): whether the
    /// exchange failed, as it must (the connection broke, or an error status came back).
    pub async fn exchange_fails(&self, token: &str, body: &Value) -> bool {
        let r = self
            .http
            .post(format!("{}/v1/exchange", self.url))
            .bearer_auth(token)
            .json(body)
            .send()
            .await;
        r.is_err() || !r.as_ref().is_ok_and(|r| r.status().is_success())
    }

    /// `POST /v1/revoke` with a revocation token.
    pub async fn revoke(&self, token: &str) -> (u16, Value) {
        let r = self
            .http
            .post(format!("{}/v1/revoke", self.url))
            .bearer_auth(token)
            .send()
            .await
            .expect("revoke request");
        status_json(r).await
    }

    /// `POST /v1/introspect` of an API token: the JSON answer.
    pub async fn introspect(&self, token: &str) -> Value {
        self.http
            .post(format!("{}/v1/introspect", self.url))
            .form(&[("token", token)])
            .send()
            .await
            .expect("introspect")
            .json()
            .await
            .expect("introspect json")
    }

    /// `POST /v1/admin/revoke-all` (on the listener at `url`) with an operator token.
    pub async fn revoke_all(&self, operator_token: &str, body: &Value) -> (u16, Value) {
        let r = self
            .http
            .post(format!("{}/v1/admin/revoke-all", self.url))
            .bearer_auth(operator_token)
            .json(body)
            .send()
            .await
            .expect("revoke-all request");
        status_json(r).await
    }

    /// Whether an API token introspects as active.
    pub async fn active(&self, api_token: &str) -> bool {
        self.introspect(api_token).await["active"] == true
    }

    /// `POST` a webhook delivery (JSON `body`) to `path` with `headers`.
    pub async fn deliver(
        &self,
        path: &str,
        headers: &[(&str, String)],
        body: &[u8],
    ) -> (u16, Value) {
        let mut req = self
            .http
            .post(format!("{}{path}", self.url))
            .header("content-type", "application/json")
            .body(body.to_vec());
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        status_json(req.send().await.expect("delivery")).await
    }

    /// A GitHub delivery of `event` with id `id`, signed with `secret`.
    pub async fn github_delivery(
        &self,
        id: &str,
        secret: &str,
        event: &str,
        body: &[u8],
    ) -> (u16, Value) {
        let headers = [
            ("x-github-event", event.to_owned()),
            ("x-github-delivery", id.to_owned()),
            (
                "x-hub-signature-256",
                broker::webhooks::signature::github_sign(secret, body),
            ),
        ];
        self.deliver("/v1/hooks/github", &headers, body).await
    }
}

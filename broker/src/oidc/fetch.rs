//! HTTP for discovery and JWKS: bounded in time and size, no redirects.
//!
//! Invariant: only URLs derived from configuration are requested (the configured issuer URL,
//! the configured `jwks_url`, or the `jwks_uri` of a discovery document whose `issuer` equals
//! the configured URL). Nothing from a token ever becomes a URL.
//!
//! Redirects are not followed at all: GitHub and GitLab serve both documents directly, and a
//! redirect would be a way to move key fetching somewhere the configuration did not name.
//!
//! The `openidconnect` crate is deliberately not used: its discovery types require fields GitHub's
//! document does not have (`authorization_endpoint`, ...) and its ID-token flow wants a nonce,
//! which CI job tokens never carry. We need only `issuer` and `jwks_uri`.

use std::time::Duration as StdDuration;

use serde_json::Value;

use super::jwks::KeySet;

/// A fetch failure; `code` is short and non-secret (it lands in health output and logs).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}")]
pub(crate) struct FetchError {
    pub code: &'static str,
}

fn fail(code: &'static str) -> FetchError {
    FetchError { code }
}

pub(crate) struct Fetcher {
    client: reqwest::Client,
    max_bytes: usize,
}

impl Fetcher {
    pub(crate) fn new(
        timeout: StdDuration,
        max_bytes: usize,
    ) -> Result<Self, crate::outbound::BuildError> {
        // No redirects: only the configured issuer's own addresses are contacted.
        let client = crate::outbound::Outbound::new(timeout)
            .connect_timeout(timeout)
            .build()?;
        Ok(Self { client, max_bytes })
    }

    /// GET a URL and return its body, refusing bodies over the cap while streaming.
    async fn get(&self, url: &str) -> Result<Vec<u8>, FetchError> {
        let mut resp = self
            .client
            .get(url)
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(|e| {
                if e.is_timeout() {
                    fail("timeout")
                } else if e.is_connect() {
                    fail("connect_failed")
                } else {
                    fail("request_failed")
                }
            })?;
        let status = resp.status();
        if status.is_redirection() {
            return Err(fail("redirect_refused"));
        }
        if !status.is_success() {
            return Err(fail("http_status"));
        }
        if resp
            .content_length()
            .is_some_and(|l| l > self.max_bytes as u64)
        {
            return Err(fail("body_too_large"));
        }
        let mut body = Vec::new();
        loop {
            match resp.chunk().await {
                Ok(Some(chunk)) => {
                    if body.len() + chunk.len() > self.max_bytes {
                        return Err(fail("body_too_large"));
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(None) => break,
                Err(e) if e.is_timeout() => return Err(fail("timeout")),
                Err(_) => return Err(fail("body_read_failed")),
            }
        }
        Ok(body)
    }

    /// Discovery: `{issuer}/.well-known/openid-configuration`, whose `issuer` must equal the
    /// configured URL exactly; returns its `jwks_uri`.
    pub(crate) async fn discover(
        &self,
        issuer: &str,
        allow_http: bool,
    ) -> Result<String, FetchError> {
        let url = format!("{issuer}/.well-known/openid-configuration");
        let body = self.get(&url).await?;
        let doc: Value =
            serde_json::from_slice(&body).map_err(|_| fail("discovery_invalid_json"))?;
        if doc.get("issuer").and_then(Value::as_str) != Some(issuer) {
            return Err(fail("discovery_issuer_mismatch"));
        }
        let jwks_uri = doc
            .get("jwks_uri")
            .and_then(Value::as_str)
            .ok_or(fail("discovery_without_jwks_uri"))?;
        let parsed = url::Url::parse(jwks_uri).map_err(|_| fail("discovery_bad_jwks_uri"))?;
        match parsed.scheme() {
            "https" => {}
            "http" if allow_http => {}
            _ => return Err(fail("discovery_insecure_jwks_uri")),
        }
        Ok(jwks_uri.to_owned())
    }

    pub(crate) async fn jwks(&self, url: &str) -> Result<KeySet, FetchError> {
        let result = match self.get(url).await {
            Ok(body) => KeySet::parse(&body).map_err(fail),
            Err(e) => Err(e),
        };
        crate::metrics::jwks_fetch(result.as_ref().map(|_| ()).map_err(|e| e.code));
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oidc::testkit::{TestIssuer, TestKey, jwks};
    use axum::Router;
    use axum::http::{StatusCode, header};
    use axum::response::IntoResponse;
    use axum::routing::get;

    /// Serve a router on a free 127.0.0.1 port; returns its base URL.
    async fn serve(app: Router) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        url
    }

    fn fetcher(max_bytes: usize) -> Fetcher {
        Fetcher::new(StdDuration::from_millis(500), max_bytes).unwrap()
    }

    #[tokio::test]
    async fn discovery_then_jwks() {
        let issuer = TestIssuer::start_with(&[TestKey::Rsa1, TestKey::Ec1]).await;
        let f = fetcher(256 * 1024);
        let uri = f.discover(&issuer.url(), true).await.unwrap();
        assert_eq!(uri, issuer.jwks_url());
        assert_eq!(f.jwks(&uri).await.unwrap().len(), 2);
        // Without the danger flag an http jwks_uri from discovery is refused.
        assert_eq!(
            f.discover(&issuer.url(), false).await.unwrap_err().code,
            "discovery_insecure_jwks_uri"
        );
    }

    #[tokio::test]
    async fn body_size_is_capped() {
        let issuer = TestIssuer::start().await;
        let f = fetcher(100);
        assert_eq!(
            f.jwks(&issuer.jwks_url()).await.unwrap_err().code,
            "body_too_large"
        );
        // Also without a Content-Length header (chunked body).
        let big = jwks(&[TestKey::Rsa1, TestKey::Rsa2]).to_string();
        let app = Router::new().route(
            "/jwks",
            get(move || {
                let big = big.clone();
                async move {
                    let stream = futures::stream::iter(
                        big.into_bytes()
                            .chunks(64)
                            .map(|c| Ok::<_, std::io::Error>(c.to_vec()))
                            .collect::<Vec<_>>(),
                    );
                    axum::body::Body::from_stream(stream)
                }
            }),
        );
        let url = serve(app).await;
        assert_eq!(
            fetcher(300)
                .jwks(&format!("{url}/jwks"))
                .await
                .unwrap_err()
                .code,
            "body_too_large"
        );
        assert_eq!(
            fetcher(64 * 1024)
                .jwks(&format!("{url}/jwks"))
                .await
                .unwrap()
                .len(),
            2
        );
    }

    #[tokio::test]
    async fn redirects_are_not_followed() {
        let issuer = TestIssuer::start().await;
        let target = issuer.jwks_url();
        let app = Router::new().route(
            "/jwks",
            get(move || {
                let target = target.clone();
                async move { (StatusCode::FOUND, [(header::LOCATION, target)]).into_response() }
            }),
        );
        let url = serve(app).await;
        assert_eq!(
            fetcher(1 << 16)
                .jwks(&format!("{url}/jwks"))
                .await
                .unwrap_err()
                .code,
            "redirect_refused"
        );
        assert_eq!(issuer.requests(), 0);
    }

    #[tokio::test]
    async fn slow_servers_time_out() {
        let app = Router::new().route(
            "/jwks",
            get(|| async {
                tokio::time::sleep(StdDuration::from_secs(5)).await;
                "{}"
            }),
        );
        let url = serve(app).await;
        assert_eq!(
            fetcher(1 << 16)
                .jwks(&format!("{url}/jwks"))
                .await
                .unwrap_err()
                .code,
            "timeout"
        );
    }

    #[tokio::test]
    async fn bad_documents() {
        let app = Router::new()
            .route(
                "/.well-known/openid-configuration",
                get(|| async { "not json" }),
            )
            .route(
                "/jwks",
                get(|| async { "{\"keys\":[{\"kty\":\"oct\",\"k\":\"AA\"}]}" }),
            )
            .route("/err", get(|| async { StatusCode::INTERNAL_SERVER_ERROR }));
        let url = serve(app).await;
        let f = fetcher(1 << 16);
        assert_eq!(
            f.discover(&url, true).await.unwrap_err().code,
            "discovery_invalid_json"
        );
        assert_eq!(
            f.jwks(&format!("{url}/jwks")).await.unwrap_err().code,
            "jwks_no_usable_keys"
        );
        assert_eq!(
            f.jwks(&format!("{url}/err")).await.unwrap_err().code,
            "http_status"
        );
        assert_eq!(
            f.jwks("http://127.0.0.1:1/jwks").await.unwrap_err().code,
            "connect_failed"
        );
    }
}

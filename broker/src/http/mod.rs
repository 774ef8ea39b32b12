//! HTTP API (axum). The only module that knows HTTP: it parses requests into service calls and
//! maps every error through [`error::ApiError`].
//!
//! Endpoints: `POST /v1/exchange`, `POST /v1/revoke`, `POST /v1/introspect` (RFC 7662),
//! `GET /.well-known/jwks.json`, `GET /healthz`, `GET /readyz`, and the operator endpoints
//! under `/v1/admin/` (`admin.rs`).

mod admin;
pub mod error;

use crate::audit::Action;
use crate::providers::Field;
use crate::secret::Sensitive;
use crate::service::ServiceError;
use crate::service::{Broker, ExchangeRequest, RequestCtx};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, HeaderName, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use error::ApiError;
use serde::Deserialize;
use serde_json::{Map, Value, json};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tower::ServiceBuilder;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// HTTP limits.
#[derive(Debug, Clone)]
pub struct HttpLimits {
    pub max_body_bytes: usize,
    pub request_timeout: Duration,
    pub max_concurrency: usize,
}

/// Build the router.
pub fn router(broker: Arc<Broker>, limits: &HttpLimits) -> Router {
    let api = Router::new()
        .route("/v1/exchange", post(exchange))
        .route("/v1/revoke", post(revoke))
        .route("/v1/introspect", post(introspect))
        .route("/.well-known/jwks.json", get(jwks))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .merge(admin::routes())
        .fallback(not_found)
        .with_state(broker);
    api.layer(
        ServiceBuilder::new()
            // Authorization headers never reach a log line through tracing layers.
            .layer(SetSensitiveRequestHeadersLayer::new([
                header::AUTHORIZATION,
                header::COOKIE,
            ]))
            .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
            .layer(PropagateRequestIdLayer::new(REQUEST_ID))
            .layer(axum::middleware::from_fn(log_request))
            .layer(axum::error_handling::HandleErrorLayer::new(overloaded))
            .load_shed()
            .concurrency_limit(limits.max_concurrency)
            .timeout(limits.request_timeout)
            .layer(DefaultBodyLimit::max(limits.max_body_bytes)),
    )
}

async fn overloaded(err: tower::BoxError) -> ApiError {
    if err.is::<tower::timeout::error::Elapsed>() {
        let mut e = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "timeout",
            "the request took too long",
        );
        // Like every other 503: tell clients when to come back (a hung store or target).
        e.retry_after = Some(5);
        e
    } else {
        let mut e = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            "the broker is at capacity; retry shortly",
        );
        e.retry_after = Some(1);
        e
    }
}

/// One span per request carrying the request id; method, path, status and latency logged at
/// the end. Never headers or bodies.
async fn log_request(req: Request, next: axum::middleware::Next) -> Response {
    let id = req
        .headers()
        .get(&REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_owned();
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let span = tracing::info_span!("request", request_id = %id, %method, %path);
    let start = std::time::Instant::now();
    let resp = tracing::Instrument::instrument(next.run(req), span.clone()).await;
    let _g = span.enter();
    tracing::info!(
        status = resp.status().as_u16(),
        elapsed_ms = start.elapsed().as_millis() as u64,
        "done"
    );
    resp
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
}

fn ctx(headers: &HeaderMap, addr: Option<SocketAddr>) -> RequestCtx {
    let hv = |n: &HeaderName| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(|s| s.chars().take(256).collect())
    };
    RequestCtx {
        request_id: hv(&REQUEST_ID),
        client_addr: addr.map(|a| a.ip().to_string()),
        user_agent: hv(&header::USER_AGENT),
    }
}

/// `Authorization: Bearer <token>`; anything else is `missing_token`.
fn bearer(headers: &HeaderMap) -> Result<Sensitive, ServiceError> {
    let v = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .ok_or(ServiceError::MissingToken)?;
    let (scheme, token) = v.split_once(' ').ok_or(ServiceError::MissingToken)?;
    if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
        return Err(ServiceError::MissingToken);
    }
    Ok(Sensitive::new(token.trim().to_owned()))
}

fn bad_body(message: String) -> ServiceError {
    ServiceError::BadRequest {
        code: "bad_request",
        message,
    }
}

/// The body, or `payload_too_large` / `bad_request`.
fn body_bytes(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ServiceError> {
    body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ServiceError::BadRequest {
                code: "payload_too_large",
                message: "the request body is too large".into(),
            }
        } else {
            bad_body("the request body could not be read".into())
        }
    })
}

fn json_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ServiceError> {
    serde_json::from_slice(body).map_err(|e| {
        // serde_json's message names the field and position; it does not echo long input.
        let msg = e.to_string();
        bad_body(format!(
            "invalid JSON body: {}",
            msg.chars().take(200).collect::<String>()
        ))
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExchangeBody {
    credentials: Vec<String>,
    #[serde(default)]
    ttl: Option<String>,
}

async fn exchange(
    State(b): State<Arc<Broker>>,
    addr: Option<Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let ctx = ctx(&headers, addr.map(|a| (a.0).0));
    let parsed = bearer(&headers).and_then(|t| {
        let body: ExchangeBody = json_body(&body_bytes(body)?)?;
        Ok((t, body))
    });
    let (token, body) = match parsed {
        Ok(p) => p,
        Err(e) => return Err(b.reject(Action::Exchange, &ctx, e).await.into()),
    };
    let resp = b
        .exchange(
            ExchangeRequest {
                token,
                credentials: body.credentials,
                ttl: body.ttl,
            },
            &ctx,
        )
        .await?;
    let mut creds = Map::new();
    for c in resp.credentials {
        let mut fields = Map::new();
        fields.insert("kind".into(), json!(c.kind.as_str()));
        for (k, f) in c.fields {
            let v = match f {
                Field::Public(v) => v,
                // The one place minted secrets leave the process.
                Field::Secret(s) => Value::String(s.expose().to_owned()),
            };
            fields.insert(k, v);
        }
        fields.insert("expires_at".into(), json!(rfc3339(resp.expires_at)));
        creds.insert(c.name, Value::Object(fields));
    }
    let body = json!({
        "grant_id": resp.grant_id,
        "expires_at": rfc3339(resp.expires_at),
        "revocation_token": resp.revocation_token.expose(),
        "credentials": creds,
    });
    Ok((
        StatusCode::OK,
        [(header::CACHE_CONTROL, "no-store")],
        Json(body),
    )
        .into_response())
}

fn rfc3339(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

async fn revoke(
    State(b): State<Arc<Broker>>,
    addr: Option<Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let ctx = ctx(&headers, addr.map(|a| (a.0).0));
    let token = match bearer(&headers) {
        Ok(t) => t,
        Err(e) => return Err(b.reject(Action::Revoke, &ctx, e).await.into()),
    };
    let (grant_id, status) = b.revoke_by_token(&token, &ctx).await?;
    Ok(Json(
        json!({"grant_id": grant_id, "status": status.as_str()}),
    ))
}

/// RFC 7662: `token` in a form body (or JSON). Unknown, expired, revoked or foreign tokens are
/// all `{"active": false}`.
async fn introspect(
    State(b): State<Arc<Broker>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let body = body_bytes(body)?;
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    let token = if is_json {
        #[derive(Deserialize)]
        struct B {
            token: String,
        }
        json_body::<B>(&body)?.token
    } else {
        url::form_urlencoded::parse(&body)
            .find(|(k, _)| k == "token")
            .map(|(_, v)| v.into_owned())
            .ok_or_else(|| ApiError::bad_request("send the token as form field `token`"))?
    };
    Ok(Json(b.introspect(&token).await?))
}

async fn jwks(State(b): State<Arc<Broker>>) -> Response {
    (
        [(header::CACHE_CONTROL, "public, max-age=300")],
        Json(b.api_tokens.keys().jwks()),
    )
        .into_response()
}

async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

async fn readyz(State(b): State<Arc<Broker>>) -> Response {
    let (ok, detail) = b.readiness().await;
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(detail)).into_response()
}

// Long on purpose (~610 lines): the public router and every public handler read in one place; the operator and webhook routes are in admin.rs and hooks.rs, connections in conn.rs, errors in error.rs.
//! HTTP API (axum). The only module that knows HTTP: it parses requests into service calls and
//! maps every error through [`error::ApiError`].
//!
//! Endpoints: `POST /v1/exchange`, `POST /v1/revoke`, `POST /v1/introspect` (RFC 7662),
//! `GET /.well-known/jwks.json`, `GET /healthz`, `GET /readyz`, the OAuth endpoints
//! (`/oauth2/token`, `/oauth2/revoke`, RFC 8414 metadata: `oauth.rs`), the operator endpoints
//! under `/v1/admin/` (`admin.rs`), and `GET /metrics` ([`metrics_router`]).
//!
//! Diagnostics (`/metrics`, the detailed `/readyz`) are served on the admin listener; the public
//! listener answers a bare liveness/readiness unless `metrics.danger_public_diagnostics`.
//! Connections are accepted and bounded by `conn.rs`.

mod admin;
mod audit_stream;
mod conn;
pub mod error;
mod hooks;
mod leaks;
mod oauth;
mod ssh;

pub use conn::{ConnLimits, default_max_connections, serve};

use crate::audit::Action;
use crate::providers::Field;
use crate::reason::ReasonCode;
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
use tower_http::request_id::PropagateRequestIdLayer;
use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// Internal: the client's `X-Request-Id` when it has the accepted shape, set by
/// [`assign_request_ids`] only (a client-sent value of this header is removed first).
const CLIENT_REQUEST_ID: HeaderName = HeaderName::from_static("x-broker-client-request-id");

/// HTTP limits.
#[derive(Debug, Clone)]
pub struct HttpLimits {
    pub max_body_bytes: usize,
    pub request_timeout: Duration,
    pub max_concurrency: usize,
}

/// Build the router (every endpoint on one listener, diagnostics included: tests and tools).
pub fn router(broker: Arc<Broker>, limits: &HttpLimits) -> Router {
    routers(broker, limits, false, true).0
}

/// The public router and, when `separate_admin`, the operator router (`/v1/admin/*`,
/// `/v1/audit`, `/healthz`) for the `admin_listen` address. With `separate_admin` the public
/// router has no operator endpoint at all (404), so they cannot be reached through the public
/// load balancer. The detailed `/readyz` (store, issuers, policies, providers) is on the
/// operator router; the public one answers only `{"ready": bool}`, unless
/// `public_diagnostics` (`metrics.danger_public_diagnostics`).
pub fn routers(
    broker: Arc<Broker>,
    limits: &HttpLimits,
    separate_admin: bool,
    public_diagnostics: bool,
) -> (Router, Option<Router>) {
    let public_readyz = if public_diagnostics {
        get(readyz)
    } else {
        get(readyz_bare)
    };
    let public = Router::new()
        .route("/v1/exchange", post(exchange))
        .route("/v1/revoke", post(revoke))
        .route("/v1/introspect", post(introspect))
        .route("/.well-known/jwks.json", get(jwks))
        .route("/healthz", get(healthz))
        .route("/readyz", public_readyz)
        .merge(oauth::routes())
        .layer(early_body_limit(limits.max_body_bytes))
        .merge(hooks::routes(broker.webhooks().max_body_bytes()))
        .merge(leaks::public_routes())
        .merge(ssh::routes());
    let operator = admin::routes()
        .layer(early_body_limit(limits.max_body_bytes))
        .merge(leaks::operator_routes());
    let (public, admin) = if separate_admin {
        let admin = operator
            .route("/healthz", get(healthz))
            .route("/readyz", get(readyz))
            .fallback(not_found)
            .method_not_allowed_fallback(method_not_allowed)
            .with_state(broker.clone());
        (public, Some(with_layers(admin, limits)))
    } else {
        (public.merge(operator), None)
    };
    let public = public
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(broker);
    (with_layers(public, limits), admin)
}

/// Answer `413 payload_too_large` as soon as a declared `Content-Length` exceeds `limit`,
/// before any body byte is awaited (else a client declaring a huge body and sending none holds
/// the request until the request timeout). The route still answers (and audits) as for any body
/// over the limit: it is handed a stand-in body, already in memory, one chunk over the limit
/// (static zeros, nothing allocated per request). Chunked bodies are cut at the limit as read.
async fn early_413(
    State(limit): State<usize>,
    mut req: Request,
    next: axum::middleware::Next,
) -> Response {
    static ZEROS: [u8; 16 * 1024] = [0; 16 * 1024];
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_none_or(|n| n <= limit as u64) {
        return next.run(req).await;
    }
    let chunks = limit / ZEROS.len() + 1;
    let stand_in = futures::stream::iter(
        (0..chunks).map(|_| Ok::<_, std::convert::Infallible>(Bytes::from_static(&ZEROS))),
    );
    *req.body_mut() = axum::body::Body::from_stream(stand_in);
    let mut resp = next.run(req).await;
    // The real body is never read: the connection ends with this answer.
    resp.headers_mut().insert(
        header::CONNECTION,
        header::HeaderValue::from_static("close"),
    );
    resp
}

type BoxedResponse = std::pin::Pin<Box<dyn std::future::Future<Output = Response> + Send>>;
type EarlyLimitFn = fn(State<usize>, Request, axum::middleware::Next) -> BoxedResponse;

/// [`early_413`] for routes whose body limit is `limit`.
pub(crate) fn early_body_limit(
    limit: usize,
) -> axum::middleware::FromFnLayer<EarlyLimitFn, usize, (State<usize>, Request)> {
    fn boxed(s: State<usize>, r: Request, n: axum::middleware::Next) -> BoxedResponse {
        Box::pin(early_413(s, r, n))
    }
    axum::middleware::from_fn_with_state(limit, boxed as EarlyLimitFn)
}

fn with_layers(api: Router, limits: &HttpLimits) -> Router {
    api.layer(
        ServiceBuilder::new()
            // Authorization headers never reach a log line through tracing layers.
            .layer(SetSensitiveRequestHeadersLayer::new([
                header::AUTHORIZATION,
                header::COOKIE,
                HeaderName::from_static("x-gitlab-token"),
                HeaderName::from_static("x-hub-signature-256"),
            ]))
            .layer(axum::middleware::from_fn(assign_request_ids))
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
        // Like every other 503: tell clients when to come back (a hung store or target).
        ApiError::of(ReasonCode::Timeout)
    } else {
        let mut e = ApiError::of(ReasonCode::Overloaded);
        e.retry_after = Some(1);
        e
    }
}

/// The broker's own request id is the only `X-Request-Id` the router, the logs and the audit
/// see (and the one sent back). A client's `X-Request-Id` is kept, as `client_request_id`, only
/// when it has a short, plain shape (see [`client_request_id`]); anything else is dropped.
async fn assign_request_ids(mut req: Request, next: axum::middleware::Next) -> Response {
    let client = req
        .headers()
        .get(&REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .and_then(client_request_id)
        .and_then(|v| header::HeaderValue::from_str(v).ok());
    let headers = req.headers_mut();
    headers.remove(&CLIENT_REQUEST_ID);
    if let Some(v) = client {
        headers.insert(CLIENT_REQUEST_ID, v);
    }
    let own = uuid::Uuid::new_v4().to_string();
    if let Ok(v) = header::HeaderValue::from_str(&own) {
        headers.insert(REQUEST_ID, v);
    }
    next.run(req).await
}

/// A client request id worth recording: 1 to 64 of `A-Z a-z 0-9 . _ -`.
fn client_request_id(v: &str) -> Option<&str> {
    let ok = (1..=64).contains(&v.len())
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    ok.then_some(v)
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
    let client_id = req
        .headers()
        .get(&CLIENT_REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    // `otel.kind` and `status` shape the exported trace span (telemetry.rs); logs ignore them.
    let span = tracing::info_span!(
        "request",
        request_id = %id,
        client_request_id = client_id.as_deref(),
        %method,
        %path,
        otel.kind = "server",
        status = tracing::field::Empty,
    );
    let start = std::time::Instant::now();
    let resp = tracing::Instrument::instrument(next.run(req), span.clone()).await;
    span.record("status", resp.status().as_u16());
    let _g = span.enter();
    tracing::info!(
        status = resp.status().as_u16(),
        elapsed_ms = start.elapsed().as_millis() as u64,
        "done"
    );
    resp
}

async fn not_found() -> ApiError {
    ApiError::of(ReasonCode::NotFound)
}

async fn method_not_allowed() -> ApiError {
    ApiError::of(ReasonCode::MethodNotAllowed)
}

fn ctx(headers: &HeaderMap, addr: Option<SocketAddr>) -> RequestCtx {
    let hv = |n: &HeaderName| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            // Bounded here; the audit caps them further and flags what it cut
            // (`refusals::fields`), so this bound must stay above those caps.
            .map(|s| s.chars().take(1024).collect())
    };
    RequestCtx {
        request_id: hv(&REQUEST_ID),
        client_request_id: hv(&CLIENT_REQUEST_ID),
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
        code: ReasonCode::BadRequest,
        message,
    }
}

/// The body, or `payload_too_large` / `bad_request`.
fn body_bytes(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ServiceError> {
    body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ServiceError::BadRequest {
                code: ReasonCode::PayloadTooLarge,
                message: ReasonCode::PayloadTooLarge.message().into(),
            }
        } else {
            bad_body("the request body could not be read".into())
        }
    })
}

fn json_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ServiceError> {
    serde_json::from_slice(body).map_err(|e| json_error(e, body))
}

fn json_error(e: serde_json::Error, body: &[u8]) -> ServiceError {
    if crate::store::text::is_surrogate_error(&e) {
        use crate::store::text::{Problem, TextError};
        return TextError::new("request body", Problem::Surrogate, "").into();
    }
    // Valid JSON of the wrong shape (an array, a string, null) gets its own code.
    if serde_json::from_slice::<Value>(body).is_ok_and(|v| !v.is_object()) {
        return not_object();
    }
    // serde_json's message names the field and position; it does not echo long input.
    let msg = e.to_string();
    bad_body(format!(
        "invalid JSON body: {}",
        msg.chars()
            .filter(|c| !c.is_control())
            .take(200)
            .collect::<String>()
    ))
}

fn not_object() -> ServiceError {
    ServiceError::BadRequest {
        code: ReasonCode::BodyNotObject,
        message: ReasonCode::BodyNotObject.message().into(),
    }
}

/// An exchange body: an object whose every key and string is checked at the text boundary
/// (`store::text`), then read into its shape (so no refused text reaches an error message
/// either).
fn exchange_body(body: &[u8]) -> Result<ExchangeBody, ServiceError> {
    let v: Value = json_body(body)?;
    if !v.is_object() {
        return Err(not_object());
    }
    crate::store::text::check_json("request body", &v)?;
    serde_json::from_value(v).map_err(|e| json_error(e, body))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExchangeBody {
    credentials: Vec<String>,
    #[serde(default)]
    ttl: Option<String>,
    /// Per-credential parameters, by credential name.
    #[serde(default)]
    parameters: std::collections::BTreeMap<String, Value>,
}

async fn exchange(
    State(b): State<Arc<Broker>>,
    addr: Option<Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let ctx = ctx(&headers, addr.map(|a| (a.0).0));
    let parsed = bearer(&headers).and_then(|t| {
        let body = exchange_body(&body_bytes(body)?)?;
        Ok((t, body))
    });
    let (token, body) = match parsed {
        Ok(p) => p,
        Err(e) => {
            let e = b.reject(Action::Exchange, &ctx, e).await;
            record_exchange(&b, &[], Err(&e));
            return Err(e.into());
        }
    };
    let names = body.credentials.clone();
    let result = b
        .exchange(
            ExchangeRequest {
                token,
                credentials: body.credentials,
                ttl: body.ttl,
                parameters: body.parameters,
            },
            &ctx,
        )
        .await;
    record_exchange(&b, &names, result.as_ref().map(|_| ()));
    let resp = result?;
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

/// The public readiness answer: ready or not, nothing about why.
async fn readyz_bare(State(b): State<Arc<Broker>>) -> Response {
    let (ok, _) = b.readiness().await;
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(json!({"ready": ok}))).into_response()
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

/// Count an exchange in `broker_exchanges_total`. The kind label comes from the requested names
/// as the bundle in force defines them: one kind, `mixed`, or `none` (nothing resolved).
fn record_exchange(b: &Broker, names: &[String], result: Result<(), &ServiceError>) {
    let bundle = b.policies();
    let kinds: std::collections::BTreeSet<&'static str> = names
        .iter()
        .filter_map(|n| bundle.credential(n).map(|d| d.spec.kind().as_str()))
        .collect();
    let kind = match kinds.len() {
        0 => "none",
        1 => kinds.first().copied().unwrap_or("none"),
        _ => "mixed",
    };
    match result {
        Ok(()) => crate::metrics::exchange("allow", "ok", kind),
        Err(e) => {
            let outcome = match e.outcome() {
                crate::audit::Outcome::Error => "error",
                _ => "deny",
            };
            crate::metrics::exchange(outcome, e.reason_code(), kind);
        }
    }
}

/// `GET /metrics` (Prometheus/OpenMetrics text). With a token configured, only
/// `Authorization: Bearer <token>` may scrape (compared in constant time); without one the
/// endpoint is open, so put it on a listener only the scraper reaches.
pub fn metrics_router(broker: Arc<Broker>, token: Option<Sensitive>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .with_state((broker, token.map(Arc::new)))
}

async fn metrics(
    State((b, token)): State<(Arc<Broker>, Option<Arc<Sensitive>>)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    if let Some(want) = token {
        let ok = bearer(&headers).is_ok_and(|got| {
            subtle::ConstantTimeEq::ct_eq(got.expose().as_bytes(), want.expose().as_bytes()).into()
        });
        if !ok {
            return Err(ApiError::of(ReasonCode::Unauthorized));
        }
    }
    // Store-derived gauges are read on scrape: cheap indexed queries, and always current.
    let now = b.clock.now();
    match b.store.gauges(now).await {
        Ok(g) => {
            let lag = g
                .oldest_overdue
                .map_or(0.0, |t| (now - t).as_seconds_f64().max(0.0));
            let kinds = crate::providers::CredentialKind::ALL.map(|k| k.as_str());
            crate::metrics::set_store_gauges(&kinds, &g.active_by_kind, lag);
        }
        Err(e) => {
            tracing::warn!(error = %e, "metrics: store gauges not refreshed");
            crate::metrics::store_gauges_failed();
        }
    }
    match b.store.freeze_state().await {
        Ok(freeze) => crate::metrics::set_freeze_active(freeze.is_some()),
        Err(e) => {
            tracing::warn!(error = %e, "metrics: freeze state not refreshed");
            crate::metrics::store_gauges_failed();
        }
    }
    Ok((
        [(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)],
        crate::metrics::render(),
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_short_client_request_ids_are_kept() {
        for ok in ["a", "ci-run-42.attempt_1", &"x".repeat(64)] {
            assert_eq!(client_request_id(ok), Some(ok), "{ok:?}");
        }
        for bad in [
            "",
            "has space",
            "<script>",
            "a\"b",
            "é",
            "a/b",
            &"x".repeat(65),
        ] {
            assert_eq!(client_request_id(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_json_non_object_is_body_not_object() {
        #[derive(Debug, Deserialize)]
        struct B {
            #[allow(dead_code)]
            credentials: Vec<String>,
        }
        for (body, code) in [
            (&b"[]"[..], "body_not_object"),
            (b"\"x\"", "body_not_object"),
            (b"null", "body_not_object"),
            (b"{\"nope\": 1}", "bad_request"),
            (b"{", "bad_request"),
        ] {
            let err = json_body::<B>(body).err().map(|e| e.reason_code());
            assert_eq!(err, Some(code), "{}", String::from_utf8_lossy(body));
        }
    }
}

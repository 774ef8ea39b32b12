//! Operator endpoints (`/v1/admin/*`, `GET /v1/audit`): bearer operator tokens only (never a job token), every
//! call audited by `admin::actions`.

use super::{bearer, body_bytes, ctx};
use crate::admin::{AdminError, GrantFilter, Role};
use crate::service::{Broker, RequestCtx};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, RawQuery, State};
use axum::http::HeaderMap;
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::sync::Arc;

pub(super) fn routes() -> Router<Arc<Broker>> {
    Router::new()
        .route("/v1/admin/revoke-all", post(revoke_all))
        .route("/v1/admin/freeze", post(freeze).get(freeze_status))
        .route("/v1/admin/unfreeze", post(unfreeze))
        .route("/v1/audit", get(audit_query))
        .route("/v1/audit/stream", get(super::audit_stream::stream))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ActionBody {
    #[serde(default)]
    reason: String,
    #[serde(default)]
    filter: GrantFilter,
}

/// The body (empty = defaults), or a 400 that is audited with the operator's name.
async fn parse_body(
    b: &Broker,
    op: &crate::admin::Operator,
    what: &str,
    body: Result<Bytes, BytesRejection>,
    ctx: &RequestCtx,
) -> Result<ActionBody, AdminError> {
    let parsed = match body_bytes(body) {
        Err(e) => Err(e.to_string()),
        Ok(bytes) if bytes.iter().all(u8::is_ascii_whitespace) => Ok(ActionBody::default()),
        Ok(bytes) => serde_json::from_slice::<ActionBody>(&bytes).map_err(|e| {
            format!(
                "invalid JSON body: {}",
                e.to_string().chars().take(200).collect::<String>()
            )
        }),
    };
    match parsed {
        Ok(a) => Ok(a),
        Err(msg) => Err(b.admin_bad_request(op, what, msg, ctx).await),
    }
}

type Addr = Option<Extension<ConnectInfo<SocketAddr>>>;

async fn revoke_all(
    State(b): State<Arc<Broker>>,
    addr: Addr,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, super::ApiError> {
    let ctx = ctx(&headers, addr.map(|a| (a.0).0));
    let op = b
        .authorize(bearer(&headers).ok(), Role::Admin, "revoke_all", &ctx)
        .await?;
    let body = parse_body(&b, &op, "revoke_all", body, &ctx).await?;
    let report = b.revoke_all(&op, &body.reason, &body.filter, &ctx).await?;
    Ok(Json(json!(report)))
}

async fn freeze(
    State(b): State<Arc<Broker>>,
    addr: Addr,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, super::ApiError> {
    let ctx = ctx(&headers, addr.map(|a| (a.0).0));
    let op = b
        .authorize(bearer(&headers).ok(), Role::Admin, "freeze", &ctx)
        .await?;
    let body = parse_body(&b, &op, "freeze", body, &ctx).await?;
    let f = b.freeze(&op, &body.reason, &body.filter, &ctx).await?;
    Ok(Json(json!({"frozen": true, "freeze": f})))
}

async fn unfreeze(
    State(b): State<Arc<Broker>>,
    addr: Addr,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, super::ApiError> {
    let ctx = ctx(&headers, addr.map(|a| (a.0).0));
    let op = b
        .authorize(bearer(&headers).ok(), Role::Admin, "unfreeze", &ctx)
        .await?;
    let body = parse_body(&b, &op, "unfreeze", body, &ctx).await?;
    let was = b.unfreeze(&op, &body.reason, &ctx).await?;
    Ok(Json(json!({"frozen": false, "was_frozen": was})))
}

async fn freeze_status(
    State(b): State<Arc<Broker>>,
    addr: Addr,
    headers: HeaderMap,
) -> Result<Json<Value>, super::ApiError> {
    let ctx = ctx(&headers, addr.map(|a| (a.0).0));
    let op = b
        .authorize(bearer(&headers).ok(), Role::Auditor, "freeze_status", &ctx)
        .await?;
    let f = b.freeze_status(&op, &ctx).await?;
    Ok(Json(json!({"frozen": f.is_some(), "freeze": f})))
}

/// `GET /v1/audit?since=...&repository=...&cursor=...`: auditor or admin.
async fn audit_query(
    State(b): State<Arc<Broker>>,
    addr: Addr,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Json<Value>, super::ApiError> {
    let ctx = ctx(&headers, addr.map(|a| (a.0).0));
    let op = b
        .authorize(bearer(&headers).ok(), Role::Auditor, "audit_query", &ctx)
        .await?;
    let pairs: Vec<(String, String)> =
        url::form_urlencoded::parse(query.as_deref().unwrap_or("").as_bytes())
            .into_owned()
            .collect();
    let page = b.audit_query(&op, &pairs, &ctx).await?;
    Ok(Json(json!(page)))
}

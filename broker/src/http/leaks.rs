//! Leak reports: `POST /v1/leaks/github` (GitHub's secret scanning partner protocol, signed;
//! public) and `POST /v1/leaks` (operators; on the operator router). Headers and the raw body
//! (the signature covers its exact bytes) go to `service::leak`; the rules are in `leaks/`.

use super::{bearer, body_bytes, ctx};
use crate::admin::Role;
use crate::service::Broker;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, DefaultBodyLimit, State};
use axum::http::HeaderMap;
use axum::routing::post;
use axum::{Extension, Json, Router};
use std::net::SocketAddr;
use std::sync::Arc;

/// Largest report body: GitHub batches tokens; a thousand fit well within this.
const MAX_REPORT_BYTES: usize = 1024 * 1024;

type Addr = Option<Extension<ConnectInfo<SocketAddr>>>;

/// `POST /v1/leaks/github`, on the public router (GitHub must reach it).
pub(super) fn public_routes() -> Router<Arc<Broker>> {
    Router::new()
        .route("/v1/leaks/github", post(github))
        .layer(DefaultBodyLimit::max(MAX_REPORT_BYTES))
        .layer(super::early_body_limit(MAX_REPORT_BYTES))
}

/// `POST /v1/leaks`, with the operator endpoints.
pub(super) fn operator_routes() -> Router<Arc<Broker>> {
    Router::new()
        .route("/v1/leaks", post(operator))
        .layer(DefaultBodyLimit::max(MAX_REPORT_BYTES))
        .layer(super::early_body_limit(MAX_REPORT_BYTES))
}

fn header<'h>(h: &'h HeaderMap, name: &str) -> Option<&'h str> {
    h.get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|s| !s.is_empty())
}

async fn github(
    State(b): State<Arc<Broker>>,
    addr: Addr,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Vec<crate::leaks::TokenAnswer>>, super::ApiError> {
    let ctx = ctx(&headers, addr.map(|a| (a.0).0));
    // Too large or unreadable: refused before any signature check, so not audited.
    let bytes = body_bytes(body)?;
    let answers = b
        .leak_report_github(
            header(&headers, "github-public-key-identifier"),
            header(&headers, "github-public-key-signature"),
            &bytes,
            &ctx,
        )
        .await?;
    Ok(Json(answers))
}

async fn operator(
    State(b): State<Arc<Broker>>,
    addr: Addr,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Vec<crate::leaks::TokenAnswer>>, super::ApiError> {
    let ctx = ctx(&headers, addr.map(|a| (a.0).0));
    let op = b
        .authorize(bearer(&headers).ok(), Role::Admin, "leak report", &ctx)
        .await?;
    let bytes = body_bytes(body)?;
    Ok(Json(b.leak_report_operator(&op, &bytes, &ctx).await?))
}

//! The SSH CAs' public endpoints: `GET /v1/ssh/{ca}/ca.pub` (the CA's public key, for
//! `TrustedUserCAKeys`) and `GET /v1/ssh/{ca}/krl` (its key revocation list, for
//! `RevokedKeys`; hosts fetch it on a timer, see docs/providers/ssh_cert.md). Neither holds a
//! secret; an unknown CA is 404.

use super::error::ApiError;
use crate::reason::ReasonCode;
use crate::service::Broker;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use std::sync::Arc;

pub(super) fn routes() -> Router<Arc<Broker>> {
    Router::new()
        .route("/v1/ssh/{ca}/ca.pub", get(ca_public_key))
        .route("/v1/ssh/{ca}/krl", get(krl))
}

async fn ca_public_key(State(b): State<Arc<Broker>>, Path(ca): Path<String>) -> Response {
    match b.ssh_ca_public_key(&ca) {
        Some(line) => (
            [
                (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
                (header::CACHE_CONTROL, "public, max-age=300"),
            ],
            format!("{line}\n"),
        )
            .into_response(),
        None => ApiError::of(ReasonCode::NotFound).into_response(),
    }
}

async fn krl(State(b): State<Arc<Broker>>, Path(ca): Path<String>) -> Result<Response, ApiError> {
    match b.ssh_krl(&ca).await? {
        // Never cached: a revocation must reach hosts on their next refresh.
        Some(bytes) => Ok((
            [
                (header::CONTENT_TYPE, "application/octet-stream"),
                (header::CACHE_CONTROL, "no-store"),
            ],
            bytes,
        )
            .into_response()),
        None => Err(ApiError::of(ReasonCode::NotFound)),
    }
}

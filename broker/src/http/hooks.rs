//! Job-end webhooks (`POST /v1/hooks/github`, `POST /v1/hooks/gitlab`): headers and raw body to
//! `webhooks::Delivery`; the rules are in `webhooks/`. The body is read raw (the signature covers
//! its exact bytes) under its own size limit.

use super::{body_bytes, ctx};
use crate::secret::Sensitive;
use crate::service::Broker;
use crate::webhooks::{Delivery, HookOutcome, Source};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Extension, Json, Router};
use serde_json::json;
use std::net::SocketAddr;
use std::sync::Arc;

pub(super) fn routes(max_body_bytes: usize) -> Router<Arc<Broker>> {
    Router::new()
        .route("/v1/hooks/github", post(github))
        .route("/v1/hooks/gitlab", post(gitlab))
        // Deliveries are larger than exchange requests; this overrides the router-wide limit
        // for these routes only.
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .layer(super::early_body_limit(max_body_bytes))
}

type Addr = Option<Extension<ConnectInfo<SocketAddr>>>;

fn header(h: &HeaderMap, name: &str) -> Option<String> {
    h.get(name)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

async fn github(
    State(b): State<Arc<Broker>>,
    addr: Addr,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, super::ApiError> {
    let parts = Parts {
        source: Source::Github,
        event: header(&headers, "x-github-event"),
        delivery_id: header(&headers, "x-github-delivery"),
        credential: header(&headers, "x-hub-signature-256").map(Sensitive::new),
    };
    handle(&b, addr, &headers, body, parts).await
}

async fn gitlab(
    State(b): State<Arc<Broker>>,
    addr: Addr,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, super::ApiError> {
    let parts = Parts {
        source: Source::Gitlab,
        event: header(&headers, "x-gitlab-event"),
        // Idempotency-Key stays the same when GitLab retries a delivery; the event UUID is the
        // fallback for versions that do not send it.
        delivery_id: header(&headers, "idempotency-key")
            .or_else(|| header(&headers, "x-gitlab-event-uuid")),
        credential: header(&headers, "x-gitlab-token").map(Sensitive::new),
    };
    handle(&b, addr, &headers, body, parts).await
}

/// A delivery's headers, before the body is read.
struct Parts {
    source: Source,
    event: Option<String>,
    delivery_id: Option<String>,
    credential: Option<Sensitive>,
}

async fn handle(
    b: &Broker,
    addr: Addr,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    p: Parts,
) -> Result<Response, super::ApiError> {
    let ctx = ctx(headers, addr.map(|a| (a.0).0));
    // Too large or unreadable: refused before any signature check, so not audited (an
    // unauthenticated flood must not grow the audit log); the error layer logs it.
    let bytes = body_bytes(body)?;
    let delivery = Delivery {
        source: p.source,
        event: p.event,
        delivery_id: p.delivery_id,
        credential: p.credential,
        body: &bytes,
    };
    match b.webhook(delivery, &ctx).await? {
        HookOutcome::Ignored(why) => Ok((
            StatusCode::ACCEPTED,
            Json(json!({"status": "ignored", "reason": why})),
        )
            .into_response()),
        HookOutcome::Done(report) => Ok((
            StatusCode::OK,
            Json(json!({"status": "processed", "report": report})),
        )
            .into_response()),
    }
}

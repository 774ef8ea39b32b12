//! The one place where errors become HTTP responses.
//!
//! Error policy:
//! - Every error response is `{"error": "<stable code>", "message": "<fixed text>"}`; clients and
//!   the pipeline integrations switch on `error`, never on `message`.
//! - Messages are fixed per code (plus, for policy denials, the name of the credential the
//!   caller asked for). They never echo tokens, claims we did not verify, other policies, SQL,
//!   connection strings or provider error text.
//! - The detail (the typed error's `Display`, which itself never contains a secret) is logged
//!   once here, as structured fields, at `warn` for server-side failures and `info` for refusals.
//! - Status classes: 400 malformed request (`body_not_object`: valid JSON that is not an object),
//!   401 invalid job or revocation token, 403 denied by policy, 404/405 no such endpoint or
//!   method, 408 request head too slow (written by `conn.rs`), 413/431 too large, 429 rate
//!   limited (with `Retry-After`), 503 store, issuer or target unavailable (nothing was
//!   issued), 500 a bug or misconfiguration. 429 `too_many_failures` (with `Retry-After`): the
//!   client's failed verifications are over its limit (`refusals/`), on any endpoint that
//!   verifies a caller. Webhooks add 401 `bad_signature` (the delivery is not signed by a
//!   configured secret), 403 `webhook_out_of_scope` (signed, but for a repository outside that
//!   secret's scope) and 409 `replayed_delivery` (its delivery id was already processed). Text
//!   the store cannot hold (a NUL, a control character, an over-long value in a request) is 400
//!   `invalid_text`; data the store itself refused for one request is 500 `store_rejected` (not
//!   an outage: 503 would invite a retry that fails the same way).

use crate::admin::AdminError;
use crate::oidc::VerifyError;
use crate::service::ServiceError;
use crate::webhooks::WebhookError;
use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// An HTTP-facing error: status, stable code, fixed message.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub retry_after: Option<u64>,
    /// Logged, never sent.
    detail: Option<String>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after: None,
            detail: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }
}

fn token_message(code: &str) -> &'static str {
    match code {
        "malformed_token" => "the bearer token is not a well-formed JWT",
        "unknown_issuer" => "the token's issuer is not configured on this broker",
        "unsupported_algorithm" => "the token's signing algorithm is not allowed for its issuer",
        "unknown_key" => "the token was signed with a key its issuer does not publish",
        "bad_signature" => "the token's signature does not verify",
        "bad_audience" => "the token's audience does not include this broker's audience",
        "token_expired" => "the token has expired",
        "token_not_yet_valid" => "the token is not valid yet",
        "token_too_old" => "the token was issued too long ago",
        "missing_claim" => "the token lacks a required claim",
        "invalid_claim" => "the token has a claim of the wrong type",
        "token_replayed" => "this token was already used; request a fresh one",
        _ => "the token was rejected",
    }
}

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> Self {
        let code = e.reason_code();
        let detail = Some(e.to_string());
        let (status, message) = match &e {
            ServiceError::BadRequest {
                code: "payload_too_large",
                message,
            } => (StatusCode::PAYLOAD_TOO_LARGE, message.clone()),
            ServiceError::BadRequest { message, .. } => (StatusCode::BAD_REQUEST, message.clone()),
            // Names the field and the problem, never the value.
            ServiceError::InvalidText(t) => (
                StatusCode::BAD_REQUEST,
                format!("request text the broker cannot accept: {t}"),
            ),
            ServiceError::RateLimited { .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                "too many exchanges for this repository; retry after the time in Retry-After"
                    .to_owned(),
            ),
            ServiceError::MissingToken => (
                StatusCode::UNAUTHORIZED,
                "send the token as `Authorization: Bearer <token>`".to_owned(),
            ),
            ServiceError::Token(v) => token_status(v),
            ServiceError::Replayed | ServiceError::TokenExhausted => {
                (StatusCode::UNAUTHORIZED, token_message(code).to_owned())
            }
            ServiceError::Denied { credential, reason } => (
                StatusCode::FORBIDDEN,
                match *reason {
                    "claims_too_large" => {
                        "the token's claims exceed the policy engine's limits".to_owned()
                    }
                    _ => format!("credential {credential:?} is not allowed for this job"),
                },
            ),
            ServiceError::Provider { credential, error } => match error.reason_code() {
                "target_unavailable" => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "the target for credential {credential:?} is unavailable; nothing was issued"
                    ),
                ),
                "invalid_claim_value" => (
                    StatusCode::FORBIDDEN,
                    format!("credential {credential:?} cannot be issued for this job's claims"),
                ),
                _ => (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("credential {credential:?} could not be issued; nothing was issued"),
                ),
            },
            ServiceError::BadRevocationToken => (
                StatusCode::UNAUTHORIZED,
                "the revocation token is not valid".to_owned(),
            ),
            ServiceError::RevokePending => (
                StatusCode::SERVICE_UNAVAILABLE,
                "revocation failed and will be retried automatically".to_owned(),
            ),
            // Not an outage: this request's data, refused alone (a retry fails the same way).
            ServiceError::Store(crate::store::StoreError::Rejected(_)) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "the broker's store refused this request's data; nothing was issued".to_owned(),
            ),
            ServiceError::Store(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "the broker's store is unavailable; nothing was issued".to_owned(),
            ),
            ServiceError::Frozen => (
                StatusCode::FORBIDDEN,
                "exchanges are frozen by an operator; nothing was issued".to_owned(),
            ),
            ServiceError::TooManyFailures { .. } => too_many_failures(),
        };
        // Policy denials share one public code; the specific reason (no rule, deny rule, unknown
        // credential) is in the audit log only, so callers cannot probe other policies.
        let code = match &e {
            ServiceError::Denied { reason, .. } if *reason != "claims_too_large" => "policy_denied",
            _ => code,
        };
        let mut err = Self::new(status, code, message);
        err.detail = detail;
        if status == StatusCode::SERVICE_UNAVAILABLE {
            err.retry_after = Some(5);
        }
        if let ServiceError::RateLimited { retry_after_secs }
        | ServiceError::TooManyFailures { retry_after_secs } = e
        {
            err.retry_after = Some(retry_after_secs);
        }
        err
    }
}

fn too_many_failures() -> (StatusCode, String) {
    (
        StatusCode::TOO_MANY_REQUESTS,
        "too many requests from this client failed verification; retry after the time in Retry-After"
            .to_owned(),
    )
}

impl From<AdminError> for ApiError {
    fn from(e: AdminError) -> Self {
        let code = e.reason_code();
        let detail = Some(e.to_string());
        let (status, message) = match &e {
            AdminError::MissingToken => (
                StatusCode::UNAUTHORIZED,
                "send an operator token as `Authorization: Bearer <token>`".to_owned(),
            ),
            AdminError::Unauthorized => (
                StatusCode::UNAUTHORIZED,
                "the bearer token is not a valid operator token".to_owned(),
            ),
            AdminError::Replayed { .. } => (
                StatusCode::UNAUTHORIZED,
                token_message("token_replayed").to_owned(),
            ),
            AdminError::Forbidden { needed, .. } => (
                StatusCode::FORBIDDEN,
                format!("this endpoint needs the {needed} role"),
            ),
            AdminError::BadRequest(m) => (StatusCode::BAD_REQUEST, m.clone()),
            // The operator asked by name; what exists is configuration an admin may see.
            AdminError::UnknownFilterValue { .. } => (StatusCode::BAD_REQUEST, e.to_string()),
            AdminError::InvalidText(t) => (
                StatusCode::BAD_REQUEST,
                format!("request text the broker cannot accept: {t}"),
            ),
            AdminError::Store(crate::store::StoreError::Rejected(_)) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "the broker's store refused this request's data".to_owned(),
            ),
            AdminError::Store(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "the broker's store is unavailable".to_owned(),
            ),
            AdminError::TooManyFailures { .. } => too_many_failures(),
        };
        let mut err = Self::new(status, code, message);
        err.detail = detail;
        if status == StatusCode::SERVICE_UNAVAILABLE {
            err.retry_after = Some(5);
        }
        if let AdminError::TooManyFailures { retry_after_secs } = e {
            err.retry_after = Some(retry_after_secs);
        }
        err
    }
}

impl From<WebhookError> for ApiError {
    fn from(e: WebhookError) -> Self {
        let code = e.reason_code();
        let detail = Some(e.to_string());
        let (status, message) = match &e {
            WebhookError::NotConfigured => (StatusCode::NOT_FOUND, "no such endpoint".to_owned()),
            WebhookError::BadSignature => (
                StatusCode::UNAUTHORIZED,
                "the delivery's signature or token does not verify".to_owned(),
            ),
            WebhookError::Replayed(_) => (
                StatusCode::CONFLICT,
                "this delivery was already processed".to_owned(),
            ),
            WebhookError::OutOfScope(_) => (
                StatusCode::FORBIDDEN,
                "the delivery concerns a repository outside the scope of the secret that signed it"
                    .to_owned(),
            ),
            WebhookError::BadRequest(m) => (StatusCode::BAD_REQUEST, m.clone()),
            WebhookError::Store(crate::store::StoreError::Rejected(_)) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "the broker's store refused this delivery's data".to_owned(),
            ),
            WebhookError::Store(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "the broker's store is unavailable".to_owned(),
            ),
            WebhookError::TooManyFailures { .. } => too_many_failures(),
        };
        let mut err = Self::new(status, code, message);
        err.detail = detail;
        if status == StatusCode::SERVICE_UNAVAILABLE {
            err.retry_after = Some(5);
        }
        if let WebhookError::TooManyFailures { retry_after_secs } = e {
            err.retry_after = Some(retry_after_secs);
        }
        err
    }
}

fn token_status(v: &VerifyError) -> (StatusCode, String) {
    let code = v.reason_code();
    if v.is_unavailable() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "the token's issuer keys are unavailable; try again".into(),
        )
    } else if code == "token_too_large" {
        (
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "the bearer token is too large".into(),
        )
    } else {
        (StatusCode::UNAUTHORIZED, token_message(code).to_owned())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::warn!(
                status = self.status.as_u16(),
                code = self.code,
                detail = self.detail.as_deref(),
                "request failed"
            );
        } else {
            tracing::info!(
                status = self.status.as_u16(),
                code = self.code,
                detail = self.detail.as_deref(),
                "request refused"
            );
        }
        let mut resp = (
            self.status,
            Json(json!({"error": self.code, "message": self.message})),
        )
            .into_response();
        if let Some(v) = self
            .retry_after
            .and_then(|s| HeaderValue::from_str(&s.to_string()).ok())
        {
            resp.headers_mut().insert(header::RETRY_AFTER, v);
        }
        resp
    }
}

impl ApiError {
    /// The same JSON error as [`IntoResponse`], as a complete HTTP/1.1 response that closes the
    /// connection: for answers written on a raw socket by the accept loop (`conn.rs`: 408, 431,
    /// 503 at the connection cap) where no request reached the router. Not logged here: those
    /// paths count instead (an attacker's sockets must not become log lines).
    pub fn http1_bytes(&self) -> Vec<u8> {
        let body = json!({"error": self.code, "message": self.message}).to_string();
        let mut head = format!(
            "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n",
            self.status.as_u16(),
            self.status.canonical_reason().unwrap_or(""),
            body.len()
        );
        if let Some(s) = self.retry_after {
            head.push_str(&format!("retry-after: {s}\r\n"));
        }
        head.push_str("\r\n");
        let mut out = head.into_bytes();
        out.extend_from_slice(body.as_bytes());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::ProviderError;

    #[test]
    fn mapping_is_stable() {
        let cases: Vec<(ServiceError, u16, &str)> = vec![
            (ServiceError::Replayed, 401, "token_replayed"),
            (
                ServiceError::Denied {
                    credential: "x".into(),
                    reason: "no_matching_rule",
                },
                403,
                "policy_denied",
            ),
            (
                ServiceError::Provider {
                    credential: "db".into(),
                    error: ProviderError::TargetUnavailable("conn refused to 10.0.0.1".into()),
                },
                503,
                "target_unavailable",
            ),
            (
                ServiceError::BadRevocationToken,
                401,
                "invalid_revocation_token",
            ),
            (
                ServiceError::RateLimited {
                    retry_after_secs: 7,
                },
                429,
                "rate_limited",
            ),
            (
                ServiceError::Store(crate::store::StoreError::Unavailable("x".into())),
                503,
                "store_unavailable",
            ),
            (
                ServiceError::Store(crate::store::StoreError::Rejected("code 22P05".into())),
                500,
                "store_rejected",
            ),
            (
                ServiceError::from(crate::store::text::TextError::new(
                    "credentials: a name",
                    crate::store::text::Problem::Control(0),
                    "a\0",
                )),
                400,
                "invalid_text",
            ),
            (
                ServiceError::TooManyFailures {
                    retry_after_secs: 7,
                },
                429,
                "too_many_failures",
            ),
        ];
        for (e, status, code) in [
            (WebhookError::BadSignature, 401, "bad_signature"),
            (WebhookError::Replayed("d".into()), 409, "replayed_delivery"),
            (WebhookError::NotConfigured, 404, "not_found"),
            (
                WebhookError::OutOfScope("repository \"b/x\"".into()),
                403,
                "webhook_out_of_scope",
            ),
            (
                WebhookError::TooManyFailures {
                    retry_after_secs: 7,
                },
                429,
                "too_many_failures",
            ),
        ] {
            let a = ApiError::from(e);
            assert_eq!((a.status.as_u16(), a.code), (status, code));
        }
        let a = ApiError::from(AdminError::TooManyFailures {
            retry_after_secs: 7,
        });
        assert_eq!(
            (a.status.as_u16(), a.code, a.retry_after),
            (429, "too_many_failures", Some(7))
        );
        for (e, status, code) in cases {
            let a = ApiError::from(e);
            assert_eq!(a.status.as_u16(), status);
            assert_eq!(a.code, code);
            assert!(
                !a.message.contains("10.0.0.1"),
                "provider detail must not reach the client"
            );
            if status == 429 {
                assert_eq!(a.retry_after, Some(7));
            }
        }
    }
}

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
use crate::reason::ReasonCode;
use crate::service::ServiceError;
use crate::store::StoreError;
use crate::webhooks::WebhookError;
use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// An HTTP-facing error: status, stable code, fixed message. Status and message come from the
/// code's row of the one table (`crate::reason`); a few answers say more (see `with_message`).
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: ReasonCode,
    pub message: String,
    pub retry_after: Option<u64>,
    /// Logged, never sent.
    detail: Option<String>,
}

impl ApiError {
    /// The answer for `code`: its status and fixed message; every 503 asks clients to come
    /// back in 5 s.
    pub fn of(code: ReasonCode) -> Self {
        Self::with_message(code, code.message())
    }

    /// `code`'s status with a message of its own: fixed text, or names the caller itself sent
    /// (a credential, a request field), never a token, claim value or provider error.
    pub fn with_message(code: ReasonCode, message: impl Into<String>) -> Self {
        let status = code
            .status()
            .and_then(|s| StatusCode::from_u16(s).ok())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        Self {
            status,
            code,
            message: message.into(),
            retry_after: (status == StatusCode::SERVICE_UNAVAILABLE).then_some(5),
            detail: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::with_message(ReasonCode::BadRequest, message)
    }

    fn detail(mut self, detail: String) -> Self {
        self.detail = Some(detail);
        self
    }

    fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs);
        self
    }
}

/// Text the store cannot hold: names the field and the problem, never the value.
fn invalid_text(t: &crate::store::text::TextError) -> ApiError {
    ApiError::with_message(
        ReasonCode::InvalidText,
        format!("{}: {t}", ReasonCode::InvalidText.message()),
    )
}

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> Self {
        let code = e.reason();
        let answer = match &e {
            ServiceError::BadRequest { message, .. } => ApiError::with_message(code, message),
            ServiceError::InvalidText(t) => invalid_text(t),
            ServiceError::Denied { credential, reason } => match reason {
                ReasonCode::ClaimsTooLarge => ApiError::of(*reason),
                // Policy denials share one public code; the specific reason (no rule, deny
                // rule, unknown credential) is in the audit log only, so callers cannot probe
                // other policies.
                _ => ApiError::with_message(
                    ReasonCode::PolicyDenied,
                    format!("credential {credential:?} is not allowed for this job"),
                ),
            },
            ServiceError::Provider { credential, error } => ApiError::with_message(
                code,
                match error.reason() {
                    ReasonCode::TargetUnavailable => format!(
                        "the target for credential {credential:?} is unavailable; nothing was issued"
                    ),
                    ReasonCode::InvalidClaimValue => {
                        format!("credential {credential:?} cannot be issued for this job's claims")
                    }
                    _ => {
                        format!("credential {credential:?} could not be issued; nothing was issued")
                    }
                },
            ),
            // Nothing was issued: say so on the store's two answers.
            ServiceError::Store(StoreError::Rejected(_) | StoreError::Unavailable(_))
            | ServiceError::Store(StoreError::Conflict(_) | StoreError::BadUrl(_)) => {
                ApiError::with_message(code, format!("{}; nothing was issued", code.message()))
            }
            _ => ApiError::of(code),
        };
        let answer = answer.detail(e.to_string());
        match e {
            ServiceError::RateLimited { retry_after_secs }
            | ServiceError::TooManyFailures { retry_after_secs } => {
                answer.retry_after(retry_after_secs)
            }
            _ => answer,
        }
    }
}

impl From<AdminError> for ApiError {
    fn from(e: AdminError) -> Self {
        let code = e.reason();
        let answer = match &e {
            AdminError::MissingToken => ApiError::with_message(
                code,
                "send an operator token as `Authorization: Bearer <token>`",
            ),
            AdminError::Forbidden { needed, .. } => {
                ApiError::with_message(code, format!("this endpoint needs the {needed} role"))
            }
            AdminError::BadRequest(m) => ApiError::with_message(code, m),
            // The operator asked by name; what exists is configuration an admin may see.
            AdminError::UnknownFilterValue { .. } => ApiError::with_message(code, e.to_string()),
            AdminError::InvalidText(t) => invalid_text(t),
            AdminError::AuditGap { pruned_through } => ApiError::with_message(
                code,
                format!(
                    "audit events through sequence number {pruned_through} were pruned; resume with after={pruned_through}"
                ),
            ),
            _ => ApiError::of(code),
        };
        let answer = answer.detail(e.to_string());
        match e {
            AdminError::TooManyFailures { retry_after_secs } => {
                answer.retry_after(retry_after_secs)
            }
            _ => answer,
        }
    }
}

impl From<WebhookError> for ApiError {
    fn from(e: WebhookError) -> Self {
        let code = e.reason();
        let answer = match &e {
            WebhookError::BadSignature => {
                ApiError::with_message(code, "the delivery's signature or token does not verify")
            }
            WebhookError::BadRequest(m) => ApiError::with_message(code, m),
            WebhookError::Store(StoreError::Rejected(_)) => {
                ApiError::with_message(code, "the broker's store refused this delivery's data")
            }
            _ => ApiError::of(code),
        };
        let answer = answer.detail(e.to_string());
        match e {
            WebhookError::TooManyFailures { retry_after_secs } => {
                answer.retry_after(retry_after_secs)
            }
            _ => answer,
        }
    }
}

/// An error of the OAuth endpoints (`/oauth2/*`, `http/oauth.rs`): RFC 6749 section 5.2's body
/// `{"error", "error_description"}` plus the broker's stable code as `reason`, never cached.
/// The OAuth code is derived from the broker's answer: a malformed request is
/// `invalid_request`, a job token that does not verify (or was used) `invalid_grant`, a policy
/// refusal `invalid_target` (RFC 8693 section 2.2.2; `invalid_scope` when only the scope is
/// not offered). These answer 400; rate limits (429), outages (503, `temporarily_unavailable`)
/// and broker faults (500, `server_error`) keep their status and `Retry-After`.
#[derive(Debug)]
pub struct OAuthError {
    api: ApiError,
    error: &'static str,
}

impl OAuthError {
    /// The RFC 6749 / RFC 8693 code for the broker's answer.
    fn code(api: &ApiError) -> &'static str {
        match api.code {
            ReasonCode::UnsupportedGrantType => "unsupported_grant_type",
            ReasonCode::PolicyDenied
            | ReasonCode::ClaimsTooLarge
            | ReasonCode::InvalidClaimValue
            | ReasonCode::Frozen => "invalid_target",
            ReasonCode::MissingToken => "invalid_request",
            _ => match api.status.as_u16() {
                401 => "invalid_grant",
                429 | 503 => "temporarily_unavailable",
                s if s < 500 => "invalid_request",
                _ => "server_error",
            },
        }
    }

    /// The wire code (`invalid_grant`, ...).
    pub fn error(&self) -> &'static str {
        self.error
    }
}

impl From<ServiceError> for OAuthError {
    fn from(e: ServiceError) -> Self {
        let scope = matches!(
            e,
            ServiceError::Denied {
                reason: ReasonCode::ScopeNotOffered,
                ..
            }
        );
        let mut api = ApiError::from(e);
        let error = if scope {
            "invalid_scope"
        } else {
            Self::code(&api)
        };
        if !matches!(api.status.as_u16(), 429 | 500..=599) {
            api.status = StatusCode::BAD_REQUEST;
        }
        Self { api, error }
    }
}

impl IntoResponse for OAuthError {
    fn into_response(self) -> Response {
        self.api.log();
        let description = oauth_description(&self.api.message);
        let mut resp = (
            self.api.status,
            [
                (header::CACHE_CONTROL, "no-store"),
                (header::PRAGMA, "no-cache"),
            ],
            Json(json!({
                "error": self.error,
                "error_description": description,
                "reason": self.api.code.as_str(),
            })),
        )
            .into_response();
        if let Some(v) = self
            .api
            .retry_after
            .and_then(|s| HeaderValue::from_str(&s.to_string()).ok())
        {
            resp.headers_mut().insert(header::RETRY_AFTER, v);
        }
        resp
    }
}

/// RFC 6749 section 5.2: an `error_description` is printable ASCII without `"` and `\`.
fn oauth_description(message: &str) -> String {
    message
        .chars()
        .map(|c| if c == '"' { '\'' } else { c })
        .filter(|c| matches!(c, ' '..='~') && *c != '\\')
        .collect()
}

impl ApiError {
    /// The one log line of an error answer: `warn` for server-side failures, `info` for
    /// refusals; the detail never holds a secret.
    fn log(&self) {
        if self.status.is_server_error() {
            tracing::warn!(
                status = self.status.as_u16(),
                code = self.code.as_str(),
                detail = self.detail.as_deref(),
                "request failed"
            );
        } else {
            tracing::info!(
                status = self.status.as_u16(),
                code = self.code.as_str(),
                detail = self.detail.as_deref(),
                "request refused"
            );
        }
    }
}

impl From<crate::leaks::LeakError> for ApiError {
    fn from(e: crate::leaks::LeakError) -> Self {
        use crate::leaks::LeakError;
        let code = e.reason();
        let answer = match &e {
            LeakError::Signature(_) => {
                ApiError::with_message(code, "the report's signature does not verify")
            }
            LeakError::BadRequest(r) => ApiError::with_message(code, r.to_string()),
            _ => ApiError::of(code),
        };
        let answer = answer.detail(e.to_string());
        match e {
            LeakError::TooManyFailures { retry_after_secs } => answer.retry_after(retry_after_secs),
            _ => answer,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        self.log();
        let mut resp = (
            self.status,
            Json(json!({"error": self.code.as_str(), "message": self.message})),
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
        let body = json!({"error": self.code.as_str(), "message": self.message}).to_string();
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
    fn oauth_errors_follow_rfc_6749_and_8693() {
        let denied = |reason| ServiceError::Denied {
            credential: "x\"y".into(),
            reason,
        };
        let bad = |code| ServiceError::BadRequest {
            code,
            message: "m".into(),
        };
        for (e, status, error) in [
            (ServiceError::Replayed, 400, "invalid_grant"),
            (
                ServiceError::Token(crate::oidc::VerifyError::TokenExpired),
                400,
                "invalid_grant",
            ),
            (denied(ReasonCode::NoMatchingRule), 400, "invalid_target"),
            (denied(ReasonCode::UnknownCredential), 400, "invalid_target"),
            (denied(ReasonCode::AmbiguousTarget), 400, "invalid_target"),
            (denied(ReasonCode::ScopeNotOffered), 400, "invalid_scope"),
            (ServiceError::Frozen, 400, "invalid_target"),
            (
                bad(ReasonCode::UnsupportedGrantType),
                400,
                "unsupported_grant_type",
            ),
            (
                bad(ReasonCode::UnsupportedTokenType),
                400,
                "invalid_request",
            ),
            (bad(ReasonCode::PayloadTooLarge), 400, "invalid_request"),
            (ServiceError::MissingToken, 400, "invalid_request"),
            (
                ServiceError::Store(StoreError::Unavailable("x".into())),
                503,
                "temporarily_unavailable",
            ),
            (
                ServiceError::RateLimited {
                    retry_after_secs: 7,
                },
                429,
                "temporarily_unavailable",
            ),
            (
                ServiceError::Store(StoreError::Rejected("x".into())),
                500,
                "server_error",
            ),
        ] {
            let o = OAuthError::from(e);
            assert_eq!((o.api.status.as_u16(), o.error()), (status, error));
            // RFC 6749 section 5.2: no `"` or `\` in a description.
            let resp = o.into_response();
            assert_eq!(resp.headers()[header::CACHE_CONTROL], "no-store");
        }
        assert_eq!(
            oauth_description("credential \"x\\\"y\" é\n"),
            "credential 'x'y' "
        );
    }

    #[test]
    fn mapping_is_stable() {
        let cases: Vec<(ServiceError, u16, &str)> = vec![
            (ServiceError::Replayed, 401, "token_replayed"),
            (
                ServiceError::Denied {
                    credential: "x".into(),
                    reason: ReasonCode::NoMatchingRule,
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
            assert_eq!((a.status.as_u16(), a.code.as_str()), (status, code));
        }
        let a = ApiError::from(AdminError::TooManyFailures {
            retry_after_secs: 7,
        });
        assert_eq!(
            (a.status.as_u16(), a.code.as_str(), a.retry_after),
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

//! The standard OAuth endpoints (issue 25), beside the native ones:
//!
//! - `POST /oauth2/token`: RFC 8693 token exchange, form-encoded; the job's OIDC token is the
//!   `subject_token`. The exchange itself is `service::oauth` over the native exchange.
//! - `POST /oauth2/revoke`: RFC 7009; `token` is an API token minted here or a revocation
//!   handle. 200 for any token, known or not, as the RFC asks.
//! - `GET /.well-known/oauth-authorization-server`: RFC 8414 metadata naming these endpoints,
//!   introspection (`POST /v1/introspect`, RFC 7662) and the JWKS.
//!
//! No client registration: the subject token is the caller's whole authentication, so
//! `client_id` and client credentials are ignored as unrecognised parameters (RFC 6749
//! section 3.2). Errors are RFC 6749 section 5.2's shape (`http/error.rs`, [`OAuthError`]).

use super::error::OAuthError;
use super::{body_bytes, ctx, rfc3339};
use crate::audit::Action;
use crate::reason::ReasonCode;
use crate::secret::Sensitive;
use crate::service::{
    Broker, GRANT_TYPE_TOKEN_EXCHANGE, ServiceError, TOKEN_TYPE_ACCESS_TOKEN, TOKEN_TYPE_ID_TOKEN,
    TOKEN_TYPE_JWT, TokenExchangeRequest,
};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde_json::json;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

/// Path of the token endpoint.
pub const TOKEN_PATH: &str = "/oauth2/token";
/// Path of the revocation endpoint.
pub const REVOKE_PATH: &str = "/oauth2/revoke";
/// Path of the metadata document.
pub const METADATA_PATH: &str = "/.well-known/oauth-authorization-server";

/// The OAuth routes (on the public listener).
pub(super) fn routes() -> Router<Arc<Broker>> {
    Router::new()
        .route(TOKEN_PATH, post(token))
        .route(REVOKE_PATH, post(revoke))
        .route(METADATA_PATH, get(metadata))
}

fn bad(code: ReasonCode, message: impl Into<String>) -> ServiceError {
    ServiceError::BadRequest {
        code,
        message: message.into(),
    }
}

/// A form body's parameters: every value of each name, empty values dropped ("sent without a
/// value MUST be treated as if they were omitted", RFC 6749 section 3.1).
type Form = BTreeMap<String, Vec<String>>;

/// The form of an `application/x-www-form-urlencoded` body, with `names` checked at the text
/// boundary (they reach the audit log); invalid UTF-8 is refused, not replaced.
fn form(headers: &HeaderMap, body: &[u8], names: &[&str]) -> Result<Form, ServiceError> {
    let is_form = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| {
            v.trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        });
    if !is_form {
        return Err(bad(
            ReasonCode::BadRequest,
            "send the parameters as application/x-www-form-urlencoded",
        ));
    }
    let mut out = Form::new();
    for (k, v) in url::form_urlencoded::parse(body) {
        // The parser replaces invalid UTF-8 with U+FFFD: refuse it (a caller's own U+FFFD
        // with it) rather than act on altered text.
        if k.contains('\u{FFFD}') || v.contains('\u{FFFD}') {
            return Err(bad(ReasonCode::BadRequest, "the form is not valid UTF-8"));
        }
        if v.is_empty() {
            continue;
        }
        if names.contains(&k.as_ref()) && k != "subject_token" && k != "token" {
            crate::store::text::check(&k, &v)?;
        }
        out.entry(k.into_owned()).or_default().push(v.into_owned());
    }
    Ok(out)
}

/// The one value of a parameter that may appear once (RFC 6749 section 3.2).
fn single(form: &mut Form, name: &str) -> Result<Option<String>, ServiceError> {
    match form.remove(name) {
        None => Ok(None),
        Some(mut v) if v.len() == 1 => Ok(v.pop()),
        Some(_) => Err(bad(
            ReasonCode::BadRequest,
            format!("parameter `{name}` is repeated"),
        )),
    }
}

fn required(form: &mut Form, name: &str) -> Result<String, ServiceError> {
    single(form, name)?.ok_or_else(|| {
        bad(
            ReasonCode::BadRequest,
            format!("parameter `{name}` is missing"),
        )
    })
}

/// An RFC 8693 request, or why it is malformed. Also the issued token type to answer with.
fn token_request(
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(TokenExchangeRequest, &'static str), ServiceError> {
    let mut f = form(
        headers,
        body,
        &["grant_type", "resource", "audience", "scope"],
    )?;
    let grant_type = required(&mut f, "grant_type")?;
    if grant_type != GRANT_TYPE_TOKEN_EXCHANGE {
        return Err(bad(
            ReasonCode::UnsupportedGrantType,
            ReasonCode::UnsupportedGrantType.message(),
        ));
    }
    let subject_token = required(&mut f, "subject_token")?;
    let subject_type = required(&mut f, "subject_token_type")?;
    if subject_type != TOKEN_TYPE_ID_TOKEN && subject_type != TOKEN_TYPE_JWT {
        return Err(bad(
            ReasonCode::UnsupportedTokenType,
            "subject_token_type: send the job's OIDC token as urn:ietf:params:oauth:token-type:id_token or :jwt",
        ));
    }
    let issued = match single(&mut f, "requested_token_type")?.as_deref() {
        None | Some(TOKEN_TYPE_ACCESS_TOKEN) => TOKEN_TYPE_ACCESS_TOKEN,
        Some(TOKEN_TYPE_JWT) => TOKEN_TYPE_JWT,
        Some(_) => {
            return Err(bad(
                ReasonCode::UnsupportedTokenType,
                "requested_token_type: this server issues urn:ietf:params:oauth:token-type:access_token (a JWT)",
            ));
        }
    };
    if f.contains_key("actor_token") || f.contains_key("actor_token_type") {
        return Err(bad(
            ReasonCode::BadRequest,
            "actor_token: delegation is not supported",
        ));
    }
    let scopes = match single(&mut f, "scope")? {
        Some(s) => s
            .split(' ')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
        None => Vec::new(),
    };
    Ok((
        TokenExchangeRequest {
            subject_token: Sensitive::new(subject_token),
            resources: f.remove("resource").unwrap_or_default(),
            audiences: f.remove("audience").unwrap_or_default(),
            scopes,
        },
        issued,
    ))
}

/// RFC 6749 section 5.1: never cached.
const NO_STORE: [(header::HeaderName, &str); 2] = [
    (header::CACHE_CONTROL, "no-store"),
    (header::PRAGMA, "no-cache"),
];

async fn token(
    State(b): State<Arc<Broker>>,
    addr: Option<Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, OAuthError> {
    let ctx = ctx(&headers, addr.map(|a| (a.0).0));
    let parsed = body_bytes(body).and_then(|body| token_request(&headers, &body));
    let (req, issued_type) = match parsed {
        Ok(p) => p,
        Err(e) => {
            let e = b.reject(Action::Exchange, &ctx, e).await;
            super::record_exchange(&b, &[], Err(&e));
            return Err(e.into());
        }
    };
    let result = b.token_exchange(req, &ctx).await;
    let names = result
        .as_ref()
        .map(|r| vec![r.credential.clone()])
        .unwrap_or_default();
    super::record_exchange(&b, &names, result.as_ref().map(|_| ()));
    let r = result?;
    let expires_in = (r.expires_at - b.clock.now()).whole_seconds().max(0);
    let body = json!({
        // The one place an OAuth-issued token leaves the process.
        "access_token": r.access_token.expose(),
        "issued_token_type": issued_type,
        "token_type": "Bearer",
        "expires_in": expires_in,
        "scope": r.scope,
        // Extensions (RFC 8693 section 2.2.1 allows more members): the native answer's handle.
        "revocation_token": r.revocation_token.expose(),
        "grant_id": r.grant_id,
        "expires_at": rfc3339(r.expires_at),
    });
    Ok((StatusCode::OK, NO_STORE, Json(body)).into_response())
}

async fn revoke(
    State(b): State<Arc<Broker>>,
    addr: Option<Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, OAuthError> {
    let ctx = ctx(&headers, addr.map(|a| (a.0).0));
    let parsed = body_bytes(body)
        .and_then(|body| form(&headers, &body, &["token_type_hint"]))
        .and_then(|mut f| required(&mut f, "token"));
    let token = match parsed {
        Ok(t) => Sensitive::new(t),
        Err(e) => return Err(b.reject(Action::Revoke, &ctx, e).await.into()),
    };
    // `token_type_hint` is only a hint: both kinds are recognised by their shape.
    b.revoke_presented(&token, &ctx).await?;
    Ok((StatusCode::OK, NO_STORE).into_response())
}

/// RFC 8414 metadata. The issuer is `public_url` (the `iss` of every API token); the document
/// is served at the root, so `public_url` should have no path.
async fn metadata(State(b): State<Arc<Broker>>) -> Response {
    let issuer = b.api_tokens.issuer().trim_end_matches('/');
    let at = |p: &str| format!("{issuer}{p}");
    (
        [(header::CACHE_CONTROL, "public, max-age=300")],
        Json(json!({
            "issuer": issuer,
            "token_endpoint": at(TOKEN_PATH),
            "revocation_endpoint": at(REVOKE_PATH),
            "introspection_endpoint": at("/v1/introspect"),
            "jwks_uri": at("/.well-known/jwks.json"),
            "grant_types_supported": [GRANT_TYPE_TOKEN_EXCHANGE],
            // No authorization endpoint: no response type is supported.
            "response_types_supported": [],
            "token_endpoint_auth_methods_supported": ["none"],
            "revocation_endpoint_auth_methods_supported": ["none"],
            "introspection_endpoint_auth_methods_supported": ["none"],
        })),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(ct: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_TYPE, ct.parse().unwrap());
        h
    }

    fn parse(body: &str) -> Result<(TokenExchangeRequest, &'static str), String> {
        token_request(
            &headers("application/x-www-form-urlencoded"),
            body.as_bytes(),
        )
        .map_err(|e| e.reason_code().to_owned())
    }

    const OK: &str = "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Atoken-exchange&subject_token=eyJ.x.y&subject_token_type=urn%3Aietf%3Aparams%3Aoauth%3Atoken-type%3Aid_token";

    #[test]
    fn a_token_exchange_form_parses() {
        let (r, issued) =
            parse(&format!("{OK}&resource=https%3A%2F%2Fa&resource=https%3A%2F%2Fb&audience=deploy&scope=read+write&client_id=x")).unwrap();
        assert_eq!(r.subject_token.expose(), "eyJ.x.y");
        assert_eq!(r.resources, ["https://a", "https://b"]);
        assert_eq!(r.audiences, ["deploy"]);
        assert_eq!(r.scopes, ["read", "write"]);
        assert_eq!(issued, TOKEN_TYPE_ACCESS_TOKEN);
        let (_, issued) = parse(&format!(
            "{OK}&requested_token_type=urn:ietf:params:oauth:token-type:jwt&scope="
        ))
        .unwrap();
        assert_eq!(issued, TOKEN_TYPE_JWT);
    }

    #[test]
    fn malformed_token_exchange_forms_are_refused_with_their_code() {
        let jwt_type = OK.replace("id_token", "jwt");
        assert!(parse(&jwt_type).is_ok());
        for (body, code) in [
            (
                OK.replace("token-exchange", "client_credentials"),
                "unsupported_grant_type",
            ),
            (OK.replace("id_token", "saml2"), "unsupported_token_type"),
            (
                format!("{OK}&requested_token_type=urn:x"),
                "unsupported_token_type",
            ),
            (OK.replace("subject_token=eyJ.x.y&", ""), "bad_request"),
            (
                OK.replace("subject_token=eyJ.x.y", "subject_token="),
                "bad_request",
            ),
            (format!("{OK}&subject_token=again"), "bad_request"),
            (
                format!("{OK}&actor_token=a&actor_token_type=b"),
                "bad_request",
            ),
            (format!("{OK}&audience=a%00b"), "invalid_text"),
            (format!("{OK}&scope=%FF"), "bad_request"),
            (String::new(), "bad_request"),
        ] {
            assert_eq!(parse(&body).err().as_deref(), Some(code), "{body}");
        }
        let json = token_request(&headers("application/json"), b"{}").err();
        assert_eq!(json.map(|e| e.reason_code()), Some("bad_request"));
    }
}

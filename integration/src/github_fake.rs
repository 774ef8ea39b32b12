//! A local fake of the GitHub REST calls the `github_app` provider makes, for its end-to-end
//! tests, written from GitHub's REST documentation (API version 2022-11-28):
//!
//! - `GET /repos/{owner}/{repo}/installation`, `GET /orgs/{org}/installation`,
//!   `GET /users/{username}/installation` ("Get a repository / organization / user installation
//!   for the authenticated app"): App JWT required; 200 `{"id": …, "account": {"login": …}}`,
//!   404 when the App is not installed there.
//! - `POST /app/installations/{installation_id}/access_tokens` ("Create an installation access
//!   token for an app"): App JWT required; body `{"repositories": [names], "permissions":
//!   {name: level}}`; 201 `{"token", "expires_at" (one hour), "permissions",
//!   "repository_selection", "repositories"}`; 422 when a repository is not in the installation.
//! - `DELETE /installation/token` ("Revoke an installation access token"): authenticated with
//!   the token itself; 204, then the token is invalid (401).
//! - `GET /repos/{owner}/{repo}` with an installation token, standing for "using" the token:
//!   200 if the token is live and covers the repository, 401 if revoked or unknown, 404 if not
//!   covered.
//!
//! The App JWT is checked as GitHub documents it: RS256 signature against the App's public key
//! (the committed test key `testdata/keys/rsa-1`), `iss` = the App id, `iat` present and not in
//! the future (60 s leeway), `exp` in the future and at most 10 minutes after `iat` and after
//! now. Every request is recorded (method, path, JSON body, whether the JWT verified).
//!
//! Limits (what this fake does not do): one App, no rate limits or secondary limits, no
//! pagination, no `Accept`/API-version negotiation (the headers are recorded, not enforced
//! beyond presence), no permission checks against what the App itself was granted (any
//! documented permission is granted), no suspended installations, no GitHub Enterprise Server
//! path prefix other than what the base URL carries, tokens never expire on their own during a
//! test.

#![allow(clippy::expect_used, clippy::unwrap_used)] // test harness

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

/// One request the fake saw.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub body: Value,
    /// The App JWT verified (for the calls that need one).
    pub jwt_ok: bool,
    pub api_version: Option<String>,
}

/// A token the fake minted.
#[derive(Debug, Clone)]
pub struct Minted {
    pub token: String,
    pub installation: u64,
    pub repositories: Vec<String>,
    pub permissions: Value,
    pub revoked: bool,
}

#[derive(Default)]
struct Inner {
    seen: Vec<Seen>,
    tokens: Vec<Minted>,
    /// The App JWT claims seen (iat, exp, iss), for the tests' own checks.
    jwt_claims: Vec<Value>,
}

struct Shared {
    app_id: u64,
    /// owner → (installation id, repositories of the installation).
    installs: BTreeMap<String, (u64, BTreeSet<String>)>,
    key: jsonwebtoken::DecodingKey,
    inner: Mutex<Inner>,
}

/// The running fake; stopped when dropped.
pub struct FakeGithub {
    pub url: String,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeGithub {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The committed test RSA key (`testdata/keys/rsa-1.pem`) the fake App signs with.
pub fn app_private_key_path() -> std::path::PathBuf {
    crate::repo_root().join("testdata/keys/rsa-1.pem")
}

fn app_public_key() -> jsonwebtoken::DecodingKey {
    let jwk: Value = serde_json::from_str(
        &std::fs::read_to_string(crate::repo_root().join("testdata/keys/rsa-1.jwk.json"))
            .expect("jwk"),
    )
    .expect("jwk json");
    jsonwebtoken::DecodingKey::from_rsa_components(
        jwk["n"].as_str().expect("n"),
        jwk["e"].as_str().expect("e"),
    )
    .expect("rsa key")
}

fn now() -> i64 {
    broker::time::Clock::now(&broker::time::SystemClock).unix_timestamp()
}

impl FakeGithub {
    /// Start with App `app_id`, installed on each owner with the listed repositories.
    pub async fn start(app_id: u64, installs: &[(&str, u64, &[&str])]) -> Self {
        let shared = Arc::new(Shared {
            app_id,
            installs: installs
                .iter()
                .map(|(o, id, repos)| {
                    (
                        (*o).to_owned(),
                        (*id, repos.iter().map(|r| (*r).to_owned()).collect()),
                    )
                })
                .collect(),
            key: app_public_key(),
            inner: Mutex::new(Inner::default()),
        });
        let app = Router::new()
            .route("/repos/{owner}/{repo}/installation", get(repo_installation))
            .route("/orgs/{owner}/installation", get(owner_installation))
            .route("/users/{owner}/installation", get(owner_installation))
            .route("/app/installations/{id}/access_tokens", post(access_tokens))
            .route("/installation/token", delete(revoke))
            .route("/repos/{owner}/{repo}", get(use_token))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { url, shared, task }
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.shared.inner.lock().unwrap().seen.clone()
    }

    pub fn tokens(&self) -> Vec<Minted> {
        self.shared.inner.lock().unwrap().tokens.clone()
    }

    pub fn jwt_claims(&self) -> Vec<Value> {
        self.shared.inner.lock().unwrap().jwt_claims.clone()
    }
}

fn bearer(h: &HeaderMap) -> Option<String> {
    let v = h.get("authorization")?.to_str().ok()?;
    v.strip_prefix("Bearer ")
        .or_else(|| v.strip_prefix("token "))
        .map(str::to_owned)
}

/// GitHub's checks of an App JWT (see the module documentation).
fn check_jwt(s: &Shared, h: &HeaderMap) -> bool {
    let Some(t) = bearer(h) else { return false };
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    v.validate_aud = false;
    v.validate_exp = false;
    v.set_required_spec_claims(&["iat", "exp", "iss"]);
    let Ok(d) = jsonwebtoken::decode::<Value>(&t, &s.key, &v) else {
        return false;
    };
    let c = d.claims;
    s.inner.lock().unwrap().jwt_claims.push(c.clone());
    let (Some(iat), Some(exp)) = (c["iat"].as_i64(), c["exp"].as_i64()) else {
        return false;
    };
    let iss_ok =
        c["iss"].as_str() == Some(&s.app_id.to_string()) || c["iss"].as_u64() == Some(s.app_id);
    let n = now();
    iss_ok && iat <= n + 60 && exp > n && exp - iat <= 600 && exp - n <= 600
}

fn record(s: &Shared, method: &str, path: String, body: Value, jwt_ok: bool, h: &HeaderMap) {
    s.inner.lock().unwrap().seen.push(Seen {
        method: method.into(),
        path,
        body,
        jwt_ok,
        api_version: h
            .get("x-github-api-version")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
    });
}

fn message(status: StatusCode, m: &str) -> Response {
    (
        status,
        axum::Json(json!({"message": m, "documentation_url": "https://docs.github.com/rest"})),
    )
        .into_response()
}

async fn repo_installation(
    State(s): State<Arc<Shared>>,
    Path((owner, repo)): Path<(String, String)>,
    h: HeaderMap,
) -> Response {
    let ok = check_jwt(&s, &h);
    record(
        &s,
        "GET",
        format!("/repos/{owner}/{repo}/installation"),
        Value::Null,
        ok,
        &h,
    );
    if !ok {
        return message(
            StatusCode::UNAUTHORIZED,
            "A JSON web token could not be decoded",
        );
    }
    match s.installs.get(&owner) {
        Some((id, repos)) if repos.contains(&repo) => {
            axum::Json(json!({"id": id, "account": {"login": owner}, "app_id": s.app_id}))
                .into_response()
        }
        _ => message(StatusCode::NOT_FOUND, "Not Found"),
    }
}

async fn owner_installation(
    State(s): State<Arc<Shared>>,
    Path(owner): Path<String>,
    uri: axum::http::Uri,
    h: HeaderMap,
) -> Response {
    let ok = check_jwt(&s, &h);
    record(&s, "GET", uri.path().to_owned(), Value::Null, ok, &h);
    if !ok {
        return message(
            StatusCode::UNAUTHORIZED,
            "A JSON web token could not be decoded",
        );
    }
    match s.installs.get(&owner) {
        Some((id, _)) => {
            axum::Json(json!({"id": id, "account": {"login": owner}, "app_id": s.app_id}))
                .into_response()
        }
        None => message(StatusCode::NOT_FOUND, "Not Found"),
    }
}

async fn access_tokens(
    State(s): State<Arc<Shared>>,
    Path(id): Path<u64>,
    h: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let ok = check_jwt(&s, &h);
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    record(
        &s,
        "POST",
        format!("/app/installations/{id}/access_tokens"),
        body.clone(),
        ok,
        &h,
    );
    if !ok {
        return message(
            StatusCode::UNAUTHORIZED,
            "A JSON web token could not be decoded",
        );
    }
    let Some((owner, (_, repos))) = s.installs.iter().find(|(_, (i, _))| *i == id) else {
        return message(StatusCode::NOT_FOUND, "Not Found");
    };
    let asked: Vec<String> = match body.get("repositories") {
        None => repos.iter().cloned().collect(),
        Some(v) => match serde_json::from_value(v.clone()) {
            Ok(r) => r,
            Err(_) => return message(StatusCode::UNPROCESSABLE_ENTITY, "Invalid request."),
        },
    };
    if asked.iter().any(|r| !repos.contains(r)) {
        return message(
            StatusCode::UNPROCESSABLE_ENTITY,
            "There is at least one repository that does not exist or is not accessible to the parent installation.",
        );
    }
    let permissions = body.get("permissions").cloned().unwrap_or(json!({}));
    let token = format!("ghs_{}", uuid::Uuid::new_v4().simple());
    s.inner.lock().unwrap().tokens.push(Minted {
        token: token.clone(),
        installation: id,
        repositories: asked.clone(),
        permissions: permissions.clone(),
        revoked: false,
    });
    let expires = broker::time::Clock::now(&broker::time::SystemClock) + time::Duration::hours(1);
    let repositories: Vec<Value> = asked
        .iter()
        .map(|r| json!({"name": r, "full_name": format!("{owner}/{r}")}))
        .collect();
    (
        StatusCode::CREATED,
        axum::Json(json!({
            "token": token,
            "expires_at": expires.format(&time::format_description::well_known::Rfc3339).unwrap(),
            "permissions": permissions,
            "repository_selection": if body.get("repositories").is_some() { "selected" } else { "all" },
            "repositories": repositories,
        })),
    )
        .into_response()
}

async fn revoke(State(s): State<Arc<Shared>>, h: HeaderMap) -> Response {
    record(
        &s,
        "DELETE",
        "/installation/token".into(),
        Value::Null,
        false,
        &h,
    );
    let Some(t) = bearer(&h) else {
        return message(StatusCode::UNAUTHORIZED, "Requires authentication");
    };
    let mut inner = s.inner.lock().unwrap();
    match inner.tokens.iter_mut().find(|m| m.token == t && !m.revoked) {
        Some(m) => {
            m.revoked = true;
            StatusCode::NO_CONTENT.into_response()
        }
        None => message(StatusCode::UNAUTHORIZED, "Bad credentials"),
    }
}

async fn use_token(
    State(s): State<Arc<Shared>>,
    Path((owner, repo)): Path<(String, String)>,
    h: HeaderMap,
) -> Response {
    let Some(t) = bearer(&h) else {
        return message(StatusCode::UNAUTHORIZED, "Requires authentication");
    };
    let inner = s.inner.lock().unwrap();
    match inner.tokens.iter().find(|m| m.token == t && !m.revoked) {
        None => message(StatusCode::UNAUTHORIZED, "Bad credentials"),
        Some(m) if m.repositories.contains(&repo) => {
            axum::Json(json!({"name": repo, "full_name": format!("{owner}/{repo}")}))
                .into_response()
        }
        Some(_) => message(StatusCode::NOT_FOUND, "Not Found"),
    }
}

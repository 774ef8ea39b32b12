//! The GitHub App provider: an App JWT (RS256, `iss` = app id, `iat` backdated 60 s, `exp` 9
//! minutes after now: 10 minutes after `iat`, GitHub's maximum), the installation of the owner,
//! then `POST /app/installations/{id}/access_tokens` limited to the repositories and
//! permissions asked for (never more than the policy's), and `DELETE /installation/token` at the
//! grant's end.
//!
//! Revocation needs the token itself (GitHub authenticates `DELETE /installation/token` with
//! it), and the broker never stores a token: the process that minted it holds it in memory
//! until revoke. A token whose holder is gone (a restart, a crash, another replica revoking)
//! cannot be deleted and ends at GitHub's own expiry (one hour after minting); the revocation's
//! audit event says so. The store keeps its SHA-256, which the exchange's audit event names.

use super::config::GithubAppConfig;
use super::permissions::Level;
use super::spec::{GithubAppSpec, valid_github_name};
use crate::outbound::Outbound;
use crate::providers::template::Template;
use crate::providers::{
    CredentialDef, CredentialKind, CredentialSpec, DefinitionError, Field, IssuedCredential,
    MintRequest, Minted, Provider, ProviderError,
};
use crate::secret::{Sensitive, sha256_hex};
use async_trait::async_trait;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::StatusCode;
use serde::Deserialize;
use serde_json::{Map, Value, json};
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Mutex;
use time::OffsetDateTime;
use uuid::Uuid;

const API_VERSION: &str = "2022-11-28";

struct App {
    app_id: u64,
    key: EncodingKey,
    api_url: String,
    http: reqwest::Client,
}

/// A minted token this process holds until it is revoked.
struct Held {
    token: Sensitive,
    app: String,
}

/// The `github_app` provider: the configured Apps by name, and the tokens minted here.
pub struct GithubAppProvider {
    apps: BTreeMap<String, App>,
    held: Mutex<HashMap<String, Held>>,
}

impl fmt::Debug for GithubAppProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let apps: BTreeMap<&str, (u64, &str)> = self
            .apps
            .iter()
            .map(|(n, a)| (n.as_str(), (a.app_id, a.api_url.as_str())))
            .collect();
        f.debug_struct("GithubAppProvider")
            .field("apps", &apps)
            .finish_non_exhaustive()
    }
}

/// Why the provider cannot start (names the key, never key material).
#[derive(Debug, thiserror::Error)]
#[error("targets.github_app.{app}: {reason}")]
pub struct GithubAppConfigError {
    pub app: String,
    pub reason: String,
}

#[derive(serde::Serialize)]
struct AppJwt {
    iat: i64,
    exp: i64,
    iss: String,
}

#[derive(Deserialize)]
struct Installation {
    id: u64,
}

#[derive(Deserialize)]
struct AccessToken {
    token: String,
    expires_at: String,
    #[serde(default)]
    permissions: Value,
}

/// The job's request: repositories and permissions within the policy's.
#[derive(Debug, Default)]
struct Asked {
    repositories: Option<Vec<String>>,
    permissions: Option<BTreeMap<String, Level>>,
}

fn bad(m: impl Into<String>) -> ProviderError {
    ProviderError::InvalidParameters(m.into())
}

fn exceeds(m: impl Into<String>) -> ProviderError {
    ProviderError::ExceedsPolicy(m.into())
}

fn parse_asked(spec: &GithubAppSpec, params: &Value) -> Result<Asked, ProviderError> {
    let m = match params {
        Value::Null => return Ok(Asked::default()),
        Value::Object(m) => m,
        _ => return Err(bad("parameters must be an object")),
    };
    if let Some(k) = m
        .keys()
        .find(|k| !matches!(k.as_str(), "repositories" | "permissions"))
    {
        return Err(bad(format!(
            "unknown parameter {k:?} (github_app takes repositories, permissions)"
        )));
    }
    let mut asked = Asked::default();
    if let Some(r) = m.get("repositories") {
        let names: Vec<String> = serde_json::from_value(r.clone())
            .map_err(|_| bad("repositories: a list of repository names"))?;
        if names.is_empty() || names.len() > 500 || !names.iter().all(|n| valid_github_name(n)) {
            return Err(bad(
                "repositories: 1 to 500 repository names ([A-Za-z0-9._-])",
            ));
        }
        asked.repositories = Some(names);
    }
    if let Some(p) = m.get("permissions") {
        let perms: BTreeMap<String, Level> = serde_json::from_value(p.clone())
            .map_err(|_| bad("permissions: an object of name: read|write|admin"))?;
        if perms.is_empty() {
            return Err(bad("permissions: name at least one"));
        }
        for (name, level) in &perms {
            match spec.permissions.get(name) {
                Some(allowed) if level <= allowed => {}
                Some(allowed) => {
                    return Err(exceeds(format!(
                        "permission {name:?}: {} asked, the policy allows {}",
                        level.as_str(),
                        allowed.as_str()
                    )));
                }
                None => {
                    return Err(exceeds(format!("permission {name:?} is not in the policy")));
                }
            }
        }
        asked.permissions = Some(perms);
    }
    Ok(asked)
}

/// A GitHub answer as an error: the status only (bodies can echo what was sent).
fn answer_error(what: &str, status: StatusCode) -> ProviderError {
    match status.as_u16() {
        500..=599 | 429 => {
            ProviderError::TargetUnavailable(format!("{what}: GitHub answered {status}"))
        }
        403 if what.contains("access_tokens") => ProviderError::TargetUnavailable(format!(
            "{what}: GitHub answered {status} (rate limit?)"
        )),
        _ => ProviderError::Misconfigured(format!("{what}: GitHub answered {status}")),
    }
}

fn transport_error(what: &str, e: &reqwest::Error) -> ProviderError {
    // reqwest's Display can include the URL, which holds no secret here (no query strings).
    let kind = if e.is_timeout() {
        "timed out"
    } else {
        "could not connect"
    };
    ProviderError::TargetUnavailable(format!("{what}: {kind}"))
}

impl GithubAppProvider {
    pub fn new(cfg: &BTreeMap<String, GithubAppConfig>) -> Result<Self, GithubAppConfigError> {
        let mut apps = BTreeMap::new();
        for (name, c) in cfg {
            let err = |reason: &str| GithubAppConfigError {
                app: name.clone(),
                reason: reason.to_owned(),
            };
            let pem = c
                .private_key
                .resolve()
                .map_err(|e| err(&format!("private_key: {e}")))?;
            let key = EncodingKey::from_rsa_pem(pem.expose().as_bytes())
                .map_err(|_| err("private_key: not an RSA private key in PEM"))?;
            let timeout = std::time::Duration::try_from(c.timeout)
                .unwrap_or(std::time::Duration::from_secs(10));
            let http = Outbound::new(timeout)
                .build()
                .map_err(|e| err(&e.to_string()))?;
            apps.insert(
                name.clone(),
                App {
                    app_id: c.app_id,
                    key,
                    api_url: c.api_url.trim_end_matches('/').to_owned(),
                    http,
                },
            );
        }
        Ok(Self {
            apps,
            held: Mutex::new(HashMap::new()),
        })
    }

    fn spec(def: &CredentialDef) -> Result<&GithubAppSpec, ProviderError> {
        match &def.spec {
            CredentialSpec::GithubApp(s) => Ok(s),
            _ => Err(ProviderError::Misconfigured(
                "not a github_app credential".into(),
            )),
        }
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<String, Held>> {
        // A panic while holding the lock leaves the map intact (inserts and removes only).
        self.held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether this process holds the token of `resource_id` (tests, descriptions).
    pub fn holds(&self, resource_id: &str) -> bool {
        self.held().contains_key(resource_id)
    }

    fn app_jwt(app: &App, now: OffsetDateTime) -> Result<Sensitive, ProviderError> {
        let claims = AppJwt {
            iat: now.unix_timestamp() - 60,
            exp: now.unix_timestamp() + 540,
            iss: app.app_id.to_string(),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::RS256), &claims, &app.key)
            .map(Sensitive::new)
            .map_err(|_| ProviderError::Internal("could not sign the App JWT".into()))
    }

    fn request(
        app: &App,
        method: reqwest::Method,
        path: &str,
        bearer: &Sensitive,
    ) -> reqwest::RequestBuilder {
        app.http
            .request(method, format!("{}{path}", app.api_url))
            .header("Accept", "application/vnd.github+json")
            .header("X-GitHub-Api-Version", API_VERSION)
            .bearer_auth(bearer.expose())
    }

    /// The installation of `owner`: through a repository when the token is limited to some,
    /// otherwise the organization's, then the user's.
    async fn installation(
        app: &App,
        jwt: &Sensitive,
        owner: &str,
        repo: Option<&str>,
    ) -> Result<u64, ProviderError> {
        let paths = match repo {
            Some(r) => vec![format!("/repos/{owner}/{r}/installation")],
            None => vec![
                format!("/orgs/{owner}/installation"),
                format!("/users/{owner}/installation"),
            ],
        };
        for path in &paths {
            let what = "GET installation";
            let resp = Self::request(app, reqwest::Method::GET, path, jwt)
                .send()
                .await
                .map_err(|e| transport_error(what, &e))?;
            match resp.status() {
                StatusCode::OK => {
                    let i: Installation = resp.json().await.map_err(|_| {
                        ProviderError::TargetUnavailable(format!("{what}: unreadable answer"))
                    })?;
                    return Ok(i.id);
                }
                StatusCode::NOT_FOUND => continue,
                s => return Err(answer_error(what, s)),
            }
        }
        Err(ProviderError::Misconfigured(format!(
            "the App is not installed for {owner:?}{}",
            repo.map(|r| format!(" (repository {r:?})"))
                .unwrap_or_default()
        )))
    }
}

#[async_trait]
impl Provider for GithubAppProvider {
    fn kind(&self) -> CredentialKind {
        CredentialKind::GithubApp
    }

    /// `<app>:<grant id>.<credential>`: decided before minting; GitHub gives tokens no id.
    fn resource_id(&self, grant_id: Uuid, credential: &CredentialDef) -> String {
        let app = Self::spec(credential).map_or("-", |s| s.app.as_str());
        format!("{app}:{}.{}", grant_id.simple(), credential.name)
    }

    fn intent_details(&self, credential: &CredentialDef) -> Value {
        json!({"app": Self::spec(credential).map_or("-", |s| s.app.as_str())})
    }

    fn check_parameters(
        &self,
        credential: &CredentialDef,
        params: &Value,
    ) -> Result<(), ProviderError> {
        parse_asked(Self::spec(credential)?, params).map(|_| ())
    }

    async fn mint(&self, req: MintRequest<'_>) -> Result<Minted, ProviderError> {
        self.mint_with(req, &Value::Null).await
    }

    async fn mint_with(
        &self,
        req: MintRequest<'_>,
        params: &Value,
    ) -> Result<Minted, ProviderError> {
        let spec = Self::spec(req.credential)?;
        let app = self.apps.get(&spec.app).ok_or_else(|| {
            ProviderError::Misconfigured(format!("github_app {:?} is not configured", spec.app))
        })?;
        let asked = parse_asked(spec, params)?;
        let render = |t: &Template| {
            let v = t
                .render(req.claims)
                .map_err(|e| ProviderError::InvalidClaim(e.to_string()))?;
            if valid_github_name(&v) {
                Ok(v)
            } else {
                Err(ProviderError::InvalidClaim(
                    "a GitHub account or repository name is [A-Za-z0-9._-]".into(),
                ))
            }
        };
        let owner = render(&spec.owner)?;
        let allowed: Vec<String> = spec
            .repositories
            .iter()
            .map(render)
            .collect::<Result<_, _>>()?;
        let repositories = match asked.repositories {
            None => allowed,
            Some(names) => {
                if !allowed.is_empty()
                    && let Some(n) = names.iter().find(|n| !allowed.contains(n))
                {
                    return Err(exceeds(format!("repository {n:?} is not in the policy")));
                }
                names
            }
        };
        let permissions = asked
            .permissions
            .unwrap_or_else(|| spec.permissions.clone());
        let jwt = Self::app_jwt(app, req.now)?;
        let installation =
            Self::installation(app, &jwt, &owner, repositories.first().map(String::as_str)).await?;
        let mut body = Map::new();
        if !repositories.is_empty() {
            body.insert("repositories".into(), json!(repositories));
        }
        body.insert(
            "permissions".into(),
            Value::Object(
                permissions
                    .iter()
                    .map(|(k, v)| (k.clone(), json!(v.as_str())))
                    .collect(),
            ),
        );
        let what = "POST access_tokens";
        let path = format!("/app/installations/{installation}/access_tokens");
        let resp = Self::request(app, reqwest::Method::POST, &path, &jwt)
            .json(&Value::Object(body))
            .send()
            .await
            .map_err(|e| transport_error(what, &e))?;
        if resp.status() != StatusCode::CREATED {
            return Err(answer_error(what, resp.status()));
        }
        let t: AccessToken = resp
            .json()
            .await
            .map_err(|_| ProviderError::TargetUnavailable(format!("{what}: unreadable answer")))?;
        let token = Sensitive::new(t.token);
        let github_expiry = OffsetDateTime::parse(
            &t.expires_at,
            &time::format_description::well_known::Rfc3339,
        )
        .map_err(|_| ProviderError::TargetUnavailable(format!("{what}: unreadable expiry")))?;
        let hash = sha256_hex(token.expose().as_bytes());
        self.held().insert(
            req.resource_id.to_owned(),
            Held {
                token: token.clone(),
                app: spec.app.clone(),
            },
        );
        let rfc3339 = |t: OffsetDateTime| {
            t.format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default()
        };
        Ok(Minted {
            fields: vec![
                ("token".into(), Field::Secret(token)),
                ("owner".into(), Field::Public(json!(owner))),
                ("repositories".into(), Field::Public(json!(repositories))),
                ("permissions".into(), Field::Public(t.permissions)),
                ("api_url".into(), Field::Public(json!(app.api_url))),
            ],
            // The reaper deletes it at the grant's end; GitHub's own expiry if that is sooner.
            expires_at: req.expires_at.min(github_expiry),
            details: json!({
                "app": spec.app,
                "installation_id": installation,
                "token_sha256": hash,
                "github_expires_at": rfc3339(github_expiry),
                "repositories": repositories,
                "permissions": permissions,
                "audit": format!("token sha256 {hash}"),
            }),
        })
    }

    /// `DELETE /installation/token`, authenticated with the token itself. Already invalid
    /// (401) is success; a token this process does not hold cannot be deleted (see the module
    /// documentation) and is left to GitHub's expiry.
    async fn revoke(&self, credential: &IssuedCredential) -> Result<(), ProviderError> {
        let Some(held) = self.held().remove(&credential.resource_id) else {
            return Ok(());
        };
        let Some(app) = self.apps.get(&held.app) else {
            return Ok(());
        };
        let what = "DELETE installation/token";
        let result = Self::request(
            app,
            reqwest::Method::DELETE,
            "/installation/token",
            &held.token,
        )
        .send()
        .await;
        let outcome = match result {
            Ok(r)
                if r.status() == StatusCode::NO_CONTENT
                    || r.status() == StatusCode::UNAUTHORIZED =>
            {
                return Ok(());
            }
            Ok(r) => answer_error(what, r.status()),
            Err(e) => transport_error(what, &e),
        };
        // Keep it for the retry.
        self.held().insert(credential.resource_id.clone(), held);
        Err(match outcome {
            ProviderError::Misconfigured(m) => ProviderError::TargetUnavailable(m),
            other => other,
        })
    }

    fn revoke_description(&self, credential: &IssuedCredential) -> Option<String> {
        let hash = credential
            .details
            .get("token_sha256")
            .and_then(Value::as_str);
        let hash = hash.unwrap_or("(never minted)");
        if self.holds(&credential.resource_id) {
            Some(format!("DELETE /installation/token of token sha256 {hash}"))
        } else {
            let until = credential
                .details
                .get("github_expires_at")
                .and_then(Value::as_str)
                .unwrap_or("-");
            Some(format!(
                "token sha256 {hash} is not held by this process (restart or another replica): \
                 not deleted, it ends at GitHub's expiry {until}"
            ))
        }
    }

    fn check_definitions(&self, defs: &[CredentialDef]) -> Result<(), DefinitionError> {
        for d in defs {
            if let CredentialSpec::GithubApp(s) = &d.spec
                && !self.apps.contains_key(&s.app)
            {
                return Err(DefinitionError::Refused {
                    credential: d.name.clone(),
                    reason: format!(
                        "github_app {:?} is not configured under targets.github_app",
                        s.app
                    ),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> GithubAppSpec {
        serde_saphyr::from_str(
            "app: main\nowner: acme\nrepositories: [api, web]\npermissions: {contents: write, issues: read}\n",
        )
        .unwrap()
    }

    #[test]
    fn asking_within_the_policy_only() {
        let s = spec();
        assert!(parse_asked(&s, &Value::Null).is_ok());
        let a = parse_asked(
            &s,
            &json!({"permissions": {"contents": "read"}, "repositories": ["api"]}),
        )
        .unwrap();
        assert_eq!(a.permissions.unwrap()["contents"], Level::Read);
        for (p, code) in [
            (
                json!({"permissions": {"issues": "write"}}),
                "parameters_exceed_policy",
            ),
            (
                json!({"permissions": {"actions": "read"}}),
                "parameters_exceed_policy",
            ),
            (
                json!({"permissions": {"contents": "owner"}}),
                "invalid_parameters",
            ),
            (json!({"permissions": {}}), "invalid_parameters"),
            (json!({"repositories": ["a/b"]}), "invalid_parameters"),
            (json!({"repositories": []}), "invalid_parameters"),
            (json!({"installation_id": 1}), "invalid_parameters"),
            (json!(["api"]), "invalid_parameters"),
        ] {
            assert_eq!(parse_asked(&s, &p).unwrap_err().reason_code(), code, "{p}");
        }
    }
}

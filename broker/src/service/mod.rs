//! The broker's core: the life of one exchange, revocation, the reaper and introspection.
//! Free of HTTP: `http/` translates requests into calls here and errors into responses.
//!
//! Invariants kept here:
//! - No credential without a revocation path: the grant intent (with every resource id) is
//!   committed before any provider mints anything.
//! - No grant without an audit record: activation and its audit event are one transaction; a
//!   failure after minting revokes what was minted (or leaves the grant `issuing` for the reaper).
//! - All or nothing: one credential denied or failed → nothing issued.
//! - An exchange that issued nothing does not consume the job token (its `jti` is released).
//! - Every decision, allow or deny, is audited; if the audit cannot be written the caller gets
//!   503 and no credential.

mod audit_query;
mod audit_stream;
mod checkpoints;
mod error;
mod exchange;
mod exchange_record;
mod leak;
mod oauth;
mod operators;
mod policies;
mod reaper;
mod refuse;
mod revoke;
mod ssh;
#[cfg(test)]
mod tests;
mod ttl;
mod webhook;

pub use audit_stream::StreamPage;
pub use checkpoints::CheckpointRunError;
pub use error::ServiceError;
pub use exchange::{ExchangeRequest, ExchangeResponse, IssuedOutput};
pub use oauth::{
    GRANT_TYPE_TOKEN_EXCHANGE, TOKEN_TYPE_ACCESS_TOKEN, TOKEN_TYPE_ID_TOKEN, TOKEN_TYPE_JWT,
    TokenExchangeRequest, TokenExchangeResponse,
};
use policies::check_bundle;
pub use policies::{PolicyError, PolicyStatus};

use crate::config::{GrantConfig, ReaperConfig};
use crate::metrics;
use crate::oidc::Verifier;
use crate::policy::{Bundle, LoadOptions};
use crate::providers::api_token::ApiTokenProvider;
use crate::providers::{CredentialKind, Provider, ProviderError};
use crate::store::{GrantStatus, Store};
use crate::time::SharedClock;
use arc_swap::ArcSwap;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// Prefix of revocation tokens (so secret scanners can find leaked ones).
pub const REVOCATION_PREFIX: &str = "brk_rvk_";

/// Per-request context from the HTTP layer (non-secret).
#[derive(Debug, Clone, Default)]
pub struct RequestCtx {
    /// The broker's own request id (authoritative).
    pub request_id: Option<String>,
    /// The caller's `X-Request-Id`, only if it had the accepted shape (`http::client_request_id`).
    pub client_request_id: Option<String>,
    pub client_addr: Option<String>,
    pub user_agent: Option<String>,
}

/// Everything an exchange needs; shared behind `Arc` by the HTTP handlers and the reaper.
pub struct Broker {
    pub verifier: Arc<Verifier>,
    pub store: Store,
    pub clock: SharedClock,
    pub api_tokens: Arc<ApiTokenProvider>,
    providers: BTreeMap<CredentialKind, Arc<dyn Provider>>,
    policies: ArcSwap<Bundle>,
    policy_dir: PathBuf,
    policy_opts: LoadOptions,
    policy_status: Mutex<PolicyStatus>,
    grants: GrantConfig,
    reaper: ReaperConfig,
    max_credentials: usize,
    rate_limit: Option<RepoRateLimiter>,
    /// Operators and the freeze (issue 6); see `admin/`.
    pub(crate) admin: crate::admin::AdminState,
    /// Job-end webhook endpoints (none by default); see `webhooks/`.
    pub(crate) webhooks: crate::webhooks::Webhooks,
    /// Limiter and aggregator of unauthenticated refusals; see `refusals/`.
    pub(crate) refusals: crate::refusals::Refusals,
    /// Leak report endpoints (none by default: `/v1/leaks/github` answers 404); see `leaks/`.
    pub(crate) leaks: crate::leaks::Leaks,
    /// The SSH user CAs (`targets.ssh_ca`), for their public keys and KRLs; see `ssh.rs`.
    pub(crate) ssh_cas: Option<Arc<crate::providers::ssh_cert::SshCertProvider>>,
}

/// Per-repository exchange rate limit (in this replica's memory; monotonic time).
type RepoRateLimiter = governor::DefaultKeyedRateLimiter<String>;

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("store", &self.store.backend())
            .finish_non_exhaustive()
    }
}

impl RequestCtx {
    /// A new audit event of `action` with this request's context; the header text is the
    /// caller's, authenticated or not, so it is capped and flagged (`refusals::fields`).
    pub(crate) fn event(
        &self,
        now: time::OffsetDateTime,
        action: crate::audit::Action,
        reason: &str,
    ) -> crate::audit::AuditEvent {
        let mut ev =
            crate::audit::AuditEvent::new(now, action, crate::audit::Outcome::Deny, reason);
        ev.request_id = self.request_id.clone();
        ev.client_request_id = self.client_request_id.clone();
        ev.client_addr = self.client_addr.clone();
        ev.user_agent = self.user_agent.clone();
        crate::refusals::fields::cap_event(&mut ev);
        ev
    }
}

/// The store's cross-replica lock, as providers see it ([`crate::providers::ReplicaLock`]):
/// on Postgres a transaction-scoped advisory lock, on SQLite (one node) none beyond the
/// provider's own.
#[derive(Debug, Clone)]
pub struct StoreLock(pub Store);

#[async_trait::async_trait]
impl crate::providers::ReplicaLock for StoreLock {
    async fn run_locked(
        &self,
        key: &str,
        work: futures::future::BoxFuture<'_, ()>,
    ) -> Result<(), crate::providers::LockError> {
        self.0
            .locked(key, work)
            .await
            .map_err(|e| crate::providers::LockError(e.to_string()))
    }
}

/// Parts to build a [`Broker`] from.
pub struct BrokerParts {
    pub verifier: Arc<Verifier>,
    pub store: Store,
    pub clock: SharedClock,
    pub api_tokens: Arc<ApiTokenProvider>,
    /// Providers besides the API-token one.
    pub extra_providers: Vec<Arc<dyn Provider>>,
    pub policy_dir: PathBuf,
    pub policy_opts: LoadOptions,
    pub grants: GrantConfig,
    pub reaper: ReaperConfig,
    pub max_credentials: usize,
    /// Exchanges per minute per repository; 0 = unlimited.
    pub rate_per_minute: u32,
}

impl Broker {
    /// Load policies and assemble. A bundle that fails to load is a startup error.
    pub fn new(parts: BrokerParts) -> Result<Self, PolicyError> {
        let bundle = Bundle::load_dir(&parts.policy_dir, &parts.policy_opts).map_err(|errors| {
            PolicyError::StartLoad {
                dir: parts.policy_dir.display().to_string(),
                errors,
            }
        })?;
        let mut providers: BTreeMap<CredentialKind, Arc<dyn Provider>> = BTreeMap::new();
        providers.insert(CredentialKind::ApiToken, parts.api_tokens.clone());
        for p in parts.extra_providers {
            providers.insert(p.kind(), p);
        }
        check_bundle(&bundle, &providers)?;
        metrics::policy_loaded(bundle.digest());
        let status = PolicyStatus {
            digest: bundle.digest().to_owned(),
            loaded_at: parts.clock.now(),
            last_error: None,
        };
        Ok(Self {
            verifier: parts.verifier,
            store: parts.store,
            clock: parts.clock,
            api_tokens: parts.api_tokens,
            providers,
            policies: ArcSwap::from_pointee(bundle),
            policy_dir: parts.policy_dir,
            policy_opts: parts.policy_opts,
            policy_status: Mutex::new(status),
            grants: parts.grants,
            reaper: parts.reaper,
            max_credentials: parts.max_credentials,
            rate_limit: std::num::NonZeroU32::new(parts.rate_per_minute)
                .map(|n| governor::RateLimiter::keyed(governor::Quota::per_minute(n))),
            admin: crate::admin::AdminState::default(),
            webhooks: crate::webhooks::Webhooks::default(),
            refusals: crate::refusals::Refusals::default(),
            leaks: crate::leaks::Leaks::default(),
            ssh_cas: None,
        })
    }

    /// Who may call the operator endpoints (none by default: they refuse everyone).
    pub fn set_operators(&mut self, operators: crate::admin::Operators) {
        self.admin = crate::admin::AdminState::new(operators);
    }

    /// The job-end webhook endpoints to serve (none by default: they answer 404).
    pub fn set_webhooks(&mut self, webhooks: crate::webhooks::Webhooks) {
        self.webhooks = webhooks;
    }

    /// The leak report endpoints to serve.
    pub fn set_leaks(&mut self, leaks: crate::leaks::Leaks) {
        self.leaks = leaks;
    }

    /// The configured webhook endpoints.
    pub fn webhooks(&self) -> &crate::webhooks::Webhooks {
        &self.webhooks
    }

    fn provider(&self, kind: CredentialKind) -> Result<&Arc<dyn Provider>, ProviderError> {
        self.providers
            .get(&kind)
            .ok_or_else(|| ProviderError::Misconfigured(format!("no {} provider", kind.as_str())))
    }

    /// The configured issuer names (what an operator filter may name).
    pub(crate) fn issuer_names(&self) -> Vec<String> {
        self.verifier.issuer_names()
    }

    /// RFC 7662 introspection of an API token minted here: a signed JWT (signature, then the
    /// grant's status by its `jti`) or an opaque `brk_at_` token (its shape and checksum
    /// offline, then the grant by the token's hash). Anything else is `active: false`, as the
    /// RFC wants for every token that is not valid, whatever the reason.
    pub async fn introspect(&self, token: &str) -> Result<serde_json::Value, ServiceError> {
        let inactive = serde_json::json!({ "active": false });
        let now = self.clock.now();
        let opaque_prefix = crate::secret_format::SecretKind::ApiToken.prefix();
        let c = if token.starts_with(opaque_prefix) {
            // A mistyped or truncated token is answered without a store lookup.
            if crate::secret_format::check(token, crate::secret_format::SecretKind::ApiToken)
                .is_err()
            {
                metrics::malformed_secret("introspect");
                return Ok(inactive);
            }
            let hash = crate::secret::sha256_hex(token.as_bytes());
            let Some(m) = self.store.credential_by_secret_hash(&hash).await? else {
                return Ok(inactive);
            };
            let claims = match m.credential.kind {
                CredentialKind::ApiToken => {
                    crate::providers::api_token::opaque_claims(&m.credential.details)
                }
                _ => None,
            };
            let Some(c) = claims else {
                return Ok(inactive);
            };
            if m.grant_status != GrantStatus::Active
                || m.expires_at <= now
                || c.exp <= now.unix_timestamp()
            {
                return Ok(inactive);
            }
            c
        } else {
            let Ok(c) = self.api_tokens.check(token, now) else {
                return Ok(inactive);
            };
            let Some(status) = self
                .store
                .credential_status(CredentialKind::ApiToken, &c.jti)
                .await?
            else {
                return Ok(inactive);
            };
            if status.grant_status != GrantStatus::Active || status.expires_at <= now {
                return Ok(inactive);
            }
            c
        };
        Ok(serde_json::json!({
            "active": true,
            "token_type": "Bearer",
            "scope": c.scope,
            "sub": c.sub,
            "aud": c.aud,
            "iss": c.iss,
            "exp": c.exp,
            "iat": c.iat,
            "nbf": c.nbf,
            "jti": c.jti,
            "grant_id": c.gid,
            "job": c.job,
        }))
    }

    /// Readiness: store reachable, policies loaded, issuer keys available.
    pub async fn readiness(&self) -> (bool, serde_json::Value) {
        let store = self.store.ping().await;
        let stats = self.store.stats().await.ok();
        let issuers = self.verifier.health();
        let policy = self.policy_status();
        let issuers_ok = issuers.iter().any(|h| h.keys_loaded > 0);
        let ok = store.is_ok() && issuers_ok;
        let mut providers = serde_json::Map::new();
        for (k, p) in &self.providers {
            providers.insert(
                k.as_str().to_owned(),
                serde_json::to_value(p.health().await).unwrap_or_default(),
            );
        }
        (
            ok,
            serde_json::json!({
                "ready": ok,
                "store": { "ok": store.is_ok(), "backend": self.store.backend(), "error": store.err().map(|e| e.to_string()) },
                "grants": stats,
                "policies": policy,
                "issuers": issuers,
                "providers": providers,
            }),
        )
    }
}

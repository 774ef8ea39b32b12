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

use crate::audit::{Action, AuditEvent, JobAttribution, Outcome};
use crate::config::{GrantConfig, ReaperConfig};
use crate::metrics::{self, Stage};
use crate::oidc::{Platform, Verifier, VerifyError};
use crate::policy::{Bundle, Decision, LoadOptions, PolicyInput};
use crate::providers::api_token::ApiTokenProvider;
use crate::providers::{
    CredentialKind, Field, IssuedCredential, MintRequest, Minted, Provider, ProviderError,
};
use crate::secret::{Sensitive, random_token, sha256_hex};
use crate::store::{
    ClaimedGrant, GrantStatus, JtiRecord, NewGrant, RevokeCause, Store, StoreError,
};
use crate::time::SharedClock;
use arc_swap::ArcSwap;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use time::{Duration, OffsetDateTime};
use uuid::Uuid;

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

/// `POST /v1/exchange` input.
#[derive(Debug)]
pub struct ExchangeRequest {
    pub token: Sensitive,
    pub credentials: Vec<String>,
    /// As written by the caller (`15m`).
    pub ttl: Option<String>,
}

/// One minted credential in a response.
#[derive(Debug)]
pub struct IssuedOutput {
    pub name: String,
    pub kind: CredentialKind,
    pub fields: Vec<(String, Field)>,
}

/// `POST /v1/exchange` output.
#[derive(Debug)]
pub struct ExchangeResponse {
    pub grant_id: Uuid,
    pub expires_at: OffsetDateTime,
    pub revocation_token: Sensitive,
    pub credentials: Vec<IssuedOutput>,
}

/// Why an exchange, revoke or introspection did not succeed. Each maps to one HTTP status and
/// stable code in `http::error`.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("bad request: {message}")]
    BadRequest { code: &'static str, message: String },
    /// Request text the store cannot hold (see `store::text`); the detail shows it escaped.
    #[error("invalid text: {}", .0.detail())]
    InvalidText(#[from] crate::store::text::TextError),
    #[error("token rejected: {0}")]
    Token(#[from] VerifyError),
    #[error("token already used")]
    Replayed,
    /// The job token expires (GitLab: the job ends) before any useful TTL.
    #[error("token expires too soon to grant anything")]
    TokenExhausted,
    #[error("credential {credential:?} denied ({reason})")]
    Denied {
        credential: String,
        reason: &'static str,
    },
    #[error("credential {credential:?} could not be issued: {error}")]
    Provider {
        credential: String,
        error: ProviderError,
    },
    #[error("invalid revocation token")]
    BadRevocationToken,
    /// Too many exchanges for this repository; retry after the given seconds.
    #[error("rate limited")]
    RateLimited { retry_after_secs: u64 },
    /// No usable `Authorization: Bearer` header.
    #[error("missing bearer token")]
    MissingToken,
    #[error("revocation failed and will be retried")]
    RevokePending,
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// An operator froze exchanges matching this one (`POST /v1/admin/freeze`).
    #[error("exchanges are frozen by an operator")]
    Frozen,
    /// This client sent too many requests that failed verification; retry after the given
    /// seconds (`refusals.rs`).
    #[error("too many failed verifications from this client")]
    TooManyFailures { retry_after_secs: u64 },
}

impl ServiceError {
    /// Stable reason code (also the audit `reason`).
    pub fn reason_code(&self) -> &'static str {
        match self {
            ServiceError::BadRequest { code, .. } => code,
            ServiceError::InvalidText(t) => t.reason_code(),
            ServiceError::Token(e) => e.reason_code(),
            ServiceError::Replayed => "token_replayed",
            ServiceError::TokenExhausted => "token_expired",
            ServiceError::Denied { reason, .. } => reason,
            ServiceError::Provider { error, .. } => error.reason_code(),
            ServiceError::BadRevocationToken => "invalid_revocation_token",
            ServiceError::MissingToken => "missing_token",
            ServiceError::RateLimited { .. } => "rate_limited",
            ServiceError::RevokePending => "revoke_pending",
            ServiceError::Store(StoreError::Replayed) => "token_replayed",
            ServiceError::Store(e @ StoreError::Rejected(_)) => e.reason_code(),
            ServiceError::Store(_) => "store_unavailable",
            ServiceError::Frozen => "frozen",
            ServiceError::TooManyFailures { .. } => crate::refusals::TOO_MANY_FAILURES,
        }
    }

    pub(crate) fn outcome(&self) -> Outcome {
        match self {
            ServiceError::Provider { .. }
            | ServiceError::Store(_)
            | ServiceError::RevokePending => Outcome::Error,
            _ => Outcome::Deny,
        }
    }
}

/// The loaded policy bundle and what happened at the last (re)load.
#[derive(Debug, Clone, Serialize)]
pub struct PolicyStatus {
    pub digest: String,
    #[serde(with = "time::serde::rfc3339")]
    pub loaded_at: OffsetDateTime,
    /// The last reload's error, if it was rejected (the previous bundle stays in force).
    pub last_error: Option<String>,
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

const MAX_NAME: usize = 64;

/// Fail closed on a bundle this broker cannot serve: every credential's kind needs a provider
/// here, and each provider checks its definitions (e.g. that a named target is configured).
/// Used at start and on every reload, so a reload cannot bring in what a start would refuse.
fn check_bundle(
    bundle: &Bundle,
    providers: &BTreeMap<CredentialKind, Arc<dyn Provider>>,
) -> Result<(), String> {
    if let Some(def) = bundle
        .credentials()
        .iter()
        .find(|d| !providers.contains_key(&d.spec.kind()))
    {
        return Err(format!(
            "credential {:?} needs a {} provider, which this broker does not configure",
            def.name,
            def.spec.kind().as_str()
        ));
    }
    for p in providers.values() {
        p.check_definitions(bundle.credentials())?;
    }
    Ok(())
}

fn valid_credential_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= MAX_NAME
        && n.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

impl Broker {
    /// Load policies and assemble. A bundle that fails to load is a startup error.
    pub fn new(parts: BrokerParts) -> Result<Self, String> {
        let bundle = Bundle::load_dir(&parts.policy_dir, &parts.policy_opts).map_err(|e| {
            format!(
                "policies in {} failed to load:\n{e}",
                parts.policy_dir.display()
            )
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
        })
    }

    /// The limits on unauthenticated refusals (`refusals:`; the defaults otherwise).
    pub fn set_refusal_limits(&mut self, cfg: &crate::refusals::RefusalConfig) {
        self.refusals = crate::refusals::Refusals::new(cfg);
    }

    /// Cap a refusal's request-controlled fields and, if its caller proved nothing, pass it
    /// through the failure limiter and aggregator (`refusals/`). `Some(Record)`: write its
    /// row now; anything else: counted, no row now. `None`: an authenticated refusal, always
    /// written.
    pub(crate) fn screen_refusal(
        &self,
        ev: &mut AuditEvent,
    ) -> Option<crate::refusals::Disposition> {
        crate::refusals::fields::cap_event(ev);
        crate::refusals::unauthenticated(ev.action, &ev.reason)
            .then(|| self.refusals.admit(ev, self.clock.now()))
    }

    /// Write the aggregate events of ended windows (every pending one when `drain_all`, at
    /// shutdown). A failed write is kept for the next round; its refusals were counted in the
    /// metrics already.
    pub async fn flush_refusal_aggregates(&self, drain_all: bool) -> usize {
        let events = self.refusals.due(self.clock.now(), drain_all);
        let mut written = 0;
        let mut failed = Vec::new();
        for ev in events {
            match self.store.append_audit(&ev).await {
                Ok(()) => written += 1,
                Err(e) => {
                    tracing::error!(error = %e, reason = ev.reason, "aggregate audit write failed; kept for the next round");
                    failed.push(ev);
                }
            }
        }
        if !failed.is_empty() {
            self.refusals.requeue(failed);
        }
        written
    }

    /// Who may call the operator endpoints (none by default: they refuse everyone).
    pub fn set_operators(&mut self, operators: crate::admin::Operators) {
        self.admin = crate::admin::AdminState::new(operators);
    }

    /// The job-end webhook endpoints to serve (none by default: they answer 404).
    pub fn set_webhooks(&mut self, webhooks: crate::webhooks::Webhooks) {
        self.webhooks = webhooks;
    }

    /// The configured webhook endpoints.
    pub fn webhooks(&self) -> &crate::webhooks::Webhooks {
        &self.webhooks
    }

    /// The lease a revocation claim holds (reaper config).
    pub(crate) fn revoke_lease(&self) -> Duration {
        self.reaper.lease
    }

    pub fn policies(&self) -> Arc<Bundle> {
        self.policies.load_full()
    }

    pub fn policy_status(&self) -> PolicyStatus {
        self.policy_status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Reload policies from disk. A bundle that fails to load is rejected whole; the old one
    /// stays in force and the error is kept for `/readyz`.
    pub fn reload_policies(&self) -> Result<String, String> {
        let result = Bundle::load_dir(&self.policy_dir, &self.policy_opts)
            .map_err(|e| e.to_string())
            .and_then(|b| check_bundle(&b, &self.providers).map(|()| b));
        let mut st = self.policy_status.lock().unwrap_or_else(|e| e.into_inner());
        match result {
            Ok(bundle) => {
                let digest = bundle.digest().to_owned();
                self.policies.store(Arc::new(bundle));
                *st = PolicyStatus {
                    digest: digest.clone(),
                    loaded_at: self.clock.now(),
                    last_error: None,
                };
                tracing::info!(digest = %digest, "policies reloaded");
                metrics::policy_reload(true);
                metrics::policy_loaded(&digest);
                Ok(digest)
            }
            Err(e) => {
                tracing::error!(error = %e, kept_digest = %st.digest, "policy reload rejected; previous bundle stays in force");
                st.last_error = Some(e.clone());
                metrics::policy_reload(false);
                Err(e)
            }
        }
    }

    fn provider(&self, kind: CredentialKind) -> Result<&Arc<dyn Provider>, ProviderError> {
        self.providers
            .get(&kind)
            .ok_or_else(|| ProviderError::Misconfigured(format!("no {} provider", kind.as_str())))
    }

    fn base_event(&self, now: OffsetDateTime, action: Action, ctx: &RequestCtx) -> AuditEvent {
        let mut ev = AuditEvent::new(now, action, Outcome::Deny, "");
        ev.request_id = ctx.request_id.clone();
        ev.client_request_id = ctx.client_request_id.clone();
        ev.client_addr = ctx.client_addr.clone();
        ev.user_agent = ctx.user_agent.clone();
        // Header text is the caller's, authenticated or not: capped and flagged.
        crate::refusals::fields::cap_event(&mut ev);
        // Every event records the bundle in force (revocations overwrite it with the grant's).
        ev.bundle_digest = Some(self.policies.load().digest().to_owned());
        ev
    }

    /// Audit a refusal, then return it. If the audit cannot be written, the caller gets 503.
    async fn refuse(&self, mut ev: AuditEvent, err: ServiceError) -> ServiceError {
        ev.outcome = err.outcome();
        ev.reason = err.reason_code().to_owned();
        if ev.detail.is_none() {
            ev.detail = Some(err.to_string());
        }
        match self.screen_refusal(&mut ev) {
            None | Some(crate::refusals::Disposition::Record) => {}
            Some(crate::refusals::Disposition::Collapse) => return err,
            Some(crate::refusals::Disposition::Limited { retry_after_secs }) => {
                return ServiceError::TooManyFailures { retry_after_secs };
            }
        }
        match metrics::timed(Stage::Audit, self.store.append_audit(&ev)).await {
            Ok(()) => err,
            Err(e) => {
                tracing::error!(error = %e, reason = ev.reason, "audit write failed; refusing with 503");
                ServiceError::Store(e)
            }
        }
    }

    /// Audit a request the HTTP layer refused before it reached the service (no bearer token,
    /// unreadable body), then return the error to answer with.
    pub async fn reject(
        &self,
        action: Action,
        ctx: &RequestCtx,
        err: ServiceError,
    ) -> ServiceError {
        let ev = self.base_event(self.clock.now(), action, ctx);
        self.refuse(ev, err).await
    }

    /// The life of one exchange. See ARCHITECTURE.md for the sequence.
    pub async fn exchange(
        &self,
        req: ExchangeRequest,
        ctx: &RequestCtx,
    ) -> Result<ExchangeResponse, ServiceError> {
        let now = self.clock.now();
        let bundle = self.policies.load_full();
        let mut ev = self.base_event(now, Action::Exchange, ctx);
        ev.bundle_digest = Some(bundle.digest().to_owned());
        // As the caller wrote them, escaped; `refuse` and the event's writers cap each one
        // (`refusals::fields`), so a refused name is kept escaped and cut short.
        ev.credentials_requested = req
            .credentials
            .iter()
            .take(self.max_credentials)
            .map(|n| crate::store::text::escape(n).into_owned())
            .collect();

        // 1. The request itself.
        let requested_ttl = match self.check_request(&req) {
            Ok(t) => t,
            Err(e) => return Err(self.refuse(ev, e).await),
        };

        // 2. The job token: configured issuer, pinned algorithm, signature, audience, times.
        let claims =
            match metrics::timed(Stage::Verify, self.verifier.verify(req.token.expose())).await {
                Ok(c) => c,
                Err(e) => return Err(self.refuse(ev, ServiceError::Token(e)).await),
            };
        ev.job = JobAttribution::from_claims(&claims);
        if let Err(e) = self.check_rate(&claims.issuer, &ev.job) {
            return Err(self.refuse(ev, e).await);
        }
        if let Err(e) = self
            .check_freeze(
                &claims.issuer,
                ev.job.repository.as_deref(),
                ev.job.repository_id.as_deref(),
                &req.credentials,
            )
            .await
        {
            return Err(self.refuse(ev, e).await);
        }

        // 3. Policy: every requested credential must be allowed; deny wins; default deny.
        let input = PolicyInput {
            issuer: &claims.issuer,
            platform: claims.platform,
            claims: &claims.claims,
        };
        let eval = metrics::timed_sync(Stage::Policy, || bundle.evaluate(&input, &req.credentials));
        ev.rules_matched = eval.rules_matched.clone();
        let mut caps = Vec::with_capacity(eval.decisions.len());
        for d in &eval.decisions {
            match &d.outcome {
                Decision::Allow { .. } => caps.extend(d.max_ttl),
                other => {
                    ev.detail = Some(format!(
                        "credential {:?}: {}",
                        d.credential,
                        other.reason_code()
                    ));
                    let err = ServiceError::Denied {
                        credential: d.credential.clone(),
                        reason: other.reason_code(),
                    };
                    let mut ev = ev;
                    ev.reason = other.reason_code().to_owned();
                    return Err(self.refuse(ev, err).await);
                }
            }
        }
        // GitLab binds `exp` to the job's timeout: never outlive the job.
        let job_left = (claims.platform == Platform::Gitlab).then(|| claims.exp - now);
        let ttl = effective_ttl(
            requested_ttl,
            self.grants.default_ttl,
            self.grants.max_ttl,
            &caps,
            job_left,
        );
        if ttl < Duration::SECOND {
            return Err(self.refuse(ev, ServiceError::TokenExhausted).await);
        }
        let expires_at = now + ttl;
        ev.ttl_seconds = Some(ttl.whole_seconds());

        // 4. Intent: grant + resource ids + jti, committed before anything is minted.
        let grant_id = Uuid::now_v7();
        let revocation_token = Sensitive::new(format!("{REVOCATION_PREFIX}{}", random_token(32)));
        let mut defs = Vec::with_capacity(req.credentials.len());
        let mut issued = Vec::with_capacity(req.credentials.len());
        for name in &req.credentials {
            let Some(def) = bundle.credential(name) else {
                let err = ServiceError::Denied {
                    credential: name.clone(),
                    reason: "unknown_credential",
                };
                return Err(self.refuse(ev, err).await);
            };
            let provider = match self.provider(def.spec.kind()) {
                Ok(p) => p,
                Err(error) => {
                    return Err(self
                        .refuse(
                            ev,
                            ServiceError::Provider {
                                credential: name.clone(),
                                error,
                            },
                        )
                        .await);
                }
            };
            issued.push(IssuedCredential {
                name: name.clone(),
                kind: def.spec.kind(),
                resource_id: provider.resource_id(grant_id, def),
                details: provider.intent_details(def),
            });
            defs.push(def);
        }
        ev.grant_id = Some(grant_id);
        ev.resource_ids = issued.iter().map(|c| c.resource_id.clone()).collect();
        ev.expires_at = Some(expires_at);
        let jti = match (&claims.jti, claims.single_use) {
            (Some(j), true) => Some(JtiRecord {
                iss: claims.iss.clone(),
                jti: j.clone(),
                expires_at: claims.replay_until,
            }),
            _ => None,
        };
        let new_grant = NewGrant {
            id: grant_id,
            revocation_hash: sha256_hex(revocation_token.expose().as_bytes()),
            issuer: claims.issuer.clone(),
            subject: claims.sub.clone(),
            repository: ev.job.repository.clone(),
            repository_id: ev.job.repository_id.clone(),
            job: ev.job.job_key(),
            bundle_digest: bundle.digest().to_owned(),
            created_at: now,
            expires_at,
            credentials: issued.clone(),
        };
        // Credentials that exist only in this process until the response (signed tokens) need
        // no intent: mint, then one transaction (jti + active grant + audit). A failure before
        // that commit leaves nothing anywhere: the tokens never left the process.
        let in_memory = defs.iter().all(|d| {
            self.provider(d.spec.kind())
                .is_ok_and(|p| p.mints_in_memory())
        });
        if in_memory {
            let results = metrics::timed(
                Stage::Mint,
                self.mint_all(&defs, &issued, grant_id, &claims, now, expires_at),
            )
            .await;
            crate::fault::point("after_mint");
            let minted = match collect_minted(results, &issued) {
                Ok(m) => m,
                Err(err) => {
                    ev.detail = Some(format!("{}: {}", err.0, err.1.reason_code()));
                    let err = ServiceError::Provider {
                        credential: err.0,
                        error: err.1,
                    };
                    return Err(self.refuse(ev, err).await);
                }
            };
            let real_expiry = latest_expiry(&minted, expires_at);
            let mut grant = new_grant;
            grant.expires_at = real_expiry;
            for (c, m) in grant.credentials.iter_mut().zip(&minted) {
                c.details = m.details.clone();
            }
            let mut allow = ev.clone();
            allow.outcome = Outcome::Allow;
            allow.reason = "ok".into();
            allow.credentials_granted = req.credentials.clone();
            allow.expires_at = Some(real_expiry);
            let issue = self.store.issue_grant(&grant, jti.as_ref(), &allow);
            return match metrics::timed(Stage::Activate, issue).await {
                Ok(()) => Ok(respond(
                    grant_id,
                    real_expiry,
                    revocation_token,
                    minted,
                    issued,
                )),
                Err(StoreError::Replayed) => Err(self.refuse(ev, ServiceError::Replayed).await),
                // The store refused this item's data (it failed alone, see `group_commit.rs`):
                // record the refusal as far as the store still takes it.
                Err(e @ StoreError::Rejected(_)) => {
                    Err(self.refuse(ev, ServiceError::Store(e)).await)
                }
                Err(e) => {
                    tracing::error!(error = %e, "store unavailable at grant issue");
                    Err(ServiceError::Store(e))
                }
            };
        }

        match metrics::timed(
            Stage::Intent,
            self.store.begin_grant(&new_grant, jti.as_ref()),
        )
        .await
        {
            Ok(()) => {}
            Err(StoreError::Replayed) => return Err(self.refuse(ev, ServiceError::Replayed).await),
            Err(e @ StoreError::Rejected(_)) => {
                return Err(self.refuse(ev, ServiceError::Store(e)).await);
            }
            Err(e) => {
                tracing::error!(error = %e, "store unavailable at grant intent");
                return Err(ServiceError::Store(e));
            }
        }
        crate::fault::point("after_intent");

        // 5. Mint every credential concurrently; all or nothing.
        let results = metrics::timed(
            Stage::Mint,
            self.mint_all(&defs, &issued, grant_id, &claims, now, expires_at),
        )
        .await;
        crate::fault::point("after_mint");
        if let Some(pos) = results.iter().position(Result::is_err) {
            return Err(self
                .abort_grant(ev, jti.as_ref(), &issued, results, pos)
                .await);
        }
        let minted: Vec<Minted> = results.into_iter().filter_map(Result::ok).collect();

        // 6. Finalise: grant active + the allow audit event, one transaction.
        let real_expiry = latest_expiry(&minted, expires_at);
        let details: Vec<serde_json::Value> = minted.iter().map(|m| m.details.clone()).collect();
        ev.outcome = Outcome::Allow;
        ev.reason = "ok".into();
        ev.credentials_granted = req.credentials.clone();
        ev.expires_at = Some(real_expiry);
        if let Err(e) = metrics::timed(
            Stage::Activate,
            self.store
                .activate_grant(grant_id, real_expiry, &details, &ev),
        )
        .await
        {
            tracing::error!(error = %e, grant_id = %grant_id, "could not finalise grant; revoking what was minted");
            // Best effort now; if this fails too the grant stays `issuing` and the reaper
            // revokes it once it is stale.
            if self.revoke_credentials(&issued).await.is_ok() {
                ev.outcome = Outcome::Error;
                ev.reason = "store_unavailable".into();
                ev.credentials_granted.clear();
                let _ = self.store.fail_grant(grant_id, jti.as_ref(), &ev).await;
            }
            return Err(ServiceError::Store(e));
        }
        crate::fault::point("after_activate");
        Ok(respond(
            grant_id,
            real_expiry,
            revocation_token,
            minted,
            issued,
        ))
    }

    /// Mint every credential concurrently (results in request order).
    async fn mint_all(
        &self,
        defs: &[&crate::providers::CredentialDef],
        issued: &[IssuedCredential],
        grant_id: Uuid,
        claims: &crate::oidc::VerifiedClaims,
        now: OffsetDateTime,
        expires_at: OffsetDateTime,
    ) -> Vec<Result<Minted, ProviderError>> {
        let mints = defs.iter().zip(issued).map(|(def, ic)| async move {
            let provider = self.provider(def.spec.kind())?;
            provider
                .mint(MintRequest {
                    grant_id,
                    credential: def,
                    resource_id: &ic.resource_id,
                    claims,
                    now,
                    expires_at,
                })
                .await
        });
        futures::future::join_all(mints).await
    }

    /// One bucket per (issuer, repository id): a runaway pipeline cannot starve the others.
    fn check_rate(&self, issuer: &str, job: &JobAttribution) -> Result<(), ServiceError> {
        let Some(limiter) = &self.rate_limit else {
            return Ok(());
        };
        let key = format!("{issuer}/{}", job.repository_id.as_deref().unwrap_or("-"));
        limiter.check_key(&key).map_err(|not_until| {
            use governor::clock::{Clock as _, DefaultClock};
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            ServiceError::RateLimited {
                retry_after_secs: wait.as_secs().max(1),
            }
        })
    }

    fn check_request(&self, req: &ExchangeRequest) -> Result<Option<Duration>, ServiceError> {
        let bad = |message: String| ServiceError::BadRequest {
            code: "bad_request",
            message,
        };
        if req.credentials.is_empty() {
            return Err(bad("credentials: name at least one credential".into()));
        }
        if req.credentials.len() > self.max_credentials {
            return Err(bad(format!(
                "credentials: at most {} per exchange",
                self.max_credentials
            )));
        }
        let mut seen = std::collections::BTreeSet::new();
        for n in &req.credentials {
            crate::store::text::check("credentials: a name", n)?;
            if !valid_credential_name(n) {
                return Err(bad(
                    "credentials: names are [a-z0-9_-], at most 64 characters".into(),
                ));
            }
            if !seen.insert(n) {
                return Err(bad(format!("credentials: {n:?} named twice")));
            }
        }
        match &req.ttl {
            None => Ok(None),
            Some(t) => match crate::time::parse_duration(t) {
                Ok(d) if d >= Duration::SECOND => Ok(Some(d)),
                Ok(_) => Err(bad("ttl: must be at least 1s".into())),
                Err(_) => Err(bad("ttl: expected a duration such as 15m".into())),
            },
        }
    }

    /// A mint failed: revoke what was minted, release the token, audit, and report the failure.
    async fn abort_grant(
        &self,
        mut ev: AuditEvent,
        jti: Option<&JtiRecord>,
        issued: &[IssuedCredential],
        results: Vec<Result<Minted, ProviderError>>,
        failed_pos: usize,
    ) -> ServiceError {
        let grant_id = ev.grant_id.unwrap_or_default();
        let error = results
            .into_iter()
            .nth(failed_pos)
            .and_then(Result::err)
            .unwrap_or_else(|| ProviderError::Internal("mint failed".into()));
        let credential = issued
            .get(failed_pos)
            .map(|c| c.name.clone())
            .unwrap_or_default();
        tracing::warn!(grant_id = %grant_id, credential = %credential, reason = error.reason_code(), error = %error, "mint failed; undoing the grant");
        let err = ServiceError::Provider {
            credential: credential.clone(),
            error,
        };
        ev.outcome = Outcome::Error;
        ev.reason = err.reason_code().to_owned();
        ev.detail = Some(format!("credential {credential:?}: {}", err.reason_code()));
        // Revoke every credential of the grant (revoke is idempotent: ones never minted are
        // "already gone").
        match self.revoke_credentials(issued).await {
            Ok(()) => {
                if let Err(e) = self.store.fail_grant(grant_id, jti, &ev).await {
                    tracing::error!(error = %e, grant_id = %grant_id, "could not record failed grant; reaper will recover it");
                    return ServiceError::Store(e);
                }
            }
            Err(e) => {
                // Leave the grant `issuing`: the reaper recovers it once stale.
                tracing::error!(grant_id = %grant_id, error = %e, "undo after failed mint failed; reaper will retry");
                let _ = self.store.append_audit(&ev).await;
            }
        }
        err
    }

    /// Revoke credentials concurrently; the first error is returned after all were tried.
    async fn revoke_credentials(&self, creds: &[IssuedCredential]) -> Result<(), ProviderError> {
        let futs = creds
            .iter()
            .map(|c| async move { self.provider(c.kind)?.revoke(c).await });
        let results = futures::future::join_all(futs).await;
        results.into_iter().find(Result::is_err).unwrap_or(Ok(()))
    }

    /// An event about grant `g` (a revocation of it), with the grant's identity copied in.
    fn grant_event(
        &self,
        g: &crate::store::Grant,
        now: OffsetDateTime,
        action: Action,
        actor: &str,
        ctx: &RequestCtx,
    ) -> AuditEvent {
        let mut ev = self.base_event(now, action, ctx);
        ev.grant_id = Some(g.id);
        ev.actor = Some(actor.to_owned());
        ev.resource_ids = g
            .credentials
            .iter()
            .map(|c| c.resource_id.clone())
            .collect();
        ev.credentials_requested = g.credentials.iter().map(|c| c.name.clone()).collect();
        ev.bundle_digest = Some(g.bundle_digest.clone());
        ev.job.issuer = Some(g.issuer.clone());
        ev.job.sub = Some(g.subject.clone());
        ev.job.repository = g.repository.clone();
        ev.job.repository_id = g.repository_id.clone();
        ev.expires_at = Some(g.expires_at);
        ev
    }

    /// True when revoking `g` is only a change of its status in the store (every credential's
    /// provider says `revoked_in_store`, e.g. API tokens): revoke-all revokes such grants a
    /// page at a time. A kind without a provider here is never treated so (fail closed: it
    /// goes the per-grant way, which records the failure for the reaper).
    pub(crate) fn revoked_in_store(&self, g: &crate::store::Grant) -> bool {
        g.credentials
            .iter()
            .all(|c| self.provider(c.kind).is_ok_and(|p| p.revoked_in_store()))
    }

    /// The audit event of a successful requested revocation of `g` by `actor`, as
    /// [`Broker::revoke_claimed`] writes it.
    pub(crate) fn revoked_event(
        &self,
        g: &crate::store::Grant,
        now: OffsetDateTime,
        actor: &str,
        ctx: &RequestCtx,
    ) -> AuditEvent {
        let mut ev = self.grant_event(g, now, Action::Revoke, actor, ctx);
        ev.outcome = Outcome::Success;
        ev.reason = RevokeCause::Requested.as_str().to_owned();
        ev
    }

    /// The configured issuer names (what an operator filter may name).
    pub(crate) fn issuer_names(&self) -> Vec<String> {
        self.verifier.issuer_names()
    }

    /// Revoke a claimed grant; finish it or record the failure for a retry. Audited either way.
    pub async fn revoke_claimed(
        &self,
        claimed: &ClaimedGrant,
        actor: &str,
        ctx: &RequestCtx,
    ) -> Result<(), ServiceError> {
        let now = self.clock.now();
        let g = &claimed.grant;
        let action = match claimed.cause {
            RevokeCause::Requested => Action::Revoke,
            RevokeCause::Expired => Action::Expire,
            RevokeCause::Recovery => Action::Recover,
        };
        let mut ev = self.grant_event(g, now, action, actor, ctx);
        crate::fault::point("before_revoke");
        // What each provider writes to revoke (e.g. an AWS deny statement), for the record.
        let described: Vec<String> = g
            .credentials
            .iter()
            .filter_map(|c| {
                let d = self.provider(c.kind).ok()?.revoke_description(c)?;
                Some(format!("{}: {d}", c.name))
            })
            .collect();
        let revoked = self.revoke_credentials(&g.credentials).await;
        metrics::revocation(
            claimed.cause.as_str(),
            revoked.is_ok(),
            g.revoke_attempts > 0,
        );
        match revoked {
            Ok(()) => {
                crate::fault::point("after_revoke");
                ev.outcome = Outcome::Success;
                ev.reason = claimed.cause.as_str().to_owned();
                if !described.is_empty() {
                    ev.detail = Some(described.join("; "));
                }
                self.store
                    .finish_revoke(g.id, claimed.cause, now, &ev)
                    .await?;
                Ok(())
            }
            Err(e) => {
                let attempts = g.revoke_attempts.max(0) as u32 + 1;
                let backoff = Duration::seconds(i64::from(2u32.saturating_pow(attempts.min(8))))
                    .min(Duration::minutes(5));
                ev.action = Action::RevokeFailed;
                ev.outcome = Outcome::Failure;
                ev.reason = e.reason_code().to_owned();
                ev.detail = Some(format!(
                    "attempt {attempts}; retry in {}s",
                    backoff.whole_seconds()
                ));
                tracing::warn!(grant_id = %g.id, attempts, reason = e.reason_code(), error = %e, "revocation failed; will retry");
                self.store
                    .revoke_failed(g.id, e.reason_code(), now + backoff, &ev)
                    .await?;
                Err(ServiceError::RevokePending)
            }
        }
    }

    /// `POST /v1/revoke`: revoke the grant this revocation token belongs to. Idempotent.
    pub async fn revoke_by_token(
        &self,
        token: &Sensitive,
        ctx: &RequestCtx,
    ) -> Result<(Uuid, GrantStatus), ServiceError> {
        let now = self.clock.now();
        let ev = self.base_event(now, Action::Revoke, ctx);
        let t = token.expose();
        if !t.starts_with(REVOCATION_PREFIX) || t.len() > 128 {
            return Err(self.refuse(ev, ServiceError::BadRevocationToken).await);
        }
        let Some((grant_id, status)) = self
            .store
            .grant_status_by_revocation_hash(&sha256_hex(t.as_bytes()))
            .await?
        else {
            return Err(self.refuse(ev, ServiceError::BadRevocationToken).await);
        };
        if status.is_final() {
            return Ok((grant_id, status));
        }
        match self
            .store
            .claim_for_revoke(grant_id, now, self.reaper.lease)
            .await?
        {
            Some(claimed) => {
                self.revoke_claimed(&claimed, "job", ctx).await?;
                Ok((grant_id, claimed.cause.final_status()))
            }
            // Someone else (the reaper, another replica) holds it right now.
            None => {
                let status = self
                    .store
                    .grant(grant_id)
                    .await?
                    .map_or(GrantStatus::Revoking, |g| g.status);
                Ok((grant_id, status))
            }
        }
    }

    /// Provider-wide kill switches (e.g. the AWS `aws:TokenIssueTime` deny on every brokered
    /// role), for the kinds selected (`None` = every kind). Each provider's outcome, or its
    /// failure's reason code, by kind.
    pub async fn revoke_all_providers(
        &self,
        kind: Option<CredentialKind>,
    ) -> BTreeMap<String, Result<crate::providers::RevokeAllReport, &'static str>> {
        let mut out = BTreeMap::new();
        for (k, p) in &self.providers {
            if kind.is_some_and(|want| want != *k) {
                continue;
            }
            let r = p.revoke_all().await.map_err(|e| {
                tracing::warn!(kind = k.as_str(), error = %e, "provider-wide revoke-all failed");
                e.reason_code()
            });
            out.insert(k.as_str().to_owned(), r);
        }
        out
    }

    /// One reaper round: revoke expired grants, recover crashed ones, retry failed revocations.
    /// Returns how many grants were handled.
    pub async fn reap_once(&self) -> Result<usize, StoreError> {
        let now = self.clock.now();
        let claimed = self
            .store
            .claim_due(
                now,
                now - self.reaper.stale_issuing_after,
                self.reaper.lease,
                self.reaper.batch,
            )
            .await?;
        let n = claimed.len();
        let ctx = RequestCtx::default();
        let futs = claimed
            .iter()
            .map(|c| self.revoke_claimed(c, "reaper", &ctx));
        for r in futures::future::join_all(futs).await {
            if let Err(e) = r {
                tracing::debug!(
                    reason = e.reason_code(),
                    "reaper: a revocation is pending retry"
                );
            }
        }
        let _ = self.store.purge_jti(now).await;
        let _ = self.store.purge_deliveries(now).await;
        if let Some(l) = &self.rate_limit {
            l.retain_recent();
        }
        Ok(n)
    }

    /// Run the reaper until `shutdown` resolves.
    pub async fn run_reaper(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let period = std::time::Duration::try_from(self.reaper.interval)
            .unwrap_or(std::time::Duration::from_secs(5));
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    match self.reap_once().await {
                        Ok(0) => {}
                        Ok(n) => tracing::info!(grants = n, "reaper round"),
                        Err(e) => tracing::warn!(error = %e, "reaper: store unavailable"),
                    }
                }
                _ = shutdown.changed() => break,
            }
        }
    }

    /// RFC 7662 introspection of an API token minted here.
    pub async fn introspect(&self, token: &str) -> Result<serde_json::Value, ServiceError> {
        let inactive = serde_json::json!({ "active": false });
        let now = self.clock.now();
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

/// All minted credentials, or the first failure's credential name and error.
fn collect_minted(
    results: Vec<Result<Minted, ProviderError>>,
    issued: &[IssuedCredential],
) -> Result<Vec<Minted>, (String, ProviderError)> {
    let mut minted = Vec::with_capacity(results.len());
    for (r, ic) in results.into_iter().zip(issued) {
        match r {
            Ok(m) => minted.push(m),
            Err(e) => return Err((ic.name.clone(), e)),
        }
    }
    Ok(minted)
}

/// The grant lives as long as its longest-lived credential (providers may shorten a TTL).
fn latest_expiry(minted: &[Minted], planned: OffsetDateTime) -> OffsetDateTime {
    minted.iter().map(|m| m.expires_at).max().unwrap_or(planned)
}

fn respond(
    grant_id: Uuid,
    expires_at: OffsetDateTime,
    revocation_token: Sensitive,
    minted: Vec<Minted>,
    issued: Vec<IssuedCredential>,
) -> ExchangeResponse {
    let credentials = minted
        .into_iter()
        .zip(issued)
        .map(|(m, ic)| IssuedOutput {
            name: ic.name,
            kind: ic.kind,
            fields: m.fields,
        })
        .collect();
    ExchangeResponse {
        grant_id,
        expires_at,
        revocation_token,
        credentials,
    }
}

/// The TTL of a grant: the requested TTL (or the default), capped by the broker-wide maximum,
/// by every allowing decision's ceiling (`min(rule.max_ttl, credential.max_ttl)`) and by the
/// time the job has left (GitLab's `exp`). Invariant: never above any of them. Below one second
/// the caller refuses the exchange.
pub(crate) fn effective_ttl(
    requested: Option<Duration>,
    default: Duration,
    grant_max: Duration,
    caps: &[Duration],
    job_left: Option<Duration>,
) -> Duration {
    let mut ttl = requested.unwrap_or(default).min(grant_max);
    for c in caps.iter().chain(job_left.as_ref()) {
        ttl = ttl.min(*c);
    }
    ttl
}

#[cfg(test)]
mod ttl_properties {
    use super::effective_ttl;
    use proptest::prelude::*;
    use time::Duration;

    fn secs() -> impl Strategy<Value = Duration> {
        (-86_400i64..30 * 86_400).prop_map(Duration::seconds)
    }

    proptest! {
        #[test]
        fn ttl_never_exceeds_any_cap(
            requested in proptest::option::of(secs()),
            default in secs(),
            grant_max in secs(),
            caps in proptest::collection::vec(secs(), 0..5),
            job_left in proptest::option::of(secs()),
        ) {
            let ttl = effective_ttl(requested, default, grant_max, &caps, job_left);
            prop_assert!(ttl <= grant_max);
            prop_assert!(ttl <= requested.unwrap_or(default));
            for c in &caps {
                prop_assert!(ttl <= *c);
            }
            if let Some(j) = job_left {
                prop_assert!(ttl <= j);
            }
            // And it is one of the inputs, not something smaller made up.
            let mut inputs = vec![requested.unwrap_or(default), grant_max];
            inputs.extend(&caps);
            inputs.extend(job_left);
            prop_assert!(inputs.contains(&ttl));
        }
    }
}

#[cfg(test)]
mod tests {
    //! The exchange, revoke and reaper paths with a manual clock, the dev issuers (static keys,
    //! no network) and a real SQLite store.
    use super::*;
    use crate::oidc::{VerifierOptions, dev};
    use crate::providers::api_token::SigningKeys;
    use crate::store::{AuditFilter, testdb::TestDb};
    use crate::time::{Clock, ManualClock};
    use async_trait::async_trait;
    use serde_json::json;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const AUD: &str = "https://broker.test";

    const POLICY: &str = r#"
credentials:
  - name: deploy-api
    max_ttl: 15m
    api_token: {audience: https://deploy.example, scopes: ["deploy:${repository}"]}
  - name: flaky
    max_ttl: 1h
    api_token: {audience: https://flaky.example}
  - name: gl-api
    max_ttl: 1h
    api_token: {audience: https://deploy.example, scopes: ["deploy:${project_path}"]}
rules:
  - name: acme-api
    issuer: github
    credentials: [deploy-api, flaky]
    max_ttl: 10m
    when: claims.repository_id == "1000001" && claims.repository_owner_id == "9000001" && claims.event_name == "push"
  - name: acme-gitlab
    issuer: gitlab
    credentials: [gl-api]
    when: claims.project_id == "2000001" && claims.namespace_id == "3000001"
"#;

    /// The API-token provider, except that minting `flaky` fails with `target_unavailable`
    /// and the first `fail_revokes` revocations fail.
    #[derive(Debug)]
    struct Flaky {
        inner: ApiTokenProvider,
        fail_revokes: AtomicUsize,
        revoked: std::sync::Mutex<Vec<String>>,
        /// What `mints_in_memory` answers (off: the intent-first path).
        in_memory: std::sync::atomic::AtomicBool,
    }

    #[async_trait]
    impl Provider for Flaky {
        fn kind(&self) -> CredentialKind {
            CredentialKind::ApiToken
        }
        fn mints_in_memory(&self) -> bool {
            self.in_memory.load(Ordering::SeqCst)
        }
        fn resource_id(
            &self,
            grant_id: Uuid,
            credential: &crate::providers::CredentialDef,
        ) -> String {
            self.inner.resource_id(grant_id, credential)
        }
        fn check_definitions(
            &self,
            defs: &[crate::providers::CredentialDef],
        ) -> Result<(), String> {
            match defs.iter().find(|d| d.name == "refused") {
                Some(_) => Err("credential \"refused\": its target is not configured".into()),
                None => Ok(()),
            }
        }
        async fn mint(&self, req: MintRequest<'_>) -> Result<Minted, ProviderError> {
            if req.credential.name == "flaky" {
                return Err(ProviderError::TargetUnavailable(
                    "connection refused".into(),
                ));
            }
            self.inner.mint(req).await
        }
        async fn revoke(&self, c: &IssuedCredential) -> Result<(), ProviderError> {
            if self.fail_revokes.load(Ordering::SeqCst) > 0 {
                self.fail_revokes.fetch_sub(1, Ordering::SeqCst);
                return Err(ProviderError::TargetUnavailable("down".into()));
            }
            self.revoked.lock().unwrap().push(c.resource_id.clone());
            Ok(())
        }
    }

    struct Harness {
        broker: Broker,
        clock: Arc<ManualClock>,
        flaky: Arc<Flaky>,
        _db: TestDb,
        _dir: tempfile::TempDir,
    }

    async fn harness() -> Harness {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("p.yaml"), POLICY).unwrap();
        let clock = Arc::new(ManualClock::at_unix(1_900_000_000));
        let shared: SharedClock = clock.clone();
        let verifier = Verifier::new(
            AUD.into(),
            vec![
                dev::issuer_config("github", AUD),
                dev::gitlab_issuer_config("gitlab", AUD),
            ],
            shared.clone(),
            VerifierOptions::default(),
        )
        .unwrap();
        let keys = Arc::new(SigningKeys::ephemeral().unwrap());
        let api = Arc::new(ApiTokenProvider::new(
            keys.clone(),
            "https://broker.test".into(),
        ));
        let flaky = Arc::new(Flaky {
            inner: ApiTokenProvider::new(keys, "https://broker.test".into()),
            fail_revokes: AtomicUsize::new(0),
            revoked: std::sync::Mutex::new(Vec::new()),
            in_memory: std::sync::atomic::AtomicBool::new(false),
        });
        let db = TestDb::sqlite().await;
        let broker = Broker::new(BrokerParts {
            verifier: Arc::new(verifier),
            store: db.store(),
            clock: shared,
            api_tokens: api,
            extra_providers: vec![flaky.clone()],
            policy_dir: dir.path().to_path_buf(),
            policy_opts: LoadOptions::default(),
            grants: GrantConfig::default(),
            reaper: ReaperConfig::default(),
            max_credentials: 16,
            rate_per_minute: 3,
        })
        .unwrap();
        Harness {
            broker,
            clock,
            flaky,
            _db: db,
            _dir: dir,
        }
    }

    fn job(now: OffsetDateTime, ttl: Duration) -> dev::DevJob {
        dev::DevJob {
            ttl,
            ..dev::DevJob::acme_api(AUD, now)
        }
    }

    impl Harness {
        fn github_token(&self) -> Sensitive {
            Sensitive::new(
                dev::sign(&dev::github_claims(&job(
                    self.clock.now(),
                    Duration::minutes(5),
                )))
                .unwrap(),
            )
        }
        fn gitlab_token(&self, ttl: Duration) -> Sensitive {
            let mut j = job(self.clock.now(), ttl);
            j.repository_id = 2_000_001;
            j.owner_id = 3_000_001;
            Sensitive::new(dev::sign(&dev::gitlab_claims(&j)).unwrap())
        }
        async fn exchange(
            &self,
            token: &Sensitive,
            creds: &[&str],
            ttl: Option<&str>,
        ) -> Result<ExchangeResponse, ServiceError> {
            let req = ExchangeRequest {
                token: token.clone(),
                credentials: creds.iter().map(|s| (*s).to_owned()).collect(),
                ttl: ttl.map(str::to_owned),
            };
            self.broker.exchange(req, &RequestCtx::default()).await
        }
        async fn audit(&self) -> Vec<crate::audit::AuditEvent> {
            self.broker
                .store
                .audit_events(&AuditFilter::default())
                .await
                .unwrap()
        }
    }

    #[tokio::test]
    async fn ttl_is_the_minimum_of_request_rule_and_credential() {
        let h = harness().await;
        let now = h.clock.now();
        let r = h
            .exchange(&h.github_token(), &["deploy-api"], Some("1h"))
            .await
            .unwrap();
        assert_eq!(
            r.expires_at,
            now + Duration::minutes(10),
            "rule max_ttl 10m wins over 1h asked"
        );
        let r = h
            .exchange(&h.github_token(), &["deploy-api"], Some("2m"))
            .await
            .unwrap();
        assert_eq!(r.expires_at, now + Duration::minutes(2));
        let r = h
            .exchange(&h.github_token(), &["deploy-api"], None)
            .await
            .unwrap();
        assert_eq!(
            r.expires_at,
            now + Duration::minutes(10),
            "default 15m capped by the rule"
        );
    }

    #[tokio::test]
    async fn a_reload_the_providers_refuse_keeps_the_old_bundle() {
        let h = harness().await;
        let before = h.broker.policy_status().digest;
        std::fs::write(
            h._dir.path().join("more.yaml"),
            "credentials: [{name: refused, max_ttl: 5m, api_token: {audience: x}}]",
        )
        .unwrap();
        let err = h.broker.reload_policies().unwrap_err();
        assert!(err.contains("not configured"), "{err}");
        assert_eq!(h.broker.policy_status().digest, before);
    }

    #[tokio::test]
    async fn each_repository_has_its_own_rate_limit() {
        let h = harness().await;
        for _ in 0..3 {
            h.exchange(&h.github_token(), &["deploy-api"], None)
                .await
                .unwrap();
        }
        let err = h
            .exchange(&h.github_token(), &["deploy-api"], None)
            .await
            .unwrap_err();
        assert!(
            matches!(err, ServiceError::RateLimited { retry_after_secs } if retry_after_secs >= 1)
        );
        assert_eq!(h.audit().await[0].reason, "rate_limited");
        // Another repository (the GitLab project) is not affected.
        h.exchange(&h.gitlab_token(Duration::minutes(5)), &["gl-api"], None)
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn gitlab_grants_never_outlive_the_job_token() {
        let h = harness().await;
        let now = h.clock.now();
        let r = h
            .exchange(
                &h.gitlab_token(Duration::seconds(120)),
                &["gl-api"],
                Some("15m"),
            )
            .await
            .unwrap();
        assert_eq!(r.expires_at, now + Duration::seconds(120));
    }

    #[tokio::test]
    async fn a_failed_mint_issues_nothing_and_does_not_consume_the_token() {
        let h = harness().await;
        let token = h.github_token();
        let err = h
            .exchange(&token, &["deploy-api", "flaky"], None)
            .await
            .unwrap_err();
        assert_eq!(err.reason_code(), "target_unavailable");
        // Both credentials of the grant were revoked (the minted one and the never-minted one).
        assert_eq!(h.flaky.revoked.lock().unwrap().len(), 2);
        let ev = h.audit().await;
        assert_eq!(ev.len(), 1);
        assert_eq!(
            (ev[0].outcome, ev[0].reason.as_str()),
            (Outcome::Error, "target_unavailable")
        );
        let grant = h
            .broker
            .store
            .grant(ev[0].grant_id.unwrap())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(grant.status, GrantStatus::Failed);
        // The same job token still works: nothing was issued for it.
        let ok = h.exchange(&token, &["deploy-api"], None).await.unwrap();
        assert_eq!(ok.credentials.len(), 1);
        // ...and now it is consumed.
        let again = h.exchange(&token, &["deploy-api"], None).await.unwrap_err();
        assert_eq!(again.reason_code(), "token_replayed");
    }

    /// In-memory credentials skip the intent: one store write makes the grant `active` with its
    /// allow event; a failed mint leaves no grant and does not consume the token; a replay is
    /// refused and writes no second grant.
    #[tokio::test]
    async fn in_memory_credentials_are_issued_in_one_store_write() {
        let h = harness().await;
        h.flaky.in_memory.store(true, Ordering::SeqCst);
        let token = h.github_token();
        let err = h
            .exchange(&token, &["deploy-api", "flaky"], None)
            .await
            .unwrap_err();
        assert_eq!(err.reason_code(), "target_unavailable");
        assert!(
            h.flaky.revoked.lock().unwrap().is_empty(),
            "nothing left the process, so nothing to revoke"
        );
        let ev = h.audit().await;
        assert_eq!(ev.len(), 1);
        assert_eq!(
            (ev[0].outcome, ev[0].reason.as_str()),
            (Outcome::Error, "target_unavailable")
        );
        let grant_id = ev[0].grant_id.unwrap();
        assert_eq!(h.broker.store.grant(grant_id).await.unwrap(), None);

        let ok = h.exchange(&token, &["deploy-api"], None).await.unwrap();
        let grant = h.broker.store.grant(ok.grant_id).await.unwrap().unwrap();
        assert_eq!(grant.status, GrantStatus::Active);
        assert_eq!(grant.expires_at, ok.expires_at);
        assert_ne!(grant.credentials[0].details, serde_json::Value::Null);
        let ev = h.audit().await;
        assert_eq!(ev.len(), 2);
        assert_eq!(
            (ev[0].outcome, ev[0].grant_id),
            (Outcome::Allow, Some(ok.grant_id))
        );

        let again = h.exchange(&token, &["deploy-api"], None).await.unwrap_err();
        assert_eq!(again.reason_code(), "token_replayed");
        let ev = h.audit().await;
        assert_eq!(ev.len(), 3);
        let refused = ev[0].grant_id.unwrap();
        assert_eq!(h.broker.store.grant(refused).await.unwrap(), None);
    }

    #[tokio::test]
    async fn expired_tokens_are_refused_by_the_injected_clock() {
        let h = harness().await;
        let token = h.github_token();
        h.clock.advance(Duration::minutes(10));
        let err = h.exchange(&token, &["deploy-api"], None).await.unwrap_err();
        assert_eq!(err.reason_code(), "token_expired");
        assert_eq!(h.audit().await[0].reason, "token_expired");
    }

    #[tokio::test]
    async fn failed_revocation_is_retried_by_the_reaper() {
        let h = harness().await;
        let r = h
            .exchange(&h.github_token(), &["deploy-api"], None)
            .await
            .unwrap();
        h.flaky.fail_revokes.store(1, Ordering::SeqCst);
        let err = h
            .broker
            .revoke_by_token(&r.revocation_token, &RequestCtx::default())
            .await
            .unwrap_err();
        assert_eq!(err.reason_code(), "revoke_pending");
        let g = h.broker.store.grant(r.grant_id).await.unwrap().unwrap();
        assert_eq!((g.status, g.revoke_attempts), (GrantStatus::Revoking, 1));
        assert_eq!(
            h.broker
                .store
                .stats()
                .await
                .unwrap()
                .revoke_failures_pending,
            1
        );
        // Not before the retry time...
        assert_eq!(h.broker.reap_once().await.unwrap(), 0);
        h.clock.advance(Duration::seconds(3));
        assert_eq!(h.broker.reap_once().await.unwrap(), 1);
        let g = h.broker.store.grant(r.grant_id).await.unwrap().unwrap();
        assert_eq!(
            g.status,
            GrantStatus::Revoked,
            "the original cause (requested) is kept"
        );
        let reasons: Vec<String> = h
            .audit()
            .await
            .iter()
            .map(|e| format!("{:?}/{}", e.action, e.reason))
            .collect();
        assert!(
            reasons.contains(&"RevokeFailed/target_unavailable".to_owned()),
            "{reasons:?}"
        );
        assert!(
            reasons.contains(&"Revoke/requested".to_owned()),
            "{reasons:?}"
        );
    }

    #[tokio::test]
    async fn reaper_expires_grants_exactly_at_their_ttl() {
        let h = harness().await;
        let r = h
            .exchange(&h.github_token(), &["deploy-api"], Some("2m"))
            .await
            .unwrap();
        let token = match &r.credentials[0].fields[0].1 {
            Field::Secret(s) => s.expose().to_owned(),
            Field::Public(_) => panic!("token must be secret"),
        };
        assert_eq!(h.broker.introspect(&token).await.unwrap()["active"], true);
        h.clock.advance(Duration::seconds(119));
        assert_eq!(h.broker.reap_once().await.unwrap(), 0);
        h.clock.advance(Duration::seconds(1));
        assert_eq!(h.broker.reap_once().await.unwrap(), 1);
        assert_eq!(
            h.broker
                .store
                .grant(r.grant_id)
                .await
                .unwrap()
                .unwrap()
                .status,
            GrantStatus::Expired
        );
        assert_eq!(
            h.broker.introspect(&token).await.unwrap(),
            json!({"active": false})
        );
    }

    #[tokio::test]
    async fn bad_requests_are_refused_and_audited() {
        let h = harness().await;
        let t = h.github_token();
        for (creds, ttl) in [
            (vec![], None),
            (vec!["Deploy API"], None),
            (vec!["deploy-api", "deploy-api"], None),
            (vec!["deploy-api"], Some("0s")),
            (vec!["deploy-api"], Some("soon")),
        ] {
            let err = h.exchange(&t, &creds, ttl).await.unwrap_err();
            assert_eq!(err.reason_code(), "bad_request", "{creds:?} {ttl:?}");
        }
        assert_eq!(h.audit().await.len(), 5);
        // None of them consumed the token.
        assert!(h.exchange(&t, &["deploy-api"], None).await.is_ok());
    }

    /// A name the store could not hold (a NUL, an over-long one) is refused as `invalid_text`
    /// and audited with the name escaped and cut short, never raw.
    #[tokio::test]
    async fn text_the_store_cannot_hold_is_refused_and_audited_escaped() {
        let h = harness().await;
        let t = h.github_token();
        let long = "a".repeat(crate::store::text::MAX_TEXT + 1);
        for name in ["deploy\0api", long.as_str()] {
            let err = h.exchange(&t, &[name], None).await.unwrap_err();
            assert_eq!(err.reason_code(), "invalid_text");
        }
        let events = h.audit().await;
        assert_eq!(events.len(), 2);
        for ev in &events {
            assert_eq!(ev.reason, "invalid_text");
            let shown = &ev.credentials_requested[0];
            assert!(!shown.contains('\0') && shown.len() < 100, "{shown:?}");
        }
        assert!(
            events
                .iter()
                .any(|e| e.credentials_requested[0] == "deploy\\u{0}api")
        );
        assert!(h.exchange(&t, &["deploy-api"], None).await.is_ok());
    }

    #[tokio::test]
    async fn policy_reload_keeps_the_old_bundle_on_error() {
        let h = harness().await;
        let before = h.broker.policy_status().digest;
        std::fs::write(
            h._dir.path().join("bad.yaml"),
            "rules: [{name: x, issuer: github, credentials: [nope], when: 'true'}]",
        )
        .unwrap();
        let err = h.broker.reload_policies().unwrap_err();
        assert!(err.contains("bad.yaml"), "{err}");
        let st = h.broker.policy_status();
        assert_eq!(st.digest, before);
        assert!(st.last_error.is_some());
        assert!(
            h.exchange(&h.github_token(), &["deploy-api"], None)
                .await
                .is_ok()
        );
        std::fs::remove_file(h._dir.path().join("bad.yaml")).unwrap();
        std::fs::write(
            h._dir.path().join("more.yaml"),
            "credentials: [{name: more, max_ttl: 5m, api_token: {audience: x}}]",
        )
        .unwrap();
        let digest = h.broker.reload_policies().unwrap();
        assert_ne!(digest, before);
        assert!(h.broker.policy_status().last_error.is_none());
    }
}

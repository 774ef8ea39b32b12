//! A leak report's life: authenticate it (GitHub's signature, or an operator), read the
//! tokens, find each one's grant (offline shape and checksum first, then by hash or, for a
//! signed API token, by its verified grant id), revoke a live one through the one revocation
//! path (`revoke.rs`) together with the other live grants of its job while the job still runs,
//! optionally freeze the repository (the operators' freeze), and audit `leak_reported`.
//! The report's shape, labels and GitHub's keys are `leaks/`'s.

use super::revoke::{Revocation, RevokeTarget};
use super::{Broker, RequestCtx};
use crate::admin::{GrantFilter, Operator, Role};
use crate::audit::{Action, AuditEvent, Outcome};
use crate::leaks::{self, Label, LeakError, ReportSource, ReportedToken, TokenAnswer, TokenStatus};
use crate::metrics;
use crate::reason::ReasonCode;
use crate::secret::{Sensitive, sha256_hex};
use crate::secret_format::{self, FormatError, SecretKind};
use crate::store::{AuditFilter, Grant, GrantStatus, JobMatch};
use futures::StreamExt;
use uuid::Uuid;

/// Tokens of one report handled at once.
const PARALLELISM: usize = 8;
/// Other grants of a leaked credential's job revoked at most (a job has a handful).
const MAX_JOB_GRANTS: u32 = 100;

/// What a reported token is.
enum Found {
    /// Not issued here, or malformed (wrong checksum, truncated): no store lookup for those.
    NotOurs,
    /// A configured operator's token, by operator name.
    Operator(String),
    /// A credential or revocation token of this grant.
    Grant(Box<Grant>, &'static str),
}

impl Broker {
    /// `POST /v1/leaks/github`: check GitHub's signature over the raw body, then act.
    pub async fn leak_report_github(
        &self,
        key_id: Option<&str>,
        signature: Option<&str>,
        body: &[u8],
        ctx: &RequestCtx,
    ) -> Result<Vec<TokenAnswer>, LeakError> {
        let Some(keys) = &self.leaks.github else {
            return Err(LeakError::NotConfigured);
        };
        let mut ev = ctx.event(self.clock.now(), Action::LeakReported, "");
        ev.actor = Some(ReportSource::Github.actor());
        if let Err(e) = keys.verify(key_id, signature, body).await {
            return Err(self.leak_refuse(ev, LeakError::Signature(e)).await);
        }
        let tokens = match leaks::parse_report(body) {
            Ok(t) => t,
            Err(e) => return Err(self.leak_refuse(ev, LeakError::BadRequest(e)).await),
        };
        self.act_on_leaks(&ReportSource::Github, tokens, ctx).await
    }

    /// `POST /v1/leaks` and `broker leak report`: an operator (admin role, already
    /// authorized by the caller) reports tokens in the same shape, without a signature.
    pub async fn leak_report_operator(
        &self,
        op: &Operator,
        body: &[u8],
        ctx: &RequestCtx,
    ) -> Result<Vec<TokenAnswer>, LeakError> {
        let src = ReportSource::Operator(op.actor());
        let tokens = match leaks::parse_report(body) {
            Ok(t) => t,
            Err(e) => {
                let mut ev = ctx.event(self.clock.now(), Action::LeakReported, "");
                ev.actor = Some(src.actor());
                return Err(self.leak_refuse(ev, LeakError::BadRequest(e)).await);
            }
        };
        self.act_on_leaks(&src, tokens, ctx).await
    }

    /// Audit a refused report (bounded by `refusals/` when unauthenticated), then return the
    /// error (503 if the audit cannot be written).
    async fn leak_refuse(&self, mut ev: AuditEvent, err: LeakError) -> LeakError {
        ev.reason = err.reason().as_str().to_owned();
        ev.detail = Some(err.to_string());
        match self.screen_refusal(&mut ev) {
            None | Some(crate::refusals::Disposition::Record) => {}
            Some(crate::refusals::Disposition::Collapse) => return err,
            Some(crate::refusals::Disposition::Limited { retry_after_secs }) => {
                return LeakError::TooManyFailures { retry_after_secs };
            }
        }
        match self.store.append_audit(&ev).await {
            Ok(()) => err,
            Err(e) => {
                tracing::error!(error = %e, reason = ev.reason, "audit write failed; refusing with 503");
                LeakError::Store(e)
            }
        }
    }

    /// Every token of an authenticated report: answered in order, each true positive audited
    /// on its own, the false positives in one event.
    async fn act_on_leaks(
        &self,
        src: &ReportSource,
        tokens: Vec<ReportedToken>,
        ctx: &RequestCtx,
    ) -> Result<Vec<TokenAnswer>, LeakError> {
        // Every token is looked up before anything is revoked, so each answer says what the
        // token was when the report arrived (a token whose grant another token of the same
        // report revokes as its job's other grant is still `revoked`, not `already_inactive`).
        let secrets: Vec<Sensitive> = tokens.iter().map(|t| t.token.clone()).collect();
        let found: Vec<Result<Found, LeakError>> = futures::stream::iter(
            secrets
                .into_iter()
                .map(|token| async move { self.leaked(&token).await }),
        )
        .buffered(PARALLELISM)
        .collect()
        .await;
        let results: Vec<Result<TokenAnswer, LeakError>> = futures::stream::iter(
            tokens
                .into_iter()
                .zip(found)
                .map(|(t, f)| async move { self.leak_one(src, &t, f?, ctx).await }),
        )
        .buffered(PARALLELISM)
        .collect()
        .await;
        let answers = results.into_iter().collect::<Result<Vec<_>, _>>()?;
        let false_positives: Vec<&TokenAnswer> = answers
            .iter()
            .filter(|a| a.label == Label::FalsePositive)
            .collect();
        if !false_positives.is_empty() {
            let mut ev = ctx.event(
                self.clock.now(),
                Action::LeakReported,
                ReasonCode::LeakFalsePositive.as_str(),
            );
            ev.actor = Some(src.actor());
            ev.outcome = Outcome::Success;
            let shown: Vec<&str> = false_positives
                .iter()
                .take(20)
                .map(|a| a.token_hash.as_str())
                .collect();
            ev.detail = Some(format!(
                "{} of {} reported tokens not issued here; sha256: {}{}",
                false_positives.len(),
                answers.len(),
                shown.join(", "),
                if false_positives.len() > shown.len() {
                    ", ..."
                } else {
                    ""
                }
            ));
            self.store.append_audit(&ev).await?;
        }
        for a in &answers {
            let label = match (a.label, a.status) {
                (Label::FalsePositive, _) => "false_positive",
                (_, TokenStatus::AlreadyInactive) => "inactive",
                _ => "true_positive",
            };
            metrics::leak_token(src.metric(), label);
        }
        Ok(answers)
    }

    /// One reported token, as it was found: revoke what is live, audit.
    async fn leak_one(
        &self,
        src: &ReportSource,
        t: &ReportedToken,
        found: Found,
        ctx: &RequestCtx,
    ) -> Result<TokenAnswer, LeakError> {
        let answer = |label, status| TokenAnswer {
            token_hash: t.token_hash.clone(),
            token_type: t.token_type.clone(),
            label,
            status,
        };
        let now = self.clock.now();
        let actor = src.actor();
        let place = format!(
            "found at {} ({})",
            t.url.as_deref().unwrap_or("-"),
            t.source.as_deref().unwrap_or("-")
        );
        match found {
            Found::NotOurs => Ok(answer(Label::FalsePositive, TokenStatus::Unknown)),
            Found::Operator(name) => {
                tracing::warn!(operator = %name, "an operator token was reported leaked; rotate it");
                let mut ev =
                    ctx.event(now, Action::LeakReported, ReasonCode::LeakReported.as_str());
                ev.actor = Some(actor);
                ev.outcome = Outcome::Success;
                ev.detail = Some(format!(
                    "the token of operator:{name} (sha256 {}) was reported leaked, {place}; it stays valid until its hash is removed from `operators:`: rotate it now",
                    t.token_hash
                ));
                self.store.append_audit(&ev).await?;
                Ok(answer(
                    Label::TruePositive,
                    TokenStatus::RotateOperatorToken,
                ))
            }
            Found::Grant(g, what) => {
                let was_live = !g.status.is_final();
                let running = g.status == GrantStatus::Active && g.expires_at > now;
                let mut revoked = Vec::new();
                if was_live {
                    revoked.push(self.revoke_for_leak(g.id, &actor, ctx).await);
                }
                // The job still runs: whatever else it holds may have leaked with it.
                let mut others = Vec::new();
                if running && let Some(job) = job_match(&g) {
                    let siblings = self.store.active_job_grants(&job, MAX_JOB_GRANTS).await?;
                    for s in siblings.into_iter().filter(|s| s.id != g.id) {
                        others.push(self.revoke_for_leak(s.id, &actor, ctx).await);
                    }
                }
                let freeze = if running && self.leaks.freeze_repository {
                    self.leak_freeze(&g, &t.token_hash, ctx).await
                } else {
                    None
                };
                let mut ev = self.grant_event(&g, now, Action::LeakReported, &actor, ctx);
                if let Some(job) = self.exchange_attribution(g.id).await? {
                    ev.job = job;
                }
                ev.outcome = Outcome::Success;
                ev.reason = ReasonCode::LeakReported.as_str().to_owned();
                let live_for =
                    (now.min(g.revoked_at.unwrap_or(now)) - g.created_at).whole_seconds();
                ev.detail = Some(format!(
                    "{what} (sha256 {}, reported as {:?}) {place}; live {live_for}s (issued {}); {}; other grants of the job: {}{}",
                    t.token_hash,
                    t.token_type,
                    g.created_at,
                    if was_live {
                        format!("revoked: grant {} {}", g.id, revoked.join(", "))
                    } else {
                        format!("already {}: nothing to revoke", g.status.as_str())
                    },
                    if others.is_empty() {
                        "none".to_owned()
                    } else {
                        others.join(", ")
                    },
                    freeze.map(|f| format!("; {f}")).unwrap_or_default(),
                ));
                self.store.append_audit(&ev).await?;
                Ok(answer(
                    Label::TruePositive,
                    if was_live {
                        TokenStatus::Revoked
                    } else {
                        TokenStatus::AlreadyInactive
                    },
                ))
            }
        }
    }

    /// Revoke one grant for a leak; the outcome in words for the audit detail.
    async fn revoke_for_leak(&self, id: Uuid, actor: &str, ctx: &RequestCtx) -> String {
        match self.revoke_grant(RevokeTarget::Id(id), actor, ctx).await {
            Revocation::Revoked { status, .. } => format!("{id}: {}", status.as_str()),
            Revocation::Busy => format!("{id}: being revoked already"),
            Revocation::Failed { reason, .. } => {
                format!("{id}: revocation failed ({reason}), queued for retry")
            }
        }
    }

    /// Freeze new exchanges for the leaked credential's repository, unless a freeze is in
    /// force already (one freeze at a time: an operator's broader one is never replaced).
    async fn leak_freeze(&self, g: &Grant, token_hash: &str, ctx: &RequestCtx) -> Option<String> {
        let repository_id = g.repository_id.clone()?;
        match self.current_freeze().await {
            Ok(Some(_)) => return Some("freeze: one already in force, left as it is".into()),
            Ok(None) => {}
            Err(e) => return Some(format!("freeze: not set ({})", e.reason_code())),
        }
        let op = Operator {
            name: "leak-response".into(),
            role: Role::Admin,
            subject: None,
        };
        let filter = GrantFilter {
            repository_id: Some(repository_id.clone()),
            ..GrantFilter::default()
        };
        let reason = format!("credential leaked (sha256 {token_hash})");
        match self.freeze(&op, &reason, &filter, ctx).await {
            Ok(_) => Some(format!("froze repository id {repository_id}")),
            Err(e) => Some(format!("freeze: not set ({})", e.reason_code())),
        }
    }

    /// The job attribution of the exchange that created grant `id` (repository, run,
    /// workflow, actor, ref), from its allow event.
    async fn exchange_attribution(
        &self,
        id: Uuid,
    ) -> Result<Option<crate::oidc::JobAttribution>, LeakError> {
        let filter = AuditFilter {
            grant_id: Some(id),
            limit: 50,
            ..AuditFilter::default()
        };
        let events = self.store.audit_events(&filter).await?;
        Ok(events
            .into_iter()
            .find(|e| e.action == Action::Exchange && e.outcome == Outcome::Allow)
            .map(|e| e.job))
    }

    /// What a reported token is. Malformed broker secrets are answered offline.
    async fn leaked(&self, token: &Sensitive) -> Result<Found, LeakError> {
        let t = token.expose();
        if t.len() > leaks::MAX_TOKEN_BYTES {
            return Ok(Found::NotOurs);
        }
        // Revocation and operator tokens, current or legacy shape.
        if secret_format::check(t, SecretKind::Revocation).is_ok() {
            let g = self
                .store
                .grant_by_revocation_hash(&sha256_hex(t.as_bytes()))
                .await?;
            return Ok(g.map_or(Found::NotOurs, |g| {
                Found::Grant(Box::new(g), "revocation token")
            }));
        }
        if secret_format::check(t, SecretKind::Operator).is_ok() {
            return Ok(match self.admin.operators.authenticate(token) {
                Some(op) => Found::Operator(op.name),
                None => Found::NotOurs,
            });
        }
        match secret_format::parse(t) {
            Ok(kind) => {
                let Some(m) = self
                    .store
                    .credential_by_secret_hash(&sha256_hex(t.as_bytes()))
                    .await?
                else {
                    return Ok(Found::NotOurs);
                };
                let Some(g) = self.store.grant(m.grant_id).await? else {
                    return Ok(Found::NotOurs);
                };
                let what = match kind {
                    SecretKind::PostgresPassword => "postgres password",
                    SecretKind::MysqlPassword => "mysql password",
                    SecretKind::RedisPassword => "redis password",
                    _ => "api token (opaque)",
                };
                Ok(Found::Grant(Box::new(g), what))
            }
            Err(FormatError::UnknownPrefix) => {
                // A signed API token: its signature proves it ours, its `gid` names the grant.
                let Ok(c) = self.api_tokens.check_signature(t) else {
                    return Ok(Found::NotOurs);
                };
                let Ok(id) = Uuid::parse_str(&c.gid) else {
                    return Ok(Found::NotOurs);
                };
                Ok(match self.store.grant(id).await? {
                    Some(g) if g.credentials.iter().any(|x| x.resource_id == c.jti) => {
                        Found::Grant(Box::new(g), "api token (jwt)")
                    }
                    _ => Found::NotOurs,
                })
            }
            Err(_) => {
                metrics::malformed_secret("leak");
                Ok(Found::NotOurs)
            }
        }
    }
}

/// The job of a grant, as job-end webhooks match it (`grants.job`); `None` when the issuer
/// gave no job id.
fn job_match(g: &Grant) -> Option<JobMatch> {
    let field = |k: &str| g.job.get(k).and_then(|v| v.as_str()).map(str::to_owned);
    Some(JobMatch {
        issuers: vec![g.issuer.clone()],
        platform: field("platform")?,
        repository_id: g.repository_id.clone()?,
        job_id: field("job_id")?,
        run_id: field("run_id"),
        run_attempt: field("run_attempt"),
    })
}

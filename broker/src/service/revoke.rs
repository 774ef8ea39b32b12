//! Revocation: the one path every revocation takes ([`Broker::revoke_grant`]), `POST /v1/revoke`
//! by revocation token, batches for operators and webhooks, and the audit events of
//! revocations.

use super::ServiceError;
use super::{Broker, RequestCtx};
use crate::admin::{RevokeFailure, RevokeTally};
use crate::audit::{Action, AuditEvent, Outcome};
use crate::metrics;
use crate::providers::{CredentialKind, IssuedCredential, ProviderError, Verification};
use crate::reason::ReasonCode;
use crate::secret::{Sensitive, sha256_hex};
use crate::secret_format::{self, FormatError, SecretKind};
use crate::store::{ClaimedGrant, GrantStatus, RevokeCause};
use futures::StreamExt;
use std::collections::BTreeMap;
use time::{Duration, OffsetDateTime};
use uuid::Uuid;

/// Waits before the retries of an unverified revocation's check.
const VERIFY_RETRIES: [std::time::Duration; 2] = [
    std::time::Duration::from_millis(200),
    std::time::Duration::from_secs(1),
];

/// Which grant [`Broker::revoke_grant`] revokes.
pub(crate) enum RevokeTarget<'a> {
    /// Claim it first (a lease; `Busy` if another worker holds one).
    Id(Uuid),
    /// Already claimed by the caller (the reaper claims a batch at once).
    Claimed(&'a ClaimedGrant),
}

/// How one revocation through [`Broker::revoke_grant`] ended.
pub(crate) enum Revocation {
    /// Revoked and finished: the grant's final status and its credentials' kinds.
    Revoked {
        status: GrantStatus,
        kinds: Vec<CredentialKind>,
    },
    /// Another worker holds the grant's claim; it finishes the revocation.
    Busy,
    /// Not revoked now: a provider failed (the reaper retries it) or the store did.
    Failed {
        reason: &'static str,
        error: ServiceError,
    },
}

impl Broker {
    /// Revoke credentials concurrently; the first error is returned after all were tried.
    pub(super) async fn revoke_credentials(
        &self,
        creds: &[IssuedCredential],
    ) -> Result<(), ProviderError> {
        let futs = creds.iter().map(|c| async move {
            let provider = self.provider(c.kind)?;
            let started = std::time::Instant::now();
            let revoked = provider.revoke(c).await;
            crate::metrics::provider_op(c.kind.as_str(), "revoke", revoked.is_ok(), started);
            revoked
        });
        let results = futures::future::join_all(futs).await;
        results.into_iter().find(Result::is_err).unwrap_or(Ok(()))
    }

    /// An event about grant `g` (a revocation of it), with the grant's identity copied in.
    pub(super) fn grant_event(
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
    /// [`Broker::revoke_grant`] writes it.
    pub(crate) fn revoked_event(
        &self,
        g: &crate::store::Grant,
        now: OffsetDateTime,
        actor: &str,
        ctx: &RequestCtx,
    ) -> AuditEvent {
        let mut ev = self.grant_event(g, now, Action::Revoke, actor, ctx);
        ev.outcome = Outcome::Success;
        ev.reason = cause_reason(RevokeCause::Requested).as_str().to_owned();
        ev
    }

    /// The one revocation path: claim the grant (unless the caller's batch claimed it already),
    /// revoke every credential with its provider, then either finish the grant (`revoked`,
    /// `expired` or `failed`, by its claim's cause) or record the failure with a retry time,
    /// with the audit event in the same store transaction. The job's own revoke, the reaper
    /// (expiry, crash recovery, retries), operator revoke-all and job-end webhooks all come
    /// through here; only revoke-all's set-based revocation of in-store grants does not, since
    /// it has no provider to call.
    pub(crate) async fn revoke_grant(
        &self,
        grant: RevokeTarget<'_>,
        actor: &str,
        ctx: &RequestCtx,
    ) -> Revocation {
        let claimed_here;
        let claimed = match grant {
            RevokeTarget::Claimed(c) => c,
            RevokeTarget::Id(id) => {
                let claim = self
                    .store
                    .claim_for_revoke(id, self.clock.now(), self.reaper.lease)
                    .await;
                match claim {
                    Ok(Some(c)) => {
                        claimed_here = c;
                        &claimed_here
                    }
                    // Someone else (the reaper, another replica, a webhook) holds it right now.
                    Ok(None) => return Revocation::Busy,
                    Err(e) => {
                        return Revocation::Failed {
                            reason: e.reason_code(),
                            error: ServiceError::Store(e),
                        };
                    }
                }
            }
        };
        match self.revoke_claimed(claimed, actor, ctx).await {
            Ok(()) => Revocation::Revoked {
                status: claimed.cause.final_status(),
                kinds: claimed.grant.credentials.iter().map(|c| c.kind).collect(),
            },
            Err(error) => Revocation::Failed {
                reason: error.reason_code(),
                error,
            },
        }
    }

    /// Revoke a claimed grant; finish it or record the failure for a retry. Audited either way.
    async fn revoke_claimed(
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
                ev.reason = cause_reason(claimed.cause).as_str().to_owned();
                let (verified, unverified) = self.verify_revoked(g).await;
                ev.verified = verified;
                let mut detail = described;
                if !unverified.is_empty() {
                    detail.push(format!("unverified: {}", unverified.join("; ")));
                }
                if !detail.is_empty() {
                    ev.detail = Some(detail.join("; "));
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

    /// Check on each credential's target that the revoked access no longer works, retrying an
    /// unverified one twice (a session's termination, an IAM write's propagation can lag).
    /// Returns `Some(all verified)` when any target could be asked, and the reasons of those
    /// that could not be verified. An unverified revocation is counted and logged for alerts;
    /// `broker audit query --unverified` lists them.
    async fn verify_revoked(&self, g: &crate::store::Grant) -> (Option<bool>, Vec<String>) {
        let futs = g.credentials.iter().map(|c| async move {
            let Ok(p) = self.provider(c.kind) else {
                return (c, Verification::NotApplicable);
            };
            let mut v = p.verify_revoked(c).await;
            for delay in VERIFY_RETRIES {
                if !matches!(v, Verification::Unverified(_)) {
                    break;
                }
                tokio::time::sleep(delay).await;
                v = p.verify_revoked(c).await;
            }
            (c, v)
        });
        let results = futures::future::join_all(futs).await;
        let mut asked = false;
        let mut unverified = Vec::new();
        for (c, v) in results {
            match v {
                Verification::NotApplicable => {}
                Verification::Verified => asked = true,
                Verification::Unverified(why) => {
                    asked = true;
                    unverified.push(format!("{}: {why}", c.name));
                }
            }
        }
        if !asked {
            return (None, unverified);
        }
        if unverified.is_empty() {
            metrics::revocation_verification("verified");
            (Some(true), unverified)
        } else {
            metrics::revocation_verification("unverified");
            tracing::error!(grant_id = %g.id, unverified = %unverified.join("; "), "revocation could not be verified on its target");
            (Some(false), unverified)
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
        // Offline first: a mistyped or truncated token never reaches the store. A token of the
        // legacy shape (no checksum) is looked up by hash as before.
        if let Err(e) = secret_format::check(t, SecretKind::Revocation) {
            metrics::malformed_secret("revoke");
            let err = match e {
                FormatError::UnknownPrefix => ServiceError::BadRevocationToken,
                e => ServiceError::MalformedSecret(e),
            };
            return Err(self.refuse(ev, err).await);
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
        self.revoke_job_grant(grant_id, ctx).await
    }

    /// A revocation the job asked for (its revocation token, or RFC 7009 with its API token):
    /// the grant's status after it.
    pub(super) async fn revoke_job_grant(
        &self,
        grant_id: Uuid,
        ctx: &RequestCtx,
    ) -> Result<(Uuid, GrantStatus), ServiceError> {
        match self
            .revoke_grant(RevokeTarget::Id(grant_id), "job", ctx)
            .await
        {
            Revocation::Revoked { status, .. } => Ok((grant_id, status)),
            Revocation::Busy => {
                let status = self
                    .store
                    .grant(grant_id)
                    .await?
                    .map_or(GrantStatus::Revoking, |g| g.status);
                Ok((grant_id, status))
            }
            Revocation::Failed { error, .. } => Err(error),
        }
    }

    /// Revoke `grants` through [`Broker::revoke_grant`], `parallelism` at a time, and tally
    /// what became of them (operator revoke-all, job-end webhooks).
    pub(crate) async fn revoke_grants(
        &self,
        grants: Vec<Uuid>,
        parallelism: usize,
        actor: &str,
        ctx: &RequestCtx,
    ) -> RevokeTally {
        let results: Vec<(Uuid, Revocation)> =
            futures::stream::iter(grants.into_iter().map(|id| async move {
                (
                    id,
                    self.revoke_grant(RevokeTarget::Id(id), actor, ctx).await,
                )
            }))
            .buffer_unordered(parallelism)
            .collect()
            .await;
        let mut tally = RevokeTally::default();
        for (id, r) in results {
            match r {
                Revocation::Revoked { kinds, .. } => tally.revoked(kinds),
                Revocation::Busy => tally.already_in_progress += 1,
                Revocation::Failed { reason, .. } => tally.failures.push(RevokeFailure {
                    grant_id: id,
                    reason: reason.to_owned(),
                }),
            }
        }
        tally
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
}

/// The audit reason of a finished revocation: its cause.
fn cause_reason(cause: RevokeCause) -> ReasonCode {
    match cause {
        RevokeCause::Requested => ReasonCode::Requested,
        RevokeCause::Expired => ReasonCode::Expired,
        RevokeCause::Recovery => ReasonCode::Recovery,
    }
}

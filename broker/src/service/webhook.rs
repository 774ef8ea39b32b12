//! A delivery's life: authenticate, parse, refuse replays, find the job's grants, revoke them,
//! audit. Revocation is the one revoke path (`revoke.rs`), so each grant's revocation is
//! audited as any other, with actor `webhook:<source>`, and a failed one stays queued for the
//! reaper. The delivery shapes, signatures and scopes are `webhooks/`'s.

use super::{Broker, RequestCtx};
use crate::audit::{Action, AuditEvent, Outcome};
use crate::reason::ReasonCode;
use crate::store::{JobMatch, StoreError};
use crate::webhooks::event::{self, HookEvent, JobEnd};
use crate::webhooks::signature::{github_signature_match, gitlab_token_match};
use crate::webhooks::{
    Delivery, HookOutcome, HookReport, MAX_DELIVERY_ID, MAX_GRANTS_PER_DELIVERY, Source,
    WebhookError, clean_header,
};

/// Revocations one delivery runs at once.
const PARALLELISM: usize = 8;

impl Broker {
    pub(super) fn hook_event(&self, ctx: &RequestCtx, d: &Delivery<'_>) -> AuditEvent {
        let mut ev = ctx.event(self.clock.now(), Action::Webhook, "");
        ev.actor = Some(format!("webhook:{}", d.source.as_str()));
        ev.job.platform = Some(d.source.platform().as_str().to_owned());
        // Unauthenticated header text: bounded and printable only.
        ev.detail = Some(format!(
            "delivery {}; event {}",
            d.delivery_id
                .as_deref()
                .map_or_else(|| "-".to_owned(), |s| clean_header(s, MAX_DELIVERY_ID)),
            d.event
                .as_deref()
                .map_or_else(|| "-".to_owned(), |s| clean_header(s, 64)),
        ));
        ev
    }

    /// Audit a refused delivery, then return the error (503 if the audit cannot be written).
    pub(super) async fn hook_refuse(&self, mut ev: AuditEvent, err: WebhookError) -> WebhookError {
        ev.reason = err.reason_code().to_owned();
        if let WebhookError::BadRequest(m) | WebhookError::OutOfScope(m) = &err {
            ev.detail = Some(format!("{}; {m}", ev.detail.unwrap_or_default()));
        }
        match self.screen_refusal(&mut ev) {
            None | Some(crate::refusals::Disposition::Record) => {}
            Some(crate::refusals::Disposition::Collapse) => return err,
            Some(crate::refusals::Disposition::Limited { retry_after_secs }) => {
                return WebhookError::TooManyFailures { retry_after_secs };
            }
        }
        match self.store.append_audit(&ev).await {
            Ok(()) => err,
            Err(e) => {
                tracing::error!(error = %e, reason = ev.reason, "audit write failed; refusing with 503");
                WebhookError::Store(e)
            }
        }
    }

    /// Handle one delivery to `POST /v1/hooks/<source>`.
    pub async fn webhook(
        &self,
        d: Delivery<'_>,
        ctx: &RequestCtx,
    ) -> Result<HookOutcome, WebhookError> {
        let Some(ep) = self.webhooks.endpoint(d.source) else {
            return Err(WebhookError::NotConfigured);
        };
        let ev = self.hook_event(ctx, &d);

        // 1. Authenticate before reading anything else the sender says; remember which secret
        //    verified, since that decides what the delivery may speak for.
        let verified_by = match d.source {
            Source::Github => github_signature_match(
                &ep.secrets,
                d.credential.as_ref().map(|c| c.expose()),
                d.body,
            ),
            Source::Gitlab => gitlab_token_match(&ep.secrets, d.credential.as_ref()),
        };
        let Some((secret_no, scope)) =
            verified_by.and_then(|i| ep.scopes.get(i).map(|scope| (i, scope)))
        else {
            return Err(self.hook_refuse(ev, WebhookError::BadSignature).await);
        };
        let key = match d.source {
            Source::Github => "secrets",
            Source::Gitlab => "tokens",
        };
        let out_of_scope = |what: String| {
            WebhookError::OutOfScope(format!(
                "{what} is outside the scope {} of webhooks.{}.{key}[{secret_no}]",
                scope.describe(),
                d.source.as_str()
            ))
        };

        // 2. What ended (or nothing to do).
        let parsed = match d.source {
            Source::Github => event::github(d.event.as_deref(), d.body),
            Source::Gitlab => event::gitlab(d.event.as_deref(), d.body),
        };
        let job = match parsed {
            Ok(HookEvent::JobEnd(j)) => j,
            Ok(HookEvent::Ignored(why)) => {
                tracing::debug!(source = d.source.as_str(), why, "webhook delivery ignored");
                return Ok(HookOutcome::Ignored(why));
            }
            Err(e) => {
                let err = WebhookError::BadRequest(e.to_string());
                return Err(self.hook_refuse(ev, err).await);
            }
        };

        // 2b. The repository the delivery names must be inside the secret's scope (a delivery
        //     that names none is outside every scope but `*`). Checked before the delivery id is
        //     kept.
        if !scope.allows_named(job.repository.as_deref()) {
            let what = match &job.repository {
                Some(r) => format!("repository {r:?}"),
                None => "a delivery without a repository name".to_owned(),
            };
            return Err(self
                .hook_refuse(with_job(ev, &job), out_of_scope(what))
                .await);
        }

        // 3. Once per delivery id.
        let id = match d.delivery_id.as_deref() {
            Some(s) if !s.is_empty() && s.len() <= MAX_DELIVERY_ID && s.is_ascii() => s,
            _ => {
                let err = WebhookError::BadRequest(
                    "a delivery id header (at most 128 ASCII characters) is required".into(),
                );
                return Err(self.hook_refuse(ev, err).await);
            }
        };
        let now = self.clock.now();
        let source = d.source.as_str();
        match self
            .store
            .record_delivery(source, id, now, now + self.webhooks.delivery_ttl)
            .await
        {
            Ok(()) => {}
            Err(StoreError::Replayed) => {
                let err = WebhookError::Replayed(id.to_owned());
                return Err(self.hook_refuse(with_job(ev, &job), err).await);
            }
            Err(e) => return Err(WebhookError::Store(e)),
        }

        // 4. The job's active grants; on failure let a retry of this delivery through.
        let m = JobMatch {
            issuers: ep.issuers.clone(),
            platform: d.source.platform().as_str().to_owned(),
            repository_id: job.repository_id.clone(),
            job_id: job.job_id.clone(),
            run_id: job.run_id.clone(),
            run_attempt: job.run_attempt.clone(),
        };
        let grants = match self
            .store
            .active_job_grants(&m, MAX_GRANTS_PER_DELIVERY)
            .await
        {
            Ok(g) => g,
            Err(e) => {
                let _ = self.store.forget_delivery(source, id).await;
                return Err(WebhookError::Store(e));
            }
        };
        // 4b. The name in a delivery is the signer's word; the grants' repositories come from
        //     verified job tokens. Matching is by repository id, so a holder of one secret could
        //     name an in-scope repository beside another's id: any matched grant outside the
        //     scope refuses the whole delivery, nothing is revoked and its id is not kept.
        if let Some(g) = grants
            .iter()
            .find(|g| !scope.allows_named(g.repository.as_deref()))
        {
            let what = format!(
                "grant {} of repository {:?}",
                g.id,
                g.repository.as_deref().unwrap_or("-")
            );
            let _ = self.store.forget_delivery(source, id).await;
            return Err(self
                .hook_refuse(with_job(ev, &job), out_of_scope(what))
                .await);
        }

        // 5. Revoke them.
        let actor = format!("webhook:{source}");
        let report = HookReport {
            matched: grants.len(),
            tally: self
                .revoke_grants(
                    grants.iter().map(|g| g.id).collect(),
                    PARALLELISM,
                    &actor,
                    ctx,
                )
                .await,
        };

        // 6. One summary event.
        let mut ev = with_job(ev, &job);
        ev.outcome = if report.tally.failures.is_empty() {
            Outcome::Success
        } else {
            Outcome::Failure
        };
        ev.reason = ReasonCode::JobEnded.as_str().to_owned();
        ev.detail = Some(format!(
            "{}; job {:?} {}; matched {}, revoked {}, in progress {}, failed {}",
            ev.detail.unwrap_or_default(),
            job.job_name.as_deref().unwrap_or("-"),
            job.status.as_deref().unwrap_or("-"),
            report.matched,
            report.tally.revoked_grants,
            report.tally.already_in_progress,
            report.tally.failures.len()
        ));
        self.store.append_audit(&ev).await?;
        Ok(HookOutcome::Done(report))
    }
}

/// The (signed, hence trusted) job identity on the audit event.
fn with_job(mut ev: AuditEvent, job: &JobEnd) -> AuditEvent {
    ev.job.repository_id = Some(job.repository_id.clone());
    ev.job.repository = job.repository.clone();
    ev.job.run_id = job.run_id.clone();
    ev.job.run_attempt = job.run_attempt.clone();
    ev.job.job_id = Some(job.job_id.clone());
    ev
}

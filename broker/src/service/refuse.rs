//! Refusals and their audit events: every refused request is audited (singly or, for
//! unauthenticated ones, counted by `refusals/`); an audit write that fails turns into 503.

use super::ServiceError;
use super::{Broker, RequestCtx};
use crate::audit::{Action, AuditEvent};
use crate::metrics::{self, Stage};
use time::OffsetDateTime;

impl Broker {
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

    pub(super) fn base_event(
        &self,
        now: OffsetDateTime,
        action: Action,
        ctx: &RequestCtx,
    ) -> AuditEvent {
        let mut ev = ctx.event(now, action, "");
        // Every event records the bundle in force (revocations overwrite it with the grant's).
        ev.bundle_digest = Some(self.policies.load().digest().to_owned());
        ev
    }

    /// Audit a refusal, then return it. If the audit cannot be written, the caller gets 503.
    pub(super) async fn refuse(&self, mut ev: AuditEvent, err: ServiceError) -> ServiceError {
        ev.outcome = err.outcome();
        ev.reason = err.reason_code().to_owned();
        if ev.detail.is_none() {
            ev.detail = Some(err.to_string());
        }
        self.record_refusal(ev, err).await
    }

    /// Screen a complete refusal event (`refusals/`), write it if it gets a row, and return
    /// the error to answer with: `err`, 429 when the client is over its failure limit, or 503
    /// if the audit cannot be written.
    pub(super) async fn record_refusal(
        &self,
        mut ev: AuditEvent,
        err: ServiceError,
    ) -> ServiceError {
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
}

//! The audit event of an exchange, built in one place from what the exchange established
//! ([`ExchangeRecord`], filled in step by step) and how it ended ([`ExchangeOutcome`]).
//! Nothing else sets an exchange event's fields, so every outcome records the same things the
//! same way.

use super::{Broker, RequestCtx, ServiceError};
use crate::audit::{Action, AuditEvent, JobAttribution, Outcome};
use crate::reason::ReasonCode;
use time::{Duration, OffsetDateTime};
use uuid::Uuid;

/// What an exchange has established so far.
#[derive(Debug)]
pub(super) struct ExchangeRecord {
    pub at: OffsetDateTime,
    /// The bundle that decides this exchange.
    pub bundle_digest: String,
    /// The names as the caller wrote them, escaped (capped by the event's writers).
    pub requested: Vec<String>,
    /// From the verified job token (empty before verification).
    pub job: JobAttribution,
    pub rules_matched: Vec<String>,
    /// The grant's TTL, once decided.
    pub ttl: Option<Duration>,
    /// The grant, once its credentials' resource ids are decided.
    pub planned: Option<PlannedGrant>,
}

/// A grant decided but not (yet) issued.
#[derive(Debug)]
pub(super) struct PlannedGrant {
    pub id: Uuid,
    pub resource_ids: Vec<String>,
    pub expires_at: OffsetDateTime,
}

/// How an exchange ended.
#[derive(Debug)]
pub(super) enum ExchangeOutcome<'a> {
    /// Refused, or failed before anything was issued; `detail` is recorded (else the error's
    /// text).
    Refused {
        error: &'a ServiceError,
        detail: Option<String>,
    },
    /// Every requested credential issued; the grant lives until `expires_at`.
    Issued {
        granted: &'a [String],
        expires_at: OffsetDateTime,
    },
    /// Minted, but the store could not activate the grant: what was minted was revoked.
    Undone { expires_at: OffsetDateTime },
}

impl Broker {
    /// The one audit event of an exchange.
    pub(super) fn exchange_event(
        &self,
        ctx: &RequestCtx,
        rec: &ExchangeRecord,
        outcome: ExchangeOutcome<'_>,
    ) -> AuditEvent {
        let mut ev = self.base_event(rec.at, Action::Exchange, ctx);
        ev.bundle_digest = Some(rec.bundle_digest.clone());
        ev.credentials_requested = rec.requested.clone();
        ev.job = rec.job.clone();
        ev.rules_matched = rec.rules_matched.clone();
        ev.ttl_seconds = rec.ttl.map(Duration::whole_seconds);
        if let Some(g) = &rec.planned {
            ev.grant_id = Some(g.id);
            ev.resource_ids = g.resource_ids.clone();
            ev.expires_at = Some(g.expires_at);
        }
        match outcome {
            ExchangeOutcome::Refused { error, detail } => {
                ev.outcome = error.outcome();
                ev.reason = error.reason_code().to_owned();
                ev.detail = Some(detail.unwrap_or_else(|| error.to_string()));
            }
            ExchangeOutcome::Issued {
                granted,
                expires_at,
            } => {
                ev.outcome = Outcome::Allow;
                ev.reason = ReasonCode::Ok.as_str().to_owned();
                ev.credentials_granted = granted.to_vec();
                ev.expires_at = Some(expires_at);
            }
            ExchangeOutcome::Undone { expires_at } => {
                ev.outcome = Outcome::Error;
                ev.reason = ReasonCode::StoreUnavailable.as_str().to_owned();
                ev.expires_at = Some(expires_at);
            }
        }
        ev
    }

    /// Audit a refused exchange (see [`Broker::record_refusal`]), then return the error.
    pub(super) async fn refuse_exchange(
        &self,
        ctx: &RequestCtx,
        rec: &ExchangeRecord,
        error: ServiceError,
        detail: Option<String>,
    ) -> ServiceError {
        let ev = self.exchange_event(
            ctx,
            rec,
            ExchangeOutcome::Refused {
                error: &error,
                detail,
            },
        );
        self.record_refusal(ev, error).await
    }
}

//! `GET /v1/audit/stream`: the audit log as it grows, for SIEMs and log shippers. Opening a
//! stream is checked (nothing pruned after the resume point) and audited; each page is read in
//! chain order and checked against a prune that may have run meanwhile, so a consumer gets
//! every event after its resume point exactly once or is told that some are gone.

use super::{Broker, RequestCtx};
use crate::admin::{AdminError, Operator};
use crate::audit::stream::ChainedEvent;
use crate::reason::ReasonCode;
use crate::store::StoreError;

/// The next part of an audit stream.
#[derive(Debug)]
pub enum StreamPage {
    /// Events after the cursor, in chain order (empty: caught up).
    Events(Vec<ChainedEvent>),
    /// Events after the cursor were pruned through this sequence number.
    Gap { pruned_through: i64 },
}

impl Broker {
    /// Check that the stream can resume after `after` and audit its opening.
    pub async fn audit_stream_open(
        &self,
        op: &Operator,
        after: i64,
        follow: bool,
        ctx: &RequestCtx,
    ) -> Result<(), AdminError> {
        let mut ev = self.admin_event(ctx, ReasonCode::AuditStream);
        ev.actor = Some(op.actor());
        let gap = self
            .store
            .audit_pruned_through()
            .await?
            .filter(|cut| *cut > after);
        ev.detail = Some(format!(
            "after {after}{}{}",
            if follow { ", follow" } else { "" },
            gap.map_or(String::new(), |c| format!("; refused: pruned through {c}"))
        ));
        ev.outcome = if gap.is_some() {
            crate::audit::Outcome::Failure
        } else {
            crate::audit::Outcome::Success
        };
        self.admin_audit(&ev).await?;
        match gap {
            Some(pruned_through) => Err(AdminError::AuditGap { pruned_through }),
            None => Ok(()),
        }
    }

    /// Up to `limit` events after `after`, or the gap a prune left meanwhile.
    pub async fn audit_stream_next(
        &self,
        after: i64,
        limit: u32,
    ) -> Result<StreamPage, StoreError> {
        let events = self.store.audit_after(after, limit).await?;
        let Some(cut) = self
            .store
            .audit_pruned_through()
            .await?
            .filter(|cut| *cut > after)
        else {
            return Ok(StreamPage::Events(events));
        };
        // A prune cut past the cursor committed around this read. If the page still holds an
        // event the prune deletes, it was read before the prune: it is whole from `after`.
        match events.first() {
            Some(first) if first.seq <= cut => Ok(StreamPage::Events(events)),
            _ => Ok(StreamPage::Gap {
                pruned_through: cut,
            }),
        }
    }

    /// The `source` of the stream's CloudEvents: the broker's public URL.
    pub fn audit_source(&self) -> &str {
        self.api_tokens.issuer()
    }
}

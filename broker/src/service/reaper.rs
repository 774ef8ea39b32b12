//! The reaper round, run by every replica: claim due grants (expired, crashed mid-exchange,
//! failed revocations due for a retry) and revoke them through the one revoke path.

use super::revoke::{Revocation, RevokeTarget};
use super::{Broker, RequestCtx};
use crate::store::StoreError;
use std::sync::Arc;

impl Broker {
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
            .map(|c| self.revoke_grant(RevokeTarget::Claimed(c), "reaper", &ctx));
        for r in futures::future::join_all(futs).await {
            if let Revocation::Failed { reason, .. } = r {
                tracing::debug!(reason, "reaper: a revocation is pending retry");
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
}

//! The broker's own signed audit checkpoints (`audit.checkpoints`, see `audit/export.rs`).
//! Every replica ticks; under a store-wide lock, a checkpoint is taken only when the newest one
//! is older than the period, so the cluster takes one per period whatever its size.

use super::Broker;
use crate::audit::checkpoint::{CheckpointError, CheckpointKind};
use crate::audit::export::{self, CheckpointSchedule, ExportError};
use crate::store::StoreError;
use std::sync::Arc;

/// Why a scheduled checkpoint was not taken, or not exported everywhere.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointRunError {
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error(transparent)]
    Sign(#[from] CheckpointError),
    /// Taken and stored, but a destination did not get it.
    #[error("checkpoint at seq {seq} taken, but not exported: {error}")]
    Export { seq: i64, error: ExportError },
}

impl Broker {
    /// Take checkpoints on `schedule` until `shutdown`.
    pub async fn run_checkpoints(
        self: Arc<Self>,
        schedule: CheckpointSchedule,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        if !schedule.enabled() {
            let _ = shutdown.changed().await;
            return;
        }
        let client = crate::outbound::Outbound::new(std::time::Duration::from_secs(10))
            .build()
            .ok();
        // Look at least every minute, so a replica that starts after a long outage catches up
        // soon; the store decides whether one is due.
        let period = std::time::Duration::try_from(schedule.every)
            .unwrap_or(std::time::Duration::from_secs(3600))
            .min(std::time::Duration::from_secs(60));
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    let result = self.checkpoint_if_due(&schedule, client.as_ref()).await;
                    let label = match &result {
                        Ok(None) => continue,
                        Ok(Some(_)) => "ok",
                        Err(CheckpointRunError::Export { .. }) => "export_failed",
                        Err(_) => "failed",
                    };
                    crate::metrics::audit_checkpoint(label);
                    if let Err(e) = result {
                        tracing::warn!(error = %e, "scheduled audit checkpoint");
                    }
                }
                _ = shutdown.changed() => break,
            }
        }
    }

    /// Take, sign and export a checkpoint if the newest export checkpoint is older than the
    /// period (or there is none). Returns the checkpoint's `seq` when one was taken.
    pub async fn checkpoint_if_due(
        &self,
        schedule: &CheckpointSchedule,
        client: Option<&reqwest::Client>,
    ) -> Result<Option<i64>, CheckpointRunError> {
        let now = self.clock.now();
        let taken = self
            .store
            .locked("audit_checkpoint_schedule", async {
                let newest = self.store.newest_checkpoint(CheckpointKind::Export).await?;
                if newest.is_some_and(|c| now - c.created_at < schedule.every) {
                    return Ok(None);
                }
                self.store.audit_checkpoint(now).await.map(Some)
            })
            .await??;
        let Some(cp) = taken else {
            return Ok(None);
        };
        let jwt =
            crate::audit::checkpoint::sign(self.api_tokens.keys(), self.api_tokens.issuer(), &cp)?;
        if schedule.log {
            tracing::info!(
                seq = cp.seq,
                events = cp.event_count,
                chain_head = %cp.hash,
                checkpoint = %jwt,
                "audit checkpoint"
            );
        }
        let export_err = |error| CheckpointRunError::Export { seq: cp.seq, error };
        if let Some(dir) = &schedule.export_dir {
            export::write_file(dir, cp.seq, &jwt).map_err(export_err)?;
        }
        if let Some(url) = &schedule.export_url {
            let client = client.ok_or_else(|| {
                export_err(ExportError::Post(
                    "no HTTP client could be built".to_owned(),
                ))
            })?;
            export::post(client, url, &jwt).await.map_err(export_err)?;
        }
        Ok(Some(cp.seq))
    }
}

//! What a delivery answers. The delivery's life is `service/webhook.rs`.

use crate::admin::RevokeTally;
use serde::Serialize;

/// What one acted-on delivery did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct HookReport {
    /// Active grants of the job.
    pub matched: usize,
    /// What became of them.
    #[serde(flatten)]
    pub tally: RevokeTally,
}

/// The answer to a delivery that was not refused.
#[derive(Debug, Clone)]
pub enum HookOutcome {
    /// Verified, but nothing to do (why).
    Ignored(&'static str),
    /// A job ended; its grants were handled.
    Done(HookReport),
}

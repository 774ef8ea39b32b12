//! Walking the audit hash chain over the stored rows (see `chain.rs` for what a walk checks):
//! from the newest prune cut, in pages, each page one bounded store call, so a long log is not
//! cut off by the per-call timeout.

use super::chain::{self, BreakKind, ChainAnchor, ChainBreak, ChainReport};
use super::db::Backend;
use super::{StoreError, audit_log, bounded};

/// See `Store::verify_audit_chain_through`.
pub(super) async fn verify_through(
    db: &Backend,
    anchor: Option<&ChainAnchor>,
) -> Result<ChainReport, StoreError> {
    let head = bounded(audit_log::chain_head(db)).await?;
    let base = match bounded(audit_log::last_prune_checkpoint(db)).await? {
        Some(cp) => chain::ChainBase {
            seq: Some(cp.seq),
            hash: cp.hash,
            count: cp.event_count,
        },
        None => chain::ChainBase::genesis(),
    };
    let mut walker = chain::Walker::new(head, base.clone());
    if let Some(a) = anchor {
        walker = walker.with_anchor(a.clone());
        if a.count > 0 && base.seq.is_some_and(|cut| a.seq <= cut) {
            // Before the cut the events are gone: the checkpoint must be consistent with the
            // cut (no more events than it covers) and held by the append-only record.
            if a.count <= base.count && bounded(audit_log::checkpoint_recorded(db, a)).await? {
                walker.anchor_met_at_cut();
            } else {
                let b = ChainBreak {
                    kind: BreakKind::Deleted,
                    seq: a.seq,
                    event_id: String::new(),
                    message: format!(
                        "the checkpoint (seq {}, {} events) lies in the pruned range but no \
                         stored checkpoint matches it: the log was cut or rewritten",
                        a.seq, a.count
                    ),
                };
                return Ok(walker.report(Some(b)));
            }
        }
    }
    let mut after = walker.start_after();
    loop {
        let rows = bounded(audit_log::chain_page(db, after, chain::VERIFY_PAGE)).await?;
        let Some(last) = rows.last() else { break };
        after = last.seq;
        for row in &rows {
            match walker.check(row) {
                chain::Check::Ok => {}
                chain::Check::Broken(b) => return Ok(walker.report(Some(b))),
                chain::Check::Link { row, prev } => {
                    let found = bounded(audit_log::event_with_hash(db, &prev)).await?;
                    return Ok(walker.report(Some(chain::link_break(&row, found))));
                }
            }
        }
    }
    if let Some(head_hash) = walker.tail_mismatch() {
        let found = bounded(audit_log::event_with_hash(db, &head_hash)).await?;
        return Ok(walker.report(Some(walker.tail_break(found))));
    }
    let broken = walker.anchor_break();
    Ok(walker.report(broken))
}

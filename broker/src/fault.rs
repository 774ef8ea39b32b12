//! Test-only fault points. With the `fault-injection` feature, `BROKER_FAULT_POINT=<name>` makes
//! the process abort at that point (as if killed), so end-to-end tests can prove that a crash at
//! any step leaves nothing orphaned. Without the feature this compiles to nothing.
//!
//! Points (in the order one exchange and one revocation pass them; `integration/tests/suite/faults.rs`
//! kills the broker at each): `after_intent` (grant `issuing` committed, nothing minted),
//! `after_mint` (minted, not finalised), `after_activate` (grant `active`, response not sent),
//! `before_revoke` (grant claimed `revoking`, nothing revoked), `after_revoke` (revoked at the
//! target, grant not finished).

/// Abort the process here if this point was chosen (feature `fault-injection` only).
#[inline]
pub fn point(_name: &str) {
    #[cfg(feature = "fault-injection")]
    if std::env::var("BROKER_FAULT_POINT").is_ok_and(|v| v == _name) {
        eprintln!("fault injection: aborting at {_name}");
        std::process::abort();
    }
}

//! The end-to-end suite, one test binary: each module was once a binary of its own and drives
//! the real `broker` binary (built by `scripts/test`) through the shared harness of the
//! `integration` crate. One binary means one link instead of fifteen.
//!
//! Run one part with a module filter, e.g. `cargo test -p integration --test suite faults::`;
//! the benchmarks and the long load run are `#[ignore]`d (`bench::`, `audit_scale::`,
//! `load::load_long`: run them with `-- --ignored --nocapture`). Whole API answers are held as
//! insta snapshots in `snapshots/`; after an intended change of one, review the new file
//! (`cargo insta review`, or rerun with `INSTA_UPDATE=always` and read the diff).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a failed expectation is a failed test

mod adversarial;
mod audit_retention;
mod audit_scale;
mod audit_stream;
mod aws_sts;
mod bench;
mod e2e;
mod faults;
mod github_app;
mod hostile;
mod leaks;
mod load;
mod oauth;
mod pipelines;
mod policy_diff;
mod postgres_provider;
mod replicas;
mod revoke_all_mixed;
mod ssh_cert;
mod static_client;
mod telemetry;
mod webhooks;

//! broker: verify CI job OIDC tokens, decide with CEL policies, mint job-scoped credentials,
//! revoke them when the job ends, and audit every decision. See ARCHITECTURE.md for the map.
#![forbid(unsafe_code)]

/// The version `broker --version` prints: `BROKER_VERSION` at build time (the image build
/// passes the release and git sha), else the crate version.
pub const VERSION: &str = match option_env!("BROKER_VERSION") {
    Some(v) => v,
    None => env!("CARGO_PKG_VERSION"),
};

pub mod admin;
pub mod app;
pub mod audit;
pub mod client;
pub mod config;
pub mod dev;
pub mod fault;
#[cfg(any(test, feature = "testkit"))]
pub mod fuzzing;
pub mod http;
pub mod leaks;
pub mod metrics;
pub mod oidc;
pub mod outbound;
pub mod policy;
pub mod providers;
pub mod reason;
pub mod refusals;
pub mod secret;
pub mod secret_format;
pub mod service;
pub mod store;
pub mod telemetry;
pub mod time;
pub mod webhooks;

//! broker: verify CI job OIDC tokens, decide with CEL policies, mint job-scoped credentials,
//! revoke them when the job ends, and audit every decision. See ARCHITECTURE.md for the map.
#![forbid(unsafe_code)]

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
pub mod oidc;
pub mod policy;
pub mod providers;
pub mod secret;
pub mod service;
pub mod store;
pub mod time;

//! Harness for the end-to-end suite (`tests/suite/`): start the real `broker` binary against a
//! fresh database and local OIDC issuers, talk to it over HTTP, and stop every process it
//! started by PID when the test ends. One module per concern:
//!
//! - [`broker_process`]: the broker's config file and process ([`BrokerSetup`], [`BrokerProcess`]);
//! - [`issuer`]: the example job's claims and tokens, `issuers:` YAML, the example policies;
//! - [`pg`]: the Postgres test server as a credential target ([`pg::PgApp`]);
//! - [`store_db`]: raw SQL against the broker's own store on either backend;
//! - [`moto`]: moto in server mode, the AWS end of the AWS tests;
//! - [`github_fake`]: a local fake of the GitHub App API calls ([`github_fake::FakeGithub`]);
//! - [`http`]: the one HTTP client builder and the broker's API calls;
//! - [`proxy`]: a TCP proxy a test cuts or stalls ([`FaultProxy`]);
//! - [`secrets`]: the leak check every test ends with ([`Secrets`]);
//! - [`sshd`]: a real OpenSSH server for the SSH certificate tests ([`sshd::Sshd`]);
//! - [`tools`]: outside tools some tests drive (gitlab-ci-local);
//! - [`wait`]: free ports, bounded polling, numbers from the environment, percentiles.

pub mod broker_process;
pub mod github_fake;
pub mod http;
pub mod issuer;
pub mod leak_keys;
pub mod moto;
pub mod pg;
pub mod proxy;
pub mod secrets;
pub mod sshd;
pub mod store_db;
pub mod tools;
pub mod wait;

pub use broker_process::{
    BrokerProcess, BrokerSetup, CliRun, PUBLIC_URL, broker_bin, broker_cli, write_signing_key,
};
pub use issuer::{
    AUD, acme_api_claims, acme_token, acme_token_with, example_issuers_yaml, example_policies,
    github_issuer_yaml, github_policies, gitlab_id_token, gitlab_issuer_yaml, repo_root,
};
pub use pg::PgRoleTarget;
pub use proxy::{FaultProxy, ProxyMode};
pub use secrets::{SECRET_FIELDS, Secrets, dump_store};
pub use wait::free_port;

/// A random tag for the names a test creates outside its own database (Postgres roles, AWS
/// roles): `prefix` and 8 hex digits, `[a-z0-9_]` only, so names built from it need no quoting
/// care and parallel tests never share one.
pub fn tag(prefix: &str) -> String {
    format!(
        "{prefix}{:08x}",
        (uuid::Uuid::new_v4().as_u128() >> 64) as u32
    )
}

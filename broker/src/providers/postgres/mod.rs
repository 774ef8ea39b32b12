//! Postgres provider: a database user that exists for one CI job.
//!
//! - `config`: the `targets.postgres.<name>` section of the broker config (keys, defaults, checks).
//! - `spec`: the `postgres:` keys of a credential definition.
//! - `naming`: role names (deterministic from the grant, `[a-z0-9_]`, ≤ 63 bytes, prefixed).
//! - `scram`: random passwords and the SCRAM-SHA-256 verifier sent instead of them.
//! - `sql`: identifier/literal quoting and the extra-statement templates.
//! - `provider`: pools per target, mint (`CREATE ROLE … VALID UNTIL`) and revoke (NOLOGIN →
//!   terminate sessions → REASSIGN/DROP OWNED in every touched database → DROP ROLE).

pub mod config;
pub mod naming;
pub mod provider;
pub mod scram;
pub mod spec;
pub mod sql;

pub use provider::{PostgresConfigError, PostgresProvider};
pub use spec::PostgresSpec;

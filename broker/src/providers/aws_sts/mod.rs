//! AWS STS provider: an AWS session that exists for one CI job, with revocation.
//!
//! - `config`: the `targets.aws.<name>` section of the broker config (keys, defaults, checks).
//! - `spec`: the `aws_sts:` keys of a credential definition (role ARN, region, policies).
//! - `naming`: resource ids, role session names / source identities, session tags.
//! - `session_policy`: the inline session policy template (JSON over claims, size-checked).
//! - `deny`: the broker-owned deny policy on each role (per-session denies, revoke-all,
//!   pruning, IAM's size limit).
//! - `provider`: `AssumeRole` with the broker's own identity; revoke by `PutRolePolicy`.

pub mod config;
pub mod deny;
pub mod naming;
pub mod provider;
pub mod session_policy;
pub mod spec;

pub use provider::{AwsConfigError, AwsStsProvider};
pub use spec::AwsStsSpec;

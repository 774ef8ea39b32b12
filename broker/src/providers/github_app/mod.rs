//! GitHub App installation tokens (`kind: github_app`): the broker holds a GitHub App's private
//! key and mints installation access tokens restricted to the repositories and permissions the
//! policy names (and, within them, the job asks for), revoking them at the grant's end with
//! `DELETE /installation/token`. See docs/providers/github_app.md.

pub mod config;
mod permissions;
mod provider;
mod spec;

pub use config::GithubAppConfig;
pub use permissions::{Level, check_permission};
pub use provider::GithubAppProvider;
pub use spec::GithubAppSpec;

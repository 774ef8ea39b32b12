//! `broker require`: fail unless `broker exchange --out-dir` ran in this job and its `env` file
//! was sourced (the GitLab component's script runs it first).

use super::exit::{Exit, Outcome};
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub struct RequireArgs {
    /// The directory `broker exchange --out-dir` wrote.
    #[arg(long, env = "BROKER_SECRETS_DIR")]
    secrets_dir: Option<PathBuf>,
}

pub fn run(args: RequireArgs) -> Outcome {
    match broker::client::require_exchanged(
        args.secrets_dir.as_deref(),
        super::env_var("BROKER_GRANT_ID").as_deref(),
    ) {
        Ok(grant) => {
            eprintln!("broker: credentials of grant {grant} are in place");
            Ok(Exit::Ok)
        }
        Err(e) => Ok(super::job::exit_of(&e)),
    }
}

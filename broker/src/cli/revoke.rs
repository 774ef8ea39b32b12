//! `broker revoke`: revoke the grant of `broker exchange` (run when the job ends, also after a
//! failure).

use super::exit::{Exit, Outcome};
use super::job::{ClientArgs, exit_of, notice};
use broker::secret::Sensitive;
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub struct RevokeArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// Read the revocation token from this file.
    #[arg(long)]
    revocation_file: Option<PathBuf>,
    /// Read the revocation token from this environment variable.
    #[arg(long, default_value = "BROKER_REVOCATION_TOKEN")]
    revocation_env: String,
}

pub async fn run(args: RevokeArgs) -> Outcome {
    let client = args.client.client()?;
    let token = match &args.revocation_file {
        Some(f) => match std::fs::read_to_string(f) {
            Ok(t) => Some(t.trim().to_owned()),
            Err(e) => {
                eprintln!("error: {}: {e} [io_error]", f.display());
                return Ok(Exit::Failed);
            }
        },
        None => super::env_var(&args.revocation_env).map(|t| t.trim().to_owned()),
    };
    let Some(token) = token.filter(|t| !t.is_empty()) else {
        eprintln!(
            "error: no revocation token (give --revocation-file or set {}) [no_token]",
            args.revocation_env
        );
        return Ok(Exit::Refused);
    };
    match client.revoke(&Sensitive::new(token), &notice()).await {
        Ok(status) => {
            eprintln!("broker: grant {status}");
            Ok(Exit::Ok)
        }
        Err(e) => Ok(exit_of(&e)),
    }
}

//! `broker operator-token` and `broker keygen`: new secrets for the config, printed or written
//! to a new 0600 file.

use super::exit::{Exit, Outcome};
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub struct OperatorTokenArgs {
    /// Write the token here (mode 0600) instead of stdout.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// A new operator token and the hash that goes under `operators:`.
pub fn operator_token(args: OperatorTokenArgs) -> Outcome {
    let (token, hash) = broker::admin::operators::new_token();
    match args.out {
        Some(path) => {
            super::write_new_private(&path, &format!("{}\n", token.expose()))?;
            eprintln!("wrote the token to {}", path.display());
        }
        None => println!("token:        {}", token.expose()),
    }
    println!("token_sha256: {hash}");
    eprintln!(
        "add to the config: operators: [{{name: <who>, role: admin|auditor, token_sha256: {hash}}}]"
    );
    Ok(Exit::Ok)
}

#[derive(Args)]
pub struct KeygenArgs {
    /// Write here (mode 0600) instead of stdout.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// A new Ed25519 signing key (PKCS#8 PEM) for API tokens.
pub fn keygen(args: KeygenArgs) -> Outcome {
    let pem = broker::providers::api_token::generate_pem()?;
    match args.out {
        Some(path) => {
            super::write_new_private(&path, pem.expose())?;
            eprintln!("wrote {}", path.display());
        }
        None => print!("{}", pem.expose()),
    }
    Ok(Exit::Ok)
}

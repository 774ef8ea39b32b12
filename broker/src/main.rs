//! The `broker` command: parse the command line and hand it to its subcommand in `cli/`.
#![forbid(unsafe_code)]

mod cli;

use clap::{Parser, Subcommand};
use cli::exit::{Exit, Outcome};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "broker",
    version = broker::VERSION,
    about = "CI/CD OIDC token broker: job tokens in, job-scoped credentials out",
    after_help = cli::exit::HELP
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the broker from a config file (production).
    Serve(cli::serve::ServeArgs),
    /// Run on an embedded default (SQLite, built-in dev issuers), or mint a dev job token.
    Dev(cli::dev::DevArgs),
    /// Apply store migrations and exit.
    Migrate(cli::migrate::MigrateArgs),
    /// Check, test and explain policy files.
    Policy(cli::policy::PolicyArgs),
    /// Read the audit log.
    Audit(cli::audit::AuditArgs),
    /// Print a new operator token and the hash to put under `operators:` in the config.
    OperatorToken(cli::keys::OperatorTokenArgs),
    /// Break glass: call the operator API of a running broker.
    Admin(cli::admin::AdminArgs),
    /// Report leaked broker secrets: live ones are revoked at once (operator API).
    Leak(cli::leak::LeakArgs),
    /// Exchange this CI job's OIDC token for credentials (run inside the job).
    Exchange(cli::exchange::ExchangeArgs),
    /// Revoke the grant of `broker exchange` (run when the job ends, also after failure).
    Revoke(cli::revoke::RevokeArgs),
    /// Fetch an SSH CA's key revocation list into sshd's `RevokedKeys` file (run on each host
    /// from a timer).
    SshKrl(cli::ssh_krl::SshKrlArgs),
    /// Fail unless `broker exchange --out-dir` ran in this job and its `env` file was sourced
    /// (the GitLab component's script runs it first).
    Require(cli::require::RequireArgs),
    /// Generate an Ed25519 signing key (PKCS#8 PEM) for API tokens.
    Keygen(cli::keys::KeygenArgs),
}

async fn run(cmd: Cmd) -> Outcome {
    match cmd {
        Cmd::Serve(a) => cli::serve::run(a).await,
        Cmd::Dev(a) => cli::dev::run(a).await,
        Cmd::Migrate(a) => cli::migrate::run(a).await,
        Cmd::Policy(a) => cli::policy::run(a).await,
        Cmd::Audit(a) => cli::audit::run(a).await,
        Cmd::OperatorToken(a) => cli::keys::operator_token(a),
        Cmd::Admin(a) => cli::admin::run(a).await,
        Cmd::Leak(a) => cli::leak::run(a).await,
        Cmd::Exchange(a) => cli::exchange::run(a).await,
        Cmd::Revoke(a) => cli::revoke::run(a).await,
        Cmd::SshKrl(a) => cli::ssh_krl::run(a).await,
        Cmd::Require(a) => cli::require::run(a),
        Cmd::Keygen(a) => cli::keys::keygen(a),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return Exit::Failed.into();
        }
    };
    match rt.block_on(run(cli.cmd)) {
        Ok(exit) => exit.into(),
        Err(failure) => {
            eprintln!("error: {failure}");
            failure.exit.into()
        }
    }
}

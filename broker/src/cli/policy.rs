//! `broker policy`: check, test, explain and diff policy files; print their JSON Schema.

use super::exit::{Exit, ExitOnError, Outcome};
use anyhow::Context;
use broker::policy::{cli, diff};
use clap::{Args, Subcommand};
use std::path::PathBuf;

#[derive(Args)]
pub struct PolicyArgs {
    #[command(subcommand)]
    cmd: PolicyCmd,
}

#[derive(Subcommand)]
enum PolicyCmd {
    /// Compile every policy and lint it (exit 1 on errors; lint findings are warnings).
    Check {
        #[arg(default_value = "policies")]
        dir: PathBuf,
        /// Issuer names that exist (default: any).
        #[arg(long = "issuer")]
        issuers: Vec<String>,
    },
    /// Run the test cases in the policy files (exit 1 on a failure).
    Test {
        #[arg(default_value = "policies")]
        dir: PathBuf,
    },
    /// Show which rules match a claim set, and why the others do not.
    Explain {
        #[arg(long, default_value = "policies")]
        dir: PathBuf,
        /// JSON file with the token's claims.
        #[arg(long)]
        claims: PathBuf,
        /// Configured issuer name the claims come from.
        #[arg(long, default_value = "github")]
        issuer: String,
        #[arg(long, default_value = "github")]
        platform: String,
    },
    /// Show what a policy change does to access (exit 0: not widened, 10: widened, 2: error).
    ///
    /// An error is 2, or 3 (refused) / 4 (unavailable) when the --audit-url broker does not
    /// answer with the audit log.
    Diff(DiffArgs),
    /// Print the JSON Schema of policy files.
    Schema,
}

#[derive(Args)]
struct DiffArgs {
    /// Base: a directory, `REV:PATH` or `git:REV` (the policy directory at a git revision).
    base: String,
    /// Head: same forms as BASE.
    head: String,
    /// markdown (for a review comment) or json.
    #[arg(long, default_value = "markdown")]
    format: cli::DiffFormat,
    /// Path of the policy directory in the repository, for `git:REV`.
    #[arg(long, default_value = "policies")]
    policy_path: String,
    /// Add the jobs recorded in this broker's audit log to the corpus (GET /v1/audit).
    #[arg(long, requires = "auditor_token_file")]
    audit_url: Option<String>,
    /// File holding an operator token with the auditor (or admin) role.
    #[arg(long)]
    auditor_token_file: Option<PathBuf>,
    /// Audit events at or after this time (RFC 3339).
    #[arg(long)]
    audit_since: Option<String>,
    /// Most audit events read.
    #[arg(long, default_value_t = 5000)]
    audit_max: usize,
}

pub async fn run(args: PolicyArgs) -> Outcome {
    let mut out = std::io::stdout();
    let ok = match args.cmd {
        PolicyCmd::Check { dir, issuers } => {
            let known = (!issuers.is_empty()).then(|| issuers.into_iter().collect());
            cli::check(&dir, known, &mut out)
        }
        PolicyCmd::Test { dir } => cli::test(&dir, &mut out),
        PolicyCmd::Schema => cli::schema(&mut out),
        PolicyCmd::Diff(a) => return run_diff(a).await,
        PolicyCmd::Explain {
            dir,
            claims,
            issuer,
            platform,
        } => {
            let platform = match platform.as_str() {
                "gitlab" => broker::oidc::Platform::Gitlab,
                _ => broker::oidc::Platform::Github,
            };
            // `FILE: error`, as before there was a table of exit codes.
            let shown = || claims.display().to_string();
            let text = std::fs::read_to_string(&claims)
                .with_context(shown)
                .exit(Exit::Usage)?;
            let v = serde_json::from_str(&text)
                .with_context(shown)
                .exit(Exit::Usage)?;
            cli::explain(&dir, &v, &issuer, platform, &mut out)
        }
    };
    Ok(if ok { Exit::Ok } else { Exit::Failed })
}

/// Materialise both sides, gather audit seeds, diff. An error is never [`Exit::Ok`], so CI never
/// mistakes it for "not widened"; it is [`Exit::Usage`] unless the broker refused the auditor
/// token ([`Exit::Refused`]) or was unavailable ([`Exit::Unavailable`]).
async fn run_diff(a: DiffArgs) -> Outcome {
    let repo = std::path::Path::new(".");
    let base = diff::source::resolve(&a.base, repo, &a.policy_path).exit(Exit::Usage)?;
    let head = diff::source::resolve(&a.head, repo, &a.policy_path).exit(Exit::Usage)?;
    let mut seeds = Vec::new();
    if let (Some(url), Some(token_file)) = (&a.audit_url, &a.auditor_token_file) {
        let token = broker::admin::client::read_token(token_file).exit(Exit::Usage)?;
        let mut filters = Vec::new();
        if let Some(s) = &a.audit_since {
            filters.push(("since".to_owned(), s.clone()));
        }
        let mut seen = std::collections::HashSet::new();
        let outcome =
            broker::admin::audit_client::query(url, &token, &filters, None, a.audit_max, |ev| {
                // Exchanges carry the claims of the job that asked; other actions repeat them.
                if ev.action != broker::audit::Action::Exchange {
                    return Ok(());
                }
                if let Some(seed) = diff::corpus::audit_seed(&ev.job) {
                    let key = format!(
                        "{}\u{0}{}",
                        seed.issuer,
                        serde_json::Value::Object(seed.claims.clone())
                    );
                    if seen.insert(key) {
                        seeds.push(seed);
                    }
                }
                Ok(())
            })
            .await
            .map_err(super::audit::query_failure)?;
        eprintln!(
            "{} audit event(s) read, {} distinct job(s)",
            outcome.fetched,
            seeds.len()
        );
    }
    let mut out = std::io::stdout();
    Ok(
        match cli::diff(&base.dir, &head.dir, &seeds, a.format, &mut out) {
            diff::EXIT_NOT_WIDENED => Exit::Ok,
            diff::EXIT_WIDENED => Exit::Widened,
            _ => Exit::Usage,
        },
    )
}

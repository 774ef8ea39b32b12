//! `broker dev`: run on the embedded default (SQLite, built-in dev issuers), or print a job
//! token signed by the built-in dev issuer.

use super::exit::{Exit, ExitOnError, Outcome, usage};
use clap::{Args, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Args)]
pub struct DevArgs {
    #[command(subcommand)]
    cmd: Option<DevCmd>,
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Where the SQLite store lives (default: a new temp dir).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    #[arg(long, default_value = "policies")]
    policies: PathBuf,
}

#[derive(Subcommand)]
enum DevCmd {
    /// Print a job token signed by the built-in dev issuer (GitHub-shaped; --gitlab for GitLab).
    Token(DevTokenArgs),
}

#[derive(Args)]
struct DevTokenArgs {
    /// GitHub `repository` / GitLab `project_path`.
    #[arg(long, default_value = "acme/api")]
    repo: String,
    /// Default: 1000001 (GitHub) / 2000001 (GitLab), as in the example policies.
    #[arg(long)]
    repo_id: Option<u64>,
    /// Default: 9000001 (GitHub) / 3000001 (GitLab).
    #[arg(long)]
    owner_id: Option<u64>,
    #[arg(long = "ref", default_value = "refs/heads/main")]
    git_ref: String,
    /// GitHub `event_name` / GitLab `pipeline_source`.
    #[arg(long, default_value = "push")]
    event: String,
    #[arg(long)]
    environment: Option<String>,
    #[arg(long, default_value = "octocat")]
    actor: String,
    #[arg(long, default_value = broker::dev::DEV_AUDIENCE)]
    audience: String,
    /// Token lifetime.
    #[arg(long, default_value = "5m")]
    ttl: String,
    /// A GitLab-shaped token instead.
    #[arg(long)]
    gitlab: bool,
}

pub async fn run(args: DevArgs) -> Outcome {
    match &args.cmd {
        Some(DevCmd::Token(t)) => print!("{}", token(t)?),
        None => serve(args).await?,
    }
    Ok(Exit::Ok)
}

async fn serve(args: DevArgs) -> Result<(), super::exit::Failure> {
    broker::app::init_logging(broker::config::LogFormat::Text, "info");
    // Keep the temp dir for the life of the process (and remove it at exit).
    let (_tmp, data_dir) = match args.data_dir {
        Some(d) => {
            std::fs::create_dir_all(&d)?;
            (None, d)
        }
        None => {
            let t = tempfile::Builder::new().prefix("broker-dev-").tempdir()?;
            let p = t.path().to_path_buf();
            (Some(t), p)
        }
    };
    if !args.policies.is_dir() {
        return Err(usage(format_args!(
            "policy directory {} not found: run from the repository root or pass --policies DIR",
            args.policies.display()
        )));
    }
    let cfg = broker::dev::config(args.listen, &data_dir, args.policies).exit(Exit::Usage)?;
    let dir = data_dir.clone();
    broker::app::serve(cfg, move |addr| {
        println!("{}", broker::dev::quickstart(addr, &dir))
    })
    .await?;
    Ok(())
}

fn token(t: &DevTokenArgs) -> Result<String, super::exit::Failure> {
    use broker::oidc::dev;
    let ttl = broker::time::parse_duration(&t.ttl).exit(Exit::Usage)?;
    let owner = t.repo.split('/').next().unwrap_or("acme").to_owned();
    let job = dev::DevJob {
        repository: t.repo.clone(),
        repository_id: t
            .repo_id
            .unwrap_or(if t.gitlab { 2_000_001 } else { 1_000_001 }),
        owner,
        owner_id: t
            .owner_id
            .unwrap_or(if t.gitlab { 3_000_001 } else { 9_000_001 }),
        git_ref: t.git_ref.clone(),
        event_name: t.event.clone(),
        environment: t.environment.clone(),
        workflow: "deploy".into(),
        actor: t.actor.clone(),
        run_id: 4242,
        audience: t.audience.clone(),
        ttl,
        now: broker::time::Clock::now(&broker::time::SystemClock),
    };
    let claims = if t.gitlab {
        dev::gitlab_claims(&job)
    } else {
        dev::github_claims(&job)
    };
    let token = dev::sign(&claims).map_err(|e| anyhow::anyhow!("signing: {e}"))?;
    Ok(format!("{token}\n"))
}

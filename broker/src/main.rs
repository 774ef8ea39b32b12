//! The `broker` command.
#![forbid(unsafe_code)]

use anyhow::Context;
use broker::config::Config;
use broker::store::{AuditFilter, Store};
use clap::{Args, Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "broker",
    version,
    about = "CI/CD OIDC token broker: job tokens in, job-scoped credentials out"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the broker from a config file (production).
    Serve {
        #[arg(long, short, env = "BROKER_CONFIG")]
        config: PathBuf,
    },
    /// Run on an embedded default (SQLite, built-in dev issuers), or mint a dev job token.
    Dev(DevArgs),
    /// Apply store migrations and exit.
    Migrate {
        #[command(flatten)]
        store: StoreArg,
    },
    /// Check, test and explain policy files.
    Policy {
        #[command(subcommand)]
        cmd: PolicyCmd,
    },
    /// Read the audit log.
    Audit {
        #[command(subcommand)]
        cmd: AuditCmd,
    },
    /// Print a new operator token and the hash to put under `operators:` in the config.
    OperatorToken {
        /// Write the token here (mode 0600) instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Break glass: call the operator API of a running broker.
    Admin(AdminArgs),
    /// Generate an Ed25519 signing key (PKCS#8 PEM) for API tokens.
    Keygen {
        /// Write here (mode 0600) instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Args)]
struct DevArgs {
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

#[derive(Args)]
struct AdminArgs {
    #[command(subcommand)]
    cmd: AdminCmd,
    /// The broker's base URL.
    #[arg(long, env = "BROKER_URL", global = true)]
    url: Option<String>,
    /// File holding an operator token (admin role).
    #[arg(long, env = "BROKER_OPERATOR_TOKEN_FILE", global = true)]
    token_file: Option<PathBuf>,
}

#[derive(Args)]
struct AdminFilterArgs {
    /// Why (required for revoke-all and freeze; audited).
    #[arg(long)]
    reason: Option<String>,
    #[arg(long)]
    issuer: Option<String>,
    #[arg(long)]
    repository: Option<String>,
    #[arg(long)]
    repository_id: Option<String>,
    #[arg(long)]
    credential: Option<String>,
    #[arg(long)]
    kind: Option<String>,
    /// RFC 3339 (revoke-all only).
    #[arg(long)]
    issued_after: Option<String>,
    /// RFC 3339 (revoke-all only).
    #[arg(long)]
    issued_before: Option<String>,
}

#[derive(Subcommand)]
enum AdminCmd {
    /// Revoke every active grant matching the filter.
    RevokeAll(AdminFilterArgs),
    /// Refuse new exchanges matching the filter on every replica.
    Freeze(AdminFilterArgs),
    /// Lift the freeze.
    Unfreeze {
        #[arg(long)]
        reason: Option<String>,
    },
}

#[derive(Args)]
struct StoreArg {
    /// Take the store from this config file.
    #[arg(long, short, env = "BROKER_CONFIG", conflicts_with = "store")]
    config: Option<PathBuf>,
    /// Store URL (`postgres://…` or `sqlite:PATH`).
    #[arg(long, env = "BROKER_STORE_URL")]
    store: Option<String>,
}

impl StoreArg {
    async fn open(&self) -> anyhow::Result<Store> {
        let url = match (&self.config, &self.store) {
            (_, Some(u)) => broker::secret::Sensitive::new(u.clone()),
            (Some(c), None) => Config::load(c)
                .map_err(|e| anyhow::anyhow!(e))?
                .store
                .url
                .resolve()
                .map_err(|e| anyhow::anyhow!(e))?,
            (None, None) => anyhow::bail!("give --config or --store"),
        };
        Ok(Store::connect(url.expose()).await?)
    }
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
}

#[derive(Subcommand)]
enum AuditCmd {
    /// List recent audit events, newest first.
    List {
        #[command(flatten)]
        store: StoreArg,
        #[arg(long)]
        grant: Option<uuid::Uuid>,
        #[arg(long)]
        repository: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Print JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Walk the audit hash chain; name the first modified, deleted or reordered event (exit 1).
    Verify {
        #[command(flatten)]
        store: StoreArg,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
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
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.cmd {
        Cmd::Serve { config } => {
            let cfg = Config::load(&config).map_err(|e| anyhow::anyhow!(e))?;
            broker::app::init_logging(cfg.log.format, &cfg.log.level);
            tracing::info!(config = %cfg, "starting");
            broker::app::serve(cfg, |_| {}).await?;
        }
        Cmd::Dev(args) => match args.cmd {
            Some(DevCmd::Token(t)) => print!("{}", dev_token(&t)?),
            None => run_dev(args).await?,
        },
        Cmd::Migrate { store } => {
            store.open().await?.migrate().await?;
            println!("migrations applied");
        }
        Cmd::Policy { cmd } => return Ok(policy(cmd)),
        Cmd::Audit {
            cmd:
                AuditCmd::List {
                    store,
                    grant,
                    repository,
                    limit,
                    json,
                },
        } => {
            let store = store.open().await?;
            let filter = AuditFilter {
                grant_id: grant,
                repository,
                limit,
                ..AuditFilter::default()
            };
            for ev in store.audit_events(&filter).await? {
                if json {
                    println!("{}", serde_json::to_string(&ev)?);
                } else {
                    println!(
                        "{}  {:<13} {:<7} {:<24} {:<20} {}",
                        ev.time
                            .format(&time::format_description::well_known::Rfc3339)
                            .unwrap_or_default(),
                        serde_json::to_value(ev.action)?.as_str().unwrap_or(""),
                        serde_json::to_value(ev.outcome)?.as_str().unwrap_or(""),
                        ev.reason,
                        ev.job.repository.as_deref().unwrap_or("-"),
                        ev.grant_id
                            .map(|g| g.to_string())
                            .unwrap_or_else(|| "-".into()),
                    );
                }
            }
        }
        Cmd::Audit {
            cmd: AuditCmd::Verify { store, json },
        } => {
            let report = store.open().await?.verify_audit_chain().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            }
            return Ok(match &report.broken {
                None => {
                    if !json {
                        println!(
                            "audit chain intact: {} events verified (head seq {}, hash {}); \
                             {} older events predate the chain",
                            report.events_checked,
                            report.head_seq,
                            report.head_hash,
                            report.legacy_events
                        );
                    }
                    ExitCode::SUCCESS
                }
                Some(b) => {
                    if !json {
                        println!(
                            "AUDIT CHAIN BROKEN ({}): {}",
                            b.kind.reason_code(),
                            b.message
                        );
                        println!("{} events verified before the break", report.events_checked);
                    }
                    ExitCode::FAILURE
                }
            });
        }
        Cmd::OperatorToken { out } => {
            let (token, hash) = broker::admin::operators::new_token();
            match out {
                Some(path) => {
                    write_private(&path, &format!("{}\n", token.expose()))?;
                    eprintln!("wrote the token to {}", path.display());
                }
                None => println!("token:        {}", token.expose()),
            }
            println!("token_sha256: {hash}");
            eprintln!(
                "add to the config: operators: [{{name: <who>, role: admin|auditor, token_sha256: {hash}}}]"
            );
        }
        Cmd::Admin(args) => return admin(args).await,
        Cmd::Keygen { out } => {
            let pem = broker::providers::api_token::generate_pem()?;
            match out {
                Some(path) => {
                    write_private(&path, pem.expose())?;
                    eprintln!("wrote {}", path.display());
                }
                None => print!("{}", pem.expose()),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn admin(args: AdminArgs) -> anyhow::Result<ExitCode> {
    use broker::admin::client;
    let url = args.url.context("give --url (or BROKER_URL)")?;
    let token_file = args
        .token_file
        .context("give --token-file (or BROKER_OPERATOR_TOKEN_FILE)")?;
    let token = client::read_token(&token_file).map_err(|e| anyhow::anyhow!(e))?;
    let filter_body = |f: AdminFilterArgs| {
        let mut filter = serde_json::Map::new();
        for (k, v) in [
            ("issuer", f.issuer),
            ("repository", f.repository),
            ("repository_id", f.repository_id),
            ("credential", f.credential),
            ("kind", f.kind),
            ("issued_after", f.issued_after),
            ("issued_before", f.issued_before),
        ] {
            if let Some(v) = v {
                filter.insert(k.to_owned(), serde_json::Value::String(v));
            }
        }
        serde_json::json!({"reason": f.reason.unwrap_or_default(), "filter": filter})
    };
    let (path, body) = match args.cmd {
        AdminCmd::RevokeAll(f) => ("/v1/admin/revoke-all", filter_body(f)),
        AdminCmd::Freeze(f) => ("/v1/admin/freeze", filter_body(f)),
        AdminCmd::Unfreeze { reason } => (
            "/v1/admin/unfreeze",
            serde_json::json!({"reason": reason.unwrap_or_default()}),
        ),
    };
    let (status, answer) = client::post(&url, path, &token, &body)
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    println!("{}", serde_json::to_string_pretty(&answer)?);
    let failures = answer["failures"].as_array().is_some_and(|f| !f.is_empty());
    if !(200..300).contains(&status) {
        eprintln!("error: the broker answered {status}");
        return Ok(ExitCode::FAILURE);
    }
    Ok(if failures {
        eprintln!("some revocations failed; the reaper retries them");
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    })
}

fn write_private(path: &std::path::Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

async fn run_dev(args: DevArgs) -> anyhow::Result<()> {
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
        anyhow::bail!(
            "policy directory {} not found: run from the repository root or pass --policies DIR",
            args.policies.display()
        );
    }
    let cfg = broker::dev::config(args.listen, &data_dir, args.policies)
        .map_err(|e| anyhow::anyhow!(e))?;
    let dir = data_dir.clone();
    broker::app::serve(cfg, move |addr| {
        println!("{}", broker::dev::quickstart(addr, &dir))
    })
    .await
}

fn dev_token(t: &DevTokenArgs) -> anyhow::Result<String> {
    use broker::oidc::dev;
    let ttl = broker::time::parse_duration(&t.ttl).map_err(|e| anyhow::anyhow!(e))?;
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

fn policy(cmd: PolicyCmd) -> ExitCode {
    use broker::policy::cli;
    let mut out = std::io::stdout();
    let ok = match cmd {
        PolicyCmd::Check { dir, issuers } => {
            let known = (!issuers.is_empty()).then(|| issuers.into_iter().collect());
            cli::check(&dir, known, &mut out)
        }
        PolicyCmd::Test { dir } => cli::test(&dir, &mut out),
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
            match std::fs::read_to_string(&claims)
                .map_err(|e| e.to_string())
                .and_then(|s| serde_json::from_str(&s).map_err(|e| e.to_string()))
            {
                Ok(v) => cli::explain(&dir, &v, &issuer, platform, &mut out),
                Err(e) => {
                    eprintln!("error: {}: {e}", claims.display());
                    false
                }
            }
        }
    };
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

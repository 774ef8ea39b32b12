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
    version = broker::VERSION,
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
    /// Exchange this CI job's OIDC token for credentials (run inside the job).
    Exchange(ExchangeArgs),
    /// Revoke the grant of `broker exchange` (run when the job ends, also after failure).
    Revoke(RevokeArgs),
    /// Fail unless `broker exchange --out-dir` ran in this job and its `env` file was sourced
    /// (the GitLab component's script runs it first).
    Require(RequireArgs),
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
    /// Break glass from a reviewed pipeline: authenticate with this job's OIDC token (an
    /// `operators[].oidc` rule must match it), read from this file...
    #[arg(long, global = true, conflicts_with = "token_file")]
    id_token_file: Option<PathBuf>,
    /// ...or from this environment variable (GitLab: the `id_tokens:` variable)...
    #[arg(long, global = true, conflicts_with_all = ["token_file", "id_token_file"])]
    id_token_env: Option<String>,
    /// ...or, on GitHub Actions, requested from the runner for this audience.
    #[arg(long, global = true, conflicts_with_all = ["token_file", "id_token_file", "id_token_env"])]
    id_token_audience: Option<String>,
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
struct ClientArgs {
    /// The broker's base URL.
    #[arg(long, env = "BROKER_URL")]
    broker_url: String,
    /// Tries in all, the first included (1 = no retry; 0 is refused), on network errors, 5xx
    /// and 429 (never on 401/403).
    #[arg(long, env = "BROKER_ATTEMPTS", default_value_t = 5, value_parser = parse_attempts)]
    attempts: u32,
    /// Per-request timeout.
    #[arg(long, default_value = "30s")]
    timeout: String,
}

impl ClientArgs {
    fn client(&self) -> anyhow::Result<broker::client::Client> {
        let timeout = humantime::parse_duration(&self.timeout)?;
        let mut c = broker::client::Client::new(&self.broker_url, timeout)?;
        c.retry.attempts = self.attempts;
        Ok(c)
    }
}

#[derive(Args)]
struct ExchangeArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// A credential to request; `NAME=VAR` puts its main secret in variable VAR. Repeatable.
    #[arg(
        long = "credential",
        short = 'c',
        required = true,
        value_delimiter = ','
    )]
    credentials: Vec<broker::client::CredentialRequest>,
    /// Requested lifetime (capped by policy).
    #[arg(long)]
    ttl: Option<String>,
    /// What to print on stdout: env (`export` lines), dotenv, json. Default: env, or nothing
    /// with --out-dir.
    #[arg(long)]
    format: Option<broker::client::Format>,
    /// Also write one file per variable, plus `env` and `dotenv`, into DIR (mode 0700/0600).
    #[arg(long)]
    out_dir: Option<PathBuf>,
    /// Write the revocation token to this file (mode 0600).
    #[arg(long)]
    revocation_file: Option<PathBuf>,
    /// Read the job token from this environment variable (default: BROKER_ID_TOKEN if set).
    #[arg(long, conflicts_with = "token_file")]
    token_env: Option<String>,
    /// Read the job token from this file.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Audience to request from the GitHub Actions runner when no token variable is set.
    #[arg(long, env = "BROKER_AUDIENCE")]
    audience: Option<String>,
}

/// `--attempts`: 0 would mean "never ask the broker", which no caller wants; refuse it.
fn parse_attempts(s: &str) -> Result<u32, String> {
    match s.trim().parse::<u32>() {
        Ok(0) => Err(
            "0 tries would never ask the broker: attempts counts tries in all, the \
                      first included (1 = no retry)"
                .into(),
        ),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("{s:?} is not a number of tries")),
    }
}

#[derive(Args)]
struct RequireArgs {
    /// The directory `broker exchange --out-dir` wrote.
    #[arg(long, env = "BROKER_SECRETS_DIR")]
    secrets_dir: Option<PathBuf>,
}

#[derive(Args)]
struct RevokeArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// Read the revocation token from this file.
    #[arg(long)]
    revocation_file: Option<PathBuf>,
    /// Read the revocation token from this environment variable.
    #[arg(long, default_value = "BROKER_REVOCATION_TOKEN")]
    revocation_env: String,
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
    /// Show what a policy change does to access (exit 0: not widened, 10: widened, 2: error).
    Diff(PolicyDiffArgs),
    /// Print the JSON Schema of policy files.
    Schema,
}

#[derive(Args)]
struct PolicyDiffArgs {
    /// Base: a directory, `REV:PATH` or `git:REV` (the policy directory at a git revision).
    base: String,
    /// Head: same forms as BASE.
    head: String,
    /// markdown (for a review comment) or json.
    #[arg(long, default_value = "markdown")]
    format: broker::policy::cli::DiffFormat,
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

#[derive(Args)]
struct AuditQueryArgs {
    /// The broker's base URL.
    #[arg(long, env = "BROKER_URL")]
    url: String,
    /// File holding an operator token (auditor or admin role).
    #[arg(long, env = "BROKER_OPERATOR_TOKEN_FILE")]
    token_file: PathBuf,
    /// Events at or after this time (RFC 3339).
    #[arg(long)]
    since: Option<String>,
    /// Events before this time (RFC 3339).
    #[arg(long)]
    until: Option<String>,
    #[arg(long)]
    repository: Option<String>,
    #[arg(long)]
    repository_id: Option<String>,
    /// `job`, `reaper`, `operator:<name>`.
    #[arg(long)]
    actor: Option<String>,
    /// A credential name requested or granted.
    #[arg(long)]
    credential: Option<String>,
    /// A credential kind (api_token, postgres, aws_sts).
    #[arg(long)]
    kind: Option<String>,
    /// allow, deny, error, success, failure.
    #[arg(long)]
    outcome: Option<String>,
    /// A reason code (policy_denied, token_expired, ...).
    #[arg(long)]
    reason: Option<String>,
    #[arg(long)]
    grant_id: Option<String>,
    #[arg(long)]
    request_id: Option<String>,
    /// Resume after a previous run (the cursor it printed).
    #[arg(long)]
    cursor: Option<String>,
    /// Stop after this many events (pages are followed until then).
    #[arg(long, default_value_t = 1000)]
    max: usize,
    /// table, jsonl or csv.
    #[arg(long, default_value = "table")]
    format: broker::admin::audit_client::OutputFormat,
}

#[derive(Subcommand)]
enum AuditCmd {
    /// Query a running broker's audit log (`GET /v1/audit`, auditor or admin token).
    Query(Box<AuditQueryArgs>),
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
        /// Also prove the chain still passes through this signed checkpoint (from `broker
        /// audit checkpoint`): detects a log cut or rewritten before it.
        #[arg(long)]
        checkpoint: Option<PathBuf>,
        /// Check the checkpoint's signature with this JWKS file (the broker's
        /// /.well-known/jwks.json) instead of the signing keys in --config.
        #[arg(long, requires = "checkpoint")]
        jwks: Option<PathBuf>,
    },
    /// Record where the audit chain stands and print it as a checkpoint signed with the
    /// broker's key (api_tokens.signing_key). Keep the output off this host.
    Checkpoint {
        #[arg(long, short, env = "BROKER_CONFIG")]
        config: PathBuf,
        /// Write the signed checkpoint here instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Delete audit events older than DATE, keeping the chain verifiable (a checkpoint is
    /// recorded at the cut, in the same transaction).
    Prune {
        #[command(flatten)]
        store: StoreArg,
        /// RFC 3339 time or YYYY-MM-DD (midnight UTC); must not be in the future.
        #[arg(long)]
        before: String,
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
            let _traces = broker::telemetry::init(cfg.log.format, &cfg.log.level, &cfg.telemetry)?;
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
        Cmd::Policy {
            cmd: PolicyCmd::Diff(args),
        } => return Ok(policy_diff(args).await),
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
            cmd: AuditCmd::Query(args),
        } => return audit_query(*args).await,
        Cmd::Audit {
            cmd: AuditCmd::Checkpoint { config, out },
        } => {
            let cfg = Config::load(&config).map_err(|e| anyhow::anyhow!(e))?;
            let keys = config_keys(&cfg)?;
            let store = Store::connect(
                cfg.store
                    .url
                    .resolve()
                    .map_err(|e| anyhow::anyhow!(e))?
                    .expose(),
            )
            .await?;
            let now = broker::time::Clock::now(&broker::time::SystemClock);
            let cp = store.audit_checkpoint(now).await?;
            let token = broker::audit::checkpoint::sign(&keys, &cfg.public_url, &cp)?;
            match out {
                Some(path) => {
                    std::fs::write(&path, format!("{token}\n"))
                        .with_context(|| format!("writing {}", path.display()))?;
                    eprintln!("wrote {}", path.display());
                }
                None => println!("{token}"),
            }
            eprintln!(
                "checkpoint: seq {}, {} events, chain head {}",
                cp.seq, cp.event_count, cp.hash
            );
        }
        Cmd::Audit {
            cmd: AuditCmd::Prune { store, before },
        } => {
            let now = broker::time::Clock::now(&broker::time::SystemClock);
            let before = parse_date(&before)?;
            anyhow::ensure!(before <= now, "--before is in the future");
            let actor = format!(
                "cli:{}",
                std::env::var("USER").unwrap_or_else(|_| "unknown".to_owned())
            );
            let r = store.open().await?.prune_audit(before, now, &actor).await?;
            match r.cut_seq {
                Some(cut) => println!(
                    "pruned {} events through seq {cut}; the chain now starts after it \
                     ({} chained events pruned in all)",
                    r.deleted, r.pruned_events
                ),
                None => println!("nothing to prune"),
            }
        }
        Cmd::Audit {
            cmd:
                AuditCmd::Verify {
                    store,
                    json,
                    checkpoint,
                    jwks,
                },
        } => {
            let anchor = match &checkpoint {
                Some(path) => Some(read_checkpoint(path, jwks.as_deref(), &store)?),
                None => None,
            };
            let report = store
                .open()
                .await?
                .verify_audit_chain_through(anchor.as_ref().map(|c| c.anchor()).as_ref())
                .await?;
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
                        if let Some(cut) = report.pruned_through_seq {
                            println!(
                                "walk started at the prune cut: {} events through seq {cut} pruned",
                                report.pruned_events
                            );
                        }
                        if let Some(c) = &anchor {
                            println!(
                                "checkpoint matched: seq {}, {} events, head {}",
                                c.seq, c.event_count, c.chain_head
                            );
                        }
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
        Cmd::Exchange(args) => return Ok(exchange(args).await),
        Cmd::Revoke(args) => return Ok(revoke(args).await),
        Cmd::Require(args) => return Ok(require(args)),
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

/// The broker's signing keys from its config; checkpoints need a persistent key (an ephemeral
/// one could not be checked later).
fn config_keys(cfg: &Config) -> anyhow::Result<broker::providers::api_token::SigningKeys> {
    let active = cfg
        .api_tokens
        .signing_key
        .as_ref()
        .context("api_tokens.signing_key is not set: checkpoints need the broker's persistent key")?
        .resolve()
        .map_err(|e| anyhow::anyhow!("api_tokens.signing_key: {e}"))?;
    let retired = cfg
        .api_tokens
        .retired_keys
        .iter()
        .map(|r| {
            r.resolve()
                .map_err(|e| anyhow::anyhow!("api_tokens.retired_keys: {e}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    broker::providers::api_token::SigningKeys::from_pems(&active, &retired)
        .context("api_tokens.signing_key")
}

/// Read and check a signed checkpoint: with `jwks` if given, else the keys of the config.
fn read_checkpoint(
    path: &std::path::Path,
    jwks: Option<&std::path::Path>,
    store: &StoreArg,
) -> anyhow::Result<broker::audit::checkpoint::CheckpointClaims> {
    use broker::audit::checkpoint::{VerifyingKeys, verify};
    let token =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let claims = match jwks {
        Some(j) => {
            let text =
                std::fs::read_to_string(j).with_context(|| format!("reading {}", j.display()))?;
            let doc: serde_json::Value =
                serde_json::from_str(&text).context("the JWKS file is not JSON")?;
            verify(VerifyingKeys::Jwks(&doc), &token)?
        }
        None => {
            let config = store
                .config
                .as_ref()
                .context("give --jwks or --config to check the checkpoint's signature")?;
            let cfg = Config::load(config).map_err(|e| anyhow::anyhow!(e))?;
            verify(VerifyingKeys::Keys(&config_keys(&cfg)?), &token)?
        }
    };
    Ok(claims)
}

/// `YYYY-MM-DD` (midnight UTC) or RFC 3339.
fn parse_date(s: &str) -> anyhow::Result<time::OffsetDateTime> {
    use time::format_description::well_known::Rfc3339;
    if let Ok(t) = time::OffsetDateTime::parse(s, &Rfc3339) {
        return Ok(t);
    }
    let d = time::Date::parse(s, time::macros::format_description!("[year]-[month]-[day]"))
        .with_context(|| format!("{s:?} is neither YYYY-MM-DD nor an RFC 3339 time"))?;
    Ok(d.midnight().assume_utc())
}

async fn audit_query(a: AuditQueryArgs) -> anyhow::Result<ExitCode> {
    use broker::admin::audit_client::{header, query, render};
    use std::io::Write;
    let token = broker::admin::client::read_token(&a.token_file).map_err(|e| anyhow::anyhow!(e))?;
    let filters: Vec<(String, String)> = [
        ("since", a.since),
        ("until", a.until),
        ("repository", a.repository),
        ("repository_id", a.repository_id),
        ("actor", a.actor),
        ("credential", a.credential),
        ("kind", a.kind),
        ("outcome", a.outcome),
        ("reason", a.reason),
        ("grant_id", a.grant_id),
        ("request_id", a.request_id),
    ]
    .into_iter()
    .filter_map(|(k, v)| v.map(|v| (k.to_owned(), v)))
    .collect();
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    if let Some(h) = header(a.format) {
        writeln!(out, "{h}")?;
    }
    let outcome = query(&a.url, &token, &filters, a.cursor, a.max, |ev| {
        let line = render(a.format, ev)?;
        writeln!(out, "{line}").map_err(|e| format!("writing output: {}", e.kind()))
    })
    .await;
    out.flush()?;
    match outcome {
        Ok(o) => {
            eprintln!("{} events", o.fetched);
            if let Some(c) = o.next_cursor {
                eprintln!("more events match: continue with --cursor {c}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("error: {e}");
            Ok(ExitCode::FAILURE)
        }
    }
}

/// `broker policy diff`: materialise both sides, gather audit seeds, diff. Every failure is
/// [`broker::policy::diff::EXIT_ERROR`] so CI never mistakes an error for "not widened".
async fn policy_diff(a: PolicyDiffArgs) -> ExitCode {
    use broker::policy::{cli, diff};
    let fail = |e: &dyn std::fmt::Display| {
        eprintln!("error: {e}");
        ExitCode::from(diff::EXIT_ERROR)
    };
    let repo = std::path::Path::new(".");
    let base = match diff::source::resolve(&a.base, repo, &a.policy_path) {
        Ok(s) => s,
        Err(e) => return fail(&e),
    };
    let head = match diff::source::resolve(&a.head, repo, &a.policy_path) {
        Ok(s) => s,
        Err(e) => return fail(&e),
    };
    let mut seeds = Vec::new();
    if let (Some(url), Some(token_file)) = (&a.audit_url, &a.auditor_token_file) {
        let token = match broker::admin::client::read_token(token_file) {
            Ok(t) => t,
            Err(e) => return fail(&e),
        };
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
            .await;
        match outcome {
            Ok(o) => eprintln!(
                "{} audit event(s) read, {} distinct job(s)",
                o.fetched,
                seeds.len()
            ),
            Err(e) => return fail(&e),
        }
    }
    let mut out = std::io::stdout();
    ExitCode::from(cli::diff(&base.dir, &head.dir, &seeds, a.format, &mut out))
}

async fn admin(args: AdminArgs) -> anyhow::Result<ExitCode> {
    use broker::admin::client;
    use broker::client::TokenSource;
    let url = args.url.context("give --url (or BROKER_URL)")?;
    let job_source = match (
        args.id_token_file,
        args.id_token_env,
        args.id_token_audience,
    ) {
        (Some(f), _, _) => Some(TokenSource::File(f)),
        (None, Some(v), _) => Some(TokenSource::Env(v)),
        (None, None, Some(audience)) => Some(TokenSource::GithubRunner { audience }),
        (None, None, None) => None,
    };
    let token = match (job_source, args.token_file) {
        (Some(source), _) => {
            let http = reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(30))
                .build()?;
            let env = |k: &str| env_var(k);
            source
                .fetch(&http, &env)
                .await
                .map_err(|e| anyhow::anyhow!("job token: {e}"))?
        }
        (None, Some(f)) => client::read_token(&f).map_err(|e| anyhow::anyhow!(e))?,
        (None, None) => anyhow::bail!(
            "give --token-file (or BROKER_OPERATOR_TOKEN_FILE), or a job token with \
             --id-token-file / --id-token-env / --id-token-audience"
        ),
    };
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
    let revoke_all = matches!(args.cmd, AdminCmd::RevokeAll(_));
    let (path, body) = match args.cmd {
        AdminCmd::RevokeAll(f) => ("/v1/admin/revoke-all", filter_body(f)),
        AdminCmd::Freeze(f) => ("/v1/admin/freeze", filter_body(f)),
        AdminCmd::Unfreeze { reason } => (
            "/v1/admin/unfreeze",
            serde_json::json!({"reason": reason.unwrap_or_default()}),
        ),
    };
    // A revoke-all larger than one call's time budget answers `complete: false`: call again
    // (each call continues where the store stands) and show the progress on stderr. Bounded:
    // at most MAX_CALLS calls, and a call that reached no grant at all ends the loop.
    const MAX_CALLS: u32 = 2000;
    let started = std::time::Instant::now();
    let (mut total_revoked, mut total_matched, mut calls) = (0u64, 0u64, 0u32);
    let (status, mut answer) = loop {
        let (status, answer) = client::post(&url, path, &token, &body)
            .await
            .map_err(|e| anyhow::anyhow!(e))?;
        calls += 1;
        let more = revoke_all
            && (200..300).contains(&status)
            && answer["complete"] == serde_json::Value::Bool(false);
        if !revoke_all {
            break (status, answer);
        }
        total_revoked += answer["revoked_grants"].as_u64().unwrap_or(0);
        let matched = answer["matched"].as_u64().unwrap_or(0);
        total_matched += matched;
        if !more || matched == 0 || calls >= MAX_CALLS {
            if calls > 1 {
                eprintln!();
            }
            break (status, answer);
        }
        eprint!(
            "\rrevoke-all: {total_revoked} grants revoked, {total_matched} reached, {} s, continuing...",
            started.elapsed().as_secs()
        );
    };
    if revoke_all && calls > 1 {
        answer["calls"] = calls.into();
        answer["total_revoked_grants"] = total_revoked.into();
        answer["total_matched"] = total_matched.into();
    }
    println!("{}", serde_json::to_string_pretty(&answer)?);
    if revoke_all && answer["complete"] == serde_json::Value::Bool(false) {
        eprintln!("revoke-all did not complete; run it again to continue");
    }
    let failures = answer["failures"].as_array().is_some_and(|f| !f.is_empty())
        || (revoke_all && answer["complete"] == serde_json::Value::Bool(false));
    if !(200..300).contains(&status) {
        eprintln!("error: the broker answered {status}");
        return Ok(ExitCode::FAILURE);
    }
    Ok(if failures {
        eprintln!("some revocations failed (the reaper retries them) or the run is incomplete");
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    })
}

/// Exit codes of the client subcommands: 3 refused (401/403: change the job or the policy),
/// 4 broker unavailable after retries, 2 usage (including a grant the job cannot receive:
/// several aws_sts without --out-dir, two credentials on one variable), 1 anything else.
fn client_failure(e: &broker::client::ClientError) -> ExitCode {
    use broker::client::ClientError;
    eprintln!("error: {e} [{}]", e.reason_code());
    match e {
        _ if e.is_refusal() => ExitCode::from(3),
        ClientError::Network { .. } => ExitCode::from(4),
        ClientError::Refused { status, .. } if *status >= 500 || *status == 429 => {
            ExitCode::from(4)
        }
        ClientError::Usage(_) => ExitCode::from(2),
        _ => ExitCode::FAILURE,
    }
}

fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn notice() -> broker::client::Notice {
    Box::new(|m| eprintln!("broker: {m}"))
}

async fn exchange(args: ExchangeArgs) -> ExitCode {
    use broker::client::{self, TokenSource};
    let client = match args.client.client() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    };
    let source = match (&args.token_file, &args.token_env) {
        (Some(f), _) => TokenSource::File(f.clone()),
        (None, Some(v)) => TokenSource::Env(v.clone()),
        (None, None) if env_var("BROKER_ID_TOKEN").is_some() => {
            TokenSource::Env("BROKER_ID_TOKEN".into())
        }
        (None, None) if env_var("ACTIONS_ID_TOKEN_REQUEST_URL").is_some() => match &args.audience {
            Some(a) => TokenSource::GithubRunner {
                audience: a.clone(),
            },
            None => {
                eprintln!("error: give --audience (the broker's audience) [usage]");
                return ExitCode::from(2);
            }
        },
        (None, None) => {
            eprintln!(
                "error: no job token: set BROKER_ID_TOKEN (GitLab: `id_tokens:`), give \
                 --token-env/--token-file, or on GitHub Actions grant `permissions: id-token: \
                 write` [no_token]"
            );
            return ExitCode::from(3);
        }
    };
    let env = |k: &str| env_var(k);
    let result = client
        .exchange(
            &source,
            &env,
            &args.credentials,
            args.ttl.as_deref(),
            &notice(),
        )
        .await;
    let ex = match result {
        Ok(ex) => ex,
        Err(e) => {
            let code = client_failure(&e);
            if e.is_refusal() {
                let claims = match source.fetch(client.http(), &env).await {
                    Ok(t) => client::unverified_claims(t.expose()),
                    Err(_) => None,
                };
                eprint!("{}", client::explain_refusal(&e, claims.as_ref()));
            }
            return code;
        }
    };
    let g = &ex.grant;
    let format = args.format.or(if args.out_dir.is_some() {
        None
    } else {
        Some(client::Format::Env)
    });
    // The variables and files, shaped once so stdout and the files agree. A shape the job
    // cannot use (several aws_sts without --out-dir, two credentials on one variable) fails
    // closed: the grant is revoked at once rather than left alive unused.
    let shaped = if args.out_dir.is_some() || format != Some(client::Format::Json) {
        match g.shape(&args.credentials, args.out_dir.as_deref()) {
            Ok(s) => Some(s),
            Err(e) => {
                let code = client_failure(&e);
                abandon(&client, g).await;
                return code;
            }
        }
    } else {
        None
    };
    // A grant the job cannot receive whole (a file could not be written) is revoked too.
    if let (Some(dir), Some(shaped)) = (&args.out_dir, &shaped)
        && let Err(e) = client::write_dir(dir, shaped)
    {
        let code = client_failure(&e);
        abandon(&client, g).await;
        return code;
    }
    if let Some(f) = &args.revocation_file
        && let Err(e) = client::write_private(f, g.revocation_token.expose())
    {
        let code = client_failure(&e);
        abandon(&client, g).await;
        return code;
    }
    match (format, &shaped) {
        (Some(client::Format::Json), _) => {
            print!("{}", client::render_json(ex.raw()));
        }
        (Some(fmt), Some(shaped)) => print!("{}", shaped.render(fmt)),
        _ => {}
    }
    let names: Vec<&str> = g.credentials.iter().map(|c| c.name.as_str()).collect();
    eprintln!(
        "broker: granted {} (grant {}, expires {})",
        names.join(", "),
        g.grant_id,
        g.expires_at
    );
    ExitCode::SUCCESS
}

/// Revoke a grant the job will not use (fail closed: no credential stays alive unused).
async fn abandon(client: &broker::client::Client, g: &broker::client::Grant) {
    match client.revoke(&g.revocation_token, &notice()).await {
        Ok(status) => eprintln!("broker: grant {status}"),
        Err(r) => eprintln!(
            "broker: revoking the unused grant failed [{}]; it expires at {}",
            r.reason_code(),
            g.expires_at
        ),
    }
}

fn require(args: RequireArgs) -> ExitCode {
    match broker::client::require_exchanged(
        args.secrets_dir.as_deref(),
        env_var("BROKER_GRANT_ID").as_deref(),
    ) {
        Ok(grant) => {
            eprintln!("broker: credentials of grant {grant} are in place");
            ExitCode::SUCCESS
        }
        Err(e) => client_failure(&e),
    }
}

async fn revoke(args: RevokeArgs) -> ExitCode {
    use broker::secret::Sensitive;
    let client = match args.client.client() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    };
    let token = match &args.revocation_file {
        Some(f) => match std::fs::read_to_string(f) {
            Ok(t) => Some(t.trim().to_owned()),
            Err(e) => {
                eprintln!("error: {}: {e} [io_error]", f.display());
                return ExitCode::FAILURE;
            }
        },
        None => env_var(&args.revocation_env).map(|t| t.trim().to_owned()),
    };
    let Some(token) = token.filter(|t| !t.is_empty()) else {
        eprintln!(
            "error: no revocation token (give --revocation-file or set {}) [no_token]",
            args.revocation_env
        );
        return ExitCode::FAILURE;
    };
    match client.revoke(&Sensitive::new(token), &notice()).await {
        Ok(status) => {
            eprintln!("broker: grant {status}");
            ExitCode::SUCCESS
        }
        Err(e) => client_failure(&e),
    }
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
        PolicyCmd::Schema => cli::schema(&mut out),
        // Dispatched to `policy_diff` (it may call a broker).
        PolicyCmd::Diff(_) => false,
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

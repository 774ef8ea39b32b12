//! `broker audit`: query a running broker's audit log, list events from the store, verify the
//! hash chain (optionally through a signed checkpoint), record a checkpoint, prune old events.

use super::StoreArg;
use super::exit::{Exit, ExitOnError, Failure, Outcome, usage};
use anyhow::Context;
use broker::admin::client::CallError;
use broker::config::Config;
use broker::store::{AuditFilter, Store};
use clap::{Args, Subcommand};
use std::path::{Path, PathBuf};
use time::format_description::well_known::Rfc3339;

#[derive(Args)]
pub struct AuditArgs {
    #[command(subcommand)]
    cmd: AuditCmd,
}

#[derive(Subcommand)]
enum AuditCmd {
    /// Query a running broker's audit log (`GET /v1/audit`, auditor or admin token).
    Query(Box<QueryArgs>),
    /// Stream a running broker's audit log (`GET /v1/audit/stream`) as JSON lines, oldest first,
    /// one CloudEvents envelope per event; with --follow, keep printing new events, reconnecting
    /// (to the next --url) from the last one printed. For log shippers and SIEMs.
    Tail(TailArgs),
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

#[derive(Args)]
struct TailArgs {
    /// The broker's operator URL; repeat (or separate with commas) to name each replica, tried
    /// in turn when one fails.
    #[arg(
        long = "url",
        env = "BROKER_URL",
        value_delimiter = ',',
        required = true
    )]
    urls: Vec<String>,
    /// File holding an auditor or admin operator token.
    #[arg(long, env = "BROKER_OPERATOR_TOKEN_FILE")]
    token_file: PathBuf,
    /// Start after this sequence number (the `seq` of the last event you kept; 0: from the
    /// oldest event kept).
    #[arg(long, default_value_t = 0)]
    after: i64,
    /// Keep streaming new events; never exits by itself.
    #[arg(long)]
    follow: bool,
}

#[derive(Args)]
struct QueryArgs {
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
    /// Only revocations whose check on the target could not show the old access gone.
    #[arg(long)]
    unverified: bool,
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

pub async fn run(args: AuditArgs) -> Outcome {
    match args.cmd {
        AuditCmd::Query(a) => query(*a).await,
        AuditCmd::Tail(a) => tail(a).await,
        AuditCmd::List {
            store,
            grant,
            repository,
            limit,
            json,
        } => {
            let filter = AuditFilter {
                grant_id: grant,
                repository,
                limit,
                ..AuditFilter::default()
            };
            list(&store.open().await?, &filter, json).await
        }
        AuditCmd::Verify {
            store,
            json,
            checkpoint,
            jwks,
        } => verify(&store, json, checkpoint.as_deref(), jwks.as_deref()).await,
        AuditCmd::Checkpoint { config, out } => checkpoint(&config, out.as_deref()).await,
        AuditCmd::Prune { store, before } => prune(&store, &before).await,
    }
}

/// The exit code of a failed operator call: the broker's answer decides, the way it does for
/// the job-side client.
pub fn query_failure(e: CallError) -> Failure {
    let exit = match &e {
        CallError::TokenFile { .. } | CallError::EmptyTokenFile { .. } | CallError::BadUrl => {
            Exit::Usage
        }
        CallError::Network { .. } => Exit::Unavailable,
        CallError::Status { status, .. } => Exit::of_status(*status),
        CallError::Build(_) | CallError::BadAnswer(_) | CallError::Output(_) => Exit::Failed,
    };
    Failure::new(exit, e)
}

async fn query(a: QueryArgs) -> Outcome {
    use broker::admin::audit_client::{header, query, render};
    use std::io::Write;
    let token = broker::admin::client::read_token(&a.token_file).map_err(query_failure)?;
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
        ("verified", a.unverified.then(|| "false".to_owned())),
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
        writeln!(out, "{line}")
            .map_err(|e| CallError::Output(format!("writing output: {}", e.kind())))
    })
    .await;
    out.flush()?;
    let o = outcome.map_err(query_failure)?;
    eprintln!("{} events", o.fetched);
    if let Some(c) = o.next_cursor {
        eprintln!("more events match: continue with --cursor {c}");
    }
    Ok(Exit::Ok)
}

async fn tail(a: TailArgs) -> Outcome {
    use std::io::Write;
    let token = broker::admin::client::read_token(&a.token_file).map_err(query_failure)?;
    let stdout = std::io::stdout();
    let last = broker::admin::audit_tail::tail(
        &a.urls,
        &token,
        a.after,
        a.follow,
        |line| {
            // One line at a time, flushed: a shipper reading the pipe sees each event at once.
            let mut out = stdout.lock();
            writeln!(out, "{line}")
                .and_then(|()| out.flush())
                .map_err(|e| CallError::Output(format!("writing output: {}", e.kind())))
        },
        |note| eprintln!("{note}"),
    )
    .await
    .map_err(query_failure)?;
    eprintln!("caught up at seq {last}");
    Ok(Exit::Ok)
}

async fn list(store: &Store, filter: &AuditFilter, json: bool) -> Outcome {
    for ev in store.audit_events(filter).await? {
        if json {
            println!("{}", serde_json::to_string(&ev)?);
            continue;
        }
        println!(
            "{}  {:<13} {:<7} {:<24} {:<20} {}",
            ev.time.format(&Rfc3339).unwrap_or_default(),
            serde_json::to_value(ev.action)?.as_str().unwrap_or(""),
            serde_json::to_value(ev.outcome)?.as_str().unwrap_or(""),
            ev.reason,
            ev.job.repository.as_deref().unwrap_or("-"),
            ev.grant_id
                .map(|g| g.to_string())
                .unwrap_or_else(|| "-".into()),
        );
    }
    Ok(Exit::Ok)
}

async fn verify(
    store: &StoreArg,
    json: bool,
    checkpoint: Option<&Path>,
    jwks: Option<&Path>,
) -> Outcome {
    let anchor = match checkpoint {
        Some(path) => Some(read_checkpoint(path, jwks, store)?),
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
    let Some(b) = &report.broken else {
        if !json {
            println!(
                "audit chain intact: {} events verified (head seq {}, hash {}); \
                 {} older events predate the chain",
                report.events_checked, report.head_seq, report.head_hash, report.legacy_events
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
        return Ok(Exit::Ok);
    };
    if !json {
        println!(
            "AUDIT CHAIN BROKEN ({}): {}",
            b.kind.reason_code(),
            b.message
        );
        println!("{} events verified before the break", report.events_checked);
    }
    Ok(Exit::Failed)
}

async fn checkpoint(config: &Path, out: Option<&Path>) -> Outcome {
    let cfg = super::load_config(config)?;
    let keys = config_keys(&cfg)?;
    let url = cfg.store.url.resolve().exit(Exit::Usage)?;
    let store = Store::connect(url.expose()).await?;
    let now = broker::time::Clock::now(&broker::time::SystemClock);
    let cp = store.audit_checkpoint(now).await?;
    let token = broker::audit::checkpoint::sign(&keys, &cfg.public_url, &cp)?;
    match out {
        Some(path) => {
            std::fs::write(path, format!("{token}\n"))
                .with_context(|| format!("writing {}", path.display()))?;
            eprintln!("wrote {}", path.display());
        }
        None => println!("{token}"),
    }
    eprintln!(
        "checkpoint: seq {}, {} events, chain head {}",
        cp.seq, cp.event_count, cp.hash
    );
    Ok(Exit::Ok)
}

async fn prune(store: &StoreArg, before: &str) -> Outcome {
    let now = broker::time::Clock::now(&broker::time::SystemClock);
    let before = parse_date(before)?;
    if before > now {
        return Err(usage("--before is in the future"));
    }
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
    Ok(Exit::Ok)
}

/// The broker's signing keys from its config; checkpoints need a persistent key (an ephemeral
/// one could not be checked later). A missing or unreadable key is a config error.
fn config_keys(cfg: &Config) -> Result<broker::providers::api_token::SigningKeys, Failure> {
    cfg.api_tokens
        .signing_keys()
        .exit(Exit::Usage)?
        .ok_or_else(|| {
            usage("api_tokens.signing_key is not set: checkpoints need the broker's persistent key")
        })
}

/// Read and check a signed checkpoint: with `jwks` if given, else the keys of the config. An
/// unreadable file is a usage error; a signature that does not check is a failed check.
fn read_checkpoint(
    path: &Path,
    jwks: Option<&Path>,
    store: &StoreArg,
) -> Result<broker::audit::checkpoint::CheckpointClaims, Failure> {
    use broker::audit::checkpoint::{VerifyingKeys, verify};
    let token = std::fs::read_to_string(path)
        .with_context(|| format!("reading {}", path.display()))
        .exit(Exit::Usage)?;
    let claims = match jwks {
        Some(j) => {
            let text = std::fs::read_to_string(j)
                .with_context(|| format!("reading {}", j.display()))
                .exit(Exit::Usage)?;
            let doc: serde_json::Value = serde_json::from_str(&text)
                .context("the JWKS file is not JSON")
                .exit(Exit::Usage)?;
            verify(VerifyingKeys::Jwks(&doc), &token)?
        }
        None => {
            let Some(config) = &store.config else {
                return Err(usage(
                    "give --jwks or --config to check the checkpoint's signature",
                ));
            };
            let cfg = super::load_config(config)?;
            verify(VerifyingKeys::Keys(&config_keys(&cfg)?), &token)?
        }
    };
    Ok(claims)
}

/// `YYYY-MM-DD` (midnight UTC) or RFC 3339.
fn parse_date(s: &str) -> Result<time::OffsetDateTime, Failure> {
    if let Ok(t) = time::OffsetDateTime::parse(s, &Rfc3339) {
        return Ok(t);
    }
    let d = time::Date::parse(s, time::macros::format_description!("[year]-[month]-[day]"))
        .with_context(|| format!("{s:?} is neither YYYY-MM-DD nor an RFC 3339 time"))
        .exit(Exit::Usage)?;
    Ok(d.midnight().assume_utc())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operator_call_failures_map_onto_the_table() {
        let status = |status| CallError::Status {
            status,
            message: String::new(),
            code: String::new(),
        };
        let exit = |e| query_failure(e).exit;
        assert_eq!(exit(status(401)), Exit::Refused);
        assert_eq!(exit(status(503)), Exit::Unavailable);
        assert_eq!(exit(status(400)), Exit::Usage);
        let network = CallError::Network {
            target: "the broker".into(),
            detail: "connection failed".into(),
        };
        assert_eq!(exit(network), Exit::Unavailable);
        let path = "/nope".to_owned();
        assert_eq!(exit(CallError::EmptyTokenFile { path }), Exit::Usage);
        assert_eq!(exit(CallError::BadAnswer("x".into())), Exit::Failed);
    }

    #[test]
    fn dates_are_days_or_rfc3339_and_nothing_else() {
        assert_eq!(
            parse_date("2026-01-02").unwrap(),
            time::macros::datetime!(2026-01-02 0:00 UTC)
        );
        assert_eq!(
            parse_date("2026-01-02T03:04:05Z").unwrap(),
            time::macros::datetime!(2026-01-02 3:04:05 UTC)
        );
        assert_eq!(
            parse_date("yesterday").err().map(|f| f.exit),
            Some(Exit::Usage)
        );
    }
}

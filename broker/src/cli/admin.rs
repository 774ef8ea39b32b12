//! `broker admin`: break glass, calling the operator API of a running broker (revoke-all,
//! freeze, unfreeze) with an operator token or, from a reviewed pipeline, the job's token.

use super::exit::{Exit, ExitOnError, Failure, Outcome, usage};
use anyhow::anyhow;
use broker::admin::client;
use broker::client::TokenSource;
use clap::{Args, Subcommand};
use serde_json::Value;
use std::path::PathBuf;

#[derive(Args)]
pub struct AdminArgs {
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
struct FilterArgs {
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

impl FilterArgs {
    fn body(self) -> Value {
        let mut filter = serde_json::Map::new();
        for (k, v) in [
            ("issuer", self.issuer),
            ("repository", self.repository),
            ("repository_id", self.repository_id),
            ("credential", self.credential),
            ("kind", self.kind),
            ("issued_after", self.issued_after),
            ("issued_before", self.issued_before),
        ] {
            if let Some(v) = v {
                filter.insert(k.to_owned(), Value::String(v));
            }
        }
        serde_json::json!({"reason": self.reason.unwrap_or_default(), "filter": filter})
    }
}

#[derive(Subcommand)]
enum AdminCmd {
    /// Revoke every active grant matching the filter.
    RevokeAll(FilterArgs),
    /// Refuse new exchanges matching the filter on every replica.
    Freeze(FilterArgs),
    /// Lift the freeze.
    Unfreeze {
        #[arg(long)]
        reason: Option<String>,
    },
}

/// Calls of one revoke-all run at most: each continues where the store stands, and a call that
/// reached no grant at all ends the run early.
const MAX_CALLS: u32 = 2000;

pub async fn run(args: AdminArgs) -> Outcome {
    let Some(url) = args.url else {
        return Err(usage("give --url (or BROKER_URL)"));
    };
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
            let http = broker::client::runner_http().exit(Exit::Failed)?;
            source
                .fetch(&http, &super::env_var)
                .await
                .map_err(|e| Failure::new(super::job::exit_code(&e), anyhow!("job token: {e}")))?
        }
        (None, Some(f)) => client::read_token(&f).map_err(super::audit::query_failure)?,
        (None, None) => {
            return Err(usage(
                "give --token-file (or BROKER_OPERATOR_TOKEN_FILE), or a job token with \
                 --id-token-file / --id-token-env / --id-token-audience",
            ));
        }
    };
    let revoke_all = matches!(args.cmd, AdminCmd::RevokeAll(_));
    let (path, body) = match args.cmd {
        AdminCmd::RevokeAll(f) => ("/v1/admin/revoke-all", f.body()),
        AdminCmd::Freeze(f) => ("/v1/admin/freeze", f.body()),
        AdminCmd::Unfreeze { reason } => (
            "/v1/admin/unfreeze",
            serde_json::json!({"reason": reason.unwrap_or_default()}),
        ),
    };
    // A revoke-all larger than one call's time budget answers `complete: false`: call again
    // and show the progress on stderr.
    let started = std::time::Instant::now();
    let (mut total_revoked, mut total_matched, mut calls) = (0u64, 0u64, 0u32);
    let (status, mut answer) = loop {
        let (status, answer) = client::post(&url, path, &token, &body)
            .await
            .map_err(super::audit::query_failure)?;
        calls += 1;
        let more =
            revoke_all && (200..300).contains(&status) && answer["complete"] == Value::Bool(false);
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
    let incomplete = revoke_all && answer["complete"] == Value::Bool(false);
    if revoke_all && calls > 1 {
        answer["calls"] = calls.into();
        answer["total_revoked_grants"] = total_revoked.into();
        answer["total_matched"] = total_matched.into();
    }
    println!("{}", serde_json::to_string_pretty(&answer)?);
    if incomplete {
        eprintln!("revoke-all did not complete; run it again to continue");
    }
    if !(200..300).contains(&status) {
        eprintln!("error: the broker answered {status}");
        return Ok(Exit::of_status(status));
    }
    let failures = answer["failures"].as_array().is_some_and(|f| !f.is_empty());
    Ok(if failures || incomplete {
        eprintln!("some revocations failed (the reaper retries them) or the run is incomplete");
        Exit::Unavailable
    } else {
        Exit::Ok
    })
}

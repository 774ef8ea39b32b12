//! `broker leak report <token|file|->`: report leaked broker secrets to a running broker
//! (`POST /v1/leaks`, operator token). A file (or `-`, standard input) is scanned with
//! `secret_format::find_all`, so a log or a paste can be handed over whole; anything else is
//! taken as one token. Prints the broker's answer: each token's SHA-256 and label, never the
//! token.

use super::exit::{Exit, Failure, Outcome, usage};
use broker::admin::client;
use clap::{Args, Subcommand};
use serde_json::{Value, json};
use std::path::PathBuf;

#[derive(Args)]
pub struct LeakArgs {
    #[command(subcommand)]
    cmd: LeakCmd,
}

#[derive(Subcommand)]
enum LeakCmd {
    /// Report leaked tokens: each one the broker issued and still live is revoked at once.
    Report(ReportArgs),
}

#[derive(Args)]
struct ReportArgs {
    /// A token, a file to pick broker secrets out of, or `-` for standard input.
    what: String,
    /// Where it was found (a URL or a note; audited).
    #[arg(long)]
    found_at: Option<String>,
    /// The broker's base URL.
    #[arg(long, env = "BROKER_URL")]
    url: Option<String>,
    /// File holding an operator token (admin role).
    #[arg(long, env = "BROKER_OPERATOR_TOKEN_FILE")]
    token_file: Option<PathBuf>,
}

pub async fn run(args: LeakArgs) -> Outcome {
    let LeakCmd::Report(a) = args.cmd;
    let (Some(url), Some(token_file)) = (a.url, a.token_file) else {
        return Err(usage(
            "give --url (or BROKER_URL) and --token-file (or BROKER_OPERATOR_TOKEN_FILE)",
        ));
    };
    let tokens = tokens_of(&a.what)?;
    if tokens.is_empty() {
        eprintln!("no broker secret found in {}", a.what);
        return Ok(Exit::Usage);
    }
    let body = Value::Array(
        tokens
            .iter()
            .map(|t| {
                json!({"token": t, "type": "broker", "url": a.found_at, "source": "broker leak report"})
            })
            .collect(),
    );
    let operator = client::read_token(&token_file).map_err(super::audit::query_failure)?;
    let (status, answer) = client::post(&url, "/v1/leaks", &operator, &body)
        .await
        .map_err(super::audit::query_failure)?;
    println!("{}", serde_json::to_string_pretty(&answer)?);
    if !(200..300).contains(&status) {
        eprintln!("error: the broker answered {status}");
        return Ok(Exit::of_status(status));
    }
    Ok(Exit::Ok)
}

/// The tokens named by `what`: the broker secrets in a file or standard input, else `what`
/// itself.
fn tokens_of(what: &str) -> Result<Vec<String>, Failure> {
    let text = if what == "-" {
        std::io::read_to_string(std::io::stdin()).map_err(|e| {
            Failure::new(Exit::Usage, anyhow::anyhow!("reading standard input: {e}"))
        })?
    } else if std::path::Path::new(what).is_file() {
        std::fs::read_to_string(what).map_err(|e| {
            Failure::new(Exit::Usage, anyhow::anyhow!("reading {what}: {}", e.kind()))
        })?
    } else {
        return Ok(vec![what.trim().to_owned()]);
    };
    let mut out: Vec<String> = Vec::new();
    for (_, t) in broker::secret_format::find_all(&text) {
        if !out.iter().any(|o| o == t) {
            out.push(t.to_owned());
        }
    }
    Ok(out)
}

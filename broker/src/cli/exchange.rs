//! `broker exchange`: trade this CI job's OIDC token for credentials (run inside the job).

use super::env_var as env;
use super::exit::{Exit, Outcome};
use super::job::{ClientArgs, exit_of, notice};
use broker::client::{self, Client, CredentialRequest, Format, Grant, TokenSource};
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub struct ExchangeArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// A credential to request; `NAME=VAR` puts its main secret in variable VAR. Repeatable.
    #[arg(
        long = "credential",
        short = 'c',
        required = true,
        value_delimiter = ','
    )]
    credentials: Vec<CredentialRequest>,
    /// Requested lifetime (capped by policy).
    #[arg(long)]
    ttl: Option<String>,
    /// An `ssh_cert` credential whose Ed25519 key pair is made here: only the public key is
    /// sent; the private key goes to `<name>.key` in --out-dir (required). Repeatable.
    #[arg(long = "ssh-key", value_delimiter = ',')]
    ssh_keys: Vec<String>,
    /// What to print on stdout: env (`export` lines), dotenv, json. Default: env, or nothing
    /// with --out-dir.
    #[arg(long)]
    format: Option<Format>,
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

/// Where the job token comes from: a flag, `BROKER_ID_TOKEN`, or the GitHub runner.
fn token_source(args: &ExchangeArgs) -> Result<TokenSource, Exit> {
    Ok(match (&args.token_file, &args.token_env) {
        (Some(f), _) => TokenSource::File(f.clone()),
        (None, Some(v)) => TokenSource::Env(v.clone()),
        (None, None) if env("BROKER_ID_TOKEN").is_some() => {
            TokenSource::Env("BROKER_ID_TOKEN".into())
        }
        (None, None) if env("ACTIONS_ID_TOKEN_REQUEST_URL").is_some() => match &args.audience {
            Some(a) => TokenSource::GithubRunner {
                audience: a.clone(),
            },
            None => {
                eprintln!("error: give --audience (the broker's audience) [usage]");
                return Err(Exit::Usage);
            }
        },
        (None, None) => {
            eprintln!(
                "error: no job token: set BROKER_ID_TOKEN (GitLab: `id_tokens:`), give \
                 --token-env/--token-file, or on GitHub Actions grant `permissions: id-token: \
                 write` [no_token]"
            );
            return Err(Exit::Refused);
        }
    })
}

/// Key pairs for `--ssh-key` credentials: the private keys by name and the request's
/// `parameters` (their public keys).
fn ssh_key_pairs(
    args: &ExchangeArgs,
) -> Result<(Vec<(String, broker::secret::Sensitive)>, serde_json::Value), Exit> {
    let mut keys = Vec::new();
    let mut params = serde_json::Map::new();
    for name in &args.ssh_keys {
        if !args.credentials.iter().any(|c| &c.name == name) {
            eprintln!("error: --ssh-key {name}: not a requested --credential [usage]");
            return Err(Exit::Usage);
        }
        if args.out_dir.is_none() {
            eprintln!("error: --ssh-key needs --out-dir (the private key goes to a file) [usage]");
            return Err(Exit::Usage);
        }
        let pair = ssh_key::PrivateKey::random(
            &mut ssh_key::rand_core::OsRng,
            ssh_key::Algorithm::Ed25519,
        );
        let made = pair.ok().and_then(|p| {
            let public = p.public_key().to_openssh().ok()?;
            let private = p.to_openssh(ssh_key::LineEnding::LF).ok()?;
            Some((public, broker::secret::Sensitive::new(private.to_string())))
        });
        let Some((public, private)) = made else {
            eprintln!("error: could not make an SSH key pair [internal]");
            return Err(Exit::Usage);
        };
        params.insert(name.clone(), serde_json::json!({ "public_key": public }));
        keys.push((name.clone(), private));
    }
    let params = if params.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::Value::Object(params)
    };
    Ok((keys, params))
}

pub async fn run(args: ExchangeArgs) -> Outcome {
    let client = args.client.client()?;
    let source = match token_source(&args) {
        Ok(s) => s,
        Err(exit) => return Ok(exit),
    };
    let (ssh_keys, parameters) = match ssh_key_pairs(&args) {
        Ok(k) => k,
        Err(exit) => return Ok(exit),
    };
    let result = client
        .exchange_with(
            &source,
            &env,
            &args.credentials,
            args.ttl.as_deref(),
            &parameters,
            &notice(),
        )
        .await;
    let mut ex = match result {
        Ok(ex) => ex,
        Err(e) => {
            let exit = exit_of(&e);
            if e.is_refusal() {
                let claims = match source.fetch(client.http(), &env).await {
                    Ok(t) => broker::oidc::unverified_claims_for_display(t.expose()),
                    Err(_) => None,
                };
                eprint!("{}", client::explain_refusal(&e, claims.as_ref()));
            }
            return Ok(exit);
        }
    };
    // The keys made here join their certificates (written to `<name>.key` by the shape).
    for (name, key) in ssh_keys {
        if let Some(c) = ex.grant.credentials.iter_mut().find(|c| c.name == name) {
            c.fields
                .insert("private_key".into(), client::FieldValue::Secret(key));
        }
    }
    let g = &ex.grant;
    let format = args.format.or(if args.out_dir.is_some() {
        None
    } else {
        Some(Format::Env)
    });
    // The variables and files, shaped once so stdout and the files agree. A shape the job
    // cannot use (several aws_sts without --out-dir, two credentials on one variable) fails
    // closed: the grant is revoked at once rather than left alive unused.
    let shaped = if args.out_dir.is_some() || format != Some(Format::Json) {
        match g.shape(&args.credentials, args.out_dir.as_deref()) {
            Ok(s) => Some(s),
            Err(e) => return Ok(abandon(&client, g, &e).await),
        }
    } else {
        None
    };
    // A grant the job cannot receive whole (a file could not be written) is revoked too.
    if let (Some(dir), Some(shaped)) = (&args.out_dir, &shaped)
        && let Err(e) = client::write_dir(dir, shaped)
    {
        return Ok(abandon(&client, g, &e).await);
    }
    if let Some(f) = &args.revocation_file
        && let Err(e) = client::write_private(f, g.revocation_token.expose())
    {
        return Ok(abandon(&client, g, &e).await);
    }
    match (format, &shaped) {
        (Some(Format::Json), _) => print!("{}", client::render_json(ex.raw())),
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
    Ok(Exit::Ok)
}

/// Report `why`, then revoke a grant the job will not use (fail closed: no credential stays
/// alive unused). The exit code is `why`'s.
async fn abandon(client: &Client, g: &Grant, why: &client::ClientError) -> Exit {
    let exit = exit_of(why);
    match client.revoke(&g.revocation_token, &notice()).await {
        Ok(status) => eprintln!("broker: grant {status}"),
        Err(r) => eprintln!(
            "broker: revoking the unused grant failed [{}]; it expires at {}",
            r.reason_code(),
            g.expires_at
        ),
    }
    exit
}

//! `broker ssh-krl`: fetch an SSH CA's key revocation list from the broker and put it in place
//! for sshd's `RevokedKeys` (run on each host from a timer; see docs/providers/ssh_cert.md).
//! The file is replaced atomically, and only by something that is a KRL: a failed or odd fetch
//! keeps the previous list (sshd refuses every certificate while the file is missing).

use super::exit::{Exit, Outcome};
use super::job::ClientArgs;
use broker::providers::ssh_cert::KRL_MAGIC;
use clap::Args;
use std::io::Write;
use std::path::PathBuf;

/// Larger than any KRL of live certificates (8 bytes per serial).
const MAX_KRL_BYTES: usize = 64 << 20;

#[derive(Args)]
pub struct SshKrlArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// The CA's name (`targets.ssh_ca.<name>` in the broker's config).
    #[arg(long)]
    ca: String,
    /// Where sshd reads it (`RevokedKeys`), e.g. /etc/ssh/broker_revoked.krl.
    #[arg(long)]
    out: PathBuf,
}

pub async fn run(args: SshKrlArgs) -> Outcome {
    let client = args.client.client()?;
    if args.ca.is_empty()
        || !args
            .ca
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        eprintln!("error: --ca: a CA name is [A-Za-z0-9_-] [usage]");
        return Ok(Exit::Usage);
    }
    let url = format!("{}/v1/ssh/{}/krl", client.base_url(), args.ca);
    // Network errors, 5xx and 429 are tried again (--attempts in all, a second apart).
    let mut tries = 0;
    let resp = loop {
        tries += 1;
        let last = tries >= client.retry.attempts.max(1);
        match client.http().get(&url).send().await {
            Ok(r) if r.status().as_u16() == 200 => break r,
            Ok(r) if !last && Exit::of_status(r.status().as_u16()) == Exit::Unavailable => {}
            Ok(r) => {
                let status = r.status().as_u16();
                eprintln!("error: the broker answered {status}; the previous KRL stays");
                return Ok(Exit::of_status(status));
            }
            Err(_) if !last => {}
            Err(_) => {
                eprintln!("error: cannot reach the broker; the previous KRL stays [unavailable]");
                return Ok(Exit::Unavailable);
            }
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    };
    let body = match resp.bytes().await {
        Ok(b) if b.len() <= MAX_KRL_BYTES => b,
        _ => {
            eprintln!(
                "error: the KRL could not be read whole; the previous KRL stays [unavailable]"
            );
            return Ok(Exit::Unavailable);
        }
    };
    if body.len() < 44 || body[..8] != KRL_MAGIC.to_be_bytes() {
        eprintln!("error: the answer is not an OpenSSH KRL; the previous KRL stays");
        return Ok(Exit::Failed);
    }
    match write_atomically(&args.out, &body) {
        Ok(()) => {
            eprintln!(
                "broker: {} bytes of KRL for ssh_ca {} in {}",
                body.len(),
                args.ca,
                args.out.display()
            );
            Ok(Exit::Ok)
        }
        Err(e) => {
            eprintln!("error: {}: {e} [io_error]", args.out.display());
            Ok(Exit::Failed)
        }
    }
}

/// Write beside the target, flush to disk, then rename over it: sshd sees the old file or the
/// new one, never a part. Mode 0644 (a KRL holds no secret; sshd reads it as root anyway).
fn write_atomically(out: &std::path::Path, body: &[u8]) -> std::io::Result<()> {
    let dir = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".broker-krl.")
        .tempfile_in(dir)?;
    tmp.write_all(body)?;
    tmp.as_file().sync_all()?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o644))?;
    }
    tmp.persist(out).map_err(|e| e.error)?;
    Ok(())
}

//! What `broker exchange`, `broker revoke` and `broker require` share: the broker address and
//! retry flags, progress notices, and the exit code of a client error.

use super::exit::{Exit, Failure};
use broker::client::{Client, ClientError, Notice};
use clap::Args;

#[derive(Args)]
pub struct ClientArgs {
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
    /// The client; a bad URL or timeout is a usage error.
    pub fn client(&self) -> Result<Client, Failure> {
        let built = humantime::parse_duration(&self.timeout)
            .map_err(anyhow::Error::from)
            .and_then(|timeout| Ok(Client::new(&self.broker_url, timeout)?));
        let mut c = built.map_err(|e| Failure::new(Exit::Usage, e))?;
        c.retry.attempts = self.attempts;
        Ok(c)
    }
}

/// `--attempts` is not a usable number of tries.
#[derive(Debug, thiserror::Error)]
enum AttemptsError {
    #[error(
        "0 tries would never ask the broker: attempts counts tries in all, the first included \
         (1 = no retry)"
    )]
    Zero,
    #[error("{0:?} is not a number of tries")]
    NotANumber(String),
}

/// `--attempts`: 0 would mean "never ask the broker", which no caller wants; refuse it.
fn parse_attempts(s: &str) -> Result<u32, AttemptsError> {
    match s.trim().parse::<u32>() {
        Ok(0) => Err(AttemptsError::Zero),
        Ok(n) => Ok(n),
        Err(_) => Err(AttemptsError::NotANumber(s.to_owned())),
    }
}

/// Progress notices on stderr.
pub fn notice() -> Notice {
    Box::new(|m| eprintln!("broker: {m}"))
}

/// Print a client error with its reason code; its exit code.
pub fn exit_of(e: &ClientError) -> Exit {
    eprintln!("error: {e} [{}]", e.reason_code());
    exit_code(e)
}

/// The exit code of a client error: refused (401/403, no job
/// token), unavailable (network, 5xx, 429 after the retries), usage (including a grant the job
/// cannot receive: several aws_sts without --out-dir, two credentials on one variable; a 400
/// or 404 answer), or failed (a file, a bad answer, no exchange in this job).
pub fn exit_code(e: &ClientError) -> Exit {
    match e {
        _ if e.is_refusal() => Exit::Refused,
        ClientError::NoToken(_) => Exit::Refused,
        ClientError::Network { .. } => Exit::Unavailable,
        ClientError::Refused { status, .. } => Exit::of_status(*status),
        ClientError::Usage(_) => Exit::Usage,
        _ => Exit::Failed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attempts_zero_and_junk_are_refused() {
        assert_eq!(parse_attempts(" 3 ").unwrap(), 3);
        assert!(
            parse_attempts("0")
                .unwrap_err()
                .to_string()
                .starts_with("0 tries would never ask the broker")
        );
        assert!(parse_attempts("x").is_err());
    }

    #[test]
    fn client_errors_map_onto_the_table() {
        let refused = |status| ClientError::Refused {
            status,
            code: "c".into(),
            message: "m".into(),
        };
        assert_eq!(exit_code(&refused(403)), Exit::Refused);
        assert_eq!(exit_code(&refused(503)), Exit::Unavailable);
        assert_eq!(exit_code(&refused(429)), Exit::Unavailable);
        assert_eq!(exit_code(&refused(400)), Exit::Usage);
        assert_eq!(exit_code(&refused(409)), Exit::Failed);
        assert_eq!(exit_code(&ClientError::NoToken("x".into())), Exit::Refused);
        assert_eq!(exit_code(&ClientError::Usage("x".into())), Exit::Usage);
        let net = ClientError::Network {
            url: "u".into(),
            detail: "d".into(),
        };
        assert_eq!(exit_code(&net), Exit::Unavailable);
    }
}

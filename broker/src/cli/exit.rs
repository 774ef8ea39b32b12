//! The one exit-code table of the `broker` command.
//!
//! Every subcommand ends through [`Exit`], so a CI script can branch on the same number for the
//! same kind of failure whichever subcommand it ran. The codes are grouped by what the caller
//! should do next, not by where the failure happened:
//!
//! - `2` fix the command line, the config or an input file it names (missing, unreadable or
//!   malformed; clap's own usage errors are `2` too);
//! - `3` change the job, the token or the policy: the broker said no, and asking again will not
//!   change its answer;
//! - `4` try again later: the broker or a target was unavailable, or the work is not finished;
//! - `1` read the output: a check failed, a file could not be written (or, in a job, the
//!   client's own files could not be read: `io_error`), anything else.
//!
//! `10` belongs to `broker policy diff` alone: "access widened" is an answer, not an error, and
//! must never be mistaken for one.

use std::fmt;
use std::process::ExitCode;

/// How a `broker` run ended. The discriminant is the process exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Everything asked was done (a check passed; `policy diff`: access not widened).
    Ok = 0,
    /// The command ran and failed: a check found problems (policy check or test, a broken
    /// audit chain), a file could not be written (or a job's own file read: `io_error`), or
    /// anything not below.
    Failed = 1,
    /// The command line, the config or an input file it names is wrong: missing, unreadable
    /// or malformed (including a grant the job cannot receive, such as two credentials on one
    /// variable, and a 400/404 answer to what was asked).
    Usage = 2,
    /// Refused: the broker answered 401/403, or the job has no token to send. Not retried.
    Refused = 3,
    /// Unavailable: a network error, 5xx or 429 after the retries, or a run left incomplete
    /// (some revocations failed, revoke-all ran out of calls). Running it again is the fix.
    Unavailable = 4,
    /// `policy diff` only: the head policy widens access.
    Widened = 10,
}

impl Exit {
    pub fn code(self) -> u8 {
        self as u8
    }

    /// The class of a broker's (or a CI platform's) HTTP answer that is not a success.
    pub fn of_status(status: u16) -> Self {
        match status {
            401 | 403 => Exit::Refused,
            429 | 500.. => Exit::Unavailable,
            400 | 404 | 405 | 413 | 415 | 422 => Exit::Usage,
            _ => Exit::Failed,
        }
    }
}

impl From<Exit> for ExitCode {
    fn from(e: Exit) -> Self {
        ExitCode::from(e.code())
    }
}

/// The table as `broker --help` shows it (and the README repeats).
pub const HELP: &str = "\
Exit codes (every subcommand):
  0   ok (policy diff: access not widened)
  1   failed: a check found problems, a file could not be written (io_error), anything else
  2   usage: fix the command line, the config or an input file it names
  3   refused: the broker answered 401/403 or there is no job token; change the job or policy
  4   unavailable: network error, 5xx or 429 after retries, or the run is incomplete; retry
  10  policy diff: the head policy widens access";

/// An error that ends a subcommand, with the exit code its kind calls for. Printed once, by
/// `main`, as `error: <message>`; the message never holds a secret.
#[derive(Debug)]
pub struct Failure {
    pub exit: Exit,
    pub error: anyhow::Error,
}

impl Failure {
    pub fn new(exit: Exit, error: impl Into<anyhow::Error>) -> Self {
        Self {
            exit,
            error: error.into(),
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#}", self.error)
    }
}

/// Unclassified errors are [`Exit::Failed`].
impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(e: E) -> Self {
        Self::new(Exit::Failed, e)
    }
}

/// What every subcommand's `run` returns.
pub type Outcome = Result<Exit, Failure>;

/// Classify an error at the place it arises: `config.load().exit(Exit::Usage)?`.
pub trait ExitOnError<T> {
    fn exit(self, exit: Exit) -> Result<T, Failure>;
}

/// The error's whole text is kept (`{:#}`: an `anyhow` chain, a typed error's message).
impl<T, E: fmt::Display> ExitOnError<T> for Result<T, E> {
    fn exit(self, exit: Exit) -> Result<T, Failure> {
        self.map_err(|e| Failure::new(exit, anyhow::anyhow!("{e:#}")))
    }
}

/// A usage error with this message.
pub fn usage(message: impl fmt::Display) -> Failure {
    Failure::new(Exit::Usage, anyhow::anyhow!("{message}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn help_lists_every_code_once() {
        for e in [
            Exit::Ok,
            Exit::Failed,
            Exit::Usage,
            Exit::Refused,
            Exit::Unavailable,
            Exit::Widened,
        ] {
            let line = format!("\n  {:<3} ", e.code());
            assert_eq!(HELP.matches(&line).count(), 1, "{e:?}");
        }
    }

    #[test]
    fn statuses_are_classified() {
        assert_eq!(Exit::of_status(401), Exit::Refused);
        assert_eq!(Exit::of_status(403), Exit::Refused);
        assert_eq!(Exit::of_status(429), Exit::Unavailable);
        assert_eq!(Exit::of_status(503), Exit::Unavailable);
        assert_eq!(Exit::of_status(400), Exit::Usage);
        assert_eq!(Exit::of_status(409), Exit::Failed);
    }

    #[test]
    fn policy_diff_keeps_its_documented_codes() {
        assert_eq!(Exit::Widened.code(), broker::policy::diff::EXIT_WIDENED);
        assert_eq!(Exit::Usage.code(), broker::policy::diff::EXIT_ERROR);
    }
}

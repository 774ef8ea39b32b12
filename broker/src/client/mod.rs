//! The job-side client: `broker exchange`, `broker revoke` and `broker require`.
//!
//! One binary serves both sides: a CI job (any image) runs `broker exchange` to trade its OIDC
//! token for credentials, `broker require` to fail when that did not happen (a GitLab job whose
//! own `before_script` replaced the component's), and `broker revoke` when it ends. The
//! variables and files a job gets per credential kind are [`Shaped`]; docs/pipelines.md lists
//! them for both integrations (the GitHub Action sets the same names).
//!
//! Invariants:
//! - Secrets (the job token, minted secret fields, the revocation token) live in [`Sensitive`]
//!   and reach only stdout (when the chosen format asks for them) or files created with mode
//!   0600. Errors and stderr carry the broker's reason code and fixed message, never a secret.
//! - Retries with backoff on network errors, 5xx and 429 (honouring `Retry-After`, capped);
//!   never on 4xx, so a 401/403 answer is final and shown at once.
//! - A field is secret unless its name is on a short public list: an unknown field of a new
//!   credential kind is treated as a secret (fail closed).
//! - A grant the job cannot receive whole (a shape that needs files without `--out-dir`, two
//!   credentials on one variable, a file that cannot be written) is revoked, not left alive.
//!
//! Layout: [`token`] (where the job token comes from), [`request`] (what is asked for),
//! [`grant`] (what came back, secret unless public), [`shape`] (the variables and files per
//! kind, and their renderings), [`files`] (private files, `broker require`), [`retry`] (the
//! backoff schedule) and [`api`] (the calls, with retries). The CLI side is `cli/` in the binary.

mod api;
mod files;
mod grant;
mod request;
mod retry;
mod shape;
mod token;

pub use api::{Client, Exchanged, Notice};
pub use files::{require_exchanged, write_dir, write_private};
pub use grant::{Credential, FieldValue, Grant};
pub use request::{CredentialRequest, InvalidRequest, env_stem};
pub use retry::RetryPolicy;
pub use shape::{
    AWS_CONFIG_FILE, AWS_CREDENTIALS_FILE, Format, PGPASS_FILE, Shaped, UnknownFormat, render_json,
    shell_quote,
};
pub use token::{TokenSource, runner_http};

use serde_json::Value;
use std::path::Path;

/// Errors of the client. None carries a secret.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no job token: {0}")]
    NoToken(String),
    #[error("requesting the job's OIDC token from the runner failed: {0}")]
    RunnerToken(String),
    #[error("cannot reach the broker at {url}: {detail}")]
    Network { url: String, detail: String },
    #[error("the broker refused ({status} {code}): {message}")]
    Refused {
        status: u16,
        code: String,
        message: String,
    },
    #[error("the broker sent an unexpected response: {0}")]
    BadResponse(String),
    #[error("{0}")]
    Usage(String),
    #[error("{path}: {detail}")]
    Io { path: String, detail: String },
    #[error("no broker exchange ran in this job: {0}")]
    NoExchange(String),
}

impl ClientError {
    /// Stable snake_case reason code. For a refusal, the broker's own code.
    pub fn reason_code(&self) -> &str {
        match self {
            ClientError::NoToken(_) => "no_token",
            ClientError::RunnerToken(_) => "runner_token_failed",
            ClientError::Network { .. } => "broker_unreachable",
            ClientError::Refused { code, .. } => code,
            ClientError::BadResponse(_) => "bad_response",
            ClientError::Usage(_) => "usage",
            ClientError::Io { .. } => "io_error",
            ClientError::NoExchange(_) => "no_exchange",
        }
    }

    /// 401/403: the job or the policy must change; retrying will not help.
    pub fn is_refusal(&self) -> bool {
        matches!(self, ClientError::Refused { status, .. } if *status == 401 || *status == 403)
    }
}

pub(crate) fn io_err(path: &Path, e: std::io::Error) -> ClientError {
    ClientError::Io {
        path: path.display().to_string(),
        detail: e.to_string(),
    }
}

/// A refusal explained for a person: what to do, and the claims the policy saw.
pub fn explain_refusal(
    err: &ClientError,
    claims: Option<&serde_json::Map<String, Value>>,
) -> String {
    let mut out = String::new();
    let hint = match err.reason_code() {
        "policy_denied" | "invalid_claim_value" | "claims_too_large" => {
            "no policy rule allows this job the credential: compare the claims below with the \
             rule's `when` (`broker policy explain --claims FILE` shows which conditions fail)"
        }
        "bad_audience" => "request the job token for the broker's audience",
        "token_expired" | "token_too_old" | "token_not_yet_valid" => {
            "request a fresh job token just before the exchange"
        }
        "token_replayed" => "each job token can be exchanged once: request a fresh one",
        "unknown_issuer" | "unknown_key" | "bad_signature" | "unsupported_algorithm" => {
            "the broker does not trust this token's issuer or key: check the broker's `issuers:`"
        }
        "missing_token" | "malformed_token" => {
            "no usable job token was sent (GitHub: `permissions: id-token: write`; \
             GitLab: `id_tokens:`)"
        }
        "invalid_revocation_token" => "the revocation token is wrong or belongs to no grant",
        _ => "",
    };
    if !hint.is_empty() {
        out.push_str(&format!("hint: {hint}\n"));
    }
    if let Some(c) = claims {
        out.push_str("claims the broker saw (unverified copy of the job token's claims):\n");
        for (k, v) in c {
            out.push_str(&format!("  {k}: {v}\n"));
        }
    }
    out
}

#[cfg(test)]
mod tests;

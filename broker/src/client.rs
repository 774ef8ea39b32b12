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

use crate::secret::Sensitive;
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Response fields that are shown as-is; everything else is a secret.
const PUBLIC_FIELDS: &[&str] = &[
    "kind",
    "expires_at",
    "token_type",
    "audience",
    "scope",
    "token_id",
    "username",
    "user",
    "host",
    "port",
    "database",
    "region",
    "role_arn",
    "session_name",
    "expiration",
    "account_id",
];

/// The most a `Retry-After` header may make us wait.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(30);

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

fn io_err(path: &Path, e: std::io::Error) -> ClientError {
    ClientError::Io {
        path: path.display().to_string(),
        detail: e.to_string(),
    }
}

/// Retry schedule: `attempts` tries in all, waiting `base * 2^n` (capped at `max`, with jitter)
/// between them.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    pub attempts: u32,
    pub base: Duration,
    pub max: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempts: 5,
            base: Duration::from_millis(500),
            max: Duration::from_secs(10),
        }
    }
}

impl RetryPolicy {
    /// The wait before retry number `n` (0-based), with up to 25% random jitter so many jobs
    /// failing together do not retry in lockstep.
    pub fn delay(&self, n: u32, retry_after: Option<Duration>) -> Duration {
        let exp = self
            .base
            .saturating_mul(2u32.saturating_pow(n.min(16)))
            .min(self.max);
        let jitter = if exp.is_zero() {
            Duration::ZERO
        } else {
            let q = exp.as_millis().min(u128::from(u32::MAX)) as u64 / 4;
            Duration::from_millis(rand::random_range(0..=q))
        };
        let wait = exp + jitter;
        match retry_after {
            Some(ra) => wait.max(ra.min(MAX_RETRY_AFTER)),
            None => wait,
        }
    }
}

/// Where the job's OIDC token comes from. Read again on every attempt, so a runner-issued token
/// is fresh each time (the broker refuses a replayed token).
#[derive(Debug, Clone)]
pub enum TokenSource {
    Value(Sensitive),
    /// An environment variable (GitLab: the `id_tokens:` variable).
    Env(String),
    File(PathBuf),
    /// GitHub Actions: `ACTIONS_ID_TOKEN_REQUEST_URL` / `ACTIONS_ID_TOKEN_REQUEST_TOKEN`.
    GithubRunner {
        audience: String,
    },
}

impl TokenSource {
    /// The token. `env` is the process environment (a parameter so tests need not mutate it).
    pub async fn fetch(
        &self,
        http: &reqwest::Client,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Sensitive, ClientError> {
        let tok = match self {
            TokenSource::Value(v) => v.clone(),
            TokenSource::Env(name) => Sensitive::new(env(name).ok_or_else(|| {
                ClientError::NoToken(format!("environment variable {name} is not set"))
            })?),
            TokenSource::File(p) => {
                Sensitive::new(std::fs::read_to_string(p).map_err(|e| io_err(p, e))?)
            }
            TokenSource::GithubRunner { audience } => {
                return github_runner_token(http, audience, env).await;
            }
        };
        let trimmed = tok.expose().trim();
        if trimmed.is_empty() {
            return Err(ClientError::NoToken("the job token is empty".into()));
        }
        Ok(Sensitive::new(trimmed.to_owned()))
    }
}

async fn github_runner_token(
    http: &reqwest::Client,
    audience: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Sensitive, ClientError> {
    let (Some(url), Some(bearer)) = (
        env("ACTIONS_ID_TOKEN_REQUEST_URL"),
        env("ACTIONS_ID_TOKEN_REQUEST_TOKEN"),
    ) else {
        return Err(ClientError::NoToken(
            "ACTIONS_ID_TOKEN_REQUEST_URL is not set: give the job `permissions: id-token: write`"
                .into(),
        ));
    };
    let mut u = url::Url::parse(&url).map_err(|_| {
        ClientError::RunnerToken("ACTIONS_ID_TOKEN_REQUEST_URL is not a URL".into())
    })?;
    u.query_pairs_mut().append_pair("audience", audience);
    let resp = http
        .get(u)
        .bearer_auth(bearer)
        .send()
        .await
        .map_err(|e| ClientError::RunnerToken(without_url(&e)))?;
    let status = resp.status();
    if !status.is_success() {
        return Err(ClientError::RunnerToken(format!(
            "HTTP {}",
            status.as_u16()
        )));
    }
    let body: Value = resp
        .json()
        .await
        .map_err(|_| ClientError::RunnerToken("the answer is not JSON".into()))?;
    match body.get("value").and_then(Value::as_str) {
        Some(v) if !v.is_empty() => Ok(Sensitive::new(v.to_owned())),
        _ => Err(ClientError::RunnerToken("the answer has no `value`".into())),
    }
}

/// reqwest's error text without the URL (a runner URL carries no secret, but keep it short).
fn without_url(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection failed"
    } else {
        "request failed"
    };
    kind.to_owned()
}

/// One requested credential: its name and, optionally, the environment variable that should
/// hold its main secret (`deploy-api=API_TOKEN`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialRequest {
    pub name: String,
    pub env_name: Option<String>,
}

impl std::str::FromStr for CredentialRequest {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (name, env_name) = match s.split_once('=') {
            Some((n, v)) => (n.trim(), Some(v.trim().to_owned())),
            None => (s.trim(), None),
        };
        if name.is_empty() {
            return Err("empty credential name".into());
        }
        if let Some(v) = &env_name
            && !valid_env_name(v)
        {
            return Err(format!("{v:?} is not a valid environment variable name"));
        }
        Ok(Self {
            name: name.to_owned(),
            env_name,
        })
    }
}

fn valid_env_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// `deploy-api` → `DEPLOY_API`.
pub fn env_stem(name: &str) -> String {
    let mut s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    if s.starts_with(|c: char| c.is_ascii_digit()) {
        s.insert(0, '_');
    }
    s
}

/// A value of a minted credential.
#[derive(Debug, Clone)]
pub enum FieldValue {
    Public(String),
    Secret(Sensitive),
}

impl FieldValue {
    pub fn expose(&self) -> &str {
        match self {
            FieldValue::Public(s) => s,
            FieldValue::Secret(s) => s.expose(),
        }
    }
    pub fn is_secret(&self) -> bool {
        matches!(self, FieldValue::Secret(_))
    }
}

/// One credential of a grant.
#[derive(Debug, Clone)]
pub struct Credential {
    pub name: String,
    pub kind: String,
    pub fields: BTreeMap<String, FieldValue>,
}

/// What `/v1/exchange` returned.
#[derive(Debug, Clone)]
pub struct Grant {
    pub grant_id: String,
    pub expires_at: String,
    pub revocation_token: Sensitive,
    pub credentials: Vec<Credential>,
}

impl Grant {
    /// Parse the broker's answer. Values that are not strings (numbers, lists) are kept as
    /// their JSON text.
    pub fn from_json(v: &Value) -> Result<Self, ClientError> {
        let s = |k: &str| {
            v.get(k)
                .and_then(Value::as_str)
                .map(str::to_owned)
                .ok_or_else(|| ClientError::BadResponse(format!("missing `{k}`")))
        };
        let grant_id = s("grant_id")?;
        let expires_at = s("expires_at")?;
        let revocation_token = Sensitive::new(s("revocation_token")?);
        let creds = v
            .get("credentials")
            .and_then(Value::as_object)
            .ok_or_else(|| ClientError::BadResponse("missing `credentials`".into()))?;
        let mut credentials = Vec::new();
        for (name, c) in creds {
            let obj = c
                .as_object()
                .ok_or_else(|| ClientError::BadResponse(format!("credential {name:?}")))?;
            let kind = obj
                .get("kind")
                .and_then(Value::as_str)
                .unwrap_or("unknown")
                .to_owned();
            let mut fields = BTreeMap::new();
            for (k, val) in obj {
                let text = match val {
                    Value::String(s) => s.clone(),
                    Value::Null => continue,
                    other => other.to_string(),
                };
                let fv = if PUBLIC_FIELDS.contains(&k.as_str()) {
                    FieldValue::Public(text)
                } else {
                    FieldValue::Secret(Sensitive::new(text))
                };
                fields.insert(k.clone(), fv);
            }
            credentials.push(Credential {
                name: name.clone(),
                kind,
                fields,
            });
        }
        Ok(Self {
            grant_id,
            expires_at,
            revocation_token,
            credentials,
        })
    }

    /// The environment variables and private files a job gets, in a stable order. See
    /// [`Shaped`] for the rules per kind. `dir` is where files go (`--out-dir`): without it, no
    /// `.pgpass` is written, and several `aws_sts` credentials (which exist only as profiles in
    /// files) are refused. A result where two credentials would set the same variable is refused
    /// too (fail closed: a silently overwritten credential is a wrong credential).
    pub fn shape(
        &self,
        requests: &[CredentialRequest],
        dir: Option<&Path>,
    ) -> Result<Shaped, ClientError> {
        let mut per_kind: BTreeMap<&str, usize> = BTreeMap::new();
        for c in &self.credentials {
            *per_kind.entry(c.kind.as_str()).or_default() += 1;
        }
        let several = |kind: &str| per_kind.get(kind).copied().unwrap_or(0) > 1;
        let public = |s: String| FieldValue::Public(s);
        let mut vars: Vec<(String, FieldValue)> = Vec::new();
        let mut files: Vec<(String, FieldValue)> = Vec::new();
        let mut pgpass = String::new();
        let mut pgpass_vars = Vec::new();
        let mut aws_credentials = String::new();
        let mut aws_config = String::new();
        for c in &self.credentials {
            let custom = requests
                .iter()
                .find(|r| r.name == c.name)
                .and_then(|r| r.env_name.clone());
            let stem = env_stem(&c.name);
            let field = |k: &str| c.fields.get(k).cloned();
            match c.kind.as_str() {
                "api_token" => {
                    if let Some(t) = field("token") {
                        vars.push((custom.unwrap_or(format!("{stem}_TOKEN")), t));
                    }
                }
                "postgres" => {
                    let prefix = if several("postgres") {
                        format!("{stem}_")
                    } else {
                        String::new()
                    };
                    let url = field("database_url").or_else(|| field("url"));
                    let user = field("username").or_else(|| field("user"));
                    for (var, v) in [
                        ("PGHOST", field("host")),
                        ("PGPORT", field("port")),
                        ("PGDATABASE", field("database")),
                        ("PGUSER", user.clone()),
                        ("PGPASSWORD", field("password")),
                        (
                            "PGSSLMODE",
                            url.as_ref()
                                .and_then(|u| sslmode_of(u.expose()))
                                .map(public),
                        ),
                    ] {
                        if let Some(v) = v {
                            vars.push((format!("{prefix}{var}"), v));
                        }
                    }
                    if let Some(u) = url {
                        vars.push((custom.unwrap_or(format!("{prefix}DATABASE_URL")), u));
                    }
                    // `.pgpass` only goes with an output directory.
                    if let (Some(_), Some(h), Some(p), Some(d), Some(u), Some(pw)) = (
                        dir,
                        field("host"),
                        field("port"),
                        field("database"),
                        user,
                        field("password"),
                    ) {
                        pgpass.push_str(&pgpass_line(&c.name, &[&h, &p, &d, &u, &pw])?);
                        pgpass_vars.push(format!("{prefix}PGPASSFILE"));
                    }
                }
                "aws_sts" => {
                    let expiration = field("expiration").or_else(|| field("expires_at"));
                    let account =
                        field("account_id")
                            .map(|a| a.expose().to_owned())
                            .or_else(|| {
                                ["role_arn", "assumed_role_arn"]
                                    .iter()
                                    .find_map(|k| field(k).and_then(|a| account_of_arn(a.expose())))
                            });
                    if several("aws_sts") {
                        if !valid_profile_name(&c.name) {
                            return Err(ClientError::BadResponse(format!(
                                "credential name {:?} cannot be an AWS profile name",
                                c.name
                            )));
                        }
                        aws_credentials.push_str(&format!("[{}]\n", c.name));
                        for (k, key) in [
                            ("access_key_id", "aws_access_key_id"),
                            ("secret_access_key", "aws_secret_access_key"),
                            ("session_token", "aws_session_token"),
                        ] {
                            if let Some(v) = field(k) {
                                let v = one_line(&c.name, k, v.expose())?;
                                aws_credentials.push_str(&format!("{key} = {v}\n"));
                            }
                        }
                        aws_config.push_str(&format!("[profile {}]\n", c.name));
                        if let Some(r) = field("region") {
                            let r = one_line(&c.name, "region", r.expose())?;
                            aws_config.push_str(&format!("region = {r}\n"));
                        }
                        continue;
                    }
                    for (var, v) in [
                        ("AWS_ACCESS_KEY_ID", field("access_key_id")),
                        ("AWS_SECRET_ACCESS_KEY", field("secret_access_key")),
                        ("AWS_SESSION_TOKEN", field("session_token")),
                        ("AWS_REGION", field("region")),
                        ("AWS_DEFAULT_REGION", field("region")),
                        // The expiration and the account are not secret: tools print them.
                        (
                            "AWS_CREDENTIAL_EXPIRATION",
                            expiration.map(|e| public(e.expose().to_owned())),
                        ),
                        ("AWS_ACCOUNT_ID", account.map(public)),
                    ] {
                        if let Some(v) = v {
                            vars.push((var.to_owned(), v));
                        }
                    }
                }
                _ => {
                    for (k, v) in &c.fields {
                        if k == "kind" {
                            continue;
                        }
                        vars.push((format!("{stem}_{}", env_stem(k)), v.clone()));
                    }
                }
            }
        }
        if !pgpass.is_empty()
            && let Some(dir) = dir
        {
            let path = dir.join(PGPASS_FILE).display().to_string();
            for v in pgpass_vars {
                vars.push((v, public(path.clone())));
            }
            files.push((
                PGPASS_FILE.into(),
                FieldValue::Secret(Sensitive::new(pgpass)),
            ));
        }
        if !aws_credentials.is_empty() {
            let Some(dir) = dir else {
                return Err(ClientError::Usage(
                    "several aws_sts credentials are given as named profiles in files: give \
                     --out-dir"
                        .into(),
                ));
            };
            for (var, file, text) in [
                (
                    "AWS_SHARED_CREDENTIALS_FILE",
                    AWS_CREDENTIALS_FILE,
                    FieldValue::Secret(Sensitive::new(aws_credentials)),
                ),
                ("AWS_CONFIG_FILE", AWS_CONFIG_FILE, public(aws_config)),
            ] {
                vars.push((var.into(), public(dir.join(file).display().to_string())));
                files.push((file.into(), text));
            }
        }
        vars.push(("BROKER_GRANT_ID".into(), public(self.grant_id.clone())));
        vars.push((
            "BROKER_REVOCATION_TOKEN".into(),
            FieldValue::Secret(self.revocation_token.clone()),
        ));
        let mut seen = std::collections::BTreeSet::new();
        for (k, _) in &vars {
            if !seen.insert(k.as_str()) {
                return Err(ClientError::Usage(format!(
                    "two credentials would set {k}: give one another variable with NAME=VAR"
                )));
            }
        }
        Ok(Shaped { vars, files })
    }

    /// The variables alone, for callers without an output directory (no `.pgpass`); a shape
    /// that needs files, or where two credentials collide, is an error.
    pub fn env_vars(
        &self,
        requests: &[CredentialRequest],
    ) -> Result<Vec<(String, FieldValue)>, ClientError> {
        Ok(self.shape(requests, None)?.vars)
    }
}

/// `.pgpass` in the output directory: one line per postgres credential.
pub const PGPASS_FILE: &str = ".pgpass";
/// The AWS shared credentials file (several `aws_sts` credentials), one profile each.
pub const AWS_CREDENTIALS_FILE: &str = "aws-credentials";
/// The AWS config file beside it (the region of each profile).
pub const AWS_CONFIG_FILE: &str = "aws-config";

/// What a job gets from a grant.
///
/// - `api_token` → `<NAME>_TOKEN` (`deploy-api` → `DEPLOY_API_TOKEN`).
/// - `postgres` → `PGHOST`, `PGPORT`, `PGDATABASE`, `PGUSER`, `PGPASSWORD`, `PGSSLMODE` (from the
///   URL's `sslmode`) and `DATABASE_URL`; with an output directory also `.pgpass` (0600) and
///   `PGPASSFILE` pointing at it.
/// - `aws_sts` → `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION`
///   and `AWS_DEFAULT_REGION`, `AWS_CREDENTIAL_EXPIRATION` (public), `AWS_ACCOUNT_ID` (public;
///   from `account_id` or the role ARN) when known.
/// - any other kind → `<NAME>_<FIELD>` for every field.
///
/// Several credentials of one kind never share names: several `postgres` credentials each get
/// their variables prefixed with `<NAME>_` (`ANALYTICS_DB_PGUSER`, `ANALYTICS_DB_DATABASE_URL`,
/// `ANALYTICS_DB_PGPASSFILE`); several `aws_sts` credentials get no `AWS_*` key variables at all
/// but one profile each (profile name = credential name) in a private
/// `AWS_SHARED_CREDENTIALS_FILE` and `AWS_CONFIG_FILE`. `NAME=VAR` renames the main secret's
/// variable (`api_token`: the token; `postgres`: `DATABASE_URL`). Last come `BROKER_GRANT_ID`
/// and `BROKER_REVOCATION_TOKEN`.
#[derive(Debug, Clone)]
pub struct Shaped {
    pub vars: Vec<(String, FieldValue)>,
    /// Files to write into the output directory (mode 0600), by file name.
    pub files: Vec<(String, FieldValue)>,
}

impl Shaped {
    /// `env` or `dotenv` lines of the variables.
    /// `env` lines (`export NAME='value'`), or `dotenv` lines; `json` is not a shape of the
    /// variables and gives the `env` lines (see [`render`] for the broker's JSON answer).
    pub fn render(&self, format: Format) -> String {
        match format {
            Format::Env | Format::Json => self
                .vars
                .iter()
                .map(|(k, v)| format!("export {k}={}\n", shell_quote(v.expose())))
                .collect(),
            Format::Dotenv => self
                .vars
                .iter()
                .map(|(k, v)| format!("{k}={}\n", dotenv_value(v.expose())))
                .collect(),
        }
    }
}

/// The `sslmode` query parameter of a connection URL.
fn sslmode_of(url: &str) -> Option<String> {
    let u = url::Url::parse(url).ok()?;
    u.query_pairs()
        .find(|(k, _)| k == "sslmode")
        .map(|(_, v)| v.into_owned())
        .filter(|v| !v.is_empty())
}

/// `arn:aws:iam::123456789012:role/x` → `123456789012`.
fn account_of_arn(arn: &str) -> Option<String> {
    let account = arn.strip_prefix("arn:")?.split(':').nth(3)?;
    (account.len() == 12 && account.chars().all(|c| c.is_ascii_digit())).then(|| account.to_owned())
}

/// A credential name usable as an AWS profile name in an INI section header.
fn valid_profile_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

/// A value written into a line-based file (`.pgpass`, the AWS INI files): a line break would
/// let an answer add lines of its own, so it is refused. The error names the field, not the value.
fn one_line<'a>(credential: &str, field: &str, v: &'a str) -> Result<&'a str, ClientError> {
    if v.chars().any(char::is_control) {
        return Err(ClientError::BadResponse(format!(
            "credential {credential:?}: field `{field}` holds a control character"
        )));
    }
    Ok(v)
}

/// One `.pgpass` line: `host:port:database:user:password`, `:` and `\` escaped.
fn pgpass_line(credential: &str, parts: &[&FieldValue]) -> Result<String, ClientError> {
    let mut out = Vec::new();
    for p in parts {
        let v = one_line(credential, "postgres", p.expose())?;
        out.push(v.replace('\\', "\\\\").replace(':', "\\:"));
    }
    let mut line = out.join(":");
    line.push('\n');
    Ok(line)
}

/// Output formats of `broker exchange`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `export NAME='value'` lines for `eval`.
    Env,
    /// `NAME=value` lines (values without newlines are written bare; others are quoted).
    Dotenv,
    /// The broker's response as one JSON object.
    Json,
}

impl std::str::FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "env" => Ok(Format::Env),
            "dotenv" => Ok(Format::Dotenv),
            "json" => Ok(Format::Json),
            _ => Err(format!("unknown format {s:?} (env, json, dotenv)")),
        }
    }
}

/// POSIX shell single quoting: safe for any value.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn dotenv_value(s: &str) -> String {
    if s.chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_.:/+=@,~%".contains(c))
    {
        s.to_owned()
    } else {
        format!(
            "\"{}\"",
            s.replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n")
        )
    }
}

/// The broker's JSON answer for stdout (`--format json`). This, like [`Shaped::render`], is
/// where secrets are written out, on purpose: the caller captures stdout.
pub fn render_json(raw: &Value) -> String {
    format!("{raw}\n")
}

/// Create (or replace) `path` with mode 0600 and write `text`.
pub fn write_private(path: &Path, text: &str) -> Result<(), ClientError> {
    // Remove first so an existing file with wider permissions is not reused.
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(path, e)),
    }
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts.open(path).map_err(|e| io_err(path, e))?;
    f.write_all(text.as_bytes()).map_err(|e| io_err(path, e))
}

/// Write every secret of the grant into `dir` (created with mode 0700): one file per variable
/// (`DIR/<VAR>`, mode 0600), the shape's own files (`.pgpass`, the AWS profile files), `DIR/env`
/// (the `export` lines) and `DIR/dotenv`. `shaped` must come from `grant.shape(_, Some(dir))`.
/// Returns the paths.
pub fn write_dir(dir: &Path, shaped: &Shaped) -> Result<Vec<PathBuf>, ClientError> {
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
    b.create(dir).map_err(|e| io_err(dir, e))?;
    // An existing directory keeps its mode on create: make sure it is private.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| io_err(dir, e))?;
    }
    let mut written = Vec::new();
    for (name, v) in shaped.vars.iter().chain(&shaped.files) {
        let p = dir.join(name);
        write_private(&p, v.expose())?;
        written.push(p);
    }
    for (file, format) in [("env", Format::Env), ("dotenv", Format::Dotenv)] {
        let p = dir.join(file);
        write_private(&p, &shaped.render(format))?;
        written.push(p);
    }
    Ok(written)
}

/// `broker require`: the job's exchange ran. A job whose own `before_script` replaced the
/// component's has neither the secrets directory nor `BROKER_GRANT_ID` from its `env` file; the
/// check fails so the job fails instead of running without its credentials. Returns the grant id.
pub fn require_exchanged(
    dir: Option<&Path>,
    grant_id_env: Option<&str>,
) -> Result<String, ClientError> {
    let missing = |why: &str| {
        ClientError::NoExchange(format!(
            "{why}: the job's credentials were never fetched. A job with its own before_script \
             must start it with `!reference [.broker-credentials, before_script]`"
        ))
    };
    let Some(dir) = dir else {
        return Err(missing("BROKER_SECRETS_DIR is not set"));
    };
    let file = dir.join("BROKER_GRANT_ID");
    let on_disk = match std::fs::read_to_string(&file) {
        Ok(s) => s.trim().to_owned(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(missing(&format!("{} does not exist", file.display())));
        }
        Err(e) => return Err(io_err(&file, e)),
    };
    match grant_id_env.map(str::trim) {
        Some(g) if !g.is_empty() && g == on_disk => Ok(on_disk),
        Some(g) if !g.is_empty() => Err(missing(
            "BROKER_GRANT_ID does not match the secrets directory's grant",
        )),
        _ => Err(missing(&format!(
            "BROKER_GRANT_ID is not set ({}/env was not sourced)",
            dir.display()
        ))),
    }
}

/// The broker endpoint and the retry schedule.
#[derive(Debug, Clone)]
pub struct Client {
    base: String,
    http: reqwest::Client,
    pub retry: RetryPolicy,
}

/// The outcome of a successful exchange: the parsed grant and the raw JSON.
#[derive(Debug)]
pub struct Exchanged {
    pub grant: Grant,
    raw: Value,
}

impl Exchanged {
    /// The broker's JSON answer (contains secrets).
    pub fn raw(&self) -> &Value {
        &self.raw
    }
}

/// Progress notices (a retry and its wait) for the caller to show; they never hold a secret.
pub type Notice = Box<dyn Fn(&str) + Send + Sync>;

impl Client {
    pub fn new(broker_url: &str, timeout: Duration) -> Result<Self, ClientError> {
        let u = url::Url::parse(broker_url)
            .map_err(|_| ClientError::Usage(format!("{broker_url:?} is not a URL")))?;
        if !matches!(u.scheme(), "http" | "https") {
            return Err(ClientError::Usage("the broker URL must be http(s)".into()));
        }
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .user_agent(concat!("broker-client/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ClientError::Usage(format!("HTTP client: {e}")))?;
        Ok(Self {
            base: broker_url.trim_end_matches('/').to_owned(),
            http,
            retry: RetryPolicy::default(),
        })
    }

    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// `POST /v1/exchange`, with retries. The token is fetched anew on every attempt.
    pub async fn exchange(
        &self,
        token: &TokenSource,
        env: &(dyn Fn(&str) -> Option<String> + Sync),
        credentials: &[CredentialRequest],
        ttl: Option<&str>,
        notice: &Notice,
    ) -> Result<Exchanged, ClientError> {
        let mut body = serde_json::json!({
            "credentials": credentials.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(),
        });
        if let Some(t) = ttl {
            body["ttl"] = Value::String(t.to_owned());
        }
        let url = format!("{}/v1/exchange", self.base);
        let (u, b) = (&url, &body);
        let raw = self
            .with_retries(&url, notice, || async move {
                let tok = token.fetch(&self.http, env).await?;
                Ok(self.http.post(u).bearer_auth(tok.expose()).json(b))
            })
            .await?;
        let grant = Grant::from_json(&raw)?;
        Ok(Exchanged { grant, raw })
    }

    /// `POST /v1/revoke`, with retries. Returns the grant's status (`revoked`, ...).
    pub async fn revoke(
        &self,
        revocation_token: &Sensitive,
        notice: &Notice,
    ) -> Result<String, ClientError> {
        let url = format!("{}/v1/revoke", self.base);
        let u = &url;
        let v = self
            .with_retries(&url, notice, || async move {
                Ok(self.http.post(u).bearer_auth(revocation_token.expose()))
            })
            .await?;
        Ok(v.get("status")
            .and_then(Value::as_str)
            .unwrap_or("unknown")
            .to_owned())
    }

    async fn with_retries<F, Fut>(
        &self,
        url: &str,
        notice: &Notice,
        build: F,
    ) -> Result<Value, ClientError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<reqwest::RequestBuilder, ClientError>>,
    {
        // Zero tries would send nothing and could only "fail" without asking: refuse it
        // rather than quietly trying once.
        let attempts = self.retry.attempts;
        if attempts == 0 {
            return Err(ClientError::Usage(
                "attempts must be at least 1 (tries in all, the first included)".into(),
            ));
        }
        let mut n = 0;
        loop {
            n += 1;
            let (err, retry_after) = match build().await?.send().await {
                Err(e) => (
                    ClientError::Network {
                        url: url.to_owned(),
                        detail: without_url(&e),
                    },
                    None,
                ),
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    let retry_after = resp
                        .headers()
                        .get(reqwest::header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .map(Duration::from_secs);
                    let body: Value = resp.json().await.unwrap_or(Value::Null);
                    if (200..300).contains(&status) {
                        return Ok(body);
                    }
                    let err = refused(status, &body);
                    // `store_rejected`: the store refused this request's data; a retry fails
                    // the same way.
                    if !(status == 429 || status >= 500) || err.reason_code() == "store_rejected" {
                        return Err(err);
                    }
                    (err, retry_after)
                }
            };
            if n >= attempts {
                return Err(err);
            }
            let wait = self.retry.delay(n - 1, retry_after);
            notice(&format!(
                "attempt {n}/{attempts} failed ({}); retrying in {:.1}s",
                err.reason_code(),
                wait.as_secs_f64()
            ));
            tokio::time::sleep(wait).await;
        }
    }
}

/// The broker's `{"error", "message"}`; messages are fixed texts without secrets, but cap
/// their length in case something else answers on that address.
fn refused(status: u16, body: &Value) -> ClientError {
    let field = |k: &str, default: &str| {
        body.get(k)
            .and_then(Value::as_str)
            .unwrap_or(default)
            .chars()
            .filter(|c| !c.is_control())
            .take(300)
            .collect::<String>()
    };
    ClientError::Refused {
        status,
        code: field("error", "http_error"),
        message: field("message", "no message"),
    }
}

/// The claims of a JWT, decoded WITHOUT verification, for explaining a refusal: the claims are
/// what the policy saw, and are not secret (the token's signature is what makes it a
/// credential, and it is not shown).
pub fn unverified_claims(token: &str) -> Option<serde_json::Map<String, Value>> {
    use base64::Engine;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    match serde_json::from_slice(&bytes).ok()? {
        Value::Object(m) => Some(m),
        _ => None,
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
mod tests {
    use super::*;
    use axum::Router;
    use axum::http::StatusCode;
    use axum::response::IntoResponse;
    use axum::routing::post;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn grant_json() -> Value {
        serde_json::json!({
            "grant_id": "0190-abc",
            "expires_at": "2030-01-01T00:00:00Z",
            "revocation_token": "brk_rvk_SECRETREVOKE",
            "credentials": {
                "deploy-api": {"kind": "api_token", "token": "eyJSECRETTOKEN", "token_type": "Bearer",
                               "audience": "https://deploy", "scope": "deploy:x", "expires_at": "2030-01-01T00:00:00Z"},
                "db": {"kind": "postgres", "host": "db.internal", "port": 5432, "database": "d",
                       "username": "u", "password": "SECRETPW",
                       "database_url": "postgresql://u:SECRETPW@db.internal:5432/d?sslmode=verify-full",
                       "expires_at": "2030-01-01T00:00:00Z"},
                "aws": {"kind": "aws_sts", "access_key_id": "AKIA1", "secret_access_key": "SECRETAWS",
                        "session_token": "SECRETSESSION", "region": "eu-west-1",
                        "expiration": "2030-01-01T00:15:00Z"},
                "thing": {"kind": "vault", "secret_id": "SECRETTHING", "ttl_seconds": 60}
            }
        })
    }

    fn vars(g: &Grant, reqs: &[CredentialRequest]) -> BTreeMap<String, (String, bool)> {
        g.env_vars(reqs)
            .unwrap()
            .into_iter()
            .map(|(k, v)| (k, (v.expose().to_owned(), v.is_secret())))
            .collect()
    }

    #[test]
    fn env_vars_per_kind_and_secrets_classified() {
        let g = Grant::from_json(&grant_json()).unwrap();
        let v = vars(&g, &[]);
        assert_eq!(v["DEPLOY_API_TOKEN"], ("eyJSECRETTOKEN".into(), true));
        assert_eq!(
            v["DATABASE_URL"],
            (
                "postgresql://u:SECRETPW@db.internal:5432/d?sslmode=verify-full".into(),
                true
            )
        );
        assert_eq!(v["PGHOST"], ("db.internal".into(), false));
        assert_eq!(v["PGPORT"], ("5432".into(), false));
        assert_eq!(v["PGDATABASE"], ("d".into(), false));
        assert_eq!(v["PGUSER"], ("u".into(), false));
        assert_eq!(v["PGPASSWORD"], ("SECRETPW".into(), true));
        assert_eq!(v["PGSSLMODE"], ("verify-full".into(), false));
        // Without an output directory there is no .pgpass.
        assert!(!v.contains_key("PGPASSFILE"));
        assert_eq!(v["AWS_ACCESS_KEY_ID"], ("AKIA1".into(), true));
        assert_eq!(v["AWS_SECRET_ACCESS_KEY"], ("SECRETAWS".into(), true));
        assert_eq!(v["AWS_SESSION_TOKEN"], ("SECRETSESSION".into(), true));
        assert_eq!(v["AWS_REGION"], ("eu-west-1".into(), false));
        assert_eq!(v["AWS_DEFAULT_REGION"], ("eu-west-1".into(), false));
        assert_eq!(
            v["AWS_CREDENTIAL_EXPIRATION"],
            ("2030-01-01T00:15:00Z".into(), false)
        );
        // Neither the answer's account_id nor a role ARN: no account variable.
        assert!(!v.contains_key("AWS_ACCOUNT_ID"));
        assert!(
            !v.keys()
                .any(|k| k.starts_with("AWS_") && k.contains("FILE"))
        );
        // An unknown kind: every field exported, unknown names are secret (fail closed).
        assert_eq!(v["THING_SECRET_ID"], ("SECRETTHING".into(), true));
        assert_eq!(v["THING_TTL_SECONDS"], ("60".into(), true));
        assert!(v["BROKER_REVOCATION_TOKEN"].1);
        assert_eq!(v["BROKER_GRANT_ID"], ("0190-abc".into(), false));
    }

    #[test]
    fn custom_env_name_replaces_the_main_variable() {
        let g = Grant::from_json(&grant_json()).unwrap();
        let reqs = vec![
            "deploy-api=API_TOKEN".parse().unwrap(),
            "db=OTHER_DB".parse().unwrap(),
        ];
        let v = vars(&g, &reqs);
        assert!(v.contains_key("API_TOKEN"));
        assert!(!v.contains_key("DEPLOY_API_TOKEN"));
        assert!(v.contains_key("OTHER_DB") && !v.contains_key("DATABASE_URL"));
        assert!("x=1BAD".parse::<CredentialRequest>().is_err());
        assert!("x=A-B".parse::<CredentialRequest>().is_err());
        assert!("=A".parse::<CredentialRequest>().is_err());
    }

    #[test]
    fn debug_of_grant_and_errors_hold_no_secret() {
        let g = Grant::from_json(&grant_json()).unwrap();
        let dbg = format!("{g:?}");
        assert!(!dbg.contains("SECRET"), "{dbg}");
        let e = refused(
            403,
            &serde_json::json!({"error": "policy_denied", "message": "no"}),
        );
        assert_eq!(e.reason_code(), "policy_denied");
        assert!(e.is_refusal());
    }

    #[test]
    fn env_format_quotes_safely() {
        assert_eq!(shell_quote("a'b"), r"'a'\''b'");
        let g = Grant::from_json(&grant_json()).unwrap();
        let shaped = g.shape(&[], None).unwrap();
        let out = shaped.render(Format::Env);
        assert!(out.contains("export DEPLOY_API_TOKEN='eyJSECRETTOKEN'\n"));
        let d = shaped.render(Format::Dotenv);
        assert!(d.contains("DEPLOY_API_TOKEN=eyJSECRETTOKEN\n"));
        assert_eq!(dotenv_value("a b\"\n"), "\"a b\\\"\\n\"");
        assert_eq!(env_stem("9-lives.x"), "_9_LIVES_X");
        assert!("yaml".parse::<Format>().is_err());
    }

    #[cfg(unix)]
    #[test]
    fn files_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("creds");
        let g = Grant::from_json(&grant_json()).unwrap();
        let files = write_dir(&dir, &g.shape(&[], Some(&dir)).unwrap()).unwrap();
        assert!(files.len() > 5);
        assert!(files.contains(&dir.join(".pgpass")));
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        for f in &files {
            assert_eq!(mode(f), 0o600, "{}", f.display());
        }
        assert_eq!(
            std::fs::read_to_string(dir.join("BROKER_REVOCATION_TOKEN")).unwrap(),
            "brk_rvk_SECRETREVOKE"
        );
        // Rewriting replaces a file that had wider permissions.
        let p = dir.join("env");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        write_dir(&dir, &g.shape(&[], Some(&dir)).unwrap()).unwrap();
        assert_eq!(mode(&p), 0o600);
        assert_eq!(mode(&dir), 0o700, "an existing directory is made private");
    }

    fn pg(name: &str, user: &str, pw: &str) -> (String, Value) {
        (
            name.to_owned(),
            serde_json::json!({"kind": "postgres", "host": "h", "port": 5432, "database": "app",
                "username": user, "password": pw,
                "database_url": format!("postgresql://{user}:{pw}@h:5432/app?sslmode=disable")}),
        )
    }

    fn aws(name: &str, key: &str, extra: Value) -> (String, Value) {
        let mut v = serde_json::json!({"kind": "aws_sts", "access_key_id": format!("AKIA{key}"),
            "secret_access_key": format!("SECRET{key}"), "session_token": format!("SESSION{key}"),
            "region": "eu-central-1", "expiration": "2030-01-01T00:15:00Z"});
        if let (Some(o), Value::Object(e)) = (v.as_object_mut(), extra) {
            o.extend(e);
        }
        (name.to_owned(), v)
    }

    fn grant_of(creds: Vec<(String, Value)>) -> Grant {
        let creds: serde_json::Map<String, Value> = creds.into_iter().collect();
        Grant::from_json(&serde_json::json!({
            "grant_id": "g-1", "expires_at": "2030-01-01T00:00:00Z",
            "revocation_token": "brk_rvk_SECRETREVOKE", "credentials": creds,
        }))
        .unwrap()
    }

    fn shaped_vars(s: &Shaped) -> BTreeMap<String, String> {
        s.vars
            .iter()
            .map(|(k, v)| (k.clone(), v.expose().to_owned()))
            .collect()
    }

    #[test]
    fn one_postgres_credential_gets_plain_names_and_a_pgpass() {
        let tmp = tempfile::tempdir().unwrap();
        let g = grant_of(vec![pg("db", "u1", "pa:ss\\w")]);
        let s = g
            .shape(&["db=PRIMARY_DB".parse().unwrap()], Some(tmp.path()))
            .unwrap();
        let v = shaped_vars(&s);
        for k in [
            "PGHOST",
            "PGPORT",
            "PGDATABASE",
            "PGUSER",
            "PGPASSWORD",
            "PGSSLMODE",
            "PGPASSFILE",
        ] {
            assert!(v.contains_key(k), "{k}: {v:?}");
        }
        assert_eq!(v["PGSSLMODE"], "disable");
        // `name=VAR` renames DATABASE_URL only.
        assert!(v.contains_key("PRIMARY_DB") && !v.contains_key("DATABASE_URL"));
        assert_eq!(
            v["PGPASSFILE"],
            tmp.path().join(".pgpass").display().to_string()
        );
        let (name, pgpass) = &s.files[0];
        assert_eq!(name, ".pgpass");
        assert!(pgpass.is_secret());
        // `:` and `\` in a value are escaped so libpq reads the password back whole.
        assert_eq!(pgpass.expose(), "h:5432:app:u1:pa\\:ss\\\\w\n");
    }

    #[test]
    fn several_postgres_credentials_are_all_prefixed() {
        let tmp = tempfile::tempdir().unwrap();
        let g = grant_of(vec![
            pg("analytics-db", "ua", "PWA"),
            pg("app-db", "ub", "PWB"),
        ]);
        let s = g.shape(&[], Some(tmp.path())).unwrap();
        let v = shaped_vars(&s);
        assert!(
            !v.keys().any(|k| k.starts_with("PG") || k == "DATABASE_URL"),
            "no plain names when there are several: {v:?}"
        );
        assert_eq!(v["ANALYTICS_DB_PGUSER"], "ua");
        assert_eq!(v["APP_DB_PGUSER"], "ub");
        assert_eq!(v["APP_DB_PGPASSWORD"], "PWB");
        assert!(v["ANALYTICS_DB_DATABASE_URL"].contains("ua:PWA@"));
        assert_eq!(v["ANALYTICS_DB_PGPASSFILE"], v["APP_DB_PGPASSFILE"]);
        let pgpass = s.files[0].1.expose();
        assert_eq!(pgpass.lines().count(), 2);
        assert!(pgpass.contains(":ua:PWA") && pgpass.contains(":ub:PWB"));
    }

    #[test]
    fn one_aws_credential_gets_region_expiration_and_account() {
        let g = grant_of(vec![aws(
            "deploy-aws",
            "1",
            serde_json::json!({"role_arn": "arn:aws:iam::123456789012:role/deploy"}),
        )]);
        let v = vars(&g, &[]);
        assert_eq!(v["AWS_ACCESS_KEY_ID"].0, "AKIA1");
        assert_eq!(v["AWS_SECRET_ACCESS_KEY"], ("SECRET1".into(), true));
        assert_eq!(v["AWS_SESSION_TOKEN"], ("SESSION1".into(), true));
        assert_eq!(v["AWS_REGION"], ("eu-central-1".into(), false));
        assert_eq!(v["AWS_DEFAULT_REGION"], ("eu-central-1".into(), false));
        assert_eq!(
            v["AWS_CREDENTIAL_EXPIRATION"],
            ("2030-01-01T00:15:00Z".into(), false)
        );
        assert_eq!(v["AWS_ACCOUNT_ID"], ("123456789012".into(), false));
        // An account id in the answer wins over the ARN.
        let g = grant_of(vec![aws(
            "a",
            "1",
            serde_json::json!({"account_id": "000000000042", "role_arn": "arn:aws:iam::123456789012:role/x"}),
        )]);
        assert_eq!(vars(&g, &[])["AWS_ACCOUNT_ID"].0, "000000000042");
        assert_eq!(account_of_arn("arn:aws:iam::12:role/x"), None);
        assert_eq!(account_of_arn("not-an-arn"), None);
    }

    #[test]
    fn several_aws_credentials_become_profiles_in_private_files() {
        let tmp = tempfile::tempdir().unwrap();
        let g = grant_of(vec![
            aws("prod", "P", Value::Null),
            aws("staging", "S", Value::Null),
        ]);
        // Files are the only shape: without an output directory the exchange is refused.
        let e = g.shape(&[], None).unwrap_err();
        assert_eq!(e.reason_code(), "usage");
        assert!(e.to_string().contains("--out-dir"));
        let s = g.shape(&[], Some(tmp.path())).unwrap();
        let v = shaped_vars(&s);
        assert!(
            !v.keys()
                .any(|k| k.starts_with("AWS_") && !k.ends_with("_FILE")),
            "no plain AWS keys: {v:?}"
        );
        assert_eq!(
            v["AWS_SHARED_CREDENTIALS_FILE"],
            tmp.path().join(AWS_CREDENTIALS_FILE).display().to_string()
        );
        assert_eq!(
            v["AWS_CONFIG_FILE"],
            tmp.path().join(AWS_CONFIG_FILE).display().to_string()
        );
        let files: BTreeMap<_, _> = s.files.iter().cloned().collect();
        let creds = &files[AWS_CREDENTIALS_FILE];
        assert!(creds.is_secret());
        assert_eq!(
            creds.expose(),
            "[prod]\naws_access_key_id = AKIAP\naws_secret_access_key = SECRETP\n\
             aws_session_token = SESSIONP\n[staging]\naws_access_key_id = AKIAS\n\
             aws_secret_access_key = SECRETS\naws_session_token = SESSIONS\n"
        );
        assert_eq!(
            files[AWS_CONFIG_FILE].expose(),
            "[profile prod]\nregion = eu-central-1\n[profile staging]\nregion = eu-central-1\n"
        );
        // A name that cannot be an INI section is refused, not written.
        let g = grant_of(vec![
            aws("a]b", "P", Value::Null),
            aws("c", "S", Value::Null),
        ]);
        assert!(g.shape(&[], Some(tmp.path())).is_err());
        // A line break in a value would add lines to the file: refused, without the value.
        let g = grant_of(vec![
            aws(
                "a",
                "P",
                serde_json::json!({"session_token": "SECRET\n[evil]"}),
            ),
            aws("c", "S", Value::Null),
        ]);
        let e = g.shape(&[], Some(tmp.path())).unwrap_err();
        assert!(!e.to_string().contains("SECRET"), "{e}");
        let g = grant_of(vec![pg("db", "u", "pw\nh:1:*:*:x")]);
        assert!(g.shape(&[], Some(tmp.path())).is_err());
        // Without files the value only travels shell-quoted, which is safe.
        assert!(g.shape(&[], None).is_ok());
    }

    #[cfg(unix)]
    #[test]
    fn aws_profile_files_are_written_private() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("creds");
        let g = grant_of(vec![aws("p", "P", Value::Null), aws("q", "Q", Value::Null)]);
        write_dir(&dir, &g.shape(&[], Some(&dir)).unwrap()).unwrap();
        for f in [AWS_CREDENTIALS_FILE, AWS_CONFIG_FILE, "env", "dotenv"] {
            let m = std::fs::metadata(dir.join(f)).unwrap().permissions().mode() & 0o777;
            assert_eq!(m, 0o600, "{f}");
        }
        let env = std::fs::read_to_string(dir.join("env")).unwrap();
        assert!(env.contains("export AWS_SHARED_CREDENTIALS_FILE="));
        assert!(
            !env.contains("SECRETP"),
            "keys live in the profile file only"
        );
    }

    #[test]
    fn two_credentials_on_one_variable_are_refused() {
        let g = grant_of(vec![
            (
                "a".into(),
                serde_json::json!({"kind": "api_token", "token": "T1"}),
            ),
            (
                "b".into(),
                serde_json::json!({"kind": "api_token", "token": "T2"}),
            ),
        ]);
        let reqs = vec!["a=TOKEN".parse().unwrap(), "b=TOKEN".parse().unwrap()];
        let e = g.shape(&reqs, None).unwrap_err();
        assert!(e.to_string().contains("TOKEN"), "{e}");
        assert!(!e.to_string().contains("T1"));
        // `db-a` and `db_a` map to the same stem.
        let g = grant_of(vec![pg("db-a", "u", "p"), pg("db_a", "v", "q")]);
        assert!(g.shape(&[], None).is_err());
    }

    #[test]
    fn require_checks_the_exchange_ran() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("creds");
        let e = require_exchanged(None, None).unwrap_err();
        assert_eq!(e.reason_code(), "no_exchange");
        assert!(e.to_string().contains("!reference"));
        let e = require_exchanged(Some(&dir), Some("g-1")).unwrap_err();
        assert_eq!(e.reason_code(), "no_exchange");
        let g = grant_of(vec![]);
        write_dir(&dir, &g.shape(&[], Some(&dir)).unwrap()).unwrap();
        // The files exist but the env file was not sourced.
        assert_eq!(
            require_exchanged(Some(&dir), None)
                .unwrap_err()
                .reason_code(),
            "no_exchange"
        );
        assert!(require_exchanged(Some(&dir), Some("other")).is_err());
        assert_eq!(require_exchanged(Some(&dir), Some("g-1")).unwrap(), "g-1");
    }

    #[tokio::test]
    async fn zero_attempts_are_refused_without_asking() {
        let (url, calls) = fake(vec![(200, grant_json())]).await;
        let mut c = fast(&url);
        c.retry.attempts = 0;
        let tok = TokenSource::Value(Sensitive::new("a.b.c"));
        let e = c
            .exchange(&tok, &no_env, &[], None, &quiet())
            .await
            .unwrap_err();
        assert_eq!(e.reason_code(), "usage");
        assert_eq!(calls.load(Ordering::SeqCst), 0);
        c.retry.attempts = 1;
        let fail = serde_json::json!({"error": "store_unavailable", "message": "m"});
        let (url, calls) = fake(vec![(503, fail)]).await;
        let mut c = fast(&url);
        c.retry.attempts = 1;
        c.exchange(&tok, &no_env, &[], None, &quiet())
            .await
            .unwrap_err();
        assert_eq!(calls.load(Ordering::SeqCst), 1, "1 = one try, no retry");
    }

    #[test]
    fn delay_grows_caps_and_honours_retry_after() {
        let p = RetryPolicy {
            attempts: 5,
            base: Duration::from_millis(100),
            max: Duration::from_millis(400),
        };
        let d0 = p.delay(0, None);
        assert!(d0 >= Duration::from_millis(100) && d0 <= Duration::from_millis(125));
        let d5 = p.delay(5, None);
        assert!(d5 >= Duration::from_millis(400) && d5 <= Duration::from_millis(500));
        assert!(p.delay(0, Some(Duration::from_secs(3))) >= Duration::from_secs(3));
        assert!(p.delay(0, Some(Duration::from_secs(3600))) <= MAX_RETRY_AFTER);
    }

    #[test]
    fn claims_are_decoded_for_explanations() {
        use base64::Engine;
        let p = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(br#"{"repository":"acme/api","ref":"refs/heads/x"}"#);
        let c = unverified_claims(&format!("h.{p}.sig")).unwrap();
        let e = refused(403, &serde_json::json!({"error": "policy_denied"}));
        let text = explain_refusal(&e, Some(&c));
        assert!(text.contains("refs/heads/x") && text.contains("policy explain"));
        assert!(!text.contains("sig"));
        assert!(unverified_claims("garbage").is_none());
    }

    /// A broker stand-in answering from a script of statuses; counts calls.
    async fn fake(script: Vec<(u16, Value)>) -> (String, Arc<AtomicUsize>) {
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        let script = Arc::new(script);
        let handler = move || {
            let c = c.clone();
            let script = script.clone();
            async move {
                let i = c.fetch_add(1, Ordering::SeqCst).min(script.len() - 1);
                let (s, body) = script[i].clone();
                (StatusCode::from_u16(s).unwrap(), axum::Json(body)).into_response()
            }
        };
        let app = Router::new()
            .route("/v1/exchange", post(handler.clone()))
            .route("/v1/revoke", post(handler));
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(l, app).await.ok() });
        (format!("http://{addr}"), calls)
    }

    fn fast(url: &str) -> Client {
        let mut c = Client::new(url, Duration::from_secs(5)).unwrap();
        c.retry = RetryPolicy {
            attempts: 4,
            base: Duration::from_millis(1),
            max: Duration::from_millis(2),
        };
        c
    }

    fn quiet() -> Notice {
        Box::new(|_| {})
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[tokio::test]
    async fn retries_5xx_and_429_then_succeeds() {
        let unavailable = serde_json::json!({"error": "store_unavailable", "message": "m"});
        let (url, calls) = fake(vec![
            (503, unavailable.clone()),
            (429, unavailable),
            (200, grant_json()),
        ])
        .await;
        let tok = TokenSource::Value(Sensitive::new("a.b.c"));
        let reqs = vec!["deploy-api".parse().unwrap()];
        let ex = fast(&url)
            .exchange(&tok, &no_env, &reqs, Some("5m"), &quiet())
            .await
            .unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        assert_eq!(ex.grant.grant_id, "0190-abc");
    }

    #[tokio::test]
    async fn never_retries_401_or_403() {
        for status in [401u16, 403] {
            let (url, calls) = fake(vec![(
                status,
                serde_json::json!({"error": "policy_denied", "message": "m"}),
            )])
            .await;
            let tok = TokenSource::Value(Sensitive::new("a.b.c"));
            let err = fast(&url)
                .exchange(&tok, &no_env, &[], None, &quiet())
                .await
                .unwrap_err();
            assert_eq!(calls.load(Ordering::SeqCst), 1);
            assert_eq!(err.reason_code(), "policy_denied");
        }
    }

    #[tokio::test]
    async fn gives_up_after_the_last_attempt_with_the_broker_code() {
        let (url, calls) = fake(vec![(
            503,
            serde_json::json!({"error": "revoke_pending", "message": "later"}),
        )])
        .await;
        let notes = Arc::new(std::sync::Mutex::new(Vec::new()));
        let n2 = notes.clone();
        let notice: Notice = Box::new(move |m| n2.lock().unwrap().push(m.to_owned()));
        let err = fast(&url)
            .revoke(&Sensitive::new("brk_rvk_SECRET"), &notice)
            .await
            .unwrap_err();
        assert_eq!(calls.load(Ordering::SeqCst), 4);
        assert_eq!(err.reason_code(), "revoke_pending");
        let notes = notes.lock().unwrap();
        assert_eq!(notes.len(), 3);
        assert!(notes.iter().all(|n| !n.contains("SECRET")));
    }

    #[tokio::test]
    async fn network_errors_are_retried_and_reported_without_secrets() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let err = fast(&format!("http://127.0.0.1:{port}"))
            .revoke(&Sensitive::new("brk_rvk_SECRET"), &quiet())
            .await
            .unwrap_err();
        assert_eq!(err.reason_code(), "broker_unreachable");
        assert!(!err.to_string().contains("SECRET"));
    }

    #[tokio::test]
    async fn token_sources() {
        let http = reqwest::Client::new();
        let env = |k: &str| (k == "ID").then(|| " tok.en.x \n".to_owned());
        let t = TokenSource::Env("ID".into())
            .fetch(&http, &env)
            .await
            .unwrap();
        assert_eq!(t.expose(), "tok.en.x");
        let e = TokenSource::Env("NOPE".into())
            .fetch(&http, &env)
            .await
            .unwrap_err();
        assert_eq!(e.reason_code(), "no_token");
        let e = TokenSource::GithubRunner {
            audience: "a".into(),
        }
        .fetch(&http, &env)
        .await
        .unwrap_err();
        assert!(e.to_string().contains("id-token: write"));
    }
}

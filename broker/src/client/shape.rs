//! The variables and private files a job gets per credential kind ([`Shaped`], decided in one
//! place), and their renderings (`export` lines, dotenv, the raw JSON).

use super::ClientError;
use super::grant::{FieldValue, Grant};
use super::request::{CredentialRequest, env_stem};
use crate::secret::Sensitive;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

impl Grant {
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
                "github_app" => {
                    // One App token: GH_TOKEN (what `gh` and most tools read); several:
                    // <NAME>_TOKEN each.
                    if let Some(t) = field("token") {
                        let var = custom.unwrap_or_else(|| {
                            if several("github_app") {
                                format!("{stem}_TOKEN")
                            } else {
                                "GH_TOKEN".into()
                            }
                        });
                        vars.push((var, t));
                    }
                }
                "ssh_cert" => {
                    if let Some(serial) = field("serial") {
                        vars.push((format!("{stem}_SSH_SERIAL"), serial));
                    }
                    // A private key (several lines) only ever goes to a file.
                    let Some(dir) = dir else {
                        if field("private_key").is_some() {
                            return Err(ClientError::Usage(format!(
                                "credential {:?}: an SSH key and certificate are given as files: \
                                 give --out-dir",
                                c.name
                            )));
                        }
                        if let Some(cert) = field("certificate") {
                            vars.push((format!("{stem}_CERTIFICATE"), cert));
                        }
                        continue;
                    };
                    let key_file = format!("{}.key", c.name);
                    if let Some(k) = field("private_key") {
                        let path = dir.join(&key_file).display().to_string();
                        vars.push((format!("{stem}_IDENTITY_FILE"), public(path)));
                        files.push((key_file.clone(), k));
                    }
                    if let Some(cert) = field("certificate") {
                        let cert_file = format!("{key_file}-cert.pub");
                        let path = dir.join(&cert_file).display().to_string();
                        vars.push((format!("{stem}_CERTIFICATE_FILE"), public(path)));
                        files.push((cert_file, public(format!("{}\n", cert.expose()))));
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
/// - `github_app` → `GH_TOKEN` (several: `<NAME>_TOKEN` each; `NAME=VAR` renames).
/// - `ssh_cert` → with an output directory, `<name>.key` (the broker-made private key, if any)
///   and `<name>.key-cert.pub` (0600) and `<NAME>_IDENTITY_FILE` / `<NAME>_CERTIFICATE_FILE`
///   naming them; without one, `<NAME>_CERTIFICATE` (a private key then needs the directory);
///   `<NAME>_SSH_SERIAL` either way.
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
pub(super) fn account_of_arn(arn: &str) -> Option<String> {
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

/// An `--format` that is none of the three.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown format {0:?} (env, json, dotenv)")]
pub struct UnknownFormat(String);

impl std::str::FromStr for Format {
    type Err = UnknownFormat;
    fn from_str(s: &str) -> Result<Self, UnknownFormat> {
        match s {
            "env" => Ok(Format::Env),
            "dotenv" => Ok(Format::Dotenv),
            "json" => Ok(Format::Json),
            _ => Err(UnknownFormat(s.to_owned())),
        }
    }
}

/// POSIX shell single quoting: safe for any value.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

pub(super) fn dotenv_value(s: &str) -> String {
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

// Long on purpose (~670 lines): one pass over the policy tree that collects every problem with its file and line needs every check beside the raw structs; tests are in load/tests.rs.
//! Loading `policies/`: YAML files → raw structs (`deny_unknown_fields`) → compiled [`Bundle`].
//!
//! Every problem is collected, with the file and 1-based line it concerns, so an operator fixes
//! a broken tree in one pass. A bundle with any problem is refused whole (fail closed): the
//! broker never runs a partially loaded policy.

use super::bundle::{ANY_CREDENTIAL, Bundle, Effect, Rule, TestCase};
use super::expr::{self, ExprError, RegexTable};
use crate::oidc::Platform;
use crate::providers::{
    ApiTokenSpec, AwsStsSpec, CredentialDef, CredentialSpec, GithubAppSpec, PostgresSpec,
    SshCertSpec,
};
use serde::Deserialize;
use serde_json::{Map, Value};
use serde_saphyr::Spanned;
use sha2::{Digest, Sha256};
use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::path::Path;
use std::sync::Arc;
use time::Duration;

/// Largest policy file read, in bytes.
const MAX_FILE_BYTES: u64 = 1 << 20;
/// Directory depth walked under the policy root.
const MAX_DIR_DEPTH: usize = 16;

/// How to load a bundle.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Configured issuer names. `None`: don't check; `Some`: an unknown issuer is an error.
    pub known_issuers: Option<BTreeSet<String>>,
}

/// What is wrong with one item.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoadErrorKind {
    #[error("cannot read: {0}")]
    Io(String),
    #[error("{0}")]
    Yaml(String),
    #[error("{0}")]
    Template(String),
    #[error("invalid {what} name {name:?}: use [a-z0-9][a-z0-9-_]{{0,62}}")]
    BadName { what: &'static str, name: String },
    #[error("duplicate {what} name {name:?} (first defined at {first})")]
    Duplicate {
        what: &'static str,
        name: String,
        first: String,
    },
    #[error(transparent)]
    Duration(TtlError),
    #[error(
        "credential {name:?} must have exactly one kind key (api_token, postgres, aws_sts, ssh_cert, github_app), found {found}"
    )]
    KindCount { name: String, found: usize },
    #[error("rule {rule:?}: when: {error}")]
    Expression { rule: String, error: ExprError },
    #[error("{owner} names unknown credential {credential:?}")]
    UnknownCredential { owner: String, credential: String },
    #[error("{owner} names unknown issuer {issuer:?}")]
    UnknownIssuer { owner: String, issuer: String },
    #[error("rule {0:?}: credentials must not be empty")]
    NoCredentials(String),
    #[error("rule {0:?}: the wildcard credential \"*\" is only allowed in deny rules")]
    WildcardAllow(String),
    #[error("test {0:?}: platform: is required when the issuer is not named github or gitlab")]
    TestPlatform(String),
}

impl LoadErrorKind {
    pub fn reason_code(&self) -> &'static str {
        match self {
            LoadErrorKind::Io(_) => "io_error",
            LoadErrorKind::Yaml(_) => "yaml_invalid",
            LoadErrorKind::Template(_) => "bad_template",
            LoadErrorKind::BadName { .. } => "bad_name",
            LoadErrorKind::Duplicate { .. } => "duplicate_name",
            LoadErrorKind::Duration(_) => "bad_duration",
            LoadErrorKind::KindCount { .. } => "credential_kind",
            LoadErrorKind::Expression { error, .. } => error.reason_code(),
            LoadErrorKind::UnknownCredential { .. } => "unknown_credential",
            LoadErrorKind::UnknownIssuer { .. } => "unknown_issuer",
            LoadErrorKind::NoCredentials(_) => "no_credentials",
            LoadErrorKind::WildcardAllow(_) => "wildcard_allow",
            LoadErrorKind::TestPlatform(_) => "test_platform",
        }
    }
}

/// One problem, located.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadError {
    /// Path relative to the policy root (or the root itself for directory problems).
    pub file: String,
    /// 1-based; 0 when the problem concerns the whole file.
    pub line: u64,
    pub kind: LoadErrorKind,
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.file, self.line, self.kind)
    }
}

/// Every problem found while loading; the bundle is refused if there is any.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct LoadErrors(pub Vec<LoadError>);

impl LoadErrors {
    pub fn reason_code(&self) -> &'static str {
        "policy_invalid"
    }
    pub fn iter(&self) -> impl Iterator<Item = &LoadError> {
        self.0.iter()
    }
}

impl fmt::Display for LoadErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

// ---- raw file format -------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    credentials: Vec<Spanned<RawCredential>>,
    #[serde(default)]
    rules: Vec<Spanned<RawRule>>,
    #[serde(default)]
    tests: Vec<Spanned<RawTest>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCredential {
    name: Spanned<String>,
    #[serde(default)]
    description: Option<String>,
    max_ttl: Spanned<String>,
    // One optional key per credential kind; exactly one must be present.
    #[serde(default)]
    api_token: Option<ApiTokenSpec>,
    #[serde(default)]
    postgres: Option<PostgresSpec>,
    #[serde(default)]
    aws_sts: Option<AwsStsSpec>,
    #[serde(default)]
    ssh_cert: Option<SshCertSpec>,
    #[serde(default)]
    github_app: Option<GithubAppSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: Spanned<String>,
    #[serde(default)]
    description: Option<String>,
    issuer: Spanned<String>,
    #[serde(default)]
    effect: Effect,
    credentials: Vec<Spanned<String>>,
    #[serde(default)]
    max_ttl: Option<Spanned<String>>,
    when: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTest {
    name: Spanned<String>,
    #[serde(default)]
    description: Option<String>,
    issuer: Spanned<String>,
    #[serde(default)]
    platform: Option<Platform>,
    claims: Map<String, Value>,
    #[serde(default)]
    request: Option<Vec<Spanned<String>>>,
    expect: RawExpect,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawExpect {
    #[serde(default)]
    allow: Vec<Spanned<String>>,
    #[serde(default)]
    deny: Vec<Spanned<String>>,
}

// ---- loading ---------------------------------------------------------------------------------

fn valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-' || *c == b'_')
}

/// A `max_ttl` that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TtlError {
    #[error(transparent)]
    Parse(#[from] crate::time::DurationError),
    #[error("duration {0:?} must be positive")]
    NotPositive(String),
}

fn parse_ttl(s: &str) -> Result<Duration, TtlError> {
    let d = crate::time::parse_duration(s)?;
    if d <= Duration::ZERO {
        return Err(TtlError::NotPositive(s.to_owned()));
    }
    Ok(d)
}

/// serde-saphyr appends " at line L, column C"; the location is reported separately.
fn strip_location(msg: &str) -> String {
    match msg.rfind(" at line ") {
        Some(i) if msg[i..].contains(", column ") => msg[..i].to_owned(),
        _ => msg.to_owned(),
    }
}

struct Loader<'o> {
    opts: &'o LoadOptions,
    errors: Vec<LoadError>,
    env: cel::Env,
    regexes: RegexTable,
    credentials: Vec<CredentialDef>,
    credential_index: HashMap<String, usize>,
    credential_sites: HashMap<String, String>,
    rule_sites: HashMap<String, String>,
    test_sites: HashMap<String, String>,
    rules: Vec<Rule>,
    // Credential references are checked once every file is read, so order of files is free.
    pending_refs: Vec<(String, u64, String, String)>,
    tests: Vec<TestCase>,
}

impl<'o> Loader<'o> {
    fn err(&mut self, file: &str, line: u64, kind: LoadErrorKind) {
        self.errors.push(LoadError {
            file: file.to_owned(),
            line,
            kind,
        });
    }

    fn check_issuer(&mut self, file: &str, issuer: &Spanned<String>, owner: String) {
        if let Some(known) = &self.opts.known_issuers
            && !known.contains(&issuer.value)
        {
            let kind = LoadErrorKind::UnknownIssuer {
                owner,
                issuer: issuer.value.clone(),
            };
            self.err(file, issuer.referenced.line(), kind);
        }
    }

    /// Record a name; false (and an error) if it is a duplicate.
    fn unique(
        &mut self,
        what: &'static str,
        file: &str,
        name: &Spanned<String>,
        sites: fn(&mut Self) -> &mut HashMap<String, String>,
    ) -> bool {
        let line = name.referenced.line();
        let here = format!("{file}:{line}");
        if let Some(first) = sites(self).get(&name.value).cloned() {
            let kind = LoadErrorKind::Duplicate {
                what,
                name: name.value.clone(),
                first,
            };
            self.err(file, line, kind);
            return false;
        }
        sites(self).insert(name.value.clone(), here);
        true
    }

    fn file(&mut self, path: &str, content: &str) {
        let mut opts = serde_saphyr::Options::default();
        opts.with_snippet = false;
        let raw: RawFile = match serde_saphyr::from_str_with_options(content, opts) {
            Ok(r) => r,
            Err(e) => {
                let line = e.location().map(|l| l.line()).unwrap_or(0);
                let msg = strip_location(&e.to_string());
                let kind = if msg.starts_with("template ") {
                    LoadErrorKind::Template(msg)
                } else {
                    LoadErrorKind::Yaml(msg)
                };
                self.err(path, line, kind);
                return;
            }
        };
        for c in raw.credentials {
            self.credential(path, c);
        }
        for r in raw.rules {
            self.rule(path, r);
        }
        for t in raw.tests {
            self.test(path, t);
        }
    }

    fn credential(&mut self, path: &str, c: Spanned<RawCredential>) {
        let line = c.referenced.line();
        let c = c.value;
        let name_line = c.name.referenced.line();
        let mut ok = true;
        if !valid_name(&c.name.value) {
            let kind = LoadErrorKind::BadName {
                what: "credential",
                name: c.name.value.clone(),
            };
            self.err(path, name_line, kind);
            ok = false;
        }
        ok &= self.unique("credential", path, &c.name, |l| &mut l.credential_sites);
        let max_ttl = match parse_ttl(&c.max_ttl.value) {
            Ok(d) => Some(d),
            Err(m) => {
                self.err(
                    path,
                    c.max_ttl.referenced.line(),
                    LoadErrorKind::Duration(m),
                );
                None
            }
        };
        let mut specs: Vec<CredentialSpec> = Vec::new();
        if let Some(a) = c.api_token {
            specs.push(CredentialSpec::ApiToken(a));
        }
        if let Some(p) = c.postgres {
            specs.push(CredentialSpec::Postgres(p));
        }
        if let Some(a) = c.aws_sts {
            specs.push(CredentialSpec::AwsSts(a));
        }
        if let Some(a) = c.ssh_cert {
            specs.push(CredentialSpec::SshCert(a));
        }
        if let Some(a) = c.github_app {
            specs.push(CredentialSpec::GithubApp(a));
        }
        if specs.len() != 1 {
            let kind = LoadErrorKind::KindCount {
                name: c.name.value.clone(),
                found: specs.len(),
            };
            self.err(path, line, kind);
        }
        if let (true, Some(max_ttl), Some(spec)) = (ok, max_ttl, specs.pop())
            && specs.is_empty()
        {
            self.credential_index
                .insert(c.name.value.clone(), self.credentials.len());
            self.credentials.push(CredentialDef {
                name: c.name.value,
                description: c.description,
                max_ttl,
                spec,
            });
        }
    }

    fn rule(&mut self, path: &str, r: Spanned<RawRule>) {
        let line = r.referenced.line();
        let r = r.value;
        let name = r.name.value.clone();
        if !valid_name(&name) {
            let kind = LoadErrorKind::BadName {
                what: "rule",
                name: name.clone(),
            };
            self.err(path, r.name.referenced.line(), kind);
        }
        self.unique("rule", path, &r.name, |l| &mut l.rule_sites);
        self.check_issuer(path, &r.issuer, format!("rule {name:?}"));
        if r.credentials.is_empty() {
            self.err(path, line, LoadErrorKind::NoCredentials(name.clone()));
        }
        for c in &r.credentials {
            if c.value == ANY_CREDENTIAL {
                if r.effect == Effect::Allow {
                    self.err(
                        path,
                        c.referenced.line(),
                        LoadErrorKind::WildcardAllow(name.clone()),
                    );
                }
            } else {
                let owner = format!("rule {name:?}");
                let at = (path.to_owned(), c.referenced.line(), owner, c.value.clone());
                self.pending_refs.push(at);
            }
        }
        let max_ttl = match &r.max_ttl {
            None => None,
            Some(t) => match parse_ttl(&t.value) {
                Ok(d) => Some(d),
                Err(m) => {
                    self.err(path, t.referenced.line(), LoadErrorKind::Duration(m));
                    None
                }
            },
        };
        match expr::compile(&self.env, &r.when.value, &mut self.regexes) {
            Ok(when) => self.rules.push(Rule {
                name,
                description: r.description,
                issuer: r.issuer.value,
                effect: r.effect,
                credentials: r.credentials.into_iter().map(|c| c.value).collect(),
                max_ttl,
                file: path.to_owned(),
                line,
                when,
            }),
            Err(error) => {
                self.err(
                    path,
                    r.when.referenced.line(),
                    LoadErrorKind::Expression { rule: name, error },
                );
            }
        }
    }

    fn test(&mut self, path: &str, t: Spanned<RawTest>) {
        let line = t.referenced.line();
        let t = t.value;
        let name = t.name.value.clone();
        self.unique("test", path, &t.name, |l| &mut l.test_sites);
        self.check_issuer(path, &t.issuer, format!("test {name:?}"));
        let platform = match (t.platform, t.issuer.value.as_str()) {
            (Some(p), _) => Some(p),
            (None, "github") => Some(Platform::Github),
            (None, "gitlab") => Some(Platform::Gitlab),
            (None, _) => {
                self.err(path, line, LoadErrorKind::TestPlatform(name.clone()));
                None
            }
        };
        let owner = format!("test {name:?}");
        let all = t
            .expect
            .allow
            .iter()
            .chain(&t.expect.deny)
            .chain(t.request.iter().flatten());
        for c in all {
            let at = (
                path.to_owned(),
                c.referenced.line(),
                owner.clone(),
                c.value.clone(),
            );
            self.pending_refs.push(at);
        }
        let names = |v: Vec<Spanned<String>>| v.into_iter().map(|s| s.value).collect::<Vec<_>>();
        let expect_allow = names(t.expect.allow);
        let expect_deny = names(t.expect.deny);
        let request = match t.request {
            Some(r) => names(r),
            None => expect_allow.iter().chain(&expect_deny).cloned().collect(),
        };
        if let Some(platform) = platform {
            self.tests.push(TestCase {
                name,
                description: t.description,
                issuer: t.issuer.value,
                platform,
                claims: t.claims,
                request,
                expect_allow,
                expect_deny,
                file: path.to_owned(),
                line,
            });
        }
    }

    fn check_refs(&mut self) {
        for (file, line, owner, credential) in std::mem::take(&mut self.pending_refs) {
            // A credential that failed to load for another reason is already reported.
            if !self.credential_index.contains_key(&credential)
                && !self.credential_sites.contains_key(&credential)
            {
                self.err(
                    &file,
                    line,
                    LoadErrorKind::UnknownCredential { owner, credential },
                );
            }
        }
    }
}

/// sha256 hex over (path, content) pairs in path order; lengths are framed so no two file sets
/// hash alike.
pub(super) fn digest(files: &[(String, String)]) -> String {
    let mut sorted: Vec<&(String, String)> = files.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let mut h = Sha256::new();
    for (path, content) in sorted {
        h.update((path.len() as u64).to_le_bytes());
        h.update(path.as_bytes());
        h.update((content.len() as u64).to_le_bytes());
        h.update(content.as_bytes());
    }
    hex::encode(h.finalize())
}

impl Bundle {
    /// Load every `.yaml`/`.yml` file under `dir` (recursively).
    pub fn load_dir(dir: &Path, opts: &LoadOptions) -> Result<Bundle, LoadErrors> {
        let mut files = Vec::new();
        let mut errors = Vec::new();
        collect_files(dir, dir, 0, &mut files, &mut errors);
        if !errors.is_empty() {
            return Err(LoadErrors(errors));
        }
        Bundle::load_files(&files, opts)
    }

    /// What `load_dir` would read, as a digest: the same files (or, if reading fails, the
    /// errors), without compiling anything. The policy watcher reloads only when this changes.
    pub fn dir_fingerprint(dir: &Path) -> String {
        let mut files = Vec::new();
        let mut errors = Vec::new();
        collect_files(dir, dir, 0, &mut files, &mut errors);
        files.extend(errors.iter().map(|e| (e.file.clone(), e.to_string())));
        digest(&files)
    }

    /// Load from in-memory `(relative path, content)` pairs.
    pub fn load_files(
        files: &[(String, String)],
        opts: &LoadOptions,
    ) -> Result<Bundle, LoadErrors> {
        let mut sorted: Vec<&(String, String)> = files.iter().collect();
        sorted.sort_by(|a, b| a.0.cmp(&b.0));
        let mut l = Loader {
            opts,
            errors: Vec::new(),
            env: expr::new_env(),
            regexes: RegexTable::default(),
            credentials: Vec::new(),
            credential_index: HashMap::new(),
            credential_sites: HashMap::new(),
            rule_sites: HashMap::new(),
            test_sites: HashMap::new(),
            rules: Vec::new(),
            pending_refs: Vec::new(),
            tests: Vec::new(),
        };
        for (path, content) in sorted {
            l.file(path, content);
        }
        l.check_refs();
        if !l.errors.is_empty() {
            return Err(LoadErrors(l.errors));
        }
        Ok(Bundle {
            digest: digest(files),
            credentials: l.credentials,
            credential_index: l.credential_index,
            tests: l.tests,
            env: Arc::new(l.env),
            regexes: Arc::new(l.regexes),
            claims_used: expr::ClaimsUsed::of(l.rules.iter().map(|r| &r.when)),
            rules: l.rules,
        })
    }
}

/// Every policy file under `dir` as `(relative path, content)`, as [`Bundle::load_dir`] reads
/// them.
pub(super) fn read_dir_files(dir: &Path) -> Result<Vec<(String, String)>, LoadErrors> {
    let mut files = Vec::new();
    let mut errors = Vec::new();
    collect_files(dir, dir, 0, &mut files, &mut errors);
    if errors.is_empty() {
        Ok(files)
    } else {
        Err(LoadErrors(errors))
    }
}

fn collect_files(
    root: &Path,
    dir: &Path,
    depth: usize,
    files: &mut Vec<(String, String)>,
    errors: &mut Vec<LoadError>,
) {
    let display = |p: &Path| {
        p.strip_prefix(root)
            .ok()
            .filter(|r| !r.as_os_str().is_empty())
            .map(|r| r.to_string_lossy().replace('\\', "/"))
            .unwrap_or_else(|| root.display().to_string())
    };
    let io = |p: &Path, m: String| LoadError {
        file: display(p),
        line: 0,
        kind: LoadErrorKind::Io(m),
    };
    if depth > MAX_DIR_DEPTH {
        errors.push(io(dir, "directory tree too deep".to_owned()));
        return;
    }
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            errors.push(io(dir, e.to_string()));
            return;
        }
    };
    let mut paths: Vec<_> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    for p in paths {
        // Hidden entries are skipped: a Kubernetes ConfigMap volume keeps every file twice more
        // under `..data/` and `..<timestamp>/`, and editors leave `.swp` files.
        if p.file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        {
            continue;
        }
        let meta = match std::fs::metadata(&p) {
            Ok(m) => m,
            Err(e) => {
                errors.push(io(&p, e.to_string()));
                continue;
            }
        };
        if meta.is_dir() {
            collect_files(root, &p, depth + 1, files, errors);
            continue;
        }
        let is_yaml = p
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| e == "yaml" || e == "yml");
        if !meta.is_file() || !is_yaml {
            continue;
        }
        if meta.len() > MAX_FILE_BYTES {
            errors.push(io(&p, format!("larger than {MAX_FILE_BYTES} bytes")));
            continue;
        }
        match std::fs::read_to_string(&p) {
            Ok(content) => files.push((display(&p), content)),
            Err(e) => errors.push(io(&p, e.to_string())),
        }
    }
}

#[cfg(test)]
mod tests;

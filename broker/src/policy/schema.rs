//! JSON Schema of a policy file, for editors and for `broker policy check`.
//!
//! The schema is generated (schemars) from a parallel description of the file format below,
//! not from the loader's own types: those carry `serde_saphyr::Spanned` wrappers and custom
//! deserialisers (templates, Postgres names, ARNs) that have no useful schema. The two are kept
//! in agreement by tests: every shipped policy and fixture is accepted by both, and malformed
//! files (unknown key, wrong type, missing key, two kind keys) are refused by both. The loader
//! stays the authority for what the schema cannot say (CEL, templates, cross-references).
//!
//! Optional keys whose value is a mapping or an enum are described without `null`, so an
//! editor says what is wrong inside the value rather than "matches no alternative".
//!
//! The committed copy is `policies/policy.schema.json`; a test fails when it differs from the
//! generated one (`broker policy schema > policies/policy.schema.json` refreshes it).

use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{Map, Value};
use std::sync::OnceLock;

/// A policy file: credentials, rules and test cases, all optional.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "broker policy file")]
#[allow(dead_code)]
struct PolicyFile {
    /// What can be minted.
    #[serde(default)]
    credentials: Vec<Credential>,
    /// Who may have it: deny rules win, then the first matching allow rule; default deny.
    #[serde(default)]
    rules: Vec<Rule>,
    /// Claim sets with the decisions they must get (`broker policy test`).
    #[serde(default)]
    tests: Vec<TestCase>,
}

const NAME: &str = "^[a-z0-9][a-z0-9_-]{0,62}$";
/// humantime's grammar, loosely: numbers each followed by a unit (`15m`, `1h 30m`); the loader
/// checks the units and that the result is positive.
const DURATION: &str = r"^\s*[0-9]+\s*[a-zA-Z]*(\s*[0-9]+\s*[a-zA-Z]*)*\s*$";

/// A credential definition with exactly one kind key.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(extend("oneOf" = [
    {"required": ["api_token"]},
    {"required": ["postgres"]},
    {"required": ["aws_sts"]},
    {"required": ["ssh_cert"]},
    {"required": ["github_app"]}
]))]
#[allow(dead_code)]
struct Credential {
    /// What clients request and rules list.
    #[schemars(regex(pattern = NAME))]
    name: String,
    description: Option<String>,
    /// Upper bound on any grant of this credential, e.g. `15m`, `1h`, `90s`.
    #[schemars(regex(pattern = DURATION))]
    max_ttl: String,
    /// A JWT signed by the broker for a downstream service.
    #[serde(default)]
    #[schemars(with = "ApiToken")]
    api_token: Option<ApiToken>,
    /// A login role on a configured Postgres server for the life of the grant.
    #[serde(default)]
    #[schemars(with = "Postgres")]
    postgres: Option<Postgres>,
    /// An AWS session from AssumeRole.
    #[serde(default)]
    #[schemars(with = "AwsSts")]
    aws_sts: Option<AwsSts>,
    /// An SSH user certificate signed by a CA under `targets.ssh_ca`.
    #[serde(default)]
    #[schemars(with = "SshCert")]
    ssh_cert: Option<SshCert>,
    /// A GitHub App installation token limited to repositories and permissions.
    #[serde(default)]
    #[schemars(with = "GithubApp")]
    github_app: Option<GithubApp>,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct GithubApp {
    /// An App under `targets.github_app` in the broker config.
    app: String,
    /// The organization or user whose installation mints the token (templated).
    owner: String,
    /// Repository names within `owner` (templated); empty: all the installation reaches.
    #[serde(default)]
    #[schemars(length(max = 500))]
    repositories: Vec<String>,
    /// Permission name to level, as GitHub documents them (checked at load).
    #[schemars(length(min = 1))]
    permissions: std::collections::BTreeMap<String, GithubLevel>,
}

#[derive(Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
#[allow(dead_code)]
enum GithubLevel {
    Read,
    Write,
    Admin,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct SshCert {
    /// A CA under `targets.ssh_ca` in the broker config.
    ca: String,
    /// Principals the certificate is valid for, templated over claims.
    #[schemars(length(min = 1, max = 32))]
    principals: Vec<String>,
    /// Extensions granted (none by default: no pty, no forwarding).
    #[serde(default)]
    extensions: Vec<SshExtension>,
    /// `force-command` critical option.
    force_command: Option<String>,
    /// `source-address` critical option: addresses or CIDR blocks.
    #[serde(default)]
    #[schemars(length(max = 64))]
    source_address: Vec<String>,
    /// Whether the job may ask the broker to generate the key pair (default true).
    allow_generated_key: Option<bool>,
}

#[derive(Deserialize, JsonSchema)]
#[allow(dead_code)]
enum SshExtension {
    #[serde(rename = "permit-pty")]
    PermitPty,
    #[serde(rename = "permit-agent-forwarding")]
    PermitAgentForwarding,
    #[serde(rename = "permit-port-forwarding")]
    PermitPortForwarding,
    #[serde(rename = "permit-X11-forwarding")]
    PermitX11Forwarding,
    #[serde(rename = "permit-user-rc")]
    PermitUserRc,
    #[serde(rename = "no-touch-required")]
    NoTouchRequired,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct ApiToken {
    /// `aud` of the minted token.
    audience: String,
    /// `scope` entries, templated over claims (`deploy:${repository}`).
    #[serde(default)]
    scopes: Vec<String>,
    /// Template for `sub`; default: the job token's `sub`.
    subject: Option<String>,
    /// `jwt` (default): a signed JWT; `opaque`: a random `brk_at_…` reference token that only
    /// introspection resolves.
    format: Option<TokenFormatName>,
}

#[derive(Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
#[allow(dead_code)]
enum TokenFormatName {
    Jwt,
    Opaque,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct Postgres {
    /// A server under `targets.postgres` in the broker config.
    target: String,
    /// The database the job uses.
    #[schemars(length(min = 1, max = 63))]
    database: String,
    /// Group roles the user joins (`IN ROLE`).
    #[serde(default)]
    #[schemars(inner(length(min = 1, max = 63)))]
    roles: Vec<String>,
    /// Role that receives what the job created (`REASSIGN OWNED`) at revoke.
    #[schemars(length(min = 1, max = 63))]
    owner: String,
    /// `CONNECTION LIMIT` of the user.
    connection_limit: Option<u32>,
    /// SQL run as the admin after `CREATE ROLE`, with quoted placeholders.
    #[serde(default)]
    #[schemars(length(max = 32))]
    statements: Vec<String>,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct AwsSts {
    /// A setting under `targets.aws` in the broker config.
    target: String,
    /// `arn:aws:iam::<account>:role/<path/>name`.
    #[schemars(regex(pattern = r"^arn:aws[a-z-]*:iam::[0-9]{12}:role/"))]
    role_arn: String,
    /// Region handed to the job; default: the target's.
    region: Option<String>,
    /// Inline session policy: a JSON object, or a string of JSON.
    #[serde(default)]
    #[schemars(with = "SessionPolicy")]
    session_policy: Option<SessionPolicy>,
    /// Managed policy ARNs applied as session policies.
    #[serde(default)]
    #[schemars(length(max = 10))]
    managed_policy_arns: Vec<String>,
}

#[derive(Deserialize, JsonSchema)]
#[serde(untagged)]
#[allow(dead_code)]
enum SessionPolicy {
    Object(Map<String, Value>),
    Json(String),
}

#[derive(Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
#[allow(dead_code)]
enum Effect {
    Allow,
    Deny,
}

/// A CEL rule.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct Rule {
    #[schemars(regex(pattern = NAME))]
    name: String,
    description: Option<String>,
    /// Configured issuer name this rule applies to.
    issuer: String,
    /// Default `allow`.
    #[serde(default)]
    #[schemars(with = "Effect")]
    effect: Option<Effect>,
    /// Credential names; `"*"` (every credential) only in deny rules.
    #[schemars(length(min = 1))]
    credentials: Vec<String>,
    /// Lower TTL ceiling for grants by this rule.
    #[schemars(regex(pattern = DURATION))]
    max_ttl: Option<String>,
    /// CEL over `claims`, `issuer`, `platform`.
    when: String,
}

#[derive(Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
#[allow(dead_code)]
enum Platform {
    Github,
    Gitlab,
}

/// A claim set and the decisions it must get.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct TestCase {
    name: String,
    description: Option<String>,
    issuer: String,
    /// Required when the issuer is not named github or gitlab.
    #[serde(default)]
    #[schemars(with = "Platform")]
    platform: Option<Platform>,
    /// The token's claims.
    claims: Map<String, Value>,
    /// Credentials requested; default: every credential in `expect`.
    request: Option<Vec<String>>,
    expect: Expect,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct Expect {
    #[serde(default)]
    allow: Vec<String>,
    #[serde(default)]
    deny: Vec<String>,
}

/// The schema as pretty JSON with a trailing newline (the committed file's exact bytes).
pub fn schema_json() -> String {
    let schema = schemars::schema_for!(PolicyFile);
    let mut s = serde_json::to_string_pretty(&schema).unwrap_or_default();
    s.push('\n');
    s
}

/// One schema violation in a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaError {
    /// JSON pointer into the file (`/rules/0/when`), empty for the whole file.
    pub pointer: String,
    pub message: String,
}

impl std::fmt::Display for SchemaError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let at = if self.pointer.is_empty() {
            "/"
        } else {
            &self.pointer
        };
        write!(f, "schema: at {at}: {}", self.message)
    }
}

fn validator() -> Option<&'static jsonschema::Validator> {
    static V: OnceLock<Option<jsonschema::Validator>> = OnceLock::new();
    V.get_or_init(|| {
        let schema: Value = serde_json::from_str(&schema_json()).ok()?;
        jsonschema::validator_for(&schema).ok()
    })
    .as_ref()
}

/// Validate one file's YAML text. A YAML syntax error is reported as one error at `/` (the
/// loader reports it with its line).
pub fn validate_yaml(content: &str) -> Vec<SchemaError> {
    let value: Value = match serde_saphyr::from_str::<Option<Value>>(content) {
        // An empty or comment-only file is an empty policy file.
        Ok(v) => v.unwrap_or_else(|| Value::Object(Map::new())),
        Err(e) => {
            return vec![SchemaError {
                pointer: String::new(),
                message: format!("not YAML: {e}"),
            }];
        }
    };
    let Some(v) = validator() else {
        return vec![SchemaError {
            pointer: String::new(),
            message: "the built-in schema does not compile".to_owned(),
        }];
    };
    v.iter_errors(&value)
        .map(|e| SchemaError {
            pointer: e.instance_path().to_string(),
            message: e.to_string(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Bundle, LoadOptions};
    use std::path::{Path, PathBuf};

    fn root() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
    }

    #[test]
    fn committed_schema_is_current() {
        let path = root().join("policies/policy.schema.json");
        if std::env::var_os("BROKER_UPDATE_SCHEMA").is_some() {
            std::fs::write(&path, schema_json()).unwrap();
        }
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == schema_json(),
            "{} is stale: run `broker policy schema > policies/policy.schema.json` (or this \
             test with BROKER_UPDATE_SCHEMA=1)",
            path.display()
        );
    }

    fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                yaml_files(&p, out);
            } else if p.extension().is_some_and(|x| x == "yaml" || x == "yml") {
                out.push(p);
            }
        }
    }

    #[test]
    fn accepts_every_shipped_policy() {
        let mut files = Vec::new();
        for d in [
            "policies",
            "examples/policy-repo/policies",
            "broker/tests/fixtures/policy-diff",
        ] {
            yaml_files(&root().join(d), &mut files);
        }
        assert!(files.len() >= 12, "{files:?}");
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap();
            let errors = validate_yaml(&text);
            assert!(errors.is_empty(), "{}: {errors:?}", f.display());
            let name = f.file_name().unwrap().to_string_lossy().into_owned();
            Bundle::load_files(&[(name, text)], &LoadOptions::default())
                .unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        }
    }

    #[test]
    fn schema_and_loader_refuse_the_same_malformed_files() {
        const C: &str =
            "credentials:\n  - name: c\n    max_ttl: 5m\n    api_token: { audience: x }\n";
        const R: &str = "rules:\n  - name: r\n    issuer: github\n    credentials: [c]\n";
        let cases: Vec<(&str, String)> = vec![
            ("unknown top-level key", format!("{C}extra: 1\n")),
            ("unknown credential key", C.replace("max_ttl", "ttl: 1m\n    max_ttl")),
            ("unknown kind key", C.replace("audience: x", "audience: x, scope: y")),
            ("unknown rule key", format!("{C}{R}    when: 'true'\n    priority: 1\n")),
            ("missing when", format!("{C}{R}")),
            ("credentials not a list", format!("{C}{}", R.replace("[c]", "{ c: 1 }"))),
            ("when not a string", format!("{C}{R}    when: [a]\n")),
            ("bad effect", format!("{C}{R}    effect: maybe\n    when: 'true'\n")),
            ("rules not a list", "rules: 3\n".to_owned()),
            ("claims not a map", "tests:\n  - name: t\n    issuer: github\n    claims: [1]\n    expect: {}\n".to_owned()),
            ("bad platform", "tests:\n  - name: t\n    issuer: x\n    platform: jenkins\n    claims: {}\n    expect: {}\n".to_owned()),
            ("two kind keys", C.replace("api_token: { audience: x }", "api_token: { audience: x }\n    aws_sts: { target: t, role_arn: 'arn:aws:iam::123456789012:role/r' }")),
            ("no kind key", "credentials:\n  - name: c\n    max_ttl: 5m\n".to_owned()),
            ("bad name", C.replace("name: c", "name: Bad Name")),
            ("bad duration", C.replace("5m", "soon")),
        ];
        for (what, text) in cases {
            let schema = validate_yaml(&text);
            let loader =
                Bundle::load_files(&[("m.yaml".into(), text.clone())], &LoadOptions::default());
            assert!(!schema.is_empty(), "schema accepts {what}:\n{text}");
            assert!(loader.is_err(), "loader accepts {what}:\n{text}");
        }
    }

    #[test]
    fn errors_point_into_the_file() {
        let e = validate_yaml(
            "rules:\n  - name: r\n    issuer: github\n    credentials: [c]\n    when: 'true'\n    bogus: 1\n",
        );
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!(e[0].pointer, "/rules/0");
        assert!(e[0].message.contains("bogus"), "{}", e[0]);
        assert!(validate_yaml("").is_empty());
        assert!(validate_yaml("# only a comment\n").is_empty());
    }
}

use super::api::refused;
use super::shape::{account_of_arn, dotenv_value};
use super::*;
use std::collections::BTreeMap;

pub(super) fn grant_json() -> Value {
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

#[test]
fn claims_are_decoded_for_explanations() {
    use base64::Engine;
    let p = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(br#"{"repository":"acme/api","ref":"refs/heads/x"}"#);
    let c = crate::oidc::unverified_claims_for_display(&format!("h.{p}.sig")).unwrap();
    let e = refused(403, &serde_json::json!({"error": "policy_denied"}));
    let text = explain_refusal(&e, Some(&c));
    assert!(text.contains("refs/heads/x") && text.contains("policy explain"));
    assert!(!text.contains("sig"));
}

#[test]
fn ssh_cert_goes_to_key_and_certificate_files_and_github_app_to_gh_token() {
    let body = serde_json::json!({
        "grant_id": "g", "expires_at": "e", "revocation_token": "brk_rvk_SECRETREVOKE",
        "credentials": {
            "deploy-ssh": {"kind": "ssh_cert", "certificate": "ssh-ed25519-cert-v01@openssh.com AAAA",
                "private_key": "-----BEGIN OPENSSH PRIVATE KEY-----\nKEYLINE\n-----END OPENSSH PRIVATE KEY-----\n",
                "serial": "77"},
            "release": {"kind": "github_app", "token": "ghs_SECRETAPP", "repositories": ["api"]}
        }
    });
    let g = Grant::from_json(&body).unwrap();
    // The private key never goes to a variable: without a directory it is refused.
    assert!(g.shape(&[], None).is_err());
    let tmp = tempfile::tempdir().unwrap();
    let s = g.shape(&[], Some(tmp.path())).unwrap();
    let var = |k: &str| {
        s.vars
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.expose().to_owned())
    };
    assert_eq!(var("GH_TOKEN").as_deref(), Some("ghs_SECRETAPP"));
    assert_eq!(var("DEPLOY_SSH_SSH_SERIAL").as_deref(), Some("77"));
    let key = var("DEPLOY_SSH_IDENTITY_FILE").unwrap();
    let cert = var("DEPLOY_SSH_CERTIFICATE_FILE").unwrap();
    assert!(key.ends_with("deploy-ssh.key") && cert.ends_with("deploy-ssh.key-cert.pub"));
    assert!(!s.vars.iter().any(|(_, v)| v.expose().contains("KEYLINE")));
    let written = write_dir(tmp.path(), &s).unwrap();
    assert!(written.contains(&Path::new(&key).to_path_buf()));
    assert!(std::fs::read_to_string(&key).unwrap().contains("KEYLINE"));
    assert_eq!(
        std::fs::read_to_string(&cert).unwrap(),
        "ssh-ed25519-cert-v01@openssh.com AAAA\n"
    );
    // A certificate for the job's own key needs no directory.
    let mut own = body.clone();
    own["credentials"]["deploy-ssh"]
        .as_object_mut()
        .unwrap()
        .remove("private_key");
    let s = Grant::from_json(&own).unwrap().shape(&[], None).unwrap();
    assert!(s.vars.iter().any(|(n, _)| n == "DEPLOY_SSH_CERTIFICATE"));
}

//! The CI side of a test: the example job's claims, the `issuers:` YAML for local test issuers
//! (`broker::oidc::testkit::TestIssuer`), signed job tokens and the example policies.

use broker::oidc::testkit::{self, TestKey};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::LazyLock;

/// The audience the test brokers are configured with and the test tokens carry.
pub const AUD: &str = "https://broker.test";

/// Repository root (for `policies/`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// The repository's example policies (`policies/`: GitHub and GitLab rules).
pub fn example_policies() -> &'static Path {
    static DIR: LazyLock<PathBuf> = LazyLock::new(|| repo_root().join("policies"));
    &DIR
}

/// GitHub-shaped claims for the example policies' `acme/api` (repository id 1000001, owner id
/// 9000001), push to main, issued now by `iss` for `aud`. Tweak the result per test.
pub fn acme_api_claims(iss: &str, aud: &str) -> Value {
    use broker::oidc::dev;
    let now = broker::time::Clock::now(&broker::time::SystemClock);
    // Run id 77: the AWS tests expect it in the derived session name.
    let job = dev::DevJob {
        run_id: 77,
        ..dev::DevJob::acme_api(aud, now)
    };
    let mut c = dev::github_claims(&job);
    c["iss"] = Value::String(iss.to_owned());
    c
}

/// The `issuers:` YAML for a local test issuer named `github`.
pub fn github_issuer_yaml(url: &str) -> String {
    format!(
        "  - name: github\n    platform: github\n    url: {url}\n    danger_allow_insecure_http: true\n"
    )
}

/// The `issuers:` YAML for a local test issuer named `gitlab`.
pub fn gitlab_issuer_yaml(url: &str) -> String {
    format!(
        "  - name: gitlab\n    platform: gitlab\n    url: {url}\n    danger_allow_insecure_http: true\n"
    )
}

/// A job token for [`acme_api_claims`] of the issuer at `iss`, audience [`AUD`], signed with
/// the issuer's first key.
pub fn acme_token(iss: &str) -> String {
    acme_token_with(iss, |_| {})
}

/// [`acme_token`] with the claims changed by `f` first.
pub fn acme_token_with(iss: &str, f: impl FnOnce(&mut Value)) -> String {
    let mut c = acme_api_claims(iss, AUD);
    f(&mut c);
    testkit::sign(TestKey::Rsa1, &c)
}

/// A GitLab-shaped ID token for acme/api (push to protected main), as `id_tokens:` gives, for
/// audience `aud`, signed by the GitLab test issuer at `issuer_url`.
pub fn gitlab_id_token(issuer_url: &str, aud: &str) -> String {
    use broker::oidc::dev;
    let job = dev::DevJob {
        repository: "acme/api".into(),
        repository_id: 2_000_001,
        owner: "acme".into(),
        owner_id: 3_000_001,
        git_ref: "refs/heads/main".into(),
        event_name: "push".into(),
        environment: None,
        workflow: "deploy".into(),
        actor: "alice".into(),
        run_id: 5150,
        audience: aud.into(),
        ttl: time::Duration::minutes(10),
        now: broker::time::Clock::now(&broker::time::SystemClock),
    };
    let mut c = dev::gitlab_claims(&job);
    c["iss"] = Value::String(issuer_url.to_owned());
    testkit::sign(TestKey::Rsa1, &c)
}

/// The `issuers:` YAML for two local test issuers, `github` and `gitlab` (the issuers the
/// example policies name).
pub fn example_issuers_yaml(github_url: &str, gitlab_url: &str) -> String {
    format!(
        "{}{}",
        github_issuer_yaml(github_url),
        gitlab_issuer_yaml(gitlab_url)
    )
}

/// A policy directory with only the example GitHub policies (for a broker configured with the
/// `github` issuer alone: the GitLab file names an issuer it would not know).
pub fn github_policies() -> anyhow::Result<tempfile::TempDir> {
    let dir = tempfile::tempdir()?;
    std::fs::copy(
        repo_root().join("policies/github.yaml"),
        dir.path().join("github.yaml"),
    )?;
    Ok(dir)
}

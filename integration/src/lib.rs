//! Harness for end-to-end tests: start the real `broker` binary against a fresh database and a
//! local OIDC issuer, and stop it by PID when the test ends.

use anyhow::Context;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The broker binary built by `scripts/test` (or `BROKER_BIN`).
pub fn broker_bin() -> PathBuf {
    if let Ok(p) = std::env::var("BROKER_BIN") {
        return p.into();
    }
    // target/debug/deps/<test> → target/debug/broker
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_default();
    dir.join(format!("broker{}", std::env::consts::EXE_SUFFIX))
}

/// Repository root (for `policies/`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// A free port on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

/// Inputs for a test broker's config file.
pub struct BrokerSetup<'a> {
    pub store_url: &'a str,
    pub policies_dir: &'a Path,
    /// YAML list items for `issuers:` (already indented by two spaces).
    pub issuers_yaml: String,
    pub audience: &'a str,
    /// Extra top-level YAML (e.g. a `reaper:` block).
    pub extra_yaml: String,
    /// Extra environment (e.g. `BROKER_FAULT_POINT`).
    pub env: Vec<(String, String)>,
}

/// A running broker process. Killed (by PID) on drop.
pub struct BrokerProcess {
    child: Option<Child>,
    pub url: String,
    pub log_path: PathBuf,
    pub config_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl BrokerProcess {
    pub async fn start(setup: &BrokerSetup<'_>) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let port = free_port();
        let config_path = dir.path().join("broker.yaml");
        let cfg = format!(
            "listen: 127.0.0.1:{port}\npublic_url: http://127.0.0.1:{port}\naudience: {aud}\n\
             store:\n  url: {{value: \"{store}\"}}\npolicies:\n  dir: {pol}\nissuers:\n{iss}\n{extra}\n",
            aud = setup.audience,
            store = setup.store_url,
            pol = setup.policies_dir.display(),
            iss = setup.issuers_yaml,
            extra = setup.extra_yaml,
        );
        std::fs::File::create(&config_path)?.write_all(cfg.as_bytes())?;
        let log_path = dir.path().join("broker.log");
        let mut p = Self {
            child: None,
            url: format!("http://127.0.0.1:{port}"),
            log_path,
            config_path,
            _dir: dir,
        };
        p.spawn(&setup.env)?;
        p.wait_healthy().await?;
        Ok(p)
    }

    fn spawn(&mut self, env: &[(String, String)]) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)?;
        let child = Command::new(broker_bin())
            .arg("serve")
            .arg("--config")
            .arg(&self.config_path)
            .env("BROKER_LOG", "debug")
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(log.try_clone()?)
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", broker_bin().display()))?;
        self.child = Some(child);
        Ok(())
    }

    /// Stop (SIGKILL by PID) and start again with the same config, without fault points.
    pub async fn restart(&mut self, env: &[(String, String)]) -> anyhow::Result<()> {
        self.kill();
        self.spawn(env)?;
        self.wait_healthy().await
    }

    pub async fn wait_healthy(&mut self) -> anyhow::Result<()> {
        let client = reqwest::Client::new();
        for _ in 0..200 {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                anyhow::bail!("broker exited early ({status}); log:\n{}", self.log());
            }
            let healthy = client.get(format!("{}/healthz", self.url)).send().await;
            if healthy.is_ok_and(|r| r.status().is_success()) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        anyhow::bail!("broker did not become healthy; log:\n{}", self.log())
    }

    /// Wait for the process to exit on its own (e.g. at a fault point).
    pub async fn wait_exit(&mut self) -> Option<std::process::ExitStatus> {
        for _ in 0..200 {
            if let Some(Ok(Some(s))) = self.child.as_mut().map(Child::try_wait) {
                return Some(s);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Send SIGHUP (policy reload) by PID.
    pub fn hangup(&self) -> anyhow::Result<()> {
        let pid = self.pid().context("not running")?;
        let ok = Command::new("kill")
            .arg("-HUP")
            .arg(pid.to_string())
            .status()?
            .success();
        anyhow::ensure!(ok, "kill -HUP failed");
        Ok(())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// GitHub-shaped claims for the example policies' `acme/api` (repository id 1000001, owner id
/// 9000001), push to main, issued now by `iss` for `aud`. Tweak the result per test.
pub fn acme_api_claims(iss: &str, aud: &str) -> serde_json::Value {
    use broker::oidc::dev;
    let now = broker::time::Clock::now(&broker::time::SystemClock);
    // Run id 77: the AWS tests expect it in the derived session name.
    let job = dev::DevJob {
        run_id: 77,
        ..dev::DevJob::acme_api(aud, now)
    };
    let mut c = dev::github_claims(&job);
    c["iss"] = serde_json::Value::String(iss.to_owned());
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

//! The broker under test: a config file from [`BrokerSetup`], the real binary started as a child
//! process on a free port of 127.0.0.1, stopped by PID (SIGKILL) when the test drops it.

use crate::issuer::{AUD, example_issuers_yaml, example_policies};
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

/// How a run of the `broker` CLI ended: exit code (-1 when killed by a signal) and output.
pub struct CliRun {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl CliRun {
    /// Standard output followed by standard error.
    pub fn output(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

/// Run the `broker` CLI with `args` (in `cwd` if given) to completion, without the machine's
/// `BROKER_CONFIG` or `BROKER_STORE_URL`: a command reads only what the test names.
#[allow(clippy::expect_used)] // test harness: a binary that cannot start fails the test
pub fn broker_cli(cwd: Option<&Path>, args: &[&str]) -> CliRun {
    let mut cmd = Command::new(broker_bin());
    if let Some(dir) = cwd {
        cmd.current_dir(dir);
    }
    let out = cmd
        .args(args)
        .env_remove("BROKER_CONFIG")
        .env_remove("BROKER_STORE_URL")
        .output()
        .expect("the broker binary runs");
    CliRun {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Inputs for a test broker's config file.
pub struct BrokerSetup<'a> {
    pub store_url: &'a str,
    pub policies_dir: &'a Path,
    /// YAML list items for `issuers:` (already indented by two spaces).
    pub issuers_yaml: String,
    /// The broker's `audience`; [`PUBLIC_URL`] in it stands for the broker's own URL (its port is
    /// picked at start), for tests of "the audience defaults to the broker URL".
    pub audience: &'a str,
    /// Extra top-level YAML (e.g. a `reaper:` block).
    pub extra_yaml: String,
    /// Extra environment (e.g. `BROKER_FAULT_POINT`).
    pub env: Vec<(String, String)>,
}

impl<'a> BrokerSetup<'a> {
    /// A broker on `store_url` with the policies of `policies_dir` and the given `issuers:`
    /// items, audience [`AUD`], no extra YAML and no extra environment.
    pub fn new(store_url: &'a str, policies_dir: &'a Path, issuers_yaml: String) -> Self {
        Self {
            store_url,
            policies_dir,
            issuers_yaml,
            audience: AUD,
            extra_yaml: String::new(),
            env: Vec::new(),
        }
    }

    /// The example setup: `policies/` of the repository and two local issuers, `github` and
    /// `gitlab` (the example policies name both).
    pub fn examples(store_url: &'a str, github_url: &str, gitlab_url: &str) -> Self {
        Self::new(
            store_url,
            example_policies(),
            example_issuers_yaml(github_url, gitlab_url),
        )
    }

    /// With this extra top-level YAML.
    pub fn extra(mut self, yaml: impl Into<String>) -> Self {
        self.extra_yaml = yaml.into();
        self
    }

    /// With these extra environment variables.
    pub fn env(mut self, vars: Vec<(String, String)>) -> Self {
        self.env = vars;
        self
    }

    /// With this audience.
    pub fn audience(mut self, audience: &'a str) -> Self {
        self.audience = audience;
        self
    }

    /// Start it ([`BrokerProcess::start`]).
    pub async fn start(&self) -> anyhow::Result<BrokerProcess> {
        BrokerProcess::start(self).await
    }
}

/// A fresh API-token signing key (PEM) written to `dir/signing.pem`, for `api_tokens:
/// signing_key: {file: …}` (brokers that must share one key, or a key that outlives a restart).
#[allow(clippy::expect_used)] // test harness: a key that cannot be written fails the test
pub fn write_signing_key(dir: &Path) -> PathBuf {
    let key = dir.join("signing.pem");
    let pem = broker::providers::api_token::generate_pem().expect("a signing key");
    std::fs::write(&key, pem.expose()).expect("write the signing key");
    key
}

/// In [`BrokerSetup::audience`]: the broker's own URL.
pub const PUBLIC_URL: &str = "{public_url}";

/// A running broker process. Killed (by PID) on drop.
pub struct BrokerProcess {
    child: Option<Child>,
    pub url: String,
    pub log_path: PathBuf,
    pub config_path: PathBuf,
    /// `http://<admin_listen>` when the config sets `admin_listen:` (operator API, `/metrics`,
    /// the detailed `/readyz`).
    pub admin_url: Option<String>,
    /// The open-files limit the process runs under (`prlimit --nofile`), if set.
    nofile: Option<u64>,
    _dir: tempfile::TempDir,
}

impl BrokerProcess {
    pub async fn start(setup: &BrokerSetup<'_>) -> anyhow::Result<Self> {
        Self::start_with_nofile(setup, None).await
    }

    /// [`Self::start`] under an open-files limit (soft and hard), as a small container or a
    /// systemd `LimitNOFILE=` would impose: the broker sizes its connection cap from it.
    pub async fn start_with_nofile(
        setup: &BrokerSetup<'_>,
        nofile: Option<u64>,
    ) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let port = crate::wait::free_port();
        let config_path = dir.path().join("broker.yaml");
        let cfg = format!(
            "listen: 127.0.0.1:{port}\npublic_url: http://127.0.0.1:{port}\naudience: {aud}\n\
             store:\n  url: {{value: \"{store}\"}}\npolicies:\n  dir: {pol}\nissuers:\n{iss}\n{extra}\n",
            aud = setup
                .audience
                .replace(PUBLIC_URL, &format!("http://127.0.0.1:{port}")),
            store = setup.store_url,
            pol = setup.policies_dir.display(),
            iss = setup.issuers_yaml,
            extra = setup.extra_yaml,
        );
        std::fs::File::create(&config_path)?.write_all(cfg.as_bytes())?;
        let log_path = dir.path().join("broker.log");
        let admin_url = setup
            .extra_yaml
            .lines()
            .find_map(|l| l.strip_prefix("admin_listen:"))
            .map(|a| format!("http://{}", a.trim()));
        let mut p = Self {
            child: None,
            url: format!("http://127.0.0.1:{port}"),
            log_path,
            config_path,
            admin_url,
            nofile,
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
        // `prlimit` sets the limit and execs the broker: the PID is the broker's.
        let mut cmd = match self.nofile {
            Some(n) => {
                let mut c = Command::new("prlimit");
                c.arg(format!("--nofile={n}:{n}"))
                    .arg("--")
                    .arg(broker_bin());
                c
            }
            None => Command::new(broker_bin()),
        };
        let child = cmd
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
        let client = crate::http::client();
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

//! Harness for end-to-end tests: start the real `broker` binary against a fresh database and a
//! local OIDC issuer, and stop it by PID when the test ends.

use anyhow::Context;
use sqlx::Row;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub mod moto;

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
    /// The broker's `audience`; [`PUBLIC_URL`] in it stands for the broker's own URL (its port is
    /// picked at start), for tests of "the audience defaults to the broker URL".
    pub audience: &'a str,
    /// Extra top-level YAML (e.g. a `reaper:` block).
    pub extra_yaml: String,
    /// Extra environment (e.g. `BROKER_FAULT_POINT`).
    pub env: Vec<(String, String)>,
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
        let port = free_port();
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

/// Every secret a test saw (minted credentials, revocation tokens, job tokens, operator tokens),
/// checked at the end of the test against everything the broker wrote down: its log (run with
/// `BROKER_LOG=debug`, stderr included, so panic output too) and every table of its store.
///
/// Use: `let mut secrets = Secrets::default();` → `secrets.add(job_token)` for what the test
/// sends, `secrets.add_response(&body)` for each exchange response →
/// `secrets.assert_not_leaked(&broker, db.url()).await` before the broker is dropped.
#[derive(Default)]
pub struct Secrets {
    values: Vec<String>,
}

/// Credential fields the providers mark secret (`Field::Secret`); everything else in a
/// credential (username, access key id, expiry) is public and legitimately logged.
pub const SECRET_FIELDS: &[&str] = &[
    "token",
    "password",
    "database_url",
    "secret_access_key",
    "session_token",
];

/// Shortest fragment searched for: long enough to be unique to one secret.
const FRAGMENT: usize = 20;

impl Secrets {
    /// Remember one secret (ignored if shorter than the searched fragment).
    pub fn add(&mut self, s: impl Into<String>) {
        let s = s.into();
        if s.len() >= FRAGMENT && !self.values.contains(&s) {
            self.values.push(s);
        }
    }

    /// Remember the revocation token and every secret field of an exchange response.
    pub fn add_response(&mut self, body: &serde_json::Value) {
        if let Some(t) = body["revocation_token"].as_str() {
            self.add(t);
        }
        if let Some(creds) = body["credentials"].as_object() {
            for c in creds.values() {
                for f in SECRET_FIELDS {
                    if let Some(v) = c[*f].as_str() {
                        self.add(v);
                    }
                }
            }
        }
    }

    pub fn len(&self) -> usize {
        self.values.len()
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// Every place `haystack` contains a secret or a recognisable fragment of one (its first or
    /// last 20 characters: a JWT's signature, a password's tail), as `"<what>: secret #i"`
    /// (never the secret itself, so a failing test does not leak it either).
    pub fn find_in(&self, what: &str, haystack: &str) -> Vec<String> {
        // One pass over the haystack for every fragment (logs and store dumps run to megabytes).
        // A whole secret contains its tail, so the tails also find whole secrets.
        let mut patterns: Vec<&[u8]> = Vec::new();
        let mut owner = Vec::new();
        for (i, s) in self.values.iter().enumerate() {
            let b = s.as_bytes();
            patterns.push(&b[b.len() - FRAGMENT..]);
            owner.push(i);
            // A JWT's head is the base64 of a common header, and a URL's head is its scheme and
            // (public) user name: only their tails are unique.
            if !s.starts_with("eyJ") && !s.contains("://") {
                patterns.push(&b[..FRAGMENT]);
                owner.push(i);
            }
        }
        let ac = match aho_corasick::AhoCorasick::new(&patterns) {
            Ok(ac) => ac,
            Err(e) => return vec![format!("{what}: cannot search: {e}")],
        };
        let found: std::collections::BTreeSet<usize> = ac
            .find_overlapping_iter(haystack.as_bytes())
            .map(|m| owner[m.pattern().as_usize()])
            .collect();
        found
            .into_iter()
            .map(|i| format!("{what}: secret #{i} ({} chars)", self.values[i].len()))
            .collect()
    }

    /// Assert that no secret reached the broker's log or its store, and that the broker never
    /// panicked. `store_url` is the store the broker used (Postgres: every table of the public
    /// schema is dumped as text; SQLite: the database files are searched byte for byte).
    pub async fn assert_not_leaked(&self, broker: &BrokerProcess, store_url: &str) {
        let hits = self.leaks(broker, store_url).await;
        assert!(hits.is_empty(), "secrets leaked: {hits:?}");
        let log = broker.log();
        assert!(
            !log.contains("panicked at"),
            "the broker panicked; log:\n{log}"
        );
    }

    /// Where secrets leaked (empty: nowhere). See [`Self::assert_not_leaked`].
    pub async fn leaks(&self, broker: &BrokerProcess, store_url: &str) -> Vec<String> {
        let mut hits = self.find_in("broker log", &broker.log());
        match dump_store(store_url).await {
            Ok(dump) => hits.extend(self.find_in("store", &dump)),
            Err(e) => hits.push(format!("store could not be searched: {e:#}")),
        }
        hits
    }
}

/// Everything in a store as one string (see [`Secrets::assert_not_leaked`]).
pub async fn dump_store(store_url: &str) -> anyhow::Result<String> {
    use sqlx::Connection;
    if let Some(path) = store_url.strip_prefix("sqlite:") {
        let path = path.split('?').next().unwrap_or(path);
        let mut out = String::new();
        for suffix in ["", "-wal", "-journal"] {
            if let Ok(bytes) = std::fs::read(format!("{path}{suffix}")) {
                out.push_str(&String::from_utf8_lossy(&bytes));
            }
        }
        anyhow::ensure!(!out.is_empty(), "no SQLite file at {path}");
        return Ok(out);
    }
    let mut conn = sqlx::PgConnection::connect(store_url).await?;
    let tables: Vec<String> = sqlx::query(
        "SELECT quote_ident(table_name) FROM information_schema.tables \
         WHERE table_schema = 'public' AND table_type = 'BASE TABLE'",
    )
    .fetch_all(&mut conn)
    .await?
    .into_iter()
    .map(|r| r.get::<String, _>(0))
    .collect();
    anyhow::ensure!(!tables.is_empty(), "the store has no tables");
    let mut out = String::new();
    for t in tables {
        // quote_ident made `t` safe to splice.
        let rows = sqlx::query(&format!("SELECT x::text FROM {t} x"))
            .fetch_all(&mut conn)
            .await?;
        for r in rows {
            out.push_str(&r.get::<String, _>(0));
            out.push('\n');
        }
    }
    conn.close().await?;
    Ok(out)
}

/// What a [`FaultProxy`] does with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyMode {
    /// Forward both ways.
    Up,
    /// Close every open connection and every new one at once (a crashed or unreachable peer).
    Down,
    /// Accept and hold connections, forwarding nothing until the mode changes (a hung peer,
    /// a full network buffer, a lock wait).
    Stall,
}

/// A TCP proxy on 127.0.0.1 in front of a real server (Postgres, an issuer), which a test can
/// cut or stall and restore without restarting anything on either side.
pub struct FaultProxy {
    pub port: u16,
    mode: tokio::sync::watch::Sender<ProxyMode>,
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// Listen on a free port and forward to `upstream` (`host:port`).
    pub async fn start(upstream: String) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let (mode, rx) = tokio::sync::watch::channel(ProxyMode::Up);
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = accepted.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let rx = rx.clone();
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    if *rx.borrow() == ProxyMode::Down {
                        return; // dropping `client` closes it
                    }
                    let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                        return;
                    };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    // Either direction ending (or the proxy going down) ends both.
                    tokio::select! {
                        _ = pump(cr, sw, rx.clone()) => {}
                        _ = pump(sr, cw, rx) => {}
                    }
                });
            }
        });
        Ok(Self {
            port,
            mode,
            accepted,
            task,
        })
    }

    pub fn set(&self, mode: ProxyMode) {
        self.mode.send_replace(mode);
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// `url` with its host and port replaced by this proxy's.
    pub fn url_via(&self, url: &str) -> anyhow::Result<String> {
        let mut u = url::Url::parse(url)?;
        u.set_host(Some("127.0.0.1"))?;
        u.set_port(Some(self.port))
            .map_err(|()| anyhow::anyhow!("cannot set a port on {}", u.scheme()))?;
        Ok(u.to_string())
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.set(ProxyMode::Down);
        self.task.abort();
    }
}

/// Copy `from` → `to` while the mode allows: `Stall` holds the bytes read so far, `Down` ends.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut mode: tokio::sync::watch::Receiver<ProxyMode>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        // Wait while stalled; stop when down.
        loop {
            let m = *mode.borrow_and_update();
            match m {
                ProxyMode::Up => break,
                ProxyMode::Down => return,
                ProxyMode::Stall => {
                    if mode.changed().await.is_err() {
                        return;
                    }
                }
            }
        }
        let n = tokio::select! {
            r = from.read(&mut buf) => match r {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            changed = mode.changed() => {
                if changed.is_err() {
                    return;
                }
                continue;
            }
        };
        // Bytes read before a stall are held until the stall ends (or dropped if it goes down).
        loop {
            let m = *mode.borrow_and_update();
            match m {
                ProxyMode::Up => break,
                ProxyMode::Down => return,
                ProxyMode::Stall => {
                    if mode.changed().await.is_err() {
                        return;
                    }
                }
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// A Postgres target for job users on the test server (`BROKER_TEST_PG_URL`): its own database,
/// owner role and role prefix (so parallel tests never see each other's roles), and a policy
/// file with one credential, `pg-app`, for the example job. [`Self::roles`] counts the job users
/// that exist right now: the number a crash or a lost revocation would leave behind.
pub struct PgRoleTarget {
    admin: sqlx::postgres::PgPool,
    url: String,
    tag: String,
    prefix: String,
}

impl PgRoleTarget {
    pub async fn new() -> anyhow::Result<Self> {
        let url = std::env::var(broker::store::testdb::PG_URL_ENV)
            .ok()
            .filter(|u| !u.trim().is_empty())
            .unwrap_or_else(|| broker::store::testdb::DEFAULT_PG_URL.to_owned());
        let admin = sqlx::postgres::PgPoolOptions::new()
            .max_connections(2)
            .connect(&url)
            .await?;
        let tag = format!("f{:08x}", (uuid::Uuid::new_v4().as_u128() >> 96) as u32);
        for sql in [
            format!("CREATE DATABASE {tag}_app"),
            format!("CREATE ROLE {tag}g_owner NOLOGIN"),
        ] {
            sqlx::raw_sql(&sql).execute(&admin).await?;
        }
        Ok(Self {
            admin,
            url,
            prefix: format!("{tag}u_"),
            tag,
        })
    }

    pub fn yaml(&self) -> String {
        let u = url::Url::parse(&self.url).ok();
        format!(
            "targets:\n  postgres:\n    main:\n      admin_url: {{value: \"{url}\"}}\n      host: {host}\n      port: {port}\n      sslmode: disable\n      connect_timeout: 3s\n      role_prefix: {prefix}\n",
            url = self.url,
            host = u.as_ref().and_then(|u| u.host_str()).unwrap_or("127.0.0.1"),
            port = u.as_ref().and_then(url::Url::port).unwrap_or(5432),
            prefix = self.prefix,
        )
    }

    pub fn policy(&self) -> String {
        format!(
            "credentials:\n  - name: pg-app\n    max_ttl: 15m\n    postgres:\n      target: main\n      database: {t}_app\n      owner: {t}g_owner\nrules:\n  - name: acme-main\n    issuer: github\n    credentials: [pg-app]\n    when: claims.repository_id == \"1000001\"\n",
            t = self.tag
        )
    }

    /// The role prefix of this target's job users.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub async fn roles(&self) -> i64 {
        sqlx::query("SELECT count(*) FROM pg_roles WHERE starts_with(rolname, $1)")
            .bind(&self.prefix)
            .fetch_one(&self.admin)
            .await
            .map(|r| r.get(0))
            .unwrap_or(-1)
    }

    /// Poll until exactly `want` job users exist (at most ~20 s); the last count.
    pub async fn wait_roles(&self, want: i64) -> i64 {
        let mut n = -1;
        for _ in 0..200 {
            n = self.roles().await;
            if n == want {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        n
    }

    pub async fn cleanup(self) {
        let left: Vec<String> =
            sqlx::query("SELECT rolname::text FROM pg_roles WHERE starts_with(rolname, $1)")
                .bind(&self.tag)
                .fetch_all(&self.admin)
                .await
                .unwrap_or_default()
                .into_iter()
                .map(|r| r.get(0))
                .collect();
        let _ = sqlx::raw_sql(&format!(
            "DROP DATABASE IF EXISTS {}_app WITH (FORCE)",
            self.tag
        ))
        .execute(&self.admin)
        .await;
        for r in left {
            let _ = sqlx::raw_sql(&format!("DROP ROLE IF EXISTS {r}"))
                .execute(&self.admin)
                .await;
        }
        self.admin.close().await;
    }
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)] // test code
    use super::*;

    /// The leak search finds a secret whole, by its tail (a JWT signature, a password's end) or
    /// by its head (a random token's start), and never reports the secret itself.
    #[test]
    fn secrets_are_found_whole_and_by_fragment() {
        let mut s = Secrets::default();
        s.add_response(&serde_json::json!({
            "revocation_token": "brk_rvk_AAAABBBBCCCCDDDDEEEEFFFFGGGGHHHH",
            "credentials": {"db": {"username": "brk_user_public", "password": "pw-0123456789abcdefghijKLMNOP"}},
        }));
        s.add("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.signature-part-0123456789");
        s.add("short");
        assert_eq!(
            s.len(),
            3,
            "short values and public fields are not collected"
        );
        assert!(
            s.find_in("log", "user brk_user_public logged in")
                .is_empty()
        );
        let hits = s.find_in("log", "token=brk_rvk_AAAABBBBCCCC…");
        assert_eq!(hits.len(), 1, "{hits:?}");
        assert!(!hits[0].contains("AAAA"), "a hit never quotes the secret");
        assert_eq!(s.find_in("log", "…6789abcdefghijKLMNOP").len(), 1);
        assert_eq!(s.find_in("log", "sig=signature-part-0123456789").len(), 1);
        // A JWT's head is a common header, not evidence of a leak.
        assert!(s.find_in("log", "eyJhbGciOiJSUzI1NiJ9.eyJ").is_empty());
    }
}

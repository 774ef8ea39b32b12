//! A real OpenSSH server for the SSH certificate tests: Debian's `openssh-server`
//! (`/usr/sbin/sshd`, installed by `scripts/test`), started by the test on a free loopback port
//! in its own temporary directory with its own host key, `TrustedUserCAKeys`, `RevokedKeys` and
//! `AuthorizedPrincipalsFile`, run in the foreground (`-D -e -f <config>`), its log kept, and
//! stopped by PID. Logging in needs root (sshd changes to the user), so a run without root or
//! without sshd says so: it fails when `BROKER_SSHD_REQUIRED` is set (`scripts/test` promised
//! to install it) and is skipped otherwise.

#![allow(clippy::expect_used, clippy::panic)] // test harness: a server that cannot start fails the test

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const SSHD: &str = "/usr/sbin/sshd";

/// Whether the sshd tests can run here; `false` (after saying why) when they are skipped.
/// Panics when `BROKER_SSHD_REQUIRED` is set and they cannot run.
pub fn available() -> bool {
    let why = if !Path::new(SSHD).exists() {
        Some("openssh-server is not installed (/usr/sbin/sshd missing)")
    } else if !is_root() {
        Some("sshd must run as root to log users in")
    } else if Command::new("ssh").arg("-V").output().is_err() {
        Some("the ssh client is not installed")
    } else {
        None
    };
    match why {
        None => true,
        Some(w) if std::env::var_os("BROKER_SSHD_REQUIRED").is_some() => {
            panic!("scripts/test promised an sshd for these tests, but {w}")
        }
        Some(w) => {
            eprintln!("SKIPPED: {w}");
            false
        }
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// `ssh-keygen -t ed25519 -N '' -f <path>` (writes `path` and `path.pub`).
pub fn keygen(path: &Path) {
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "test", "-f"])
        .arg(path)
        .output()
        .expect("ssh-keygen runs");
    assert!(out.status.success(), "ssh-keygen: {out:?}");
}

/// A running sshd. Killed by PID on drop.
pub struct Sshd {
    child: Option<Child>,
    pub port: u16,
    pub dir: tempfile::TempDir,
    /// The user certificates log in as (the test runs as root).
    pub user: String,
}

impl Sshd {
    /// Start sshd trusting `ca_pub` (a `TrustedUserCAKeys` line), with `krl` as `RevokedKeys`
    /// and `principals` as the only principals accepted for the login user.
    pub async fn start(ca_pub: &str, krl: &[u8], principals: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tmp");
        let d = dir.path();
        keygen(&d.join("host_ed25519"));
        std::fs::write(d.join("ca.pub"), ca_pub).expect("ca.pub");
        std::fs::write(d.join("revoked.krl"), krl).expect("krl");
        std::fs::create_dir(d.join("principals")).expect("principals dir");
        let user = "root".to_owned();
        std::fs::write(
            d.join("principals").join(&user),
            format!("{}\n", principals.join("\n")),
        )
        .expect("principals file");
        // sshd's privilege-separation directory (Debian's package creates it at boot).
        std::fs::create_dir_all("/run/sshd").expect("/run/sshd");
        let port = crate::free_port();
        let config = format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_ed25519\nPidFile none\n\
             AuthorizedKeysFile none\nTrustedUserCAKeys {d}/ca.pub\nRevokedKeys {d}/revoked.krl\n\
             AuthorizedPrincipalsFile {d}/principals/%u\nPubkeyAuthentication yes\n\
             PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n\
             StrictModes no\nPermitRootLogin prohibit-password\nLogLevel VERBOSE\n\
             MaxStartups 50\nSubsystem sftp internal-sftp\n",
            d = d.display()
        );
        std::fs::write(d.join("sshd_config"), config).expect("sshd_config");
        let log = std::fs::File::create(d.join("sshd.log")).expect("log");
        let child = Command::new(SSHD)
            .args(["-D", "-e", "-f"])
            .arg(d.join("sshd_config"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("sshd starts");
        let mut s = Self {
            child: Some(child),
            port,
            dir,
            user,
        };
        s.wait_listening().await;
        s
    }

    async fn wait_listening(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            if let Some(Ok(Some(st))) = self.child.as_mut().map(Child::try_wait) {
                panic!("sshd exited ({st}): {}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("sshd did not listen: {}", self.log());
    }

    /// Replace the KRL (as a host's refresh job does: write a new file, rename it in place).
    pub fn write_krl(&self, krl: &[u8]) {
        let tmp = self.dir.path().join("revoked.krl.new");
        std::fs::write(&tmp, krl).expect("krl");
        std::fs::rename(&tmp, self.dir.path().join("revoked.krl")).expect("krl in place");
    }

    pub fn krl_path(&self) -> PathBuf {
        self.dir.path().join("revoked.krl")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sshd.log")).unwrap_or_default()
    }

    /// `ssh` as [`Sshd::user`] with this key and certificate, running `command`; nothing from
    /// the user's own ssh config or agent.
    pub async fn login(&self, identity: &Path, certificate: &Path, command: &str) -> Output {
        let mut cmd = tokio::process::Command::new("ssh");
        cmd.args([
            "-F",
            "/dev/null",
            "-T",
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
        ])
        .args(["-o", "IdentityAgent=none", "-o", "StrictHostKeyChecking=no"])
        .args(["-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR"])
        .args(["-o", "ConnectTimeout=10", "-o", "PasswordAuthentication=no"])
        .arg("-o")
        .arg(format!("CertificateFile={}", certificate.display()))
        .arg("-i")
        .arg(identity)
        .args(["-p", &self.port.to_string()])
        .arg(format!("{}@127.0.0.1", self.user))
        .arg(command)
        .stdin(Stdio::null())
        .kill_on_drop(true);
        tokio::time::timeout(Duration::from_secs(30), cmd.output())
            .await
            .expect("ssh finishes")
            .expect("ssh runs")
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `ssh-keygen -Q -f <krl> <certificate>`: `true` when the KRL revokes it.
pub fn krl_revokes(krl: &Path, certificate: &Path) -> bool {
    let out = Command::new("ssh-keygen")
        .arg("-Q")
        .arg("-f")
        .arg(krl)
        .arg(certificate)
        .output()
        .expect("ssh-keygen runs");
    let text = String::from_utf8_lossy(&out.stdout);
    match out.status.code() {
        Some(0) if text.contains(": ok") => false,
        Some(1) if text.contains("REVOKED") => true,
        _ => panic!("ssh-keygen -Q: {out:?}"),
    }
}

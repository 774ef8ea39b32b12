//! The statically linked client in an empty root, running the GitLab component's own steps.
//!
//! A GitLab job runs its script with the image's `sh`; on Alpine that is busybox, with musl and
//! no glibc. The released client (`scripts/build-static-client`) links everything statically, so
//! these tests put it in a root that holds nothing but the client and a static busybox (no libc,
//! no loader, no /etc), `chroot` into it, and run the component's `before_script`, `script` and
//! `after_script` exactly as `action/gitlab/templates/credentials.yml` writes them (inputs
//! expanded the way GitLab expands `$[[ inputs.* ]]`), against a live broker on 127.0.0.1.
//!
//! What is emulated: GitLab's `id_tokens:` (the job's `BROKER_ID_TOKEN` is signed by our
//! GitLab-shaped test issuer) and the runner's script wrapper (`set -e`, before_script and script
//! in one shell, after_script in another, as GitLab's runner does).
//!
//! `scripts/test` builds the static client and installs busybox-static, and sets
//! `BROKER_STATIC_CLIENT_REQUIRED=1` so a missing piece fails the run; a plain `cargo test`
//! without them prints `SKIPPED:` and passes.

use broker::oidc::testkit::TestIssuer;
use broker::store::testdb::TestDb;
use integration::http::{self, Api};
use integration::{AUD, BrokerProcess, BrokerSetup, gitlab_id_token, repo_root};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::Command;

const CREDENTIAL: &str = "gitlab-deploy-api";

/// The static client: `BROKER_STATIC_CLIENT`, else `target/<arch>-unknown-linux-gnu/debug/broker`
/// beside the dynamically linked test binary (what `scripts/build-static-client` writes).
fn static_client() -> PathBuf {
    if let Ok(p) = std::env::var("BROKER_STATIC_CLIENT") {
        return p.into();
    }
    let bin = integration::broker_bin();
    let target = bin.parent().and_then(Path::parent).unwrap().to_path_buf();
    target
        .join(format!("{}-unknown-linux-gnu", std::env::consts::ARCH))
        .join("debug")
        .join("broker")
}

const BUSYBOX: &str = "/bin/busybox";

/// The pieces, or why they are missing (a failure under `scripts/test`, else a skip).
fn pieces() -> Option<(PathBuf, PathBuf)> {
    let client = static_client();
    let busybox = PathBuf::from(BUSYBOX);
    let missing = if !client.exists() {
        format!(
            "no static client at {} (scripts/build-static-client)",
            client.display()
        )
    } else if !busybox.exists() || !is_static(&busybox) {
        "no static busybox at /bin/busybox (package busybox-static)".to_owned()
    } else {
        return Some((client, busybox));
    };
    if std::env::var("BROKER_STATIC_CLIENT_REQUIRED").as_deref() == Ok("1") {
        panic!("{missing}");
    }
    println!("SKIPPED: {missing}");
    None
}

/// No program interpreter and no shared library needed: the ELF file runs without a libc.
fn is_static(path: &Path) -> bool {
    let out = |flag: &str| {
        let o = Command::new("readelf")
            .args([flag, "-W"])
            .arg(path)
            .output()
            .expect("readelf (binutils) runs");
        assert!(o.status.success(), "readelf {flag} {}", path.display());
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let headers = out("-l");
    let dynamic = out("-d");
    !headers.contains("INTERP") && !dynamic.contains("(NEEDED)")
}

/// A root holding only `bin/busybox` (and `bin/broker` when `with_client`), owned by the test.
struct EmptyRoot {
    dir: tempfile::TempDir,
}

impl EmptyRoot {
    fn new(busybox: &Path, client: Option<&Path>) -> EmptyRoot {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("bin")).unwrap();
        std::fs::copy(busybox, dir.path().join("bin/busybox")).unwrap();
        if let Some(c) = client {
            std::fs::copy(c, dir.path().join("bin/broker")).unwrap();
        }
        let root = EmptyRoot { dir };
        assert_eq!(
            root.files(),
            if client.is_some() {
                vec!["bin", "bin/broker", "bin/busybox"]
            } else {
                vec!["bin", "bin/busybox"]
            },
            "the root holds nothing else"
        );
        // What an image's build would do: busybox installs its applets as links to itself, and
        // the writable /tmp every image has. Still nothing but busybox and the client.
        let (ok, log) = root.run("/bin/busybox --install -s /bin && mkdir -p /tmp /out", &[]);
        assert!(ok, "{log}");
        root
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Every path in the root, relative and sorted.
    fn files(&self) -> Vec<String> {
        fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
            for e in std::fs::read_dir(dir).unwrap() {
                let p = e.unwrap().path();
                out.push(p.strip_prefix(base).unwrap().display().to_string());
                if p.is_dir() && !p.is_symlink() {
                    walk(base, &p, out);
                }
            }
        }
        let mut out = Vec::new();
        walk(self.path(), self.path(), &mut out);
        out.sort();
        out
    }

    /// Runs `script` with busybox `sh` inside the root (chroot; through a user namespace when
    /// not root), with exactly `env` (and PATH). Returns success and stdout+stderr.
    fn run(&self, script: &str, env: &[(String, String)]) -> (bool, String) {
        let root_user = Command::new("id")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
            .unwrap_or(false);
        // Found on this machine's PATH: the child's environment is the job's, not ours.
        let chroot = which("chroot");
        let mut cmd = if root_user {
            Command::new(chroot)
        } else {
            let mut c = Command::new(which("unshare"));
            c.args(["--user", "--map-root-user"]).arg(chroot);
            c
        };
        cmd.arg(self.path())
            .args(["/bin/busybox", "sh", "-c", script])
            .env_clear()
            .env("PATH", "/bin")
            .envs(env.iter().map(|(k, v)| (k, v)));
        let out = cmd.output().expect("chroot runs");
        let log = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), log)
    }
}

/// The full path of a program on this machine's PATH.
fn which(program: &str) -> PathBuf {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{program} is on PATH"))
}

/// The component's job as GitLab would run it, with `inputs` over the template's defaults.
struct ComponentJob {
    variables: Vec<(String, String)>,
    before_script: Vec<String>,
    script: Vec<String>,
    after_script: Vec<String>,
}

impl ComponentJob {
    fn from_template(inputs: &[(&str, Value)]) -> ComponentJob {
        let text =
            std::fs::read_to_string(repo_root().join("action/gitlab/templates/credentials.yml"))
                .unwrap();
        let (spec, job) = text.split_once("\n---\n").expect("spec, then the job");
        let spec: Value = serde_saphyr::from_str(spec).unwrap();
        let mut job = job.to_owned();
        for (name, decl) in spec["spec"]["inputs"].as_object().unwrap() {
            let value = inputs
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
                .or_else(|| decl.get("default").cloned())
                .unwrap_or_else(|| panic!("input {name} has no default and was not given"));
            // GitLab interpolates a string input as its text and an array as a sequence.
            let text = match &value {
                Value::String(s) => s.clone(),
                Value::Bool(_) | Value::Number(_) => value.to_string(),
                other => other.to_string(),
            };
            job = job.replace(&format!("$[[ inputs.{name} ]]"), &text);
        }
        assert!(!job.contains("$[["), "every input expanded: {job}");
        let doc: Value = serde_saphyr::from_str(&job).unwrap();
        let (_, j) = doc.as_object().unwrap().iter().next().unwrap();
        let lines = |key: &str| -> Vec<String> {
            fn flat(v: &Value, out: &mut Vec<String>) {
                match v {
                    Value::Array(a) => a.iter().for_each(|x| flat(x, out)),
                    Value::String(s) => out.push(s.clone()),
                    other => panic!("script line {other}"),
                }
            }
            let mut out = Vec::new();
            flat(&j[key], &mut out);
            out
        };
        ComponentJob {
            variables: j["variables"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
                .collect(),
            before_script: lines("before_script"),
            script: lines("script"),
            after_script: lines("after_script"),
        }
    }

    /// Runs the job in `root` with GitLab's predefined variables and the job's ID token.
    /// Returns (job succeeded, log of both phases).
    fn run(&self, root: &EmptyRoot, id_token: &str) -> (bool, String) {
        let mut env = self.variables.clone();
        env.push(("CI".into(), "true".into()));
        env.push(("CI_JOB_ID".into(), "4242".into()));
        env.push(("BROKER_ID_TOKEN".into(), id_token.into()));
        let main = format!(
            "set -e\n{}\n{}\n",
            self.before_script.join("\n"),
            self.script.join("\n")
        );
        let (ok, log) = root.run(&main, &env);
        let after = format!("set -e\n{}\n", self.after_script.join("\n"));
        let (_, after_log) = root.run(&after, &env);
        (ok, format!("{log}\n--- after_script ---\n{after_log}"))
    }
}

struct Env {
    // The example policies name both issuers; only GitLab's tokens are used here.
    github: TestIssuer,
    gitlab: TestIssuer,
    db: TestDb,
    broker: BrokerProcess,
    api: Api,
}

async fn env() -> Env {
    let github = TestIssuer::start().await;
    let gitlab = TestIssuer::start().await;
    let db = TestDb::postgres().await;
    let broker = BrokerSetup::examples(db.url(), &github.url(), &gitlab.url())
        .start()
        .await
        .expect("broker starts");
    let api = Api::new(http::client(), &broker.url);
    Env {
        github,
        gitlab,
        db,
        broker,
        api,
    }
}

impl Env {
    async fn finish(mut self) {
        self.broker.kill();
        self.github.shutdown().await;
        self.gitlab.shutdown().await;
        self.db.cleanup().await;
    }
}

/// The commands the job runs after `broker require`: use the token from inside the root
/// (busybox wget asks the broker's introspection) and hand it to the test through /out.
fn job_script() -> Value {
    json!([
        "test -n \"$GITLAB_DEPLOY_API_TOKEN\"",
        "test -z \"$BROKER_ID_TOKEN\"",
        "printf '%s' \"$GITLAB_DEPLOY_API_TOKEN\" > /out/token",
        "wget -q -O /out/during.json --post-data \"token=$GITLAB_DEPLOY_API_TOKEN\" \"$BROKER_URL/v1/introspect\"",
    ])
}

/// Asserts the job's effect: the token was active during the job (seen from inside the root),
/// is revoked after `after_script`, and no secret is in the log.
async fn assert_used_and_revoked(e: &Env, root: &EmptyRoot, id_token: &str, log: &str) {
    let token = std::fs::read_to_string(root.path().join("out/token")).expect("the job's token");
    assert!(token.starts_with("eyJ"), "{log}");
    let during: Value = serde_json::from_str(
        &std::fs::read_to_string(root.path().join("out/during.json")).expect("introspection"),
    )
    .unwrap();
    assert_eq!(
        during["active"],
        json!(true),
        "active during the job: {log}"
    );
    assert!(
        !e.api.active(&token).await,
        "revoked by after_script: {log}"
    );
    assert!(!log.contains(&token), "the token is not in the log");
    assert!(!log.contains(id_token), "the ID token is not in the log");
    assert!(!log.contains("brk_rvk_"), "no revocation token in the log");
}

/// The client and busybox are static: no interpreter, no shared library.
#[test]
fn static_client_needs_no_libc() {
    let Some((client, busybox)) = pieces() else {
        return;
    };
    assert!(is_static(&client), "{} is static", client.display());
    assert!(is_static(&busybox));
    // The check itself can fail: the test binary is dynamically linked.
    assert!(!is_static(&std::env::current_exe().unwrap()));
}

/// An "Alpine-like" job: an image with busybox and the client and nothing else runs the
/// component as written. The client exchanges the job's ID token, the script uses the
/// credential, and `after_script` revokes it.
#[tokio::test]
async fn component_runs_in_an_empty_root_with_the_static_client() {
    let Some((client, busybox)) = pieces() else {
        return;
    };
    let e = env().await;
    let root = EmptyRoot::new(&busybox, Some(&client));
    let version = root.run("broker --version", &[]);
    assert!(
        version.0 && version.1.starts_with("broker "),
        "{}",
        version.1
    );

    let job = ComponentJob::from_template(&[
        ("broker-url", json!(e.broker.url)),
        ("credentials", json!(CREDENTIAL)),
        ("audience", json!(AUD)),
        ("script", job_script()),
    ]);
    let id_token = gitlab_id_token(&e.gitlab.url(), AUD);
    let (ok, log) = job.run(&root, &id_token);
    assert!(ok, "{log}");
    assert_used_and_revoked(&e, &root, &id_token, &log).await;
    assert!(
        !root.path().join("tmp/broker-4242").exists(),
        "after_script removed the secrets directory"
    );
    e.finish().await;
}

/// An image without the client: the job downloads it from `client-url` (busybox wget) and checks
/// `client-sha256` first. A wrong checksum fails the job before any exchange and leaves no
/// client behind; the right one runs the job. The broker is reached by name through the image's
/// /etc/hosts: the static client resolves names without glibc's loadable modules.
// Multi-threaded: the job blocks this thread while the release server answers on another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn component_downloads_the_client_and_checks_its_checksum() {
    let Some((client, busybox)) = pieces() else {
        return;
    };
    let e = env().await;
    let bytes = std::fs::read(&client).unwrap();
    let sha = {
        let o = Command::new("sha256sum").arg(&client).output().unwrap();
        String::from_utf8_lossy(&o.stdout)
            .split(' ')
            .next()
            .unwrap()
            .to_owned()
    };
    // A release server on 127.0.0.1 serving the client as a release asset.
    let app = axum::Router::new().route(
        "/releases/broker-linux-static",
        axum::routing::get(move || {
            let b = bytes.clone();
            async move { b }
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let server = tokio::spawn(async move { axum::serve(l, app).await.ok() });
    let asset = format!("http://127.0.0.1:{port}/releases/broker-linux-static");
    let broker_port = e.broker.url.rsplit(':').next().unwrap().to_owned();
    let by_name = format!("http://broker.internal:{broker_port}");
    let id_token = gitlab_id_token(&e.gitlab.url(), AUD);

    // Wrong checksum: refused before the exchange.
    let root = EmptyRoot::new(&busybox, None);
    let job = ComponentJob::from_template(&[
        ("broker-url", json!(by_name)),
        ("credentials", json!(CREDENTIAL)),
        ("audience", json!(AUD)),
        ("client-url", json!(asset)),
        ("client-sha256", json!("0".repeat(64))),
        ("script", job_script()),
    ]);
    let (ok, log) = job.run(&root, &id_token);
    assert!(!ok, "a mismatching client fails the job: {log}");
    assert!(log.contains("SHA-256"), "{log}");
    assert!(!root.path().join("out/token").exists(), "no exchange ran");
    assert!(
        !root.path().join("tmp/broker-cli-4242/broker").exists()
            && !root.path().join("tmp/broker-cli-4242/broker.part").exists(),
        "no unverified client is left behind"
    );

    // Right checksum, broker by name.
    let root = EmptyRoot::new(&busybox, None);
    std::fs::create_dir_all(root.path().join("etc")).unwrap();
    std::fs::write(
        root.path().join("etc/hosts"),
        "127.0.0.1 localhost\n127.0.0.1 broker.internal\n",
    )
    .unwrap();
    let job = ComponentJob::from_template(&[
        ("broker-url", json!(by_name)),
        ("credentials", json!(CREDENTIAL)),
        ("audience", json!(AUD)),
        ("client-url", json!(asset)),
        ("client-sha256", json!(sha)),
        ("script", job_script()),
    ]);
    let (ok, log) = job.run(&root, &id_token);
    assert!(ok, "{log}");
    assert_used_and_revoked(&e, &root, &id_token, &log).await;
    server.abort();
    e.finish().await;
}

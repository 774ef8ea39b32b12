//! End to end for SSH certificates: the real `broker` binary as the SSH user CA of a real
//! `sshd` (Debian's openssh-server, [`integration::sshd`]) that trusts the CA key from
//! `/v1/ssh/main/ca.pub` and reads its `RevokedKeys` from `/v1/ssh/main/krl`. A certificate
//! logs in and runs a command; a wrong principal, an expired certificate and (after the KRL
//! refresh) a revoked one are refused, while another job's certificate keeps working.

use broker::oidc::testkit::TestIssuer;
use broker::store::testdb::TestDb;
use integration::http::{self, Api, json_string as s};
use integration::sshd::{self, Sshd, keygen, krl_revokes};
use integration::store_db::audit_log;
use integration::{BrokerProcess, BrokerSetup, Secrets, acme_token, github_issuer_yaml};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};

const POLICY: &str = r#"credentials:
  - name: ssh-deploy
    max_ttl: 15m
    ssh_cert:
      ca: main
      principals: [deploy]
  - name: ssh-staging
    max_ttl: 15m
    ssh_cert:
      ca: main
      principals: [staging]
  - name: ssh-forced
    max_ttl: 15m
    ssh_cert:
      ca: main
      principals: [deploy]
      force_command: "echo forced-command-ran"
      source_address: [127.0.0.1/32]
  - name: ssh-own-key
    max_ttl: 15m
    ssh_cert:
      ca: main
      principals: ['deploy-${repository_owner}']
      allow_generated_key: false
rules:
  - name: acme-main
    issuer: github
    credentials: [ssh-deploy, ssh-staging, ssh-forced, ssh-own-key]
    when: claims.repository_id == "1000001" && claims.ref == "refs/heads/main"
"#;

struct Env {
    issuer: TestIssuer,
    db: TestDb,
    broker: BrokerProcess,
    api: Api,
    http: reqwest::Client,
    dir: tempfile::TempDir,
    _policies: tempfile::TempDir,
}

async fn env() -> Env {
    env_with("", Vec::new()).await
}

async fn env_with(extra: &str, envs: Vec<(String, String)>) -> Env {
    let dir = tempfile::tempdir().expect("tmp");
    keygen(&dir.path().join("ca"));
    let db = TestDb::postgres().await;
    let issuer = TestIssuer::start().await;
    let policies = tempfile::tempdir().expect("tmp");
    std::fs::write(policies.path().join("ssh.yaml"), POLICY).expect("policy");
    let broker = BrokerProcess::start(
        &BrokerSetup::new(db.url(), policies.path(), github_issuer_yaml(&issuer.url()))
            .extra(format!(
                "targets:\n  ssh_ca:\n    main:\n      signing_key: {{file: {}}}\n{extra}",
                dir.path().join("ca").display()
            ))
            .env(envs),
    )
    .await
    .expect("broker starts");
    let http = http::client();
    Env {
        api: Api::new(http.clone(), &broker.url),
        issuer,
        db,
        broker,
        http,
        dir,
        _policies: policies,
    }
}

impl Env {
    async fn get(&self, path: &str) -> (u16, Vec<u8>) {
        let r = self
            .http
            .get(format!("{}{path}", self.broker.url))
            .send()
            .await
            .expect("broker answers");
        let status = r.status().as_u16();
        (status, r.bytes().await.expect("body").to_vec())
    }

    async fn krl(&self) -> Vec<u8> {
        let (status, body) = self.get("/v1/ssh/main/krl").await;
        assert_eq!(status, 200);
        body
    }

    async fn exchange(&self, body: Value) -> (u16, Value) {
        self.api
            .exchange(Some(&acme_token(&self.issuer.url())), &body)
            .await
    }

    /// Exchange `credential` (with `params`), write the certificate (and the generated private
    /// key, if any) into the test's directory as `<file>-cert.pub` / `<file>` (0600).
    async fn mint(&self, credential: &str, params: Value, ttl: &str, file: &str) -> Value {
        let mut body = json!({"credentials": [credential], "ttl": ttl});
        if !params.is_null() {
            body["parameters"] = json!({ credential: params });
        }
        let (status, resp) = self.exchange(body).await;
        assert_eq!(status, 200, "{resp}");
        let c = &resp["credentials"][credential];
        let base = self.dir.path().join(file);
        std::fs::write(cert_path(&base), s(&c["certificate"])).expect("cert");
        if let Some(k) = c["private_key"].as_str() {
            write_0600(&base, k);
        }
        resp
    }
}

fn cert_path(base: &Path) -> PathBuf {
    PathBuf::from(format!("{}-cert.pub", base.display()))
}

fn write_0600(path: &Path, text: &str) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .expect("key file");
    f.write_all(text.as_bytes()).expect("key");
}

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_owned()
}

/// Login works with a job's own key and with a broker-generated one; the certificate carries
/// what the policy says (principals, no pty, key id naming the job, serial = the audited
/// resource id); a wrong principal and an expired certificate are refused; after `/v1/revoke`
/// and a KRL refresh the revoked certificate is refused while another job's still logs in.
#[tokio::test]
async fn certificate_logs_in_and_revoked_one_is_refused() {
    if !sshd::available() {
        return;
    }
    let e = env().await;
    let mut secrets = Secrets::default();
    secrets.add(acme_token(&e.issuer.url()));

    // The CA key and an empty KRL from the broker; the host trusts them.
    let (status, ca_pub) = e.get("/v1/ssh/main/ca.pub").await;
    assert_eq!(status, 200);
    let ca_pub = String::from_utf8(ca_pub).expect("text");
    let ca_file = std::fs::read_to_string(e.dir.path().join("ca.pub")).expect("ca.pub");
    assert_eq!(
        ca_pub.split_whitespace().take(2).collect::<Vec<_>>(),
        ca_file.split_whitespace().take(2).collect::<Vec<_>>(),
        "the published CA key is the configured one"
    );
    assert_eq!(e.get("/v1/ssh/nope/ca.pub").await.0, 404);
    assert_eq!(e.get("/v1/ssh/nope/krl").await.0, 404);
    let sshd = Sshd::start(&ca_pub, &e.krl().await, &["deploy", "deploy-acme"]).await;

    // Job A: its own key pair, only the public key goes to the broker.
    let a_key = e.dir.path().join("a");
    keygen(&a_key);
    let a_pub = std::fs::read_to_string(format!("{}.pub", a_key.display())).expect("pub");
    let a = e
        .mint(
            "ssh-deploy",
            json!({"public_key": a_pub.trim()}),
            "10m",
            "a",
        )
        .await;
    secrets.add_response(&a);
    let a_cred = &a["credentials"]["ssh-deploy"];
    assert!(
        a_cred.get("private_key").is_none(),
        "no key made for a job that sent one"
    );
    let out = sshd
        .login(
            &a_key,
            &cert_path(&a_key),
            "echo hello-$((6*7)); tty || true",
        )
        .await;
    assert!(out.status.success(), "{out:?}\n{}", sshd.log());
    let text = stdout(&out);
    assert!(text.starts_with("hello-42"), "{text}");
    assert!(
        text.contains("not a tty"),
        "no pty unless the policy grants permit-pty: {text}"
    );
    let serial = s(&a_cred["serial"]);
    assert!(
        sshd.log().contains(&format!("(serial {serial})")),
        "sshd saw the serial the broker returned"
    );
    assert!(
        sshd.log().contains("repository=acme/api"),
        "key id names the job"
    );

    // What ssh-keygen reads in the certificate.
    let l = std::process::Command::new("ssh-keygen")
        .arg("-L")
        .arg("-f")
        .arg(cert_path(&a_key))
        .output()
        .expect("ssh-keygen -L");
    let listing = String::from_utf8_lossy(&l.stdout);
    assert!(listing.contains("user certificate"), "{listing}");
    assert!(listing.contains(&format!("Serial: {serial}")), "{listing}");
    assert!(
        listing.contains("Principals: \n                deploy\n"),
        "{listing}"
    );
    assert!(listing.contains("Critical Options: (none)"), "{listing}");
    assert!(listing.contains("Extensions: (none)"), "{listing}");

    // Job B: the broker generates its key pair; the private key comes back once.
    let b = e.mint("ssh-deploy", Value::Null, "10m", "b").await;
    secrets.add_response(&b);
    let b_key = e.dir.path().join("b");
    assert!(s(&b["credentials"]["ssh-deploy"]["private_key"]).contains("OPENSSH PRIVATE KEY"));
    let out = sshd.login(&b_key, &cert_path(&b_key), "echo job-b").await;
    assert!(out.status.success(), "{out:?}\n{}", sshd.log());
    assert_eq!(stdout(&out), "job-b");

    // force-command and source-address from the policy.
    let f = e.mint("ssh-forced", Value::Null, "10m", "f").await;
    secrets.add_response(&f);
    let f_key = e.dir.path().join("f");
    let out = sshd
        .login(&f_key, &cert_path(&f_key), "echo not-this")
        .await;
    assert!(out.status.success(), "{out:?}\n{}", sshd.log());
    assert_eq!(stdout(&out), "forced-command-ran");

    // A principal from the job's claims (deploy-${repository_owner}); a job key is required.
    let (status, body) = e.exchange(json!({"credentials": ["ssh-own-key"]})).await;
    assert_eq!(
        (status, s(&body["error"]).as_str()),
        (400, "invalid_parameters"),
        "{body}"
    );
    let o = e
        .mint(
            "ssh-own-key",
            json!({"public_key": a_pub.trim()}),
            "10m",
            "o",
        )
        .await;
    secrets.add_response(&o);
    let out = sshd
        .login(&a_key, &e.dir.path().join("o-cert.pub"), "echo owner")
        .await;
    assert!(out.status.success(), "{out:?}\n{}", sshd.log());

    // The job client (`broker exchange`, the GitLab component's): `--ssh-key` makes the pair
    // here, sends the public key, and writes `<name>.key` + `<name>.key-cert.pub` (0600).
    let token_file = e.dir.path().join("job-token");
    std::fs::write(&token_file, acme_token(&e.issuer.url())).expect("token");
    let out_dir = e.dir.path().join("client-out");
    let run = integration::broker_cli(
        None,
        &[
            "exchange",
            "--broker-url",
            &e.broker.url,
            "--credential",
            "ssh-own-key",
            "--ssh-key",
            "ssh-own-key",
            "--token-file",
            &token_file.display().to_string(),
            "--out-dir",
            &out_dir.display().to_string(),
        ],
    );
    assert_eq!(run.code, 0, "{}", run.output());
    let key = out_dir.join("ssh-own-key.key");
    let cert = out_dir.join("ssh-own-key.key-cert.pub");
    {
        use std::os::unix::fs::PermissionsExt;
        for f in [&key, &cert] {
            assert_eq!(
                std::fs::metadata(f).expect("file").permissions().mode() & 0o777,
                0o600
            );
        }
    }
    let env_file = std::fs::read_to_string(out_dir.join("env")).expect("env");
    assert!(
        env_file.contains("SSH_OWN_KEY_IDENTITY_FILE="),
        "{env_file}"
    );
    assert!(
        !env_file.contains("PRIVATE KEY"),
        "no key in the environment"
    );
    let out = sshd.login(&key, &cert, "echo from-the-client").await;
    assert!(out.status.success(), "{out:?}\n{}", sshd.log());
    assert_eq!(stdout(&out), "from-the-client");
    secrets.add(std::fs::read_to_string(&key).expect("key"));

    // Wrong principal: a valid certificate of this CA for `staging`, which the host does not
    // accept for the user.
    let w = e.mint("ssh-staging", Value::Null, "10m", "w").await;
    secrets.add_response(&w);
    let w_key = e.dir.path().join("w");
    let out = sshd.login(&w_key, &cert_path(&w_key), "echo wrong").await;
    assert!(!out.status.success(), "a wrong principal logged in");
    assert!(!stdout(&out).contains("wrong"));

    // Expired: a 2 s certificate, tried after it ended.
    let x = e.mint("ssh-deploy", Value::Null, "2s", "x").await;
    secrets.add_response(&x);
    let x_key = e.dir.path().join("x");
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let out = sshd.login(&x_key, &cert_path(&x_key), "echo expired").await;
    assert!(!out.status.success(), "an expired certificate logged in");
    assert!(sshd.log().contains("expired"), "{}", sshd.log());

    // Revoke job A; before the host's KRL refresh its certificate still works (certificates
    // cannot be recalled), after it the host refuses it, and job B still logs in.
    let (status, r) = e.api.revoke(&s(&a["revocation_token"])).await;
    assert_eq!(
        (status, r["status"].as_str()),
        (200, Some("revoked")),
        "{r}"
    );
    // The host's refresh: `broker ssh-krl` puts the KRL in place of the file sshd reads.
    let krl_out = sshd.krl_path().display().to_string();
    let run = integration::broker_cli(
        None,
        &[
            "ssh-krl",
            "--broker-url",
            &e.broker.url,
            "--ca",
            "main",
            "--out",
            &krl_out,
        ],
    );
    assert_eq!(run.code, 0, "{}", run.output());
    // The KRL's version and date are its generation time (seconds, header bytes 12..28):
    // compare everything else.
    let written = std::fs::read(sshd.krl_path()).expect("krl");
    let served = e.krl().await;
    let undated = |k: &[u8]| [&k[..12], &k[28..]].concat();
    assert_eq!(undated(&written), undated(&served));
    let unknown = integration::broker_cli(
        None,
        &[
            "ssh-krl",
            "--broker-url",
            &e.broker.url,
            "--ca",
            "nope",
            "--out",
            &krl_out,
        ],
    );
    assert_eq!(
        unknown.code,
        2,
        "an unknown CA is a usage error: {}",
        unknown.output()
    );
    assert_eq!(
        std::fs::read(sshd.krl_path()).expect("krl"),
        written,
        "file kept"
    );
    assert!(
        krl_revokes(&sshd.krl_path(), &cert_path(&a_key)),
        "ssh-keygen -Q: A revoked"
    );
    assert!(
        !krl_revokes(&sshd.krl_path(), &cert_path(&b_key)),
        "ssh-keygen -Q: B not"
    );
    let out = sshd.login(&a_key, &cert_path(&a_key), "echo revoked").await;
    assert!(!out.status.success(), "a revoked certificate logged in");
    assert!(sshd.log().contains("revoked by file"), "{}", sshd.log());
    let out = sshd.login(&b_key, &cert_path(&b_key), "echo still-b").await;
    assert!(out.status.success(), "{out:?}\n{}", sshd.log());
    assert_eq!(stdout(&out), "still-b");

    // The audit log names the certificate serial of each issued certificate.
    let events = audit_log(&e.db, 100).await;
    let rid = format!("main:{serial}");
    assert!(
        events
            .iter()
            .any(|ev| ev.action.as_str() == "exchange" && ev.resource_ids.contains(&rid)),
        "exchange audited with the serial"
    );
    assert!(
        events
            .iter()
            .any(|ev| ev.action.as_str() == "revoke" && ev.resource_ids.contains(&rid)),
        "revocation audited with the serial"
    );

    secrets.assert_not_leaked(&e.broker, e.db.url()).await;
    drop(sshd);
    let Env {
        issuer,
        db,
        mut broker,
        ..
    } = e;
    broker.kill();
    issuer.shutdown().await;
    db.cleanup().await;
}

/// Bad input is refused with `invalid_parameters` and leaves no grant: a malformed key, a DSA
/// or short RSA key, a certificate instead of a key, an unknown parameter, parameters for a
/// credential not requested, parameters for a kind that takes none.
#[tokio::test]
async fn bad_parameters_are_refused() {
    let e = env().await;
    let k = e.dir.path().join("k");
    keygen(&k);
    let cert = e.mint("ssh-deploy", Value::Null, "1m", "c").await;
    let cert_line = s(&cert["credentials"]["ssh-deploy"]["certificate"]);
    let pub_line = std::fs::read_to_string(format!("{}.pub", k.display())).expect("pub");
    for (params, why) in [
        (
            json!({"public_key": "ssh-ed25519 AAAAnotbase64"}),
            "malformed",
        ),
        (json!({"public_key": cert_line}), "a certificate"),
        (json!({"public_key": 42}), "not a string"),
        (
            json!({"public_key": pub_line.trim(), "principals": ["root"]}),
            "unknown parameter",
        ),
        (json!("ssh-ed25519"), "not an object"),
    ] {
        let (status, body) = e
            .exchange(json!({"credentials": ["ssh-deploy"], "parameters": {"ssh-deploy": params}}))
            .await;
        assert_eq!(
            (status, s(&body["error"]).as_str()),
            (400, "invalid_parameters"),
            "{why}: {body}"
        );
    }
    let (status, body) = e
        .exchange(json!({"credentials": ["ssh-deploy"], "parameters": {"ssh-staging": {}}}))
        .await;
    assert_eq!(
        (status, s(&body["error"]).as_str()),
        (400, "bad_request"),
        "{body}"
    );
    // Only the one good exchange left a grant.
    let grants = e.db.store().active_grants(100).await.expect("grants");
    assert_eq!(grants.len(), 1);
    let Env {
        issuer,
        db,
        mut broker,
        ..
    } = e;
    broker.kill();
    issuer.shutdown().await;
    db.cleanup().await;
}

const OPERATOR_TOKEN: &str = "brk_op_sshTestOperatorToken0123456789ab_1M2WUX";

/// An operator's revoke-all reaches every live certificate through the KRL; a broker killed
/// after signing (before the grant is committed) issued nothing and left no grant: the
/// certificate never left the process.
#[tokio::test]
async fn revoke_all_lists_every_certificate_and_a_crash_issues_nothing() {
    let operators = format!(
        "operators:\n  - name: secteam\n    role: admin\n    token_sha256: {}\n",
        broker::secret::sha256_hex(OPERATOR_TOKEN.as_bytes())
    );
    let e = env_with(&operators, Vec::new()).await;
    let one = e.mint("ssh-deploy", Value::Null, "10m", "one").await;
    let two = e.mint("ssh-staging", Value::Null, "10m", "two").await;
    let krl_path = e.dir.path().join("krl");
    std::fs::write(&krl_path, e.krl().await).expect("krl");
    for f in ["one", "two"] {
        assert!(
            !krl_revokes(&krl_path, &cert_path(&e.dir.path().join(f))),
            "{f} live"
        );
    }
    let (status, report) = e
        .api
        .revoke_all(OPERATOR_TOKEN, &json!({"reason": "incident drill"}))
        .await;
    assert_eq!(status, 200, "{report}");
    std::fs::write(&krl_path, e.krl().await).expect("krl");
    for f in ["one", "two"] {
        assert!(
            krl_revokes(&krl_path, &cert_path(&e.dir.path().join(f))),
            "{f} revoked"
        );
    }
    assert!(one["grant_id"] != two["grant_id"]);
    let Env {
        issuer,
        db,
        mut broker,
        ..
    } = e;
    broker.kill();
    issuer.shutdown().await;
    db.cleanup().await;

    let mut e = env_with("", vec![("BROKER_FAULT_POINT".into(), "after_mint".into())]).await;
    assert!(
        e.api
            .exchange_fails(
                &acme_token(&e.issuer.url()),
                &json!({"credentials": ["ssh-deploy"]})
            )
            .await,
        "the crashed exchange must not succeed"
    );
    assert!(
        e.broker.wait_exit().await.is_some(),
        "aborted at the fault point"
    );
    let st = e.db.store().stats().await.expect("stats");
    assert_eq!(
        (st.active_grants, st.issuing_grants),
        (0, 0),
        "nothing recorded, nothing issued"
    );
    let Env {
        issuer,
        db,
        mut broker,
        ..
    } = e;
    broker.kill();
    issuer.shutdown().await;
    db.cleanup().await;
}

/// Figures (ignored unless asked: `-- --ignored --nocapture ssh_cert::krl_figures`): N
/// certificate exchanges with broker-made keys, then an operator revoke-all, then the KRL's
/// size and the time to build and serve it. Printed, never asserted beyond correctness.
#[tokio::test]
#[ignore]
async fn krl_figures() {
    let n: usize = integration::wait::env_num("SSH_KRL_N", 500);
    let operators = format!(
        "operators:\n  - name: secteam\n    role: admin\n    token_sha256: {}\n",
        broker::secret::sha256_hex(OPERATOR_TOKEN.as_bytes())
    );
    let e = env_with(
        &format!("{operators}limits:\n  exchanges_per_minute_per_repository: 0\n"),
        Vec::new(),
    )
    .await;
    let started = std::time::Instant::now();
    let mut done = 0;
    for chunk in (0..n).collect::<Vec<_>>().chunks(16) {
        let reqs = chunk
            .iter()
            .map(|_| e.exchange(json!({"credentials": ["ssh-deploy"]})));
        for (status, body) in futures::future::join_all(reqs).await {
            assert_eq!(status, 200, "{body}");
            done += 1;
        }
    }
    let mint = started.elapsed();
    let last = e.mint("ssh-deploy", Value::Null, "10m", "last").await;
    let (status, _) = e
        .api
        .revoke_all(OPERATOR_TOKEN, &json!({"reason": "figures"}))
        .await;
    assert_eq!(status, 200);
    let mut times = Vec::new();
    let mut krl = Vec::new();
    for _ in 0..20 {
        let t = std::time::Instant::now();
        krl = e.krl().await;
        times.push(t.elapsed());
    }
    times.sort();
    let path = e.dir.path().join("krl");
    std::fs::write(&path, &krl).expect("krl");
    assert!(krl_revokes(&path, &cert_path(&e.dir.path().join("last"))));
    assert!(last["grant_id"].is_string());
    eprintln!(
        "ssh_cert: {done} exchanges (broker-made Ed25519 keys) in {:.2}s = {:.0}/s; KRL of {} serials: {} bytes, served in {:?} median, {:?} max (20 fetches)",
        mint.as_secs_f64(),
        done as f64 / mint.as_secs_f64(),
        done + 1,
        krl.len(),
        times[times.len() / 2],
        times[times.len() - 1],
    );
    let Env {
        issuer,
        db,
        mut broker,
        ..
    } = e;
    broker.kill();
    issuer.shutdown().await;
    db.cleanup().await;
}

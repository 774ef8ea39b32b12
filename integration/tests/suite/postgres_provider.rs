//! End to end for the Postgres provider: the real `broker` binary minting job users on the
//! machine's Postgres (`BROKER_TEST_PG_URL`). Each test has its own store database, its own app
//! database, its own group/owner roles and its own role prefix, and removes them all afterwards,
//! so tests (and other suites) running in parallel never see each other's roles.

use broker::oidc::testkit::TestIssuer;
use broker::store::AuditFilter;
use broker::store::testdb::TestDb;
use integration::http::{self, Api, json_string as s};
use integration::pg::{self, PgApp, exec, login, sqlstate};
use integration::store_db::audit_log;
use integration::{
    BrokerProcess, BrokerSetup, acme_token, acme_token_with, free_port, github_issuer_yaml,
};
use serde_json::{Value, json};
use sqlx::Row;
use sqlx::postgres::{PgPool, PgPoolOptions};
use std::time::{Duration, Instant};

/// The app side of one test ([`PgApp`]): an app database with a table, a second database,
/// group roles (reader, creator, owner), a role prefix.
struct PgFixture {
    app: PgApp,
    /// A pool on the app database.
    app_admin: PgPool,
    prefix: String,
    app_db: String,
    /// A second database the creator group may create in: objects there make DROP ROLE fail
    /// in the credential's database, which takes the provider's slower revoke path.
    other_db: String,
    reader: String,
    creator: String,
    owner: String,
}

impl PgFixture {
    async fn new(url: String) -> Self {
        let app = PgApp::on(url, "p", &["app", "other"], &["reader", "creator", "owner"]).await;
        let f = Self {
            prefix: app.prefix(),
            app_db: app.db("app"),
            other_db: app.db("other"),
            reader: app.group("reader"),
            creator: app.group("creator"),
            owner: app.group("owner"),
            app_admin: PgPoolOptions::new()
                .max_connections(2)
                .connect_lazy_with(app.options_for("app")),
            app,
        };
        let other = PgPoolOptions::new()
            .max_connections(1)
            .connect_with(f.app.options_for("other"))
            .await
            .expect("other database");
        exec(
            &other,
            format!("GRANT CREATE, USAGE ON SCHEMA public TO {}", f.creator),
        )
        .await;
        other.close().await;
        exec(
            &f.app_admin,
            format!(
                "CREATE TABLE items (id int PRIMARY KEY, name text);
                 INSERT INTO items VALUES (1, 'one');
                 GRANT SELECT ON items TO {reader};
                 GRANT CREATE, USAGE ON SCHEMA public TO {creator};",
                reader = f.reader,
                creator = f.creator
            ),
        )
        .await;
        f
    }

    /// `main` (the test server) and `down` (a port nobody listens on).
    fn target_yaml(&self) -> String {
        format!(
            "{main}    down:\n      admin_url: {{value: \"postgres://postgres@127.0.0.1:{down}/postgres\"}}\n      host: 127.0.0.1\n      connect_timeout: 1s\n",
            main = self
                .app
                .target_yaml("      pool_size: 6\n      connect_timeout: 3s\n"),
            down = free_port(),
        )
    }

    /// Policy file: `pg-app` (reader + creator, owner) and `pg-comment` (an extra statement
    /// that writes claims into the role's comment), for acme/api pushes to main.
    fn policy(&self) -> String {
        format!(
            r#"credentials:
  - name: pg-app
    max_ttl: 15m
    postgres:
      target: main
      database: {db}
      roles: [{reader}, {creator}]
      owner: {owner}
      connection_limit: 5
  - name: pg-comment
    max_ttl: 15m
    postgres:
      target: main
      database: {db}
      roles: [{reader}]
      owner: {owner}
      statements:
        - "COMMENT ON ROLE {{{{username}}}} IS {{{{literal:repository}}}}"
  - name: pg-down
    max_ttl: 15m
    postgres:
      target: down
      database: {db}
      owner: {owner}
rules:
  - name: acme-main
    issuer: github
    credentials: [pg-app, pg-comment, pg-down]
    when: claims.repository_id == "1000001" && claims.ref == "refs/heads/main"
"#,
            db = self.app_db,
            reader = self.reader,
            creator = self.creator,
            owner = self.owner
        )
    }

    async fn our_roles(&self) -> i64 {
        self.app.roles().await
    }

    async fn role_exists(&self, name: &str) -> bool {
        self.app.role_exists(name).await
    }

    async fn wait_roles(&self, want: i64) -> i64 {
        self.app.wait_roles(want, 200).await
    }

    /// Drop everything this test made (also roles a failed test left behind).
    async fn cleanup(self) {
        self.app_admin.close().await;
        self.app.cleanup().await;
    }
}

struct Env {
    pg: PgFixture,
    issuer: TestIssuer,
    db: TestDb,
    broker: BrokerProcess,
    http: reqwest::Client,
    _policies: tempfile::TempDir,
}

async fn env(extra_yaml: &str, envs: Vec<(String, String)>) -> Env {
    env_on(pg::admin_url(), extra_yaml, envs).await
}

/// As [`env`], with the credentials' target on the server at `target_url`.
async fn env_on(target_url: String, extra_yaml: &str, envs: Vec<(String, String)>) -> Env {
    let pg = PgFixture::new(target_url).await;
    let db = TestDb::postgres().await;
    let issuer = TestIssuer::start().await;
    let policies = tempfile::tempdir().expect("tmp");
    std::fs::write(policies.path().join("pg.yaml"), pg.policy()).expect("policy");
    let broker = BrokerProcess::start(
        &BrokerSetup::new(db.url(), policies.path(), github_issuer_yaml(&issuer.url()))
            .extra(format!("{}\n{extra_yaml}", pg.target_yaml()))
            .env(envs),
    )
    .await
    .expect("broker starts");
    Env {
        pg,
        issuer,
        db,
        broker,
        http: http::client(),
        _policies: policies,
    }
}

impl Env {
    fn token_with(&self, f: impl FnOnce(&mut Value)) -> String {
        acme_token_with(&self.issuer.url(), f)
    }

    fn token(&self) -> String {
        acme_token(&self.issuer.url())
    }

    async fn exchange(&self, token: &str, body: Value) -> (u16, Value) {
        self.api().exchange(Some(token), &body).await
    }

    async fn revoke(&self, token: &str) -> (u16, Value) {
        self.api().revoke(token).await
    }

    fn api(&self) -> Api {
        Api::new(self.http.clone(), &self.broker.url)
    }

    /// No password or connection URL the test saw reached the broker's (debug) log.
    fn assert_log_clean(&self, secrets: &[String]) {
        let log = self.broker.log();
        for s in secrets {
            assert!(!log.contains(s.as_str()), "a secret reached the log");
        }
        assert!(
            !log.contains("SCRAM-SHA-256$"),
            "a verifier reached the log"
        );
    }

    async fn finish(self) {
        let Env {
            pg,
            issuer,
            db,
            mut broker,
            ..
        } = self;
        broker.kill();
        issuer.shutdown().await;
        db.cleanup().await;
        pg.cleanup().await;
    }
}

/// A minted user logs in and can do what its group roles allow and nothing more; after
/// `/v1/revoke` its open session is gone, it cannot log in, the role is gone, and the table it
/// created survives, owned by the owner role.
#[tokio::test]
async fn minted_user_is_confined_and_revoke_removes_it() {
    let e = env("", Vec::new()).await;
    let (status, body) = e
        .exchange(&e.token(), json!({"credentials": ["pg-app"], "ttl": "5m"}))
        .await;
    assert_eq!(status, 200, "{body}");
    let c = &body["credentials"]["pg-app"];
    let username = s(&c["username"]);
    let password = s(&c["password"]);
    let url = s(&c["database_url"]);
    assert!(
        username.starts_with(&format!("{}pg_app_", e.pg.prefix)),
        "{username}"
    );
    assert!(username.len() <= 63);
    assert!(password.len() >= 32);
    assert_eq!(c["database"], json!(e.pg.app_db));
    assert_eq!(c["host"], json!(e.pg.app.host));
    assert_eq!(c["port"], json!(e.pg.app.port));
    assert!(url.ends_with("?sslmode=disable"), "sslmode as configured");
    assert!(url.contains(&password));
    let expires: time::OffsetDateTime = time::OffsetDateTime::parse(
        &s(&c["expires_at"]),
        &time::format_description::well_known::Rfc3339,
    )
    .expect("rfc3339");

    // What Postgres holds: a login role, a SCRAM verifier (never the password), expiry, limit.
    let row = sqlx::query(
        "SELECT rolcanlogin, rolpassword, rolvaliduntil, rolconnlimit, rolsuper, rolcreaterole \
         FROM pg_authid WHERE rolname = $1",
    )
    .bind(&username)
    .fetch_one(&e.pg.app.admin)
    .await
    .expect("role exists");
    assert!(row.get::<bool, _>(0));
    let stored: String = row.get(1);
    assert!(
        stored.starts_with("SCRAM-SHA-256$1:"),
        "verifier stored, with the default iteration count"
    );
    assert!(!stored.contains(&password));
    let valid_until: time::OffsetDateTime = row.get(2);
    assert_eq!(valid_until.unix_timestamp(), expires.unix_timestamp());
    assert_eq!(row.get::<i32, _>(3), 5);
    assert!(!row.get::<bool, _>(4) && !row.get::<bool, _>(5));

    // Allowed by the groups: read items, create a table of its own.
    let mut conn = login(&url).await.expect("minted user logs in");
    let n: i64 = sqlx::query("SELECT count(*) FROM items")
        .fetch_one(&mut conn)
        .await
        .expect("reader may select")
        .get(0);
    assert_eq!(n, 1);
    sqlx::raw_sql("CREATE TABLE job_made (x int); INSERT INTO job_made VALUES (42)")
        .execute(&mut conn)
        .await
        .expect("creator may create a table");
    // Refused beyond them.
    let err = sqlx::query("INSERT INTO items VALUES (2, 'two')")
        .execute(&mut conn)
        .await
        .expect_err("no insert privilege");
    assert_eq!(sqlstate(&err), "42501");
    let err = sqlx::raw_sql("CREATE ROLE sneaky")
        .execute(&mut conn)
        .await
        .expect_err("no createrole");
    assert_eq!(sqlstate(&err), "42501");

    // A table in a second database too: DROP ROLE now fails where the job worked, so revoke
    // must disown the role in every database that lists it.
    let other_url = url.replace(
        &format!("/{}?", e.pg.app_db),
        &format!("/{}?", e.pg.other_db),
    );
    let mut other = login(&other_url)
        .await
        .expect("minted user logs in elsewhere");
    sqlx::raw_sql("CREATE TABLE made_elsewhere (x int)")
        .execute(&mut other)
        .await
        .expect("creator may create there too");
    drop(other);

    // Revoke.
    let (status, body2) = e.revoke(&s(&body["revocation_token"])).await;
    assert_eq!(
        (status, body2["status"].as_str()),
        (200, Some("revoked")),
        "{body2}"
    );
    // The open session was terminated.
    let r = sqlx::query("SELECT 1").execute(&mut conn).await;
    assert!(r.is_err(), "open session must be terminated");
    // No new login, role gone.
    assert!(login(&url).await.is_err(), "revoked user cannot log in");
    assert!(!e.pg.role_exists(&username).await);
    assert_eq!(e.pg.our_roles().await, 0);
    // The job's table survives, owned by the owner role, with its data.
    let row = sqlx::query(
        "SELECT tableowner::text, (SELECT x FROM job_made) FROM pg_tables WHERE tablename = 'job_made'",
    )
    .fetch_one(&e.pg.app_admin)
    .await
    .expect("table survives");
    assert_eq!(row.get::<String, _>(0), e.pg.owner);
    assert_eq!(row.get::<i32, _>(1), 42);
    let other_admin = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(e.pg.app.options_for("other"))
        .await
        .expect("other database");
    let owner: String = sqlx::query_scalar(
        "SELECT tableowner::text FROM pg_tables WHERE tablename = 'made_elsewhere'",
    )
    .fetch_one(&other_admin)
    .await
    .expect("the table elsewhere survives");
    assert_eq!(owner, e.pg.owner);
    other_admin.close().await;

    // Idempotent: revoking again is fine.
    let (status, _) = e.revoke(&s(&body["revocation_token"])).await;
    assert_eq!(status, 200);
    e.assert_log_clean(&[password, url]);
    e.finish().await;
}

/// With a 2-second TTL and the broker stopped, Postgres itself refuses the login after expiry
/// (`VALID UNTIL`); the restarted broker's reaper then drops the role.
///
/// The machine's server trusts 127.0.0.1 (it checks no password, hence no expiry), so this test
/// starts its own throwaway cluster with `scram-sha-256` host auth when `initdb` is available;
/// that also proves the SCRAM verifier the broker sends is one Postgres accepts.
#[tokio::test]
async fn expiry_is_enforced_by_postgres_and_the_reaper_drops_the_role() {
    let scram = ScramServer::start();
    let target = scram.as_ref().map_or_else(pg::admin_url, |s| s.url.clone());
    let mut e = env_on(target, "reaper:\n  interval: 1s\n", Vec::new()).await;
    let (status, body) = e
        .exchange(&e.token(), json!({"credentials": ["pg-app"], "ttl": "2s"}))
        .await;
    assert_eq!(status, 200, "{body}");
    let username = s(&body["credentials"]["pg-app"]["username"]);
    let url = s(&body["credentials"]["pg-app"]["database_url"]);
    let mut before = login(&url)
        .await
        .expect("logs in with its password before expiry");
    sqlx::query("SELECT 1")
        .execute(&mut before)
        .await
        .expect("works");
    drop(before);
    e.broker.kill();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        e.pg.role_exists(&username).await,
        "no broker ran to drop it"
    );
    let expired: bool =
        sqlx::query("SELECT rolvaliduntil < now() FROM pg_authid WHERE rolname = $1")
            .bind(&username)
            .fetch_one(&e.pg.app.admin)
            .await
            .expect("role")
            .get(0);
    assert!(expired, "VALID UNTIL is the grant expiry");
    if scram.is_some() {
        let err = login(&url)
            .await
            .expect_err("Postgres refuses the expired login");
        assert_eq!(sqlstate(&err), "28P01", "password authentication failed");
    } else {
        eprintln!(
            "note: no initdb here; the server trusts 127.0.0.1, so the refusal is shown by rolvaliduntil only"
        );
    }

    e.broker.restart(&[]).await.expect("restart");
    assert_eq!(
        e.pg.wait_roles(0).await,
        0,
        "the reaper dropped the expired role"
    );
    // The role is dropped first and the grant finished (with its audit event) right after:
    // wait for that commit rather than race it.
    let mut expired_audited = false;
    for _ in 0..100 {
        let events = audit_log(&e.db, 50).await;
        if events.iter().any(|ev| json!(ev.action) == json!("expire")) {
            expired_audited = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(expired_audited, "the reaper audited the expiry");
    e.finish().await;
    drop(scram);
}

/// A throwaway Postgres cluster whose TCP connections must authenticate with SCRAM. Stopped
/// (by its data directory) and removed on drop.
struct ScramServer {
    url: String,
    dir: tempfile::TempDir,
    bindir: std::path::PathBuf,
    as_postgres: bool,
}

impl ScramServer {
    fn tool(&self, name: &str) -> std::process::Command {
        cmd(&self.bindir, name, self.as_postgres)
    }

    fn start() -> Option<Self> {
        let bindir = std::env::var_os("PATH")
            .into_iter()
            .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
            .chain(
                std::fs::read_dir("/usr/lib/postgresql")
                    .into_iter()
                    .flatten()
                    .flatten()
                    .map(|d| d.path().join("bin")),
            )
            .find(|d| d.join("initdb").is_file() && d.join("pg_ctl").is_file())?;
        // initdb refuses to run as root; use the postgres account then.
        let root = std::process::Command::new("id")
            .arg("-u")
            .output()
            .ok()
            .is_some_and(|o| o.stdout.starts_with(b"0\n"));
        let dir = tempfile::tempdir().ok()?;
        if root {
            let ok = std::process::Command::new("chown")
                .arg("postgres")
                .arg(dir.path())
                .status()
                .ok()?
                .success();
            if !ok {
                return None;
            }
        }
        let pwfile = dir.path().join("pw");
        std::fs::write(&pwfile, "admin-pw-for-tests\n").ok()?;
        if root {
            let _ = std::process::Command::new("chown")
                .arg("postgres")
                .arg(&pwfile)
                .status();
        }
        let port = free_port();
        let data = dir.path().join("data");
        let ok = cmd(&bindir, "initdb", root)
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
            ])
            .arg(format!("--pwfile={}", pwfile.display()))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .ok()?
            .success();
        if !ok {
            return None;
        }
        let server = ScramServer {
            url: format!("postgres://postgres:admin-pw-for-tests@127.0.0.1:{port}/postgres"),
            bindir,
            as_postgres: root,
            dir,
        };
        let ok = server
            .tool("pg_ctl")
            .arg("-D")
            .arg(&data)
            .arg("-o")
            .arg(format!(
                "-h 127.0.0.1 -p {port} -k {}",
                server.dir.path().display()
            ))
            .arg("-l")
            .arg(server.dir.path().join("log"))
            .args(["-w", "start"])
            .stdout(std::process::Stdio::null())
            .status()
            .ok()?
            .success();
        ok.then_some(server)
    }
}

fn cmd(bindir: &std::path::Path, name: &str, as_postgres: bool) -> std::process::Command {
    if as_postgres {
        let mut c = std::process::Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bindir.join(name));
        c
    } else {
        std::process::Command::new(bindir.join(name))
    }
}

impl Drop for ScramServer {
    fn drop(&mut self) {
        let _ = self
            .tool("pg_ctl")
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-m", "immediate", "-w", "stop"])
            .stdout(std::process::Stdio::null())
            .status();
    }
}

/// Hostile repository names give plain usernames and reach SQL only as quoted literals.
#[tokio::test]
async fn hostile_claims_cannot_inject() {
    let e = env("", Vec::new()).await;
    let long = "a".repeat(300);
    let hostile = [
        "acme/it's",
        "\"; DROP ROLE postgres; --",
        "'; DROP ROLE postgres; --",
        "x\\'; DROP ROLE postgres; --",
        long.as_str(),
        "ünïcødé/☃-репо",
        "$$; DROP ROLE postgres; $$",
    ];
    let mut secrets = Vec::new();
    for repo in hostile {
        let tok = e.token_with(|c| c["repository"] = json!(repo));
        let (status, body) = e
            .exchange(&tok, json!({"credentials": ["pg-comment"]}))
            .await;
        assert_eq!(status, 200, "{repo}: {body}");
        let c = &body["credentials"]["pg-comment"];
        let username = s(&c["username"]);
        assert!(
            username.len() <= 63
                && username
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
            "{username}"
        );
        assert!(username.starts_with(&e.pg.prefix));
        // The claim arrived as data, byte for byte.
        let comment: Option<String> = sqlx::query(
            "SELECT shobj_description(oid, 'pg_authid') FROM pg_roles WHERE rolname = $1",
        )
        .bind(&username)
        .fetch_one(&e.pg.app.admin)
        .await
        .expect("role")
        .get(0);
        assert_eq!(comment.as_deref(), Some(repo));
        assert!(e.pg.role_exists("postgres").await, "nothing was injected");
        secrets.push(s(&c["password"]));
        let (status, _) = e.revoke(&s(&body["revocation_token"])).await;
        assert_eq!(status, 200);
    }
    assert_eq!(e.pg.our_roles().await, 0);
    e.assert_log_clean(&secrets);
    e.finish().await;
}

/// A target that cannot be reached: 503 `target_unavailable`, the grant failed, no role, and
/// the job token is not consumed.
#[tokio::test]
async fn target_down_is_target_unavailable_and_leaves_nothing() {
    let e = env("", Vec::new()).await;
    let tok = e.token();
    // pg-app (reachable) and pg-down together: all or nothing.
    let (status, body) = e
        .exchange(&tok, json!({"credentials": ["pg-app", "pg-down"]}))
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (503, Some("target_unavailable")),
        "{body}"
    );
    assert!(body.get("credentials").is_none());
    assert_eq!(e.pg.wait_roles(0).await, 0, "the reachable part was undone");
    let store = e.db.store();
    let st = store.stats().await.expect("stats");
    assert_eq!((st.active_grants, st.issuing_grants), (0, 0));
    let events = store
        .audit_events(&AuditFilter {
            limit: 20,
            ..AuditFilter::default()
        })
        .await
        .expect("audit");
    assert!(events.iter().any(|ev| ev.reason == "target_unavailable"));
    // Nothing was issued, so the same job token still works for a reachable credential.
    let (status, body) = e.exchange(&tok, json!({"credentials": ["pg-app"]})).await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = e.revoke(&s(&body["revocation_token"])).await;
    assert_eq!(status, 200);
    assert_eq!(e.pg.our_roles().await, 0);
    e.finish().await;
}

/// A broker killed after `CREATE ROLE` but before the grant is finalised: the restarted
/// broker's reaper drops the role.
#[tokio::test]
async fn crash_after_create_role_is_recovered() {
    let reaper = "reaper:\n  interval: 1s\n  stale_issuing_after: 2s\n  lease: 5s\n";
    let mut e = env(
        reaper,
        vec![("BROKER_FAULT_POINT".into(), "after_mint".into())],
    )
    .await;
    assert!(
        e.api()
            .exchange_fails(&e.token(), &json!({"credentials": ["pg-app"]}))
            .await,
        "the crashed exchange must not succeed"
    );
    assert!(
        e.broker.wait_exit().await.is_some(),
        "aborted at the fault point"
    );
    assert_eq!(
        e.pg.our_roles().await,
        1,
        "the role was created before the crash"
    );
    e.broker.restart(&[]).await.expect("restart");
    assert_eq!(
        e.pg.wait_roles(0).await,
        0,
        "the reaper dropped the orphan role"
    );
    let g = e.db.store().stats().await.expect("stats");
    assert_eq!((g.issuing_grants, g.active_grants), (0, 0));
    e.finish().await;
}

/// 200 concurrent exchanges: each succeeds or fails cleanly; one emergency revoke-all leaves no
/// role. Prints the exchange rate measured here (never asserted: machines differ).
#[tokio::test]
async fn concurrent_exchanges_then_revoke_everything() {
    const N: usize = 200;
    let operator_token = format!("brk_op_{}", broker::secret::random_token(32));
    let operators = format!(
        "operators:\n  - name: secteam\n    role: admin\n    token_sha256: {}\n",
        broker::secret::sha256_hex(operator_token.as_bytes())
    );
    let e = env(&operators, Vec::new()).await;
    let tokens: Vec<String> = (0..N).map(|_| e.token()).collect();
    let started = Instant::now();
    let reqs = tokens
        .into_iter()
        .map(|t| (t, json!({"credentials": ["pg-app"], "ttl": "10m"})))
        .collect();
    let results = all_at_once(&e.http, format!("{}/v1/exchange", e.broker.url), reqs).await;
    let elapsed = started.elapsed();
    let mut revocations = Vec::new();
    let mut failed = 0;
    for (status, body) in &results {
        match status {
            200 => revocations.push(s(&body["revocation_token"])),
            // Clean failures only: a stable code, nothing issued.
            503 | 429 => {
                assert!(body["error"].is_string(), "{body}");
                assert!(body.get("credentials").is_none());
                failed += 1;
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    eprintln!(
        "postgres users: {} of {N} exchanges succeeded ({failed} refused cleanly) in {:.2}s: {:.1} exchanges/s",
        revocations.len(),
        elapsed.as_secs_f64(),
        revocations.len() as f64 / elapsed.as_secs_f64()
    );
    assert!(!revocations.is_empty());
    assert_eq!(e.pg.our_roles().await, revocations.len() as i64);
    // A job token is never accepted on the operator endpoint.
    let (status, _) = post(
        e.http.clone(),
        format!("{}/v1/admin/revoke-all", e.broker.url),
        e.token(),
        json!({"reason": "test"}),
    )
    .await;
    assert_eq!(status, 401);
    let started = Instant::now();
    let (status, report) = post(
        e.http.clone(),
        format!("{}/v1/admin/revoke-all", e.broker.url),
        operator_token.clone(),
        json!({"reason": "incident drill", "filter": {"kind": "postgres"}}),
    )
    .await;
    eprintln!(
        "postgres users: revoke-all of {} grants in {:.2}s: {report}",
        revocations.len(),
        started.elapsed().as_secs_f64()
    );
    // Failures (if the server was busy) stay queued for the reaper; either way every role goes.
    assert!(status == 200 || status == 503, "{status}: {report}");
    assert_eq!(e.pg.wait_roles(0).await, 0, "every role is gone");
    assert!(
        !e.broker.log().contains(&operator_token),
        "operator token logged"
    );
    e.finish().await;
}

/// POST `body` with a bearer token; (status, JSON).
async fn post(http: reqwest::Client, url: String, token: String, body: Value) -> (u16, Value) {
    match http.post(url).bearer_auth(token).json(&body).send().await {
        Ok(r) => (r.status().as_u16(), r.json().await.unwrap_or(Value::Null)),
        Err(e) => (0, json!({"client_error": e.to_string()})),
    }
}

/// Run every request at once (spawned tasks), results in order.
async fn all_at_once(
    http: &reqwest::Client,
    url: String,
    reqs: Vec<(String, Value)>,
) -> Vec<(u16, Value)> {
    let handles: Vec<_> = reqs
        .into_iter()
        .map(|(tok, body)| tokio::spawn(post(http.clone(), url.clone(), tok, body)))
        .collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.expect("task"));
    }
    out
}

/// A role someone already dropped by hand is revoked (gone is success), the failed first step
/// does not poison the target's connection pool, and the grant ends `revoked`; the next
/// exchanges and revokes on the same target work.
#[tokio::test]
async fn revoking_a_role_dropped_out_of_band_succeeds() {
    let e = env("", Vec::new()).await;
    let (status, body) = e
        .exchange(&e.token(), json!({"credentials": ["pg-app"], "ttl": "5m"}))
        .await;
    assert_eq!(status, 200, "{body}");
    let username = s(&body["credentials"]["pg-app"]["username"]);
    exec(&e.pg.app.admin, format!("DROP ROLE {username}")).await;

    let (status, revoked) = e.revoke(&s(&body["revocation_token"])).await;
    assert_eq!(status, 200, "{revoked}");
    assert_eq!(revoked["status"], json!("revoked"), "{revoked}");

    // The pool serves the next ones (more of them than it has connections).
    for _ in 0..8 {
        let (status, body) = e
            .exchange(&e.token(), json!({"credentials": ["pg-app"], "ttl": "5m"}))
            .await;
        assert_eq!(status, 200, "{body}");
        let (status, revoked) = e.revoke(&s(&body["revocation_token"])).await;
        assert_eq!(status, 200, "{revoked}");
        assert_eq!(revoked["status"], json!("revoked"), "{revoked}");
    }
    assert_eq!(e.pg.wait_roles(0).await, 0, "every role is gone");
    e.finish().await;
}

//! The machine's Postgres (`BROKER_TEST_PG_URL`) as a credential target: [`PgApp`] gives one test
//! its own databases, group roles and job-user prefix, all named by a random tag so parallel
//! tests never see each other's, and drops them afterwards. The broker's own store is
//! `broker::store::testdb::TestDb` (a fresh database per test).
// Test harness: a refused statement fails the calling test loudly, naming the statement.
#![allow(clippy::expect_used, clippy::panic)]

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, Row};
use std::time::Duration;

/// The test server's admin URL (`BROKER_TEST_PG_URL`, or the default local server).
pub fn admin_url() -> String {
    std::env::var(broker::store::testdb::PG_URL_ENV)
        .ok()
        .filter(|u| !u.trim().is_empty())
        .unwrap_or_else(|| broker::store::testdb::DEFAULT_PG_URL.to_owned())
}

/// Run `sql` (one or more statements); panics with the statement on failure.
pub async fn exec(pool: &PgPool, sql: String) {
    sqlx::raw_sql(&sql)
        .execute(pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// Log in with a connection URL (statement logging off).
pub async fn login(url: &str) -> Result<sqlx::PgConnection, sqlx::Error> {
    let opts = url.parse::<PgConnectOptions>()?.disable_statement_logging();
    sqlx::PgConnection::connect_with(&opts).await
}

/// The SQLSTATE of a database error (or a line saying it was not one).
pub fn sqlstate(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Database(d) => d.code().map(|c| c.to_string()).unwrap_or_default(),
        other => format!("not a database error: {other}"),
    }
}

/// One test's side of the Postgres test server: databases `{tag}_<name>`, NOLOGIN group roles
/// `{tag}g_<name>`, and the prefix `{tag}u_` the broker's target mints job users under.
/// [`Self::cleanup`] drops all of it, also roles a failed run left behind.
pub struct PgApp {
    /// A pool on the server's admin database.
    pub admin: PgPool,
    /// The admin URL (the broker's target uses it too).
    pub url: String,
    pub tag: String,
    pub host: String,
    pub port: u16,
    databases: Vec<String>,
}

impl PgApp {
    /// Create the databases and group roles named by `databases` and `groups` under a fresh tag
    /// starting with `letter`, on the test server.
    pub async fn new(letter: &str, databases: &[&str], groups: &[&str]) -> Self {
        Self::on(admin_url(), letter, databases, groups).await
    }

    /// [`Self::new`] on the server at `url` (an admin URL).
    pub async fn on(url: String, letter: &str, databases: &[&str], groups: &[&str]) -> Self {
        let opts: PgConnectOptions = url.parse().expect("admin url");
        let admin = PgPoolOptions::new()
            .max_connections(2)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(opts.clone())
            .await
            .expect("admin connects");
        let tag = crate::tag(letter);
        let app = Self {
            databases: databases.iter().map(|d| format!("{tag}_{d}")).collect(),
            host: opts.get_host().to_owned(),
            port: opts.get_port(),
            admin,
            url,
            tag,
        };
        for d in &app.databases {
            exec(&app.admin, format!("CREATE DATABASE {d}")).await;
        }
        for g in groups {
            exec(&app.admin, format!("CREATE ROLE {} NOLOGIN", app.group(g))).await;
        }
        app
    }

    /// The name of database `name`.
    pub fn db(&self, name: &str) -> String {
        format!("{}_{name}", self.tag)
    }

    /// The name of group role `name`.
    pub fn group(&self, name: &str) -> String {
        format!("{}g_{name}", self.tag)
    }

    /// The role prefix of this test's job users.
    pub fn prefix(&self) -> String {
        format!("{}u_", self.tag)
    }

    /// Connect options for database `name` (as the admin user).
    pub fn options_for(&self, name: &str) -> PgConnectOptions {
        self.url
            .parse::<PgConnectOptions>()
            .expect("admin url")
            .database(&self.db(name))
    }

    /// The settings of a `postgres` target `main` on this server, indented for
    /// `targets: postgres:`; `settings` are more lines at the same depth (e.g.
    /// `"      connect_timeout: 3s\n"`).
    pub fn main_target(&self, settings: &str) -> String {
        format!(
            "    main:\n      admin_url: {{value: \"{url}\"}}\n      host: {host}\n      port: {port}\n      sslmode: disable\n{settings}      role_prefix: {prefix}\n",
            url = self.url,
            host = self.host,
            port = self.port,
            prefix = self.prefix(),
        )
    }

    /// `targets:` YAML with [`Self::main_target`] as its only Postgres target.
    pub fn target_yaml(&self, settings: &str) -> String {
        format!("targets:\n  postgres:\n{}", self.main_target(settings))
    }

    /// How many job users exist right now: the number a crash or a lost revocation would leave.
    pub async fn roles(&self) -> i64 {
        sqlx::query("SELECT count(*) FROM pg_roles WHERE starts_with(rolname, $1)")
            .bind(self.prefix())
            .fetch_one(&self.admin)
            .await
            .expect("count roles")
            .get(0)
    }

    /// Poll until exactly `want` job users exist (at most `tries` × 100 ms); the last count.
    pub async fn wait_roles(&self, want: i64, tries: usize) -> i64 {
        let mut n = -1;
        for _ in 0..tries {
            n = self.roles().await;
            if n == want {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        n
    }

    pub async fn role_exists(&self, name: &str) -> bool {
        sqlx::query("SELECT 1 FROM pg_roles WHERE rolname = $1")
            .bind(name)
            .fetch_optional(&self.admin)
            .await
            .expect("role lookup")
            .is_some()
    }

    /// Drop the databases, then every role named by the tag (also job users left behind).
    pub async fn cleanup(self) {
        for d in &self.databases {
            exec(
                &self.admin,
                format!("DROP DATABASE IF EXISTS {d} WITH (FORCE)"),
            )
            .await;
        }
        let left: Vec<String> =
            sqlx::query("SELECT rolname::text FROM pg_roles WHERE starts_with(rolname, $1)")
                .bind(&self.tag)
                .fetch_all(&self.admin)
                .await
                .expect("roles")
                .into_iter()
                .map(|r| r.get(0))
                .collect();
        for r in left {
            exec(&self.admin, format!("DROP OWNED BY {r}; DROP ROLE {r}")).await;
        }
        self.admin.close().await;
    }
}

/// A target for job users with one credential, `pg-app`, for the example job: an app database
/// and an owner role ([`PgApp`] with those), and its policy file.
pub struct PgRoleTarget {
    app: PgApp,
}

impl PgRoleTarget {
    pub async fn new() -> anyhow::Result<Self> {
        Ok(Self {
            app: PgApp::new("f", &["app"], &["owner"]).await,
        })
    }

    pub fn yaml(&self) -> String {
        self.app.target_yaml("      connect_timeout: 3s\n")
    }

    pub fn policy(&self) -> String {
        format!(
            "credentials:\n  - name: pg-app\n    max_ttl: 15m\n    postgres:\n      target: main\n      database: {db}\n      owner: {owner}\nrules:\n  - name: acme-main\n    issuer: github\n    credentials: [pg-app]\n    when: claims.repository_id == \"1000001\"\n",
            db = self.app.db("app"),
            owner = self.app.group("owner"),
        )
    }

    /// The role prefix of this target's job users.
    pub fn prefix(&self) -> String {
        self.app.prefix()
    }

    pub async fn roles(&self) -> i64 {
        self.app.roles().await
    }

    /// Poll until exactly `want` job users exist (at most ~20 s); the last count.
    pub async fn wait_roles(&self, want: i64) -> i64 {
        self.app.wait_roles(want, 200).await
    }

    pub async fn cleanup(self) {
        self.app.cleanup().await;
    }
}

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a benchmark driver, not service code
//! Side-by-side load benchmark: the broker (release binary) against OpenBao `-dev`, on the same
//! machine, the same local issuer and the same Postgres. Started by `bench/run`, which builds
//! the broker, installs OpenBao and passes their paths in `BROKER_BIN` and `BAO_BIN`.
//!
//! What it does (see docs/benchmarks.md for the method):
//! 1. serves a local OIDC issuer (discovery + JWKS over HTTP) and signs one unique GitHub-shaped
//!    token per request, all before timing;
//! 2. creates a fresh database, a group role and an owner role for each system;
//! 3. starts both servers on free 127.0.0.1 ports and configures OpenBao over its HTTP API
//!    (`auth/jwt` + the database secrets engine);
//! 4. runs every workload at every concurrency with a fixed request count, measuring wall time,
//!    latency, CPU of the server process and of the Postgres backends serving it (from
//!    `/proc/<pid>/stat`), and peak RSS (`VmHWM`);
//! 5. stops both servers by PID and drops what it created.
//!
//! Environment: `BENCH_PG_URL` (superuser URL, default the local trust-auth server),
//! `BENCH_N_API` / `BENCH_N_PG` (requests per cell), `BENCH_CONC` (e.g. `1,8,32`),
//! `BENCH_REPEAT` (runs per cell, default 3; the median by ops/s is reported), `BENCH_POOL` (the broker's
//! Postgres target pool size).

use broker::oidc::testkit::{self, TestIssuer, TestKey};
use integration::{acme_api_claims, free_port, github_issuer_yaml};
use serde_json::{Value, json};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use std::future::Future;
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

const AUD: &str = "https://broker.test";
const BAO_TOKEN: &str = "bench-root";

fn env_or<T: FromStr>(k: &str, d: T) -> T {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

// ---------------------------------------------------------------------------------------------
// /proc readings

/// Clock ticks per second for `/proc/<pid>/stat` times (`getconf CLK_TCK`, passed by bench/run).
fn clk_tck() -> f64 {
    env_or("BENCH_CLK_TCK", 100.0)
}

/// (utime + stime, cutime + cstime, ppid) of `pid`, in ticks.
fn proc_times(pid: u32) -> Option<(u64, u64, u32)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the `(comm)` part; comm may contain spaces, so split after the last ')'.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state): ppid = field 4, utime 14, stime 15, cutime 16, cstime 17.
    let get = |field: usize| f.get(field - 3).and_then(|v| v.parse::<u64>().ok());
    Some((get(14)? + get(15)?, get(16)? + get(17)?, get(4)? as u32))
}

fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// CPU seconds a server process has used, including children it reaped.
fn server_cpu(pid: u32) -> f64 {
    proc_times(pid).map_or(0.0, |(own, kids, _)| (own + kids) as f64 / clk_tck())
}

/// The Postgres backends serving the given databases, read by PID from `/proc`: the PIDs come
/// from `pg_stat_activity` (the cluster is shared with other work on this machine, so counting
/// every backend of the postmaster would count strangers' queries too).
struct PgCpu {
    admin: PgPool,
    dbs: Vec<String>,
}

impl PgCpu {
    async fn pids(&self) -> Vec<u32> {
        let rows: Vec<i32> = sqlx::query_scalar(
            "SELECT pid FROM pg_stat_activity WHERE datname = ANY($1) AND pid <> pg_backend_pid()",
        )
        .bind(&self.dbs)
        .fetch_all(&self.admin)
        .await
        .unwrap();
        rows.into_iter().map(|p| p as u32).collect()
    }

    /// CPU ticks per backend now.
    async fn snapshot(&self) -> Vec<(u32, u64)> {
        self.pids()
            .await
            .into_iter()
            .filter_map(|p| proc_times(p).map(|(t, _, _)| (p, t)))
            .collect()
    }

    /// CPU seconds used since `before` by backends alive now (new ones count from zero).
    async fn since(&self, before: &[(u32, u64)]) -> f64 {
        let now = self.snapshot().await;
        let ticks: u64 = now
            .iter()
            .map(|(p, t)| {
                let b = before.iter().find(|(q, _)| q == p).map_or(0, |(_, t)| *t);
                t.saturating_sub(b)
            })
            .sum();
        ticks as f64 / clk_tck()
    }
}

// ---------------------------------------------------------------------------------------------
// The load loop

struct CellResult<R> {
    ops_per_s: f64,
    p50: Duration,
    p99: Duration,
    server_cpu_ms_per_op: f64,
    pg_cpu_ms_per_op: f64,
    outputs: Vec<R>,
}

/// Run `f` once per item with `conc` workers; the items were prepared before the clock starts.
async fn run_cell<T, R, F, Fut>(
    conc: usize,
    items: Vec<T>,
    server_pid: u32,
    pg: &PgCpu,
    f: F,
) -> CellResult<R>
where
    T: Send + 'static,
    R: Send + 'static,
    F: Fn(T) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = R> + Send,
{
    let n = items.len();
    let queue = Arc::new(std::sync::Mutex::new(items));
    let f = Arc::new(f);
    let pg_before = pg.snapshot().await;
    let cpu_before = server_cpu(server_pid);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..conc {
        let (q, f) = (queue.clone(), f.clone());
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            loop {
                let Some(item) = q.lock().unwrap().pop() else {
                    break;
                };
                let t0 = Instant::now();
                let r = f(item).await;
                out.push((t0.elapsed(), r));
            }
            out
        }));
    }
    let mut lat = Vec::with_capacity(n);
    let mut outputs = Vec::with_capacity(n);
    for t in tasks {
        for (d, r) in t.await.unwrap() {
            lat.push(d);
            outputs.push(r);
        }
    }
    let elapsed = start.elapsed();
    let cpu = server_cpu(server_pid) - cpu_before;
    let pg_cpu = pg.since(&pg_before).await;
    lat.sort();
    let p = |q: f64| lat[((lat.len() as f64 * q) as usize).min(lat.len() - 1)];
    CellResult {
        ops_per_s: n as f64 / elapsed.as_secs_f64(),
        p50: p(0.50),
        p99: p(0.99),
        server_cpu_ms_per_op: cpu * 1000.0 / n as f64,
        pg_cpu_ms_per_op: pg_cpu * 1000.0 / n as f64,
        outputs,
    }
}

// ---------------------------------------------------------------------------------------------
// Servers

struct Server {
    name: &'static str,
    child: Child,
    url: String,
}

impl Server {
    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // By PID: this process started it.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn wait_http(url: &str) {
    let c = reqwest::Client::new();
    for _ in 0..400 {
        if c.get(url)
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{url} did not come up");
}

struct Fixture {
    tag: String,
    db: String,
    store_db: String,
    bao_db: String,
    brk_group: String,
    bao_group: String,
    owner: String,
    host: String,
    port: u16,
    admin_url: String,
}

impl Fixture {
    /// Without TLS, as OpenBao's `connection_url` (loopback on both sides; the machine's server
    /// offers TLS, which the broker's default `sslmode=prefer` would otherwise take).
    fn db_url(&self, db: &str) -> String {
        format!(
            "postgres://postgres@{}:{}/{db}?sslmode=disable",
            self.host, self.port
        )
    }
}

/// Every Postgres-user cell creates or drops hundreds of roles, which leaves dead rows in the
/// shared role catalogs; where autovacuum is off (as on the benchmark machine) they pile up over
/// a run and slow every later cell, whichever system it measures. Vacuumed before each such
/// cell (untimed, on the admin connection, whose CPU is not counted), so every cell starts from
/// the same catalogs.
async fn vacuum_role_catalogs(admin: &PgPool, when: bool) {
    if when {
        exec(
            admin,
            "VACUUM pg_catalog.pg_authid, pg_catalog.pg_auth_members, pg_catalog.pg_shdepend",
        )
        .await;
    }
}

async fn exec(pool: &PgPool, sql: &str) {
    sqlx::raw_sql(sql)
        .execute(pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

async fn start_broker(fx: &Fixture, issuer: &str, dir: &std::path::Path) -> Server {
    let port = free_port();
    let policies = dir.join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    std::fs::write(
        policies.join("bench.yaml"),
        format!(
            r#"credentials:
  - name: bench-api
    max_ttl: 15m
    api_token: {{audience: "https://bench.example", scopes: ["deploy:${{repository}}"]}}
  - name: bench-pg
    max_ttl: 15m
    postgres: {{target: bench, database: {db}, roles: [{grp}], owner: {owner}}}
rules:
  - name: bench
    issuer: github
    credentials: [bench-api, bench-pg]
    when: claims.repository == "acme/api" && claims.ref == "refs/heads/main"
"#,
            db = fx.db,
            grp = fx.brk_group,
            owner = fx.owner
        ),
    )
    .unwrap();
    let cfg = format!(
        "listen: 127.0.0.1:{port}\npublic_url: http://127.0.0.1:{port}\naudience: {AUD}\n\
         store:\n  url: {{value: \"{store}\"}}\npolicies:\n  dir: {pol}\nissuers:\n{iss}\n\
         limits:\n  exchanges_per_minute_per_repository: 0\n\
         targets:\n  postgres:\n    bench:\n      admin_url: {{value: \"{target}\"}}\n      host: {host}\n      port: {pgport}\n      sslmode: disable\n      pool_size: {pool}\n      role_prefix: {tag}_\n",
        store = fx.db_url(&fx.store_db),
        pol = policies.display(),
        iss = github_issuer_yaml(issuer),
        target = fx.db_url(&fx.db),
        host = fx.host,
        pgport = fx.port,
        pool = env_or("BENCH_POOL", 16u32),
        tag = fx.tag,
    );
    let path = dir.join("broker.yaml");
    std::fs::write(&path, cfg).unwrap();
    let log = std::fs::File::create(dir.join("broker.log")).unwrap();
    let bin = std::env::var("BROKER_BIN").expect("BROKER_BIN (run bench/run)");
    let child = Command::new(bin)
        .args(["serve", "--config"])
        .arg(&path)
        .env("BROKER_LOG", "warn")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let s = Server {
        name: "broker",
        child,
        url,
    };
    wait_http(&format!("{}/readyz", s.url)).await;
    s
}

async fn start_bao(fx: &Fixture, issuer: &str, dir: &std::path::Path) -> Server {
    let port = free_port();
    let bin = std::env::var("BAO_BIN").expect("BAO_BIN (run bench/run)");
    let log = std::fs::File::create(dir.join("bao.log")).unwrap();
    let child = Command::new(bin)
        .args([
            "server",
            "-dev",
            &format!("-dev-listen-address=127.0.0.1:{port}"),
            &format!("-dev-root-token-id={BAO_TOKEN}"),
            "-log-level=warn",
        ])
        .env("HOME", dir)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let s = Server {
        name: "openbao",
        child,
        url,
    };
    wait_http(&format!("{}/v1/sys/health", s.url)).await;
    let c = reqwest::Client::new();
    let call = |method: reqwest::Method, path: &str, body: Value| {
        let req = c
            .request(method, format!("{}/v1/{path}", s.url))
            .header("X-Vault-Token", BAO_TOKEN)
            .json(&body);
        let path = path.to_owned();
        async move {
            let r = req.send().await.unwrap();
            let st = r.status();
            let text = r.text().await.unwrap_or_default();
            assert!(st.is_success(), "openbao {path}: {st} {text}");
        }
    };
    use reqwest::Method;
    call(Method::POST, "sys/auth/jwt", json!({"type": "jwt"})).await;
    call(
        Method::POST,
        "auth/jwt/config",
        json!({"oidc_discovery_url": issuer, "bound_issuer": issuer}),
    )
    .await;
    call(
        Method::POST,
        "sys/policies/acl/bench",
        json!({"policy": "path \"database/creds/job\" { capabilities = [\"read\"] }"}),
    )
    .await;
    call(
        Method::POST,
        "auth/jwt/role/ci",
        json!({
            "role_type": "jwt",
            "user_claim": "sub",
            "bound_audiences": [AUD],
            "bound_claims": {"repository": "acme/api", "ref": "refs/heads/main"},
            "token_policies": ["bench"],
            "token_ttl": "15m",
        }),
    )
    .await;
    call(
        Method::POST,
        "sys/mounts/database",
        json!({"type": "database"}),
    )
    .await;
    call(
        Method::POST,
        "database/config/pg",
        json!({
            "plugin_name": "postgresql-database-plugin",
            "connection_url": format!("postgresql://{{{{username}}}}@{}:{}/{}?sslmode=disable", fx.host, fx.port, fx.bao_db),
            "username": "postgres",
            "password": "unused-trust-auth",
            "allowed_roles": ["job"],
            "verify_connection": true,
        }),
    )
    .await;
    call(
        Method::POST,
        "database/roles/job",
        json!({
            "db_name": "pg",
            "creation_statements": [format!(
                "CREATE ROLE \"{{{{name}}}}\" LOGIN PASSWORD '{{{{password}}}}' VALID UNTIL '{{{{expiration}}}}'; GRANT {} TO \"{{{{name}}}}\";",
                fx.bao_group
            )],
            "default_ttl": "15m",
            "max_ttl": "1h",
        }),
    )
    .await;
    s
}

// ---------------------------------------------------------------------------------------------
// Workloads

#[derive(Clone, Copy, PartialEq)]
enum Workload {
    ApiToken,
    PgUser,
    PgRevoke,
}

impl Workload {
    fn label(self) -> &'static str {
        match self {
            Workload::ApiToken => "token → API token",
            Workload::PgUser => "token → Postgres user",
            Workload::PgRevoke => "revoke a Postgres user",
        }
    }
}

struct Row {
    workload: Workload,
    conc: usize,
    broker: Summary,
    bao: Summary,
}

#[derive(Clone, Copy)]
struct Summary {
    ops: f64,
    p50: Duration,
    p99: Duration,
    cpu: f64,
    pg: f64,
}

fn summary<R>(c: &CellResult<R>) -> Summary {
    Summary {
        ops: c.ops_per_s,
        p50: c.p50,
        p99: c.p99,
        cpu: c.server_cpu_ms_per_op,
        pg: c.pg_cpu_ms_per_op,
    }
}

fn tokens(issuer: &str, n: usize) -> Vec<String> {
    (0..n)
        .map(|_| testkit::sign(TestKey::Rsa1, &acme_api_claims(issuer, AUD)))
        .collect()
}

async fn members(admin: &PgPool, group: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid WHERE g.rolname = $1",
    )
    .bind(group)
    .fetch_one(admin)
    .await
    .unwrap()
}

/// The broker: one cell of `w`. For PgUser it returns the revocation tokens for PgRevoke.
async fn broker_cell(
    w: Workload,
    conc: usize,
    srv: &Server,
    pg: &PgCpu,
    client: &reqwest::Client,
    input: Vec<String>,
) -> CellResult<String> {
    let (c, url) = (client.clone(), srv.url.clone());
    match w {
        Workload::ApiToken | Workload::PgUser => {
            let cred = if w == Workload::ApiToken {
                "bench-api"
            } else {
                "bench-pg"
            };
            run_cell(conc, input, srv.pid(), pg, move |tok| {
                let (c, url) = (c.clone(), url.clone());
                async move {
                    let r = c
                        .post(format!("{url}/v1/exchange"))
                        .bearer_auth(tok)
                        .json(&json!({"credentials": [cred], "ttl": "15m"}))
                        .send()
                        .await
                        .unwrap();
                    let st = r.status();
                    let body: Value = r.json().await.unwrap_or_default();
                    assert_eq!(st, 200, "broker exchange: {body}");
                    body["revocation_token"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned()
                }
            })
            .await
        }
        Workload::PgRevoke => {
            run_cell(conc, input, srv.pid(), pg, move |rvk| {
                let (c, url) = (c.clone(), url.clone());
                async move {
                    let r = c
                        .post(format!("{url}/v1/revoke"))
                        .bearer_auth(rvk)
                        .send()
                        .await
                        .unwrap();
                    let st = r.status();
                    let body = r.text().await.unwrap_or_default();
                    assert_eq!(st, 200, "broker revoke: {body}");
                    String::new()
                }
            })
            .await
        }
    }
}

/// OpenBao: one cell of `w`. For PgUser it returns the lease ids for PgRevoke.
async fn bao_cell(
    w: Workload,
    conc: usize,
    srv: &Server,
    pg: &PgCpu,
    client: &reqwest::Client,
    input: Vec<String>,
) -> CellResult<String> {
    let (c, url) = (client.clone(), srv.url.clone());
    match w {
        Workload::ApiToken | Workload::PgUser => {
            run_cell(conc, input, srv.pid(), pg, move |tok| {
                let (c, url) = (c.clone(), url.clone());
                async move {
                    let r = c
                        .post(format!("{url}/v1/auth/jwt/login"))
                        .json(&json!({"role": "ci", "jwt": tok}))
                        .send()
                        .await
                        .unwrap();
                    let st = r.status();
                    let body: Value = r.json().await.unwrap_or_default();
                    assert_eq!(st, 200, "openbao login: {body}");
                    let token = body["auth"]["client_token"].as_str().unwrap().to_owned();
                    if w == Workload::ApiToken {
                        return String::new();
                    }
                    let r = c
                        .get(format!("{url}/v1/database/creds/job"))
                        .header("X-Vault-Token", token)
                        .send()
                        .await
                        .unwrap();
                    let st = r.status();
                    let body: Value = r.json().await.unwrap_or_default();
                    assert_eq!(st, 200, "openbao creds: {body}");
                    body["lease_id"].as_str().unwrap().to_owned()
                }
            })
            .await
        }
        Workload::PgRevoke => {
            run_cell(conc, input, srv.pid(), pg, move |lease| {
                let (c, url) = (c.clone(), url.clone());
                async move {
                    let r = c
                        .put(format!("{url}/v1/sys/leases/revoke"))
                        .header("X-Vault-Token", BAO_TOKEN)
                        .json(&json!({"lease_id": lease, "sync": true}))
                        .send()
                        .await
                        .unwrap();
                    let st = r.status();
                    let body = r.text().await.unwrap_or_default();
                    assert!(st.is_success(), "openbao revoke: {st} {body}");
                    String::new()
                }
            })
            .await
        }
    }
}

fn median(mut v: Vec<Summary>) -> Summary {
    v.sort_by(|a, b| a.ops.total_cmp(&b.ops));
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

fn print_table(rows: &[Row], rss: (u64, u64)) {
    println!();
    println!(
        "| workload | c | broker ops/s | OpenBao ops/s | × | broker p50 / p99 ms | OpenBao p50 / p99 ms | p99 ratio | broker CPU ms/op (server + pg) | OpenBao CPU ms/op (server + pg) | CPU ratio |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        let (b, o) = (r.broker, r.bao);
        println!(
            "| {} | {} | {:.0} | {:.0} | {:.2}× | {} / {} | {} / {} | {:.2} | {:.2} + {:.2} | {:.2} + {:.2} | {:.2} |",
            r.workload.label(),
            r.conc,
            b.ops,
            o.ops,
            b.ops / o.ops,
            ms(b.p50),
            ms(b.p99),
            ms(o.p50),
            ms(o.p99),
            b.p99.as_secs_f64() / o.p99.as_secs_f64(),
            b.cpu,
            b.pg,
            o.cpu,
            o.pg,
            (b.cpu + b.pg) / (o.cpu + o.pg),
        );
    }
    println!();
    println!(
        "peak RSS (VmHWM): broker {:.1} MiB, OpenBao {:.1} MiB ({:.2}×)",
        rss.0 as f64 / 1024.0,
        rss.1 as f64 / 1024.0,
        rss.0 as f64 / rss.1 as f64
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n_api: usize = env_or("BENCH_N_API", 2000);
    let n_pg: usize = env_or("BENCH_N_PG", 500);
    let repeat: usize = env_or("BENCH_REPEAT", 3).max(1);
    let concs: Vec<usize> = std::env::var("BENCH_CONC")
        .unwrap_or_else(|_| "1,8,32".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let pg_url = std::env::var("BENCH_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let opts = PgConnectOptions::from_str(&pg_url).unwrap();
    let admin = PgPoolOptions::new()
        .max_connections(2)
        .connect_with(opts.clone())
        .await
        .unwrap();
    let tag = format!("bench{}", &uuid::Uuid::new_v4().simple().to_string()[..6]);
    let fx = Fixture {
        db: format!("{tag}_target"),
        store_db: format!("{tag}_store"),
        bao_db: format!("{tag}_bao"),
        brk_group: format!("{tag}_brk_grp"),
        bao_group: format!("{tag}_bao_grp"),
        owner: format!("{tag}_owner"),
        host: opts.get_host().to_owned(),
        port: opts.get_port(),
        admin_url: pg_url.clone(),
        tag,
    };
    let _ = &fx.admin_url;
    for d in [&fx.db, &fx.store_db, &fx.bao_db] {
        exec(&admin, &format!("CREATE DATABASE {d}")).await;
    }
    for r in [&fx.brk_group, &fx.bao_group, &fx.owner] {
        exec(&admin, &format!("CREATE ROLE {r} NOLOGIN")).await;
    }

    let issuer = TestIssuer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let broker = start_broker(&fx, &issuer.url(), dir.path()).await;
    let bao = start_bao(&fx, &issuer.url(), dir.path()).await;
    let pg_broker = PgCpu {
        admin: admin.clone(),
        dbs: vec![fx.db.clone(), fx.store_db.clone()],
    };
    let pg_bao = PgCpu {
        admin: admin.clone(),
        dbs: vec![fx.bao_db.clone()],
    };
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()
        .unwrap();

    println!(
        "machine: {} CPUs; load average at start: {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );

    let autovacuum: String = sqlx::query_scalar("SHOW autovacuum")
        .fetch_one(&admin)
        .await
        .unwrap_or_default();
    println!(
        "postgres: autovacuum {autovacuum}; role catalogs vacuumed before each Postgres-user cell"
    );

    // The load client's own ceiling: a trivial endpoint on each server at the top concurrency.
    let top = concs.iter().copied().max().unwrap_or(32);
    for s in [&broker, &bao] {
        let path = if s.name == "broker" {
            "/healthz"
        } else {
            "/v1/sys/health"
        };
        let c = client.clone();
        let url = format!("{}{path}", s.url);
        let none = PgCpu {
            admin: admin.clone(),
            dbs: vec![],
        };
        let cell = run_cell(top, vec![(); 5000], s.pid(), &none, move |()| {
            let (c, url) = (c.clone(), url.clone());
            async move {
                let r = c.get(url).send().await.unwrap();
                assert!(r.status().is_success());
                r.bytes().await.unwrap();
            }
        })
        .await;
        println!(
            "load client ceiling ({} {path}, c={top}): {:.0} req/s, p99 {} ms",
            s.name,
            cell.ops_per_s,
            ms(cell.p99)
        );
    }

    let mut rows = Vec::new();
    // `BENCH_ONLY=api` or `BENCH_ONLY=pg` runs one family (e.g. while profiling).
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let families: Vec<Workload> = [Workload::ApiToken, Workload::PgUser]
        .into_iter()
        .filter(|w| match only.as_str() {
            "api" => *w == Workload::ApiToken,
            "pg" => *w == Workload::PgUser,
            _ => true,
        })
        .collect();
    for w in families {
        for &conc in &concs {
            let n = if w == Workload::ApiToken { n_api } else { n_pg };
            let (mut bs, mut os, mut brs, mut ors) = (vec![], vec![], vec![], vec![]);
            for _ in 0..repeat {
                let pg = w == Workload::PgUser;
                vacuum_role_catalogs(&admin, pg).await;
                let b = broker_cell(
                    w,
                    conc,
                    &broker,
                    &pg_broker,
                    &client,
                    tokens(&issuer.url(), n),
                )
                .await;
                vacuum_role_catalogs(&admin, pg).await;
                let o = bao_cell(w, conc, &bao, &pg_bao, &client, tokens(&issuer.url(), n)).await;
                bs.push(summary(&b));
                os.push(summary(&o));
                if w == Workload::PgUser {
                    assert_eq!(
                        members(&admin, &fx.brk_group).await as usize,
                        n,
                        "broker users exist"
                    );
                    assert_eq!(
                        members(&admin, &fx.bao_group).await as usize,
                        n,
                        "OpenBao users exist"
                    );
                    // Workload 3 revokes exactly the users this cell created.
                    vacuum_role_catalogs(&admin, true).await;
                    let br = broker_cell(
                        Workload::PgRevoke,
                        conc,
                        &broker,
                        &pg_broker,
                        &client,
                        b.outputs,
                    )
                    .await;
                    vacuum_role_catalogs(&admin, true).await;
                    let or =
                        bao_cell(Workload::PgRevoke, conc, &bao, &pg_bao, &client, o.outputs).await;
                    assert_eq!(
                        members(&admin, &fx.brk_group).await,
                        0,
                        "broker revoke left roles"
                    );
                    assert_eq!(
                        members(&admin, &fx.bao_group).await,
                        0,
                        "OpenBao revoke left roles"
                    );
                    brs.push(summary(&br));
                    ors.push(summary(&or));
                }
            }
            let row = Row {
                workload: w,
                conc,
                broker: median(bs),
                bao: median(os),
            };
            eprintln!(
                "{} c={conc}: broker {:.0}/s p99 {} ms, OpenBao {:.0}/s p99 {} ms",
                w.label(),
                row.broker.ops,
                ms(row.broker.p99),
                row.bao.ops,
                ms(row.bao.p99)
            );
            rows.push(row);
            if w == Workload::PgUser {
                rows.push(Row {
                    workload: Workload::PgRevoke,
                    conc,
                    broker: median(brs),
                    bao: median(ors),
                });
            }
        }
    }
    // Group the table by workload.
    rows.sort_by_key(|r| (r.workload as u8, r.conc));
    let rss = (
        vm_hwm_kib(broker.pid()).unwrap_or(0),
        vm_hwm_kib(bao.pid()).unwrap_or(0),
    );
    print_table(&rows, rss);
    println!(
        "load average at end: {}",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );

    drop(broker);
    drop(bao);
    issuer.shutdown().await;
    for d in [&fx.db, &fx.store_db, &fx.bao_db] {
        exec(&admin, &format!("DROP DATABASE IF EXISTS {d} WITH (FORCE)")).await;
    }
    for r in [&fx.brk_group, &fx.bao_group, &fx.owner] {
        exec(&admin, &format!("DROP ROLE IF EXISTS {r}")).await;
    }
}

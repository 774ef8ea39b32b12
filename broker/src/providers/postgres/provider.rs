// Long on purpose (~740 lines): pools per target, mint and the ordered revoke steps share one connection discipline; the pure parts are in naming.rs, scram.rs and sql.rs, tests in provider/tests.rs.
//! The Postgres provider: creates a login role per credential, drops it at revoke.
//!
//! Connections: sqlx's `PgPool`, one per (target, database), created lazily. sqlx is already the
//! store's driver with rustls + aws-lc-rs, so admin connections get TLS (the admin URL's
//! `sslmode`, `sslrootcert`, … are honoured) and pool timeouts without a second Postgres
//! stack. Statement logging is switched off on these connections: `CREATE ROLE` carries the
//! password verifier.
//!
//! Mint: render the extra statements (a bad claim fails here, before anything exists), then
//! `CREATE ROLE … LOGIN PASSWORD '<SCRAM verifier>' VALID UNTIL '<expiry>' IN ROLE …` on the
//! admin database, then the extra statements in the credential's database in one transaction.
//!
//! Revoke, in this order: `ALTER ROLE … NOLOGIN`, committed (nothing new gets in); then in one
//! transaction in the credential's database: terminate the role's sessions (dropping a role does
//! not end them), `REASSIGN OWNED BY … TO owner`, `DROP OWNED BY …`, `DROP ROLE` (both steps
//! in one round trip). If Postgres refuses the drop because the role still holds something in
//! another database, the same in every database `pg_shdepend` lists, then `DROP ROLE`. A role
//! already gone is success; a role without the target's prefix is never touched.

use super::config::{PostgresTargetConfig, SslMode};
use super::naming;
use super::scram;
use super::sql::{Values, quote_ident, quote_literal};
use crate::providers::DefinitionError;
use crate::providers::{
    CredentialDef, CredentialKind, CredentialSpec, Field, Health, IssuedCredential, MintRequest,
    Minted, Provider, ProviderError,
};
use crate::secret::Sensitive;
use async_trait::async_trait;
use serde_json::{Value, json};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, Row};
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use time::format_description::well_known::Rfc3339;
use uuid::Uuid;

/// Errors building the provider from config (startup).
#[derive(Debug, thiserror::Error)]
pub enum PostgresConfigError {
    #[error("targets.postgres.{target}.admin_url: {reason}")]
    AdminUrl { target: String, reason: String },
    #[error("credential {credential:?} names postgres target {target:?}, which is not configured")]
    UnknownTarget { credential: String, target: String },
}

impl PostgresConfigError {
    pub fn reason_code(&self) -> &'static str {
        match self {
            PostgresConfigError::AdminUrl { .. } => "bad_admin_url",
            PostgresConfigError::UnknownTarget { .. } => "unknown_target",
        }
    }
}

/// Idle admin connections close after this long (they may hold a database other tools want to
/// drop or rename).
const IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// `statement_timeout` on admin sessions: no statement of ours may hang a mint or revoke.
const STATEMENT_TIMEOUT_MS: &str = "30000";
/// How long `pg_terminate_backend` waits for each session to end.
const TERMINATE_WAIT_MS: i64 = 5000;
/// How long the provider remembers that a mint failed before sending `CREATE ROLE`.
const NEVER_CREATED_TTL: std::time::Duration = std::time::Duration::from_secs(600);

/// One configured server.
struct Target {
    name: String,
    admin: PgConnectOptions,
    admin_db: String,
    admin_pool: PgPool,
    db_pools: Mutex<HashMap<String, PgPool>>,
    host: String,
    port: u16,
    sslmode: SslMode,
    pool_size: u32,
    acquire_timeout: std::time::Duration,
    prefix: String,
    scram_iterations: u32,
}

impl fmt::Debug for Target {
    // Never the admin options: they hold the password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Target")
            .field("name", &self.name)
            .field("host", &self.host)
            .field("port", &self.port)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl Target {
    fn pool_for(&self, database: &str) -> PgPool {
        if database == self.admin_db {
            return self.admin_pool.clone();
        }
        let mut pools = self.db_pools.lock().unwrap_or_else(|e| e.into_inner());
        pools
            .entry(database.to_owned())
            .or_insert_with(|| {
                pool_options(self.pool_size, self.acquire_timeout)
                    .connect_lazy_with(self.admin.clone().database(database))
            })
            .clone()
    }
}

fn pool_options(size: u32, acquire: std::time::Duration) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(size)
        .min_connections(0)
        .acquire_timeout(acquire)
        .idle_timeout(IDLE_TIMEOUT)
}

/// The Postgres credential provider.
pub struct PostgresProvider {
    targets: BTreeMap<String, Arc<Target>>,
    /// Resource ids whose mint failed before `CREATE ROLE` was sent (no connection could be
    /// had): the undo that follows in the same process knows there is nothing to drop, even
    /// with the target down. Any other revoke goes to the server.
    never_created: moka::future::Cache<String, ()>,
}

impl fmt::Debug for PostgresProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresProvider")
            .field("targets", &self.targets.values().collect::<Vec<_>>())
            .finish()
    }
}

/// Classify a driver error without echoing SQL (which may hold the verifier).
fn classify(what: &str, e: &sqlx::Error) -> ProviderError {
    match e {
        sqlx::Error::Database(db) => {
            let code = db.code().map(|c| c.to_string()).unwrap_or_default();
            // 08: connection exception; 53: too many connections / out of resources;
            // 57P0x: shutting down, cannot connect now.
            if code.starts_with("08") || code.starts_with("53") || code.starts_with("57P") {
                ProviderError::TargetUnavailable(format!("{what}: SQLSTATE {code}"))
            } else {
                ProviderError::Misconfigured(format!("{what}: SQLSTATE {code}"))
            }
        }
        sqlx::Error::PoolTimedOut => {
            ProviderError::TargetUnavailable(format!("{what}: no connection within the timeout"))
        }
        sqlx::Error::Io(io) => {
            ProviderError::TargetUnavailable(format!("{what}: connection failed ({})", io.kind()))
        }
        sqlx::Error::Tls(_) => ProviderError::TargetUnavailable(format!("{what}: TLS failed")),
        sqlx::Error::PoolClosed | sqlx::Error::WorkerCrashed | sqlx::Error::Protocol(_) => {
            ProviderError::TargetUnavailable(format!("{what}: connection lost"))
        }
        _ => ProviderError::Internal(format!("{what}: driver error")),
    }
}

fn sqlstate(e: &sqlx::Error) -> Option<String> {
    match e {
        sqlx::Error::Database(db) => db.code().map(|c| c.to_string()),
        _ => None,
    }
}

/// Values the extra statements may use.
struct MintValues<'a> {
    username: &'a str,
    database: &'a str,
    owner: &'a str,
    expires_at: String,
    grant_id: Uuid,
    claims: &'a crate::oidc::VerifiedClaims,
}

impl Values for MintValues<'_> {
    fn username(&self) -> &str {
        self.username
    }
    fn database(&self) -> &str {
        self.database
    }
    fn owner(&self) -> &str {
        self.owner
    }
    fn expires_at(&self) -> String {
        self.expires_at.clone()
    }
    fn grant_id(&self) -> String {
        self.grant_id.to_string()
    }
    fn claim(&self, name: &str) -> Option<String> {
        match name {
            "issuer" => Some(self.claims.issuer.clone()),
            "platform" => Some(self.claims.platform.as_str().to_owned()),
            "sub" => Some(self.claims.sub.clone()),
            _ => match self.claims.claims.get(name)? {
                Value::String(s) => Some(s.clone()),
                Value::Number(n) => Some(n.to_string()),
                Value::Bool(b) => Some(b.to_string()),
                _ => None,
            },
        }
    }
}

/// `CREATE ROLE` for a minted user. Returned as [`Sensitive`]: it holds the verifier.
pub fn create_role_sql(
    username: &str,
    verifier: &Sensitive,
    valid_until: &str,
    connection_limit: Option<u32>,
    groups: &[&str],
) -> Result<Sensitive, ProviderError> {
    let bad = |e: super::sql::QuoteError| {
        ProviderError::Misconfigured(format!("cannot quote a name ({})", e.reason_code()))
    };
    let mut sql = format!(
        "CREATE ROLE {} WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS INHERIT",
        quote_ident(username).map_err(bad)?
    );
    if let Some(n) = connection_limit {
        sql.push_str(&format!(" CONNECTION LIMIT {n}"));
    }
    sql.push_str(" PASSWORD ");
    sql.push_str(&quote_literal(verifier.expose()).map_err(bad)?);
    sql.push_str(" VALID UNTIL ");
    sql.push_str(&quote_literal(valid_until).map_err(bad)?);
    if !groups.is_empty() {
        let quoted = groups
            .iter()
            .map(|g| quote_ident(g))
            .collect::<Result<Vec<_>, _>>()
            .map_err(bad)?;
        sql.push_str(" IN ROLE ");
        sql.push_str(&quoted.join(", "));
    }
    Ok(Sensitive::new(sql))
}

/// Percent-encode a URL path segment or userinfo part (RFC 3986 unreserved kept).
fn pct(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `postgresql://user:password@host:port/database?sslmode=…`.
pub fn database_url(
    username: &str,
    password: &Sensitive,
    host: &str,
    port: u16,
    database: &str,
    sslmode: SslMode,
) -> Sensitive {
    let host = if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_owned()
    };
    Sensitive::new(format!(
        "postgresql://{}:{}@{host}:{port}/{}?sslmode={}",
        pct(username),
        pct(password.expose()),
        pct(database),
        sslmode.as_str()
    ))
}

impl PostgresProvider {
    /// Build from config: secrets resolved, pools created lazily (a target that is down does not
    /// stop the broker from starting; it shows in `/readyz` and fails its exchanges).
    pub fn new(
        targets: &BTreeMap<String, PostgresTargetConfig>,
    ) -> Result<Self, PostgresConfigError> {
        let mut out = BTreeMap::new();
        for (name, t) in targets {
            let err = |reason: String| PostgresConfigError::AdminUrl {
                target: name.clone(),
                reason,
            };
            let url = t.admin_url.resolve().map_err(|e| err(e.to_string()))?;
            // The parser's message could quote the URL (and its password): keep only a fixed one.
            let opts = PgConnectOptions::from_str(url.expose())
                .map_err(|_| err("not a postgres:// connection string (value not shown)".into()))?;
            let admin_db = opts
                .get_database()
                .unwrap_or(opts.get_username())
                .to_owned();
            let opts = opts
                .application_name("broker")
                .options([
                    ("standard_conforming_strings", "on"),
                    ("statement_timeout", STATEMENT_TIMEOUT_MS),
                ])
                .disable_statement_logging();
            let acquire = std::time::Duration::try_from(t.connect_timeout)
                .unwrap_or(std::time::Duration::from_secs(5));
            let admin_pool = pool_options(t.pool_size, acquire)
                .connect_lazy_with(opts.clone().database(&admin_db));
            out.insert(
                name.clone(),
                Arc::new(Target {
                    name: name.clone(),
                    admin: opts,
                    admin_db,
                    admin_pool,
                    db_pools: Mutex::new(HashMap::new()),
                    host: t.host.clone(),
                    port: t.port,
                    sslmode: t.sslmode,
                    pool_size: t.pool_size,
                    acquire_timeout: acquire,
                    prefix: t.role_prefix.clone(),
                    scram_iterations: t.scram_iterations,
                }),
            );
        }
        Ok(Self {
            targets: out,
            never_created: moka::future::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(NEVER_CREATED_TTL)
                .build(),
        })
    }

    /// Every `postgres` definition names a configured target (checked at startup so a typo
    /// fails the start, not a job).
    pub fn check_definitions(&self, defs: &[CredentialDef]) -> Result<(), PostgresConfigError> {
        for d in defs {
            if let CredentialSpec::Postgres(s) = &d.spec
                && !self.targets.contains_key(&s.target)
            {
                return Err(PostgresConfigError::UnknownTarget {
                    credential: d.name.clone(),
                    target: s.target.clone(),
                });
            }
        }
        Ok(())
    }

    fn target(&self, name: &str) -> Result<&Arc<Target>, ProviderError> {
        self.targets.get(name).ok_or_else(|| {
            ProviderError::Misconfigured(format!("postgres target {name:?} is not configured"))
        })
    }

    async fn run_extra(
        &self,
        target: &Target,
        database: &str,
        statements: &[String],
    ) -> Result<(), ProviderError> {
        let pool = target.pool_for(database);
        let mut conn = pool
            .acquire()
            .await
            .map_err(|e| classify("connecting to the credential's database", &e))?;
        let mut tx = conn
            .begin()
            .await
            .map_err(|e| classify("extra statements", &e))?;
        for (i, s) in statements.iter().enumerate() {
            exec(&mut tx, s)
                .await
                .map_err(|e| classify(&format!("extra statement {}", i + 1), &e))?;
        }
        tx.commit()
            .await
            .map_err(|e| classify("extra statements", &e))
    }

    /// Run `REASSIGN OWNED` + `DROP OWNED` for `role` in `database`.
    async fn disown(
        &self,
        target: &Target,
        database: &str,
        role: &str,
        owner: &str,
    ) -> Result<(), ProviderError> {
        let pool = target.pool_for(database);
        let mut conn = match pool.acquire().await {
            Ok(c) => c,
            // The database went away since pg_shdepend listed it: nothing of the role is left
            // there.
            Err(e) if sqlstate(&e).as_deref() == Some("3D000") => return Ok(()),
            Err(e) => return Err(classify("connecting to a database the role touched", &e)),
        };
        let mut tx = conn
            .begin()
            .await
            .map_err(|e| classify("reassigning owned objects", &e))?;
        let reassign = format!("REASSIGN OWNED BY {role} TO {owner}");
        let drop = format!("DROP OWNED BY {role}");
        for stmt in [reassign, drop] {
            exec(&mut tx, &stmt)
                .await
                .map_err(|e| classify("reassigning owned objects", &e))?;
        }
        tx.commit()
            .await
            .map_err(|e| classify("reassigning owned objects", &e))
    }
}

fn detail_str<'a>(c: &'a IssuedCredential, key: &str) -> Result<&'a str, ProviderError> {
    c.details.get(key).and_then(Value::as_str).ok_or_else(|| {
        ProviderError::Internal(format!(
            "credential {:?} has no {key} in its details",
            c.name
        ))
    })
}

#[async_trait]
impl Provider for PostgresProvider {
    fn check_definitions(&self, defs: &[CredentialDef]) -> Result<(), DefinitionError> {
        Ok(PostgresProvider::check_definitions(self, defs)?)
    }

    fn kind(&self) -> CredentialKind {
        CredentialKind::Postgres
    }

    fn resource_id(&self, grant_id: Uuid, credential: &CredentialDef) -> String {
        let prefix = match &credential.spec {
            CredentialSpec::Postgres(s) => self.targets.get(&s.target).map(|t| t.prefix.as_str()),
            _ => None,
        };
        naming::role_name(
            prefix.unwrap_or(naming::DEFAULT_PREFIX),
            grant_id,
            &credential.name,
        )
    }

    fn intent_details(&self, credential: &CredentialDef) -> Value {
        match &credential.spec {
            CredentialSpec::Postgres(s) => json!({
                "target": s.target,
                "database": s.database.as_str(),
                "owner": s.owner.as_str(),
            }),
            _ => Value::Null,
        }
    }

    async fn mint(&self, req: MintRequest<'_>) -> Result<Minted, ProviderError> {
        let CredentialSpec::Postgres(spec) = &req.credential.spec else {
            return Err(ProviderError::Misconfigured(
                "not a postgres credential".into(),
            ));
        };
        let target = self.target(&spec.target)?.clone();
        let username = req.resource_id;
        if !naming::is_ours(&target.prefix, username) {
            return Err(ProviderError::Internal(
                "resource id is not a role name of this target".into(),
            ));
        }
        let valid_until = req
            .expires_at
            .to_offset(time::UtcOffset::UTC)
            .format(&Rfc3339)
            .map_err(|_| ProviderError::Internal("cannot format the expiry".into()))?;
        // Claims are checked here, before anything exists on the server.
        let values = MintValues {
            username,
            database: spec.database.as_str(),
            owner: spec.owner.as_str(),
            expires_at: valid_until.clone(),
            grant_id: req.grant_id,
            claims: req.claims,
        };
        let extra = spec
            .statements
            .iter()
            .map(|t| t.render(&values))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| match e.reason_code() {
                "invalid_claim_value" => ProviderError::InvalidClaim(e.to_string()),
                _ => ProviderError::Misconfigured(e.to_string()),
            })?;
        let password = scram::generate_password();
        let verifier = if target.scram_iterations <= scram::INLINE_ITERATIONS {
            // A few microseconds: not worth a hop to the blocking pool.
            scram::verifier(&password, target.scram_iterations)
        } else {
            let (pw, iterations) = (password.clone(), target.scram_iterations);
            tokio::task::spawn_blocking(move || scram::verifier(&pw, iterations))
                .await
                .map_err(|_| ProviderError::Internal("computing the password verifier".into()))?
        };
        let groups: Vec<&str> = spec.roles.iter().map(|r| r.as_str()).collect();
        let create = create_role_sql(
            username,
            &verifier,
            &valid_until,
            spec.connection_limit,
            &groups,
        )?;
        drop(verifier);

        let mut conn = match target.admin_pool.acquire().await {
            Ok(c) => c,
            Err(e) => {
                // No connection, so no CREATE ROLE was sent: the undo may skip the server.
                self.never_created.insert(username.to_owned(), ()).await;
                return Err(classify("connecting to the target", &e));
            }
        };
        // Committed without waiting for its WAL flush (`synchronous_commit = off` for this one
        // implicit transaction): the role is visible to the job's login at once, and losing it
        // in a crash of the server only fails closed (the login fails; the revoke finds no role,
        // which is success). The durable intent in the broker's store is what the revocation
        // path rests on, and the revoke's `DROP ROLE` stays durable.
        let create = Sensitive::new(format!(
            "SET LOCAL synchronous_commit = off; {}",
            create.expose()
        ));
        if let Err(e) = run_batch(&mut conn, create.expose()).await {
            // The server refused the statement, which is atomic: no role exists, unless the
            // refusal is that the role already exists (then it must be dropped for real).
            if matches!(e, sqlx::Error::Database(_)) && sqlstate(&e).as_deref() != Some("42710") {
                self.never_created.insert(username.to_owned(), ()).await;
            }
            return Err(classify("creating the role", &e));
        }
        drop(conn);
        drop(create);
        if !extra.is_empty() {
            self.run_extra(&target, spec.database.as_str(), &extra)
                .await?;
        }

        let url = database_url(
            username,
            &password,
            &target.host,
            target.port,
            spec.database.as_str(),
            target.sslmode,
        );
        let secret_hash = crate::secret::sha256_hex(password.expose().as_bytes());
        Ok(Minted {
            fields: vec![
                ("host".into(), Field::Public(json!(target.host))),
                ("port".into(), Field::Public(json!(target.port))),
                (
                    "database".into(),
                    Field::Public(json!(spec.database.as_str())),
                ),
                ("username".into(), Field::Public(json!(username))),
                ("password".into(), Field::Secret(password)),
                ("expires_at".into(), Field::Public(json!(valid_until))),
                ("database_url".into(), Field::Secret(url)),
            ],
            expires_at: req.expires_at,
            details: json!({
                "target": spec.target,
                "database": spec.database.as_str(),
                "owner": spec.owner.as_str(),
                "username": username,
                "valid_until": valid_until,
                // What a leak report finds the grant by (the password itself is never kept).
                super::super::SECRET_HASH_KEY: secret_hash,
            }),
        })
    }

    /// The password is not kept, so a login cannot be tried; what the catalog shows is checked
    /// instead: no role of that name that can log in, and no session of it left.
    async fn verify_revoked(
        &self,
        credential: &IssuedCredential,
    ) -> crate::providers::Verification {
        use crate::providers::Verification;
        let username = credential.resource_id.as_str();
        let Ok(target) = detail_str(credential, "target").and_then(|t| self.target(t)) else {
            return Verification::Unverified("the credential names no configured target".into());
        };
        let row = sqlx::query_as::<_, (i64, i64)>(
            "SELECT (SELECT count(*) FROM pg_roles WHERE rolname = $1 AND rolcanlogin),
                    (SELECT count(*) FROM pg_stat_activity WHERE usename = $1)",
        )
        .bind(username)
        .fetch_one(&target.admin_pool)
        .await;
        match row {
            Ok((0, 0)) => Verification::Verified,
            Ok((logins, sessions)) => Verification::Unverified(format!(
                "role can log in: {}; sessions left: {sessions}",
                logins > 0
            )),
            Err(e) => Verification::Unverified(classify("checking the role", &e).to_string()),
        }
    }

    async fn revoke(&self, credential: &IssuedCredential) -> Result<(), ProviderError> {
        let username = credential.resource_id.as_str();
        if self.never_created.remove(username).await.is_some() {
            return Ok(());
        }
        let target = self.target(detail_str(credential, "target")?)?.clone();
        if !naming::is_ours(&target.prefix, username) {
            return Err(ProviderError::Misconfigured(format!(
                "refusing to drop a role without the prefix {:?} of target {:?}",
                target.prefix, target.name
            )));
        }
        let owner = quote_ident(detail_str(credential, "owner")?)
            .map_err(|_| ProviderError::Internal("owner name cannot be quoted".into()))?;
        let role = quote_ident(username)
            .map_err(|_| ProviderError::Internal("role name cannot be quoted".into()))?;
        // One round trip, two transactions, in the credential's database (where the job worked):
        // 1. Nothing new gets in: `NOLOGIN`, committed on its own before anything else runs, so
        //    no session can start after the ones step 2 ends. Committed without waiting for its
        //    WAL flush (visibility is what it needs): if the server crashed and lost it, the
        //    durable `DROP ROLE` that follows removes the role anyway, or the revoke fails and
        //    is retried.
        // 2. End live sessions (DROP ROLE would leave them running), hand over and drop what the
        //    role has there, drop the role: one implicit transaction. The common case (a role
        //    that only touched its own database) ends here. Postgres itself refuses the DROP
        //    ROLE while the role still holds something in another database or a shared object
        //    (2BP01); that transaction then rolls back and step 3 takes over.
        // `username` is `[a-z0-9_]` (checked by `is_ours`) and quoted as a literal; the owner
        // is an identifier. (`pg_stat_get_activity` rather than the `pg_stat_activity` view, and
        // the `regrole` cast rather than a join on `pg_roles`: a third of the database CPU per
        // revoke.)
        let lit = quote_literal(username)
            .map_err(|_| ProviderError::Internal("role name cannot be quoted".into()))?;
        let batch = format!(
            "BEGIN; SET LOCAL synchronous_commit = off; ALTER ROLE {role} NOLOGIN; COMMIT; \
             SELECT pg_terminate_backend(pid, {TERMINATE_WAIT_MS}) \
               FROM pg_stat_get_activity(NULL) WHERE usesysid = {lit}::regrole; \
             REASSIGN OWNED BY {role} TO {owner}; \
             DROP OWNED BY {role}; \
             DROP ROLE {role}"
        );
        let mut conn = match target
            .pool_for(detail_str(credential, "database")?)
            .acquire()
            .await
        {
            Ok(c) => c,
            // That database is gone: work from the admin database instead.
            Err(e) if sqlstate(&e).as_deref() == Some("3D000") => target
                .admin_pool
                .acquire()
                .await
                .map_err(|e| classify("connecting to the target", &e))?,
            Err(e) => return Err(classify("connecting to the credential's database", &e)),
        };
        let failed = match run_batch(&mut conn, &batch).await {
            Ok(_) => {
                tracing::debug!(role = %username, target = %target.name, "postgres role dropped");
                return Ok(());
            }
            Err(e) => e,
        };
        // An error in step 1 leaves the connection inside its aborted explicit transaction:
        // close it rather than hand it back to the pool.
        let _ = conn.close().await;
        match sqlstate(&failed).as_deref() {
            // Already gone (a concurrent or earlier revoke): gone is success.
            Some("42704") => return Ok(()),
            // It still holds something elsewhere: step 3.
            Some("2BP01") => {}
            _ => return Err(classify("disabling login and dropping the role", &failed)),
        }
        // 3. Disown it in every database `pg_shdepend` (a shared catalog) lists, then drop it.
        let elsewhere = format!(
            "SELECT DISTINCT d.datname::text FROM pg_shdepend s \
             JOIN pg_database d ON d.oid = s.dbid \
             WHERE s.refclassid = 'pg_authid'::regclass AND s.refobjid = {lit}::regrole \
               AND d.datallowconn"
        );
        let mut conn = target
            .admin_pool
            .acquire()
            .await
            .map_err(|e| classify("connecting to the target", &e))?;
        let rows = match run_batch(&mut conn, &elsewhere).await {
            Ok(rows) => rows,
            Err(e) if sqlstate(&e).as_deref() == Some("42704") => return Ok(()),
            Err(e) => return Err(classify("listing the role's databases", &e)),
        };
        drop(conn);
        let mut databases = Vec::with_capacity(rows.len());
        for r in rows {
            let d: String = r
                .try_get(0)
                .map_err(|_| ProviderError::Internal("reading pg_shdepend".into()))?;
            if !databases.contains(&d) {
                databases.push(d);
            }
        }
        for db in &databases {
            self.disown(&target, db, &role, &owner).await?;
        }
        // 4. The role itself.
        let mut conn = target
            .admin_pool
            .acquire()
            .await
            .map_err(|e| classify("connecting to the target", &e))?;
        let drop_role = format!("DROP ROLE IF EXISTS {role}");
        exec(&mut conn, &drop_role)
            .await
            .map_err(|e| classify("dropping the role", &e))?;
        tracing::debug!(role = %username, target = %target.name, databases = databases.len(), "postgres role dropped");
        Ok(())
    }

    async fn health(&self) -> Health {
        let mut down = Vec::new();
        for (name, t) in &self.targets {
            let ok = sqlx::query("SELECT 1").execute(&t.admin_pool).await.is_ok();
            if !ok {
                down.push(name.as_str());
            }
        }
        Health {
            ok: down.is_empty(),
            detail: (!down.is_empty()).then(|| format!("unreachable: {}", down.join(", "))),
        }
    }
}

/// Several statements in one round trip (simple query protocol), rows of the last one.
fn run_batch<'c>(
    conn: &'c mut sqlx::PgConnection,
    sql: &'c str,
) -> futures::future::BoxFuture<'c, Result<Vec<sqlx::postgres::PgRow>, sqlx::Error>> {
    // A bare string carries no arguments, so it goes as a simple query: several statements.
    Box::pin(async move { sqlx::Executor::fetch_all(conn, sql).await })
}

/// One statement, not prepared (role names differ every time).
fn exec<'c>(
    conn: &'c mut sqlx::PgConnection,
    sql: &'c str,
) -> futures::future::BoxFuture<'c, Result<(), sqlx::Error>> {
    Box::pin(async move {
        sqlx::query(sql)
            .persistent(false)
            .execute(conn)
            .await
            .map(|_| ())
    })
}

#[cfg(test)]
mod tests;

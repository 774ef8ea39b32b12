//! One behaviour suite, run against both backends: each case is an `async fn(Store)` and the
//! `store_tests!` macro instantiates a `#[tokio::test]` per backend for it. The cases are split
//! by topic; the shared builders and raw-SQL helpers are here.

use super::testdb::TestDb;
use super::*;
use crate::audit::{Action, Outcome};
use crate::secret::{random_token, sha256_hex};
use serde_json::json;
use sqlx::Row;

macro_rules! store_tests {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            use super::*;
            $(
                #[tokio::test]
                async fn $name() {
                    let db = TestDb::sqlite().await;
                    super::$name(db.store()).await;
                    db.cleanup().await;
                }
            )*
        }
        mod postgres {
            use super::*;
            $(
                #[tokio::test]
                async fn $name() {
                    let db = TestDb::postgres().await;
                    super::$name(db.store()).await;
                    db.cleanup().await;
                }
            )*
        }
    };
}

fn t(secs: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(1_700_000_000 + secs).unwrap()
}
/// A grant intent created at `t(created)` expiring at `t(expires)`, with two credentials.
fn new_grant(created: i64, expires: i64) -> NewGrant {
    let id = Uuid::now_v7();
    NewGrant {
        id,
        revocation_hash: sha256_hex(random_token(32).as_bytes()),
        issuer: "github".to_owned(),
        subject: "repo:acme/app:ref:refs/heads/main".to_owned(),
        repository: Some("acme/app".to_owned()),
        repository_id: Some("42".to_owned()),
        job: json!({"run_id": "1001", "run_attempt": "1"}),
        bundle_digest: "sha256:bundle".to_owned(),
        created_at: t(created),
        expires_at: t(expires),
        credentials: vec![
            IssuedCredential {
                name: "deploy".to_owned(),
                kind: CredentialKind::ApiToken,
                resource_id: format!("tok-{id}-0"),
                details: json!({"intent": 0}),
            },
            IssuedCredential {
                name: "read".to_owned(),
                kind: CredentialKind::ApiToken,
                resource_id: format!("tok-{id}-1"),
                details: serde_json::Value::Null,
            },
        ],
    }
}
fn jti(iss: &str, jti: &str, expires: i64) -> JtiRecord {
    JtiRecord {
        iss: iss.to_owned(),
        jti: jti.to_owned(),
        expires_at: t(expires),
    }
}
fn event(at: i64, action: Action, outcome: Outcome, grant: Option<Uuid>) -> AuditEvent {
    let mut e = AuditEvent::new(t(at), action, outcome, "ok");
    e.grant_id = grant;
    e
}
/// An audit filter with the fields `edit` sets.
fn af(edit: impl FnOnce(&mut AuditFilter)) -> AuditFilter {
    let mut f = AuditFilter::default();
    edit(&mut f);
    f
}

async fn begin_active(store: &Store, created: i64, expires: i64) -> NewGrant {
    let g = new_grant(created, expires);
    store.begin_grant(&g, None).await.unwrap();
    let details = vec![json!({"minted": 0}), json!({"minted": 1})];
    let ev = event(created, Action::Exchange, Outcome::Allow, Some(g.id));
    store
        .activate_grant(g.id, t(expires), &details, &ev)
        .await
        .unwrap();
    g
}
async fn status(store: &Store, id: Uuid) -> GrantStatus {
    store.grant(id).await.unwrap().unwrap().status
}
async fn events_for(store: &Store, id: Uuid) -> Vec<AuditEvent> {
    let filter = AuditFilter {
        grant_id: Some(id),
        ..AuditFilter::default()
    };
    store.audit_events(&filter).await.unwrap()
}
/// Every stored row of the grant, credential and audit tables, as text.
async fn dump_rows(store: &Store) -> String {
    let mut out = String::new();
    match &store.backend {
        Backend::Postgres(pool) => {
            for sql in [
                "SELECT row_to_json(x)::text AS r FROM grants x",
                "SELECT row_to_json(x)::text AS r FROM grant_credentials x",
                "SELECT row_to_json(x)::text AS r FROM audit_events x",
                "SELECT row_to_json(x)::text AS r FROM used_jti x",
            ] {
                for row in sqlx::query(sql).fetch_all(pool).await.unwrap() {
                    out.push_str(row.get::<&str, _>("r"));
                    out.push('\n');
                }
            }
        }
        Backend::Sqlite(pool) => {
            for table in ["grants", "grant_credentials", "audit_events", "used_jti"] {
                let sql = match table {
                    "grants" => "SELECT * FROM grants",
                    "grant_credentials" => "SELECT * FROM grant_credentials",
                    "audit_events" => "SELECT * FROM audit_events",
                    _ => "SELECT * FROM used_jti",
                };
                for row in sqlx::query(sql).fetch_all(pool).await.unwrap() {
                    for i in 0..row.len() {
                        if let Ok(Some(s)) = row.try_get::<Option<String>, _>(i) {
                            out.push_str(&s);
                        } else if let Ok(Some(n)) = row.try_get::<Option<i64>, _>(i) {
                            out.push_str(&n.to_string());
                        }
                        out.push('|');
                    }
                    out.push('\n');
                }
            }
        }
    }
    out
}
/// Run `$body` with `$pool` bound to whichever pool the store holds (raw driver access, as an
/// operator or attacker with database rights would have).
macro_rules! on_pool {
    ($store:expr, |$pool:ident| $body:expr) => {
        match &$store.backend {
            Backend::Postgres($pool) => $body,
            Backend::Sqlite($pool) => $body,
        }
    };
}

/// `count(*)` of `table`.
async fn count_rows(store: &Store, table: &str) -> i64 {
    let sql = format!("SELECT count(*) FROM {table}");
    on_pool!(store, |pool| sqlx::query_scalar(&sql)
        .fetch_one(pool)
        .await
        .unwrap())
}

async fn migration_count(store: &Store) -> i64 {
    count_rows(store, "_sqlx_migrations").await
}

async fn count_events(store: &Store) -> i64 {
    count_rows(store, "audit_events").await
}

/// Run SQL as an attacker with database rights would: with the append-only triggers out of the
/// way (Postgres: disabled; SQLite: dropped, as SQLite cannot disable a trigger).
async fn tamper(store: &Store, sql: &str) {
    let sql = match &store.backend {
        Backend::Postgres(_) => format!(
            "ALTER TABLE audit_events DISABLE TRIGGER USER; {sql}; \
             ALTER TABLE audit_events ENABLE TRIGGER USER;"
        ),
        Backend::Sqlite(_) => format!(
            "DROP TRIGGER IF EXISTS audit_events_no_update; \
             DROP TRIGGER IF EXISTS audit_events_no_delete; {sql};"
        ),
    };
    on_pool!(store, |pool| sqlx::raw_sql(&sql)
        .execute(pool)
        .await
        .map(|_| ()))
    .unwrap();
}

/// SQL with the triggers in place; returns the driver's error text, if any.
async fn try_sql(store: &Store, sql: &'static str) -> Option<String> {
    let r = on_pool!(store, |pool| sqlx::query(sql)
        .execute(pool)
        .await
        .map(|_| ()));
    r.err().map(|e| e.to_string())
}

/// Run `sql` inside a transaction that opened the prune path (the session flag / guard row), as
/// an attacker who read the prune code would.
async fn via_prune_path(store: &Store, sql: &str) -> Option<String> {
    let open = match &store.backend {
        Backend::Postgres(_) => "SELECT set_config('broker.audit_prune', 'on', true)",
        Backend::Sqlite(_) => "UPDATE audit_prune_guard SET active = 1",
    };
    let r = on_pool!(store, |pool| {
        let mut tx = pool.begin().await.unwrap();
        sqlx::query(open).execute(&mut *tx).await.unwrap();
        match sqlx::raw_sql(sql).execute(&mut *tx).await {
            Ok(_) => tx.commit().await,
            Err(e) => Err(e),
        }
    });
    r.err().map(|e| e.to_string())
}

/// Five chained events (one through a grant's activation); returns their (seq, id) oldest first.
async fn chained_events(store: &Store) -> Vec<(i64, String)> {
    let mut e = event(1, Action::Exchange, Outcome::Deny, None);
    e.reason = "policy_denied".into();
    e.job.repository = Some("acme/app".into());
    e.request_id = Some("req-1".into());
    store.append_audit(&e).await.unwrap();
    begin_active(store, 2, 600).await;
    for at in 3..6 {
        let mut e = event(at, Action::Admin, Outcome::Success, Some(Uuid::now_v7()));
        e.actor = Some("operator:alice".into());
        store.append_audit(&e).await.unwrap();
    }
    let sql = "SELECT seq, CAST(id AS TEXT) AS id FROM audit_events ORDER BY seq";
    let rows: Vec<(i64, String)> = on_pool!(store, |pool| sqlx::query(sql)
        .fetch_all(pool)
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get::<i64, _>("seq"), r.get::<String, _>("id")))
        .collect());
    assert_eq!(rows.len(), 5);
    rows
}

/// Edit the `actor` column of the event at `seq` (leaving its JSON alone) and return the break
/// the walk reports.
async fn edit_actor(store: &Store, seq: i64) -> ChainBreak {
    let sql = format!("UPDATE audit_events SET actor = 'job' WHERE seq = {seq}");
    tamper(store, &sql).await;
    broken(store).await
}

async fn broken(store: &Store) -> ChainBreak {
    let report = store.verify_audit_chain().await.unwrap();
    assert!(!report.is_intact());
    report.broken.unwrap()
}

mod audit;
mod chain_breaks;
mod lifecycle;
mod prune;
mod records;
mod revoke;
mod scale;

//! One behaviour suite, run against both backends: each case is an `async fn(Store)` and the
//! `store_tests!` macro instantiates a `#[tokio::test]` per backend for it.

use super::testdb::TestDb;
use super::*;
use crate::audit::{Action, Outcome};
use crate::secret::{random_token, sha256_hex};
use serde_json::json;
use sqlx::Row;

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

async fn migration_count(store: &Store) -> i64 {
    let sql = "SELECT count(*) FROM _sqlx_migrations";
    match &store.backend {
        Backend::Postgres(pool) => sqlx::query_scalar(sql).fetch_one(pool).await.unwrap(),
        Backend::Sqlite(pool) => sqlx::query_scalar(sql).fetch_one(pool).await.unwrap(),
    }
}

// ---- the suite ----------------------------------------------------------------------------

async fn migrate_twice_is_a_no_op(store: Store) {
    let before = migration_count(&store).await;
    assert!(before >= 1);
    store.migrate().await.unwrap();
    store.migrate().await.unwrap();
    assert_eq!(migration_count(&store).await, before);
    store.ping().await.unwrap();
}

async fn begin_then_activate_reads_back(store: Store) {
    let g = new_grant(0, 600);
    store.begin_grant(&g, None).await.unwrap();

    let issuing = store.grant(g.id).await.unwrap().unwrap();
    assert_eq!(issuing.status, GrantStatus::Issuing);
    assert_eq!(
        issuing.credentials, g.credentials,
        "intent credentials, in order"
    );
    assert_eq!(issuing.created_at, t(0));
    assert_eq!(issuing.revoked_at, None);
    assert_eq!(issuing.revoke_attempts, 0);

    let details = vec![json!({"token_id": "a"}), json!({"token_id": "b"})];
    let ev = event(1, Action::Exchange, Outcome::Allow, Some(g.id));
    store
        .activate_grant(g.id, t(900), &details, &ev)
        .await
        .unwrap();

    let active = store.grant(g.id).await.unwrap().unwrap();
    assert_eq!(active.status, GrantStatus::Active);
    assert_eq!(
        active.expires_at,
        t(900),
        "final expiry replaces the intent's"
    );
    assert_eq!(active.issuer, "github");
    assert_eq!(active.subject, g.subject);
    assert_eq!(active.repository.as_deref(), Some("acme/app"));
    assert_eq!(active.repository_id.as_deref(), Some("42"));
    assert_eq!(active.job, g.job);
    assert_eq!(active.bundle_digest, "sha256:bundle");
    let got: Vec<_> = active
        .credentials
        .iter()
        .map(|c| c.details.clone())
        .collect();
    assert_eq!(got, details);
    assert_eq!(active.credentials[1].name, "read");

    assert_eq!(events_for(&store, g.id).await, vec![ev]);
    assert_eq!(store.grant(Uuid::now_v7()).await.unwrap(), None);
}

async fn replayed_jti_is_refused_until_it_expires(store: Store) {
    let iss = "https://token.actions.githubusercontent.com";
    let first = new_grant(0, 600);
    store
        .begin_grant(&first, Some(&jti(iss, "j1", 100)))
        .await
        .unwrap();

    // Same (iss, jti) inside its window: refused, and nothing of the second grant is written.
    let second = new_grant(10, 600);
    let err = store
        .begin_grant(&second, Some(&jti(iss, "j1", 100)))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Replayed), "{err:?}");
    assert_eq!(err.reason_code(), "token_replayed");
    assert_eq!(store.grant(second.id).await.unwrap(), None);

    // Another issuer with the same jti is a different token.
    store
        .begin_grant(&second, Some(&jti("https://gitlab.example", "j1", 100)))
        .await
        .unwrap();

    // Past the window the record is replaced.
    let third = new_grant(200, 800);
    store
        .begin_grant(&third, Some(&jti(iss, "j1", 300)))
        .await
        .unwrap();
    let fourth = new_grant(250, 800);
    let err = store
        .begin_grant(&fourth, Some(&jti(iss, "j1", 300)))
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Replayed),
        "the replaced record has the new window"
    );
}

async fn failed_grant_releases_its_jti(store: Store) {
    let iss = "https://issuer";
    let g = new_grant(0, 600);
    store
        .begin_grant(&g, Some(&jti(iss, "k", 100)))
        .await
        .unwrap();
    let ev = event(5, Action::Exchange, Outcome::Error, Some(g.id));
    store
        .fail_grant(g.id, Some(&jti(iss, "k", 100)), &ev)
        .await
        .unwrap();

    let failed = store.grant(g.id).await.unwrap().unwrap();
    assert_eq!(failed.status, GrantStatus::Failed);
    assert_eq!(failed.revoked_at, Some(t(5)));
    assert_eq!(events_for(&store, g.id).await, vec![ev.clone()]);

    // The token was not consumed: it can be exchanged again.
    store
        .begin_grant(&new_grant(6, 600), Some(&jti(iss, "k", 100)))
        .await
        .unwrap();

    // Failing again is a conflict.
    let err = store.fail_grant(g.id, None, &ev).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
}

async fn transitions_are_compare_and_set(store: Store) {
    let g = new_grant(0, 600);
    store.begin_grant(&g, None).await.unwrap();

    // Wrong number of details: refused and rolled back (still issuing, no audit row).
    let ev = event(1, Action::Exchange, Outcome::Allow, Some(g.id));
    let err = store
        .activate_grant(g.id, t(600), &[json!(1)], &ev)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    assert_eq!(status(&store, g.id).await, GrantStatus::Issuing);
    assert!(events_for(&store, g.id).await.is_empty());

    let details = [json!(1), json!(2)];
    store
        .activate_grant(g.id, t(600), &details, &ev)
        .await
        .unwrap();
    let ev2 = event(2, Action::Exchange, Outcome::Allow, Some(g.id));
    let err = store
        .activate_grant(g.id, t(600), &details, &ev2)
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Conflict(_)),
        "activate twice: {err:?}"
    );
    let err = store.fail_grant(g.id, None, &ev2).await.unwrap_err();
    assert!(
        matches!(err, StoreError::Conflict(_)),
        "fail an active grant: {err:?}"
    );
    let err = store
        .finish_revoke(g.id, RevokeCause::Requested, t(3), &ev2)
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Conflict(_)),
        "finish without a claim: {err:?}"
    );
    let err = store
        .revoke_failed(g.id, "x", t(3), &ev2)
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Conflict(_)),
        "fail a revoke without a claim: {err:?}"
    );
    assert_eq!(
        events_for(&store, g.id).await,
        vec![ev],
        "refused transitions leave no audit"
    );

    let err = store
        .activate_grant(Uuid::now_v7(), t(600), &[], &ev2)
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Conflict(_)),
        "unknown grant: {err:?}"
    );
}

async fn duplicates_are_conflicts_and_roll_back(store: Store) {
    let g = new_grant(0, 600);
    store.begin_grant(&g, None).await.unwrap();

    // Same revocation hash.
    let mut dup = new_grant(0, 600);
    dup.revocation_hash = g.revocation_hash.clone();
    let err = store
        .begin_grant(&dup, Some(&jti("i", "dup", 100)))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");

    // Same credential resource id.
    let mut dup = new_grant(0, 600);
    dup.credentials[0].resource_id = g.credentials[0].resource_id.clone();
    let err = store
        .begin_grant(&dup, Some(&jti("i", "dup", 100)))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    assert_eq!(store.grant(dup.id).await.unwrap(), None);

    // Both attempts rolled back their jti record too.
    store
        .begin_grant(&new_grant(1, 600), Some(&jti("i", "dup", 100)))
        .await
        .unwrap();
}

async fn grant_by_revocation_hash_finds_it(store: Store) {
    let token = random_token(32);
    let mut g = new_grant(0, 600);
    g.revocation_hash = sha256_hex(token.as_bytes());
    store.begin_grant(&g, None).await.unwrap();
    let found = store
        .grant_by_revocation_hash(&sha256_hex(token.as_bytes()))
        .await
        .unwrap();
    assert_eq!(found.map(|f| f.id), Some(g.id));
    assert_eq!(
        store
            .grant_by_revocation_hash(&sha256_hex(b"other"))
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        store
            .grant_status_by_revocation_hash(&sha256_hex(token.as_bytes()))
            .await
            .unwrap(),
        Some((g.id, GrantStatus::Issuing))
    );
    assert_eq!(
        store
            .grant_status_by_revocation_hash(&sha256_hex(b"other"))
            .await
            .unwrap(),
        None
    );
}

async fn no_secret_is_stored(store: Store) {
    // The store only ever receives the hash of the revocation token; check the hash column
    // round-trips and the token itself appears nowhere after a whole lifecycle.
    let token = random_token(32);
    let hash = sha256_hex(token.as_bytes());
    let mut g = new_grant(0, 600);
    g.revocation_hash = hash.clone();
    store
        .begin_grant(&g, Some(&jti("iss", "jti-1", 600)))
        .await
        .unwrap();
    let ev = event(0, Action::Exchange, Outcome::Allow, Some(g.id));
    store
        .activate_grant(g.id, t(600), &[json!({}), json!({})], &ev)
        .await
        .unwrap();
    let claimed = store
        .claim_for_revoke(g.id, t(10), Duration::seconds(30))
        .await
        .unwrap();
    assert!(claimed.is_some());
    let ev = event(10, Action::Revoke, Outcome::Success, Some(g.id));
    store
        .finish_revoke(g.id, RevokeCause::Requested, t(10), &ev)
        .await
        .unwrap();

    let rows = dump_rows(&store).await;
    assert!(rows.contains(&hash), "the hash column is stored as given");
    assert!(
        !rows.contains(&token),
        "the revocation token must never be stored"
    );
    let found = store
        .grant_by_revocation_hash(&hash)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(found.id, g.id);
}

async fn credential_status_follows_the_lifecycle(store: Store) {
    let kind = CredentialKind::ApiToken;
    assert_eq!(store.credential_status(kind, "nope").await.unwrap(), None);

    let g = new_grant(0, 600);
    let rid = g.credentials[1].resource_id.clone();
    store.begin_grant(&g, None).await.unwrap();
    let st = store.credential_status(kind, &rid).await.unwrap().unwrap();
    assert_eq!(
        (st.grant_id, st.grant_status, st.expires_at),
        (g.id, GrantStatus::Issuing, t(600))
    );

    let ev = event(1, Action::Exchange, Outcome::Allow, Some(g.id));
    store
        .activate_grant(g.id, t(700), &[json!(0), json!(1)], &ev)
        .await
        .unwrap();
    let st = store.credential_status(kind, &rid).await.unwrap().unwrap();
    assert_eq!(
        (st.grant_status, st.expires_at),
        (GrantStatus::Active, t(700))
    );

    store
        .claim_for_revoke(g.id, t(2), Duration::seconds(30))
        .await
        .unwrap()
        .unwrap();
    let st = store.credential_status(kind, &rid).await.unwrap().unwrap();
    assert_eq!(st.grant_status, GrantStatus::Revoking);

    let ev = event(3, Action::Revoke, Outcome::Success, Some(g.id));
    store
        .finish_revoke(g.id, RevokeCause::Requested, t(3), &ev)
        .await
        .unwrap();
    let st = store.credential_status(kind, &rid).await.unwrap().unwrap();
    assert_eq!(st.grant_status, GrantStatus::Revoked);
}

async fn claim_for_revoke_is_idempotent(store: Store) {
    let lease = Duration::seconds(30);
    let g = begin_active(&store, 0, 600).await;

    let claimed = store
        .claim_for_revoke(g.id, t(10), lease)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(claimed.cause, RevokeCause::Requested);
    assert_eq!(claimed.grant.status, GrantStatus::Revoking);
    assert_eq!(claimed.grant.credentials.len(), 2);
    assert_eq!(claimed.grant.credentials[0].details, json!({"minted": 0}));

    // A live lease: nobody else gets it.
    assert_eq!(
        store.claim_for_revoke(g.id, t(20), lease).await.unwrap(),
        None
    );
    // The lease ran out (worker died): claimable again, same cause.
    let again = store
        .claim_for_revoke(g.id, t(40), lease)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(again.cause, RevokeCause::Requested);

    let ev = event(41, Action::Revoke, Outcome::Success, Some(g.id));
    store
        .finish_revoke(g.id, RevokeCause::Requested, t(41), &ev)
        .await
        .unwrap();
    assert_eq!(
        store.claim_for_revoke(g.id, t(1000), lease).await.unwrap(),
        None,
        "final"
    );
    assert_eq!(
        store
            .claim_for_revoke(Uuid::now_v7(), t(0), lease)
            .await
            .unwrap(),
        None
    );

    // An issuing grant can be claimed too (revoke while minting).
    let issuing = new_grant(0, 600);
    store.begin_grant(&issuing, None).await.unwrap();
    let c = store
        .claim_for_revoke(issuing.id, t(1), lease)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(c.cause, RevokeCause::Requested);
}

async fn claim_for_revoke_respects_the_reaper(store: Store) {
    let lease = Duration::seconds(30);
    let g = begin_active(&store, 0, 100).await;
    let claimed = store.claim_due(t(100), t(-1000), lease, 10).await.unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].cause, RevokeCause::Expired);

    // The reaper holds a live lease.
    assert_eq!(
        store.claim_for_revoke(g.id, t(110), lease).await.unwrap(),
        None
    );
    // Once it lapses, the request takes over but the recorded cause survives.
    let taken = store
        .claim_for_revoke(g.id, t(131), lease)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(taken.cause, RevokeCause::Expired);
}

async fn claim_due_picks_what_the_reaper_must_handle(store: Store) {
    let lease = Duration::seconds(30);
    let expired = begin_active(&store, 0, 50).await;
    let live = begin_active(&store, 0, 500).await;
    let stale = new_grant(0, 600);
    store.begin_grant(&stale, None).await.unwrap();
    let fresh = new_grant(90, 600);
    store.begin_grant(&fresh, None).await.unwrap();

    let now = t(100);
    let mut claimed = store.claim_due(now, t(60), lease, 100).await.unwrap();
    claimed.sort_by_key(|c| c.grant.id);
    let mut want = vec![
        (expired.id, RevokeCause::Expired),
        (stale.id, RevokeCause::Recovery),
    ];
    want.sort_by_key(|w| w.0);
    let got: Vec<_> = claimed.iter().map(|c| (c.grant.id, c.cause)).collect();
    assert_eq!(got, want);
    assert!(
        claimed
            .iter()
            .all(|c| c.grant.status == GrantStatus::Revoking)
    );
    assert!(claimed.iter().all(|c| c.grant.credentials.len() == 2));
    assert_eq!(status(&store, live.id).await, GrantStatus::Active);
    assert_eq!(status(&store, fresh.id).await, GrantStatus::Issuing);

    // Leases are live: nothing more to claim.
    assert!(
        store
            .claim_due(now, t(60), lease, 100)
            .await
            .unwrap()
            .is_empty()
    );

    // After the leases run out both come back, with their original causes.
    let mut again = store.claim_due(t(130), t(60), lease, 100).await.unwrap();
    again.sort_by_key(|c| c.grant.id);
    let got: Vec<_> = again.iter().map(|c| (c.grant.id, c.cause)).collect();
    assert_eq!(got, want);
}

async fn claim_due_honours_the_limit(store: Store) {
    for _ in 0..5 {
        begin_active(&store, 0, 10).await;
    }
    let lease = Duration::seconds(30);
    assert_eq!(
        store.claim_due(t(20), t(0), lease, 2).await.unwrap().len(),
        2
    );
    assert_eq!(
        store.claim_due(t(20), t(0), lease, 2).await.unwrap().len(),
        2
    );
    assert_eq!(
        store.claim_due(t(20), t(0), lease, 2).await.unwrap().len(),
        1
    );
    assert_eq!(
        store.claim_due(t(20), t(0), lease, 2).await.unwrap().len(),
        0
    );
}

async fn revoke_failed_is_retried_with_the_original_cause(store: Store) {
    let lease = Duration::seconds(30);
    let g = begin_active(&store, 0, 50).await;
    let claimed = store.claim_due(t(100), t(0), lease, 10).await.unwrap();
    assert_eq!(claimed.len(), 1);

    let ev = event(101, Action::RevokeFailed, Outcome::Failure, Some(g.id));
    store
        .revoke_failed(g.id, "target unavailable", t(200), &ev)
        .await
        .unwrap();
    let grant = store.grant(g.id).await.unwrap().unwrap();
    assert_eq!(grant.status, GrantStatus::Revoking);
    assert_eq!(grant.revoke_attempts, 1);
    assert_eq!(grant.last_error.as_deref(), Some("target unavailable"));
    assert_eq!(store.stats().await.unwrap().revoke_failures_pending, 1);

    // The first lease (t(130)) is over but the retry time is not.
    assert!(
        store
            .claim_due(t(150), t(0), lease, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        store.claim_for_revoke(g.id, t(150), lease).await.unwrap(),
        None
    );

    let retry = store.claim_due(t(200), t(0), lease, 10).await.unwrap();
    assert_eq!(retry.len(), 1);
    assert_eq!(retry[0].cause, RevokeCause::Expired);
    assert_eq!(retry[0].grant.revoke_attempts, 1);

    let long = "e".repeat(5000);
    let ev2 = event(201, Action::RevokeFailed, Outcome::Failure, Some(g.id));
    store
        .revoke_failed(g.id, &long, t(300), &ev2)
        .await
        .unwrap();
    let grant = store.grant(g.id).await.unwrap().unwrap();
    assert_eq!(grant.revoke_attempts, 2);
    assert!(
        grant.last_error.unwrap().len() <= 1024,
        "error text is clipped"
    );

    let retry = store.claim_due(t(300), t(0), lease, 10).await.unwrap();
    assert_eq!(retry[0].cause, RevokeCause::Expired);
    let ev3 = event(301, Action::Expire, Outcome::Success, Some(g.id));
    store
        .finish_revoke(g.id, retry[0].cause, t(301), &ev3)
        .await
        .unwrap();
    let done = store.grant(g.id).await.unwrap().unwrap();
    assert_eq!(done.status, GrantStatus::Expired);
    assert_eq!(done.revoked_at, Some(t(301)));
    assert_eq!(store.stats().await.unwrap().revoke_failures_pending, 0);

    let kinds: Vec<_> = events_for(&store, g.id)
        .await
        .iter()
        .map(|e| e.action)
        .collect();
    assert_eq!(
        kinds,
        vec![
            Action::Expire,
            Action::RevokeFailed,
            Action::RevokeFailed,
            Action::Exchange
        ],
        "newest first, one per transition"
    );
}

async fn finish_revoke_sets_the_final_status_per_cause(store: Store) {
    let lease = Duration::seconds(30);
    let requested = begin_active(&store, 0, 600).await;
    let expired = begin_active(&store, 0, 50).await;
    let crashed = new_grant(0, 600);
    store.begin_grant(&crashed, None).await.unwrap();

    store
        .claim_for_revoke(requested.id, t(100), lease)
        .await
        .unwrap()
        .unwrap();
    let due = store.claim_due(t(100), t(10), lease, 10).await.unwrap();
    assert_eq!(due.len(), 2);

    let cases = [
        (requested.id, RevokeCause::Requested, GrantStatus::Revoked),
        (expired.id, RevokeCause::Expired, GrantStatus::Expired),
        (crashed.id, RevokeCause::Recovery, GrantStatus::Failed),
    ];
    for (id, cause, want) in cases {
        let ev = event(110, Action::Revoke, Outcome::Success, Some(id));
        store.finish_revoke(id, cause, t(110), &ev).await.unwrap();
        let g = store.grant(id).await.unwrap().unwrap();
        assert_eq!(g.status, want);
        assert!(g.status.is_final());
        assert_eq!(g.revoked_at, Some(t(110)));
        let err = store
            .finish_revoke(id, cause, t(111), &ev)
            .await
            .unwrap_err();
        assert!(
            matches!(err, StoreError::Conflict(_)),
            "finish twice: {err:?}"
        );
    }
}

/// Every `GET /v1/audit` filter narrows the result in SQL, alone and combined.
async fn audit_filters_each_narrow(store: Store) {
    // A grant holding a postgres credential, so the kind filter has something to tell apart.
    let mut pg = new_grant(0, 100);
    pg.credentials[1].kind = CredentialKind::Postgres;
    store.begin_grant(&pg, None).await.unwrap();
    let tok = new_grant(0, 100);
    store.begin_grant(&tok, None).await.unwrap();

    let mut a = event(10, Action::Exchange, Outcome::Allow, Some(pg.id));
    a.job.repository = Some("acme/app".into());
    a.job.repository_id = Some("42".into());
    a.credentials_requested = vec!["deploy".into(), "db".into()];
    a.credentials_granted = vec!["deploy".into(), "db".into()];
    a.request_id = Some("req-a".into());
    let mut b = event(20, Action::Exchange, Outcome::Deny, None);
    b.reason = "policy_denied".into();
    b.job.repository = Some("acme/other".into());
    b.job.repository_id = Some("43".into());
    b.credentials_requested = vec!["admin".into()];
    let mut c = event(30, Action::Revoke, Outcome::Success, Some(tok.id));
    c.actor = Some("job".into());
    c.job.repository = Some("acme/app".into());
    c.job.repository_id = Some("42".into());
    let mut d = event(40, Action::Admin, Outcome::Success, None);
    d.actor = Some("operator:alice".into());
    d.reason = "revoke_all".into();
    for e in [&a, &b, &c, &d] {
        store.append_audit(e).await.unwrap();
    }
    let ids = |f: AuditFilter| {
        let store = store.clone();
        async move {
            let got = store.audit_page(&f).await.unwrap();
            got.records
                .into_iter()
                .map(|r| r.event.id)
                .collect::<Vec<_>>()
        }
    };
    let f = AuditFilter::default;
    assert_eq!(ids(f()).await, vec![d.id, c.id, b.id, a.id]);
    assert_eq!(
        ids(AuditFilter {
            until: Some(t(30)),
            ..f()
        })
        .await,
        vec![b.id, a.id],
        "until is exclusive"
    );
    assert_eq!(
        ids(AuditFilter {
            since: Some(t(20)),
            until: Some(t(40)),
            ..f()
        })
        .await,
        vec![c.id, b.id]
    );
    assert_eq!(
        ids(AuditFilter {
            repository_id: Some("42".into()),
            ..f()
        })
        .await,
        vec![c.id, a.id]
    );
    assert_eq!(
        ids(AuditFilter {
            repository: Some("acme/other".into()),
            ..f()
        })
        .await,
        vec![b.id]
    );
    assert_eq!(
        ids(AuditFilter {
            actor: Some("operator:alice".into()),
            ..f()
        })
        .await,
        vec![d.id]
    );
    assert_eq!(
        ids(AuditFilter {
            credential: Some("db".into()),
            ..f()
        })
        .await,
        vec![a.id],
        "granted credential"
    );
    assert_eq!(
        ids(AuditFilter {
            credential: Some("admin".into()),
            ..f()
        })
        .await,
        vec![b.id],
        "requested (denied) credential"
    );
    assert_eq!(
        ids(AuditFilter {
            credential: Some("nope".into()),
            ..f()
        })
        .await,
        Vec::<Uuid>::new()
    );
    assert_eq!(
        ids(AuditFilter {
            kind: Some("postgres".into()),
            ..f()
        })
        .await,
        vec![a.id]
    );
    assert_eq!(
        ids(AuditFilter {
            kind: Some("api_token".into()),
            ..f()
        })
        .await,
        vec![c.id, a.id]
    );
    assert_eq!(
        ids(AuditFilter {
            outcome: Some("success".into()),
            ..f()
        })
        .await,
        vec![d.id, c.id]
    );
    assert_eq!(
        ids(AuditFilter {
            reason: Some("policy_denied".into()),
            ..f()
        })
        .await,
        vec![b.id]
    );
    assert_eq!(
        ids(AuditFilter {
            grant_id: Some(tok.id),
            ..f()
        })
        .await,
        vec![c.id]
    );
    assert_eq!(
        ids(AuditFilter {
            request_id: Some("req-a".into()),
            ..f()
        })
        .await,
        vec![a.id]
    );
    assert_eq!(
        ids(AuditFilter {
            repository_id: Some("42".into()),
            outcome: Some("allow".into()),
            ..f()
        })
        .await,
        vec![a.id],
        "filters combine with AND"
    );
    // A value that looks like SQL is just a value.
    assert_eq!(
        ids(AuditFilter {
            actor: Some("x' OR '1'='1".into()),
            ..f()
        })
        .await,
        Vec::<Uuid>::new()
    );
}

/// Pages follow each other newest first with no duplicate and no gap, also across events that
/// share a time, and the last page has no cursor.
async fn audit_pages_have_no_gaps_or_duplicates(store: Store) {
    let mut appended = Vec::new();
    for i in 0..23 {
        // Three events per second, so page boundaries fall inside a shared time.
        let mut e = event(i / 3, Action::Exchange, Outcome::Allow, None);
        e.job.repository = Some(if i % 2 == 0 { "acme/app" } else { "acme/b" }.into());
        store.append_audit(&e).await.unwrap();
        appended.push(e);
    }
    let newest_first: Vec<Uuid> = appended.iter().rev().map(|e| e.id).collect();
    for (limit, repo) in [
        (5, None),
        (3, None),
        (1, None),
        (23, None),
        (4, Some("acme/app")),
    ] {
        let mut got = Vec::new();
        let mut cursor = None;
        let mut pages = 0;
        loop {
            let page = store
                .audit_page(&AuditFilter {
                    limit,
                    cursor,
                    repository: repo.map(str::to_owned),
                    ..AuditFilter::default()
                })
                .await
                .unwrap();
            pages += 1;
            assert!(page.records.len() <= limit as usize);
            got.extend(page.records.iter().map(|r| r.event.id));
            match page.next_cursor {
                Some(c) => {
                    assert_eq!(Some(c), page.records.last().map(|r| r.seq));
                    cursor = Some(c);
                }
                None => break,
            }
            assert!(pages < 100, "pagination does not end");
        }
        let want: Vec<Uuid> = match repo {
            None => newest_first.clone(),
            Some(r) => appended
                .iter()
                .rev()
                .filter(|e| e.job.repository.as_deref() == Some(r))
                .map(|e| e.id)
                .collect(),
        };
        assert_eq!(got, want, "limit {limit}, repository {repo:?}");
        let expected_pages = want.len().div_ceil(limit as usize);
        assert_eq!(pages, expected_pages, "no empty trailing page");
    }
    // An unknown cursor matches nothing rather than restarting from the top.
    let page = store
        .audit_page(&AuditFilter {
            cursor: Some(999_999),
            ..AuditFilter::default()
        })
        .await
        .unwrap();
    assert!(page.records.is_empty());
    assert_eq!(page.next_cursor, None);
}

async fn audit_events_filter_and_order(store: Store) {
    let g1 = Uuid::now_v7();
    let mut a = event(10, Action::Exchange, Outcome::Allow, Some(g1));
    a.request_id = Some("req-1".to_owned());
    a.job.repository = Some("acme/app".to_owned());
    let mut b = event(20, Action::Exchange, Outcome::Deny, None);
    b.reason = "policy_denied".to_owned();
    b.request_id = Some("req-2".to_owned());
    b.job.repository = Some("acme/other".to_owned());
    let mut c = event(30, Action::Revoke, Outcome::Success, Some(g1));
    c.actor = Some("job".to_owned());
    c.job.repository = Some("acme/app".to_owned());
    // Same time as c, appended later: comes first (ties broken by insertion order).
    let d = event(30, Action::Admin, Outcome::Success, None);
    for e in [&a, &b, &c, &d] {
        store.append_audit(e).await.unwrap();
    }

    let all = store.audit_events(&AuditFilter::default()).await.unwrap();
    assert_eq!(
        all,
        vec![d.clone(), c.clone(), b.clone(), a.clone()],
        "newest first, whole events"
    );

    let by = |f: AuditFilter| {
        let store = store.clone();
        async move {
            let got = store.audit_events(&f).await.unwrap();
            got.into_iter().map(|e| e.id).collect::<Vec<_>>()
        }
    };
    assert_eq!(
        by(AuditFilter {
            grant_id: Some(g1),
            ..Default::default()
        })
        .await,
        vec![c.id, a.id]
    );
    assert_eq!(
        by(AuditFilter {
            request_id: Some("req-2".into()),
            ..Default::default()
        })
        .await,
        vec![b.id]
    );
    assert_eq!(
        by(AuditFilter {
            repository: Some("acme/app".into()),
            ..Default::default()
        })
        .await,
        vec![c.id, a.id]
    );
    assert_eq!(
        by(AuditFilter {
            outcome: Some("deny".into()),
            ..Default::default()
        })
        .await,
        vec![b.id]
    );
    assert_eq!(
        by(AuditFilter {
            reason: Some("policy_denied".into()),
            ..Default::default()
        })
        .await,
        vec![b.id]
    );
    assert_eq!(
        by(AuditFilter {
            since: Some(t(20)),
            ..Default::default()
        })
        .await,
        vec![d.id, c.id, b.id]
    );
    assert_eq!(
        by(AuditFilter {
            limit: 2,
            ..Default::default()
        })
        .await,
        vec![d.id, c.id]
    );
    assert_eq!(
        by(AuditFilter {
            grant_id: Some(g1),
            outcome: Some("allow".into()),
            ..Default::default()
        })
        .await,
        vec![a.id]
    );
    assert!(
        by(AuditFilter {
            grant_id: Some(Uuid::now_v7()),
            ..Default::default()
        })
        .await
        .is_empty()
    );

    // Duplicate event ids are refused rather than silently doubled.
    let err = store.append_audit(&a).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
}

async fn stats_count_grants(store: Store) {
    assert_eq!(store.stats().await.unwrap(), StoreStats::default());
    let a = begin_active(&store, 0, 600).await;
    begin_active(&store, 0, 600).await;
    store.begin_grant(&new_grant(0, 600), None).await.unwrap();
    assert_eq!(
        store.stats().await.unwrap(),
        StoreStats {
            active_grants: 2,
            issuing_grants: 1,
            revoke_failures_pending: 0
        }
    );
    store
        .claim_for_revoke(a.id, t(1), Duration::seconds(30))
        .await
        .unwrap()
        .unwrap();
    let ev = event(1, Action::RevokeFailed, Outcome::Failure, Some(a.id));
    store.revoke_failed(a.id, "down", t(60), &ev).await.unwrap();
    assert_eq!(
        store.stats().await.unwrap(),
        StoreStats {
            active_grants: 1,
            issuing_grants: 1,
            revoke_failures_pending: 1
        }
    );
}

async fn active_grants_oldest_first(store: Store) {
    let old = begin_active(&store, 0, 600).await;
    let mid = begin_active(&store, 10, 600).await;
    let new = begin_active(&store, 20, 600).await;
    store.begin_grant(&new_grant(5, 600), None).await.unwrap(); // issuing: not listed
    store
        .claim_for_revoke(mid.id, t(30), Duration::seconds(30))
        .await
        .unwrap()
        .unwrap();

    let got: Vec<_> = store
        .active_grants(10)
        .await
        .unwrap()
        .iter()
        .map(|g| g.id)
        .collect();
    assert_eq!(got, vec![old.id, new.id]);
    let first = store.active_grants(1).await.unwrap();
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].id, old.id);
    assert_eq!(first[0].credentials.len(), 2);
}

/// `/metrics` gauges: active grants per kind (a grant counted once per kind however many
/// credentials of it it holds), and the oldest expired grant not yet revoked (active or
/// revoking), ignoring ones that are still valid, issuing or finished.
async fn gauges_count_active_by_kind_and_find_the_oldest_overdue(store: Store) {
    let empty = store.gauges(t(0)).await.unwrap();
    assert_eq!(empty, crate::store::StoreGauges::default());
    let overdue_old = begin_active(&store, 0, 100).await;
    let overdue_revoking = begin_active(&store, 0, 200).await;
    let _valid = begin_active(&store, 0, 10_000).await;
    let finished = begin_active(&store, 0, 50).await;
    store.begin_grant(&new_grant(0, 20), None).await.unwrap(); // issuing: not counted
    store
        .claim_for_revoke(overdue_revoking.id, t(300), Duration::seconds(30))
        .await
        .unwrap()
        .unwrap();
    let claimed = store
        .claim_for_revoke(finished.id, t(300), Duration::seconds(30))
        .await
        .unwrap()
        .unwrap();
    let ev = event(300, Action::Revoke, Outcome::Success, Some(finished.id));
    store
        .finish_revoke(finished.id, claimed.cause, t(300), &ev)
        .await
        .unwrap();
    let g = store.gauges(t(1_000)).await.unwrap();
    assert_eq!(g.active_by_kind, vec![("api_token".to_owned(), 2)]);
    assert_eq!(g.oldest_overdue, Some(t(100)), "{:?}", overdue_old.id);
    // Before anything expired, nothing is overdue.
    assert_eq!(store.gauges(t(99)).await.unwrap().oldest_overdue, None);
}

async fn purge_jti_removes_only_past_windows(store: Store) {
    for (i, exp) in [10, 20, 30].into_iter().enumerate() {
        store
            .begin_grant(&new_grant(0, 600), Some(&jti("iss", &format!("j{i}"), exp)))
            .await
            .unwrap();
    }
    assert_eq!(store.purge_jti(t(20)).await.unwrap(), 2);
    assert_eq!(store.purge_jti(t(20)).await.unwrap(), 0);
    // j2 is still recorded: replay refused inside its window.
    let err = store
        .begin_grant(&new_grant(25, 600), Some(&jti("iss", "j2", 30)))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Replayed), "{err:?}");
    // j0 was purged: usable again (its window is over anyway).
    store
        .begin_grant(&new_grant(25, 600), Some(&jti("iss", "j0", 90)))
        .await
        .unwrap();
}

/// Two claimers (separate pools, as two replicas would have) race over 200 due grants: each
/// grant is handed out exactly once.
async fn concurrent_claimers_split_the_work(store: Store, url: String) {
    const GRANTS: usize = 200;
    let mut want = Vec::with_capacity(GRANTS);
    for _ in 0..GRANTS {
        want.push(begin_active(&store, 0, 10).await.id);
    }
    // Both claimers start together so their claims really overlap.
    let start = std::sync::Arc::new(tokio::sync::Barrier::new(2));
    let mut tasks = Vec::new();
    for _ in 0..2 {
        let replica = Store::connect(&url).await.unwrap();
        let start = start.clone();
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            let mut mine = Vec::new();
            loop {
                let batch = replica
                    .claim_due(t(20), t(0), Duration::minutes(5), 7)
                    .await
                    .unwrap();
                if batch.is_empty() {
                    break;
                }
                mine.extend(batch.into_iter().map(|c| c.grant.id));
                tokio::task::yield_now().await;
            }
            replica.close().await;
            mine
        }));
    }
    let mut got = Vec::new();
    let mut per_task = Vec::new();
    for task in tasks {
        let mine = task.await.unwrap();
        per_task.push(mine.len());
        got.extend(mine);
    }
    got.sort();
    let total = got.len();
    got.dedup();
    assert_eq!(
        total, GRANTS,
        "no grant claimed twice (per claimer: {per_task:?})"
    );
    want.sort();
    assert_eq!(got, want, "every due grant claimed");
}

// ---- instantiation per backend ------------------------------------------------------------

/// A grant for job `(repository_id, run, attempt, job_id)` of `issuer`, made active.
async fn begin_job_grant(
    store: &Store,
    issuer: &str,
    repository_id: &str,
    run: &str,
    attempt: &str,
    job_id: &str,
) -> NewGrant {
    let mut g = new_grant(0, 600);
    g.issuer = issuer.to_owned();
    g.repository_id = Some(repository_id.to_owned());
    g.job = json!({"platform": "github", "repository_id": repository_id, "run_id": run,
                   "run_attempt": attempt, "job_id": job_id});
    store.begin_grant(&g, None).await.unwrap();
    let details = vec![json!({}), json!({})];
    let ev = event(0, Action::Exchange, Outcome::Allow, Some(g.id));
    store
        .activate_grant(g.id, t(600), &details, &ev)
        .await
        .unwrap();
    g
}

async fn active_job_grants_match_every_field(store: Store) {
    let want = begin_job_grant(&store, "github", "42", "7", "1", "900").await;
    // Each differs in one field from `want`.
    begin_job_grant(&store, "github", "43", "7", "1", "900").await;
    begin_job_grant(&store, "github", "42", "7", "2", "900").await;
    begin_job_grant(&store, "github", "42", "8", "1", "900").await;
    begin_job_grant(&store, "github", "42", "7", "1", "901").await;
    begin_job_grant(&store, "ghes", "42", "7", "1", "900").await;
    let m = JobMatch {
        issuers: vec!["github".into()],
        platform: "github".into(),
        repository_id: "42".into(),
        job_id: "900".into(),
        run_id: Some("7".into()),
        run_attempt: Some("1".into()),
    };
    let found = store.active_job_grants(&m, 100).await.unwrap();
    assert_eq!(
        found.iter().map(|g| g.id).collect::<Vec<_>>(),
        vec![want.id]
    );
    assert_eq!(found[0].credentials.len(), 2);
    // Another platform's name for the same numbers never matches.
    let gl = JobMatch {
        platform: "gitlab".into(),
        ..m.clone()
    };
    assert!(store.active_job_grants(&gl, 100).await.unwrap().is_empty());
    // Without run id and attempt (GitLab: project + job id), the ghes grant still needs its issuer.
    let loose = JobMatch {
        issuers: vec!["github".into(), "ghes".into()],
        run_id: None,
        run_attempt: None,
        ..m.clone()
    };
    assert_eq!(store.active_job_grants(&loose, 100).await.unwrap().len(), 4);
    // Only active grants.
    store
        .claim_for_revoke(want.id, t(1), Duration::minutes(1))
        .await
        .unwrap()
        .unwrap();
    assert!(store.active_job_grants(&m, 100).await.unwrap().is_empty());
}

async fn record_jti_shares_the_replay_window_with_exchanges(store: Store) {
    store
        .record_jti(&jti("iss", "j-1", 100), t(0))
        .await
        .unwrap();
    assert!(matches!(
        store.record_jti(&jti("iss", "j-1", 100), t(50)).await,
        Err(StoreError::Replayed)
    ));
    // The same token cannot then be exchanged...
    let g = new_grant(60, 600);
    assert!(matches!(
        store.begin_grant(&g, Some(&jti("iss", "j-1", 100))).await,
        Err(StoreError::Replayed)
    ));
    // ...and past its window the record is taken over.
    store
        .record_jti(&jti("iss", "j-1", 300), t(100))
        .await
        .unwrap();
}

async fn deliveries_are_recorded_once_per_window(store: Store) {
    store
        .record_delivery("github", "d-1", t(0), t(100))
        .await
        .unwrap();
    assert!(matches!(
        store.record_delivery("github", "d-1", t(50), t(150)).await,
        Err(StoreError::Replayed)
    ));
    // The same id from the other source is another delivery.
    store
        .record_delivery("gitlab", "d-1", t(50), t(150))
        .await
        .unwrap();
    // Past the window the record is taken over.
    store
        .record_delivery("github", "d-1", t(100), t(200))
        .await
        .unwrap();
    // Forgetting lets a retry through.
    store.forget_delivery("github", "d-1").await.unwrap();
    store
        .record_delivery("github", "d-1", t(101), t(200))
        .await
        .unwrap();
    assert_eq!(store.purge_deliveries(t(160)).await.unwrap(), 1);
    assert_eq!(store.purge_deliveries(t(160)).await.unwrap(), 0);
    assert!(matches!(
        store.record_delivery("github", "d-1", t(170), t(300)).await,
        Err(StoreError::Replayed)
    ));
}

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

/// A revoke-all page is larger than the batches exchanges make: its events are chained the
/// other way on Postgres (hashes computed in the broker). Small appends before and after, a page
/// of 150 revoked in the store, a page holding a grant already revoked: every grant moved once,
/// one event each, and the chain verifies across both ways of appending.
async fn revoke_in_store_of_a_large_page_keeps_the_chain(store: Store) {
    let first = begin_active(&store, 0, 600).await;
    let mut grants = Vec::new();
    for i in 0..150 {
        grants.push(begin_active(&store, i, 600).await);
    }
    let events = |at: i64, gs: &[NewGrant]| -> Vec<AuditEvent> {
        gs.iter()
            .map(|g| event(at, Action::Admin, Outcome::Success, Some(g.id)))
            .collect()
    };
    let one = store
        .revoke_in_store(t(200), &events(200, std::slice::from_ref(&first)))
        .await
        .unwrap();
    assert_eq!(one, vec![first.id]);
    let mut page = grants.clone();
    page.push(first.clone());
    let moved = store
        .revoke_in_store(t(300), &events(300, &page))
        .await
        .unwrap();
    assert_eq!(
        moved.len(),
        150,
        "the already revoked grant is not moved again"
    );
    assert!(!moved.contains(&first.id));
    for g in &grants {
        assert_eq!(status(&store, g.id).await, GrantStatus::Revoked);
        assert_eq!(events_for(&store, g.id).await.len(), 2, "allow + revoke");
    }
    assert_eq!(events_for(&store, first.id).await.len(), 2);
    store
        .append_audit(&event(400, Action::Admin, Outcome::Success, None))
        .await
        .unwrap();
    let report = store.verify_audit_chain().await.unwrap();
    assert!(report.is_intact(), "{report:?}");
}

/// `issue_grant`: one transaction writes the jti, the grant already `active` with its final
/// details, and the allow event; a replay writes nothing.
async fn issue_grant_writes_an_active_grant_in_one_step(store: Store) {
    let iss = "https://token.actions.githubusercontent.com";
    let mut g = new_grant(0, 600);
    g.credentials[0].details = json!({"minted": 0});
    let ev = event(0, Action::Exchange, Outcome::Allow, Some(g.id));
    store
        .issue_grant(&g, Some(&jti(iss, "issue-1", 100)), &ev)
        .await
        .unwrap();
    let back = store.grant(g.id).await.unwrap().unwrap();
    assert_eq!(back.status, GrantStatus::Active);
    assert_eq!(back.expires_at, t(600));
    assert_eq!(back.credentials[0].details, json!({"minted": 0}));
    assert_eq!(back.credentials.len(), 2);
    assert_eq!(events_for(&store, g.id).await.len(), 1);

    let again = new_grant(5, 600);
    let ev = event(5, Action::Exchange, Outcome::Allow, Some(again.id));
    let err = store
        .issue_grant(&again, Some(&jti(iss, "issue-1", 100)), &ev)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Replayed), "{err:?}");
    assert_eq!(store.grant(again.id).await.unwrap(), None);
    assert!(events_for(&store, again.id).await.is_empty());
    assert!(store.verify_audit_chain().await.unwrap().is_intact());
}

/// Many writers at once through one store (on Postgres they share group-commit batches): each
/// gets its own outcome. Replays and conflicts are refused alone; the rest commit, each with its
/// event, and the chain stays whole.
async fn concurrent_writes_get_their_own_outcomes(store: Store) {
    let iss = "https://token.actions.githubusercontent.com";
    let mut tasks = Vec::new();
    for i in 0..40i64 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let g = new_grant(i, 600);
            let ev = event(i, Action::Exchange, Outcome::Allow, Some(g.id));
            // Every fourth token is the same one: exactly one of those may win.
            let j = if i % 4 == 0 {
                jti(iss, "shared", 100)
            } else {
                jti(iss, &format!("own-{i}"), 100)
            };
            let issued = store.issue_grant(&g, Some(&j), &ev).await;
            // Activating a grant that is not `issuing` is a conflict, refused alone.
            let stray = store
                .activate_grant(g.id, t(600), &[json!(1), json!(2)], &ev)
                .await;
            let refusal = event(i, Action::Exchange, Outcome::Deny, None);
            store.append_audit(&refusal).await.unwrap();
            (g.id, issued, stray)
        }));
    }
    let (mut won, mut replayed) = (0, 0);
    for task in tasks {
        let (id, issued, stray) = task.await.unwrap();
        match issued {
            Ok(()) => {
                assert_eq!(status(&store, id).await, GrantStatus::Active);
                assert_eq!(events_for(&store, id).await.len(), 1);
                assert!(matches!(stray, Err(StoreError::Conflict(_))), "{stray:?}");
                won += 1;
            }
            Err(StoreError::Replayed) => {
                assert_eq!(store.grant(id).await.unwrap(), None);
                replayed += 1;
            }
            Err(e) => panic!("unexpected {e:?}"),
        }
    }
    assert_eq!((won, replayed), (31, 9));
    let report = store.verify_audit_chain().await.unwrap();
    assert!(report.is_intact(), "{report:?}");
    assert_eq!(report.events_checked, 31 + 40);
}

/// Text the store cannot hold raw (NUL and other control characters from signed claims, in
/// grant columns, the job key, the jti and audit events) is stored escaped, never dropped, and
/// never fails the honest writes beside it: 40 concurrent writers, every fourth one poisoned,
/// all succeed (on Postgres they share group-commit batches); the poisoned rows read back
/// escaped, a replayed poisoned jti meets its record, a filter with the raw text finds the
/// escaped events, and the chain verifies.
async fn odd_text_is_stored_escaped_beside_honest_writes(store: Store) {
    let iss = "https://token.actions.githubusercontent.com";
    let mut tasks = Vec::new();
    for i in 0..40i64 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let poisoned = i % 4 == 0;
            let mut g = new_grant(i, 600);
            let mut ev = event(i, Action::Exchange, Outcome::Allow, Some(g.id));
            let mut j = jti(iss, &format!("own-{i}"), 100);
            let mut refusal = event(i, Action::Exchange, Outcome::Deny, None);
            if poisoned {
                g.subject = format!("repo:acme/app\0{i}");
                g.repository = Some("acme/\u{1b}[31mapp".to_owned());
                g.job = json!({"run_id": "1\0", "k\u{7}": "v"});
                ev.job.workflow = Some("wf\0".to_owned());
                ev.detail = Some("bell\u{7}".to_owned());
                j.jti = format!("nul\0{i}");
                refusal.credentials_requested = vec![format!("n\0{i}")];
            }
            let issued = store.issue_grant(&g, Some(&j), &ev).await;
            let appended = store.append_audit(&refusal).await;
            (i, g.id, issued, appended)
        }));
    }
    for task in tasks {
        let (i, id, issued, appended) = task.await.unwrap();
        issued.unwrap();
        appended.unwrap();
        let back = store.grant(id).await.unwrap().unwrap();
        assert_eq!(back.status, GrantStatus::Active);
        if i % 4 == 0 {
            assert_eq!(back.subject, format!("repo:acme/app\\u{{0}}{i}"));
            assert_eq!(back.repository.as_deref(), Some("acme/\\u{1b}[31mapp"));
            assert_eq!(back.job, json!({"run_id": "1\\u{0}", "k\\u{7}": "v"}));
            let evs = events_for(&store, id).await;
            assert_eq!(evs.len(), 1);
            assert_eq!(evs[0].job.workflow.as_deref(), Some("wf\\u{0}"));
            assert_eq!(evs[0].detail.as_deref(), Some("bell\\u{7}"));
        }
    }
    let again = new_grant(50, 600);
    let ev = event(50, Action::Exchange, Outcome::Allow, Some(again.id));
    let err = store
        .issue_grant(&again, Some(&jti(iss, "nul\x008", 100)), &ev)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Replayed), "{err:?}");
    let found = store
        .audit_events(&AuditFilter {
            credential: Some("n\x0012".to_owned()),
            ..AuditFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].credentials_requested, vec!["n\\u{0}12".to_owned()]);
    let dump = dump_rows(&store).await;
    assert!(!dump.contains('\0'), "no raw NUL stored");
    let report = store.verify_audit_chain().await.unwrap();
    assert!(report.is_intact(), "{report:?}");
    assert_eq!(report.events_checked, 80);
}

store_tests!(
    odd_text_is_stored_escaped_beside_honest_writes,
    issue_grant_writes_an_active_grant_in_one_step,
    revoke_in_store_of_a_large_page_keeps_the_chain,
    concurrent_writes_get_their_own_outcomes,
    migrate_twice_is_a_no_op,
    begin_then_activate_reads_back,
    replayed_jti_is_refused_until_it_expires,
    failed_grant_releases_its_jti,
    transitions_are_compare_and_set,
    duplicates_are_conflicts_and_roll_back,
    grant_by_revocation_hash_finds_it,
    no_secret_is_stored,
    credential_status_follows_the_lifecycle,
    claim_for_revoke_is_idempotent,
    claim_for_revoke_respects_the_reaper,
    claim_due_picks_what_the_reaper_must_handle,
    claim_due_honours_the_limit,
    revoke_failed_is_retried_with_the_original_cause,
    finish_revoke_sets_the_final_status_per_cause,
    audit_events_filter_and_order,
    audit_filters_each_narrow,
    audit_pages_have_no_gaps_or_duplicates,
    stats_count_grants,
    active_grants_oldest_first,
    gauges_count_active_by_kind_and_find_the_oldest_overdue,
    purge_jti_removes_only_past_windows,
    audit_chain_verifies_when_clean,
    audit_rows_refuse_update_and_delete,
    audit_chain_detects_an_edited_event,
    audit_chain_detects_an_edited_column,
    audit_chain_detects_a_deleted_event,
    audit_chain_detects_a_deleted_tail,
    audit_chain_detects_reordered_events,
    freeze_is_kept_and_lifted_with_an_audit_event,
    audit_prune_keeps_the_chain_verifiable,
    audit_prune_path_is_guarded,
    audit_verify_after_prune_detects_edits_after_the_cut,
    audit_checkpoint_detects_a_truncated_and_rehashed_log,
    audit_checkpoint_before_the_cut_is_vouched_by_the_record,
    active_job_grants_match_every_field,
    deliveries_are_recorded_once_per_window,
    record_jti_shares_the_replay_window_with_exchanges,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_concurrent_claimers_claim_each_grant_once() {
    let db = TestDb::postgres().await;
    concurrent_claimers_split_the_work(db.store(), db.url().to_owned()).await;
    db.cleanup().await;
}

/// A grant another replica is claiming (its row locked) is skipped, not waited on.
#[tokio::test]
async fn postgres_claim_due_skips_locked_rows() {
    let db = TestDb::postgres().await;
    let store = db.store();
    let held = begin_active(&store, 0, 10).await;
    let free = begin_active(&store, 0, 10).await;
    let Backend::Postgres(pool) = &store.backend else {
        unreachable!()
    };
    let mut other = pool.begin().await.unwrap();
    sqlx::query("SELECT id FROM grants WHERE id = $1 FOR UPDATE")
        .bind(held.id)
        .fetch_one(&mut *other)
        .await
        .unwrap();

    let started = std::time::Instant::now();
    let claimed = store
        .claim_due(t(20), t(0), Duration::seconds(30), 10)
        .await
        .unwrap();
    assert!(
        started.elapsed() < std::time::Duration::from_secs(2),
        "did not wait on the lock"
    );
    let ids: Vec<_> = claimed.iter().map(|c| c.grant.id).collect();
    assert_eq!(ids, vec![free.id]);

    other.rollback().await.unwrap();
    let claimed = store
        .claim_due(t(20), t(0), Duration::seconds(30), 10)
        .await
        .unwrap();
    let ids: Vec<_> = claimed.iter().map(|c| c.grant.id).collect();
    assert_eq!(ids, vec![held.id], "released rows are claimable again");
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_concurrent_claimers_claim_each_grant_once() {
    let db = TestDb::sqlite().await;
    concurrent_claimers_split_the_work(db.store(), db.url().to_owned()).await;
    db.cleanup().await;
}

#[tokio::test]
async fn connect_rejects_unknown_schemes_without_echoing_the_url() {
    let err = Store::connect("mysql://user:hunter2@db/x")
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::BadUrl(_)), "{err:?}");
    assert!(!err.to_string().contains("hunter2"));
}

#[tokio::test]
async fn unreachable_postgres_is_unavailable_quickly_and_quietly() {
    // Port 1 on localhost: nothing listens, the connection is refused at once.
    let started = std::time::Instant::now();
    let err = Store::connect("postgres://broker:hunter2@127.0.0.1:1/broker")
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    assert!(!err.to_string().contains("hunter2"));
    assert!(!format!("{err:?}").contains("hunter2"));
    assert!(started.elapsed() < std::time::Duration::from_secs(15));
}

#[tokio::test]
async fn in_memory_sqlite_works() {
    let store = Store::connect("sqlite::memory:").await.unwrap();
    store.migrate().await.unwrap();
    assert_eq!(store.backend(), "sqlite");
    let g = begin_active(&store, 0, 600).await;
    assert_eq!(status(&store, g.id).await, GrantStatus::Active);
    assert!(!format!("{store:?}").contains("memory"));
}

// ---- the audit hash chain -----------------------------------------------------------------

/// Run SQL as an attacker with database rights would: with the append-only triggers out of the
/// way (Postgres: disabled; SQLite: dropped, as SQLite cannot disable a trigger).
async fn tamper(store: &Store, sql: &str) {
    match &store.backend {
        Backend::Postgres(pool) => sqlx::raw_sql(&format!(
            "ALTER TABLE audit_events DISABLE TRIGGER USER; {sql}; \
             ALTER TABLE audit_events ENABLE TRIGGER USER;"
        ))
        .execute(pool)
        .await
        .map(|_| ()),
        Backend::Sqlite(pool) => sqlx::raw_sql(&format!(
            "DROP TRIGGER IF EXISTS audit_events_no_update; \
             DROP TRIGGER IF EXISTS audit_events_no_delete; {sql};"
        ))
        .execute(pool)
        .await
        .map(|_| ()),
    }
    .unwrap();
}

/// SQL with the triggers in place; returns the driver's error text, if any.
async fn try_sql(store: &Store, sql: &'static str) -> Option<String> {
    let r = match &store.backend {
        Backend::Postgres(pool) => sqlx::query(sql).execute(pool).await.map(|_| ()),
        Backend::Sqlite(pool) => sqlx::query(sql).execute(pool).await.map(|_| ()),
    };
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
    let rows = match &store.backend {
        Backend::Postgres(pool) => sqlx::query(sql)
            .fetch_all(pool)
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get::<i64, _>("seq"), r.get::<String, _>("id")))
            .collect(),
        Backend::Sqlite(pool) => sqlx::query(sql)
            .fetch_all(pool)
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get::<i64, _>("seq"), r.get::<String, _>("id")))
            .collect::<Vec<_>>(),
    };
    assert_eq!(rows.len(), 5);
    rows
}

async fn broken(store: &Store) -> ChainBreak {
    let report = store.verify_audit_chain().await.unwrap();
    assert!(!report.is_intact());
    report.broken.unwrap()
}

async fn audit_chain_verifies_when_clean(store: Store) {
    let empty = store.verify_audit_chain().await.unwrap();
    assert!(empty.is_intact(), "{empty:?}");
    assert_eq!(empty.events_checked, 0);
    let rows = chained_events(&store).await;
    let report = store.verify_audit_chain().await.unwrap();
    assert!(report.is_intact(), "{report:?}");
    assert_eq!(report.events_checked, 5);
    assert_eq!(report.legacy_events, 0);
    assert_eq!(report.head_seq, rows[4].0);
}

async fn audit_rows_refuse_update_and_delete(store: Store) {
    chained_events(&store).await;
    let upd = try_sql(&store, "UPDATE audit_events SET reason = 'forged'").await;
    assert!(upd.unwrap().contains("append-only"));
    let del = try_sql(&store, "DELETE FROM audit_events").await;
    assert!(del.unwrap().contains("append-only"));
    let head = try_sql(&store, "DELETE FROM audit_chain_head").await;
    assert!(head.is_some(), "the chain head cannot be deleted");
    assert!(store.verify_audit_chain().await.unwrap().is_intact());
    if store.backend() == "postgres" {
        let trunc = try_sql(&store, "TRUNCATE audit_events").await;
        assert!(trunc.unwrap().contains("append-only"));
    }
}

async fn audit_chain_detects_an_edited_event(store: Store) {
    let rows = chained_events(&store).await;
    let (seq, id) = &rows[2];
    let sql = if store.backend() == "postgres" {
        format!(
            "UPDATE audit_events SET event = jsonb_set(event, '{{reason}}', '\"forged\"'), \
             reason = 'forged' WHERE seq = {seq}"
        )
    } else {
        format!(
            "UPDATE audit_events SET event = json_set(event, '$.reason', 'forged'), \
             reason = 'forged' WHERE seq = {seq}"
        )
    };
    tamper(&store, &sql).await;
    let b = broken(&store).await;
    assert_eq!(b.kind, BreakKind::Modified, "{b:?}");
    assert_eq!((&b.seq, &b.event_id), (seq, id));
    assert!(b.message.contains(id.as_str()));
}

async fn audit_chain_detects_an_edited_column(store: Store) {
    let rows = chained_events(&store).await;
    let (seq, id) = &rows[3];
    tamper(
        &store,
        &format!("UPDATE audit_events SET actor = 'job' WHERE seq = {seq}"),
    )
    .await;
    let b = broken(&store).await;
    assert_eq!(b.kind, BreakKind::Modified, "{b:?}");
    assert_eq!(&b.event_id, id);
    assert!(b.message.contains("actor"), "{}", b.message);
}

async fn audit_chain_detects_a_deleted_event(store: Store) {
    let rows = chained_events(&store).await;
    tamper(
        &store,
        &format!("DELETE FROM audit_events WHERE seq = {}", rows[1].0),
    )
    .await;
    let b = broken(&store).await;
    assert_eq!(b.kind, BreakKind::Deleted, "{b:?}");
    // Named: the event that follows the gap.
    assert_eq!(b.event_id, rows[2].1);
}

async fn audit_chain_detects_a_deleted_tail(store: Store) {
    let rows = chained_events(&store).await;
    tamper(
        &store,
        &format!("DELETE FROM audit_events WHERE seq >= {}", rows[3].0),
    )
    .await;
    let b = broken(&store).await;
    assert_eq!(b.kind, BreakKind::Deleted, "{b:?}");
    // Named: the newest event left.
    assert_eq!(b.event_id, rows[2].1);
    assert!(b.message.contains("after"), "{}", b.message);
}

async fn audit_chain_detects_reordered_events(store: Store) {
    let rows = chained_events(&store).await;
    let (a, b) = (rows[1].0, rows[2].0);
    tamper(
        &store,
        &format!(
            "UPDATE audit_events SET seq = -1 WHERE seq = {a}; \
             UPDATE audit_events SET seq = {a} WHERE seq = {b}; \
             UPDATE audit_events SET seq = {b} WHERE seq = -1"
        ),
    )
    .await;
    let brk = broken(&store).await;
    assert_eq!(brk.kind, BreakKind::Reordered, "{brk:?}");
    // The event now at the earlier position is the one out of place.
    assert_eq!(brk.event_id, rows[2].1);
    assert_eq!(brk.seq, a);
}

/// Replicas appending at once still build one chain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_concurrent_appenders_build_one_chain() {
    let db = TestDb::postgres().await;
    let mut tasks = Vec::new();
    for r in 0..4 {
        // A separate pool per task, as separate replicas would have.
        let store = Store::connect(db.url()).await.unwrap();
        tasks.push(tokio::spawn(async move {
            for i in 0..25 {
                let e = event(r * 100 + i, Action::Exchange, Outcome::Allow, None);
                store.append_audit(&e).await.unwrap();
            }
            store.close().await;
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let report = db.store().verify_audit_chain().await.unwrap();
    assert!(report.is_intact(), "{report:?}");
    assert_eq!(report.events_checked, 100);
    db.cleanup().await;
}

async fn freeze_is_kept_and_lifted_with_an_audit_event(store: Store) {
    assert_eq!(store.freeze_state().await.unwrap(), None);
    let f = FreezeRecord {
        filter: json!({"repository": "acme/app"}),
        reason: "incident 42".into(),
        actor: "operator:alice".into(),
        since: t(10),
    };
    let ev = event(10, Action::Admin, Outcome::Success, None);
    assert!(!store.set_freeze(Some(&f), &ev).await.unwrap());
    assert_eq!(store.freeze_state().await.unwrap(), Some(f.clone()));
    let ev2 = event(11, Action::Admin, Outcome::Success, None);
    assert!(store.set_freeze(None, &ev2).await.unwrap());
    assert_eq!(store.freeze_state().await.unwrap(), None);
    let logged = store.audit_events(&AuditFilter::default()).await.unwrap();
    assert_eq!(logged.len(), 2);
    assert!(store.verify_audit_chain().await.unwrap().is_intact());
}

/// `Store::locked` excludes holders across separate pools (as two replicas would be) and
/// releases the lock when the work ends.
#[tokio::test]
async fn postgres_locked_excludes_other_replicas() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let db = TestDb::postgres().await;
    let a = db.store();
    let b = Store::connect(db.url()).await.unwrap();
    let inside = std::sync::Arc::new(AtomicUsize::new(0));
    let overlaps = std::sync::Arc::new(AtomicUsize::new(0));
    let work = |store: Store| {
        let (inside, overlaps) = (inside.clone(), overlaps.clone());
        async move {
            for _ in 0..5 {
                store
                    .locked("aws-deny:arn:aws:iam::1:role/x", async {
                        if inside.fetch_add(1, Ordering::SeqCst) > 0 {
                            overlaps.fetch_add(1, Ordering::SeqCst);
                        }
                        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                        inside.fetch_sub(1, Ordering::SeqCst);
                    })
                    .await
                    .unwrap();
            }
        }
    };
    tokio::join!(work(a.clone()), work(b.clone()));
    assert_eq!(overlaps.load(Ordering::SeqCst), 0, "two holders at once");
    // A different key is not blocked by a held one.
    let held = a.locked(
        "k1",
        tokio::time::sleep(std::time::Duration::from_millis(300)),
    );
    let other = async {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        b.locked("k2", async { 7 }).await.unwrap()
    };
    let (h, o) = tokio::join!(held, other);
    h.unwrap();
    assert_eq!(o, 7);
    b.close().await;
    db.cleanup().await;
}

/// The analyst views of migration 0004 select what their names say, and every view and column
/// carries a comment.
#[tokio::test]
async fn postgres_analyst_views_split_the_log_and_are_documented() {
    let db = TestDb::postgres().await;
    let store = db.store();
    let g = begin_active(&store, 0, 100).await;
    let mut deny = event(5, Action::Exchange, Outcome::Deny, None);
    deny.reason = "policy_denied".into();
    deny.credentials_requested = vec!["admin".into()];
    store.append_audit(&deny).await.unwrap();
    let claimed = store
        .claim_for_revoke(g.id, t(10), Duration::seconds(30))
        .await
        .unwrap()
        .unwrap();
    let mut rev = event(11, Action::Revoke, Outcome::Success, Some(g.id));
    rev.actor = Some("job".into());
    store
        .finish_revoke(g.id, claimed.cause, t(11), &rev)
        .await
        .unwrap();
    store
        .append_audit(&event(12, Action::Admin, Outcome::Success, None))
        .await
        .unwrap();
    let Backend::Postgres(pool) = &store.backend else {
        unreachable!()
    };
    let grants: Vec<Uuid> = sqlx::query_scalar("SELECT grant_id FROM audit_grants")
        .fetch_all(pool)
        .await
        .unwrap();
    assert_eq!(grants, vec![g.id]);
    let denials: Vec<(String, serde_json::Value)> =
        sqlx::query_as("SELECT reason, credentials_requested FROM audit_denials")
            .fetch_all(pool)
            .await
            .unwrap();
    assert_eq!(denials, vec![("policy_denied".into(), json!(["admin"]))]);
    let revs: Vec<(Uuid, String, Option<String>)> =
        sqlx::query_as("SELECT grant_id, action, actor FROM audit_revocations")
            .fetch_all(pool)
            .await
            .unwrap();
    assert_eq!(revs, vec![(g.id, "revoke".into(), Some("job".into()))]);
    let undocumented: Vec<String> = sqlx::query_scalar(
        "SELECT c.relname || coalesce('.' || a.attname, '')
         FROM pg_class c
         LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0
         WHERE c.relkind = 'v'
           AND c.relname IN ('audit_grants', 'audit_denials', 'audit_revocations')
           AND (obj_description(c.oid, 'pg_class') IS NULL
                OR (a.attname IS NOT NULL AND col_description(c.oid, a.attnum) IS NULL))",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert!(undocumented.is_empty(), "{undocumented:?}");
    let views: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_views WHERE viewname IN
         ('audit_grants', 'audit_denials', 'audit_revocations')",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(views, 3);
    db.cleanup().await;
}

// ---- checkpoints and pruning ----------------------------------------------------------------

/// Run `sql` inside a transaction that opened the prune path (the session flag / guard row), as
/// an attacker who read the prune code would.
async fn via_prune_path(store: &Store, sql: &str) -> Option<String> {
    let sql = &sql;
    let r = match &store.backend {
        Backend::Postgres(pool) => {
            let mut tx = pool.begin().await.unwrap();
            sqlx::query("SELECT set_config('broker.audit_prune', 'on', true)")
                .execute(&mut *tx)
                .await
                .unwrap();
            match sqlx::raw_sql(sql).execute(&mut *tx).await {
                Ok(_) => tx.commit().await,
                Err(e) => Err(e),
            }
        }
        Backend::Sqlite(pool) => {
            let mut tx = pool.begin().await.unwrap();
            sqlx::query("UPDATE audit_prune_guard SET active = 1")
                .execute(&mut *tx)
                .await
                .unwrap();
            match sqlx::raw_sql(sql).execute(&mut *tx).await {
                Ok(_) => tx.commit().await,
                Err(e) => Err(e),
            }
        }
    };
    r.err().map(|e| e.to_string())
}

async fn count_events(store: &Store) -> i64 {
    let sql = "SELECT count(*) FROM audit_events";
    match &store.backend {
        Backend::Postgres(pool) => sqlx::query_scalar(sql).fetch_one(pool).await.unwrap(),
        Backend::Sqlite(pool) => sqlx::query_scalar(sql).fetch_one(pool).await.unwrap(),
    }
}

async fn audit_prune_keeps_the_chain_verifiable(store: Store) {
    // Nothing to prune in an empty log.
    let none = store.prune_audit(t(100), t(100), "cli:test").await.unwrap();
    assert_eq!((none.deleted, none.cut_seq), (0, None));
    let rows = chained_events(&store).await; // times 1, 2, 3, 4, 5
    let r = store.prune_audit(t(3), t(100), "cli:test").await.unwrap();
    assert_eq!(r.deleted, 2);
    assert_eq!(r.cut_seq, Some(rows[1].0));
    assert_eq!(r.pruned_events, 2);
    // 3 left + the audit_pruned event.
    assert_eq!(count_events(&store).await, 4);
    let pruned = store
        .audit_events(&AuditFilter {
            reason: Some("audit_pruned".into()),
            ..AuditFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(pruned.len(), 1);
    assert_eq!(pruned[0].actor.as_deref(), Some("cli:test"));

    let report = store.verify_audit_chain().await.unwrap();
    assert!(report.is_intact(), "{report:?}");
    assert_eq!(report.events_checked, 4);
    assert_eq!(report.pruned_events, 2);
    assert_eq!(report.pruned_through_seq, Some(rows[1].0));

    // The cut is recorded, and a second prune moves it forward.
    let cps = store.audit_checkpoints(10).await.unwrap();
    assert_eq!(cps.len(), 1);
    assert_eq!(cps[0].kind, CheckpointKind::Prune);
    assert_eq!(cps[0].seq, rows[1].0);
    assert_eq!(
        cps[0].last_event_id.map(|u| u.to_string()),
        Some(rows[1].1.clone())
    );
    let again = store.prune_audit(t(3), t(101), "cli:test").await.unwrap();
    assert_eq!(again.deleted, 0, "nothing older than the date is left");
    let r2 = store.prune_audit(t(5), t(102), "cli:test").await.unwrap();
    assert_eq!((r2.deleted, r2.pruned_events), (2, 4));
    let report = store.verify_audit_chain().await.unwrap();
    assert!(report.is_intact(), "{report:?}");
    assert_eq!(report.pruned_events, 4);
    // The event at t(5) and the two audit_pruned events.
    assert_eq!(report.events_checked, 3);
}

async fn audit_prune_path_is_guarded(store: Store) {
    let rows = chained_events(&store).await;
    store.prune_audit(t(3), t(100), "cli:test").await.unwrap();
    // Ordinary DELETE and UPDATE are still refused, pruned range or not.
    let del = try_sql(&store, "DELETE FROM audit_events").await;
    assert!(del.unwrap().contains("append-only"));
    let upd = try_sql(&store, "UPDATE audit_events SET reason = 'forged'").await;
    assert!(upd.unwrap().contains("append-only"));
    // The prune path itself cannot delete past the newest prune checkpoint...
    let past_cut = via_prune_path(
        &store,
        &format!("DELETE FROM audit_events WHERE seq = {}", rows[3].0),
    )
    .await;
    assert!(past_cut.unwrap().contains("append-only"));
    // ...nor move the cut with a checkpoint that lies about the hash or the count.
    let ins = |hash: &str, count: i64| {
        format!(
            "INSERT INTO audit_checkpoints (kind, created_at, seq, hash, event_count) \
             VALUES ('prune', 0, {}, '{hash}', {count})",
            rows[3].0
        )
    };
    let hash3 = {
        let sql = format!("SELECT hash FROM audit_events WHERE seq = {}", rows[3].0);
        let h: String = match &store.backend {
            Backend::Postgres(pool) => sqlx::query_scalar(&sql).fetch_one(pool).await.unwrap(),
            Backend::Sqlite(pool) => sqlx::query_scalar(&sql).fetch_one(pool).await.unwrap(),
        };
        h
    };
    let pg = store.backend() == "postgres";
    let fix = |s: String| {
        if pg {
            s.replace("VALUES ('prune', 0,", "VALUES ('prune', now(),")
        } else {
            s
        }
    };
    let bad_hash = via_prune_path(&store, &fix(ins(chain::GENESIS, 4))).await;
    assert!(bad_hash.unwrap().contains("hash"), "wrong hash refused");
    let bad_count = via_prune_path(&store, &fix(ins(&hash3, 3))).await;
    assert!(bad_count.unwrap().contains("count"), "wrong count refused");
    assert_eq!(count_events(&store).await, 4);
    // Checkpoints are append-only.
    let cp_del = try_sql(&store, "DELETE FROM audit_checkpoints").await;
    assert!(cp_del.unwrap().contains("append-only"));
    let cp_upd = try_sql(&store, "UPDATE audit_checkpoints SET event_count = 0").await;
    assert!(cp_upd.unwrap().contains("append-only"));
    assert!(store.verify_audit_chain().await.unwrap().is_intact());
}

async fn audit_verify_after_prune_detects_edits_after_the_cut(store: Store) {
    let rows = chained_events(&store).await;
    store.prune_audit(t(3), t(100), "cli:test").await.unwrap();
    let (seq, id) = &rows[3];
    tamper(
        &store,
        &format!("UPDATE audit_events SET actor = 'job' WHERE seq = {seq}"),
    )
    .await;
    let b = broken(&store).await;
    assert_eq!(b.kind, BreakKind::Modified, "{b:?}");
    assert_eq!(&b.event_id, id);

    // Deleting the first event after the cut is a deletion too, not a new start.
    tamper(
        &store,
        &format!("DELETE FROM audit_events WHERE seq = {}", rows[2].0),
    )
    .await;
    tamper(
        &store,
        &format!("UPDATE audit_events SET actor = 'operator:alice' WHERE seq = {seq}"),
    )
    .await;
    let b = broken(&store).await;
    assert_eq!(b.kind, BreakKind::Deleted, "{b:?}");
    assert_eq!(&b.event_id, id);
}

async fn audit_checkpoint_detects_a_truncated_and_rehashed_log(store: Store) {
    let empty = store.audit_checkpoint(t(0)).await.unwrap();
    assert_eq!(
        (empty.event_count, empty.hash.as_str()),
        (0, chain::GENESIS)
    );
    let rows = chained_events(&store).await;
    let cp = store.audit_checkpoint(t(10)).await.unwrap();
    assert_eq!(cp.kind, CheckpointKind::Export);
    assert_eq!((cp.seq, cp.event_count), (rows[4].0, 5));
    assert_eq!(
        cp.last_event_id.map(|u| u.to_string()),
        Some(rows[4].1.clone())
    );
    // The log grows and is pruned: the checkpoint still holds.
    for at in 11..14 {
        store
            .append_audit(&event(at, Action::Admin, Outcome::Success, None))
            .await
            .unwrap();
    }
    store.prune_audit(t(3), t(20), "cli:test").await.unwrap();
    let ok = store
        .verify_audit_chain_through(Some(&cp.anchor()))
        .await
        .unwrap();
    assert!(ok.is_intact(), "{ok:?}");
    assert_eq!(ok.checkpoint_matched, Some(true));
    // An empty-log checkpoint is met by any chain.
    let ok = store
        .verify_audit_chain_through(Some(&empty.anchor()))
        .await
        .unwrap();
    assert_eq!(ok.checkpoint_matched, Some(true), "{ok:?}");

    // An attacker cuts the log back to before the checkpoint and repairs the head: the chain
    // alone looks intact, the checkpoint proves the cut.
    let sql = format!(
        "DELETE FROM audit_events WHERE seq >= {s}; \
         UPDATE audit_chain_head SET seq = {p}, \
         hash = (SELECT hash FROM audit_events WHERE seq = {p})",
        s = rows[4].0,
        p = rows[3].0
    );
    tamper(&store, &sql).await;
    assert!(store.verify_audit_chain().await.unwrap().is_intact());
    let r = store
        .verify_audit_chain_through(Some(&cp.anchor()))
        .await
        .unwrap();
    let b = r.broken.clone().expect("the checkpoint catches the cut");
    assert_eq!(b.kind, BreakKind::Deleted, "{b:?}");
    assert_eq!(r.checkpoint_matched, Some(false));

    // A checkpoint whose hash the log does not hold at that seq: rewritten.
    let mut forged = cp.anchor();
    forged.seq = rows[3].0;
    forged.count = 4;
    let r = store
        .verify_audit_chain_through(Some(&forged))
        .await
        .unwrap();
    let b = r.broken.expect("hash differs");
    assert_eq!(b.kind, BreakKind::Modified, "{b:?}");
    assert_eq!(b.event_id, rows[3].1);
}

async fn audit_checkpoint_before_the_cut_is_vouched_by_the_record(store: Store) {
    let rows = chained_events(&store).await;
    let early = store.audit_checkpoint(t(6)).await.unwrap();
    assert_eq!(early.seq, rows[4].0);
    store
        .append_audit(&event(7, Action::Admin, Outcome::Success, None))
        .await
        .unwrap();
    store.prune_audit(t(8), t(20), "cli:test").await.unwrap();
    // The export checkpoint's event is pruned; the stored record vouches for it.
    let ok = store
        .verify_audit_chain_through(Some(&early.anchor()))
        .await
        .unwrap();
    assert!(ok.is_intact(), "{ok:?}");
    assert_eq!(ok.checkpoint_matched, Some(true));
    // One the store never recorded is refused.
    let mut unknown = early.anchor();
    unknown.count += 1;
    let r = store
        .verify_audit_chain_through(Some(&unknown))
        .await
        .unwrap();
    assert_eq!(r.broken.expect("unknown").kind, BreakKind::Deleted);
}

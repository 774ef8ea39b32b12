//! Where a revoke-all page's time goes in the store (not in CI: `#[ignore]`). Bulk-inserts
//! `STORE_SCALE_GRANTS` (default 50,000) active API-token grants on the test Postgres and revokes
//! them a page at a time as the admin layer does, timing each step:
//! `STORE_SCALE_GRANTS=200000 cargo test --release -p broker --lib store::tests::scale -- --ignored --nocapture`.

use super::*;
use std::time::{Duration as StdDuration, Instant};

const PAGE: u32 = 1000;

async fn bulk_insert(store: &Store, n: i64) {
    let Backend::Postgres(pool) = &store.backend else {
        unreachable!()
    };
    let mut tx = pool.begin().await.unwrap();
    for sql in [
        "INSERT INTO grants (id, status, issuer, subject, repository, repository_id, job,
                             bundle_digest, revocation_hash, created_at, expires_at)
         SELECT ('00000000-0000-4000-8000-' || lpad(to_hex(i), 12, '0'))::uuid, 'active',
                'github', 'repo:bulk', 'bulk/old', '2000001', '{}'::jsonb, 'bulk', 'bulk-' || i,
                to_timestamp((1700000000000 + i) / 1000.0), to_timestamp(1800000000)
         FROM generate_series(1::bigint, $1) AS i",
        "INSERT INTO grant_credentials (grant_id, position, name, kind, resource_id, details)
         SELECT ('00000000-0000-4000-8000-' || lpad(to_hex(i), 12, '0'))::uuid, 0, 'deploy',
                'api_token', 'tok-' || i, '{}'::jsonb
         FROM generate_series(1::bigint, $1) AS i",
    ] {
        sqlx::query(sql).bind(n).execute(&mut *tx).await.unwrap();
    }
    tx.commit().await.unwrap();
    sqlx::query("ANALYZE").execute(pool).await.unwrap();
}

/// The event the admin layer writes for a grant revoked in the store (`revoked_event`).
fn revoked_event(g: &Grant, now: OffsetDateTime) -> AuditEvent {
    let mut ev = AuditEvent::new(now, Action::Revoke, Outcome::Success, "requested");
    ev.request_id = Some("0193a0b1-0000-7000-8000-000000000001".to_owned());
    ev.client_addr = Some("127.0.0.1".to_owned());
    ev.grant_id = Some(g.id);
    ev.actor = Some("operator:admin".to_owned());
    ev.resource_ids = g
        .credentials
        .iter()
        .map(|c| c.resource_id.clone())
        .collect();
    ev.credentials_requested = g.credentials.iter().map(|c| c.name.clone()).collect();
    ev.bundle_digest = Some(g.bundle_digest.clone());
    ev.job.issuer = Some(g.issuer.clone());
    ev.job.sub = Some(g.subject.clone());
    ev.job.repository = g.repository.clone();
    ev.job.repository_id = g.repository_id.clone();
    ev.expires_at = Some(g.expires_at);
    ev
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "timing run; see the module comment"]
async fn revoke_all_pages_timed() {
    let n: i64 = std::env::var("STORE_SCALE_GRANTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50_000);
    let db = TestDb::postgres().await;
    let store = db.store();
    let started = Instant::now();
    bulk_insert(&store, n).await;
    println!("[scale] bulk insert of {n}: {:?}", started.elapsed());
    let select = GrantSelect {
        kind: Some("api_token".to_owned()),
        ..GrantSelect::default()
    };
    let (mut read, mut build, mut revoke) =
        (StdDuration::ZERO, StdDuration::ZERO, StdDuration::ZERO);
    let mut cursor = None;
    let mut revoked = 0;
    let run = Instant::now();
    loop {
        let t0 = Instant::now();
        let page = store
            .active_grants_page(&select, cursor, PAGE)
            .await
            .unwrap();
        let t1 = Instant::now();
        let Some(last) = page.last() else { break };
        cursor = Some(GrantCursor {
            created_at: last.created_at,
            id: last.id,
        });
        let now = t(1000);
        let events: Vec<AuditEvent> = page.iter().map(|g| revoked_event(g, now)).collect();
        let t2 = Instant::now();
        revoked += store.revoke_in_store(now, &events).await.unwrap().len();
        let t3 = Instant::now();
        read += t1 - t0;
        build += t2 - t1;
        revoke += t3 - t2;
    }
    let total = run.elapsed();
    println!(
        "[scale] revoked {revoked} in {total:?}: page reads {read:?}, event building {build:?}, \
         revoke_in_store {revoke:?}"
    );
    assert_eq!(revoked as i64, n);
    let t0 = Instant::now();
    let report = store.verify_audit_chain().await.unwrap();
    println!("[scale] chain verify: {:?}", t0.elapsed());
    assert!(report.is_intact());
    db.cleanup().await;
}

use super::*;

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

store_tests!(
    revoke_in_store_of_a_large_page_keeps_the_chain,
    claim_for_revoke_is_idempotent,
    claim_for_revoke_respects_the_reaper,
    claim_due_picks_what_the_reaper_must_handle,
    claim_due_honours_the_limit,
    revoke_failed_is_retried_with_the_original_cause,
    finish_revoke_sets_the_final_status_per_cause,
    active_grants_oldest_first,
    active_job_grants_match_every_field,
);

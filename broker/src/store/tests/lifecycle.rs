use super::*;

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

store_tests!(
    odd_text_is_stored_escaped_beside_honest_writes,
    issue_grant_writes_an_active_grant_in_one_step,
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
);

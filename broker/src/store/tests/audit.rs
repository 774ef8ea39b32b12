use super::*;

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
    c.verified = Some(true);
    let mut d = event(40, Action::Admin, Outcome::Success, None);
    d.actor = Some("operator:alice".into());
    d.reason = "revoke_all".into();
    let mut e5 = event(50, Action::Expire, Outcome::Success, Some(pg.id));
    e5.verified = Some(false);
    for e in [&a, &b, &c, &d, &e5] {
        store.append_audit(e).await.unwrap();
    }
    #[rustfmt::skip]
    let cases: Vec<(AuditFilter, Vec<Uuid>, &str)> = vec![
        (AuditFilter::default(), vec![e5.id, d.id, c.id, b.id, a.id], ""),
        (af(|f| f.verified = Some(false)), vec![e5.id], "unverified revocations"),
        (af(|f| f.verified = Some(true)), vec![c.id], "verified revocations"),
        (af(|f| f.until = Some(t(30))), vec![b.id, a.id], "until is exclusive"),
        (af(|f| { f.since = Some(t(20)); f.until = Some(t(40)) }), vec![c.id, b.id], ""),
        (af(|f| f.repository_id = Some("42".into())), vec![c.id, a.id], ""),
        (af(|f| f.repository = Some("acme/other".into())), vec![b.id], ""),
        (af(|f| f.actor = Some("operator:alice".into())), vec![d.id], ""),
        (af(|f| f.credential = Some("db".into())), vec![a.id], "granted credential"),
        (af(|f| f.credential = Some("admin".into())), vec![b.id], "requested (denied) credential"),
        (af(|f| f.credential = Some("nope".into())), vec![], ""),
        (af(|f| f.kind = Some("postgres".into())), vec![e5.id, a.id], ""),
        (af(|f| f.kind = Some("api_token".into())), vec![e5.id, c.id, a.id], ""),
        (af(|f| f.outcome = Some("success".into())), vec![e5.id, d.id, c.id], ""),
        (af(|f| f.reason = Some("policy_denied".into())), vec![b.id], ""),
        (af(|f| f.grant_id = Some(tok.id)), vec![c.id], ""),
        (af(|f| f.request_id = Some("req-a".into())), vec![a.id], ""),
        (af(|f| { f.repository_id = Some("42".into()); f.outcome = Some("allow".into()) }), vec![a.id], "filters combine with AND"),
        (af(|f| f.actor = Some("x' OR '1'='1".into())), vec![], "a value that looks like SQL is just a value"),
    ];
    for (filter, want, why) in cases {
        let page = store.audit_page(&filter).await.unwrap();
        let got: Vec<Uuid> = page.records.into_iter().map(|r| r.event.id).collect();
        assert_eq!(got, want, "{why} {filter:?}");
    }
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

    #[rustfmt::skip]
    let cases = [
        (af(|f| f.grant_id = Some(g1)), vec![c.id, a.id]),
        (af(|f| f.request_id = Some("req-2".into())), vec![b.id]),
        (af(|f| f.repository = Some("acme/app".into())), vec![c.id, a.id]),
        (af(|f| f.outcome = Some("deny".into())), vec![b.id]),
        (af(|f| f.reason = Some("policy_denied".into())), vec![b.id]),
        (af(|f| f.since = Some(t(20))), vec![d.id, c.id, b.id]),
        (af(|f| f.limit = 2), vec![d.id, c.id]),
        (af(|f| { f.grant_id = Some(g1); f.outcome = Some("allow".into()) }), vec![a.id]),
        (af(|f| f.grant_id = Some(Uuid::now_v7())), vec![]),
    ];
    for (filter, want) in cases {
        let got: Vec<Uuid> = store
            .audit_events(&filter)
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.id)
            .collect();
        assert_eq!(got, want, "{filter:?}");
    }

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

store_tests!(
    audit_events_filter_and_order,
    audit_filters_each_narrow,
    audit_pages_have_no_gaps_or_duplicates,
    stats_count_grants,
    gauges_count_active_by_kind_and_find_the_oldest_overdue,
);

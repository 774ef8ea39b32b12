use super::*;

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
    let b = edit_actor(&store, *seq).await;
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

store_tests!(
    audit_chain_verifies_when_clean,
    audit_rows_refuse_update_and_delete,
    audit_chain_detects_an_edited_event,
    audit_chain_detects_an_edited_column,
    audit_chain_detects_a_deleted_event,
    audit_chain_detects_a_deleted_tail,
    audit_chain_detects_reordered_events,
);

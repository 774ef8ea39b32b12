use super::*;

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
        let h: String = on_pool!(store, |pool| sqlx::query_scalar(&sql)
            .fetch_one(pool)
            .await
            .unwrap());
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
    let b = edit_actor(&store, *seq).await;
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

store_tests!(
    audit_prune_keeps_the_chain_verifiable,
    audit_prune_path_is_guarded,
    audit_verify_after_prune_detects_edits_after_the_cut,
    audit_checkpoint_detects_a_truncated_and_rehashed_log,
    audit_checkpoint_before_the_cut_is_vouched_by_the_record,
);

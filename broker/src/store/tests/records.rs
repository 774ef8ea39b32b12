use super::*;

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

store_tests!(
    purge_jti_removes_only_past_windows,
    freeze_is_kept_and_lifted_with_an_audit_event,
    deliveries_are_recorded_once_per_window,
    record_jti_shares_the_replay_window_with_exchanges,
);

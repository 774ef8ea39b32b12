//! Group commit for the Postgres writes that append to the audit chain.
//!
//! Why: every audit append locks the chain head row until its transaction commits (so `seq`
//! order is chain order), which makes those transactions strictly one after another. With a
//! durable commit costing a WAL flush (milliseconds on ordinary disks), one transaction per
//! exchange caps a replica at a few hundred exchanges per second whatever the CPU. Here the
//! writes that arrive while a flush is under way are collected and written together in one
//! transaction, so one flush serves many exchanges.
//!
//! Invariants:
//! - Each caller still waits for the commit that contains its own write: `submit` returns only
//!   after that transaction committed (or failed), so nothing is reported written before it is
//!   durable, and "activation and its audit event are one transaction" holds per item.
//! - Per-item refusals (`Replayed`, `Conflict`) are decided before the item writes anything
//!   (see `postgres::insert_grants`, `postgres::activate_rows`, `grants::finish_rows`), so a refused item leaves
//!   nothing in the batch and the others commit.
//! - Any other error rolls the whole batch back. If it is about the data (a `Rejected` item: a
//!   NUL the text boundary missed, an oversized value; or a `Conflict` raised by a statement),
//!   the items are written again one per transaction, so one bad item fails alone and the
//!   honest ones beside it commit. An outage (`Unavailable`) fails every caller at once (one by
//!   one they would only wait longer); the callers already handle that (fail closed).
//! - No added latency: a writer takes whatever is queued when it becomes free; a lone request
//!   is written alone, at once.

use super::db::Conn;
use super::{JtiRecord, NewGrant, RevokeCause, StoreError};
use super::{audit_log, grants, postgres};
use crate::audit::AuditEvent;
use sqlx::PgPool;
use std::sync::Arc;
use time::OffsetDateTime;
use tokio::sync::{Mutex, mpsc, oneshot};
use uuid::Uuid;

/// Concurrent batch writers. Two let one batch run its statements while another waits for its
/// flush; more only queue on the chain head.
const WRITERS: usize = 2;
/// Most items in one transaction (bounds the time the chain head is held).
const MAX_BATCH: usize = 64;
/// Queued items before `submit` waits (back-pressure instead of unbounded memory).
const QUEUE: usize = 4096;

/// The state change that goes with an audit event (or, for `Begin`, that has none).
pub(super) enum Op {
    /// A grant intent: `issuing`, with its jti and the resource ids it will create, written
    /// before anything is minted. No audit event (the exchange's outcome is audited when it is
    /// known: activation, or failure).
    Begin {
        grant: Box<NewGrant>,
        jti: Option<JtiRecord>,
    },
    /// A grant born `active` (credentials minted in memory) with its jti.
    Issue {
        grant: Box<NewGrant>,
        jti: Option<JtiRecord>,
    },
    /// `issuing` → `active` with the minted credentials' details.
    Activate {
        id: Uuid,
        expires_at: OffsetDateTime,
        details: Vec<serde_json::Value>,
    },
    /// `revoking` → final.
    Finish {
        id: Uuid,
        cause: RevokeCause,
        now: OffsetDateTime,
    },
    /// The audit event alone.
    Append,
}

struct Job {
    op: Op,
    audit: Option<AuditEvent>,
    done: oneshot::Sender<Result<(), StoreError>>,
}

/// Handle to the writer tasks; cheap to clone. The tasks end when the last handle is dropped.
#[derive(Clone)]
pub(super) struct GroupWriter {
    queue: mpsc::Sender<Job>,
}

impl std::fmt::Debug for GroupWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GroupWriter")
    }
}

impl GroupWriter {
    /// Start the writers, each on a thread of its own with its own connection.
    ///
    /// Why threads: a writer holds the chain head lock from its `SELECT … FOR UPDATE` until its
    /// commit. On the request runtime it would queue behind every request task between two
    /// statements (verifying and signing are CPU work), stretching that hold and so serialising
    /// the whole replica on it. On its own thread the OS schedules it as soon as Postgres
    /// answers. One thread per writer, not one for both: a writer preparing its next batch
    /// (encoding rows, canonical JSON) would otherwise keep the other, which holds the head,
    /// from sending its `COMMIT`. The connections are opened on those threads' runtimes for the
    /// same reason.
    pub(super) fn start(pool: &PgPool) -> Result<Self, StoreError> {
        let (queue, rx) = mpsc::channel(QUEUE);
        let options = (*pool.connect_options()).clone();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..WRITERS {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|_| StoreError::Unavailable("cannot start the store writer".to_owned()))?;
            let (options, rx) = (options.clone(), rx.clone());
            std::thread::Builder::new()
                .name(format!("store-writer-{i}"))
                .spawn(move || {
                    runtime.block_on(async move {
                        let pool = sqlx::postgres::PgPoolOptions::new()
                            .max_connections(1)
                            .min_connections(0)
                            .acquire_timeout(super::codec::ACQUIRE_TIMEOUT)
                            .connect_lazy_with(options);
                        writer(pool.clone(), rx).await;
                        pool.close().await;
                    });
                })
                .map_err(|_| StoreError::Unavailable("cannot start the store writer".to_owned()))?;
        }
        Ok(Self { queue })
    }

    /// Write `op` with `audit` and wait for the commit that holds them.
    pub(super) async fn submit(&self, op: Op, audit: &AuditEvent) -> Result<(), StoreError> {
        self.send(op, Some(audit.clone())).await
    }

    /// Write a grant intent (no audit event) and wait for the commit that holds it.
    pub(super) async fn begin(
        &self,
        grant: &NewGrant,
        jti: Option<&JtiRecord>,
    ) -> Result<(), StoreError> {
        let op = Op::Begin {
            grant: Box::new(grant.clone()),
            jti: jti.cloned(),
        };
        self.send(op, None).await
    }

    async fn send(&self, op: Op, audit: Option<AuditEvent>) -> Result<(), StoreError> {
        let (done, result) = oneshot::channel();
        let job = Job { op, audit, done };
        if self.queue.send(job).await.is_err() {
            return Err(StoreError::Unavailable("store writer stopped".to_owned()));
        }
        result
            .await
            .unwrap_or_else(|_| Err(StoreError::Unavailable("store writer stopped".to_owned())))
    }
}

async fn writer(pool: PgPool, rx: Arc<Mutex<mpsc::Receiver<Job>>>) {
    let mut jobs = Vec::with_capacity(MAX_BATCH);
    loop {
        {
            // One writer waits for work at a time; the other is writing its batch meanwhile.
            let mut rx = rx.lock().await;
            if rx.recv_many(&mut jobs, MAX_BATCH).await == 0 {
                return; // every handle dropped
            }
        }
        commit_jobs(&pool, &mut jobs).await;
    }
}

/// Write `jobs` as one batch and answer every caller (draining `jobs`). A batch the database
/// refused for an item's data (or a conflict it raised) is written again one item per
/// transaction, so the item at fault fails alone and the others commit; an outage
/// (`Unavailable`) fails them all at once, since one by one they would only wait longer.
async fn commit_jobs(pool: &PgPool, jobs: &mut Vec<Job>) {
    loop {
        jobs.retain(|j| !j.abandoned());
        if jobs.is_empty() {
            return;
        }
        match write_batch(pool, jobs).await {
            Ok(Some(outcomes)) => {
                for (job, outcome) in jobs.drain(..).zip(outcomes) {
                    let _ = job.done.send(outcome);
                }
                return;
            }
            // A caller gave up while the batch was written: rolled back; again without it.
            Ok(None) => continue,
            Err(e) if jobs.len() > 1 && !matches!(e, StoreError::Unavailable(_)) => {
                // The batch rolled back whole, so writing each item again is safe.
                tracing::warn!(error = %e, items = jobs.len(), "store batch refused; writing its items one by one");
                for job in jobs.drain(..) {
                    write_alone(pool, job).await;
                }
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, items = jobs.len(), "store batch failed");
                for job in jobs.drain(..) {
                    let _ = job.done.send(Err(same(&e)));
                }
                return;
            }
        }
    }
}

/// One item in a transaction of its own; its caller gets its own outcome.
async fn write_alone(pool: &PgPool, job: Job) {
    loop {
        if job.abandoned() {
            return;
        }
        match write_batch(pool, std::slice::from_ref(&job)).await {
            Ok(Some(mut outcomes)) => {
                let outcome = outcomes
                    .pop()
                    .unwrap_or_else(|| Err(StoreError::Conflict("batch out of step".to_owned())));
                let _ = job.done.send(outcome);
                return;
            }
            // Its caller left meanwhile: rolled back, and the check above ends it.
            Ok(None) => continue,
            Err(e) => {
                if matches!(e, StoreError::Rejected(_)) {
                    tracing::warn!(error = %e, "store refused one item's data");
                }
                let _ = job.done.send(Err(e));
                return;
            }
        }
    }
}

impl Job {
    /// An intent, issue or activation whose caller stopped waiting (its request timed out or the
    /// client went away). Its response was never sent, so it must not be committed: a `Begin`
    /// then leaves nothing (nothing was minted, the jti stays unused), an `Issue` leaves nothing
    /// (its tokens never left the process) and an `Activate` leaves the grant
    /// `issuing` for the reaper to revoke, as when a lone transaction is dropped. Revocation
    /// finishes and refusals' audit events are written whoever waits for them.
    fn abandoned(&self) -> bool {
        matches!(
            self.op,
            Op::Begin { .. } | Op::Issue { .. } | Op::Activate { .. }
        ) && self.done.is_closed()
    }
}

/// One transaction for the batch: each item's rows, then all their audit events in item order.
/// `None`: rolled back because a caller gave up meanwhile (see `Job::abandoned`).
async fn write_batch(
    pool: &PgPool,
    jobs: &[Job],
) -> Result<Option<Vec<Result<(), StoreError>>>, StoreError> {
    let mut tx = pool.begin().await?;
    // New grants go in together, intents and grants born active alike (the common cases under
    // load: Postgres-user intents and API-token exchanges).
    let inserts: Vec<postgres::GrantInsert<'_>> = jobs
        .iter()
        .filter_map(|j| match &j.op {
            Op::Begin { grant, jti } => Some((&**grant, jti.as_ref(), "issuing")),
            Op::Issue { grant, jti } => Some((&**grant, jti.as_ref(), "active")),
            _ => None,
        })
        .collect();
    let mut inserted = postgres::insert_grants(&mut tx, &inserts)
        .await?
        .into_iter();
    let mut outcomes = Vec::with_capacity(jobs.len());
    for job in jobs {
        let r = match &job.op {
            Op::Begin { .. } | Op::Issue { .. } => inserted
                .next()
                .unwrap_or_else(|| Err(StoreError::Conflict("batch out of step".to_owned()))),
            Op::Activate {
                id,
                expires_at,
                details,
            } => postgres::activate_rows(&mut tx, *id, *expires_at, details).await,
            Op::Finish { id, cause, now } => {
                grants::finish_rows(&mut Conn::Pg(&mut tx), *id, *cause, *now).await
            }
            Op::Append => Ok(()),
        };
        match r {
            Ok(()) => outcomes.push(Ok(())),
            // Decided before the item wrote anything: drop the item, keep the batch.
            Err(e @ (StoreError::Replayed | StoreError::Conflict(_))) => outcomes.push(Err(e)),
            Err(e) => return Err(e),
        }
    }
    let audits: Vec<&AuditEvent> = jobs
        .iter()
        .zip(&outcomes)
        .filter(|(_, o)| o.is_ok())
        .filter_map(|(j, _)| j.audit.as_ref())
        .collect();
    audit_log::append(&mut Conn::Pg(&mut tx), &audits).await?;
    // Last look before the commit (a caller leaving after this point is not seen: its grant is
    // committed without a response, and simply expires; nobody holds its credentials).
    if jobs.iter().any(Job::abandoned) {
        tx.rollback().await?;
        return Ok(None);
    }
    tx.commit().await?;
    Ok(Some(outcomes))
}

/// The batch's error for each of its callers (`StoreError` holds no handle, so copy it).
fn same(e: &StoreError) -> StoreError {
    match e {
        StoreError::Replayed => StoreError::Replayed,
        StoreError::Conflict(s) => StoreError::Conflict(s.clone()),
        StoreError::Unavailable(s) => StoreError::Unavailable(s.clone()),
        StoreError::BadUrl(s) => StoreError::BadUrl(s.clone()),
        StoreError::Rejected(s) => StoreError::Rejected(s.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{Action, Outcome};
    use crate::providers::{CredentialKind, IssuedCredential};
    use crate::store::Backend;
    use crate::store::testdb::TestDb;

    fn grant() -> NewGrant {
        let id = Uuid::now_v7();
        let now = OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap();
        NewGrant {
            id,
            revocation_hash: crate::secret::sha256_hex(id.as_bytes()),
            issuer: "github".to_owned(),
            subject: "repo:acme/app:ref:refs/heads/main".to_owned(),
            repository: Some("acme/app".to_owned()),
            repository_id: Some("42".to_owned()),
            job: serde_json::json!({"run_id": "1"}),
            bundle_digest: "sha256:bundle".to_owned(),
            created_at: now,
            expires_at: now + time::Duration::minutes(5),
            credentials: vec![IssuedCredential {
                name: "deploy".to_owned(),
                kind: CredentialKind::ApiToken,
                resource_id: format!("tok-{id}"),
                details: serde_json::Value::Null,
            }],
        }
    }

    /// A Postgres test store and its pool (these tests call `write_batch` directly). The
    /// `TestDb` drops the database when it goes out of scope, so callers keep it.
    async fn postgres_store() -> (TestDb, crate::store::Store, PgPool) {
        let db = TestDb::postgres().await;
        let store = db.store();
        let Backend::Postgres(pool) = &store.backend else {
            unreachable!("TestDb::postgres is a Postgres store")
        };
        let pool = pool.clone();
        (db, store, pool)
    }

    async fn audit_events(store: &crate::store::Store) -> Vec<AuditEvent> {
        let filter = crate::store::AuditFilter {
            limit: 10,
            ..Default::default()
        };
        store.audit_events(&filter).await.unwrap()
    }

    fn issue(g: &NewGrant) -> (Job, oneshot::Receiver<Result<(), StoreError>>) {
        let (done, rx) = oneshot::channel();
        let mut audit = AuditEvent::new(g.created_at, Action::Exchange, Outcome::Allow, "ok");
        audit.grant_id = Some(g.id);
        let op = Op::Issue {
            grant: Box::new(g.clone()),
            jti: None,
        };
        let audit = Some(audit);
        (Job { op, audit, done }, rx)
    }

    /// A caller that stopped waiting (its request timed out) must not get a grant committed
    /// behind its back: the batch rolls back, and the others are written without it.
    #[tokio::test]
    async fn an_abandoned_issue_is_never_committed() {
        let (_db, store, pool) = postgres_store().await;
        let pool = &pool;
        let (gone, kept) = (grant(), grant());
        let (gone_job, gone_rx) = issue(&gone);
        let (kept_job, mut kept_rx) = issue(&kept);
        let mut jobs = vec![gone_job, kept_job];
        drop(gone_rx);

        assert!(
            write_batch(pool, &jobs).await.unwrap().is_none(),
            "rolled back"
        );
        assert!(store.grant(gone.id).await.unwrap().is_none());
        assert!(store.grant(kept.id).await.unwrap().is_none());

        jobs.retain(|j| !j.abandoned());
        assert_eq!(jobs.len(), 1);
        let outcomes = write_batch(pool, &jobs).await.unwrap().expect("committed");
        assert!(outcomes[0].is_ok());
        assert!(store.grant(kept.id).await.unwrap().is_some());
        assert!(store.grant(gone.id).await.unwrap().is_none());
        assert!(
            kept_rx.try_recv().is_err(),
            "the writer loop answers, not write_batch"
        );
        let events = audit_events(&store).await;
        assert_eq!(events.len(), 1, "only the kept grant's allow event");
        assert_eq!(events[0].grant_id, Some(kept.id));
    }

    /// An item the database refuses (a NUL that bypassed the text boundary: these tests call
    /// the writer directly) fails alone with `Rejected`; the honest items batched with it
    /// commit, each with its event, and the chain stays whole.
    #[tokio::test]
    async fn a_refused_item_fails_alone_and_the_others_commit() {
        let (_db, store, pool) = postgres_store().await;
        let (a, mut bad, c) = (grant(), grant(), grant());
        bad.subject = "repo:acme/app\0".to_owned();
        let ((ja, mut ra), (jb, mut rb), (jc, mut rc)) = (issue(&a), issue(&bad), issue(&c));
        let mut jobs = vec![ja, jb, jc];
        commit_jobs(&pool, &mut jobs).await;
        assert!(jobs.is_empty(), "every caller answered");
        assert!(matches!(ra.try_recv(), Ok(Ok(()))));
        let refused = rb.try_recv();
        assert!(
            matches!(&refused, Ok(Err(StoreError::Rejected(_)))),
            "{refused:?}"
        );
        assert!(matches!(rc.try_recv(), Ok(Ok(()))));
        assert!(store.grant(a.id).await.unwrap().is_some());
        assert!(store.grant(bad.id).await.unwrap().is_none());
        assert!(store.grant(c.id).await.unwrap().is_some());
        assert_eq!(audit_events(&store).await.len(), 2);
        assert!(store.verify_audit_chain().await.unwrap().is_intact());
    }

    /// Intents go through the batch too: `issuing`, no audit event, and a token used twice in
    /// one batch is a replay for the second use (nothing of it written).
    #[tokio::test]
    async fn intents_are_batched_and_a_reused_token_is_refused() {
        let (_db, store, pool) = postgres_store().await;
        let pool = &pool;
        let (a, b) = (grant(), grant());
        let jti = JtiRecord {
            iss: "https://issuer.test".to_owned(),
            jti: "same-token".to_owned(),
            expires_at: a.expires_at,
        };
        let begin = |g: &NewGrant| {
            let (done, rx) = oneshot::channel();
            let op = Op::Begin {
                grant: Box::new(g.clone()),
                jti: Some(jti.clone()),
            };
            (
                Job {
                    op,
                    audit: None,
                    done,
                },
                rx,
            )
        };
        let ((ja, _ra), (jb, _rb)) = (begin(&a), begin(&b));
        let outcomes = write_batch(pool, &[ja, jb])
            .await
            .unwrap()
            .expect("committed");
        assert!(outcomes[0].is_ok());
        assert!(matches!(outcomes[1], Err(StoreError::Replayed)));
        let stored = store.grant(a.id).await.unwrap().expect("intent written");
        assert_eq!(stored.status, crate::store::GrantStatus::Issuing);
        assert!(store.grant(b.id).await.unwrap().is_none());
        let events = audit_events(&store).await;
        assert!(events.is_empty(), "an intent has no audit event of its own");
    }
}

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
//!   (see `postgres::insert_active_grants`, `activate_rows`, `finish_rows`), so a refused item leaves
//!   nothing in the batch and the others commit.
//! - Any other error fails the whole batch: every caller gets it and nothing of the batch is
//!   written (the transaction rolls back), which the callers already handle (fail closed).
//! - No added latency: a writer takes whatever is queued when it becomes free; a lone request
//!   is written alone, at once.

use super::postgres;
use super::{JtiRecord, NewGrant, RevokeCause, StoreError};
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

/// The state change that goes with an audit event.
pub(super) enum Op {
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
    audit: AuditEvent,
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
    /// Start the writers on a thread of their own, with their own connections.
    ///
    /// Why a thread: a writer holds the chain head lock from its `SELECT … FOR UPDATE` until its
    /// commit. On the request runtime it would queue behind every request task between two
    /// statements (verifying and signing are CPU work), stretching that hold and so serialising
    /// the whole replica on it. On its own thread the OS schedules it as soon as Postgres
    /// answers. The connections are opened on that thread's runtime for the same reason.
    pub(super) fn start(pool: &PgPool) -> Result<Self, StoreError> {
        let (queue, rx) = mpsc::channel(QUEUE);
        let options = (*pool.connect_options()).clone();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|_| StoreError::Unavailable("cannot start the store writer".to_owned()))?;
        std::thread::Builder::new()
            .name("store-writer".to_owned())
            .spawn(move || {
                runtime.block_on(async move {
                    let pool = sqlx::postgres::PgPoolOptions::new()
                        .max_connections(WRITERS as u32)
                        .min_connections(0)
                        .acquire_timeout(super::codec::ACQUIRE_TIMEOUT)
                        .connect_lazy_with(options);
                    let rx = Arc::new(Mutex::new(rx));
                    let writers: Vec<_> = (0..WRITERS)
                        .map(|_| tokio::spawn(writer(pool.clone(), rx.clone())))
                        .collect();
                    for w in writers {
                        let _ = w.await;
                    }
                    pool.close().await;
                });
            })
            .map_err(|_| StoreError::Unavailable("cannot start the store writer".to_owned()))?;
        Ok(Self { queue })
    }

    /// Write `op` with `audit` and wait for the commit that holds them.
    pub(super) async fn submit(&self, op: Op, audit: &AuditEvent) -> Result<(), StoreError> {
        let (done, result) = oneshot::channel();
        let job = Job {
            op,
            audit: audit.clone(),
            done,
        };
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
        loop {
            jobs.retain(|j| !j.abandoned());
            if jobs.is_empty() {
                break;
            }
            match write_batch(&pool, &jobs).await {
                Ok(Some(outcomes)) => {
                    for (job, outcome) in jobs.drain(..).zip(outcomes) {
                        let _ = job.done.send(outcome);
                    }
                    break;
                }
                // A caller gave up while the batch was written: rolled back; again without it.
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, items = jobs.len(), "store batch failed");
                    for job in jobs.drain(..) {
                        let _ = job.done.send(Err(same(&e)));
                    }
                    break;
                }
            }
        }
    }
}

impl Job {
    /// An issue or activation whose caller stopped waiting (its request timed out or the client
    /// went away). Its response was never sent, so it must not be committed: an `Issue` then
    /// leaves nothing (its tokens never left the process) and an `Activate` leaves the grant
    /// `issuing` for the reaper to revoke, as when a lone transaction is dropped. Revocation
    /// finishes and refusals' audit events are written whoever waits for them.
    fn abandoned(&self) -> bool {
        matches!(self.op, Op::Issue { .. } | Op::Activate { .. }) && self.done.is_closed()
    }
}

/// One transaction for the batch: each item's rows, then all their audit events in item order.
/// `None`: rolled back because a caller gave up meanwhile (see `Job::abandoned`).
async fn write_batch(
    pool: &PgPool,
    jobs: &[Job],
) -> Result<Option<Vec<Result<(), StoreError>>>, StoreError> {
    let mut tx = pool.begin().await?;
    // Grants born active go in together (the common case under load: API-token exchanges).
    let issues: Vec<(&NewGrant, Option<&JtiRecord>)> = jobs
        .iter()
        .filter_map(|j| match &j.op {
            Op::Issue { grant, jti } => Some((&**grant, jti.as_ref())),
            _ => None,
        })
        .collect();
    let mut issued = postgres::insert_active_grants(&mut tx, &issues)
        .await?
        .into_iter();
    let mut outcomes = Vec::with_capacity(jobs.len());
    for job in jobs {
        let r = match &job.op {
            Op::Issue { .. } => issued
                .next()
                .unwrap_or_else(|| Err(StoreError::Conflict("batch out of step".to_owned()))),
            Op::Activate {
                id,
                expires_at,
                details,
            } => postgres::activate_rows(&mut tx, *id, *expires_at, details).await,
            Op::Finish { id, cause, now } => {
                postgres::finish_rows(&mut tx, *id, *cause, *now).await
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
        .map(|(j, _)| &j.audit)
        .collect();
    postgres::insert_audits(&mut tx, &audits).await?;
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

    fn issue(g: &NewGrant) -> (Job, oneshot::Receiver<Result<(), StoreError>>) {
        let (done, rx) = oneshot::channel();
        let mut audit = AuditEvent::new(g.created_at, Action::Exchange, Outcome::Allow, "ok");
        audit.grant_id = Some(g.id);
        let op = Op::Issue {
            grant: Box::new(g.clone()),
            jti: None,
        };
        (Job { op, audit, done }, rx)
    }

    /// A caller that stopped waiting (its request timed out) must not get a grant committed
    /// behind its back: the batch rolls back, and the others are written without it.
    #[tokio::test]
    async fn an_abandoned_issue_is_never_committed() {
        let db = TestDb::postgres().await;
        let store = db.store();
        let Backend::Postgres(pool) = &store.backend else {
            unreachable!("TestDb::postgres is a Postgres store")
        };
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
        let events = store
            .audit_events(&crate::store::AuditFilter {
                limit: 10,
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(events.len(), 1, "only the kept grant's allow event");
        assert_eq!(events[0].grant_id, Some(kept.id));
    }
}

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
        match write_batch(&pool, &jobs).await {
            Ok(outcomes) => {
                for (job, outcome) in jobs.drain(..).zip(outcomes) {
                    let _ = job.done.send(outcome);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, items = jobs.len(), "store batch failed");
                for job in jobs.drain(..) {
                    let _ = job.done.send(Err(same(&e)));
                }
            }
        }
    }
}

/// One transaction for the batch: each item's rows, then all their audit events in item order.
async fn write_batch(
    pool: &PgPool,
    jobs: &[Job],
) -> Result<Vec<Result<(), StoreError>>, StoreError> {
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
    tx.commit().await?;
    Ok(outcomes)
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

//! Group commit: the writes of registrations running at the same time share one transaction.
//!
//! A commit with `synchronous=FULL` costs an fsync and, through sqlx, about 120 µs of CPU;
//! a statement about 20 µs (`../shared/reference/anchors.md` §3.3). Each registration writes
//! its operation, its hub identity and twin (the `record` driver) and its outcome. One writer
//! task takes every write that is waiting, runs them in one transaction and answers each
//! caller after the commit, so a write is acknowledged only once it is durable, and under load
//! the commit is paid once per batch instead of once per write. When a batch fails, its writes
//! are run again one by one, so one bad write cannot fail the others.

use std::sync::Arc;

use futures_util::future::BoxFuture;
use sqlx::{AnyConnection, AnyPool};
use tokio::sync::{mpsc, oneshot, Mutex};

use super::{Result, StoreError};

/// One write: runs its statements on the connection of the batch's transaction. It may run
/// twice (once in a failed batch, rolled back, then alone), so it must not consume its data.
pub(super) type Job =
    Arc<dyn for<'c> Fn(&'c mut AnyConnection) -> BoxFuture<'c, Result<()>> + Send + Sync>;

/// The most writes in one transaction; bounds the time a batch holds SQLite's write lock.
const MAX_BATCH: usize = 128;
/// Writes that may wait for the writer before callers wait to enqueue.
const QUEUE: usize = 4096;

type Pending = (Job, oneshot::Sender<Result<()>>);

/// The handle to the writer task.
#[derive(Debug, Clone)]
pub(super) struct Batcher {
    sender: mpsc::Sender<Pending>,
}

impl Batcher {
    /// Starts the writer on the current runtime. `gate` serializes it with SQLite's other
    /// writers.
    pub(super) fn start(pool: AnyPool, gate: Option<Arc<Mutex<()>>>) -> Self {
        let (sender, receiver) = mpsc::channel(QUEUE);
        tokio::spawn(writer(pool, gate, receiver));
        Self { sender }
    }

    /// Runs `job` in the next batch; returns once that batch is committed (or the job failed).
    pub(super) async fn run(&self, job: Job) -> Result<()> {
        let (reply, answer) = oneshot::channel();
        self.sender
            .send((job, reply))
            .await
            .map_err(|_| StoreError::Corrupt("the database writer has stopped".to_owned()))?;
        answer
            .await
            .map_err(|_| StoreError::Corrupt("the database writer has stopped".to_owned()))?
    }
}

async fn writer(
    pool: AnyPool,
    gate: Option<Arc<Mutex<()>>>,
    mut receiver: mpsc::Receiver<Pending>,
) {
    let mut batch: Vec<Pending> = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = receiver.recv().await {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match receiver.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let _gate = match &gate {
            Some(gate) => Some(gate.lock().await),
            None => None,
        };
        let jobs: Vec<&Job> = batch.iter().map(|(job, _)| job).collect();
        if run_in_one_transaction(&pool, &jobs).await.is_ok() {
            for (_, reply) in batch.drain(..) {
                let _ = reply.send(Ok(()));
            }
        } else {
            for (job, reply) in batch.drain(..) {
                let _ = reply.send(run_in_one_transaction(&pool, &[&job]).await);
            }
        }
    }
}

async fn run_in_one_transaction(pool: &AnyPool, jobs: &[&Job]) -> Result<()> {
    let mut tx = pool.begin().await?;
    for job in jobs {
        job(&mut tx).await?;
    }
    tx.commit().await?;
    Ok(())
}

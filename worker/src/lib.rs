//! The DataFlow worker: claims batches from the SQL ledger, processes their records in
//! chunks under a fenced lease, and completes, retries or dead-letters them.
//!
//! Layout:
//! - [`Worker::run`]: the SQL claim loop (bounded concurrency, wake-ups, graceful shutdown);
//!   its interval follows the events [`Mode`]: short while polling, a rare safety sweep
//!   while the broker delivers `BatchReady`;
//! - [`consumer`]: the `batch.ready` consumer, claiming through the same path;
//! - [`Worker::claim_next`], [`Worker::claim_batch`], [`Worker::start`], [`Worker::step`]:
//!   one batch, one chunk at a time, so tests can drive a worker deterministically;
//! - [`bundle`]: small batches claimed together and completed in one commit;
//! - [`jobs`]: the follow-up jobs (email, report, webhook) on apalis workers;
//! - [`leader`]: the fleet leader's lease, and the singleton duties that run only there
//!   (the job sweeper in [`jobs`], [`summaries`]: the daily per-client summaries on
//!   apalis-cron, and [`charts`]: the minute samples the dashboard's charts draw), and
//!   [`reclaim`]: taking back the batches of workers that are gone.

mod budget;
mod bundle;
pub mod charts;
mod chunks;
pub mod consumer;
pub mod jobs;
pub mod leader;
pub mod membership;
pub mod reclaim;
pub mod summaries;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dataflow_contracts::BatchId;
use dataflow_contracts::events::{BatchCompleted, Envelope, Event};
use dataflow_contracts::live::LiveKind;
use dataflow_platform::config::WorkerConfig;
use dataflow_platform::coordination::mutex::{Acquired, BatchMutex};
use dataflow_platform::dashboard::live::LiveBus;
use dataflow_platform::domain::compiled::CompiledSchemas;
use dataflow_platform::events::Mode;
use dataflow_platform::ledger::{Bundle, ChunkResult, Claimable, Db, FailOutcome, Lease};
use dataflow_platform::traces;

use crate::budget::Budget;
use crate::chunks::{Chunks, Handed, Source};
use dataflow_platform::{Error, Result};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, broadcast, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

/// What happened to one batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Completed(BatchCompleted),
    /// The attempt failed; the batch is `ready` again from `at_ms`.
    Retrying {
        at_ms: i64,
    },
    Dead,
    /// More records were refused than the error threshold allows: nothing was written,
    /// and the batch is `rejected` (`too_many_errors`).
    Refused,
    /// Handed back on shutdown, to resume from its checkpoint.
    Released,
    /// Another worker holds the batch now; nothing of this attempt after its last chunk
    /// was written.
    LeaseLost,
}

/// What a claim of one named batch (a `BatchReady` delivery) found.
#[derive(Debug)]
pub enum BatchClaim {
    /// The batch claimed, and after it the followers of its bundle, if any
    /// ([`Worker::claim_for`]).
    Taken(Vec<Lease>),
    /// Another worker holds it (its mutex or an unexpired lease).
    Held,
    /// It exists but is not claimable: done, dead, rejected, awaiting approval, due later,
    /// or `ready` while its client is at its `max_concurrent_batches` (it waits in the
    /// ledger for a claim once a place is free).
    NotClaimable,
    /// This ledger has no such batch.
    Unknown,
}

/// What wakes the claim loop besides its timer.
pub struct WakeUps {
    /// In-process events (`BatchReady` wakes it).
    pub events: broadcast::Receiver<Arc<Envelope>>,
    /// The events mode, which picks the polling interval.
    pub mode: watch::Receiver<Mode>,
    /// The interval while the broker is healthy.
    pub safety_sweep: Duration,
}

/// A claimed batch whose file is being read a chunk at a time, advanced one chunk per
/// [`Worker::step`].
pub struct BatchRun {
    pub lease: Lease,
    chunks: Chunks,
}

/// One step of a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Chunk(ChunkResult),
    Completed(BatchCompleted),
    /// The batch was refused whole, for this reason.
    Refused(String),
}

/// Counters for operators and tests.
#[derive(Debug, Default)]
pub struct WorkerStats {
    pub completed: AtomicU64,
    pub failed: AtomicU64,
    pub fence_rejections: AtomicU64,
    /// `batch.ready` deliveries settled by the consumer, and the batches they took.
    pub deliveries: AtomicU64,
    pub delivery_claims: AtomicU64,
    /// Batches completed together with others, in a bundle's shared commit.
    pub bundled: AtomicU64,
}

#[derive(Clone)]
pub struct Worker {
    db: Db,
    config: WorkerConfig,
    id: String,
    /// Where claims and outcomes are announced to dashboards.
    live: Arc<LiveBus>,
    stats: Arc<WorkerStats>,
    mutex: Arc<BatchMutex>,
    /// Batch mutexes this worker holds, by batch and lease epoch (a worker that re-claims a
    /// batch after its own lease expired must not release the newer lock with the old).
    locks: Arc<Mutex<HashMap<(BatchId, i64), rslock::Lock>>>,
    /// One per batch in flight, shared by the claim loop and the broker consumer: the
    /// slots any client may fill, and those kept for clients with nothing in progress
    /// (`worker.reserved_slots`).
    permits: Arc<Semaphore>,
    reserve: Arc<Semaphore>,
    /// The records all its batches may hold in memory at once (`worker.records_in_memory`),
    /// in two parts: the open slots' room, and the room kept for the batches of the
    /// reserved slots (`WorkerConfig::reserved_records`).
    budget: Budget,
    reserved_room: Budget,
    inflight: TaskTracker,
    /// Asks in-flight batches to stop at the next chunk and hand their batch back.
    release: CancellationToken,
    /// Claim without waiting for the (long) sweep: a failed attempt is due again, or a
    /// batch ended and freed a place under its client's cap.
    claim_now: Arc<Notify>,
    schemas: Arc<CompiledSchemas>,
}

/// Why an attempt failed, and whether another attempt could help.
struct AttemptError {
    message: String,
    permanent: bool,
}

impl From<Error> for AttemptError {
    fn from(e: Error) -> Self {
        // The message is stored with the batch, which its tenant reads: a fault inside
        // DataFlow is recorded by what failed, and its cause goes to the log only.
        let message = match &e {
            Error::Internal { context, .. } => {
                tracing::error!(error = %e, "internal fault in a batch attempt");
                context.clone()
            }
            _ => e.to_string(),
        };
        AttemptError {
            message,
            // The batch's state refuses it for good (its stored file is unreadable, or
            // retention deleted it): no attempt can do better.
            permanent: matches!(e, Error::Conflict(_)),
        }
    }
}

impl Worker {
    pub fn new(db: Db, config: WorkerConfig, mutex: Arc<BatchMutex>, live: Arc<LiveBus>) -> Self {
        Self {
            db,
            id: worker_id(),
            live,
            stats: Arc::default(),
            permits: Arc::new(Semaphore::new(config.concurrency - config.reserved_slots())),
            reserve: Arc::new(Semaphore::new(config.reserved_slots())),
            budget: Budget::new(config.records_in_memory - config.reserved_records()),
            reserved_room: Budget::new(config.reserved_records()),
            config,
            mutex,
            locks: Arc::default(),
            inflight: TaskTracker::new(),
            release: CancellationToken::new(),
            claim_now: Arc::default(),
            schemas: Arc::default(),
        }
    }

    /// This process's worker identity (host, pid and a random part).
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn stats(&self) -> &WorkerStats {
        &self.stats
    }

    /// Batches whose holders are gone and whose leases were ended ([`reclaim`]): their
    /// mutexes are broken too, and the claim loop looks for them now rather than at its
    /// next poll.
    pub async fn take_back(&self, batches: &[BatchId]) {
        for batch in batches {
            self.mutex.break_lock(batch).await;
        }
        self.claim_now.notify_one();
    }

    /// Batches being processed right now.
    pub fn in_flight(&self) -> usize {
        self.inflight.len()
    }

    fn lease_ms(&self) -> i64 {
        i64::try_from(self.config.lease_secs.saturating_mul(1000)).unwrap_or(i64::MAX)
    }

    /// Claims the next available batch of any client, if any, alone.
    pub async fn claim_next(&self) -> Result<Option<Lease>> {
        let mut leases = self.claim_as(Claimable::AnyClient, Bundle::ONE).await?;
        Ok(leases.pop())
    }

    /// Claims the next batch `slot` may hold (a reserved slot takes only a batch of a
    /// client with nothing in progress) and, when it is small, the bundle of the same
    /// client's small batches that follow it (`worker.bundle_batches`, within one chunk's
    /// records). Empty when nothing is available.
    pub async fn claim_for(&self, slot: &Slot) -> Result<Vec<Lease>> {
        self.claim_as(slot.claimable(), self.bundle()).await
    }

    fn bundle(&self) -> Bundle {
        Bundle {
            records: self.config.chunk_size as u64,
            batches: self.config.bundle_batches,
        }
    }

    /// With the Redlock mutex the batch is locked first and leased second; batches locked
    /// by other workers are left to them. A bundle's followers are leased without a lock:
    /// the claim takes them in its own transaction, holding their client's row, so no
    /// other claim can race for them, and no worker sees them as claimable until their
    /// leases lapse.
    async fn claim_as(&self, claimable: Claimable, bundle: Bundle) -> Result<Vec<Lease>> {
        if matches!(*self.mutex, BatchMutex::SqlOnly) {
            return self
                .db
                .claim_next(&self.id, self.lease_ms(), claimable, bundle)
                .await;
        }
        let candidates = self
            .db
            .claimable_batches(self.config.concurrency as u32 * 2, claimable)
            .await?;
        for id in candidates {
            let lock = match self
                .mutex
                .acquire(&id, Duration::from_secs(self.config.lease_secs))
                .await
            {
                Acquired::Contended => continue,
                Acquired::Held(lock) => Some(lock),
                Acquired::Degraded => None,
            };
            match self
                .db
                .claim(&id, &self.id, self.lease_ms(), claimable, bundle)
                .await
            {
                Ok(leases) if leases.is_empty() => release(lock).await,
                Ok(leases) => {
                    if let Some(lock) = lock {
                        self.locks_held().insert((id, leases[0].epoch), lock);
                    }
                    return Ok(leases);
                }
                Err(e) => {
                    release(lock).await;
                    return Err(e);
                }
            }
        }
        Ok(Vec::new())
    }

    /// Claims the batch a `BatchReady` names, through the same mutex and fenced lease as
    /// [`Worker::claim_next`].
    pub async fn claim_batch(&self, id: &BatchId) -> Result<BatchClaim> {
        let lock = match self
            .mutex
            .acquire(id, Duration::from_secs(self.config.lease_secs))
            .await
        {
            Acquired::Contended => return Ok(BatchClaim::Held),
            Acquired::Held(lock) => Some(lock),
            Acquired::Degraded => None,
        };
        match self
            .db
            .claim(
                id,
                &self.id,
                self.lease_ms(),
                Claimable::AnyClient,
                Bundle::ONE,
            )
            .await
        {
            Ok(leases) if leases.is_empty() => {
                release(lock).await;
                self.unclaimed(id).await
            }
            Ok(leases) => {
                if let Some(lock) = lock {
                    self.locks_held()
                        .insert((id.clone(), leases[0].epoch), lock);
                }
                Ok(BatchClaim::Taken(leases))
            }
            Err(e) => {
                release(lock).await;
                Err(e)
            }
        }
    }

    /// What keeps a batch no claim took from being claimed.
    async fn unclaimed(&self, id: &BatchId) -> Result<BatchClaim> {
        Ok(match self.db.get_batch(None, id).await? {
            None => BatchClaim::Unknown,
            Some(b) if b.status == dataflow_contracts::BatchStatus::Processing => BatchClaim::Held,
            Some(_) => BatchClaim::NotClaimable,
        })
    }

    /// Claims for a `BatchReady` delivery of batch `id`. The delivery is a wake-up: the
    /// batch claimed is the fair share's next, as in the claim loop, which is another
    /// client's when it is theirs to go, or nothing while every waiting client is at its
    /// cap; the named batch then stays `ready` in the ledger for a later claim. A delivery
    /// naming no batch of this ledger claims nothing.
    pub async fn claim_delivered(&self, id: &BatchId, slot: &Slot) -> Result<BatchClaim> {
        if self.db.get_batch(None, id).await?.is_none() {
            return Ok(BatchClaim::Unknown);
        }
        let leases = self.claim_for(slot).await?;
        if leases.is_empty() {
            return self.unclaimed(id).await;
        }
        Ok(BatchClaim::Taken(leases))
    }

    /// Waits for a free slot (one per batch in flight), an open one before a reserved one;
    /// `None` on `shutdown`.
    pub async fn slot(&self, shutdown: &CancellationToken) -> Option<Slot> {
        // Shutdown first: no claim may start once it began.
        if shutdown.is_cancelled() {
            return None;
        }
        if let Ok(permit) = self.permits.clone().try_acquire_owned() {
            return Some(Slot::open(permit));
        }
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => None,
            p = self.permits.clone().acquire_owned() => p.ok().map(Slot::open),
            p = self.reserve.clone().acquire_owned() => p.ok().map(Slot::reserved),
        }
    }

    /// Processes claimed batches (one, or a bundle) in the background, holding `slot` until
    /// they end.
    pub fn spawn_process(&self, leases: Vec<Lease>, slot: Slot) {
        let worker = self.clone();
        self.inflight.spawn(async move {
            let room = worker.room_of(&slot);
            worker
                .process_all_in_room(leases, room, &worker.release.clone())
                .await;
            drop(slot);
            // The client's cap may have held back a batch of its own that nothing else
            // announces: look now, not at the next poll.
            worker.claim_now.notify_one();
        });
    }

    fn locks_held(&self) -> std::sync::MutexGuard<'_, HashMap<(BatchId, i64), rslock::Lock>> {
        self.locks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Renews the batch mutex along with the lease (best effort).
    async fn extend_lock(&self, lease: &Lease) {
        let slot = (lease.batch_id.clone(), lease.epoch);
        let held = self.locks_held().remove(&slot);
        if let Some(lock) = held {
            // On failure keep the old lock: it still expires on its own, and the fence decides.
            let lock = self
                .mutex
                .extend(&lock, Duration::from_secs(self.config.lease_secs))
                .await
                .unwrap_or(lock);
            self.locks_held().insert(slot, lock);
        }
    }

    /// Ends this worker's hold on the batch mutex, whatever became of the batch.
    async fn unlock(&self, lease: &Lease) {
        let held = self
            .locks_held()
            .remove(&(lease.batch_id.clone(), lease.epoch));
        release(held).await;
    }

    /// Where the batches a slot holds take their records' room.
    fn room_of(&self, slot: &Slot) -> &Budget {
        if slot.reserved {
            &self.reserved_room
        } else {
            &self.budget
        }
    }

    /// Starts reading and preparing the records after the lease's checkpoint.
    pub async fn start(&self, lease: Lease) -> Result<BatchRun> {
        self.start_in_room(lease, &self.budget).await
    }

    /// [`Worker::start`], the records taking their room in `room`.
    async fn start_in_room(&self, lease: Lease, room: &Budget) -> Result<BatchRun> {
        let budget = room.for_client(&lease.client_id);
        self.start_in(lease, budget).await
    }

    /// [`Worker::start`], its chunks taking their room in `budget`.
    #[tracing::instrument(skip_all, fields(batch_id = %lease.batch_id, checkpoint = lease.checkpoint))]
    async fn start_in(&self, lease: Lease, budget: Budget) -> Result<BatchRun> {
        let Some((payload_id, bytes)) = lease.payload.clone() else {
            return Err(Error::Conflict(format!(
                "the payload of batch {} was deleted when its retention ended; submit the \
                 file again",
                lease.batch_id
            )));
        };
        let schema = lease
            .schema
            .as_ref()
            .map(|s| s.compiled(&lease.client_id, &self.schemas))
            .transpose()?;
        let chunks = Chunks::start(Source {
            db: self.db.clone(),
            payload_id,
            bytes,
            format: lease.format,
            schema,
            policy: lease.policy.clone(),
            chunk_size: self.config.chunk_size,
            checkpoint: lease.checkpoint,
            records: lease.records_total,
            budget,
        });
        Ok(BatchRun { lease, chunks })
    }

    /// The next chunk, keeping the lease (and the batch mutex) while it is prepared: before
    /// one, a worker may read a long stretch of a large file.
    async fn next_chunk(&self, lease: &Lease, chunks: &mut Chunks) -> Result<Option<Handed>> {
        let every = Duration::from_millis(u64::try_from(self.lease_ms() / 3).unwrap_or(1).max(1));
        let mut renew = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        let next = chunks.next();
        tokio::pin!(next);
        loop {
            tokio::select! {
                chunk = &mut next => return chunk,
                _ = renew.tick() => {
                    self.db.renew_lease(lease, self.lease_ms()).await?;
                    self.extend_lock(lease).await;
                }
            }
        }
    }

    /// Commits the next chunk; the last one completes the batch in the same transaction
    /// (as does a step on a batch with no chunk left). A step is a span, from the chunk's
    /// preparation to its commit; a completion is a span of its own inside it.
    pub async fn step(&self, run: &mut BatchRun) -> Result<Step> {
        let span = tracing::info_span!(
            "chunk",
            records = tracing::field::Empty,
            checkpoint = tracing::field::Empty,
        );
        self.step_in(run, &span).instrument(span.clone()).await
    }

    async fn step_in(&self, run: &mut BatchRun, span: &tracing::Span) -> Result<Step> {
        let completion = || tracing::info_span!("complete", batch_id = %run.lease.batch_id);
        let next = self.next_chunk(&run.lease, &mut run.chunks).await?;
        if let Some(Handed::Chunk { chunk, .. }) = &next {
            span.record("records", chunk.records.len() as u64 + chunk.failed);
            span.record("checkpoint", chunk.checkpoint);
        }
        match next {
            Some(Handed::Refused {
                reason,
                failed,
                errors,
            }) => {
                self.db
                    .refuse_batch(&run.lease, failed, &errors, &reason)
                    .await?;
                Ok(Step::Refused(reason))
            }
            None => Ok(Step::Completed(
                self.db
                    .complete_batch(&run.lease)
                    .instrument(completion())
                    .await?,
            )),
            // The room goes back once the chunk is committed (or its commit failed).
            Some(Handed::Chunk {
                chunk,
                last: true,
                room: _room,
            }) => Ok(Step::Completed(
                self.db
                    .commit_last_chunk(&run.lease, &chunk)
                    .instrument(completion())
                    .await?,
            )),
            Some(Handed::Chunk {
                chunk,
                last: false,
                room: _room,
            }) => {
                let written = self
                    .db
                    .commit_chunk(&run.lease, self.lease_ms(), &chunk)
                    .await?;
                self.extend_lock(&run.lease).await;
                Ok(Step::Chunk(written))
            }
        }
    }

    /// Claims and fully processes one batch; `None` when nothing was available.
    pub async fn try_process_one(&self) -> Result<Option<Outcome>> {
        match self.claim_next().await? {
            Some(lease) => Ok(Some(self.process(lease, &CancellationToken::new()).await)),
            None => Ok(None),
        }
    }

    /// Processes a claimed batch to its end. `release` asks to stop at the next chunk
    /// boundary and hand the batch back. Its span continues the submit's trace, whichever
    /// way the batch was claimed.
    pub async fn process(&self, lease: Lease, release: &CancellationToken) -> Outcome {
        self.process_in_room(lease, &self.budget, release).await
    }

    /// [`Worker::process`], the batch's records taking their room in `room`.
    pub(crate) async fn process_in_room(
        &self,
        lease: Lease,
        room: &Budget,
        release: &CancellationToken,
    ) -> Outcome {
        let span = tracing::info_span!(
            "process",
            batch_id = %lease.batch_id,
            attempt = lease.attempts,
            otel.status_code = tracing::field::Empty,
        );
        traces::follow(&span, lease.traceparent.as_deref());
        let outcome = self
            .process_in(lease, room, release)
            .instrument(span.clone())
            .await;
        if matches!(outcome, Outcome::Retrying { .. } | Outcome::Dead) {
            span.record("otel.status_code", "ERROR");
        }
        outcome
    }

    async fn process_in(
        &self,
        lease: Lease,
        room: &Budget,
        release: &CancellationToken,
    ) -> Outcome {
        if lease.takeovers > self.config.max_takeovers {
            // Its holders died or stalled mid-batch every time: a poison batch.
            let error = AttemptError {
                message: format!(
                    "taken over {} times: every worker holding it died or stalled before \
                     its lease ran out",
                    lease.takeovers
                ),
                permanent: true,
            };
            let outcome = self.fail(&lease, error).await;
            self.unlock(&lease).await;
            self.announce(&lease, &outcome);
            return outcome;
        }
        self.live
            .publish(LiveKind::BatchProcessing, lease.batch_id.as_str());
        let claimed = std::time::Instant::now();
        if lease.attempts == 1 && !lease.took_over {
            metrics::histogram!("dataflow_batch_enqueue_to_start_seconds")
                .record(lease.waited_ms as f64 / 1000.0);
        }
        let worker = self.clone();
        let task_lease = lease.clone();
        let (release, room) = (release.clone(), room.clone());
        // A panic in processing must end the attempt, not the worker.
        let joined = tokio::spawn(
            async move { worker.run_batch(task_lease, &room, &release).await }.in_current_span(),
        )
        .await;
        let result = joined.unwrap_or_else(|e| {
            Err(AttemptError {
                message: format!("processing panicked: {}", panic_message(e)),
                permanent: false,
            })
        });
        let outcome = match result {
            Ok(outcome) => outcome,
            Err(e) => self.fail(&lease, e).await,
        };
        self.unlock(&lease).await;
        record_outcome(&outcome, &lease, claimed);
        self.announce(&lease, &outcome);
        outcome
    }

    /// Tells dashboards how an attempt ended (after its transaction committed).
    fn announce(&self, lease: &Lease, outcome: &Outcome) {
        let kind = match outcome {
            Outcome::Completed(_) => LiveKind::BatchCompleted,
            Outcome::Retrying { .. } => LiveKind::BatchFailed,
            Outcome::Dead => LiveKind::BatchDead,
            Outcome::Refused => LiveKind::BatchRejected,
            Outcome::Released => LiveKind::BatchReady,
            // Another worker holds the batch now and announces what it does with it.
            Outcome::LeaseLost => return,
        };
        self.live.publish(kind, lease.batch_id.as_str());
    }

    async fn run_batch(
        &self,
        lease: Lease,
        room: &Budget,
        release: &CancellationToken,
    ) -> Result<Outcome, AttemptError> {
        let mut run = match self.start_in_room(lease, room).await {
            Ok(run) => run,
            Err(e) => return Err(e.into()),
        };
        loop {
            if release.is_cancelled() {
                return Ok(match self.db.release_batch(&run.lease).await {
                    Ok(()) => Outcome::Released,
                    Err(e) => self.lease_error(&run.lease, e)?,
                });
            }
            match self.step(&mut run).await {
                Ok(Step::Chunk(_)) => {}
                Ok(Step::Completed(done)) => {
                    self.stats.completed.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(
                        records = done.records_total,
                        failed = done.records_failed,
                        "batch completed"
                    );
                    return Ok(Outcome::Completed(done));
                }
                Ok(Step::Refused(reason)) => {
                    tracing::info!(%reason, "batch refused: too many records refused");
                    return Ok(Outcome::Refused);
                }
                Err(e) => return self.lease_error(&run.lease, e),
            }
        }
    }

    /// A lost lease is an outcome, not a failure: someone else owns the batch now.
    fn lease_error(&self, lease: &Lease, e: Error) -> Result<Outcome, AttemptError> {
        match e {
            Error::FenceRejected { .. } => {
                self.stats.fence_rejections.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("dataflow_fence_rejections_total").increment(1);
                tracing::warn!(batch_id = %lease.batch_id, epoch = lease.epoch, "lease lost; write refused by the fence");
                Ok(Outcome::LeaseLost)
            }
            other => Err(other.into()),
        }
    }

    async fn fail(&self, lease: &Lease, error: AttemptError) -> Outcome {
        self.stats.failed.fetch_add(1, Ordering::Relaxed);
        let max_attempts = if error.permanent {
            0
        } else {
            self.config.max_attempts
        };
        let outcome = self
            .db
            .fail_batch(
                lease,
                &error.message,
                max_attempts,
                self.backoff_ms(lease.attempts),
            )
            .await;
        match outcome {
            Ok(FailOutcome::Dead) => {
                tracing::error!(batch_id = %lease.batch_id, error = %error.message, "batch is dead");
                Outcome::Dead
            }
            Ok(FailOutcome::Retry { at_ms }) => {
                let (due, delay) = (
                    self.claim_now.clone(),
                    Duration::from_millis(
                        u64::try_from(self.backoff_ms(lease.attempts)).unwrap_or(0),
                    ),
                );
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    due.notify_one();
                });
                tracing::warn!(batch_id = %lease.batch_id, error = %error.message, retry_at_ms = at_ms, "attempt failed; will retry");
                Outcome::Retrying { at_ms }
            }
            Err(Error::FenceRejected { .. }) => {
                self.stats.fence_rejections.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("dataflow_fence_rejections_total").increment(1);
                Outcome::LeaseLost
            }
            Err(e) => {
                // The lease expires and another attempt picks the batch up.
                tracing::error!(batch_id = %lease.batch_id, error = %e, "could not record the failed attempt");
                Outcome::LeaseLost
            }
        }
    }

    fn backoff_ms(&self, attempt: u32) -> i64 {
        let ms =
            exponential_backoff_ms(self.config.retry_base_ms, self.config.retry_max_ms, attempt);
        i64::try_from(ms).unwrap_or(i64::MAX)
    }

    /// How long the claim loop may sleep while the broker carries the wake-ups: the safety
    /// sweep, unless a lease runs out or a batch falls due sooner (neither is announced on
    /// the broker). Never less than the poll interval, so a batch that is due but held by
    /// another worker's mutex does not spin the loop.
    async fn until_next_claim(&self, sweep: Duration) -> Duration {
        let floor = Duration::from_millis(self.config.poll_interval_ms).min(sweep);
        match self.db.next_claim_in_ms().await {
            Ok(Some(ms)) => {
                Duration::from_millis(u64::try_from(ms).unwrap_or(0)).clamp(floor, sweep)
            }
            Ok(None) => sweep,
            Err(e) => {
                tracing::warn!(error = %e, "could not read when the next batch falls due");
                floor
            }
        }
    }

    /// The claim loop: up to `concurrency` batches at once (shared with the consumer),
    /// woken by `BatchReady` events, retries falling due, a change of mode and the poll
    /// timer. On `shutdown` it stops claiming, lets in-flight batches finish for the grace
    /// period, then releases what is left at the next chunk boundary.
    pub async fn run(self, mut wake: WakeUps, shutdown: CancellationToken) {
        tracing::info!(worker_id = %self.id, concurrency = self.config.concurrency, "worker started");
        loop {
            let Some(slot) = self.slot(&shutdown).await else {
                break;
            };
            match self.claim_for(&slot).await {
                Ok(leases) if leases.is_empty() => {}
                Ok(leases) => {
                    self.spawn_process(leases, slot);
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "claim failed; retrying after the poll interval")
                }
            }
            drop(slot);
            let mode = *wake.mode.borrow();
            let poll = match mode {
                Mode::Broker => self.until_next_claim(wake.safety_sweep).await,
                Mode::Embedded | Mode::Polling => {
                    Duration::from_millis(self.config.poll_interval_ms)
                }
            };
            let sleep = tokio::time::sleep(poll);
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = &mut sleep => break,
                    _ = self.claim_now.notified() => break,
                    changed = wake.mode.changed() => {
                        if changed.is_err() {
                            // No one sets the mode any more: the timer alone drives the loop.
                            sleep.as_mut().await;
                        }
                        break;
                    }
                    ev = wake.events.recv() => match ev {
                        Ok(env) if matches!(env.event, Event::BatchReady(_)) => break,
                        Ok(_) => continue,
                        Err(broadcast::error::RecvError::Lagged(_)) => break,
                        Err(broadcast::error::RecvError::Closed) => { sleep.as_mut().await; break }
                    },
                }
            }
        }
        self.inflight.close();
        let grace = Duration::from_secs(self.config.shutdown_grace_secs);
        if tokio::time::timeout(grace, self.inflight.wait())
            .await
            .is_err()
        {
            tracing::info!("grace period over; releasing in-flight batches");
            self.release.cancel();
            self.inflight.wait().await;
        }
        tracing::info!(worker_id = %self.id, "worker stopped");
    }
}

/// A worker's place for one batch in flight, held from the claim to the batch's outcome.
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    /// One of the slots kept for clients with nothing in progress.
    reserved: bool,
}

impl Slot {
    fn open(permit: OwnedSemaphorePermit) -> Slot {
        Slot {
            _permit: permit,
            reserved: false,
        }
    }

    fn reserved(permit: OwnedSemaphorePermit) -> Slot {
        Slot {
            _permit: permit,
            reserved: true,
        }
    }

    fn claimable(&self) -> Claimable {
        if self.reserved {
            Claimable::IdleClients
        } else {
            Claimable::AnyClient
        }
    }
}

async fn release(lock: Option<rslock::Lock>) {
    if let Some(lock) = lock {
        lock.release().await;
    }
}

fn panic_message(e: tokio::task::JoinError) -> String {
    match e.try_into_panic() {
        Ok(p) => panic_text(p.as_ref()),
        Err(e) => e.to_string(),
    }
}

/// What a panic said, when it said it as text.
fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// base × 2^(attempt−1), capped at `max_ms`.
pub(crate) fn exponential_backoff_ms(base_ms: u64, max_ms: u64, attempt: u32) -> u64 {
    base_ms
        .saturating_mul(1u64 << attempt.saturating_sub(1).min(30))
        .min(max_ms)
}

/// This process's worker identity: host, pid and a random part.
pub fn worker_id() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "host".into());
    let nonce = dataflow_contracts::EventId::generate();
    let tail = &nonce.as_str()[nonce.as_str().len() - 6..];
    format!("{host}-{}-{tail}", std::process::id())
}

/// Batches by outcome; for completed ones their latencies and records by outcome.
fn record_outcome(outcome: &Outcome, lease: &Lease, claimed: std::time::Instant) {
    let name = match outcome {
        Outcome::Completed(done) => {
            let since_enqueue = lease.waited_ms as f64 / 1000.0 + claimed.elapsed().as_secs_f64();
            metrics::histogram!("dataflow_batch_enqueue_to_complete_seconds").record(since_enqueue);
            metrics::histogram!("dataflow_batch_duration_seconds")
                .record(done.duration_ms as f64 / 1000.0);
            for (what, n) in [
                ("written", done.records_written),
                ("unchanged", done.records_unchanged),
                ("superseded", done.records_superseded),
                ("failed", done.records_failed),
            ] {
                metrics::counter!("dataflow_records_total", "outcome" => what).increment(n);
            }
            "completed"
        }
        Outcome::Retrying { .. } => "retrying",
        Outcome::Dead => "dead",
        Outcome::Refused => "refused",
        Outcome::Released => "released",
        Outcome::LeaseLost => "lease_lost",
    };
    metrics::counter!("dataflow_batches_total", "outcome" => name).increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fault_inside_dataflow_is_recorded_for_the_tenant_without_its_cause() {
        let cause = std::io::Error::other("thread 'x' panicked at src/secret.rs:1");
        let e = AttemptError::from(Error::internal("record preparation panicked", cause));
        assert_eq!(e.message, "record preparation panicked");
        assert!(!e.permanent);
        let outage = AttemptError::from(Error::NotFound);
        assert_eq!(outage.message, "not found");
    }
}

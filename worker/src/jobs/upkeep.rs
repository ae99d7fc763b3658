//! The loops that keep the job queue honest to the SQL ledger:
//! - the relay hands due intents to Redis, never more than the working set per kind;
//! - the heartbeat marks this process alive (on DataFlow's Redis lists);
//! - the sweeper, on the fleet's leader alone, first reaps: it takes back the in-flight jobs
//!   of workers that stopped beating (a `kill -9`), counting their attempt; then it takes
//!   back what a queue lost (Redis flushed or failed over) and what a dead embedded-mode
//!   worker held. Reaping and sweeping in one loop on one process is what keeps them apart:
//!   a reap removes a dead worker's jobs from Redis before it settles them in SQL, and a
//!   sweep running in between would take them for lost and requeue them uncounted.
//!   Once a minute it also applies the retentions: finished jobs, the payloads of ended
//!   batches (each client's `payload_retention_secs`) and expired uploads are deleted.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use dataflow_contracts::jobs::{JobKind, JobMessage, JobStatus, JobTicket};
use dataflow_platform::Result;
use dataflow_platform::jobqueue::{JobQueues, RedisJobQueue};
use dataflow_platform::ledger::commits::CommitWake;
use dataflow_platform::ledger::{Db, Failure, Handover};
use tokio::sync::Notify;

use crate::leader::Mandate;
use tokio_util::sync::CancellationToken;

/// Intents handed to Redis per round and kind.
const RELAY_BATCH: usize = 1_000;
/// Expired leases checked per sweep.
const SWEEP_BATCH: u32 = 1_000;
const HEARTBEAT: Duration = Duration::from_secs(1);
const PRUNE_EVERY: Duration = Duration::from_secs(60);
const PRUNE_BATCH: u32 = 1_000;
const PRUNE_ROUNDS: usize = 20;
/// Batches whose payload one transaction deletes: a payload may hold many parts, and a
/// short transaction never holds the ledger's writer for long.
const EXPIRE_BATCH: u32 = 100;

pub struct JobRelaySettings {
    pub kinds: Vec<JobKind>,
    pub working_set: usize,
    pub lease: Duration,
    pub poll: Duration,
}

/// Hands due intents to the Redis queues until `stop`.
pub async fn relay(
    db: Db,
    queues: RedisJobQueue,
    settings: JobRelaySettings,
    commits: Arc<CommitWake>,
    stop: CancellationToken,
) {
    let wakes: Vec<Arc<Notify>> = settings.kinds.iter().map(|&k| commits.jobs(k)).collect();
    while !stop.is_cancelled() {
        let mut busy = false;
        for &kind in &settings.kinds {
            match relay_round(&db, &queues, kind, &settings).await {
                Ok(moved) => busy |= moved == RELAY_BATCH,
                Err(e) => tracing::warn!(%kind, error = %e, "job relay round failed; retrying"),
            }
        }
        if busy {
            continue;
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = futures::future::select_all(wakes.iter().map(|w| Box::pin(w.notified()))) => {}
            _ = tokio::time::sleep(settings.poll) => {}
        }
    }
}

async fn relay_round(
    db: &Db,
    queue: &RedisJobQueue,
    kind: JobKind,
    settings: &JobRelaySettings,
) -> Result<usize> {
    queue.tidy(kind).await?;
    let held = usize::try_from(queue.outstanding(kind).await?).unwrap_or(usize::MAX);
    let room = settings.working_set.saturating_sub(held).min(RELAY_BATCH);
    if room == 0 {
        return Ok(0);
    }
    let lease_ms = u64::try_from(settings.lease.as_millis()).unwrap_or(u64::MAX);
    let jobs = db
        .take_due_jobs(kind, room, Handover::Queue, lease_ms)
        .await?;
    if let Err(e) = queue.push(kind, &jobs).await {
        // The push may have applied all the same (its reply was lost): hand back at once only
        // what Redis is found not to hold. When Redis cannot say, the jobs stay queued, and
        // the sweeper looks for them once their lease runs out.
        let tickets: Vec<JobTicket> = jobs.iter().map(JobMessage::ticket).collect();
        let tickets: Vec<&JobTicket> = tickets.iter().collect();
        if let Err(unknown) = look_for(db, Some(queue), kind, &tickets, settings.lease).await {
            tracing::warn!(
                %kind, jobs = tickets.len(), error = %unknown,
                "cannot tell whether a failed push reached Redis; the sweeper will look"
            );
        }
        return Err(e);
    }
    Ok(jobs.len())
}

#[derive(Debug, Clone, Copy)]
pub struct SweepSettings {
    /// How long a job handed to Redis may stay unfinished before it is looked for.
    pub lease: Duration,
    /// Time between sweeps.
    pub every: Duration,
    /// Done jobs older than this are deleted.
    pub retention: Duration,
    /// A worker silent this long is dead: its in-flight jobs are reaped.
    pub dead_worker: Duration,
}

/// Until `stop`: every `settings.every` reaps dead workers (on DataFlow's Redis lists) and
/// then takes back lost jobs; once a minute prunes old finished jobs and deletes stored
/// files past their retention. Runs on the leader, each step only while `mandate` holds.
pub async fn sweeper(
    db: Db,
    queues: Option<RedisJobQueue>,
    settings: SweepSettings,
    mandate: Mandate,
    stop: CancellationToken,
) {
    let lists = queues.as_ref().and_then(RedisJobQueue::lists);
    let mut last_prune: Option<tokio::time::Instant> = None;
    while !stop.is_cancelled() {
        'round: {
            if !may_act(&mandate) {
                break 'round;
            }
            if let Some(lists) = lists
                && let Err(e) = reap(&db, lists, settings.dead_worker).await
            {
                tracing::warn!(error = %e, "reaping dead job workers failed");
            }
            if !may_act(&mandate) {
                break 'round;
            }
            if let Err(e) = sweep(&db, queues.as_ref(), settings.lease).await {
                tracing::warn!(error = %e, "job sweep failed; retrying");
            }
            if last_prune.is_some_and(|t| t.elapsed() < PRUNE_EVERY) || !may_act(&mandate) {
                break 'round;
            }
            last_prune = Some(tokio::time::Instant::now());
            match prune(&db, settings.retention).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(jobs = n, "pruned finished jobs past their retention"),
                Err(e) => tracing::warn!(error = %e, "pruning finished jobs failed"),
            }
            if !may_act(&mandate) {
                break 'round;
            }
            match expire_stored(&db).await {
                Ok(done) if done == Expired::default() => {}
                Ok(done) => tracing::info!(
                    payload_bytes = done.payload_bytes,
                    uploads = done.uploads,
                    "deleted stored files past their retention"
                ),
                Err(e) => {
                    tracing::warn!(error = %e, "deleting stored files past their retention failed")
                }
            }
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(settings.every) => {}
        }
    }
}

/// Whether the sweeper may act now as the leader; says so when it may not.
fn may_act(mandate: &Mandate) -> bool {
    let holds = mandate.holds();
    if !holds {
        tracing::warn!(
            "the leader lease may have lapsed (this process was held up): the job sweeper \
             waits for the lease to be renewed or lost"
        );
    }
    holds
}

/// Deletes finished jobs past `retention`, in small transactions so a large backlog of old
/// rows never holds a long lock; at most `PRUNE_ROUNDS` batches per call.
pub async fn prune(db: &Db, retention: Duration) -> Result<u64> {
    let retention_ms = i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
    let mut total = 0;
    for _ in 0..PRUNE_ROUNDS {
        let n = db.prune_done_jobs(retention_ms, PRUNE_BATCH).await?;
        total += n;
        if n < u64::from(PRUNE_BATCH) {
            break;
        }
    }
    Ok(total)
}

/// What [`expire_stored`] deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Expired {
    /// Bytes of batch payloads whose retention was over.
    pub payload_bytes: u64,
    /// Uploads that expired unfinished (or whose import was made).
    pub uploads: u64,
}

/// Deletes the payloads of each client's ended batches once its policy's
/// `payload_retention_secs` is over (read now, so a changed policy applies at the next
/// round), then the expired uploads; at most `PRUNE_ROUNDS` small transactions per client
/// and for the uploads, so a large backlog is worked off over several calls.
pub async fn expire_stored(db: &Db) -> Result<Expired> {
    let mut expired = Expired::default();
    for client in db.list_clients().await? {
        let retention_ms = i64::try_from(client.policy.payload_retention_secs)
            .unwrap_or(i64::MAX)
            .saturating_mul(1000);
        for _ in 0..PRUNE_ROUNDS {
            let round = db
                .expire_payloads(&client.id, retention_ms, EXPIRE_BATCH)
                .await?;
            metrics::counter!("dataflow_payload_bytes_expired_total").increment(round.bytes);
            expired.payload_bytes += round.bytes;
            if round.batches < u64::from(EXPIRE_BATCH) {
                break;
            }
        }
    }
    for _ in 0..PRUNE_ROUNDS {
        let n = db.expire_uploads(EXPIRE_BATCH).await?;
        metrics::counter!("dataflow_uploads_expired_total").increment(n);
        expired.uploads += n;
        if n < u64::from(EXPIRE_BATCH) {
            break;
        }
    }
    Ok(expired)
}

/// One sweep: expired SQL claims go back (or die); queued jobs past their lease are looked
/// for in Redis and handed over again when Redis no longer has them.
pub async fn sweep(db: &Db, queues: Option<&RedisJobQueue>, lease: Duration) -> Result<()> {
    let expired = db.expire_running_jobs().await?;
    if expired > 0 {
        tracing::warn!(
            jobs = expired,
            "took back jobs from a worker that stopped mid-attempt"
        );
    }
    let mut by_kind: BTreeMap<&str, (JobKind, Vec<JobTicket>)> = BTreeMap::new();
    for (ticket, kind) in db.expired_queued_jobs(SWEEP_BATCH).await? {
        by_kind
            .entry(kind.as_str())
            .or_insert_with(|| (kind, Vec::new()))
            .1
            .push(ticket);
    }
    for (kind, tickets) in by_kind.into_values() {
        let tickets: Vec<&JobTicket> = tickets.iter().collect();
        let requeued = look_for(db, queues, kind, &tickets, lease).await?;
        if requeued > 0 {
            tracing::warn!(%kind, jobs = requeued, "the queue lost jobs; handed them over again");
        }
    }
    Ok(())
}

/// Looks for queued deliveries of `kind` in Redis: those it holds keep their place for
/// another `lease`, the others are handed over again. Returns how many were.
async fn look_for(
    db: &Db,
    queues: Option<&RedisJobQueue>,
    kind: JobKind,
    tickets: &[&JobTicket],
    lease: Duration,
) -> Result<u64> {
    // Without Redis (it was removed from the config) nothing holds them any more.
    let held = match queues {
        Some(q) => q.holds(kind, tickets).await?,
        None => vec![false; tickets.len()],
    };
    let (still, lost): (Vec<_>, Vec<_>) = tickets.iter().zip(held).partition(|(_, h)| *h);
    let still: Vec<&JobTicket> = still.into_iter().map(|(t, _)| *t).collect();
    let lost: Vec<&JobTicket> = lost.into_iter().map(|(t, _)| *t).collect();
    let lease_ms = u64::try_from(lease.as_millis()).unwrap_or(u64::MAX);
    db.extend_job_leases(&still, lease_ms).await?;
    db.requeue_lost_jobs(&lost).await
}

/// Beats this worker's heart until `stop`, so the leader's reaper leaves its jobs alone.
pub async fn heartbeat(queues: JobQueues, worker: String, stop: CancellationToken) {
    while !stop.is_cancelled() {
        if let Err(e) = queues.heartbeat(&worker).await {
            tracing::warn!(error = %e, "job worker heartbeat failed");
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(HEARTBEAT) => {}
        }
    }
}

/// Takes back the jobs of dead workers: the attempt they were on counts (so a job that
/// kills its worker every time ends up dead, not looping), and they are due again at once.
pub async fn reap(db: &Db, queues: &JobQueues, dead_after: Duration) -> Result<usize> {
    let taken = queues.reap(dead_after).await?;
    for (kind, delivery) in &taken {
        let id = &delivery.message.id;
        let status = db
            .fail_job(
                &delivery.message.ticket(),
                true,
                "the worker running it stopped (no heartbeat)",
                Failure::Retry { backoff_ms: 0 },
            )
            .await?;
        match status {
            Some(JobStatus::Dead) => {
                tracing::error!(job = %id, %kind, "job dead-lettered after its worker died")
            }
            Some(_) => tracing::warn!(job = %id, %kind, "took back a job from a dead worker"),
            None => {}
        }
    }
    Ok(taken.len())
}

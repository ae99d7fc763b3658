//! Follow-up jobs (email, report, webhook) run by apalis workers, one per kind.
//!
//! The flow: an event's transaction writes job intents in SQL → with Redis, the relay
//! ([`upkeep::relay`]) hands due intents to the Redis queue of their kind, bounded by the
//! working set; without it, workers claim intents from SQL → a pump ([`feed::pump`]) feeds an
//! apalis worker → the handler runs → the settler ([`settle`]) records the result in SQL and
//! only then removes the Redis message. The sweeper and its reaper ([`upkeep`]), on the
//! fleet's leader, take back whatever a crash or a Redis loss strands.
//!
//! Layout: [`feed`] (the apalis backend), [`settle`] (results), [`upkeep`] (relay, sweeper,
//! heartbeat, reaper), [`handlers`] (what each kind does).

pub mod feed;
pub mod handlers;
pub mod settle;
pub mod upkeep;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use apalis::prelude::{AbortError, BackendExt, BoxDynError, Data, WorkerBuilder, WorkerBuilderExt};
use dataflow_contracts::events::Envelope;
use dataflow_contracts::jobs::{JobKind, JobMessage, JobTicket};
use dataflow_platform::config::JobsConfig;
use dataflow_platform::dashboard::live::LiveBus;
use dataflow_platform::jobqueue::{Consumer, JobQueues, RedisJobQueue};
use dataflow_platform::ledger::Db;
use dataflow_platform::ledger::commits::{CommitWake, Kinds, kinds_for_event};
use dataflow_platform::traces;
use futures::future::BoxFuture;
use tokio::sync::{broadcast, mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::leader;
use feed::{Inbox, JobFeed, Receipt, Source};
use settle::{Backoff, Origin, Settler};

/// Why an attempt failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum JobError {
    /// Worth another attempt after the backoff.
    #[error("{0}")]
    Retry(String),
    /// No retry can fix it: the job is dead-lettered at once.
    #[error("{0}")]
    Permanent(String),
    /// Not attempted now (a cap of deliveries at once is reached): back to the queue
    /// shortly, without spending an attempt or holding a worker slot while it waits.
    #[error("{0}")]
    Defer(String),
}

/// What running one job means; [`handlers::Handlers`] in production, anything in benchmarks.
pub trait JobHandler: Send + Sync + 'static {
    fn handle<'a>(&'a self, job: &'a JobMessage) -> BoxFuture<'a, Result<(), JobError>>;
}

/// Everything the job workers of one process need.
pub struct JobsSetup {
    pub db: Db,
    /// `None`: embedded mode, jobs are claimed from SQL.
    pub queue: Option<RedisJobQueue>,
    pub config: JobsConfig,
    pub handler: Arc<dyn JobHandler>,
    pub kinds: Vec<JobKind>,
    /// This process's worker identity.
    pub worker_id: String,
    /// Batch events relayed by this process: a new one may have written intents.
    pub events: broadcast::Receiver<Arc<Envelope>>,
    /// Signalled per kind after this process committed intents of it.
    pub commits: Arc<CommitWake>,
    /// Where dead-lettered jobs are announced to dashboards.
    pub live: Arc<LiveBus>,
    /// Whether this worker leads the fleet: the sweeper runs only then. A receiver whose
    /// sender is gone and that holds [`leader::Term::alone`] makes this process sweep on
    /// its own.
    pub leading: watch::Receiver<leader::Term>,
}

/// Jobs one take moves into a worker's channel at most.
const TAKE_BATCH: usize = 256;
/// How often an idle apalis-redis worker looks for tasks (it is not woken by a push).
const APALIS_POLL: Duration = Duration::from_millis(20);

/// Runs the job workers and their upkeep until `stop`, then shuts down cleanly: running
/// jobs finish (bounded by the job timeout), results are settled, and jobs taken but not
/// started go back to their queue.
pub async fn run(setup: JobsSetup, stop: CancellationToken) {
    let JobsSetup {
        db,
        queue,
        config,
        handler,
        kinds,
        worker_id,
        events,
        commits,
        live,
        leading,
    } = setup;
    let lease = Duration::from_secs(config.requeue_after_secs);
    let poll = Duration::from_millis(config.poll_interval_ms);
    let timeout = Duration::from_secs(config.timeout_secs);
    let backoff = Backoff {
        base_ms: config.retry_base_ms,
        max_ms: config.retry_max_ms,
    };
    let lists = queue.as_ref().and_then(RedisJobQueue::lists).cloned();
    let pump_stop = stop.child_token();
    let mut pumps = JoinSet::new();
    let mut workers = JoinSet::new();
    let mut settlers = JoinSet::new();
    let mut leftovers = Vec::new();

    for &kind in &kinds {
        let name = format!("{kind}-{worker_id}");
        let (settler, results) = settle::channel(4 * config.concurrency.max(TAKE_BATCH));
        if let Some(RedisJobQueue::Apalis(q)) = &queue {
            settlers.spawn(settle::run(
                db.clone(),
                live.clone(),
                kind,
                Origin::Apalis,
                backoff,
                results,
            ));
            let worker = WorkerBuilder::new(name)
                .backend(q.storage(kind).poll_with_interval(APALIS_POLL))
                .data(SharedHandler {
                    handler: handler.clone(),
                    kind,
                    system: "redis",
                })
                .data(SettleFirst {
                    db: db.clone(),
                    settler,
                    timeout,
                })
                .concurrency(config.concurrency)
                .build(run_apalis_job);
            workers.spawn(until_stopped(kind, worker.run_until(stopped(stop.clone()))));
            continue;
        }
        let (source, origin) = match &lists {
            // Strays are given back twice per dead-worker timeout: a message a lost take
            // reply stranded goes back within about the time the reaper takes for a dead
            // worker's.
            Some(q) => {
                let consumer = Consumer::new(q.queue(kind), worker_id.clone());
                let strays_every = Duration::from_millis(config.dead_worker_ms / 2);
                (
                    Source::redis(consumer.clone(), strays_every),
                    Origin::Lists(Box::new(consumer)),
                )
            }
            // A claim's lease covers one attempt (the timeout) with room to settle it.
            None => {
                let source = Source::Sql {
                    db: db.clone(),
                    kind,
                    worker_id: worker_id.clone(),
                    lease: timeout.saturating_mul(2),
                    poll,
                    wake: commits.jobs(kind),
                    short: false,
                };
                (source, Origin::SqlClaim)
            }
        };
        let system = if lists.is_some() { "redis" } else { "sql" };
        let (tx, rx) = mpsc::channel(TAKE_BATCH);
        let rx = Arc::new(Mutex::new(rx));
        leftovers.push((kind, rx.clone()));
        pumps.spawn(feed::pump(source, tx, TAKE_BATCH, pump_stop.clone()));
        settlers.spawn(settle::run(
            db.clone(),
            live.clone(),
            kind,
            origin,
            backoff,
            results,
        ));

        let worker = WorkerBuilder::new(name)
            .backend(JobFeed::new(rx, settler))
            .data(SharedHandler {
                handler: handler.clone(),
                kind,
                system,
            })
            .concurrency(config.concurrency)
            .timeout(timeout)
            .build(run_job);
        workers.spawn(until_stopped(kind, worker.run_until(stopped(stop.clone()))));
    }

    let mut upkeep = JoinSet::new();
    upkeep.spawn(wake_on_events(events, commits.clone(), stop.clone()));
    let sweep = upkeep::SweepSettings {
        lease,
        every: poll.max(Duration::from_secs(1)),
        retention: Duration::from_secs(config.retention_secs),
        dead_worker: Duration::from_millis(config.dead_worker_ms),
    };
    let (sweep_db, sweep_queue) = (db.clone(), queue.clone());
    upkeep.spawn(leader::while_leading(
        leading,
        stop.clone(),
        move |token, mandate| {
            upkeep::sweeper(sweep_db.clone(), sweep_queue.clone(), sweep, mandate, token)
        },
    ));
    if let Some(q) = &queue {
        let settings = upkeep::JobRelaySettings {
            kinds: kinds.clone(),
            working_set: config.redis_working_set,
            lease,
            poll,
        };
        upkeep.spawn(upkeep::relay(
            db.clone(),
            q.clone(),
            settings,
            commits.clone(),
            stop.clone(),
        ));
    }
    // On DataFlow's lists every worker beats its heart for the leader's reaper
    // (apalis-redis workers beat their own and take back each other's tasks).
    if let Some(q) = &lists {
        upkeep.spawn(upkeep::heartbeat(
            q.clone(),
            worker_id.clone(),
            stop.clone(),
        ));
    }

    stop.cancelled().await;
    pump_stop.cancel();
    while pumps.join_next().await.is_some() {}
    while workers.join_next().await.is_some() {}
    // The workers are gone, and with them every settler handle: drain the results.
    while settlers.join_next().await.is_some() {}
    while upkeep.join_next().await.is_some() {}
    hand_back(&db, lists.as_ref(), &worker_id, leftovers).await;
}

/// Resolves when `stop` is cancelled: the shutdown signal of an apalis worker.
pub(crate) async fn stopped(stop: CancellationToken) -> std::io::Result<()> {
    stop.cancelled().await;
    Ok(())
}

/// Runs one worker to its end and logs how it ended.
async fn until_stopped<E: std::fmt::Display>(
    kind: JobKind,
    run: impl Future<Output = Result<(), E>>,
) {
    if let Err(e) = run.await {
        tracing::error!(%kind, error = %e, "job worker stopped with an error");
    }
}

/// After the results are settled: what was taken but never started goes back.
async fn hand_back(
    db: &Db,
    queues: Option<&JobQueues>,
    worker_id: &str,
    leftovers: Vec<(JobKind, Inbox)>,
) {
    for (kind, rx) in leftovers {
        let result = match queues {
            // The in-flight list holds exactly the unsettled messages, channel included.
            Some(q) => q.queue(kind).release(worker_id).await,
            None => {
                let mut unstarted: Vec<JobTicket> = Vec::new();
                if let Ok(mut rx) = rx.lock() {
                    while let Ok(task) = rx.try_recv() {
                        unstarted.push(task.args.ticket());
                    }
                }
                let tickets: Vec<&JobTicket> = unstarted.iter().collect();
                db.hand_back_claims(&tickets).await
            }
        };
        match result {
            Ok(0) => {}
            Ok(n) => tracing::info!(%kind, jobs = n, "handed back unstarted jobs"),
            Err(e) => {
                tracing::warn!(%kind, error = %e, "handing back unstarted jobs failed; they will be swept")
            }
        }
    }
    if let Some(q) = queues
        && let Err(e) = q.leave(worker_id).await
    {
        tracing::warn!(error = %e, "leaving the job worker set failed");
    }
}

/// The handler as apalis task data, with the queue it runs the jobs of.
#[derive(Clone)]
struct SharedHandler {
    handler: Arc<dyn JobHandler>,
    kind: JobKind,
    /// What carries the queue's messages (`messaging.system`): `redis`, or `sql` when
    /// workers claim jobs from the ledger.
    system: &'static str,
}

impl SharedHandler {
    /// The consumer span of one attempt (OpenTelemetry messaging conventions), continuing
    /// the trace of the completion that asked for the job.
    fn span(&self, job: &JobMessage) -> tracing::Span {
        let span = tracing::info_span!(
            "job",
            otel.name = %format_args!("process {}", self.kind),
            otel.kind = "consumer",
            otel.status_code = tracing::field::Empty,
            "messaging.system" = self.system,
            "messaging.operation.type" = "process",
            "messaging.destination.name" = self.kind.as_str(),
            "messaging.message.id" = job.id.as_str(),
            batch_id = %job.batch_id,
            attempt = job.attempts + 1,
        );
        traces::follow(&span, job.traceparent.as_deref());
        span
    }
}

/// The apalis handler: every kind goes through the same entry point.
async fn run_job(job: JobMessage, handler: Data<SharedHandler>) -> Result<(), JobError> {
    attempt(&handler, &job).await
}

/// One attempt. A panic is a failed attempt like any other (retried, counted), not a dead
/// worker.
async fn attempt(shared: &SharedHandler, job: &JobMessage) -> Result<(), JobError> {
    let span = shared.span(job);
    let attempt = std::panic::AssertUnwindSafe(shared.handler.handle(job));
    let result = match futures::FutureExt::catch_unwind(attempt)
        .instrument(span.clone())
        .await
    {
        Ok(result) => result,
        Err(panic) => Err(JobError::Retry(format!(
            "the job panicked: {}",
            crate::panic_text(panic.as_ref())
        ))),
    };
    // A deferred job was not attempted: not a failure.
    if matches!(result, Err(JobError::Retry(_) | JobError::Permanent(_))) {
        span.record("otel.status_code", "ERROR");
    }
    result
}

/// What an apalis-redis worker's handler needs to record its result before apalis acks.
#[derive(Clone)]
struct SettleFirst {
    db: Db,
    settler: Settler,
    timeout: Duration,
}

/// The handler on apalis-redis: the run takes its delivery in SQL, then the attempt, then
/// its result into SQL, and only then back to apalis, which removes the task from Redis.
/// SQL decides what comes next (done, a retry after the backoff, dead), so a failure goes
/// back to apalis as an abort: apalis must not retry on its own.
///
/// apalis re-runs a task under the same message when it judges the worker gone, so the
/// message alone cannot tell a worker presumed dead that answers late from its successor:
/// taking the delivery at the start of each run ([`Db::start_queued_run`]) does.
async fn run_apalis_job(
    job: JobMessage,
    handler: Data<SharedHandler>,
    settle: Data<SettleFirst>,
) -> Result<(), BoxDynError> {
    let ticket = match settle.db.start_queued_run(&job.ticket()).await {
        Ok(Some(ticket)) => ticket,
        // Settled by an earlier run, or handed over again: this copy has nothing to do.
        Ok(None) => return Ok(()),
        // The job stays queued in SQL; the sweeper hands it over again once its lease
        // lapses and Redis no longer has it.
        Err(e) => {
            let e = JobError::Retry(format!("could not start the run in the ledger: {e}"));
            return Err(AbortError::new(e).into());
        }
    };
    let result = match tokio::time::timeout(settle.timeout, attempt(&handler, &job)).await {
        Ok(r) => r,
        Err(_) => Err(JobError::Retry(format!(
            "the attempt timed out after {:?}",
            settle.timeout
        ))),
    };
    let receipt = Receipt {
        ticket,
        attempts: job.attempts,
        delivery: None,
    };
    settle.settler.settle_and_wait(receipt, &result).await;
    result.map_err(|e| AbortError::new(e).into())
}

/// An event this process relays may come with intents written elsewhere (by an API
/// process, which runs no jobs): wake the workers of the kinds it can have written. This
/// process's own commits wake them directly ([`CommitWake`]).
async fn wake_on_events(
    mut events: broadcast::Receiver<Arc<Envelope>>,
    commits: Arc<CommitWake>,
    stop: CancellationToken,
) {
    loop {
        let kinds = tokio::select! {
            _ = stop.cancelled() => return,
            e = events.recv() => match e {
                Ok(env) => kinds_for_event(&env.event),
                Err(broadcast::error::RecvError::Lagged(_)) => Kinds::all(),
                // The relay is gone (shutdown).
                Err(broadcast::error::RecvError::Closed) => return,
            },
        };
        commits.wake_jobs(kinds);
    }
}

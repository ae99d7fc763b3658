//! The apalis backend of DataFlow's jobs: a pump takes jobs from their source (the Redis
//! queue, or SQL in embedded mode) into a small channel, and the apalis worker polls that
//! channel. Every result passes the backend's acknowledgement layer ([`Settler`]), which
//! records it in SQL first and only then removes the message from Redis.
//!
//! Why not apalis-redis: as 1.0.0 ships it fails above some thousands of due tasks, locks
//! in O(backlog) and does not wake an idle worker on push (docs/performance.md). Here
//! the working set in Redis is bounded by the relay, a take is O(batch), and an idle pump
//! waits in `BLMOVE`, so a push reaches a handler in one round trip.

use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use apalis::prelude::{
    AcknowledgeLayer, Backend, RandomId, Task, TaskBuilder, TaskId, WorkerContext,
};
use apalis_core::backend::BackendConfig;
use apalis_core::backend::finalize::Ephemeral;
use dataflow_contracts::jobs::{JobKind, JobMessage, JobTicket};
use dataflow_platform::Result;
use dataflow_platform::jobqueue::{Consumer, Delivery};
use dataflow_platform::ledger::{Db, Handover};
use dataflow_platform::redis::Conn;
use tokio::sync::{Notify, mpsc};
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;

use super::settle::Settler;

/// How a job came, so its settlement can be routed back.
#[derive(Debug, Clone)]
pub struct Receipt {
    /// The delivery being settled.
    pub ticket: JobTicket,
    /// Attempts made before this one.
    pub attempts: u32,
    /// The Redis message to acknowledge; `None` for a job claimed from SQL.
    pub delivery: Option<Arc<Delivery>>,
}

/// Where one kind's jobs come from.
pub enum Source {
    /// Embedded mode: claim due intents straight from SQL (the claim counts the attempt).
    Sql {
        db: Db,
        kind: JobKind,
        /// The claiming worker, so the leader can hand its claims back if it is gone.
        worker_id: String,
        lease: Duration,
        poll: Duration,
        /// Signalled after a commit wrote intents of `kind`.
        wake: Arc<Notify>,
        /// The last claim took fewer than it could: none is due now, wait before the next.
        short: bool,
    },
    /// Take messages from the Redis queue, blocking while it is empty.
    Redis {
        consumer: Box<Consumer>,
        conn: Option<Box<Conn>>,
        /// How often messages stranded in this worker's in-flight list are given back.
        strays_every: Duration,
        /// When they are looked for next.
        strays_at: Instant,
    },
}

/// A Redis take blocks this long at most, so a stopping pump notices soon.
const BLOCK: Duration = Duration::from_secs(1);

/// An idle SQL pump woken by a commit waits this long before it claims, so the intents of
/// the commits right behind it are claimed (and later settled) with it: claimed one by one,
/// the report jobs alone cost PostgreSQL noticeably more CPU under load. An idle
/// pump claims only after such a wait (or its poll), never right after a short claim.
const WAKE_GATHER: Duration = Duration::from_millis(20);

impl Source {
    /// The Redis queue of `consumer`; strays are given back every `strays_every`.
    pub fn redis(consumer: Consumer, strays_every: Duration) -> Self {
        Source::Redis {
            consumer: Box::new(consumer),
            conn: None,
            strays_every,
            strays_at: Instant::now() + strays_every,
        }
    }

    /// When [`Source::tend`] has work next, if ever.
    fn tend_at(&self) -> Option<Instant> {
        match self {
            Source::Sql { .. } => None,
            Source::Redis { strays_at, .. } => Some(*strays_at),
        }
    }

    /// Between takes (never during one, whose messages are in flight before they are
    /// held): gives back what a lost take reply stranded in this worker's in-flight list,
    /// when that is due.
    async fn tend(&mut self) {
        let Source::Redis {
            consumer,
            strays_every,
            strays_at,
            ..
        } = self
        else {
            return;
        };
        if Instant::now() < *strays_at {
            return;
        }
        *strays_at = Instant::now() + *strays_every;
        let kind = consumer.queue().kind();
        match consumer.give_back_strays().await {
            Ok(0) => {}
            Ok(n) => tracing::warn!(
                %kind, jobs = n,
                "gave back jobs a lost take reply stranded in this worker's in-flight list"
            ),
            Err(e) => tracing::warn!(%kind, error = %e, "looking for stranded jobs failed"),
        }
    }

    /// Up to `max` jobs; waits (bounded) when there are none.
    async fn take(
        &mut self,
        max: usize,
        stop: &CancellationToken,
    ) -> Result<Vec<Task<JobMessage>>> {
        match self {
            Source::Sql {
                db,
                kind,
                worker_id,
                lease,
                poll,
                wake,
                short,
            } => {
                if *short {
                    let woken = tokio::select! {
                        _ = stop.cancelled() => return Ok(Vec::new()),
                        _ = wake.notified() => true,
                        _ = tokio::time::sleep(*poll) => false,
                    };
                    if woken {
                        tokio::select! {
                            _ = stop.cancelled() => return Ok(Vec::new()),
                            _ = tokio::time::sleep(WAKE_GATHER) => {}
                        }
                    }
                }
                let lease_ms = u64::try_from(lease.as_millis()).unwrap_or(u64::MAX);
                let jobs = db
                    .take_due_jobs(*kind, max, Handover::Claim { by: worker_id }, lease_ms)
                    .await?;
                *short = jobs.len() < max;
                Ok(jobs.into_iter().map(|m| task(m, None)).collect())
            }
            Source::Redis { consumer, conn, .. } => {
                let c = match conn {
                    Some(c) => c,
                    None => conn.insert(Box::new(consumer.queue().blocking_connection().await?)),
                };
                let taken = consumer.take(c, max, BLOCK).await;
                if taken.is_err() {
                    // A broken blocking connection is not repaired by the manager: reconnect.
                    *conn = None;
                }
                Ok(taken?
                    .into_iter()
                    .map(|d| {
                        let d = Arc::new(d);
                        task(d.message.clone(), Some(d))
                    })
                    .collect())
            }
        }
    }
}

fn task(message: JobMessage, delivery: Option<Arc<Delivery>>) -> Task<JobMessage> {
    let receipt = Receipt {
        ticket: message.ticket(),
        attempts: message.attempts,
        delivery,
    };
    TaskBuilder::new(message)
        .task_id(TaskId::from_string(receipt.ticket.id.as_str()))
        .data(receipt)
        .build()
}

/// Feeds the channel until `stop`: takes at most as many jobs as the channel has room for,
/// so jobs never pile up in this process while other workers idle.
pub async fn pump(
    mut source: Source,
    tx: mpsc::Sender<Task<JobMessage>>,
    batch: usize,
    stop: CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    while !stop.is_cancelled() {
        source.tend().await;
        let permit = tokio::select! {
            _ = stop.cancelled() => break,
            // A full channel (every handler busy) does not hold the upkeep back.
            _ = until(source.tend_at()) => continue,
            p = tx.reserve() => match p { Ok(p) => p, Err(_) => break },
        };
        let room = (tx.capacity() + 1).min(batch);
        let tasks = match source.take(room, &stop).await {
            Ok(t) => {
                backoff = Duration::from_millis(100);
                t
            }
            Err(e) => {
                tracing::warn!(error = %e, "taking jobs failed; retrying");
                drop(permit);
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        let mut tasks = tasks.into_iter();
        if let Some(first) = tasks.next() {
            permit.send(first);
        }
        for t in tasks {
            // Room was counted above and this pump is the only sender.
            if tx.try_send(t).is_err() {
                tracing::error!("job channel full despite reserved room");
            }
        }
    }
}

/// Resolves at `at`, or never.
async fn until(at: Option<Instant>) {
    match at {
        Some(at) => sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The receiving end of a pump's channel, shared by the backend and the shutdown hand-back.
pub type Inbox = Arc<Mutex<mpsc::Receiver<Task<JobMessage>>>>;

/// The apalis backend: the receiving end of the pump's channel, and the settler as its
/// acknowledgement layer.
pub struct JobFeed {
    rx: Inbox,
    settler: Settler,
}

impl JobFeed {
    pub fn new(rx: Inbox, settler: Settler) -> Self {
        Self { rx, settler }
    }
}

impl Backend for JobFeed {
    type Task = Task<JobMessage>;
    type Error = std::convert::Infallible;

    fn poll_ready(
        &mut self,
        _: &mut Context<'_>,
        _: &WorkerContext,
    ) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
        _: &WorkerContext,
    ) -> Poll<Option<Result<Self::Task, Self::Error>>> {
        match self.rx.lock() {
            Ok(mut rx) => rx.poll_recv(cx).map(|t| t.map(Ok)),
            // A panic while holding this lock cannot happen (poll_recv does not panic).
            Err(_) => Poll::Ready(None),
        }
    }

    fn poll_close(
        &mut self,
        _: &mut Context<'_>,
        _: &WorkerContext,
    ) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }
}

impl BackendConfig for JobFeed {
    type Args = JobMessage;
    type Id = RandomId;
    type Kind = Ephemeral;
    type Config = ();
    type Layer = AcknowledgeLayer<Settler>;

    fn config(&self) -> &Self::Config {
        &()
    }

    fn middleware(&mut self, _: &mut WorkerContext) -> Self::Layer {
        AcknowledgeLayer::new(self.settler.clone())
    }
}

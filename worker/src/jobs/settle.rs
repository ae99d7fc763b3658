//! Settling job results: SQL first (done, retry later, or dead), then the Redis message is
//! removed. Results are batched: one statement marks every finished job of a round done,
//! which is what lets the queue run at tens of thousands of jobs per second.
//!
//! If this process dies between the SQL commit and the Redis removal, the message comes back
//! (from the dead worker's in-flight list) and the job runs once more: at most one duplicate
//! per crash, none in a clean run, and receivers can drop it by the job id.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use apalis::prelude::{Acknowledge, BoxDynError, ExecutionContext};
use dataflow_contracts::jobs::{JobKind, JobStatus};
use dataflow_contracts::live::LiveKind;
use dataflow_platform::dashboard::live::LiveBus;
use dataflow_platform::jobqueue::{Consumer, Delivery};
use dataflow_platform::ledger::{Db, Failure};
use futures::future::BoxFuture;
use rand::Rng;
use tokio::sync::{mpsc, oneshot};

use super::JobError;
use super::feed::Receipt;

/// Results settled per round at most.
const ROUND: usize = 1_000;

/// One finished attempt.
pub struct Settlement {
    receipt: Receipt,
    result: std::result::Result<(), JobError>,
    /// Told once the result is in SQL, for a caller that must not go on before.
    written: Option<oneshot::Sender<()>>,
}

/// Where the settled jobs came from, which says what is left to do after SQL.
pub enum Origin {
    /// Claimed from SQL: the claim counted the attempt, nothing else holds the job.
    SqlClaim,
    /// DataFlow's Redis lists: the message is removed from the consumer's in-flight list.
    Lists(Box<Consumer>),
    /// apalis-redis: its own worker acknowledges the task once the handler returns.
    Apalis,
}

/// The acknowledgement layer's handle: hands each result to the settling task.
#[derive(Clone)]
pub struct Settler {
    tx: mpsc::Sender<Settlement>,
}

impl Acknowledge<()> for Settler {
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<(), Infallible>>;

    fn ack(&mut self, res: &Result<(), BoxDynError>, ctx: &ExecutionContext) -> Self::Future {
        let Some(receipt) = ctx.data().get::<Receipt>().cloned() else {
            tracing::error!("a job result without its receipt; it will be swept");
            return Box::pin(async { Ok(()) });
        };
        let result = match res {
            Ok(()) => Ok(()),
            Err(e) => Err(describe(e.as_ref())),
        };
        let tx = self.tx.clone();
        Box::pin(async move {
            // Waiting here when the settler lags is the backpressure on the worker.
            let settlement = Settlement {
                receipt,
                result,
                written: None,
            };
            if tx.send(settlement).await.is_err() {
                tracing::error!("job settler stopped; this result will be swept");
            }
            Ok(())
        })
    }
}

impl Settler {
    /// Hands over one result and waits until it is in SQL (it still joins a batched round).
    pub async fn settle_and_wait(&self, receipt: Receipt, result: &Result<(), JobError>) {
        let (written, wait) = oneshot::channel();
        let settlement = Settlement {
            receipt,
            result: result.clone(),
            written: Some(written),
        };
        if self.tx.send(settlement).await.is_err() || wait.await.is_err() {
            tracing::error!("job settler stopped; this result will be swept");
        }
    }
}

/// The handler's [`JobError`], which apalis hands back boxed; a timeout or a caught panic
/// is anything else, and retried.
fn describe(e: &(dyn std::error::Error + Send + Sync + 'static)) -> JobError {
    match e.downcast_ref::<JobError>() {
        Some(e) => e.clone(),
        None => JobError::Retry(e.to_string()),
    }
}

/// How long a deferred job waits before it is due again: long enough for a delivery in
/// flight to end, jittered so the deferred ones do not all come back at once.
fn defer_delay_ms() -> u64 {
    DEFER_MS + rand::rng().random_range(0..=DEFER_MS)
}

const DEFER_MS: u64 = 200;

/// Retry policy of failed attempts.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub base_ms: u64,
    pub max_ms: u64,
}

impl Backoff {
    /// base × 2^(attempt−1), capped, then jittered into its upper half, so a failing
    /// receiver is not hit by every retry at once.
    pub fn delay_ms(&self, attempt: u32) -> u64 {
        let full = crate::exponential_backoff_ms(self.base_ms, self.max_ms, attempt);
        let half = full / 2;
        half + rand::rng().random_range(0..=full - half)
    }
}

pub fn channel(capacity: usize) -> (Settler, mpsc::Receiver<Settlement>) {
    let (tx, rx) = mpsc::channel(capacity);
    (Settler { tx }, rx)
}

/// Settles results until every [`Settler`] is gone and the channel is drained.
/// Dead-lettered jobs are announced on `live`.
pub async fn run(
    db: Db,
    live: Arc<LiveBus>,
    kind: JobKind,
    origin: Origin,
    backoff: Backoff,
    mut rx: mpsc::Receiver<Settlement>,
) {
    let mut round = Vec::with_capacity(ROUND);
    while rx.recv_many(&mut round, ROUND).await > 0 {
        settle_round(&db, &live, kind, &origin, backoff, &mut round).await;
        round.clear();
    }
}

async fn settle_round(
    db: &Db,
    live: &LiveBus,
    kind: JobKind,
    origin: &Origin,
    backoff: Backoff,
    round: &mut [Settlement],
) {
    // A Redis delivery's attempt is counted now; a SQL claim counted it already.
    let counted = !matches!(origin, Origin::SqlClaim);
    let done: Vec<_> = round
        .iter()
        .filter(|s| s.result.is_ok())
        .map(|s| &s.receipt.ticket)
        .collect();
    if let Some(finished) = persist(|| db.finish_jobs(&done, counted)).await {
        metrics::counter!("dataflow_jobs_total", "kind" => kind.as_str(), "outcome" => "done")
            .increment(finished);
        superseded(kind, (done.len() as u64).saturating_sub(finished));
    }
    for s in round.iter() {
        let Err(error) = &s.result else {
            continue;
        };
        let failure = match error {
            JobError::Permanent(_) => Failure::Permanent,
            JobError::Retry(_) => Failure::Retry {
                backoff_ms: backoff.delay_ms(s.receipt.attempts + 1),
            },
            JobError::Defer(_) => Failure::Defer {
                delay_ms: defer_delay_ms(),
            },
        };
        let error = error.to_string();
        let job = &s.receipt.ticket.id;
        let outcome =
            match persist(|| db.fail_job(&s.receipt.ticket, counted, &error, failure)).await {
                Some(Some(JobStatus::Dead)) => {
                    tracing::error!(
                        %job, %kind, attempts = s.receipt.attempts + 1, %error, "job dead-lettered"
                    );
                    live.publish(LiveKind::JobDead, job.as_str());
                    "dead"
                }
                Some(Some(_)) if matches!(failure, Failure::Defer { .. }) => {
                    tracing::debug!(%job, %kind, %error, "job deferred");
                    "deferred"
                }
                Some(Some(_)) => {
                    tracing::warn!(%job, %kind, %error, "job attempt failed; will retry");
                    "retry"
                }
                Some(None) => {
                    superseded(kind, 1);
                    continue;
                }
                // Not written: the sweeper or the reaper takes the job back.
                None => continue,
            };
        metrics::counter!("dataflow_jobs_total", "kind" => kind.as_str(), "outcome" => outcome)
            .increment(1);
    }
    for s in round.iter_mut() {
        if let Some(written) = s.written.take() {
            let _ = written.send(());
        }
    }
    if let Origin::Lists(consumer) = origin {
        let deliveries: Vec<&Delivery> = round
            .iter()
            .filter_map(|s| s.receipt.delivery.as_deref())
            .collect();
        let acked = persist(|| consumer.ack(&deliveries)).await;
        if acked.is_none() {
            tracing::warn!(%kind, "could not remove settled jobs from Redis; they may run again");
        }
    }
}

/// Counts results the ledger refused because their delivery was no longer the job's current
/// one: its worker was presumed dead (or the job lost) and the job went to another delivery.
fn superseded(kind: JobKind, n: u64) {
    if n > 0 {
        tracing::warn!(%kind, results = n, "refused results of superseded job deliveries");
        metrics::counter!("dataflow_jobs_total", "kind" => kind.as_str(), "outcome" => "superseded")
            .increment(n);
    }
}

/// Retries a settle step while the store is unreachable: results must not be dropped, and
/// the worker waits (through the channel) until they are written. Gives up after a minute;
/// what is left then is found by the sweeper or the reaper.
async fn persist<T, F, Fut>(mut step: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = dataflow_platform::Result<T>>,
{
    let mut wait = Duration::from_millis(50);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        match step().await {
            Ok(v) => return Some(v),
            Err(e) if tokio::time::Instant::now() < deadline => {
                tracing::warn!(error = %e, "settling jobs failed; retrying");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(2));
            }
            Err(e) => {
                tracing::error!(error = %e, "settling jobs failed for a minute; giving up on this round");
                return None;
            }
        }
    }
}

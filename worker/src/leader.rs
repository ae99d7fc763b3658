//! The fleet's leader: one worker at a time holds the `leader` lease in SQL and runs the
//! singleton duties (the job sweeper with its reaper, the daily summaries, and the minute
//! samples of the dashboard's charts). The leader renews its lease at a third of its
//! length; when it dies another worker takes the lapsed lease.
//! A leader that cannot reach the ledger steps down before its lease could lapse, so two
//! workers lead at once only when a renewal outlives its own lease (every duty is
//! idempotent for that window: sweeps re-check SQL, a summary or a chart's minute is
//! written once).
//!
//! A leader whose process was paused (a `SIGSTOP`, a VM freeze) past its lease finds its
//! duties due the moment it resumes, before its campaign can learn that another worker took
//! the lease. So what this worker may do as the leader is bounded by time, not only by what
//! the campaign last said: the [`Term`] it publishes ends where the campaign would step
//! down, and a duty asks its [`Mandate`] before each act.

use std::future::Future;
use std::time::Duration;

use dataflow_platform::ledger::Db;
use dataflow_platform::ledger::leases::LEADER;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// This worker's leadership as its campaign last published it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Term {
    /// Until when it may act as the leader; `None` while it does not lead.
    until: Option<Instant>,
}

impl Term {
    /// A process that runs the singleton duties on its own, with no election (a benchmark).
    pub fn alone() -> Self {
        const CENTURY: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
        Self {
            until: Some(Instant::now() + CENTURY),
        }
    }

    /// Whether the campaign last said this worker leads.
    pub fn leads(&self) -> bool {
        self.until.is_some()
    }

    /// Whether this worker may act as the leader now: it leads, and its lease surely
    /// holds, whether or not the campaign has run since.
    pub fn holds(&self) -> bool {
        self.until.is_some_and(|until| Instant::now() < until)
    }
}

/// What a duty asks before each act.
#[derive(Clone)]
pub struct Mandate(watch::Receiver<Term>);

impl Mandate {
    /// See [`Term::holds`].
    pub fn holds(&self) -> bool {
        self.0.borrow().holds()
    }
}

/// Campaigns for the leader lease as `owner` until `shutdown`, telling `leading` whether
/// this worker leads, and until when; hands the lease back on the way out.
pub async fn campaign(
    db: Db,
    owner: String,
    lease: Duration,
    leading: watch::Sender<Term>,
    shutdown: CancellationToken,
) {
    let lease_ms = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX);
    let mut held_until: Option<Instant> = None;
    loop {
        let asked = Instant::now();
        match db.take_lease(LEADER, &owner, lease_ms).await {
            Ok(taken) => held_until = taken.then_some(asked + lease),
            Err(e) => tracing::warn!(error = %e, "renewing the leader lease failed"),
        }
        // Without a renewal, lead only while the last lease taken is surely still ours.
        let term = Term {
            until: held_until
                .map(|until| until - lease / 3)
                .filter(|&until| Instant::now() < until),
        };
        let leads = term.leads();
        if leads != leading.borrow().leads() {
            if leads {
                tracing::info!(worker_id = %owner, "this worker leads the fleet: the job sweeper, the daily summaries and the charts' samples run here");
            } else {
                tracing::warn!(worker_id = %owner, "this worker no longer leads the fleet");
            }
        }
        leading.send_replace(term);
        metrics::gauge!("dataflow_leader").set(if leads { 1.0 } else { 0.0 });
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(lease / 3) => {}
        }
    }
    leading.send_replace(Term::default());
    metrics::gauge!("dataflow_leader").set(0.0);
    if held_until.is_some()
        && let Err(e) = db.release_lease(LEADER, &owner).await
    {
        tracing::warn!(error = %e, "could not hand the leader lease back; it lapses");
    }
}

/// Runs `duty` whenever this worker leads, until `stop`: it starts when leadership is won
/// and its token is cancelled when leadership is lost (or on `stop`), and it starts again
/// on the next win. Between the two it asks its [`Mandate`] before each act.
pub async fn while_leading<F, Fut>(
    mut leading: watch::Receiver<Term>,
    stop: CancellationToken,
    duty: F,
) where
    F: Fn(CancellationToken, Mandate) -> Fut,
    Fut: Future<Output = ()>,
{
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            won = leading.wait_for(Term::leads) => if won.is_err() { return },
        }
        let token = stop.child_token();
        let run = duty(token.clone(), Mandate(leading.clone()));
        tokio::pin!(run);
        tokio::select! {
            _ = &mut run => {}
            // Only whether the sender is gone: the value's guard must not live across awaits.
            closed = async { leading.wait_for(|t| !t.leads()).await.is_err() } => {
                if closed {
                    // Nobody campaigns any more: the duty runs until `stop`.
                    run.await;
                    return;
                }
                token.cancel();
                run.await;
            }
        }
        if stop.is_cancelled() {
            return;
        }
        // A duty that ended on its own starts again only after the next win.
        let still = leading.borrow().leads();
        if still && leading.wait_for(|t| !t.leads()).await.is_err() {
            return;
        }
    }
}

//! A worker's place in the fleet registry: it beats with its load while it runs, and when
//! an operator asks it to drain it stops the process the graceful way (no new work;
//! batches in flight finish their chunk and are handed back, jobs settle), keeps reporting
//! itself as draining until nothing is in flight, then leaves the registry.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use dataflow_contracts::http::WorkerInfo;
use dataflow_contracts::live::LiveKind;
use dataflow_contracts::time::{now_ms, rfc3339};
use dataflow_platform::coordination::fleet::{BEAT, Fleet};
use dataflow_platform::dashboard::live::LiveBus;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::Worker;
use crate::leader::Term;

/// Runs until `shutdown` and the drain that follows it; cancels `shutdown` itself when an
/// operator asks this worker to drain.
/// Dashboards hear when it joins (its first heartbeat) and leaves.
pub async fn run(
    fleet: Arc<Fleet>,
    worker: Worker,
    leading: watch::Receiver<Term>,
    live: Arc<LiveBus>,
    shutdown: CancellationToken,
) {
    let started_at = rfc3339(now_ms());
    let id = worker.id().to_owned();
    let mut draining = false;
    let mut joined = false;
    loop {
        let mut info = snapshot(&worker, &started_at, draining || shutdown.is_cancelled());
        info.leader = leading.borrow().leads();
        match fleet.beat(&info).await {
            Ok(()) if !joined => {
                joined = true;
                live.publish(LiveKind::WorkerJoined, &id);
            }
            Ok(()) => {}
            Err(e) => tracing::warn!(error = %e, "fleet heartbeat failed"),
        }
        if !draining && !shutdown.is_cancelled() {
            match fleet.drain_requested(&id).await {
                Ok(true) => {
                    tracing::info!(worker_id = %id, "drain requested: finishing what this worker holds, then leaving");
                    draining = true;
                    shutdown.cancel();
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "reading the drain flag failed"),
            }
        }
        if shutdown.is_cancelled() && info.in_flight == 0 {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep(BEAT) => {}
            _ = shutdown.cancelled(), if !draining => draining = true,
        }
        // While stopping, look at the work in flight often, so leaving is prompt.
        if shutdown.is_cancelled() {
            let until = tokio::time::Instant::now() + BEAT;
            while worker.in_flight() > 0 && tokio::time::Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    if let Err(e) = fleet.leave(&id).await {
        tracing::warn!(error = %e, "leaving the fleet registry failed; the entry expires");
    }
    live.publish(LiveKind::WorkerLeft, id);
}

fn snapshot(worker: &Worker, started_at: &str, draining: bool) -> WorkerInfo {
    let stats = worker.stats();
    let processed = stats.completed.load(Ordering::Relaxed) + stats.failed.load(Ordering::Relaxed);
    WorkerInfo {
        id: worker.id().to_owned(),
        host: worker
            .id()
            .rsplitn(3, '-')
            .nth(2)
            .unwrap_or_default()
            .to_owned(),
        pid: std::process::id(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        started_at: started_at.to_owned(),
        heartbeat_at: rfc3339(now_ms()),
        in_flight: worker.in_flight() as u64,
        processed,
        draining,
        leader: false,
    }
}

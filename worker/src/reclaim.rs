//! The leader's reclaim of batches and job claims whose worker is gone: the fleet registry
//! knows within [`MEMBER_TTL`] that a worker died, long before its batch leases (or the
//! claims of the jobs it took from SQL) would lapse, so the leader ends those leases then,
//! breaks their batch mutexes, wakes its own claim loop to take the batches over, and puts
//! the jobs back to be claimed again. A restarted process no longer waits out its dead
//! predecessor's leases. (Jobs delivered through Redis have the queue's own reaper.)
//!
//! The registry is trusted only while it lists the leader itself (a registry that lost
//! its entries, a Redis flushed or failed over, would make every worker look gone). Even
//! then it only decides *when* a batch may be taken: the lease epoch still decides who may
//! write, so a worker wrongly judged gone loses a chunk's work, never correctness.

use std::sync::Arc;

use dataflow_platform::coordination::fleet::{BEAT, Fleet, MEMBER_TTL};
use dataflow_platform::ledger::Db;
use tokio_util::sync::CancellationToken;

use crate::Worker;
use crate::leader::Mandate;

/// Runs while this worker leads, every [`BEAT`], until `stop`; acts only while its
/// `mandate` holds (a leader paused past its lease must not act beside its successor).
pub async fn run(
    db: Db,
    fleet: Arc<Fleet>,
    worker: Worker,
    stop: CancellationToken,
    mandate: Mandate,
) {
    let quiet_ms = i64::try_from(MEMBER_TTL.as_millis()).unwrap_or(i64::MAX);
    loop {
        match fleet.list().await {
            Ok(_) if !mandate.holds() => {}
            Ok(members) if members.iter().any(|m| m.id == worker.id()) => {
                let live: Vec<String> = members.into_iter().map(|m| m.id).collect();
                match db.end_leases_of_gone_workers(&live, quiet_ms).await {
                    Ok(freed) if !freed.is_empty() => {
                        tracing::warn!(batches = ?freed, "took back the batches of workers that are gone");
                        metrics::counter!("dataflow_batches_reclaimed_total")
                            .increment(freed.len() as u64);
                        worker.take_back(&freed).await;
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "reclaiming gone workers' batches failed"),
                }
                match db.end_job_claims_of_gone_workers(&live, quiet_ms).await {
                    Ok(0) => {}
                    Ok(jobs) => {
                        tracing::warn!(jobs, "took back the job claims of workers that are gone");
                        metrics::counter!("dataflow_jobs_reclaimed_total").increment(jobs);
                    }
                    Err(e) => tracing::warn!(error = %e, "reclaiming gone workers' jobs failed"),
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "reading the fleet registry failed"),
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(BEAT) => {}
        }
    }
}

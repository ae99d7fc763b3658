//! The daily per-client summaries: the leader runs an apalis-cron worker on
//! `worker.summary_schedule`; each tick (and each newly won leadership, for ticks missed
//! while no worker led) writes the summary of every ended UTC day in the last week that an
//! active client lacks. A summary is written once: later ticks and later leaders skip it.

use apalis::prelude::{BoxDynError, Data, WorkerBuilder};
use apalis_cron::{CronScheduler, Tick};
use dataflow_contracts::time::{DAY_MS, utc_day};
use dataflow_platform::Result;
use dataflow_platform::ledger::Db;
use tokio_util::sync::CancellationToken;

/// How far back a tick looks for days without a summary.
const CATCH_UP_DAYS: i64 = 7;

/// Runs the schedule until `stop` (the end of this worker's leadership or of the process).
pub async fn run(db: Db, schedule: cron::Schedule, stop: CancellationToken) {
    if let Err(e) = catch_up(&db).await {
        tracing::warn!(error = %e, "writing the daily summaries failed; the next tick retries");
    }
    let worker = WorkerBuilder::new("daily-summaries")
        .backend(CronScheduler::new(schedule))
        .data(db)
        .build(on_tick);
    if let Err(e) = worker.run_until(crate::jobs::stopped(stop)).await {
        tracing::error!(error = %e, "the daily summary schedule stopped with an error");
    }
}

async fn on_tick(_tick: Tick, db: Data<Db>) -> std::result::Result<(), BoxDynError> {
    catch_up(&db).await?;
    Ok(())
}

/// Writes every missing summary of the last `CATCH_UP_DAYS` ended days; how many it wrote.
pub async fn catch_up(db: &Db) -> Result<usize> {
    // The ledger's clock decides which days ended, as it does for every lease.
    let today = db.now_ms().await?.div_euclid(DAY_MS) * DAY_MS;
    let mut written = 0;
    for client in db.list_clients().await? {
        if !client.active {
            continue;
        }
        let first = client.created_at.div_euclid(DAY_MS) * DAY_MS;
        for back in 1..=CATCH_UP_DAYS {
            let start = today - back * DAY_MS;
            if start < first {
                break;
            }
            if db.has_daily_summary(&client.id, &utc_day(start)).await? {
                continue;
            }
            let summary = db.compute_daily_summary(&client.id, start).await?;
            if db.store_daily_summary(&summary).await? {
                written += 1;
            }
        }
    }
    if written > 0 {
        tracing::info!(summaries = written, "daily summaries written");
    }
    Ok(written)
}

//! The history of the dashboard's charts: while this worker leads, each minute, once it
//! is over, is measured and kept in the ledger (the fleet's throughput, latency
//! percentiles and queue depth, and each active client's), and samples older than
//! [`KEEP`] are deleted. One row per minute and active client, for a little over a day:
//! the table stays bounded whatever the ledger holds, and every API process draws from it.
//!
//! Queue depth cannot be read back for a past minute, so a minute nobody sampled (no
//! worker led) stays a gap in the charts rather than a guess.

use std::time::Duration;

use dataflow_platform::Result;
use dataflow_platform::ledger::Db;
use dataflow_platform::ledger::charts::{MINUTE_MS, minute_of};
use tokio_util::sync::CancellationToken;

use crate::leader::Mandate;

/// How long samples are kept: the longest chart (a day), with room for its first bucket.
pub const KEEP: Duration = Duration::from_secs(25 * 3600);

/// How long after a minute ends it is measured: a completion whose commit was under way
/// at the minute's end lands in the minute it was stamped with, not after the sample.
const SETTLE_MS: i64 = 5_000;

/// Samples each minute once it is over, until `stop` (the end of this worker's leadership
/// or of the process); acts only while its `mandate` holds. The minute that ended last is
/// sampled at once on winning, unless a previous leader did.
pub async fn run(db: Db, stop: CancellationToken, mandate: Mandate) {
    loop {
        let wait = match db.now_ms().await {
            Ok(now) => {
                if mandate.holds()
                    && let Err(e) = sample_ended(&db, now).await
                {
                    tracing::warn!(error = %e, "sampling the charts' minute failed; the next minute is sampled anyway");
                }
                let next = minute_of(now - SETTLE_MS) + MINUTE_MS + SETTLE_MS;
                Duration::from_millis(u64::try_from(next - now).unwrap_or(0).max(1_000))
            }
            Err(e) => {
                tracing::warn!(error = %e, "reading the ledger's clock for the charts failed");
                Duration::from_secs(5)
            }
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Measures and keeps the last minute that ended at least [`SETTLE_MS`] before `now` (the
/// ledger's clock) and prunes what is past [`KEEP`]; how many samples were new.
pub async fn sample_ended(db: &Db, now: i64) -> Result<u64> {
    let minute = minute_of(now - SETTLE_MS) - MINUTE_MS;
    let samples = db.measure_minute(minute, None).await?;
    let written = db.store_samples(&samples).await?;
    let keep = i64::try_from(KEEP.as_millis()).unwrap_or(i64::MAX);
    db.prune_samples(keep).await?;
    Ok(written)
}

//! Operator views across clients, for the dashboard: batches filtered by client, status
//! and age, and throughput and latency over a recent window.

use dataflow_contracts::http::BatchView;
use dataflow_contracts::{BatchId, BatchStatus, ClientId};
use sqlx::Row;

use super::batches::{BATCH_COLUMNS, BatchColumns};
use super::clients::parse_id;
use super::filters::{Bind, Conditions};
use super::{Db, count, split_page};
use crate::Result;

/// Which batches an operator is looking for.
#[derive(Debug, Clone, Default)]
pub struct BatchFilter {
    pub client: Option<ClientId>,
    pub status: Option<BatchStatus>,
    /// Only batches created within this many milliseconds.
    pub max_age_ms: Option<i64>,
}

/// A batch with its client's id, as the operator's search reads it.
#[derive(sqlx::FromRow)]
struct OperatorColumns {
    client_id: String,
    #[sqlx(flatten)]
    batch: BatchColumns,
}

/// A batch and the client it belongs to.
#[derive(Debug, Clone)]
pub struct BatchRow {
    pub client_id: ClientId,
    pub batch: BatchView,
}

/// What finished in a window.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Throughput {
    pub completed: u64,
    pub dead: u64,
    pub records_written: u64,
    pub records_failed: u64,
    /// From the accepted import to completion, over the window's completed batches.
    pub latency_p50_ms: Option<u64>,
    pub latency_p95_ms: Option<u64>,
    pub latency_max_ms: Option<u64>,
}

/// Completions read for the latency percentiles; beyond this the newest are used.
pub(crate) const LATENCY_SAMPLE: i64 = 10_000;

/// The `q`th percentile of `sorted` by nearest rank (the smallest value with at least
/// `q`% of them at or below it); `None` when it is empty.
pub(crate) fn percentile(sorted: &[u64], q: usize) -> Option<u64> {
    let rank = (sorted.len() * q).div_ceil(100).max(1);
    sorted.get(rank - 1).copied()
}

impl Db {
    /// Batches matching `filter`, newest first, after `cursor`; the next page's cursor.
    pub async fn search_batches(
        &self,
        filter: &BatchFilter,
        cursor: Option<&BatchId>,
        limit: u32,
    ) -> Result<(Vec<BatchRow>, Option<String>)> {
        let mut given = Conditions::default();
        given
            .and(
                "client_id =",
                filter.client.as_ref().map(|c| Bind::Text(c.as_str())),
            )
            .and("status =", filter.status.map(|s| Bind::Text(s.as_str())))
            .and("created_at >= {now} -", filter.max_age_ms.map(Bind::Int))
            .and("id <", cursor.map(|c| Bind::Text(c.as_str())));
        let sql = self.sql(&format!(
            "SELECT client_id, {BATCH_COLUMNS} FROM batches{} ORDER BY id DESC LIMIT ${}",
            given.clause(),
            given.next()
        ));
        let rows = given
            .bind(sqlx::query_as::<_, OperatorColumns>(sql))
            .bind(i64::from(limit) + 1)
            .fetch_all(self.pool())
            .await?;
        let items = rows
            .into_iter()
            .map(|r| {
                Ok(BatchRow {
                    client_id: parse_id(r.client_id)?,
                    batch: r.batch.parse()?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(split_page(items, limit, |b| b.batch.id.to_string()))
    }

    /// Batches completed and gone dead in the last `window_ms`, with the completed ones'
    /// records and latency percentiles.
    pub async fn throughput(&self, window_ms: i64) -> Result<Throughput> {
        // The window's start as a value: PostgreSQL reads `{now}` row by row (its clock is
        // volatile), so a bound written with it does not start the index scan, which then
        // walks every completed batch ever whenever the window holds fewer than the sample.
        let since = self.now_ms().await? - window_ms;
        let rows = sqlx::query(
            "SELECT completed_at - created_at AS latency, records_written, records_failed \
             FROM batches WHERE completed_at >= $1 AND status = 'completed' \
             ORDER BY completed_at DESC LIMIT $2",
        )
        .bind(since)
        .bind(LATENCY_SAMPLE)
        .fetch_all(self.pool())
        .await?;
        let mut t = Throughput::default();
        let mut latencies = Vec::with_capacity(rows.len());
        for r in &rows {
            latencies.push(count(r.try_get("latency")?));
            t.records_written += count(r.try_get("records_written")?);
            t.records_failed += count(r.try_get("records_failed")?);
        }
        t.completed = latencies.len() as u64;
        latencies.sort_unstable();
        t.latency_p50_ms = percentile(&latencies, 50);
        t.latency_p95_ms = percentile(&latencies, 95);
        t.latency_max_ms = latencies.last().copied();
        let dead: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM batches WHERE status = 'dead' AND updated_at >= $1",
        )
        .bind(since)
        .fetch_one(self.pool())
        .await?;
        t.dead = count(dead);
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn percentiles_by_nearest_rank() {
        assert_eq!(percentile(&[], 50), None);
        assert_eq!(percentile(&[7], 99), Some(7));
        assert_eq!(percentile(&[1, 2, 3, 4], 50), Some(2));
        assert_eq!(percentile(&[1, 2, 3, 4], 51), Some(3));
        assert_eq!(percentile(&[1, 2, 3, 4], 100), Some(4));
        assert_eq!(percentile(&[1, 2, 3, 4], 0), Some(1));
    }
}

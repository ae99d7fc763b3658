//! What is waiting where: depth and oldest age of every queue the ledger holds, in one
//! statement, for operators (`GET /admin/queues`, `dataflow status`) and metrics.

use dataflow_contracts::http::QueueDepth;
use sqlx::Row;

use super::{Db, count};
use crate::Result;

impl Db {
    /// Unfinished batches by status, the outbox backlog, and unfinished or dead jobs by
    /// kind and status. States with nothing in them are left out.
    pub async fn queue_depths(&self) -> Result<Vec<QueueDepth>> {
        let sql = self.sql(
            "SELECT 'batches' AS queue, status AS state, COUNT(*) AS n, \
                    {now} - MIN(created_at) AS oldest \
             FROM batches WHERE status IN ('awaiting_approval', 'ready', 'processing', 'dead') \
             GROUP BY status \
             UNION ALL \
             SELECT 'outbox', 'unpublished', COUNT(*), {now} - MIN(o.created_at) \
             FROM outbox_pending p JOIN outbox o ON o.id = p.id HAVING COUNT(*) > 0 \
             UNION ALL \
             SELECT 'jobs:' || kind, status, COUNT(*), {now} - MIN(created_at) \
             FROM jobs WHERE status IN ('pending', 'queued', 'running', 'dead') \
             GROUP BY kind, status \
             ORDER BY 1, 2",
        );
        let rows = sqlx::query(sql).fetch_all(self.pool()).await?;
        rows.iter()
            .map(|r| {
                let oldest: Option<i64> = r.try_get("oldest")?;
                Ok(QueueDepth {
                    queue: r.try_get("queue")?,
                    state: r.try_get("state")?,
                    count: count(r.try_get("n")?),
                    oldest_age_ms: oldest.map(count),
                })
            })
            .collect()
    }
}

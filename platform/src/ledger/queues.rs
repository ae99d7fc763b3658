//! What is waiting where: depth and oldest age of every queue the ledger holds, in one
//! statement, for operators (`GET /admin/queues`, `dataflow status`) and metrics.

use dataflow_contracts::http::QueueDepth;
use sqlx::Row;

use super::clients::parse_id;
use super::{Db, count};
use crate::Result;
use dataflow_contracts::ClientId;

/// One client's share of the batch queue: what waits, what runs, and its fair-share policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientQueue {
    pub client_id: ClientId,
    pub name: String,
    /// Batches `ready` (due now or later).
    pub ready: u64,
    pub processing: u64,
    /// Since the oldest `ready` batch was created.
    pub oldest_ready_age_ms: Option<u64>,
    pub weight: u32,
    pub max_concurrent_batches: Option<u32>,
}

impl Db {
    /// Unfinished batches by status, the outbox backlog, and unfinished or dead jobs by
    /// kind and status. States with nothing in them are left out.
    ///
    /// Every part reads only what it counts, through an index whose rows are those states
    /// (the jobs one status group at a time, each with its partial index; the outbox's
    /// oldest by the lowest unpublished id), never the finished jobs and published events
    /// kept for their retention: every `/metrics` scrape runs it.
    pub async fn queue_depths(&self) -> Result<Vec<QueueDepth>> {
        let sql = self.sql(
            "SELECT 'batches' AS queue, status AS state, COUNT(*) AS n, \
                    {now} - MIN(created_at) AS oldest \
             FROM batches WHERE status IN ('awaiting_approval', 'ready', 'processing', 'dead') \
             GROUP BY status \
             UNION ALL \
             SELECT 'outbox', 'unpublished', (SELECT COUNT(*) FROM outbox_pending), \
                    {now} - (SELECT created_at FROM outbox \
                             WHERE id = (SELECT MIN(id) FROM outbox_pending)) \
             WHERE EXISTS (SELECT 1 FROM outbox_pending) \
             UNION ALL \
             SELECT 'jobs:' || kind, status, COUNT(*), {now} - MIN(created_at) \
             FROM jobs WHERE status = 'pending' GROUP BY kind, status \
             UNION ALL \
             SELECT 'jobs:' || kind, status, COUNT(*), {now} - MIN(created_at) \
             FROM jobs WHERE status IN ('queued', 'running') GROUP BY kind, status \
             UNION ALL \
             SELECT 'jobs:' || kind, status, COUNT(*), {now} - MIN(created_at) \
             FROM jobs WHERE status = 'dead' GROUP BY kind, status \
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

    /// The batch queue per client with work in it, longest waiting first.
    pub async fn client_queues(&self) -> Result<Vec<ClientQueue>> {
        let sql = self.sql(
            "SELECT c.id, c.name, c.claim_weight, c.max_concurrent_batches, \
                    SUM(CASE WHEN b.status = 'ready' THEN 1 ELSE 0 END) AS ready, \
                    SUM(CASE WHEN b.status = 'processing' THEN 1 ELSE 0 END) AS processing, \
                    {now} - MIN(CASE WHEN b.status = 'ready' THEN b.created_at END) AS oldest \
             FROM batches b JOIN clients c ON c.id = b.client_id \
             WHERE b.status IN ('ready', 'processing') \
             GROUP BY c.id, c.name, c.claim_weight, c.max_concurrent_batches \
             ORDER BY MIN(CASE WHEN b.status = 'ready' THEN b.created_at END), c.id",
        );
        let rows = sqlx::query(sql).fetch_all(self.pool()).await?;
        rows.iter()
            .map(|r| {
                let oldest: Option<i64> = r.try_get("oldest")?;
                let weight: i64 = r.try_get("claim_weight")?;
                let cap: Option<i64> = r.try_get("max_concurrent_batches")?;
                Ok(ClientQueue {
                    client_id: parse_id(r.try_get("id")?)?,
                    name: r.try_get("name")?,
                    ready: count(r.try_get("ready")?),
                    processing: count(r.try_get("processing")?),
                    oldest_ready_age_ms: oldest.map(count),
                    weight: u32::try_from(weight).unwrap_or(1),
                    max_concurrent_batches: cap.and_then(|n| u32::try_from(n).ok()),
                })
            })
            .collect()
    }
}

//! The transactional outbox: events are rows written in the same transaction as the change
//! they announce, then relayed; nothing is announced that did not commit, and nothing that
//! committed goes unannounced.

use dataflow_contracts::events::Envelope;
use sqlx::Row;

use super::{Db, Tx};
use crate::Result;

/// An event waiting to be published.
#[derive(Debug, Clone)]
pub struct OutboxRow {
    pub id: i64,
    pub routing_key: String,
    pub body: String,
}

impl Db {
    /// Adds `event` to the outbox inside the caller's transaction, with the follow-up jobs
    /// it asks for.
    pub(crate) async fn enqueue_event(&self, tx: &mut Tx, event: &Envelope) -> Result<()> {
        let body = serde_json::to_string(event).unwrap_or_default();
        let sql = self.sql(
            "INSERT INTO outbox (event_id, batch_id, event_type, routing_key, body, created_at) \
             VALUES ($1, $2, $3, $4, $5, {now})",
        );
        sqlx::query(sql)
            .bind(event.id.as_str())
            .bind(event.batch_id.as_str())
            .bind(event.event.kind())
            .bind(event.event.routing_key())
            .bind(body)
            .execute(&mut **tx)
            .await?;
        self.write_job_intents(tx, event).await
    }

    /// The oldest unpublished events, in commit-id order.
    pub async fn unpublished_events(&self, limit: u32) -> Result<Vec<OutboxRow>> {
        let rows = sqlx::query(
            "SELECT id, routing_key, body FROM outbox WHERE published_at IS NULL ORDER BY id LIMIT $1",
        )
        .bind(i64::from(limit))
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|r| {
                Ok(OutboxRow {
                    id: r.try_get("id")?,
                    routing_key: r.try_get("routing_key")?,
                    body: r.try_get("body")?,
                })
            })
            .collect()
    }

    /// Marks events `first..=last` published (ids are handed out in increasing order).
    pub async fn mark_published(&self, first: i64, last: i64) -> Result<u64> {
        let sql = self.sql(
            "UPDATE outbox SET published_at = {now} \
             WHERE id >= $1 AND id <= $2 AND published_at IS NULL",
        );
        Ok(sqlx::query(sql)
            .bind(first)
            .bind(last)
            .execute(self.pool())
            .await?
            .rows_affected())
    }

    /// Deletes events published more than `retention_ms` ago.
    pub async fn prune_published(&self, retention_ms: i64) -> Result<u64> {
        let sql = self
            .sql("DELETE FROM outbox WHERE published_at IS NOT NULL AND published_at < {now} - $1");
        Ok(sqlx::query(sql)
            .bind(retention_ms)
            .execute(self.pool())
            .await?
            .rows_affected())
    }

    pub async fn outbox_backlog(&self) -> Result<i64> {
        Ok(
            sqlx::query_scalar("SELECT COUNT(*) FROM outbox WHERE published_at IS NULL")
                .fetch_one(self.pool())
                .await?,
        )
    }

    /// Every event recorded for a batch, oldest first (for operators and tests).
    pub async fn batch_events(&self, batch_id: &str) -> Result<Vec<Envelope>> {
        let bodies: Vec<String> =
            sqlx::query_scalar("SELECT body FROM outbox WHERE batch_id = $1 ORDER BY id")
                .bind(batch_id)
                .fetch_all(self.pool())
                .await?;
        Ok(bodies
            .iter()
            .filter_map(|b| serde_json::from_str(b).ok())
            .collect())
    }
}

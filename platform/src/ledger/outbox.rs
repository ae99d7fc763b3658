//! The transactional outbox: events are rows written in the same transaction as the change
//! they announce, then relayed; nothing is announced that did not commit, and nothing that
//! committed goes unannounced.

use dataflow_contracts::Policy;
use dataflow_contracts::events::Envelope;
use sqlx::Row;

use super::{Db, Dialect, Field, Tx, json_list};
use crate::{Result, traces};

/// Outbox rows looked at per statement when pruning: a short write, since on SQLite it
/// holds the ledger's one write lock.
const PRUNE_PAGE: i64 = 1_000;

/// An event waiting to be published.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct OutboxRow {
    pub id: i64,
    /// The envelope's id (the broker message id, for consumers' dedup).
    pub event_id: String,
    pub event_type: String,
    pub routing_key: String,
    pub body: String,
    /// The trace context of the transaction that wrote it (see [`crate::traces`]).
    pub traceparent: Option<String>,
}

/// An event about to be written to the outbox, with what it brings along.
pub(crate) struct Outgoing<'a> {
    pub event: &'a Envelope,
    /// The policy its follow-up jobs are chosen under; the client's stored one when `None`.
    pub policy: Option<&'a Policy>,
    /// The trace its publish and its jobs continue.
    pub traceparent: Option<&'a str>,
}

impl Db {
    /// Adds `event` to the outbox inside the caller's transaction, with the follow-up jobs
    /// it asks for under `policy`, or under the client's stored policy when `None`; both
    /// continue the current span's trace.
    pub(crate) async fn enqueue_event(
        &self,
        tx: &mut Tx,
        event: &Envelope,
        policy: Option<&Policy>,
    ) -> Result<()> {
        let traceparent = traces::current();
        let outgoing = Outgoing {
            event,
            policy,
            traceparent: traceparent.as_deref(),
        };
        self.enqueue_events(tx, &[outgoing]).await.map(drop)
    }

    /// [`Db::enqueue_event`] for several events of one transaction, each under its own
    /// policy and trace, in one statement. The rows take their ids in the order given, which
    /// is the order the relay publishes them in. Returns the rows as the relay would read
    /// them.
    pub(crate) async fn enqueue_events(
        &self,
        tx: &mut Tx,
        events: &[Outgoing<'_>],
    ) -> Result<Vec<OutboxRow>> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let mut written: Vec<OutboxRow> = events
            .iter()
            .map(|o| OutboxRow {
                id: 0,
                event_id: o.event.id.as_str().to_owned(),
                event_type: o.event.event.kind().to_owned(),
                routing_key: o.event.event.routing_key().to_owned(),
                body: serde_json::to_string(o.event).unwrap_or_default(),
                traceparent: o.traceparent.map(str::to_owned),
            })
            .collect();
        let rows: Vec<serde_json::Value> = events
            .iter()
            .zip(&written)
            .enumerate()
            .map(|(n, (o, row))| {
                serde_json::json!({
                    "n": n,
                    "event_id": row.event_id,
                    "batch_id": o.event.batch_id.as_str(),
                    "event_type": row.event_type,
                    "routing_key": row.routing_key,
                    "body": row.body,
                    "traceparent": row.traceparent,
                })
            })
            .collect();
        let sql = self.sql(&format!(
            "INSERT INTO outbox (event_id, batch_id, event_type, routing_key, body, traceparent, \
                                 created_at) \
             SELECT m.event_id, m.batch_id, m.event_type, m.routing_key, m.body, m.traceparent, \
                    {{now}} \
             FROM {} m ORDER BY m.n RETURNING id, event_id",
            self.json_rows(
                &[
                    ("n", Field::Int),
                    ("event_id", Field::Text),
                    ("batch_id", Field::Text),
                    ("event_type", Field::Text),
                    ("routing_key", Field::Text),
                    ("body", Field::Text),
                    ("traceparent", Field::Text),
                ],
                &rows
            )
        ));
        let returned = sqlx::query(sql)
            .bind(serde_json::Value::Array(rows).to_string())
            .fetch_all(&mut **tx)
            .await?;
        // Matched by event id: RETURNING promises no order.
        for r in returned {
            let (id, event_id): (i64, String) = (r.try_get("id")?, r.try_get("event_id")?);
            if let Some(row) = written.iter_mut().find(|w| w.event_id == event_id) {
                row.id = id;
            }
        }
        tx.wrote_outbox(written.len());
        self.write_job_intents(tx, events).await?;
        Ok(written)
    }

    /// The oldest unpublished events, in id order, leaving out `except` (rows a relay has
    /// in hand); on disk by the time they are returned.
    pub async fn unpublished_events(&self, limit: u32, except: &[i64]) -> Result<Vec<OutboxRow>> {
        let sql = self.sql(match self.dialect() {
            Dialect::Sqlite => {
                "SELECT o.id, o.event_id, o.event_type, o.routing_key, o.body, o.traceparent \
                 FROM outbox_pending p JOIN outbox o ON o.id = p.id \
                 WHERE p.id NOT IN (SELECT value FROM json_each($2)) \
                 ORDER BY p.id LIMIT $1"
            }
            // The ids first, then the rows by primary key. As a join, the planner (without
            // statistics on a young, churning `outbox_pending`) hashed the whole outbox,
            // published rows and all, so a read grew with the outbox; this form is an index
            // lookup per id.
            Dialect::Postgres => {
                "SELECT o.id, o.event_id, o.event_type, o.routing_key, o.body, o.traceparent \
                 FROM outbox o \
                 WHERE o.id = ANY(ARRAY(SELECT p.id FROM outbox_pending p \
                   WHERE p.id NOT IN (SELECT CAST(json_array_elements_text($2::json) AS BIGINT)) \
                   ORDER BY p.id LIMIT $1)) \
                 ORDER BY o.id"
            }
        });
        let rows = sqlx::query_as::<_, OutboxRow>(sql)
            .bind(i64::from(limit))
            .bind(json_list(except))
            .fetch_all(self.pool())
            .await?;
        // Nothing is published before it is on disk (on SQLite a commit may not be yet).
        if !rows.is_empty() {
            self.durable().await?;
        }
        Ok(rows)
    }

    /// Marks exactly the events `ids` published (takes them out of `outbox_pending`, sets
    /// `published_at`); returns how many were still pending. Not an id range: on PostgreSQL
    /// ids come from an identity column, so a lower id can commit after a higher one was
    /// read, and a range would mark a row that was never published.
    pub async fn mark_published(&self, ids: &[i64]) -> Result<u64> {
        if ids.is_empty() {
            return Ok(0);
        }
        let list = json_list(ids);
        match self.dialect() {
            // One statement: the update sees exactly the ids the delete took. As `id IN
            // (SELECT id FROM taken)` the planner, with no statistics yet on a young outbox,
            // hashed the ids against a scan of the whole outbox on most marks; as an array
            // it looks each id up by primary key, as the relay's read does.
            Dialect::Postgres => {
                let sql = self.sql(
                    "WITH taken AS (DELETE FROM outbox_pending \
                       WHERE id IN (SELECT CAST(json_array_elements_text($1::json) AS BIGINT)) \
                       RETURNING id) \
                     UPDATE outbox SET published_at = {now} \
                     WHERE id = ANY(ARRAY(SELECT id FROM taken))",
                );
                Ok(sqlx::query(sql)
                    .bind(list)
                    .execute(&mut *self.background_writer().await?)
                    .await?
                    .rows_affected())
            }
            Dialect::Sqlite => {
                let mut tx = self.begin_background_write().await?;
                let marked = async {
                    let taken = sqlx::query(
                        "DELETE FROM outbox_pending WHERE id IN (SELECT value FROM json_each($1))",
                    )
                    .bind(&list)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                    let sql = self.sql(
                        "UPDATE outbox SET published_at = {now} \
                         WHERE id IN (SELECT value FROM json_each($1)) AND published_at IS NULL",
                    );
                    sqlx::query(sql).bind(&list).execute(&mut *tx).await?;
                    Ok(taken)
                }
                .await;
                tx.end(marked).await
            }
        }
    }

    /// Deletes events published more than `retention_ms` ago, and returns how many.
    ///
    /// It walks the outbox by primary key from its oldest row, [`PRUNE_PAGE`] rows at a time,
    /// and stops at the first page that reaches a row created within the retention. So its
    /// cost follows what there is to delete, not the size of the outbox. A delete by
    /// `published_at` alone read every row, once a minute, since no index covers that column
    /// (one would cost every mark its HOT update on PostgreSQL). Rows still unpublished, or
    /// published less than `retention_ms` ago, are stepped over and kept.
    pub async fn prune_published(&self, retention_ms: i64) -> Result<u64> {
        let cutoff = self.now_ms().await?.saturating_sub(retention_ms);
        let (mut after, mut pruned) = (0_i64, 0_u64);
        loop {
            let page: Vec<(i64, i64)> = sqlx::query_as(
                "SELECT id, created_at FROM outbox WHERE id > $1 ORDER BY id LIMIT $2",
            )
            .bind(after)
            .bind(PRUNE_PAGE)
            .fetch_all(self.pool())
            .await?;
            let Some(&(last, last_created)) = page.last() else {
                break;
            };
            pruned += sqlx::query(
                "DELETE FROM outbox WHERE id > $1 AND id <= $2 \
                 AND published_at IS NOT NULL AND published_at < $3",
            )
            .bind(after)
            .bind(last)
            .bind(cutoff)
            .execute(&mut *self.background_writer().await?)
            .await?
            .rows_affected();
            if last_created >= cutoff || (page.len() as i64) < PRUNE_PAGE {
                break;
            }
            after = last;
        }
        Ok(pruned)
    }

    pub async fn outbox_backlog(&self) -> Result<i64> {
        Ok(sqlx::query_scalar("SELECT COUNT(*) FROM outbox_pending")
            .fetch_one(self.pool())
            .await?)
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

//! Daily per-client summaries: a UTC day of one client's batches in numbers, computed
//! once the day is over and kept.

use std::collections::BTreeMap;

use dataflow_contracts::http::{DailySummary, ErrorCount};
use dataflow_contracts::time::{DAY_MS, rfc3339, utc_day};
use dataflow_contracts::{BatchId, ClientId};
use sqlx::Row;

use super::Db;
use crate::{Error, Result};

/// Error codes a summary lists.
const TOP_ERRORS: i64 = 10;

impl Db {
    /// Computes the summary of `client`'s UTC day that starts at `day_start_ms`: the
    /// batches whose ids were minted that day (ids are time-ordered ULIDs, so the range
    /// walks the `(client_id, id)` index), counted by where they stand now.
    pub async fn compute_daily_summary(
        &self,
        client: &ClientId,
        day_start_ms: i64,
    ) -> Result<DailySummary> {
        let bound = |ms: i64| {
            let ms = u64::try_from(ms).unwrap_or(0);
            BatchId::from_ulid(ulid::Ulid::from_parts(ms, 0))
        };
        let (from, to) = (bound(day_start_ms), bound(day_start_ms + DAY_MS));
        let rows = sqlx::query(
            "SELECT status, COUNT(*) AS n, \
                    CAST(COALESCE(SUM(records_total), 0) AS BIGINT) AS total, \
                    CAST(COALESCE(SUM(records_written), 0) AS BIGINT) AS written, \
                    CAST(COALESCE(SUM(records_unchanged), 0) AS BIGINT) AS unchanged, \
                    CAST(COALESCE(SUM(records_superseded), 0) AS BIGINT) AS superseded, \
                    CAST(COALESCE(SUM(records_failed), 0) AS BIGINT) AS failed \
             FROM batches WHERE client_id = $1 AND id >= $2 AND id < $3 GROUP BY status",
        )
        .bind(client.as_str())
        .bind(from.as_str())
        .bind(to.as_str())
        .fetch_all(self.pool())
        .await?;
        let mut summary = DailySummary {
            client_id: client.clone(),
            day: utc_day(day_start_ms),
            imports: 0,
            batches_by_status: BTreeMap::new(),
            records_total: 0,
            records_written: 0,
            records_unchanged: 0,
            records_superseded: 0,
            records_failed: 0,
            top_errors: Vec::new(),
            generated_at: rfc3339(self.now_ms().await?),
        };
        let count = |r: &sqlx::any::AnyRow, col: &str| -> Result<u64> {
            Ok(u64::try_from(r.try_get::<i64, _>(col)?).unwrap_or(0))
        };
        for r in &rows {
            let n = count(r, "n")?;
            summary.imports += n;
            summary
                .batches_by_status
                .insert(r.try_get::<String, _>("status")?, n);
            summary.records_total += count(r, "total")?;
            summary.records_written += count(r, "written")?;
            summary.records_unchanged += count(r, "unchanged")?;
            summary.records_superseded += count(r, "superseded")?;
            summary.records_failed += count(r, "failed")?;
        }
        let errors: Vec<(String, i64)> = sqlx::query_as(
            "SELECT e.code, COUNT(*) AS n FROM record_errors e \
             JOIN batches b ON b.id = e.batch_id \
             WHERE b.client_id = $1 AND b.id >= $2 AND b.id < $3 \
             GROUP BY e.code ORDER BY n DESC, e.code LIMIT $4",
        )
        .bind(client.as_str())
        .bind(from.as_str())
        .bind(to.as_str())
        .bind(TOP_ERRORS)
        .fetch_all(self.pool())
        .await?;
        summary.top_errors = errors
            .into_iter()
            .map(|(code, n)| ErrorCount {
                code,
                count: u64::try_from(n).unwrap_or(0),
            })
            .collect();
        Ok(summary)
    }

    /// Whether `client`'s summary of `day` exists.
    pub async fn has_daily_summary(&self, client: &ClientId, day: &str) -> Result<bool> {
        let found: Option<i64> =
            sqlx::query_scalar("SELECT 1 FROM daily_summaries WHERE client_id = $1 AND day = $2")
                .bind(client.as_str())
                .bind(day)
                .fetch_optional(self.pool())
                .await?;
        Ok(found.is_some())
    }

    /// Keeps a summary; false when that client's day was summarized already (a summary is
    /// written once, so two leaders in a hand-over window cannot disagree).
    pub async fn store_daily_summary(&self, summary: &DailySummary) -> Result<bool> {
        let sql = self.sql(
            "INSERT INTO daily_summaries (client_id, day, summary, created_at) \
             VALUES ($1, $2, $3, {now}) ON CONFLICT (client_id, day) DO NOTHING",
        );
        let json = serde_json::to_string(summary).unwrap_or_default();
        Ok(sqlx::query(sql)
            .bind(summary.client_id.as_str())
            .bind(&summary.day)
            .bind(json)
            .execute(&mut *self.background_writer().await?)
            .await?
            .rows_affected()
            == 1)
    }

    /// `client`'s summaries, newest day first; only `day` when given.
    pub async fn list_daily_summaries(
        &self,
        client: &ClientId,
        day: Option<&str>,
        limit: u32,
    ) -> Result<Vec<DailySummary>> {
        let bodies: Vec<String> = sqlx::query_scalar(
            "SELECT summary FROM daily_summaries WHERE client_id = $1 \
             AND ($2 = '' OR day = $2) ORDER BY day DESC LIMIT $3",
        )
        .bind(client.as_str())
        .bind(day.unwrap_or_default())
        .bind(i64::from(limit))
        .fetch_all(self.pool())
        .await?;
        bodies
            .iter()
            .map(|b| {
                serde_json::from_str(b)
                    .map_err(|e| Error::internal("a stored summary is unreadable", e))
            })
            .collect()
    }
}

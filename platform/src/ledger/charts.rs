//! The history the dashboard's charts draw: one [`Sample`] per minute for the whole fleet
//! and for each client with activity, in `chart_samples`.
//!
//! The fleet's leader measures each minute once it is over ([`Db::measure_minute`]) and
//! stores it ([`Db::store_samples`]); rows older than the longest chart are pruned
//! ([`Db::prune_samples`]), so the table holds about a day of minutes whatever the ledger
//! holds. A page reads one client's (or the fleet's) rows of the last day
//! ([`Db::chart_samples`]) and measures the minute in progress itself (a client's page
//! that client's alone), so a completion shows at once.
//!
//! Every read here is bounded by time, never by the ledger's size: the minute's
//! completions through the `batches_completed` index (the latencies at most
//! [`LATENCY_SAMPLE`] of them), the batches not finished or dead through the status index
//! (as the queue depths read them), and the samples by their key.

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;

use dataflow_contracts::ClientId;
use serde_json::json;
use sqlx::Row;

use super::clients::parse_id;
use super::operator::{LATENCY_SAMPLE, percentile};
use super::{Db, Field, count};
use crate::Result;

/// A minute in milliseconds: the width of a sample.
pub const MINUTE_MS: i64 = 60_000;

/// The `client_id` of the whole fleet's rows.
const FLEET: &str = "";

/// Batches in each unfinished state (and dead), as a sample saw them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Depth {
    pub awaiting_approval: u64,
    pub ready: u64,
    pub processing: u64,
    pub dead: u64,
}

/// Accepted → completed, over one minute's completed batches.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Latency {
    pub p50_ms: u64,
    pub p95_ms: u64,
    pub p99_ms: u64,
}

impl Latency {
    /// The percentiles of `latencies` (sorted here); `None` when there are none.
    pub fn of(latencies: &mut [u64]) -> Option<Latency> {
        latencies.sort_unstable();
        Some(Latency {
            p50_ms: percentile(latencies, 50)?,
            p95_ms: percentile(latencies, 95)?,
            p99_ms: percentile(latencies, 99)?,
        })
    }
}

/// One minute of one client, or of the whole fleet.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sample {
    /// `None`: the whole fleet.
    pub client_id: Option<ClientId>,
    /// The minute's start, milliseconds since the epoch.
    pub minute: i64,
    /// Batches completed in the minute, and their records.
    pub batches: u64,
    pub records: u64,
    /// `None` when no batch completed in the minute.
    pub latency: Option<Latency>,
    pub depth: Depth,
}

impl Sample {
    fn new(client_id: Option<ClientId>, minute: i64) -> Sample {
        Sample {
            client_id,
            minute,
            ..Sample::default()
        }
    }
}

/// The start of the minute `ms` falls in.
pub fn minute_of(ms: i64) -> i64 {
    ms.div_euclid(MINUTE_MS) * MINUTE_MS
}

/// The sample of client `id` in `clients`, started when it is the first seen.
fn client_sample(
    clients: &mut BTreeMap<String, Sample>,
    id: String,
    minute: i64,
) -> Result<&mut Sample> {
    match clients.entry(id) {
        Entry::Occupied(e) => Ok(e.into_mut()),
        Entry::Vacant(e) => {
            let client = parse_id(e.key().clone())?;
            Ok(e.insert(Sample::new(Some(client), minute)))
        }
    }
}

impl Db {
    /// The minute that starts at `minute`: the fleet's sample first, then one for each
    /// client with batches completed in it or unfinished (or dead) now, by client id. The
    /// depth is the ledger's now: for a minute just over, its end. With `only`, that
    /// client's sample alone, read from its own rows (a client's page needs no other's);
    /// its percentiles then come from its own latest completions, where the stored
    /// sample of a minute busier than [`LATENCY_SAMPLE`] has the client's share of the
    /// fleet's latest.
    pub async fn measure_minute(
        &self,
        minute: i64,
        only: Option<&ClientId>,
    ) -> Result<Vec<Sample>> {
        let end = minute + MINUTE_MS;
        // `$1`, `$2` the minute's bounds where they are used, the client always last.
        let of_client = |next: usize| match only {
            Some(_) => format!(" AND client_id = ${next}"),
            None => String::new(),
        };
        let bind_client =
            |q: sqlx::query::Query<'static, sqlx::Any, sqlx::any::AnyArguments>| match only {
                Some(c) => q.bind(c.as_str().to_owned()),
                None => q,
            };
        let mut fleet = Sample::new(None, minute);
        let mut clients: BTreeMap<String, Sample> = BTreeMap::new();
        let done = self.sql(&format!(
            "SELECT client_id, COUNT(*) AS n, CAST(COALESCE(SUM(records_total), 0) AS BIGINT) AS records \
             FROM batches WHERE completed_at >= $1 AND completed_at < $2 AND status = 'completed'{} \
             GROUP BY client_id",
            of_client(3)
        ));
        let done = bind_client(sqlx::query(done).bind(minute).bind(end))
            .fetch_all(self.pool())
            .await?;
        for r in &done {
            let s = client_sample(&mut clients, r.try_get("client_id")?, minute)?;
            s.batches = count(r.try_get("n")?);
            s.records = count(r.try_get("records")?);
            fleet.batches += s.batches;
            fleet.records += s.records;
        }
        // A minute busier than the sample has its percentiles from its latest completions.
        let timed = self.sql(&format!(
            "SELECT client_id, completed_at - created_at AS latency FROM batches \
             WHERE completed_at >= $1 AND completed_at < $2 AND status = 'completed'{} \
             ORDER BY completed_at DESC LIMIT $3",
            of_client(4)
        ));
        let timed = bind_client(
            sqlx::query(timed)
                .bind(minute)
                .bind(end)
                .bind(LATENCY_SAMPLE),
        )
        .fetch_all(self.pool())
        .await?;
        let mut all = Vec::with_capacity(timed.len());
        let mut by_client: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        for r in &timed {
            let latency = count(r.try_get("latency")?);
            all.push(latency);
            by_client
                .entry(r.try_get("client_id")?)
                .or_default()
                .push(latency);
        }
        fleet.latency = Latency::of(&mut all);
        for (id, mut latencies) in by_client {
            client_sample(&mut clients, id, minute)?.latency = Latency::of(&mut latencies);
        }
        let waiting = self.sql(&format!(
            "SELECT client_id, status, COUNT(*) AS n FROM batches \
             WHERE status IN ('awaiting_approval', 'ready', 'processing', 'dead'){} \
             GROUP BY client_id, status",
            of_client(1)
        ));
        let waiting = bind_client(sqlx::query(waiting))
            .fetch_all(self.pool())
            .await?;
        for r in &waiting {
            let n = count(r.try_get("n")?);
            let status: String = r.try_get("status")?;
            let client = client_sample(&mut clients, r.try_get("client_id")?, minute)?;
            for depth in [&mut fleet.depth, &mut client.depth] {
                match status.as_str() {
                    "awaiting_approval" => depth.awaiting_approval += n,
                    "ready" => depth.ready += n,
                    "processing" => depth.processing += n,
                    _ => depth.dead += n,
                }
            }
        }
        if let Some(client) = only {
            let alone = clients.remove(client.as_str());
            return Ok(vec![
                alone.unwrap_or_else(|| Sample::new(Some(client.clone()), minute)),
            ]);
        }
        Ok(std::iter::once(fleet)
            .chain(clients.into_values())
            .collect())
    }

    /// Keeps `samples`; a minute of a client (or of the fleet) already kept stays as it
    /// was, so two leaders in a hand-over window write it once. How many were new.
    pub async fn store_samples(&self, samples: &[Sample]) -> Result<u64> {
        if samples.is_empty() {
            return Ok(0);
        }
        let rows: Vec<serde_json::Value> = samples
            .iter()
            .map(|s| {
                let l = s.latency;
                json!({
                    "client_id": s.client_id.as_ref().map_or(FLEET, ClientId::as_str),
                    "minute": s.minute,
                    "batches": s.batches,
                    "records": s.records,
                    "latency_p50": l.map(|l| l.p50_ms),
                    "latency_p95": l.map(|l| l.p95_ms),
                    "latency_p99": l.map(|l| l.p99_ms),
                    "awaiting_approval": s.depth.awaiting_approval,
                    "ready": s.depth.ready,
                    "processing": s.depth.processing,
                    "dead": s.depth.dead,
                })
            })
            .collect();
        const COLUMNS: &str = "client_id, minute, batches, records, latency_p50, latency_p95, \
                               latency_p99, awaiting_approval, ready, processing, dead";
        let mut fields = vec![("client_id", Field::Text)];
        fields.extend(COLUMNS.split(", ").skip(1).map(|c| (c, Field::Int)));
        let sql = self.sql(&format!(
            // `WHERE true`: SQLite would read the `ON` of the upsert as a join's.
            "INSERT INTO chart_samples ({COLUMNS}) SELECT {COLUMNS} FROM {} m WHERE true \
             ON CONFLICT (client_id, minute) DO NOTHING",
            self.json_rows(&fields, &rows)
        ));
        Ok(sqlx::query(sql)
            .bind(serde_json::Value::Array(rows).to_string())
            .execute(&mut *self.background_writer().await?)
            .await?
            .rows_affected())
    }

    /// Deletes the samples of minutes that started more than `keep_ms` ago; how many.
    pub async fn prune_samples(&self, keep_ms: i64) -> Result<u64> {
        // The bound as a value, so PostgreSQL starts the index scan with it.
        let before = self.now_ms().await? - keep_ms;
        Ok(sqlx::query("DELETE FROM chart_samples WHERE minute < $1")
            .bind(before)
            .execute(&mut *self.background_writer().await?)
            .await?
            .rows_affected())
    }

    /// The kept samples of `client` (the fleet's with `None`) from `since`, oldest first:
    /// one for every minute the fleet was sampled, the client's zero when it had no
    /// activity then. A minute nobody sampled (no worker led) is absent.
    pub async fn chart_samples(
        &self,
        client: Option<&ClientId>,
        since: i64,
    ) -> Result<Vec<Sample>> {
        let rows = sqlx::query(
            "SELECT f.minute, c.batches, c.records, c.latency_p50, c.latency_p95, c.latency_p99, \
                    c.awaiting_approval, c.ready, c.processing, c.dead \
             FROM chart_samples f \
             LEFT JOIN chart_samples c ON c.client_id = $1 AND c.minute = f.minute \
             WHERE f.client_id = '' AND f.minute >= $2 ORDER BY f.minute",
        )
        .bind(client.map_or(FLEET, ClientId::as_str))
        .bind(since)
        .fetch_all(self.pool())
        .await?;
        let n = |r: &sqlx::any::AnyRow, col: &str| -> Result<u64> {
            Ok(r.try_get::<Option<i64>, _>(col)?.map_or(0, count))
        };
        rows.iter()
            .map(|r| {
                let p50: Option<i64> = r.try_get("latency_p50")?;
                let latency = match p50 {
                    Some(p50) => Some(Latency {
                        p50_ms: count(p50),
                        p95_ms: n(r, "latency_p95")?,
                        p99_ms: n(r, "latency_p99")?,
                    }),
                    None => None,
                };
                Ok(Sample {
                    client_id: client.cloned(),
                    minute: r.try_get("minute")?,
                    batches: n(r, "batches")?,
                    records: n(r, "records")?,
                    latency,
                    depth: Depth {
                        awaiting_approval: n(r, "awaiting_approval")?,
                        ready: n(r, "ready")?,
                        processing: n(r, "processing")?,
                        dead: n(r, "dead")?,
                    },
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minutes_start_on_the_minute() {
        assert_eq!(minute_of(0), 0);
        assert_eq!(minute_of(59_999), 0);
        assert_eq!(minute_of(60_000), 60_000);
        assert_eq!(minute_of(-1), -60_000);
    }

    #[test]
    fn latency_percentiles_are_nearest_rank() {
        assert_eq!(Latency::of(&mut []), None);
        let mut one = [42];
        assert_eq!(
            Latency::of(&mut one),
            Some(Latency {
                p50_ms: 42,
                p95_ms: 42,
                p99_ms: 42
            })
        );
        let mut hundred: Vec<u64> = (1..=100).rev().collect();
        assert_eq!(
            Latency::of(&mut hundred),
            Some(Latency {
                p50_ms: 50,
                p95_ms: 95,
                p99_ms: 99
            })
        );
    }
}

//! What the ledger holds after a scenario, read from SQL and Redis and checked against what
//! the client sent: the drain (P1) and the invariants L0, L1, C1 and K1 of RELIABILITY.md,
//! plus the report job each completed batch asks for (one, done).

use std::collections::HashMap;
use std::time::Duration;

use dataflow_contracts::jobs::JobKind;
use sqlx::PgPool;
use tokio::time::Instant;

use crate::load::Sent;

/// One stored import and its batch, with what SQL has for it.
#[derive(Debug, sqlx::FromRow)]
struct Stored {
    import_id: String,
    idempotency_key: Option<String>,
    records: i64,
    batch_id: String,
    status: String,
    records_total: i64,
    records_written: i64,
    records_unchanged: i64,
    records_failed: i64,
    records_superseded: i64,
    attempts: i32,
    last_error: Option<String>,
    /// Rows of `records` that name this batch.
    record_rows: i64,
    /// `BatchCompleted` events in the outbox.
    completions: i64,
    report_jobs: i64,
    reports_done: i64,
    dead_jobs: i64,
}

/// Imports of the scenario's client, by how their batches ended.
#[derive(Debug, Default)]
pub struct Tally {
    pub stored: usize,
    pub completed: usize,
    pub dead: usize,
    pub other: usize,
}

/// What is still moving for `client`: unfinished batches, unsettled jobs, unpublished events.
async fn unfinished(sql: &PgPool, client: &str) -> (i64, i64, i64) {
    sqlx::query_as(
        "SELECT \
           (SELECT COUNT(*) FROM batches WHERE client_id = $1 \
              AND status NOT IN ('completed', 'rejected', 'dead')), \
           (SELECT COUNT(*) FROM jobs WHERE client_id = $1 AND status NOT IN ('done', 'dead')), \
           (SELECT COUNT(*) FROM outbox_pending)",
    )
    .bind(client)
    .fetch_one(sql)
    .await
    .unwrap()
}

/// P1: waits until every batch of `client` has finished, its jobs are settled and the outbox
/// is published, up to `deadline`; what was left otherwise.
pub async fn wait_drained(sql: &PgPool, client: &str, deadline: Instant) -> Result<(), String> {
    loop {
        let (batches, jobs, events) = unfinished(sql, client).await;
        if batches + jobs + events == 0 {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "P1: not drained: {batches} batches unfinished, {jobs} jobs unsettled, \
                 {events} events unpublished"
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// L0, L1 and C1 for `client` against what was `sent`; the tally and the violations.
pub async fn check(sql: &PgPool, client: &str, sent: &[Sent]) -> (Tally, Vec<String>) {
    let stored: Vec<Stored> = sqlx::query_as(
        "SELECT i.id AS import_id, i.idempotency_key, i.records, b.id AS batch_id, b.status, \
           b.records_total, b.records_written, b.records_unchanged, b.records_failed, \
           b.records_superseded, \
           b.attempts, b.last_error, \
           (SELECT COUNT(*) FROM records r WHERE r.client_id = i.client_id AND r.batch_id = b.id) \
             AS record_rows, \
           (SELECT COUNT(*) FROM outbox o WHERE o.batch_id = b.id \
              AND o.event_type = 'BatchCompleted') AS completions, \
           (SELECT COUNT(*) FROM jobs j WHERE j.batch_id = b.id AND j.kind = $2) AS report_jobs, \
           (SELECT COUNT(*) FROM jobs j WHERE j.batch_id = b.id AND j.kind = $2 \
              AND j.status = 'done') AS reports_done, \
           (SELECT COUNT(*) FROM jobs j WHERE j.batch_id = b.id AND j.status = 'dead') \
             AS dead_jobs \
         FROM imports i JOIN batches b ON b.id = i.batch_id WHERE i.client_id = $1",
    )
    .bind(client)
    .bind(JobKind::Report.as_str())
    .fetch_all(sql)
    .await
    .unwrap();

    let mut violations = Violations::default();
    let mut tally = Tally {
        stored: stored.len(),
        ..Tally::default()
    };
    let sent_by_key: HashMap<&str, &Sent> = sent.iter().map(|s| (s.key.as_str(), s)).collect();
    let mut by_key: HashMap<&str, Vec<&Stored>> = HashMap::new();
    for s in &stored {
        match s.status.as_str() {
            "completed" => tally.completed += 1,
            "dead" => tally.dead += 1,
            _ => tally.other += 1,
        }
        // L1: nothing stored that was not sent, as it was sent.
        let Some(key) = s.idempotency_key.as_deref() else {
            violations.add("L1: stored import without an Idempotency-Key", &s.import_id);
            continue;
        };
        by_key.entry(key).or_default().push(s);
        match sent_by_key.get(key) {
            None => violations.add("L1: stored import that was never sent", key),
            Some(sent) if s.records != sent.records as i64 => {
                violations.add("L1: stored with another record count than sent", key)
            }
            Some(_) => {}
        }
        check_batch(s, &mut violations);
    }
    for (key, imports) in &by_key {
        if imports.len() > 1 {
            violations.add("L1: one Idempotency-Key stored as several imports", key);
        }
    }
    // L0: every acknowledged import is there, as acknowledged.
    for s in sent {
        let Some(acked) = &s.acked else { continue };
        match by_key.get(s.key.as_str()).and_then(|v| v.first()) {
            None => violations.add("L0: acknowledged import missing", &s.key),
            Some(found) if found.import_id != acked.id.as_str() => {
                violations.add("L0: acknowledged as one import, stored as another", &s.key)
            }
            Some(_) => {}
        }
    }
    (tally, violations.into_lines())
}

/// C1 and the counts of one finished batch: it completed once, with one set of records and
/// one report; a valid import never ends dead.
fn check_batch(s: &Stored, v: &mut Violations) {
    let id = &s.batch_id;
    if s.completions > 1 {
        v.add("C1: batch completed more than once", id);
    }
    if s.record_rows != s.records_written {
        v.add(
            "C1: record rows differ from the records the batch wrote",
            id,
        );
    }
    if s.dead_jobs > 0 {
        v.add("a batch's job ended dead", id);
    }
    match s.status.as_str() {
        "completed" => {
            if s.completions == 0 {
                v.add("C1: completed without a BatchCompleted event", id);
            }
            // Every record is new, valid and the import's own: all written, once.
            let counts = (
                s.records_written,
                s.records_unchanged,
                s.records_failed,
                s.records_superseded,
            );
            if counts != (s.records_total, 0, 0, 0) || s.records_total != s.records {
                v.add(
                    "counts: written/unchanged/failed/superseded differ from the records sent",
                    id,
                );
            }
            if (s.report_jobs, s.reports_done) != (1, 1) {
                v.add("a completed batch has not exactly one report job, done", id);
            }
        }
        "dead" => v.add(
            "a valid import ended dead",
            &format!(
                "{id} after {} attempts: {}",
                s.attempts,
                s.last_error.as_deref().unwrap_or("")
            ),
        ),
        _ => {}
    }
}

/// K1: every key under the prefix carries a TTL, except the job queue's own documented keys.
pub async fn immortal_keys(redis: &dataflow_platform::redis::Redis) -> Vec<String> {
    let keys = match redis.keys_with_prefix().await {
        Ok(keys) => keys,
        Err(e) => return vec![format!("K1: Redis did not answer the scan: {e}")],
    };
    let mut v = Violations::default();
    if keys.is_empty() {
        v.add("K1: nothing to check", "no key under the prefix");
    }
    let mut conn = redis.conn();
    let queue_prefix = format!("{}:", redis.prefix());
    for key in keys {
        let rest = key.strip_prefix(&queue_prefix).unwrap_or(&key);
        if is_queue_key(rest) {
            continue;
        }
        let ttl: Result<i64, _> = redis::cmd("PTTL").arg(&key).query_async(&mut conn).await;
        if ttl == Ok(-1) {
            v.add("K1: key without a TTL", rest);
        }
    }
    v.into_lines()
}

/// The keys the docs name as the job queue itself: `{jobs:<kind>}:ready`,
/// `{jobs:<kind>}:inflight:<worker>`, `{jobs:<kind>}:present` and `{jobs:<kind>}:workers`.
fn is_queue_key(key: &str) -> bool {
    let parts: Vec<&str> = key.splitn(4, ':').collect();
    let kind = |k: &str| {
        k.strip_suffix('}')
            .is_some_and(|k| JobKind::ALL.iter().any(|j| j.as_str() == k))
    };
    match parts.as_slice() {
        ["{jobs", k, "ready" | "present" | "workers"] => kind(k),
        ["{jobs", k, "inflight", worker] => kind(k) && !worker.is_empty(),
        _ => false,
    }
}

/// Violations by kind, each with a count and the first few subjects.
#[derive(Default)]
struct Violations(Vec<(&'static str, Vec<String>)>);

impl Violations {
    fn add(&mut self, what: &'static str, subject: &str) {
        match self.0.iter_mut().find(|(w, _)| *w == what) {
            Some((_, subjects)) => subjects.push(subject.to_owned()),
            None => self.0.push((what, vec![subject.to_owned()])),
        }
    }

    fn into_lines(self) -> Vec<String> {
        self.0
            .into_iter()
            .map(|(what, subjects)| {
                let shown: Vec<&str> = subjects.iter().take(3).map(String::as_str).collect();
                format!("{what} ×{} ({})", subjects.len(), shown.join(", "))
            })
            .collect()
    }
}

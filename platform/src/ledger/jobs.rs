//! Follow-up job intents: written beside the event that asks for them, handed out to
//! workers (directly from SQL, or through the Redis queue by the relay), settled here.
//!
//! Attempts are counted in SQL whichever way a job travels: a claim from SQL counts one at
//! once (so a worker that dies mid-job has used it), a Redis delivery counts one when it is
//! settled or found lost. The last failed attempt, or a failure no retry can fix, buries the
//! job as `dead`, where an operator can see and retry it.
//!
//! Every hand-over moves the job's delivery epoch on (each take, each hand-back), and every
//! settle names the delivery it settles ([`JobTicket`]): it applies only while that delivery
//! is the job's current one. A worker cut off long enough to be presumed dead may still
//! finish its attempt after the job went to another worker; its late answer matches nothing.

use dataflow_contracts::events::{Envelope, Event};
use dataflow_contracts::jobs::{
    JobCount, JobKind, JobMessage, JobPage, JobSpec, JobStatus, JobTicket, JobView,
};
use dataflow_contracts::time::rfc3339;
use dataflow_contracts::{BatchId, JobId, Policy};
use serde_json::value::RawValue;
use sqlx::Row;

use super::clients::{parse_id, parse_policy};
use super::commits::Kinds;
use super::filters::{Bind, Conditions};
use super::{Db, Field, Outgoing, Tx, count, json_list, split_page};
use crate::{Error, Result};

/// The epoch of a job's message in a queue. An apalis-redis run moves `delivery_epoch` on
/// as it starts (so a late answer of an earlier run cannot settle it), while the message it
/// ran from keeps its own in `queued_epoch`; lists queues leave that unset, and a message
/// is the delivery.
macro_rules! message_epoch {
    () => {
        "COALESCE(queued_epoch, delivery_epoch)"
    };
}

/// Where [`Db::take_due_jobs`] puts the jobs it takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handover<'a> {
    /// Worker `by` runs them now (embedded mode): `running`, one attempt counted, and the
    /// claim is that worker's until it settles, its lease lapses or the worker is gone.
    Claim { by: &'a str },
    /// The relay pushes them to Redis: `queued`; attempts are counted when they settle.
    Queue,
}

impl<'a> Handover<'a> {
    /// The status taken jobs get, and the attempts the hand-over counts.
    fn status_and_count(self) -> (JobStatus, i32) {
        match self {
            Handover::Claim { .. } => (JobStatus::Running, 1),
            Handover::Queue => (JobStatus::Queued, 0),
        }
    }

    fn owner(self) -> Option<&'a str> {
        match self {
            Handover::Claim { by } => Some(by),
            Handover::Queue => None,
        }
    }
}

/// A claim from SQL that will not be settled by its holder goes back to `pending` (a new
/// delivery), or `dead` when it used the last attempt (the claim counted it).
macro_rules! take_back_claims {
    ($where:expr) => {
        concat!(
            "UPDATE jobs SET status = CASE WHEN attempts >= max_attempts THEN 'dead' \
                                           ELSE 'pending' END, \
                 run_at = {now}, lease_until = NULL, lease_owner = NULL, updated_at = {now}, \
                 delivery_epoch = delivery_epoch + 1, \
                 last_error = 'the worker running it stopped before it finished' \
             WHERE status = 'running' AND ",
            $where
        )
    };
}

/// How a failed attempt ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Try again after the backoff, unless the attempts are used up.
    Retry { backoff_ms: u64 },
    /// No retry can fix it (a refused webhook target, a malformed job): bury it now.
    Permanent,
    /// Not attempted (its target or client is at its cap of deliveries at once): due again
    /// after `delay_ms`, the attempt not counted.
    Defer { delay_ms: u64 },
}

/// Filters of `GET /admin/jobs`.
#[derive(Debug, Clone, Default)]
pub struct JobFilter {
    pub status: Option<JobStatus>,
    pub kind: Option<JobKind>,
    pub batch_id: Option<BatchId>,
}

const JOB_COLUMNS: &str = "id, kind, batch_id, client_id, status, attempts, max_attempts, run_at, \
                           last_error, created_at, done_at";

/// The jobs an event asks for, given the client's policy: every event goes to the webhook;
/// a completed batch gets a stored report; the end of a batch (completed, rejected, dead)
/// is mailed.
pub fn jobs_for_event(event: &Envelope, policy: &Policy) -> Vec<JobSpec> {
    let mut specs = Vec::new();
    if let Some(url) = &policy.webhook_url {
        specs.push(JobSpec::Webhook {
            url: url.clone(),
            event: Box::new(event.clone()),
        });
    }
    let finished = match &event.event {
        Event::BatchCompleted(_) => {
            specs.push(JobSpec::Report);
            true
        }
        // A batch refused for its errors has a report to read: which rows, and why.
        Event::BatchRejected(r) if r.for_errors() => {
            specs.push(JobSpec::Report);
            true
        }
        Event::BatchRejected(_) | Event::BatchDead(_) => true,
        _ => false,
    };
    if finished && let Some(to) = &policy.notify_email {
        specs.push(JobSpec::Email { to: to.clone() });
    }
    specs
}

impl Db {
    /// Writes the intents each event asks for under its policy (the client's stored one
    /// when `None`) inside the caller's transaction, all in one statement. Each job
    /// continues its event's trace.
    pub(crate) async fn write_job_intents(
        &self,
        tx: &mut Tx,
        events: &[Outgoing<'_>],
    ) -> Result<()> {
        let mut jobs: Vec<(&Outgoing<'_>, JobSpec)> = Vec::new();
        for outgoing in events {
            let event = outgoing.event;
            let stored;
            let policy = match outgoing.policy {
                Some(p) => p,
                None => {
                    let json: Option<String> =
                        sqlx::query_scalar("SELECT policy FROM clients WHERE id = $1")
                            .bind(event.client_id.as_str())
                            .fetch_optional(&mut **tx)
                            .await?;
                    let Some(json) = json else {
                        continue;
                    };
                    stored = parse_policy(&json)?;
                    &stored
                }
            };
            jobs.extend(
                jobs_for_event(event, policy)
                    .into_iter()
                    .map(|spec| (outgoing, spec)),
            );
        }
        if jobs.is_empty() {
            return Ok(());
        }
        let rows: Vec<serde_json::Value> = jobs
            .iter()
            .map(|(outgoing, spec)| {
                serde_json::json!({
                    "id": JobId::generate().as_str(),
                    "kind": spec.kind().as_str(),
                    "batch_id": outgoing.event.batch_id.as_str(),
                    "client_id": outgoing.event.client_id.as_str(),
                    "spec": serde_json::to_string(spec).unwrap_or_default(),
                    "traceparent": outgoing.traceparent,
                })
            })
            .collect();
        let sql = self.sql(&format!(
            "INSERT INTO jobs (id, kind, batch_id, client_id, spec, status, attempts, \
                               max_attempts, run_at, created_at, updated_at, traceparent) \
             SELECT m.id, m.kind, m.batch_id, m.client_id, m.spec, 'pending', 0, $2, \
                    {{now}}, {{now}}, {{now}}, m.traceparent \
             FROM {} m",
            self.json_rows(
                &[
                    ("id", Field::Text),
                    ("kind", Field::Text),
                    ("batch_id", Field::Text),
                    ("client_id", Field::Text),
                    ("spec", Field::Text),
                    ("traceparent", Field::Text),
                ],
                &rows
            )
        ));
        sqlx::query(sql)
            .bind(serde_json::Value::Array(rows).to_string())
            .bind(i64::from(self.job_max_attempts))
            .execute(&mut **tx)
            .await?;
        for (_, spec) in &jobs {
            tx.wrote_job(spec.kind());
        }
        Ok(())
    }

    /// Takes up to `limit` due `pending` jobs of `kind` (oldest first), marks them per
    /// `handover` with a lease of `lease_ms`, and returns them as queue messages, each a new
    /// delivery (epoch).
    pub async fn take_due_jobs(
        &self,
        kind: JobKind,
        limit: usize,
        handover: Handover<'_>,
        lease_ms: u64,
    ) -> Result<Vec<JobMessage>> {
        let sql = self.sql(
            "UPDATE jobs SET status = $3, attempts = attempts + $4, \
                 lease_until = {now} + $5, lease_owner = $6, updated_at = {now}, \
                 delivery_epoch = delivery_epoch + 1, \
                 queued_epoch = CASE WHEN $3 = 'queued' THEN delivery_epoch + 1 END \
             WHERE id IN (SELECT id FROM jobs WHERE kind = $1 AND status = 'pending' \
                          AND run_at <= {now} ORDER BY run_at LIMIT $2 {skip_locked}) \
             RETURNING id, batch_id, client_id, spec, attempts, max_attempts, delivery_epoch, \
                       traceparent",
        );
        let (status, counted) = handover.status_and_count();
        let rows = sqlx::query(sql)
            .bind(kind.as_str())
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .bind(status.as_str())
            .bind(counted)
            .bind(millis(lease_ms))
            .bind(handover.owner())
            .fetch_all(&mut *self.background_writer().await?)
            .await?;
        let mut jobs = rows
            .iter()
            .map(|r| {
                let spec: String = r.try_get("spec")?;
                let attempts: i32 = r.try_get("attempts")?;
                Ok(JobMessage {
                    id: parse_id(r.try_get("id")?)?,
                    batch_id: parse_id(r.try_get("batch_id")?)?,
                    client_id: parse_id(r.try_get("client_id")?)?,
                    // A claim counted this attempt already; the message says how many came before.
                    attempts: u32::try_from(attempts - counted).unwrap_or(0),
                    max_attempts: u32::try_from(r.try_get::<i32, _>("max_attempts")?).unwrap_or(1),
                    epoch: u64::try_from(r.try_get::<i64, _>("delivery_epoch")?).unwrap_or(0),
                    spec: RawValue::from_string(spec)
                        .map_err(|e| Error::internal("a stored job spec is not JSON", e))?,
                    traceparent: r.try_get("traceparent")?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        jobs.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(jobs)
    }

    /// Starts a run of a queued message whose queue may run it more than once under the same
    /// message (apalis-redis re-runs a task when it judges its worker gone): the run takes
    /// the delivery as it starts, moving the epoch on, and settles under the ticket this
    /// returns. An earlier run of the same message that answers late names an epoch that is
    /// no longer current and is refused. `None`: the job is no longer queued under this
    /// message (settled already, or handed over again in another message): do not run it.
    /// The message stays what the sweeper looks for (`queued_epoch`).
    pub async fn start_queued_run(&self, message: &JobTicket) -> Result<Option<JobTicket>> {
        let sql = self.sql(concat!(
            "UPDATE jobs SET delivery_epoch = delivery_epoch + 1, updated_at = {now} \
                 WHERE id = $1 AND status = 'queued' AND ",
            message_epoch!(),
            " = $2 RETURNING delivery_epoch"
        ));
        let epoch: Option<i64> = sqlx::query_scalar(sql)
            .bind(message.id.as_str())
            .bind(epoch(message))
            .fetch_optional(&mut *self.background_writer().await?)
            .await?;
        Ok(epoch.map(|e| JobTicket {
            id: message.id.clone(),
            epoch: u64::try_from(e).unwrap_or(0),
        }))
    }

    /// Marks jobs done. `counted` is false when their attempt was counted at claim time.
    /// Deliveries already settled or superseded are left alone; returns how many applied.
    pub async fn finish_jobs(&self, tickets: &[&JobTicket], counted: bool) -> Result<u64> {
        if tickets.is_empty() {
            return Ok(0);
        }
        let sql = self.sql(
            "UPDATE jobs SET status = 'done', attempts = attempts + $2, done_at = {now}, \
                 updated_at = {now}, lease_until = NULL, last_error = NULL \
             WHERE (id, delivery_epoch) IN ({ticket_list}) AND status IN ('queued', 'running')",
        );
        Ok(sqlx::query(sql)
            .bind(ticket_list(tickets))
            .bind(i64::from(counted))
            .execute(&mut *self.background_writer().await?)
            .await?
            .rows_affected())
    }

    /// Ends a failed (or lost) attempt: back to `pending` after the backoff, or `dead`.
    /// Returns the new status, or `None` when the delivery was no longer the job's current
    /// one in flight (settled already, or superseded).
    pub async fn fail_job(
        &self,
        ticket: &JobTicket,
        counted: bool,
        error: &str,
        failure: Failure,
    ) -> Result<Option<JobStatus>> {
        // The attempts this ending adds: the attempt of a queue's delivery (a claim from
        // SQL counted it already), less the one a deferral did not make.
        let (permanent, delay_ms, deferred) = match failure {
            Failure::Retry { backoff_ms } => (0, backoff_ms, 0),
            Failure::Permanent => (1, 0, 0),
            Failure::Defer { delay_ms } => (0, delay_ms, 1),
        };
        let added = i64::from(counted) - deferred;
        let sql = self.sql(
            "UPDATE jobs SET attempts = attempts + $2, \
                 status = CASE WHEN $5 = 1 OR attempts + $2 >= max_attempts \
                          THEN 'dead' ELSE 'pending' END, \
                 run_at = {now} + $4, last_error = $3, lease_until = NULL, updated_at = {now}, \
                 delivery_epoch = delivery_epoch + 1 \
             WHERE id = $1 AND delivery_epoch = $6 AND status IN ('queued', 'running') \
             RETURNING status",
        );
        let status: Option<String> = sqlx::query_scalar(sql)
            .bind(ticket.id.as_str())
            .bind(added)
            .bind(truncate(error))
            .bind(millis(delay_ms))
            .bind(permanent)
            .bind(epoch(ticket))
            .fetch_optional(&mut *self.background_writer().await?)
            .await?;
        status.map(|s| s.parse().map_err(Error::stored)).transpose()
    }

    /// Deliveries handed to a queue whose lease ran out, for the sweeper to look for: each
    /// ticket names the message in the queue (a run that started since has moved the
    /// delivery on, not the message).
    pub async fn expired_queued_jobs(&self, limit: u32) -> Result<Vec<(JobTicket, JobKind)>> {
        let sql = self.sql(concat!(
            "SELECT id, kind, ",
            message_epoch!(),
            " AS message_epoch FROM jobs \
                 WHERE status = 'queued' AND lease_until < {now} ORDER BY lease_until LIMIT $1"
        ));
        let rows = sqlx::query(sql)
            .bind(i64::from(limit))
            .fetch_all(self.pool())
            .await?;
        rows.iter()
            .map(|r| {
                let kind: String = r.try_get("kind")?;
                let ticket = JobTicket {
                    id: parse_id(r.try_get("id")?)?,
                    epoch: u64::try_from(r.try_get::<i64, _>("message_epoch")?).unwrap_or(0),
                };
                Ok((ticket, kind.parse().map_err(Error::stored)?))
            })
            .collect()
    }

    /// The queue lost these deliveries: their jobs go back to `pending`, due now (no attempt
    /// counted: none ran, or the one that ran was cut off, and its late answer is refused).
    pub async fn requeue_lost_jobs(&self, tickets: &[&JobTicket]) -> Result<u64> {
        if tickets.is_empty() {
            return Ok(0);
        }
        let sql = self.sql(concat!(
            "UPDATE jobs SET status = 'pending', run_at = {now}, lease_until = NULL, \
                     updated_at = {now}, delivery_epoch = delivery_epoch + 1, queued_epoch = NULL \
                 WHERE (id, ",
            message_epoch!(),
            ") IN ({ticket_list}) AND status = 'queued'"
        ));
        Ok(sqlx::query(sql)
            .bind(ticket_list(tickets))
            .execute(&mut *self.background_writer().await?)
            .await?
            .rows_affected())
    }

    /// The queue still holds these deliveries: look for them again after `lease_ms`.
    pub async fn extend_job_leases(&self, tickets: &[&JobTicket], lease_ms: u64) -> Result<u64> {
        if tickets.is_empty() {
            return Ok(0);
        }
        let sql = self.sql(concat!(
            "UPDATE jobs SET lease_until = {now} + $2 WHERE (id, ",
            message_epoch!(),
            ") IN ({ticket_list}) AND status = 'queued'"
        ));
        Ok(sqlx::query(sql)
            .bind(ticket_list(tickets))
            .bind(millis(lease_ms))
            .execute(&mut *self.background_writer().await?)
            .await?
            .rows_affected())
    }

    /// Hands back claims ([`Handover::Claim`]) that never ran (a stopping worker's unstarted
    /// ones): `pending` again, and the attempt each claim counted is taken back.
    pub async fn hand_back_claims(&self, tickets: &[&JobTicket]) -> Result<u64> {
        if tickets.is_empty() {
            return Ok(0);
        }
        let sql = self.sql(
            "UPDATE jobs SET status = 'pending', attempts = attempts - 1, lease_until = NULL, \
                 updated_at = {now}, delivery_epoch = delivery_epoch + 1 \
             WHERE (id, delivery_epoch) IN ({ticket_list}) AND status = 'running'",
        );
        Ok(sqlx::query(sql)
            .bind(ticket_list(tickets))
            .execute(&mut *self.background_writer().await?)
            .await?
            .rows_affected())
    }

    /// Embedded mode: jobs whose worker died mid-attempt (the attempt was counted at claim)
    /// go back to `pending`, or `dead` when that was the last one.
    pub async fn expire_running_jobs(&self) -> Result<u64> {
        let sql = self.sql(take_back_claims!("lease_until < {now}"));
        Ok(sqlx::query(sql)
            .execute(&mut *self.background_writer().await?)
            .await?
            .rows_affected())
    }

    /// The claims of workers that are gone (not among `live`, and untouched for
    /// `quiet_ms`: a worker that has just started may not be in the registry yet) go back
    /// at once, as their lease running out would have sent them. A holder wrongly judged
    /// gone loses nothing but the attempt: its late settle names a delivery that is no
    /// longer current and is refused.
    pub async fn end_job_claims_of_gone_workers(
        &self,
        live: &[String],
        quiet_ms: i64,
    ) -> Result<u64> {
        let sql = self.sql(take_back_claims!(
            "lease_owner NOT IN ({id_list}) AND updated_at < {now} - $2"
        ));
        Ok(sqlx::query(sql)
            .bind(json_list(live))
            .bind(quiet_ms)
            .execute(&mut *self.background_writer().await?)
            .await?
            .rows_affected())
    }

    /// Deletes up to `limit` jobs finished (done or discarded) more than `retention_ms`
    /// ago, so the table holds the recent past and whatever is still to do. Job ids are
    /// ULIDs, so "created before the cutoff" is a range of the primary key: no index on
    /// finished rows is needed, and finishing a job stays one update of indexes it leaves.
    pub async fn prune_done_jobs(&self, retention_ms: i64, limit: u32) -> Result<u64> {
        // The ledger's clock, the one `done_at` was written by.
        let now_ms = u64::try_from(self.now_ms().await?).unwrap_or(0);
        let cutoff_ms = now_ms.saturating_sub(u64::try_from(retention_ms).unwrap_or(0));
        let cutoff = JobId::from_ulid(ulid::Ulid::from_parts(cutoff_ms, 0));
        let sql = self.sql(
            "DELETE FROM jobs WHERE id IN (SELECT id FROM jobs \
                 WHERE id < $3 AND status IN ('done', 'discarded') AND done_at < {now} - $1 \
                 ORDER BY id LIMIT $2)",
        );
        Ok(sqlx::query(sql)
            .bind(retention_ms)
            .bind(i64::from(limit))
            .bind(cutoff.as_str())
            .execute(&mut *self.background_writer().await?)
            .await?
            .rows_affected())
    }

    /// Operator retry of a dead job: fresh attempts, due now (and this process's worker of
    /// its kind is woken for it).
    pub async fn retry_job(&self, id: &JobId) -> Result<JobView> {
        let job = self
            .act_on_dead_job(
                id,
                "UPDATE jobs SET status = 'pending', attempts = 0, run_at = {now}, \
                     last_error = NULL, updated_at = {now}, delivery_epoch = delivery_epoch + 1 \
                 WHERE id = $1 AND status = 'dead'",
            )
            .await?;
        self.commits.wake_jobs(Kinds::default().with(job.kind));
        Ok(job)
    }

    /// Operator discard of a dead job: it leaves the dead-letter queue for good (and is
    /// pruned after the retention like a done one).
    pub async fn discard_job(&self, id: &JobId) -> Result<JobView> {
        self.act_on_dead_job(
            id,
            "UPDATE jobs SET status = 'discarded', done_at = {now}, updated_at = {now} \
             WHERE id = $1 AND status = 'dead'",
        )
        .await
    }

    async fn act_on_dead_job(&self, id: &JobId, statement: &'static str) -> Result<JobView> {
        let changed = sqlx::query(self.sql(statement))
            .bind(id.as_str())
            .execute(&mut *self.writer().await?)
            .await?
            .rows_affected();
        let job = self.get_job(id).await?.ok_or(Error::NotFound)?;
        if changed == 0 {
            return Err(Error::Conflict(format!("job is {}, not dead", job.status)));
        }
        Ok(job)
    }

    pub async fn get_job(&self, id: &JobId) -> Result<Option<JobView>> {
        let sql = sqlx::AssertSqlSafe(format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1"));
        let row = sqlx::query_as::<_, JobColumns>(sql)
            .bind(id.as_str())
            .fetch_optional(self.pool())
            .await?;
        row.map(JobColumns::parse).transpose()
    }

    /// Jobs newest first, filtered, one page after `cursor`.
    pub async fn list_jobs(
        &self,
        filter: &JobFilter,
        cursor: Option<&JobId>,
        limit: u32,
    ) -> Result<JobPage> {
        let mut given = Conditions::default();
        given
            .and("status =", filter.status.map(|s| Bind::Text(s.as_str())))
            .and("kind =", filter.kind.map(|k| Bind::Text(k.as_str())))
            .and(
                "batch_id =",
                filter.batch_id.as_ref().map(|b| Bind::Text(b.as_str())),
            )
            .and("id <", cursor.map(|c| Bind::Text(c.as_str())));
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT {JOB_COLUMNS} FROM jobs{} ORDER BY id DESC LIMIT ${}",
            given.clause(),
            given.next()
        ));
        let rows = given
            .bind(sqlx::query_as::<_, JobColumns>(sql))
            .bind(i64::from(limit) + 1)
            .fetch_all(self.pool())
            .await?;
        let items = rows
            .into_iter()
            .map(JobColumns::parse)
            .collect::<Result<Vec<_>>>()?;
        let (items, next_cursor) = split_page(items, limit, |j| j.id.to_string());
        Ok(JobPage { items, next_cursor })
    }

    /// How many jobs are in each (kind, status).
    pub async fn job_counts(&self) -> Result<Vec<JobCount>> {
        let rows =
            sqlx::query("SELECT kind, status, COUNT(*) AS n FROM jobs GROUP BY kind, status")
                .fetch_all(self.pool())
                .await?;
        let mut counts = rows
            .iter()
            .map(|r| {
                let kind: String = r.try_get("kind")?;
                let status: String = r.try_get("status")?;
                Ok(JobCount {
                    kind: kind.parse().map_err(Error::stored)?,
                    status: status.parse().map_err(Error::stored)?,
                    count: count(r.try_get("n")?),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        counts.sort_by_key(|c| (c.kind.as_str(), c.status.as_str()));
        Ok(counts)
    }

    /// Stores (or replaces) the report of a batch; `csv` is `None` when it was too large to keep.
    pub async fn store_report(
        &self,
        batch: &BatchId,
        summary: &str,
        csv: Option<&[u8]>,
    ) -> Result<()> {
        let sql = self.sql(
            "INSERT INTO reports (batch_id, summary, rejected_csv, created_at) \
             VALUES ($1, $2, $3, {now}) \
             ON CONFLICT (batch_id) DO UPDATE SET summary = excluded.summary, \
                 rejected_csv = excluded.rejected_csv, created_at = excluded.created_at",
        );
        sqlx::query(sql)
            .bind(batch.as_str())
            .bind(summary)
            .bind(csv)
            .execute(&mut *self.background_writer().await?)
            .await?;
        Ok(())
    }

    /// The stored report of a batch: its JSON summary and, unless too large, the CSV.
    pub async fn stored_report(
        &self,
        batch: &BatchId,
    ) -> Result<Option<(String, Option<Vec<u8>>)>> {
        let row = sqlx::query("SELECT summary, rejected_csv FROM reports WHERE batch_id = $1")
            .bind(batch.as_str())
            .fetch_optional(self.pool())
            .await?;
        row.map(|r| Ok((r.try_get("summary")?, r.try_get("rejected_csv")?)))
            .transpose()
    }
}

/// A job's [`JOB_COLUMNS`] as the ledger returns them, before their values are parsed.
#[derive(sqlx::FromRow)]
struct JobColumns {
    id: String,
    kind: String,
    batch_id: String,
    client_id: String,
    status: String,
    attempts: i32,
    max_attempts: i32,
    run_at: i64,
    last_error: Option<String>,
    created_at: i64,
    done_at: Option<i64>,
}

impl JobColumns {
    fn parse(self) -> Result<JobView> {
        Ok(JobView {
            id: parse_id(self.id)?,
            kind: self.kind.parse().map_err(Error::stored)?,
            batch_id: parse_id(self.batch_id)?,
            client_id: parse_id(self.client_id)?,
            status: self.status.parse().map_err(Error::stored)?,
            attempts: u32::try_from(self.attempts).unwrap_or(0),
            max_attempts: u32::try_from(self.max_attempts).unwrap_or(0),
            run_at: rfc3339(self.run_at),
            last_error: self.last_error,
            created_at: rfc3339(self.created_at),
            done_at: self.done_at.map(rfc3339),
        })
    }
}

/// The deliveries as the JSON array of `[id, epoch]` pairs that `{ticket_list}` expands.
fn ticket_list(tickets: &[&JobTicket]) -> String {
    let pairs: Vec<(&str, i64)> = tickets.iter().map(|t| (t.id.as_str(), epoch(t))).collect();
    json_list(&pairs)
}

fn epoch(ticket: &JobTicket) -> i64 {
    i64::try_from(ticket.epoch).unwrap_or(i64::MAX)
}

fn millis(ms: u64) -> i64 {
    i64::try_from(ms).unwrap_or(i64::MAX)
}

/// Errors are stored for operators; a remote that answers with megabytes does not get them all.
fn truncate(error: &str) -> &str {
    const MAX: usize = 2_000;
    if error.len() <= MAX {
        return error;
    }
    let mut end = MAX;
    while !error.is_char_boundary(end) {
        end -= 1;
    }
    &error[..end]
}

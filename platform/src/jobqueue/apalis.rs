//! The job queue on apalis-redis 1.0 storage (`jobs.redis_queue = "apalis-redis"`): one
//! apalis queue per job kind, `<prefix>-jobs-<kind>`, fed by the relay and drained by
//! ordinary apalis workers on [`apalis_redis::RedisStorage`].
//!
//! How DataFlow keeps the known defects of apalis-redis 1.0.0 out of the way:
//! - every due task is promoted by one Lua `unpack`, which fails above about 8,000: the
//!   working set is capped at [`crate::config::APALIS_REDIS_MAX_WORKING_SET`];
//! - task locking is O(backlog) per lock: workers run with `lock_tasks = false`;
//! - `max_attempts` is ignored and failures are retried 25 times: SQL owns every retry, so a
//!   worker reports a failed attempt as killed and the relay hands the job over again later;
//! - finished task ids, data and metadata are never removed: [`ApalisQueues::vacuum`] does;
//! - an idle worker is not woken by a push and may stall until its heartbeat: it polls, and
//!   heartbeats every second so a stall lasts at most that long.
//!
//! Each delivery of a job is a task of its own, whose id is the job's ULID with the delivery
//! epoch folded into its low bits ([`task_id`]): the sweeper can ask whether a delivery is
//! still here, and a job handed over again is pushed as a new task (apalis-redis ignores a
//! push whose task id it already holds). What apalis-redis does on its own cannot move the
//! epoch on: it re-enqueues the task of a worker it presumes dead as it was. So each run
//! takes the delivery in the ledger as it starts ([`Db::start_queued_run`]), which moves
//! the epoch on, and settles under that: a presumed-dead run that answers late is refused.
//! The task keeps naming the message's epoch (`queued_epoch`), which is what the sweeper
//! looks for.
//!
//! [`Db::start_queued_run`]: crate::ledger::Db::start_queued_run

use std::time::Duration;

use apalis_core::task::builder::TaskBuilder;
use apalis_core::task::task_id::TaskId;
use apalis_redis::RedisStorage;
use dataflow_contracts::jobs::{JobKind, JobMessage, JobTicket};
use redis::Script;

use crate::redis::{Conn, Redis};
use crate::{Error, Result};

/// Tasks waiting or held by any worker of one queue.
const OUTSTANDING: &str = r"
local n = redis.call('LLEN', KEYS[1]) + redis.call('ZCARD', KEYS[2])
for _, w in ipairs(redis.call('ZRANGE', KEYS[3], 0, -1)) do
  n = n + redis.call('SCARD', ARGV[1] .. ':' .. w)
end
return n
";

/// Removes up to ARGV[2] finished tasks (done or dead) with their data and metadata.
/// (The metadata key names are derived here, so this needs a single Redis, not a cluster.)
const VACUUM: &str = r"
local n = 0
for _, set in ipairs({KEYS[1], KEYS[2]}) do
  for _, id in ipairs(redis.call('SPOP', set, ARGV[2])) do
    redis.call('DEL', ARGV[1] .. ':' .. id)
    redis.call('HDEL', KEYS[3], id)
    n = n + 1
  end
end
return n
";

/// Finished tasks removed per vacuum call at most.
const VACUUM_BATCH: usize = 5_000;

/// The apalis-redis queues of every job kind.
#[derive(Clone)]
pub struct ApalisQueues {
    redis: Redis,
    heartbeat: Duration,
    missed_heartbeats: usize,
}

impl ApalisQueues {
    /// `dead_worker`: how long a silent worker keeps its tasks before others take them back.
    pub fn new(redis: Redis, dead_worker: Duration) -> Self {
        let heartbeat = Duration::from_secs(1);
        let missed = dead_worker.as_millis() / heartbeat.as_millis();
        Self {
            redis,
            heartbeat,
            missed_heartbeats: usize::try_from(missed).unwrap_or(usize::MAX).max(2),
        }
    }

    /// The apalis-redis configuration of `kind`'s queue.
    pub fn config(&self, kind: JobKind) -> apalis_redis::Config {
        // apalis-redis splits its channel names on ':', so the queue name has none.
        let queue = format!("{}-jobs-{kind}", self.redis.prefix().replace(':', "-"));
        apalis_redis::Config::default()
            .queue(queue)
            .heartbeat_interval(self.heartbeat)
            .missed_heartbeats(self.missed_heartbeats)
            .lock_tasks(false)
            // Also the switch for acknowledging at all: without it a finished task stays
            // in flight forever (apalis-core 1.0 acks only when it persists the result).
            .persist_results(true)
            .emit_events(false)
            .batch_size(64)
    }

    /// The storage an apalis worker of `kind` runs on.
    pub fn storage(&self, kind: JobKind) -> RedisStorage<JobMessage, Conn> {
        RedisStorage::new(self.redis.conn()).with_config(self.config(kind))
    }

    pub async fn outstanding(&self, kind: JobKind) -> Result<u64> {
        let c = self.config(kind);
        Ok(Script::new(OUTSTANDING)
            .key(c.active_jobs_list())
            .key(c.scheduled_jobs_set())
            .key(c.workers_set())
            .arg(c.inflight_jobs_set())
            .invoke_async(&mut self.redis.conn())
            .await?)
    }

    /// Pushes `messages` in one script call, each as the task of its delivery.
    pub async fn push(&self, kind: JobKind, messages: &[JobMessage]) -> Result<()> {
        if messages.is_empty() {
            return Ok(());
        }
        let mut tasks = Vec::with_capacity(messages.len());
        for m in messages {
            let body =
                serde_json::to_vec(m).map_err(|e| Error::internal("serializing a job", e))?;
            tasks.push(
                TaskBuilder::new(body)
                    .task_id(TaskId::from_string(task_id(&m.ticket()).to_string()))
                    .build(),
            );
        }
        apalis_redis::queries::push_tasks(&mut self.redis.conn(), &self.config(kind), &tasks)
            .await
            .map_err(|e| Error::internal("pushing to apalis-redis", e))?;
        Ok(())
    }

    /// Which of `tickets` are still in the queue (a task's data lives until it is vacuumed,
    /// and only finished tasks are).
    pub async fn holds(&self, kind: JobKind, tickets: &[&JobTicket]) -> Result<Vec<bool>> {
        if tickets.is_empty() {
            return Ok(Vec::new());
        }
        let data = self.config(kind).job_data_hash();
        let mut pipe = redis::pipe();
        for t in tickets {
            pipe.hexists(&data, task_id(t).to_string());
        }
        Ok(pipe.query_async(&mut self.redis.conn()).await?)
    }

    /// Deletes what finished tasks left behind; returns how many tasks were removed.
    pub async fn vacuum(&self, kind: JobKind) -> Result<u64> {
        let c = self.config(kind);
        Ok(Script::new(VACUUM)
            .key(c.done_jobs_set())
            .key(c.dead_jobs_set())
            .key(c.job_data_hash())
            .arg(c.job_meta_hash())
            .arg(VACUUM_BATCH)
            .invoke_async(&mut self.redis.conn())
            .await?)
    }
}

/// The apalis task of one delivery: the job's ULID with the epoch folded into its random
/// bits, so each delivery of a job is a task of its own.
fn task_id(ticket: &JobTicket) -> ulid::Ulid {
    ulid::Ulid(ticket.id.ulid().0 ^ u128::from(ticket.epoch))
}

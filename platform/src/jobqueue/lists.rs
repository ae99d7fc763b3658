//! DataFlow's own Redis job queue (the default): a bounded working set of job messages, fed
//! from the SQL intents by the relay and drained by workers with a reliable-queue pattern.
//!
//! Keys (under the prefix), per job kind `k`, all under the hash tag `{jobs:k}` so that a
//! Redis Cluster keeps one kind's queue in one slot and its scripts may use them together:
//! - `{jobs:k}:ready` LIST: messages waiting, oldest at the head;
//! - `{jobs:k}:inflight:<worker>` LIST: messages one worker took (atomically, by `LMOVE`);
//! - `{jobs:k}:present` ZSET: id → delivery epoch of every job whose current delivery is in
//!   Redis (ready or in flight), so the sweeper can tell "still queued" from "Redis lost it".
//!   Only that delivery's acknowledgement or reaping removes it: a superseded delivery's
//!   late ack leaves its successor in place;
//! - `{jobs:k}:workers` ZSET: worker → last heartbeat (ms, Redis clock), one set per kind so
//!   that the reaper's script finds the heartbeats beside the lists it empties.
//!
//! A worker that stops beating its heart has its in-flight lists taken back by the leader
//! ([`JobQueues::reap`]). A live worker gives back what sits in its in-flight list without
//! its knowing ([`Consumer::give_back_strays`]): a take whose reply was lost (the connection
//! reset after `BLMOVE` or `TAKE` ran) moved messages there all the same, and its heartbeat
//! would keep them from the reaper for good. An idle worker blocks in `BLMOVE` on its own
//! connection, so a new message reaches it in one round trip, with no polling. None of these
//! keys carries a TTL: they are the queue itself, and empty lists vanish on their own.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dataflow_contracts::jobs::{JobKind, JobMessage, JobTicket};
use redis::Script;

use crate::redis::{Conn, Redis, tag};
use crate::{Error, Result};

/// Moves up to ARGV[1] messages from the head of `ready` to the worker's in-flight list.
const TAKE: &str = r"
local items = redis.call('LPOP', KEYS[1], ARGV[1])
if not items then return {} end
redis.call('RPUSH', KEYS[2], unpack(items))
return items
";

/// Records a heartbeat on the Redis clock, so hosts with skewed clocks agree on who is dead.
const HEARTBEAT: &str = r"
local t = redis.call('TIME')
redis.call('ZADD', KEYS[1], t[1] * 1000 + math.floor(t[2] / 1000), ARGV[1])
";

/// Takes the in-flight messages of the workers among ARGV[2..] silent for ARGV[1] ms.
/// KEYS[1]: the kind's heartbeats, KEYS[2]: `present`, KEYS[3..]: the in-flight list of
/// each worker of ARGV[2..], in order. The ids of what it takes leave `present` when they
/// are their job's current delivery. Returns the messages.
const REAP: &str = r"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local out = {}
for i = 2, #ARGV do
  local beat = tonumber(redis.call('ZSCORE', KEYS[1], ARGV[i]))
  if beat and beat <= now - tonumber(ARGV[1]) then
    local list = KEYS[i + 1]
    for _, m in ipairs(redis.call('LRANGE', list, 0, -1)) do
      local ok, msg = pcall(cjson.decode, m)
      if ok and msg['id'] then
        if tonumber(redis.call('ZSCORE', KEYS[2], msg['id'])) == (msg['epoch'] or 0) then
          redis.call('ZREM', KEYS[2], msg['id'])
        end
      end
      out[#out + 1] = m
    end
    redis.call('DEL', list)
    redis.call('ZREM', KEYS[1], ARGV[i])
  end
end
return out
";

/// Removes settled messages from the in-flight list KEYS[1], and their ids from `present`
/// (KEYS[2]) when they are still its current delivery. ARGV: message, id, epoch, …
const ACK: &str = r"
for i = 1, #ARGV, 3 do
  redis.call('LREM', KEYS[1], 1, ARGV[i])
  if tonumber(redis.call('ZSCORE', KEYS[2], ARGV[i + 1])) == tonumber(ARGV[i + 2]) then
    redis.call('ZREM', KEYS[2], ARGV[i + 1])
  end
end
";

/// Puts the messages ARGV back from the in-flight list KEYS[2] at the head of `ready`
/// (KEYS[1]), each only if it is still in flight. Returns how many went back.
const GIVE_BACK: &str = r"
local n = 0
for i = #ARGV, 1, -1 do
  if redis.call('LREM', KEYS[2], 1, ARGV[i]) == 1 then
    redis.call('LPUSH', KEYS[1], ARGV[i])
    n = n + 1
  end
end
return n
";

/// Puts a stopping worker's unstarted messages back at the head of `ready`, oldest first.
const RELEASE: &str = r"
local n = 0
while redis.call('LMOVE', KEYS[2], KEYS[1], 'RIGHT', 'LEFT') do n = n + 1 end
return n
";

/// A message taken from the queue, with the exact text needed to acknowledge it.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub message: JobMessage,
    raw: String,
}

/// The names of one kind's keys (see the module's documentation).
#[derive(Debug, Clone)]
pub struct QueueKeys {
    pub ready: String,
    pub present: String,
    pub workers: String,
    /// `<prefix>:{jobs:k}`, which every key of the kind extends.
    base: String,
}

impl QueueKeys {
    pub fn new(redis: &Redis, kind: JobKind) -> Self {
        let base = redis.key(&[&tag(&["jobs", kind.as_str()])]);
        Self {
            ready: format!("{base}:ready"),
            present: format!("{base}:present"),
            workers: format!("{base}:workers"),
            base,
        }
    }

    /// The list of the messages `worker` took.
    pub fn inflight(&self, worker: &str) -> String {
        format!("{}:inflight:{worker}", self.base)
    }
}

/// The queue of one job kind.
#[derive(Clone)]
pub struct JobQueue {
    redis: Redis,
    kind: JobKind,
    keys: QueueKeys,
}

impl JobQueue {
    pub fn new(redis: Redis, kind: JobKind) -> Self {
        Self {
            keys: QueueKeys::new(&redis, kind),
            redis,
            kind,
        }
    }

    pub fn kind(&self) -> JobKind {
        self.kind
    }

    pub fn keys(&self) -> &QueueKeys {
        &self.keys
    }

    fn inflight(&self, worker: &str) -> String {
        self.keys.inflight(worker)
    }

    /// Messages in Redis (waiting or in flight): the working set the relay keeps bounded.
    pub async fn outstanding(&self) -> Result<u64> {
        Ok(redis::cmd("ZCARD")
            .arg(&self.keys.present)
            .query_async(&mut self.redis.conn())
            .await?)
    }

    /// Messages waiting for a worker.
    pub async fn waiting(&self) -> Result<u64> {
        Ok(redis::cmd("LLEN")
            .arg(&self.keys.ready)
            .query_async(&mut self.redis.conn())
            .await?)
    }

    /// Appends `messages` to the queue (one transaction). Each becomes its job's current
    /// delivery in `present`, unless a later one is there already.
    pub async fn push(&self, messages: &[JobMessage]) -> Result<()> {
        if messages.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        pipe.atomic();
        let mut raws = Vec::with_capacity(messages.len());
        let mut present = Vec::with_capacity(messages.len());
        for m in messages {
            raws.push(
                serde_json::to_string(m).map_err(|e| Error::internal("serializing a job", e))?,
            );
            present.push((m.epoch, m.id.as_str()));
        }
        pipe.rpush(&self.keys.ready, raws).ignore();
        pipe.cmd("ZADD")
            .arg(&self.keys.present)
            .arg("GT")
            .arg(&present)
            .ignore();
        pipe.query_async::<()>(&mut self.redis.conn()).await?;
        Ok(())
    }

    /// A connection of its own for [`JobQueue::take`], whose blocking wait would stall every
    /// other command on the shared one.
    pub async fn blocking_connection(&self) -> Result<Conn> {
        self.redis.blocking_connection().await
    }

    /// Takes up to `max` messages for `worker`; when none is waiting, blocks up to `wait`
    /// for the next one. Messages that do not parse are dropped from flight and returned
    /// as errors for the caller to report; their SQL intents stay as they are.
    pub async fn take(
        &self,
        conn: &mut Conn,
        worker: &str,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<Delivery>> {
        let inflight = self.inflight(worker);
        let mut raws: Vec<String> = Script::new(TAKE)
            .key(&self.keys.ready)
            .key(&inflight)
            .arg(max)
            .invoke_async(conn)
            .await?;
        if raws.is_empty() {
            let first: Option<String> = redis::cmd("BLMOVE")
                .arg(&self.keys.ready)
                .arg(&inflight)
                .arg("LEFT")
                .arg("RIGHT")
                .arg(wait.as_secs_f64())
                .query_async(conn)
                .await?;
            raws.extend(first);
        }
        let mut out = Vec::with_capacity(raws.len());
        for raw in raws {
            match serde_json::from_str(&raw) {
                Ok(message) => out.push(Delivery { message, raw }),
                Err(e) => {
                    tracing::error!(kind = %self.kind, error = %e, "dropping unreadable job message");
                    let _: () = redis::cmd("LREM")
                        .arg(&inflight)
                        .arg(1)
                        .arg(&raw)
                        .query_async(conn)
                        .await?;
                }
            }
        }
        Ok(out)
    }

    /// Removes settled deliveries from the worker's in-flight list, and from `present`
    /// those that are still their job's current delivery.
    pub async fn ack(&self, worker: &str, deliveries: &[&Delivery]) -> Result<()> {
        if deliveries.is_empty() {
            return Ok(());
        }
        let script = Script::new(ACK);
        let mut call = script.key(self.inflight(worker));
        call.key(&self.keys.present);
        for d in deliveries {
            call.arg(&d.raw)
                .arg(d.message.id.as_str())
                .arg(d.message.epoch);
        }
        call.invoke_async::<()>(&mut self.redis.conn()).await?;
        Ok(())
    }

    /// Which of `tickets` Redis still holds (waiting or in flight) as its job's current
    /// delivery.
    pub async fn holds(&self, tickets: &[&JobTicket]) -> Result<Vec<bool>> {
        if tickets.is_empty() {
            return Ok(Vec::new());
        }
        let scores: Vec<Option<f64>> = redis::cmd("ZMSCORE")
            .arg(&self.keys.present)
            .arg(tickets.iter().map(|t| t.id.as_str()).collect::<Vec<_>>())
            .query_async(&mut self.redis.conn())
            .await?;
        Ok(scores
            .iter()
            .zip(tickets)
            .map(|(score, t)| *score == Some(t.epoch as f64))
            .collect())
    }

    /// A stopping worker hands back what it took and did not start, then leaves.
    pub async fn release(&self, worker: &str) -> Result<u64> {
        Ok(Script::new(RELEASE)
            .key(&self.keys.ready)
            .key(self.inflight(worker))
            .invoke_async(&mut self.redis.conn())
            .await?)
    }
}

/// One worker's end of one kind's queue. It takes and acknowledges like [`JobQueue`], and
/// keeps count of the messages it received and has not acknowledged yet: whatever else is in
/// its in-flight list was moved there by a take whose reply never arrived.
#[derive(Clone)]
pub struct Consumer {
    queue: JobQueue,
    worker: String,
    /// Each message taken and not acknowledged (its text), with how many times it is held.
    held: Arc<Mutex<HashMap<String, usize>>>,
}

impl Consumer {
    pub fn new(queue: JobQueue, worker: String) -> Self {
        Self {
            queue,
            worker,
            held: Arc::default(),
        }
    }

    pub fn queue(&self) -> &JobQueue {
        &self.queue
    }

    /// [`JobQueue::take`] for this worker, counting what it received as held.
    pub async fn take(&self, conn: &mut Conn, max: usize, wait: Duration) -> Result<Vec<Delivery>> {
        let taken = self.queue.take(conn, &self.worker, max, wait).await?;
        let mut held = self.held();
        for d in &taken {
            *held.entry(d.raw.clone()).or_default() += 1;
        }
        Ok(taken)
    }

    /// [`JobQueue::ack`] for this worker; what it removed is held no more.
    pub async fn ack(&self, deliveries: &[&Delivery]) -> Result<()> {
        self.queue.ack(&self.worker, deliveries).await?;
        let mut held = self.held();
        for d in deliveries {
            if let Some(n) = held.get_mut(&d.raw) {
                *n -= 1;
                if *n == 0 {
                    held.remove(&d.raw);
                }
            }
        }
        Ok(())
    }

    /// Gives back to `ready` the messages in this worker's in-flight list that it does not
    /// hold: a take moved them there, but its reply was lost. Must not run while a take of
    /// this consumer is under way (its messages are in the list before they are held).
    /// Returns how many went back.
    pub async fn give_back_strays(&self) -> Result<u64> {
        let inflight = self.queue.inflight(&self.worker);
        let listed: Vec<String> = redis::cmd("LRANGE")
            .arg(&inflight)
            .arg(0)
            .arg(-1)
            .query_async(&mut self.queue.redis.conn())
            .await?;
        let strays: Vec<String> = {
            let mut unmatched = self.held().clone();
            listed
                .into_iter()
                .filter(|raw| match unmatched.get_mut(raw) {
                    Some(n) if *n > 0 => {
                        *n -= 1;
                        false
                    }
                    _ => true,
                })
                .collect()
        };
        if strays.is_empty() {
            return Ok(0);
        }
        Ok(Script::new(GIVE_BACK)
            .key(&self.queue.keys.ready)
            .key(&inflight)
            .arg(strays)
            .invoke_async(&mut self.queue.redis.conn())
            .await?)
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<String, usize>> {
        // Nothing panics while holding it; a poisoned map is still a correct count.
        self.held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Every kind's queue, for what a worker process does across them: its heartbeat, the
/// reaping of dead workers' messages, and its leaving.
#[derive(Clone)]
pub struct JobQueues {
    redis: Redis,
}

impl JobQueues {
    pub fn new(redis: Redis) -> Self {
        Self { redis }
    }

    pub fn queue(&self, kind: JobKind) -> JobQueue {
        JobQueue::new(self.redis.clone(), kind)
    }

    /// Marks `worker` alive in every kind's heartbeats (one script per kind: on a cluster
    /// the kinds live in different slots). Every kind is beaten even when one fails, so a
    /// master away for a while leaves the other kinds' messages to their live worker.
    pub async fn heartbeat(&self, worker: &str) -> Result<()> {
        let script = Script::new(HEARTBEAT);
        let mut failed = None;
        for kind in JobKind::ALL {
            let beat = script
                .key(QueueKeys::new(&self.redis, kind).workers)
                .arg(worker)
                .invoke_async::<()>(&mut self.redis.conn())
                .await;
            if let Err(e) = beat {
                failed.get_or_insert(e);
            }
        }
        failed.map_or(Ok(()), |e| Err(e.into()))
    }

    /// Takes back the in-flight messages of workers silent for `dead_after`, for every
    /// kind. Their ids leave `present`; the caller settles them in SQL. A kind whose reap
    /// fails does not lose what the others took back: that is returned, and the failure
    /// only when nothing was.
    pub async fn reap(&self, dead_after: Duration) -> Result<Vec<(JobKind, Delivery)>> {
        let dead_after = u64::try_from(dead_after.as_millis()).unwrap_or(u64::MAX);
        let mut out = Vec::new();
        let mut failed = None;
        for kind in JobKind::ALL {
            match self.reap_kind(kind, dead_after).await {
                Ok(raws) => out.extend(raws.into_iter().map(|d| (kind, d))),
                Err(e) => {
                    tracing::warn!(%kind, error = %e, "could not reap this kind's dead workers");
                    failed.get_or_insert(e);
                }
            }
        }
        match failed {
            Some(e) if out.is_empty() => Err(e),
            _ => Ok(out),
        }
    }

    async fn reap_kind(&self, kind: JobKind, dead_after: u64) -> Result<Vec<Delivery>> {
        let keys = QueueKeys::new(&self.redis, kind);
        // Every worker with a heartbeat is a candidate (a fleet's worth); the script judges
        // each by the Redis clock as it reaps, so one that beats meanwhile stays.
        let workers: Vec<String> = redis::cmd("ZRANGE")
            .arg(&keys.workers)
            .arg(0)
            .arg(-1)
            .query_async(&mut self.redis.conn())
            .await?;
        let mut out = Vec::new();
        if workers.is_empty() {
            return Ok(out);
        }
        let script = Script::new(REAP);
        let mut call = script.key(&keys.workers);
        call.key(&keys.present).arg(dead_after);
        for w in &workers {
            call.key(keys.inflight(w)).arg(w);
        }
        let raws: Vec<String> = call.invoke_async(&mut self.redis.conn()).await?;
        for raw in raws {
            match serde_json::from_str(&raw) {
                Ok(message) => out.push(Delivery { message, raw }),
                Err(_) => {
                    tracing::error!(message = %raw, "dropping unreadable job message of a dead worker")
                }
            }
        }
        Ok(out)
    }

    /// Removes `worker` from every kind's heartbeats (after it released every kind).
    pub async fn leave(&self, worker: &str) -> Result<()> {
        for kind in JobKind::ALL {
            redis::cmd("ZREM")
                .arg(QueueKeys::new(&self.redis, kind).workers)
                .arg(worker)
                .query_async::<()>(&mut self.redis.conn())
                .await?;
        }
        Ok(())
    }
}

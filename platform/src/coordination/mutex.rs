//! The batch mutex: a Redlock (rslock) taken before the SQL lease, so workers rarely race
//! for the same batch. It is an optimisation, not the guarantee: the SQL lease epoch is the
//! fencing token that every chunk write and the completion check. When Redis is
//! unreachable the worker goes on with the SQL lease alone.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use dataflow_contracts::BatchId;
use rslock::{Lock, LockError, LockManager};
use tokio::sync::oneshot;

use crate::redis::Redis;

/// A lock attempt never holds up the claim loop longer than this.
/// (Long enough for rslock to open its connection, TLS and AUTH included.)
pub const LOCK_TIMEOUT: Duration = Duration::from_secs(1);

pub enum Acquired {
    Held(Lock),
    /// Someone else holds it: leave the batch to them.
    Contended,
    /// Redis could not be asked: only the SQL lease protects this batch.
    Degraded,
}

pub enum BatchMutex {
    /// No Redlock servers (embedded, or a Redis Cluster without `redlock_urls`): the SQL
    /// lease alone.
    SqlOnly,
    Redlock(Box<Redlock>),
}

pub struct Redlock {
    manager: LockManager,
    /// The lock servers, asked after a failed attempt to tell "held by another" from
    /// "not enough of them answer".
    nodes: Vec<Redis>,
    /// How long a call may hold up its caller ([`LOCK_TIMEOUT`] outside tests).
    timeout: Duration,
    degraded: AtomicU64,
}

impl Redlock {
    /// Locks on `nodes` (their clients carry the URLs, passwords and TLS settings); a lock
    /// needs a majority of them. `nodes` must not be empty, and each must be one server
    /// (Redlock's independent nodes): the factory never hands it a cluster.
    pub fn new(nodes: Vec<Redis>, timeout: Duration) -> Self {
        let clients = nodes
            .iter()
            .filter_map(|n| n.server_client().cloned())
            .collect();
        let mut manager = LockManager::from_clients(clients);
        // One quick try: a contended batch is simply skipped, the next poll comes soon.
        manager.set_retry(1, Duration::from_millis(1));
        Self {
            manager,
            nodes,
            timeout,
            degraded: AtomicU64::new(0),
        }
    }

    fn resource(&self, batch: &BatchId) -> String {
        self.nodes[0].key(&["batch-lock", batch.as_str()])
    }

    /// One rslock attempt, waited for at most `timeout`; `None` when it gave no answer in time.
    ///
    /// rslock stays the lock (a required building block: quorum, clock drift, validity, and
    /// the release of a failed attempt's keys), but it draws the lock's value itself and
    /// hands it out only with a won lock. An attempt dropped halfway may leave keys on a
    /// majority that only their TTL (a whole lease) removes, and every worker would skip
    /// the batch until then. So the attempt runs in a task of its own and only the wait for
    /// it is cut: a lock it wins that nobody waits for any more is released at once. The
    /// release compares values, so it never removes another worker's lock, and whoever took
    /// the batch meanwhile holds its SQL lease, which decides anyway. The task always ends:
    /// the redis crate bounds every connect and reply.
    async fn attempt(&self, resource: &str, ttl: Duration) -> Option<Result<Lock, LockError>> {
        let (answer, mut waiting) = oneshot::channel();
        let manager = self.manager.clone();
        let resource = resource.to_owned();
        tokio::spawn(async move {
            let attempt = manager.lock(resource.as_bytes(), ttl).await;
            if let Err(Ok(lock)) = answer.send(attempt) {
                lock.release().await;
            }
        });
        match tokio::time::timeout(self.timeout, &mut waiting).await {
            Ok(answer) => answer.ok(),
            Err(_) => {
                // From here on the task releases what it wins; an answer sent as the wait
                // ended is still ours.
                waiting.close();
                waiting.try_recv().ok()
            }
        }
    }

    /// After a failed attempt (rslock has taken back its own keys): held by another only if
    /// a majority of the servers hold it.
    async fn after_failure(&self, resource: &str) -> Acquired {
        let asks = self.nodes.iter().map(|n| async move {
            redis::cmd("EXISTS")
                .arg(resource)
                .query_async::<bool>(&mut n.conn())
                .await
        });
        let answers = futures::future::join_all(asks).await;
        let held = answers.iter().filter(|a| matches!(a, Ok(true))).count();
        if held > self.nodes.len() / 2 {
            return Acquired::Contended;
        }
        if let Some(e) = answers.iter().filter_map(|a| a.as_ref().err()).next() {
            self.count_degraded(e);
        }
        // Not held by a majority, yet not ours: Redis failed us somewhere. Go on with the
        // SQL lease, which decides anyway, rather than skip a batch nobody holds.
        Acquired::Degraded
    }

    fn count_degraded(&self, why: &dyn std::fmt::Display) {
        if self
            .degraded
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(100)
        {
            tracing::warn!(error = %why, "batch mutex unavailable; relying on the SQL lease");
        }
    }
}

impl BatchMutex {
    pub async fn acquire(&self, batch: &BatchId, ttl: Duration) -> Acquired {
        let BatchMutex::Redlock(r) = self else {
            return Acquired::Degraded;
        };
        let resource = r.resource(batch);
        let acquired = match r.attempt(&resource, ttl).await {
            Some(Ok(lock)) => Acquired::Held(lock),
            Some(Err(_)) => r.after_failure(&resource).await,
            // Keys on the servers may be the unfinished attempt's own: no sign of another
            // holder, only of a lock service too slow to answer.
            None => {
                r.count_degraded(&"no answer within the lock timeout");
                Acquired::Degraded
            }
        };
        let outcome = match &acquired {
            Acquired::Held(_) => "held",
            Acquired::Contended => "contended",
            Acquired::Degraded => "degraded",
        };
        metrics::counter!("dataflow_lock_acquisitions_total", "outcome" => outcome).increment(1);
        acquired
    }

    /// Renews a held lock (best effort: the SQL fence stays the guarantee).
    pub async fn extend(&self, lock: &Lock, ttl: Duration) -> Option<Lock> {
        let BatchMutex::Redlock(r) = self else {
            return None;
        };
        tokio::time::timeout(r.timeout, r.manager.extend(lock, ttl))
            .await
            .ok()?
            .ok()
    }

    /// Removes the lock of `batch` whoever holds it: for a holder known to be gone, whose
    /// lock would otherwise keep the batch from everyone for the rest of its TTL. Safe
    /// because the SQL fence, not this lock, decides who may write (best effort).
    pub async fn break_lock(&self, batch: &BatchId) {
        let BatchMutex::Redlock(r) = self else {
            return;
        };
        let resource = r.resource(batch);
        let deletes = r.nodes.iter().map(|n| {
            let resource = resource.clone();
            async move {
                redis::cmd("DEL")
                    .arg(resource)
                    .query_async::<()>(&mut n.conn())
                    .await
            }
        });
        let _ = tokio::time::timeout(r.timeout, futures::future::join_all(deletes)).await;
    }

    /// Attempts that fell back to the SQL lease because Redis was unreachable or too slow.
    pub fn degraded(&self) -> u64 {
        match self {
            BatchMutex::SqlOnly => 0,
            BatchMutex::Redlock(r) => r.degraded.load(Ordering::Relaxed),
        }
    }
}

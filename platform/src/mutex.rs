//! The batch mutex: a Redlock (rslock) taken before the SQL lease, so workers rarely race
//! for the same batch. It is an optimisation, not the guarantee: the SQL lease epoch is the
//! fencing token that every chunk write and the completion check. When Redis is
//! unreachable the worker goes on with the SQL lease alone.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use dataflow_contracts::BatchId;
use rslock::{Lock, LockManager};

use crate::redis::Redis;

/// A lock attempt never holds up the claim loop longer than this.
/// (Long enough for rslock to open its connection, TLS and AUTH included.)
const LOCK_TIMEOUT: Duration = Duration::from_secs(1);

pub enum Acquired {
    Held(Lock),
    /// Someone else holds it: leave the batch to them.
    Contended,
    /// Redis could not be asked: only the SQL lease protects this batch.
    Degraded,
}

pub enum BatchMutex {
    /// Embedded: the SQL lease alone.
    SqlOnly,
    Redlock(Box<Redlock>),
}

pub struct Redlock {
    manager: LockManager,
    /// The lock servers, asked after a failed attempt to tell "held by another" from
    /// "not enough of them answer".
    nodes: Vec<Redis>,
    degraded: AtomicU64,
}

impl Redlock {
    /// Locks on `nodes` (their clients carry the URLs, passwords and TLS settings); a lock
    /// needs a majority of them. `nodes` must not be empty.
    pub fn new(nodes: Vec<Redis>) -> Self {
        let clients = nodes.iter().map(|n| n.client().clone()).collect();
        let mut manager = LockManager::from_clients(clients);
        // One quick try: a contended batch is simply skipped, the next poll comes soon.
        manager.set_retry(1, Duration::from_millis(1));
        Self {
            manager,
            nodes,
            degraded: AtomicU64::new(0),
        }
    }

    fn resource(&self, batch: &BatchId) -> String {
        self.nodes[0].key(&["batch-lock", batch.as_str()])
    }

    /// After a failed attempt: held by another only if a majority of the servers hold it.
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
        let unreachable = answers.iter().filter_map(|a| a.as_ref().err()).next();
        if let Some(e) = unreachable
            && self
                .degraded
                .fetch_add(1, Ordering::Relaxed)
                .is_multiple_of(100)
        {
            tracing::warn!(error = %e, "batch mutex unavailable; relying on the SQL lease");
        }
        // Not held by a majority, yet not ours: Redis failed us somewhere. Go on with the
        // SQL lease, which decides anyway, rather than skip a batch nobody holds.
        Acquired::Degraded
    }
}

impl BatchMutex {
    pub async fn acquire(&self, batch: &BatchId, ttl: Duration) -> Acquired {
        let BatchMutex::Redlock(r) = self else {
            return Acquired::Degraded;
        };
        let resource = r.resource(batch);
        let acquired = match tokio::time::timeout(
            LOCK_TIMEOUT,
            r.manager.lock(resource.as_bytes(), ttl),
        )
        .await
        {
            Ok(Ok(lock)) => Acquired::Held(lock),
            _ => r.after_failure(&resource).await,
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
        tokio::time::timeout(LOCK_TIMEOUT, r.manager.extend(lock, ttl))
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
        let _ = tokio::time::timeout(LOCK_TIMEOUT, futures::future::join_all(deletes)).await;
    }

    /// Attempts that fell back to the SQL lease because Redis was unreachable.
    pub fn degraded(&self) -> u64 {
        match self {
            BatchMutex::SqlOnly => 0,
            BatchMutex::Redlock(r) => r.degraded.load(Ordering::Relaxed),
        }
    }
}

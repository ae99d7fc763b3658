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
    /// Tells "held by another" from "Redis is down" after a failed attempt.
    probe: Redis,
    degraded: AtomicU64,
}

impl Redlock {
    /// Locks on `probe`'s Redis (its client carries the URL, password and TLS settings).
    pub fn new(probe: Redis) -> Self {
        let mut manager = LockManager::from_clients(vec![probe.client().clone()]);
        // One quick try: a contended batch is simply skipped, the next poll comes soon.
        manager.set_retry(1, Duration::from_millis(1));
        Self {
            manager,
            probe,
            degraded: AtomicU64::new(0),
        }
    }

    fn resource(&self, batch: &BatchId) -> String {
        self.probe.key(&["batch-lock", batch.as_str()])
    }
}

impl BatchMutex {
    pub async fn acquire(&self, batch: &BatchId, ttl: Duration) -> Acquired {
        let BatchMutex::Redlock(r) = self else {
            return Acquired::Degraded;
        };
        let resource = r.resource(batch);
        if let Ok(Ok(lock)) =
            tokio::time::timeout(LOCK_TIMEOUT, r.manager.lock(resource.as_bytes(), ttl)).await
        {
            return Acquired::Held(lock);
        }
        let exists: redis::RedisResult<bool> = redis::cmd("EXISTS")
            .arg(&resource)
            .query_async(&mut r.probe.conn())
            .await;
        match exists {
            Ok(true) => Acquired::Contended,
            // Free, yet not ours: the attempt failed on our side. Go on with the SQL lease,
            // which decides anyway, rather than skip a batch nobody holds.
            Ok(false) => Acquired::Degraded,
            Err(e) => {
                if r.degraded
                    .fetch_add(1, Ordering::Relaxed)
                    .is_multiple_of(100)
                {
                    tracing::warn!(error = %e, "batch mutex unavailable; relying on the SQL lease");
                }
                Acquired::Degraded
            }
        }
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

    /// Attempts that fell back to the SQL lease because Redis was unreachable.
    pub fn degraded(&self) -> u64 {
        match self {
            BatchMutex::SqlOnly => 0,
            BatchMutex::Redlock(r) => r.degraded.load(Ordering::Relaxed),
        }
    }
}

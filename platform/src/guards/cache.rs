//! Cache-aside for lookups on the request path (API keys, clients and their policies).
//!
//! - TTL with ±10 % jitter, so entries loaded together do not expire together;
//! - single-flight: concurrent misses for one key share one load;
//! - negative caching: "not found" is kept for a shorter TTL, so unknown keys cannot hammer SQL;
//! - invalidation wins over in-flight loads: a load that started before an invalidation is
//!   returned to its callers but never stored.
//!
//! Two tiers when Redis is configured: the in-process L1 (short TTL) in front of a Redis L2
//! shared by every process. A change commits to SQL, then [`Cache::invalidate`] deletes
//! the L2 copy and publishes the key on Redis pub/sub, and every process drops its L1 copy
//! ([`Cache::forget_local`]). If pub/sub is cut, L1 copies still expire within the L1 TTL.
//! Redis errors make the L2 a miss: the answer comes from SQL.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use rand::Rng;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::time::Instant;

use crate::Error;
use crate::redis::Redis;

/// Beyond this many entries, expired ones are dropped; if that is not enough, all are.
const MAX_ENTRIES: usize = 100_000;

type Load<V> = Shared<BoxFuture<'static, Result<Option<V>, Arc<Error>>>>;

enum Slot<V> {
    Ready { value: Option<V>, expires: Instant },
    Loading { generation: u64, load: Load<V> },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
}

/// The Redis tier of one cache.
#[derive(Clone)]
pub struct SharedTier {
    pub redis: Redis,
    /// Names this cache in keys and invalidation messages.
    pub namespace: &'static str,
    pub ttl: Duration,
    pub negative_ttl: Duration,
}

/// Written by an invalidation in place of the value: reads treat it as a miss, and fills
/// (`SET … NX`) cannot replace it, so a load that read SQL before the change cannot put the
/// old value back while the marker lives.
const TOMBSTONE: &str = "invalidated";
/// Added to the shared TTL for a tombstone's life: longer than any load can take.
const TOMBSTONE_MARGIN: Duration = Duration::from_secs(5);

impl SharedTier {
    /// The pub/sub channel every process listens on for invalidations.
    pub fn channel(redis: &Redis) -> String {
        redis.key(&["cache-invalidate"])
    }

    fn key(&self, key: &str) -> String {
        self.redis.key(&["cache", self.namespace, key])
    }

    /// `Some(cached)` on a hit (which may be a cached "not found"); `None` on a miss or error.
    async fn get<V: DeserializeOwned>(&self, key: &str) -> Option<Option<V>> {
        let raw: redis::RedisResult<Option<String>> = redis::cmd("GET")
            .arg(self.key(key))
            .query_async(&mut self.redis.conn())
            .await;
        let raw = raw.ok()??;
        if raw == TOMBSTONE {
            return None;
        }
        serde_json::from_str(&raw).ok()
    }

    async fn set<V: Serialize>(&self, key: &str, value: &Option<V>) {
        let ttl = if value.is_some() {
            jittered(self.ttl)
        } else {
            self.negative_ttl
        };
        let Ok(json) = serde_json::to_string(value) else {
            return;
        };
        let stored: redis::RedisResult<()> = redis::cmd("SET")
            .arg(self.key(key))
            .arg(json)
            .arg("PX")
            .arg(ttl.as_millis().max(1) as u64)
            .arg("NX")
            .query_async(&mut self.redis.conn())
            .await;
        if let Err(e) = stored {
            tracing::debug!(error = %e, "cache L2 write skipped");
        }
    }

    /// Deletes the shared copy, leaves a tombstone that outlives any fill that may have
    /// read SQL before the change, and tells every process. `DEL` comes first: Redis accepts
    /// it even when full, so the old value cannot survive a refused tombstone. The
    /// announcement goes apart: on a cluster its channel hashes to another slot than the key.
    async fn invalidate(&self, key: &str) -> Result<(), Error> {
        let tombstone_ttl = self.ttl + TOMBSTONE_MARGIN;
        let mut pipe = redis::pipe();
        pipe.del(self.key(key))
            .ignore()
            .cmd("SET")
            .arg(self.key(key))
            .arg(TOMBSTONE)
            .arg("PX")
            .arg(tombstone_ttl.as_millis() as u64)
            .ignore();
        let mut conn = self.redis.conn();
        // Announced whatever became of the tombstone (refused when Redis is full): the
        // other processes' own copies must go in any case.
        let stored: redis::RedisResult<()> = pipe.query_async(&mut conn).await;
        let announced: redis::RedisResult<()> = redis::cmd("PUBLISH")
            .arg(Self::channel(&self.redis))
            .arg(format!("{}\n{key}", self.namespace))
            .query_async(&mut conn)
            .await;
        Ok(stored.and(announced)?)
    }
}

pub struct Cache<V: Clone> {
    ttl: Duration,
    negative_ttl: Duration,
    shared: Option<SharedTier>,
    slots: Mutex<HashMap<String, Slot<V>>>,
    generation: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl<V: Clone + Serialize + DeserializeOwned + Send + Sync + 'static> Cache<V> {
    /// `ttl` and `negative_ttl` are the in-process (L1) lifetimes.
    pub fn new(ttl: Duration, negative_ttl: Duration, shared: Option<SharedTier>) -> Self {
        Self {
            ttl,
            negative_ttl,
            shared,
            slots: Mutex::new(HashMap::new()),
            generation: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    /// The cached value, or the result of `load` (shared with concurrent callers).
    /// A load error is returned to every waiter (shared, hence the `Arc`) and nothing is
    /// cached.
    pub async fn get_or_load<F, Fut>(&self, key: &str, load: F) -> Result<Option<V>, Arc<Error>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<V>, Error>> + Send + 'static,
    {
        let (generation, shared) = {
            let mut slots = self.lock();
            match slots.get(key) {
                Some(Slot::Ready { value, expires }) if *expires > Instant::now() => {
                    self.hits.fetch_add(1, Ordering::Relaxed);
                    return Ok(value.clone());
                }
                Some(Slot::Loading { generation, load }) => {
                    self.hits.fetch_add(1, Ordering::Relaxed);
                    (*generation, load.clone())
                }
                _ => {
                    self.misses.fetch_add(1, Ordering::Relaxed);
                    if slots.len() >= MAX_ENTRIES {
                        Self::shrink(&mut slots);
                    }
                    let generation = self.generation.fetch_add(1, Ordering::Relaxed);
                    let shared = self.through_shared_tier(key, load()).boxed().shared();
                    slots.insert(
                        key.to_owned(),
                        Slot::Loading {
                            generation,
                            load: shared.clone(),
                        },
                    );
                    (generation, shared)
                }
            }
        };
        let result = shared.await;
        let mut slots = self.lock();
        // Store only if our load is still the one registered: an invalidation removed it.
        if let Some(Slot::Loading { generation: g, .. }) = slots.get(key)
            && *g == generation
        {
            match &result {
                Ok(value) => {
                    let ttl = if value.is_some() {
                        self.jittered_ttl()
                    } else {
                        self.negative_ttl
                    };
                    let slot = Slot::Ready {
                        value: value.clone(),
                        expires: Instant::now() + ttl,
                    };
                    slots.insert(key.to_owned(), slot);
                }
                Err(_) => {
                    slots.remove(key);
                }
            }
        }
        result
    }

    /// The L2 lookup in front of `load`, and the L2 fill behind it.
    fn through_shared_tier<Fut>(
        &self,
        key: &str,
        load: Fut,
    ) -> impl Future<Output = Result<Option<V>, Arc<Error>>> + Send + 'static
    where
        Fut: Future<Output = Result<Option<V>, Error>> + Send + 'static,
    {
        let shared = self.shared.clone();
        let key = key.to_owned();
        async move {
            let Some(tier) = shared else {
                return Ok(load.await?);
            };
            if let Some(hit) = tier.get::<V>(&key).await {
                return Ok(hit);
            }
            let value = load.await?;
            tier.set(&key, &value).await;
            Ok(value)
        }
    }

    /// After a committed change: drops `key` here, in the shared tier, and (through pub/sub)
    /// in every other process. Loads already running are not stored. An error means other
    /// processes may serve the old value until their copies expire: the caller should say so
    /// (the change itself is committed, and invalidating again is harmless).
    pub async fn invalidate(&self, key: &str) -> Result<(), Error> {
        // The shared tier first: dropping the local copy before it would let this process
        // refill from the old shared copy.
        let shared = match &self.shared {
            Some(tier) => tier.invalidate(key).await,
            None => Ok(()),
        };
        self.forget_local(key);
        shared
    }

    /// Drops `key` from this process only (an invalidation heard from another process).
    pub fn forget_local(&self, key: &str) {
        self.lock().remove(key);
    }

    /// Drops every local entry, and keeps loads in flight from being stored (after
    /// invalidations may have been missed, e.g. across a pub/sub reconnect).
    pub fn forget_all_local(&self) {
        self.lock().clear();
    }

    pub fn stats(&self) -> CacheStats {
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
        }
    }

    fn jittered_ttl(&self) -> Duration {
        jittered(self.ttl)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Slot<V>>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn shrink(slots: &mut HashMap<String, Slot<V>>) {
        let now = Instant::now();
        slots.retain(|_, s| !matches!(s, Slot::Ready { expires, .. } if *expires <= now));
        if slots.len() >= MAX_ENTRIES {
            slots.retain(|_, s| matches!(s, Slot::Loading { .. }));
        }
    }
}

/// Up to 10 % shorter, so entries loaded together do not expire together, and the TTL
/// stays an upper bound on staleness.
fn jittered(ttl: Duration) -> Duration {
    ttl.mul_f64(rand::rng().random_range(0.9..=1.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;

    fn cache() -> Cache<String> {
        Cache::new(Duration::from_secs(60), Duration::from_millis(50), None)
    }

    // Paused time: the waits below only order the tasks, and the TTLs are tokio's clock.
    #[tokio::test(start_paused = true)]
    async fn concurrent_misses_share_one_load() {
        let c = Arc::new(cache());
        let loads = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..20)
            .map(|_| {
                let (c, loads) = (c.clone(), loads.clone());
                tokio::spawn(async move {
                    c.get_or_load("k", || async move {
                        loads.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        Ok(Some("v".to_owned()))
                    })
                    .await
                })
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap().as_deref(), Some("v"));
        }
        assert_eq!(loads.load(Ordering::SeqCst), 1);
        assert_eq!(c.stats().misses, 1);
        assert_eq!(c.stats().hits, 19);
    }

    #[tokio::test(start_paused = true)]
    async fn negative_entries_expire_quickly_and_errors_are_not_cached() {
        let c = cache();
        assert_eq!(
            c.get_or_load("k", || async { Ok(None) }).await.unwrap(),
            None
        );
        assert_eq!(
            c.get_or_load("k", || async { Ok(Some("late".into())) })
                .await
                .unwrap(),
            None
        );
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert_eq!(
            c.get_or_load("k", || async { Ok(Some("v".into())) })
                .await
                .unwrap()
                .as_deref(),
            Some("v")
        );
        assert!(
            c.get_or_load("e", || async { Err(Error::NotFound) })
                .await
                .is_err()
        );
        assert_eq!(
            c.get_or_load("e", || async { Ok(Some("up".into())) })
                .await
                .unwrap()
                .as_deref(),
            Some("up")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn invalidation_beats_an_in_flight_load() {
        let c = Arc::new(cache());
        let gate = Arc::new(tokio::sync::Notify::new());
        let (c2, g2) = (c.clone(), gate.clone());
        let stale = tokio::spawn(async move {
            c2.get_or_load("k", || async move {
                g2.notified().await;
                Ok(Some("old".to_owned()))
            })
            .await
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        c.invalidate("k").await.unwrap();
        gate.notify_one();
        assert_eq!(stale.await.unwrap().unwrap().as_deref(), Some("old"));
        let fresh = c
            .get_or_load("k", || async { Ok(Some("new".to_owned())) })
            .await
            .unwrap();
        assert_eq!(
            fresh.as_deref(),
            Some("new"),
            "the stale load must not have been stored"
        );
    }
}

//! Request-rate limiting with GCRA (the generic cell rate algorithm): each key holds one
//! number, its theoretical arrival time, so the state is tiny and decisions are exact.
//!
//! Two backends: in-process (one process's view), and Redis (one Lua script, one round
//! trip, Redis `TIME` as the clock, shared by every process). When Redis fails the Redis
//! backend answers from its in-process fallback: limits degrade to per-process, never to
//! unlimited, and the fallback is counted.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use crate::redis::Redis;

/// Prune idle keys once the table holds this many.
const PRUNE_AT: usize = 10_000;

/// A sustained rate plus the burst admitted at once above it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub per_minute: u32,
    pub burst: u32,
}

impl Rate {
    /// Microseconds between two requests at the sustained rate.
    fn emission_us(self) -> i64 {
        // At least 1 µs: GCRA divides by it, and no limit is finer than a million per second.
        (60_000_000 / i64::from(self.per_minute.max(1))).max(1)
    }
}

/// The answer for one request, with what the `RateLimit` headers report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// Requests that would still be admitted right now.
    pub remaining: u32,
    /// When denied: how long until one request is admitted again.
    pub retry_after_ms: u64,
    /// How long until the full burst is available again.
    pub reset_ms: u64,
}

/// The limiter backends; chosen once in [`crate::backends`].
pub enum Limiter {
    InProcess(InProcessLimiter),
    Redis(Box<RedisLimiter>),
}

impl Limiter {
    pub async fn check(&self, key: &str, rate: Rate) -> Decision {
        match self {
            Limiter::InProcess(l) => l.check(key, rate),
            Limiter::Redis(l) => l.check(key, rate).await,
        }
    }

    /// Decisions answered by the in-process fallback because Redis failed.
    pub fn fallbacks(&self) -> u64 {
        match self {
            Limiter::InProcess(_) => 0,
            Limiter::Redis(l) => l.fallbacks.load(Ordering::Relaxed),
        }
    }
}

/// GCRA in Redis, in microseconds. KEYS[1] holds the theoretical arrival time; ARGV is
/// the emission interval and the burst. Returns allowed, retry-after, remaining, reset.
const GCRA_LUA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local em = tonumber(ARGV[1])
local tolerance = em * tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]))
if not tat or tat < now then tat = now end
local new_tat = tat + em
local allow_at = new_tat - tolerance
if allow_at > now then
  return {0, allow_at - now, 0, tat - now}
end
redis.call('SET', KEYS[1], new_tat, 'PX', math.floor((new_tat - now) / 1000) + 1)
return {1, 0, math.floor((tolerance - (new_tat - now)) / em), new_tat - now}
"#;

impl RedisLimiter {
    /// The script's SHA1, for driving it from other clients (the benchmark's baseline).
    pub fn script_sha(&self) -> &str {
        self.script.get_hash()
    }

    /// The Lua source, for `SCRIPT LOAD`.
    pub fn script_source() -> &'static str {
        GCRA_LUA
    }
}

pub struct RedisLimiter {
    redis: Redis,
    script: redis::Script,
    fallback: InProcessLimiter,
    fallbacks: AtomicU64,
}

impl RedisLimiter {
    pub fn new(redis: Redis) -> Self {
        Self {
            redis,
            script: redis::Script::new(GCRA_LUA),
            fallback: InProcessLimiter::default(),
            fallbacks: AtomicU64::new(0),
        }
    }

    pub async fn check(&self, key: &str, rate: Rate) -> Decision {
        let burst = i64::from(rate.burst.max(1));
        let answer: redis::RedisResult<(i64, i64, i64, i64)> = self
            .script
            .key(self.redis.key(&["rl", key]))
            .arg(rate.emission_us())
            .arg(burst)
            .invoke_async(&mut self.redis.conn())
            .await;
        let ms = |us: i64| (us.max(0) as u64).div_ceil(1000);
        match answer {
            Ok((allowed, retry_us, remaining, reset_us)) => Decision {
                allowed: allowed == 1,
                remaining: u32::try_from(remaining.max(0)).unwrap_or(u32::MAX),
                retry_after_ms: ms(retry_us),
                reset_ms: ms(reset_us),
            },
            Err(e) => {
                if self
                    .fallbacks
                    .fetch_add(1, Ordering::Relaxed)
                    .is_multiple_of(1000)
                {
                    tracing::warn!(error = %e, "Redis limiter unavailable; limiting per process");
                }
                self.fallback.check(key, rate)
            }
        }
    }
}

/// GCRA state per key in this process only.
pub struct InProcessLimiter {
    epoch: Instant,
    tats: Mutex<HashMap<String, i64>>,
}

impl Default for InProcessLimiter {
    fn default() -> Self {
        Self {
            epoch: Instant::now(),
            tats: Mutex::new(HashMap::new()),
        }
    }
}

impl InProcessLimiter {
    pub fn check(&self, key: &str, rate: Rate) -> Decision {
        let now = self.epoch.elapsed().as_micros() as i64;
        self.check_at(key, rate, now)
    }

    /// The decision at `now_us` (microseconds on any monotonic clock).
    pub fn check_at(&self, key: &str, rate: Rate, now_us: i64) -> Decision {
        let mut tats = self.tats.lock().unwrap_or_else(|p| p.into_inner());
        if tats.len() >= PRUNE_AT {
            tats.retain(|_, tat| *tat > now_us);
        }
        let stored = tats.get(key).copied();
        let (decision, new_tat) = gcra(stored, rate, now_us);
        if let Some(tat) = new_tat {
            tats.insert(key.to_owned(), tat);
        }
        decision
    }
}

/// One GCRA step: the decision and, when admitted, the new theoretical arrival time.
pub fn gcra(stored_tat: Option<i64>, rate: Rate, now: i64) -> (Decision, Option<i64>) {
    let em = rate.emission_us();
    let tolerance = em * i64::from(rate.burst.max(1));
    let tat = stored_tat.unwrap_or(now).max(now);
    let new_tat = tat + em;
    let allow_at = new_tat - tolerance;
    let ms = |us: i64| (us.max(0) as u64).div_ceil(1000);
    if allow_at > now {
        let remaining = 0;
        let d = Decision {
            allowed: false,
            remaining,
            retry_after_ms: ms(allow_at - now),
            reset_ms: ms(tat - now),
        };
        return (d, None);
    }
    let remaining = ((tolerance - (new_tat - now)) / em).max(0) as u32;
    (
        Decision {
            allowed: true,
            remaining,
            retry_after_ms: 0,
            reset_ms: ms(new_tat - now),
        },
        Some(new_tat),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const RATE: Rate = Rate {
        per_minute: 60,
        burst: 5,
    };

    #[test]
    fn admits_the_burst_then_one_per_interval() {
        let l = InProcessLimiter::default();
        let allowed: Vec<bool> = (0..7).map(|_| l.check_at("k", RATE, 0).allowed).collect();
        assert_eq!(allowed, [true, true, true, true, true, false, false]);
        let denied = l.check_at("k", RATE, 0);
        assert_eq!(denied.retry_after_ms, 1000);
        assert!(!l.check_at("k", RATE, 999_000).allowed);
        assert!(l.check_at("k", RATE, 1_000_000).allowed);
        assert!(l.check_at("other", RATE, 0).allowed, "keys are independent");
    }

    #[test]
    fn remaining_counts_down() {
        let l = InProcessLimiter::default();
        let r: Vec<u32> = (0..5).map(|_| l.check_at("k", RATE, 0).remaining).collect();
        assert_eq!(r, [4, 3, 2, 1, 0]);
    }

    #[test]
    fn never_admits_more_than_burst_plus_rate_in_any_window() {
        // 10 requests every millisecond for 3 s: at 60/min with burst 5 that is
        // at most 5 + 3 admitted.
        let l = InProcessLimiter::default();
        let mut admitted = 0;
        for ms in 0..3000i64 {
            for _ in 0..10 {
                admitted += u32::from(l.check_at("k", RATE, ms * 1000).allowed);
            }
        }
        assert_eq!(
            admitted,
            5 + 2,
            "the 3rd refill lands exactly at 3 s, outside the window"
        );
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// However requests arrive, GCRA never admits more than the burst plus what the
            /// rate refills in the elapsed time.
            #[test]
            fn admitted_never_exceeds_burst_plus_refill(
                per_minute in 1u32..10_000,
                burst in 1u32..50,
                gaps in proptest::collection::vec(0i64..200_000, 1..300),
            ) {
                let rate = Rate { per_minute, burst };
                let l = InProcessLimiter::default();
                let mut now = 0i64;
                let mut admitted = 0u64;
                for gap in gaps {
                    now += gap;
                    admitted += u64::from(l.check_at("k", rate, now).allowed);
                }
                let em = rate.emission_us();
                let ceiling = u64::from(burst) + (now / em) as u64;
                prop_assert!(admitted <= ceiling, "admitted {} > {}", admitted, ceiling);
            }
        }
    }
}

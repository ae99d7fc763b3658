//! Failed-authentication counters with a TTL and a temporary lock-out, per IP and per key id.
//!
//! Two backends: in-process (every entry expires, so the table cannot grow without bound)
//! and Redis (shared by all processes, every key with a TTL). The Redis backend fails
//! closed: when Redis errors, its in-process twin keeps counting and locking.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::redis::{Redis, tag};

/// Subjects tracked in process at most.
const MAX_SUBJECTS: usize = 100_000;

#[derive(Debug, Clone, Copy)]
pub struct LockoutPolicy {
    pub max_failures: u32,
    pub window: Duration,
    pub lockout: Duration,
}

struct Entry {
    failures: u32,
    window_ends: Instant,
    locked_until: Option<Instant>,
}

pub enum Lockout {
    InProcess(InProcessLockout),
    Redis(Box<RedisLockout>),
}

impl Lockout {
    /// `Some(remaining)` while `subject` is locked out.
    pub async fn locked(&self, subject: &str) -> Option<Duration> {
        match self {
            Lockout::InProcess(l) => l.locked(subject, Instant::now()),
            Lockout::Redis(l) => l.locked(subject).await,
        }
    }

    pub async fn record_failure(&self, subject: &str) {
        match self {
            Lockout::InProcess(l) => l.record_failure(subject, Instant::now()),
            Lockout::Redis(l) => l.record_failure(subject).await,
        }
    }

    /// Operations answered by the in-process fallback because Redis failed.
    pub fn fallbacks(&self) -> u64 {
        match self {
            Lockout::InProcess(_) => 0,
            Lockout::Redis(l) => l.fallbacks.load(Ordering::Relaxed),
        }
    }
}

/// Counts a failure (the counter lives for the window) and sets the lock key once the
/// count reaches the limit. KEYS: counter, lock. ARGV: window ms, max failures, lock-out ms.
const FAILURE_LUA: &str = r#"
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
if n >= tonumber(ARGV[2]) then redis.call('SET', KEYS[2], '1', 'PX', ARGV[3]) end
return n
"#;

pub struct RedisLockout {
    redis: Redis,
    policy: LockoutPolicy,
    script: redis::Script,
    fallback: InProcessLockout,
    fallbacks: AtomicU64,
}

impl RedisLockout {
    pub fn new(redis: Redis, policy: LockoutPolicy) -> Self {
        Self {
            redis,
            policy,
            script: redis::Script::new(FAILURE_LUA),
            fallback: InProcessLockout::new(policy),
            fallbacks: AtomicU64::new(0),
        }
    }

    fn degraded(&self, e: &redis::RedisError) {
        if self
            .fallbacks
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(1000)
        {
            tracing::warn!(error = %e, "Redis lock-out unavailable; counting per process");
        }
    }

    /// A subject's counter and lock share a hash tag: the failure script sets both.
    fn key(&self, subject: &str, what: &str) -> String {
        self.redis.key(&[&tag(&["auth", subject]), what])
    }

    fn lock_key(&self, subject: &str) -> String {
        self.key(subject, "lock")
    }

    async fn locked(&self, subject: &str) -> Option<Duration> {
        let ttl: redis::RedisResult<i64> = redis::cmd("PTTL")
            .arg(self.lock_key(subject))
            .query_async(&mut self.redis.conn())
            .await;
        let local = self.fallback.locked(subject, Instant::now());
        match ttl {
            Ok(ms) if ms > 0 => Some(Duration::from_millis(ms as u64)),
            // The in-process twin still remembers lock-outs counted while Redis was away.
            Ok(_) => local,
            Err(e) => {
                self.degraded(&e);
                local
            }
        }
    }

    async fn record_failure(&self, subject: &str) {
        let ms = |d: Duration| d.as_millis() as u64;
        let counted: redis::RedisResult<i64> = self
            .script
            .key(self.key(subject, "failures"))
            .key(self.lock_key(subject))
            .arg(ms(self.policy.window))
            .arg(self.policy.max_failures)
            .arg(ms(self.policy.lockout))
            .invoke_async(&mut self.redis.conn())
            .await;
        if let Err(e) = counted {
            self.degraded(&e);
            self.fallback.record_failure(subject, Instant::now());
        }
    }
}

pub struct InProcessLockout {
    policy: LockoutPolicy,
    entries: Mutex<HashMap<String, Entry>>,
}

impl InProcessLockout {
    pub fn new(policy: LockoutPolicy) -> Self {
        Self {
            policy,
            entries: Mutex::new(HashMap::new()),
        }
    }

    fn locked(&self, subject: &str, now: Instant) -> Option<Duration> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let until = entries.get(subject)?.locked_until?;
        (until > now).then(|| until - now)
    }

    fn record_failure(&self, subject: &str, now: Instant) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entries.len() >= MAX_SUBJECTS {
            entries.retain(|_, e| e.window_ends > now || e.locked_until.is_some_and(|u| u > now));
            // Still full (a flood of distinct addresses or key ids): forget the subjects
            // that are only counting, keep every lock-out in force.
            if entries.len() >= MAX_SUBJECTS {
                entries.retain(|_, e| e.locked_until.is_some_and(|u| u > now));
            }
            if entries.len() >= MAX_SUBJECTS {
                return;
            }
        }
        let p = self.policy;
        let e = entries.entry(subject.to_owned()).or_insert(Entry {
            failures: 0,
            window_ends: now + p.window,
            locked_until: None,
        });
        if e.window_ends <= now && e.locked_until.is_none_or(|u| u <= now) {
            *e = Entry {
                failures: 0,
                window_ends: now + p.window,
                locked_until: None,
            };
        }
        e.failures += 1;
        if e.failures >= p.max_failures {
            e.locked_until = Some(now + p.lockout);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locks_after_max_failures_and_expires() {
        let l = InProcessLockout::new(LockoutPolicy {
            max_failures: 3,
            window: Duration::from_secs(60),
            lockout: Duration::from_secs(30),
        });
        let t0 = Instant::now();
        l.record_failure("ip:1", t0);
        l.record_failure("ip:1", t0);
        assert!(l.locked("ip:1", t0).is_none());
        l.record_failure("ip:1", t0);
        assert_eq!(l.locked("ip:1", t0), Some(Duration::from_secs(30)));
        assert!(l.locked("ip:2", t0).is_none());
        assert!(l.locked("ip:1", t0 + Duration::from_secs(31)).is_none());
        // Failures outside the window start a new count.
        let t1 = t0 + Duration::from_secs(120);
        l.record_failure("ip:1", t1);
        assert!(l.locked("ip:1", t1).is_none());
    }
}

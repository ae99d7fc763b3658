//! Failed-authentication counters with a TTL and a temporary lock-out, per IP and per key id.
//! In-process backend; every entry expires, so the table cannot grow without bound.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

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
}

impl Lockout {
    /// `Some(remaining)` while `subject` is locked out.
    pub fn locked(&self, subject: &str) -> Option<Duration> {
        match self {
            Lockout::InProcess(l) => l.locked(subject, Instant::now()),
        }
    }

    pub fn record_failure(&self, subject: &str) {
        match self {
            Lockout::InProcess(l) => l.record_failure(subject, Instant::now()),
        }
    }

    pub fn clear(&self, subject: &str) {
        match self {
            Lockout::InProcess(l) => l.clear(subject),
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
        if entries.len() >= 10_000 {
            entries.retain(|_, e| e.window_ends > now || e.locked_until.is_some_and(|u| u > now));
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

    fn clear(&self, subject: &str) {
        self.entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(subject);
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

//! The Redis job queue: a bounded working set of job messages, fed from the SQL intents by
//! the relay (SQL stays the ledger; Redis only carries copies). Two implementations:
//! - [`lists`] (the default): DataFlow's own reliable lists; an idle worker blocks in
//!   `BLMOVE`, so a push reaches a handler in one round trip, and a take is O(batch).
//! - [`apalis`]: apalis-redis 1.0 storage, for deployments that want the apalis ecosystem
//!   on the same keys (apalis-board, producers and workers written against apalis). It
//!   polls, and its working set is capped below the size at which apalis-redis 1.0 fails.
//!
//! The relay and the sweeper speak to either through [`RedisJobQueue`].

pub mod apalis;
mod lists;

pub use apalis::ApalisQueues;
pub use lists::{Consumer, Delivery, JobQueue, JobQueues, QueueKeys};

use dataflow_contracts::jobs::{JobKind, JobMessage, JobTicket};

use crate::Result;

/// The job queue in Redis, as configured by `jobs.redis_queue`.
#[derive(Clone)]
pub enum RedisJobQueue {
    Lists(JobQueues),
    Apalis(ApalisQueues),
}

impl RedisJobQueue {
    /// Messages of `kind` in Redis (waiting or in flight): what the relay keeps bounded.
    pub async fn outstanding(&self, kind: JobKind) -> Result<u64> {
        match self {
            Self::Lists(q) => q.queue(kind).outstanding().await,
            Self::Apalis(q) => q.outstanding(kind).await,
        }
    }

    /// Hands `messages` of `kind` to Redis.
    pub async fn push(&self, kind: JobKind, messages: &[JobMessage]) -> Result<()> {
        match self {
            Self::Lists(q) => q.queue(kind).push(messages).await,
            Self::Apalis(q) => q.push(kind, messages).await,
        }
    }

    /// Which of `tickets` Redis still holds, so the sweeper can tell "still queued" from
    /// "lost".
    pub async fn holds(&self, kind: JobKind, tickets: &[&JobTicket]) -> Result<Vec<bool>> {
        match self {
            Self::Lists(q) => q.queue(kind).holds(tickets).await,
            Self::Apalis(q) => q.holds(kind, tickets).await,
        }
    }

    /// Deletes what finished jobs left behind in Redis (apalis-redis keeps every finished
    /// task forever; the lists keep nothing). Returns how many were removed.
    pub async fn tidy(&self, kind: JobKind) -> Result<u64> {
        match self {
            Self::Lists(_) => Ok(0),
            Self::Apalis(q) => q.vacuum(kind).await,
        }
    }

    /// DataFlow's own lists, when they are the configured queue.
    pub fn lists(&self) -> Option<&JobQueues> {
        match self {
            Self::Lists(q) => Some(q),
            Self::Apalis(_) => None,
        }
    }
}

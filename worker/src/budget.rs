//! The records a worker process holds in memory at once, across all the batches it has in
//! flight (`worker.records_in_memory`): a chunk waits for room before its records are read,
//! and gives the room back once it is committed or dropped. What a worker holds then
//! depends on this budget, not on the size of the files or on how many are in flight.
//!
//! Why it cannot deadlock: room is held by chunks being read or already read, which their
//! batch commits without waiting for more room, and by a bundle, which takes the room of
//! all its members at once. A run holds room for at most two chunks: the one being
//! committed and the next, whose reading waits for a place in the run's channel before it
//! waits for room. A request larger than the whole budget takes all of it, so it waits,
//! never forever.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Where a file's chunks take their room.
#[derive(Clone)]
pub(crate) enum Budget {
    /// The worker's budget, shared by all its batches: each chunk waits for its room.
    Shared { room: Arc<Semaphore>, records: u32 },
    /// Room taken beforehand for the whole file (a bundle's member).
    Taken,
}

/// Room for some records in a [`Budget`], given back when dropped.
pub(crate) struct Room {
    _held: Option<OwnedSemaphorePermit>,
}

impl Budget {
    pub fn new(records: usize) -> Budget {
        let records = u32::try_from(records).unwrap_or(u32::MAX).max(1);
        Budget::Shared {
            room: Arc::new(Semaphore::new(records as usize)),
            records,
        }
    }

    /// Waits until there is room for `records` (all of the budget when they need more).
    pub async fn room(&self, records: u64) -> Room {
        match self {
            Budget::Shared { room, records: all } => {
                let wanted = u32::try_from(records).unwrap_or(u32::MAX).min(*all);
                if wanted == 0 {
                    return Room { _held: None };
                }
                Room {
                    // The semaphore is never closed.
                    _held: room.clone().acquire_many_owned(wanted).await.ok(),
                }
            }
            Budget::Taken => Room { _held: None },
        }
    }

    /// [`Budget::room`] for a blocking thread (the one reading and preparing a file).
    pub fn room_blocking(&self, records: u64) -> Room {
        futures::executor::block_on(self.room(records))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn room_is_given_back_when_dropped_and_a_large_request_takes_all_of_it() {
        let budget = Budget::new(10);
        let six = budget.room(6).await;
        let mut all = Box::pin(budget.room(1_000));
        assert!(
            futures::poll!(&mut all).is_pending(),
            "only four records are free"
        );
        drop(six);
        let all = all.await;
        let Budget::Shared { room, .. } = &budget else {
            unreachable!()
        };
        assert_eq!(room.available_permits(), 0);
        drop(all);
        assert_eq!(room.available_permits(), 10);
        let none = budget.room(0).await;
        assert_eq!(room.available_permits(), 10);
        drop(none);
    }
}

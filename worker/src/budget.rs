//! The records a worker process holds in memory at once, across all the batches it has in
//! flight (`worker.records_in_memory`): a chunk waits for room before its records are read,
//! and gives the room back once it is committed or dropped. What a worker holds then
//! depends on this budget, not on the size of the files or on how many are in flight.
//!
//! Chunks waiting for room take turns by client ([`Lanes`]): a client whose many batches
//! queue chunk after chunk delays another client's chunk by one of its own, not by all of
//! them. A waiter is never passed over because a later one would fit sooner, so a large
//! chunk is delayed, never starved.
//!
//! Why it cannot deadlock: room is held by chunks being read or already read, which their
//! batch commits without waiting for more room, and by a bundle, which takes the room of
//! all its members at once. A run holds room for at most two chunks: the one being
//! committed and the next, whose reading waits for a place in the run's channel before it
//! waits for room. A request larger than the whole budget takes all of it, so it waits,
//! never forever.

use std::sync::{Arc, Mutex, MutexGuard};

use dataflow_contracts::ClientId;
use dataflow_platform::domain::lanes::{Lane, Lanes};
use tokio::sync::oneshot;

/// Where a file's chunks take their room.
#[derive(Clone)]
pub(crate) enum Budget {
    /// The worker's budget, shared by all its batches: each chunk waits for its room, in
    /// the lane of the client it is read for.
    Shared { pool: Arc<Pool>, lane: Lane },
    /// Room taken beforehand for the whole file (a bundle's member).
    Taken,
}

/// The worker's room, and who waits for it.
pub(crate) struct Pool {
    records: u32,
    state: Mutex<State>,
}

struct State {
    free: u32,
    /// Each waiter's records, and where to tell it they are its.
    waiting: Lanes<(u32, oneshot::Sender<()>)>,
}

impl Pool {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Gives `records` back and hands room to the waiters whose turn it is, in turn, while
    /// the first of them fits.
    fn give_back(&self, records: u32) {
        let mut state = self.state();
        state.free += records;
        while let Some((wanted, tx)) = state.waiting.peek() {
            // A waiter that left keeps no one behind it waiting.
            if tx.is_closed() {
                state.waiting.pop();
                continue;
            }
            if *wanted > state.free {
                return;
            }
            let Some((wanted, tx)) = state.waiting.pop() else {
                return;
            };
            state.free -= wanted;
            // A waiter that left meanwhile: its room stays free for the next.
            if tx.send(()).is_err() {
                state.free += wanted;
            }
        }
    }
}

/// Room for some records in a [`Budget`], given back when dropped.
pub(crate) struct Room {
    held: Option<(Arc<Pool>, u32)>,
}

impl Drop for Room {
    fn drop(&mut self) {
        if let Some((pool, records)) = self.held.take() {
            pool.give_back(records);
        }
    }
}

/// A wait for room. Dropped while waiting (its batch given up), it gives back room handed
/// to it in the meantime, so no room is ever lost.
struct Waiting {
    rx: oneshot::Receiver<()>,
    pool: Arc<Pool>,
    records: u32,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.rx.close();
        // Room handed to it goes back; either way, the waiters it stood before may fit now.
        let handed = if self.rx.try_recv().is_ok() {
            self.records
        } else {
            0
        };
        self.pool.give_back(handed);
    }
}

impl Budget {
    pub fn new(records: usize) -> Budget {
        let records = u32::try_from(records).unwrap_or(u32::MAX).max(1);
        Budget::Shared {
            pool: Arc::new(Pool {
                records,
                state: Mutex::new(State {
                    free: records,
                    waiting: Lanes::default(),
                }),
            }),
            lane: Lane::SHARED,
        }
    }

    /// The same budget, its waits made in `client`'s lane.
    pub fn for_client(&self, client: &ClientId) -> Budget {
        match self {
            Budget::Shared { pool, .. } => Budget::Shared {
                pool: pool.clone(),
                lane: Lane::of(client),
            },
            Budget::Taken => Budget::Taken,
        }
    }

    /// Waits until there is room for `records` (all of the budget when they need more).
    pub async fn room(&self, records: u64) -> Room {
        let Budget::Shared { pool, lane } = self else {
            return Room { held: None };
        };
        let wanted = u32::try_from(records).unwrap_or(u32::MAX).min(pool.records);
        if wanted == 0 {
            return Room { held: None };
        }
        let rx = {
            let mut state = pool.state();
            if state.waiting.is_empty() && state.free >= wanted {
                state.free -= wanted;
                return Room {
                    held: Some((pool.clone(), wanted)),
                };
            }
            let (tx, rx) = oneshot::channel();
            state.waiting.push(*lane, (wanted, tx));
            rx
        };
        let mut waiting = Waiting {
            rx,
            pool: pool.clone(),
            records: wanted,
        };
        // The pool never drops a waiter's sender without sending: it lives as long as
        // the waiter holds it.
        let _ = (&mut waiting.rx).await;
        // The room is this chunk's now: the wait no longer gives it back.
        waiting.records = 0;
        Room {
            held: Some((pool.clone(), wanted)),
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

    fn free(budget: &Budget) -> u32 {
        let Budget::Shared { pool, .. } = budget else {
            unreachable!()
        };
        pool.state().free
    }

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
        assert_eq!(free(&budget), 0);
        drop(all);
        assert_eq!(free(&budget), 10);
        let none = budget.room(0).await;
        assert_eq!(free(&budget), 10);
        drop(none);
    }

    #[tokio::test]
    async fn clients_take_turns_for_room_and_a_waiter_that_left_loses_none() {
        let budget = Budget::new(10);
        let (flood, steady) = (
            budget.for_client(&ClientId::generate()),
            budget.for_client(&ClientId::generate()),
        );
        let held = flood.room(10).await;
        let mut queued: Vec<_> = (0..3).map(|_| Box::pin(flood.room(10))).collect();
        for q in &mut queued {
            assert!(futures::poll!(q).is_pending());
        }
        let mut small = Box::pin(steady.room(4));
        assert!(futures::poll!(&mut small).is_pending());
        // The flood's first waiter leaves before its turn comes.
        drop(queued.remove(0));
        drop(held);
        // The steady client's chunk goes next, ahead of the flood's two others.
        let small = tokio::time::timeout(std::time::Duration::from_secs(1), small)
            .await
            .expect("the steady client's turn comes before the flood's others");
        assert_eq!(free(&budget), 6);
        assert!(futures::poll!(&mut queued[0]).is_pending());
        drop(small);
        // The next one is handed its room, then leaves before it looks: the room comes back
        // and goes to the last.
        drop(queued.remove(0));
        drop(queued.remove(0).await);
        assert_eq!(free(&budget), 10);
    }
}

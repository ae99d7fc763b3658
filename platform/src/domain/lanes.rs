//! Taking turns by client: waiters queue in the lane of the client they work for, and the
//! lanes are served round robin, one waiter each. A client with a thousand waiters delays
//! another client's one by a single turn of its own, not by all of them. The SQLite write
//! gate ([`crate::ledger`]) and a worker's record budget both queue this way.

use std::collections::VecDeque;
use std::hash::{Hash, Hasher};

use dataflow_contracts::ClientId;

/// On whose behalf a waiter waits. Work done for no one client (a group of several
/// clients' submits, an operator's action) shares [`Lane::SHARED`], which takes its turn
/// like a client's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lane(u64);

impl Lane {
    pub const SHARED: Lane = Lane(0);

    /// The lane of `client`. Lanes are told apart by a hash of the client's id: two
    /// clients whose hashes met would share a lane, which delays, never loses, a waiter.
    pub fn of(client: &ClientId) -> Lane {
        let mut hasher = std::hash::DefaultHasher::new();
        client.as_str().hash(&mut hasher);
        Lane(hasher.finish() | 1)
    }
}

/// Waiters by lane, served round robin.
#[derive(Debug)]
pub struct Lanes<T> {
    /// The lanes with waiters, in the order of their turns: the front one gives its first
    /// waiter, then goes to the back if it has more.
    turns: VecDeque<(Lane, VecDeque<T>)>,
}

impl<T> Default for Lanes<T> {
    fn default() -> Self {
        Lanes {
            turns: VecDeque::new(),
        }
    }
}

impl<T> Lanes<T> {
    /// Queues `waiter` last in its lane; a lane that had none takes the last turn.
    pub fn push(&mut self, lane: Lane, waiter: T) {
        match self.turns.iter_mut().find(|(l, _)| *l == lane) {
            Some((_, waiting)) => waiting.push_back(waiter),
            None => self.turns.push_back((lane, VecDeque::from([waiter]))),
        }
    }

    /// The waiter whose turn it is, without serving it.
    pub fn peek(&self) -> Option<&T> {
        self.turns.front().and_then(|(_, waiting)| waiting.front())
    }

    /// Serves the waiter whose turn it is; its lane goes last.
    pub fn pop(&mut self) -> Option<T> {
        let (lane, mut waiting) = self.turns.pop_front()?;
        let next = waiting.pop_front();
        if !waiting.is_empty() {
            self.turns.push_back((lane, waiting));
        }
        next
    }

    pub fn is_empty(&self) -> bool {
        self.turns.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lanes_take_turns_one_waiter_each() {
        let (a, b) = (
            Lane::of(&ClientId::generate()),
            Lane::of(&ClientId::generate()),
        );
        assert_ne!(a, b);
        assert_ne!(a, Lane::SHARED);
        let mut lanes = Lanes::default();
        for n in 1..=4 {
            lanes.push(a, n);
        }
        lanes.push(b, 10);
        lanes.push(Lane::SHARED, 20);
        lanes.push(b, 11);
        assert_eq!(lanes.peek(), Some(&1));
        let mut served = Vec::new();
        while let Some(n) = lanes.pop() {
            served.push(n);
        }
        assert_eq!(served, [1, 10, 20, 2, 11, 3, 4]);
        assert!(lanes.is_empty());
        // A lane that emptied and comes back takes the last turn.
        lanes.push(a, 5);
        lanes.push(b, 12);
        lanes.push(a, 6);
        assert_eq!(lanes.pop(), Some(5));
        lanes.push(Lane::SHARED, 21);
        assert_eq!(
            std::iter::from_fn(|| lanes.pop()).collect::<Vec<_>>(),
            [12, 6, 21]
        );
    }
}

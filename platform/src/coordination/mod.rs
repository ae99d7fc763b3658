//! How worker processes stay out of each other's way: the Redlock batch [`mutex`] in front
//! of the fenced SQL lease, and the [`fleet`] registry (heartbeats with a TTL, drain
//! requests) that the leader reads to take back the work of processes that are gone.

pub mod fleet;
pub mod mutex;

//! What an import is made of, with no I/O: the record parser, client schemas (typing and
//! checking cells, compiled once per version), the preparation of records into what a chunk
//! commits, what an import would change (the dry run's diff), API keys, and the round robin
//! by client in which waiters for a shared resource take turns ([`lanes`]). The ledger
//! stores these types; it does not define them.

pub mod compiled;
pub mod diff;
pub mod keys;
pub mod lanes;
pub mod prepare;
pub mod records;
pub mod schema;

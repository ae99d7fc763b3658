//! What an import is made of, with no I/O: the record parser, client schemas (typing and
//! checking cells), the preparation of records into what a chunk commits, and API keys. The ledger stores these types; it does not
//! define them.

pub mod compiled;
pub mod keys;
pub mod prepare;
pub mod records;
pub mod schema;

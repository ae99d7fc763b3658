//! Helpers shared by the test targets (`it` and `chaos`), each of which includes this folder
//! with `#[path]`: the operator's `/admin` calls, the services the tests talk to, a database that lives for one test, a TCP
//! proxy the test controls, record bodies, and the command that runs a real `dataflow` process.

pub mod admin;
pub mod db;
pub mod harness;
pub mod process;
pub mod proxy;
pub mod records;
pub mod redis_cluster;
pub mod services;

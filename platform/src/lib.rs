//! DataFlow's adapters: everything that talks to the outside world or holds shared state,
//! each with an embedded backend so the whole system runs with no servers.
//!
//! Layout, one folder per concern:
//! - [`config`]: the one validated configuration struct; [`backends`]: the factory that
//!   picks every backend from it; [`error`](Error): the crate's error type.
//! - [`domain`]: records, their preparation and API keys, with no I/O.
//! - [`ledger`]: the SQL ledger (SQLite or PostgreSQL), the truth everything else defers to.
//! - [`events`]: the outbox relay and the events [`events::Mode`]; [`broker`]: the RabbitMQ
//!   transport it publishes through (link, topology, confirmed publishing, consumer).
//! - [`jobqueue`]: the Redis job queue (bounded working set, reliable hand-out, reaping).
//! - [`redis`]: the Redis connection, prefix and health shared by the Redis backends of
//!   [`guards`] (rate limits, lock-out, cache, dedup), [`coordination`] (batch mutex, worker
//!   fleet) and [`dashboard`] (live updates, sessions).
//! - [`effects`]: what jobs do outside: mail, webhooks, reports.
//! - [`telemetry`]: the Prometheus recorder and the gauges refreshed on each scrape;
//!   [`traces`]: OpenTelemetry traces and the trace context carried from hop to hop;
//!   [`memory`]: how a process gives memory back.

pub mod backends;
pub mod broker;
pub mod config;
pub mod coordination;
pub mod dashboard;
pub mod domain;
pub mod effects;
mod error;
pub mod events;
pub mod guards;
pub mod jobqueue;
pub mod ledger;
pub mod memory;
pub mod redis;
pub mod telemetry;
pub mod traces;

pub use backends::Backends;
pub use config::Config;
pub use error::{Error, Result};

/// Every TLS client of the process (reqwest, lettre, redis, lapin) uses one crypto
/// provider, named here rather than left to crate features, which change as dependencies
/// are added. Called at start-up; a second call changes nothing.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

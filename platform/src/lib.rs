//! DataFlow's adapters: everything that talks to the outside world or holds shared state,
//! each with an embedded backend so the whole system runs with no servers.
//!
//! Layout:
//! - [`config`]: the one validated configuration struct.
//! - [`backends`]: the factory that picks every backend from config.
//! - [`db`]: the SQL ledger (SQLite or PostgreSQL).
//! - [`records`]: parsing CSV and NDJSON bodies under limits.
//! - [`report`]: a batch's rejected rows as spreadsheet-safe CSV.
//! - [`keys`]: API key minting and verification.
//! - [`redis`]: the Redis connection, prefix and health.
//! - [`limiter`], [`lockout`], [`cache`], [`dedup`]: request-path guards, each with an
//!   in-process backend and a Redis backend.
//! - [`mutex`]: the Redlock batch mutex in front of the SQL lease.
//! - [`events`]: the outbox relay, event publishers and the events [`events::Mode`].
//! - [`fleet`]: the worker registry (heartbeats with a TTL, drain requests).
//! - [`live`], [`sessions`]: the dashboard's live-update bus and its login sessions.
//! - [`amqp`]: RabbitMQ: the supervised link, topology, confirmed publishing, the consumer.
//! - [`jobqueue`]: the Redis job queue (bounded working set, reliable hand-out, reaping).
//! - [`mail`], [`webhook`]: the side effects of jobs (lettre SMTP or files; signed webhooks).
//! - [`telemetry`]: the Prometheus recorder and the gauges refreshed on each scrape.

pub mod amqp;
pub mod backends;
pub mod cache;
pub mod config;
pub mod db;
pub mod dedup;
mod error;
pub mod events;
pub mod fleet;
pub mod jobqueue;
pub mod keys;
pub mod limiter;
pub mod live;
pub mod lockout;
pub mod mail;
pub mod mutex;
pub mod records;
pub mod redis;
pub mod report;
pub mod sessions;
pub mod telemetry;
pub mod webhook;

pub use backends::Backends;
pub use config::Config;
pub use error::{Error, Result};

/// Every TLS client of the process (reqwest, lettre, redis, lapin) uses one crypto
/// provider, named here rather than left to crate features, which change as dependencies
/// are added. Called at start-up; a second call changes nothing.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

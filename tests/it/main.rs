//! End-to-end tests: a real DataFlow process per test, over HTTP on port 0, against a fresh
//! SQLite file and a fresh PostgreSQL database.

// Tests fail loudly on the first unexpected value; that is what unwrap is for here.
#![allow(clippy::unwrap_used)]

// Each target uses its own part of the helpers the test targets share.
#[allow(dead_code)]
#[path = "../common/mod.rs"]
mod common;
mod helpers;
mod sinks;

mod amqp;
mod auth;
mod bundles;
mod charts;
mod cli;
mod deploy;
mod fair;
mod fleet;
mod imports;
mod jobs;
mod leader;
mod metrics;
mod openapi;
mod rabbitmq_cluster;
mod records;
mod redis;
mod redis_cluster;
mod retention;
mod schemas;
mod traces;
mod typed;
mod ui;
mod uploads;
mod worker;

fn main() -> std::process::ExitCode {
    common::harness::main()
}

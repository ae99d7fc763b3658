//! Helpers shared by the test targets (`it` and `chaos`), each of which includes this folder
//! with `#[path]`: the operator's `/admin` calls, the services the tests talk to, a database
//! that lives for one test, a TCP proxy the test controls, a Redis Cluster and a RabbitMQ
//! cluster of the test's own on free loopback ports, record bodies, and the command that
//! runs a real `dataflow` process.

pub mod admin;
pub mod db;
pub mod harness;
pub mod ports;
pub mod process;
pub mod proxy;
pub mod rabbitmq_cluster;
pub mod records;
pub mod redis_cluster;
pub mod services;

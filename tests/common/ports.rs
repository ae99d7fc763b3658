//! Loopback ports for the servers a test starts itself.

use std::net::TcpListener;

/// The ports RabbitMQ's command-line tools take for their own Erlang distribution (the
/// machine's broker listens for its peers on 25672, and its tools on that plus 10000 and
/// the next ten).
const RABBITMQ_TOOLS: std::ops::RangeInclusive<u16> = 35_672..=35_682;

/// `count` loopback ports that are free now, each with the port 10000 above it free too (a
/// Redis node's cluster bus), and none that RabbitMQ's tools may take while the test runs.
pub fn free_ports(count: usize) -> Vec<u16> {
    let mut ports = Vec::with_capacity(count);
    while ports.len() < count {
        let probe = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = probe.local_addr().unwrap().port();
        drop(probe);
        let bus_free = port < 55_535 && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok();
        if bus_free && !RABBITMQ_TOOLS.contains(&port) && !ports.contains(&port) {
            ports.push(port);
        }
    }
    ports
}

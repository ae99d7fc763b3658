//! The broker tier on a RabbitMQ cluster of three nodes that the test starts from the
//! machine's own `rabbitmq-server` (see `common/rabbitmq_cluster.rs`): one node is killed
//! while imports flow, and nothing is lost or done twice.

use crate::common::harness::register;
use std::collections::HashSet;
use std::time::{Duration, Instant};

use dataflow::Roles;
use dataflow_contracts::events::Envelope;
use dataflow_contracts::{BatchId, BatchStatus};
use serde_json::json;

use crate::amqp::{TestBroker, collect, kinds_of, spawn_tweaked, wait_backlog};
use crate::common::rabbitmq_cluster::RabbitCluster;
use crate::helpers::{Backend, TestApp, csv};

/// Imports submitted before, during and after the kill.
const IMPORTS: usize = 40;
/// The kill comes after this many of them.
const KILL_AFTER: usize = 10;

/// An API process (it relays the outbox) and a worker, both listing the three nodes, both on
/// the first that answered (the first listed, unless it was slow to). That node, where their
/// links and the queues' first leaders are, is killed with `kill -9` while imports flow. Both processes move to the next node, the relay keeps
/// publishing with confirms to the surviving majority, the worker keeps consuming, and in
/// the end every batch completed once and every event of every batch reached a quorum queue
/// bound to the exchange.
async fn the_broker_survives_the_loss_of_one_node_of_three() {
    let Some(cluster) = RabbitCluster::start(3).await else {
        return;
    };
    let mut broker = TestBroker::on(cluster.url(0)).await;
    let url = cluster.amqp_url();
    // A long safety sweep: with a link up, batches move by the broker alone.
    let api = spawn_tweaked(Backend::Postgres, &broker, Roles::API, Some(&url), |c| {
        c.amqp.safety_sweep_ms = 60_000;
    })
    .await;
    let worker = api.sibling(Roles::WORKER).await;
    let first = wait_node(&api, |_| true).await;
    wait_node(&worker, |node| node == first).await;
    let lost = cluster.index_of(&first);
    // The test watches from a node it never stops.
    broker.view_through(cluster.url((lost + 1) % 3)).await;
    let tap = broker.tap().await;
    let (_, key) = api
        .client(json!({"rate_per_minute": 60_000, "rate_burst": 1_000}))
        .await;

    let mut batches = Vec::with_capacity(IMPORTS);
    for i in 0..IMPORTS {
        if i == KILL_AFTER {
            cluster.kill(lost);
        }
        let body = csv(&format!("n{i}"), 20);
        batches.push(api.import(&key, "text/csv", body).await.batch_id);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A surviving node: the next in the list, or the one after if the next refused them
    // while electing the queues' new leaders.
    for p in [&api, &worker] {
        wait_node(p, |node| node != first).await;
    }
    for id in &batches {
        let done = api.wait_for(&key, id, BatchStatus::Completed).await;
        assert_eq!(done.records_processed, 20, "{id}");
    }

    // After the failover, a batch moves by the broker: the safety sweep is a minute away
    // and the worker polls SQL only while it has no link.
    let stats = worker.worker_stats();
    let delivered = stats.deliveries.load(std::sync::atomic::Ordering::Relaxed);
    let last = api
        .import(&key, "text/csv", csv("after", 20))
        .await
        .batch_id;
    api.wait_for(&key, &last, BatchStatus::Completed).await;
    assert!(stats.deliveries.load(std::sync::atomic::Ordering::Relaxed) > delivered);
    batches.push(last);

    // Every event of every batch, once each by its id (a publish whose confirm died with
    // the node is sent again under the same id), in lifecycle order.
    let events = collect(&broker, &tap, |got| {
        batches.iter().all(|id| distinct(got, id).len() >= 3)
    })
    .await;
    for id in &batches {
        assert_eq!(
            distinct(&events, id),
            ["BatchCreated", "BatchReady", "BatchCompleted"],
            "{id}"
        );
        assert_eq!(api.completions(id).await, 1, "one completion for {id}");
    }
    // The moves are counted by node (both processes share this test's metrics recorder).
    let metrics = api.ops_text("/metrics").await;
    let links = |node: &str| {
        metrics
            .lines()
            .filter(|l| l.starts_with(&format!("dataflow_amqp_links_total{{node=\"{node}\"}}")))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    assert!(links(&first) >= 2.0, "{metrics}");
    let others: f64 = (0..3)
        .filter(|&i| i != lost)
        .map(|i| links(&cluster.endpoint(i)))
        .sum();
    assert!(others >= 2.0, "{metrics}");
    // Every outbox row was marked, which happens only on the broker's confirm.
    wait_backlog(&api, 0).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    while broker.depth(&broker.names.ready_queue).await > 0 {
        assert!(Instant::now() < deadline, "batch.ready never drained");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(broker.depth(&broker.names.dead_letter_queue).await, 0);
    worker.stop().await;
    api.stop().await;
}
register!(the_broker_survives_the_loss_of_one_node_of_three);

/// A batch's event kinds in order, each event id counted once.
fn distinct(events: &[Envelope], batch: &BatchId) -> Vec<&'static str> {
    let mut seen = HashSet::new();
    let once: Vec<Envelope> = events
        .iter()
        .filter(|e| seen.insert(e.id.clone()))
        .cloned()
        .collect();
    kinds_of(&once, batch)
}

/// Waits (up to 30 s) until the process's `/readyz` says its link is up to a node that
/// `wanted` accepts, and returns that node.
async fn wait_node(p: &TestApp, wanted: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = p.ops_json("/readyz").await;
        if let Some(node) = r["events"]["node"].as_str().filter(|n| wanted(n))
            && r["events"]["mode"] == "broker"
        {
            return node.to_owned();
        }
        assert!(Instant::now() < deadline, "never on the node wanted: {r}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

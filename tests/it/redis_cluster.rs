//! The Redis tier on a Redis Cluster of three masters that each test starts from the
//! machine's own `redis-server` (see `common/redis_cluster.rs`): the same checks as on one
//! Redis (shared limits, invalidations across processes, dedup, lock-out, sessions, the
//! fleet, the job queue and its reaper), keys spread over the masters, no key without a TTL
//! on any node, and the job queue carried through a master's failover.

use crate::common::harness::register;
use std::collections::BTreeSet;
use std::time::Duration;

use dataflow::Roles;
use dataflow_contracts::BatchStatus;
use dataflow_contracts::http::Readiness;
use dataflow_contracts::jobs::{JobKind, JobStatus};
use dataflow_platform::Config;
use dataflow_platform::config::{RedisQueue, Secret};
use dataflow_platform::ledger::jobs::JobFilter;
use serde_json::json;

use crate::common::ports::free_ports;
use crate::common::process::dataflow_command;
use crate::common::redis_cluster::{RedisCluster, urls};
use crate::helpers::{Backend, TestApp, csv};
use crate::jobs::{
    a_dead_workers_job_runs_again, fast_jobs, nothing_is_left_in_redis, quick_reaping,
    run_the_walk, wait_jobs,
};
use crate::redis::{
    assert_no_immortal_keys, changes_reach_the_other_process, concurrent_repeats_make_one_import,
    rate_limit_is_shared,
};
use crate::sinks::{SmtpSink, WebhookReceiver};

/// Two API processes and a worker on three masters: every part of the Redis tier works as on
/// one Redis, its keys land on more than one master, and none lacks a TTL on any node.
async fn the_redis_tier_runs_on_a_three_master_cluster() {
    let Some(cluster) = RedisCluster::start(3, 0).await else {
        return;
    };
    let smtp = SmtpSink::start().await;
    let hooks = WebhookReceiver::start(200).await;
    let Some(a) = TestApp::spawn_on_cluster(Backend::Postgres, Roles::ALL, cluster.urls(), |c| {
        fast_jobs(c, &smtp);
        c.api.cache_l1_ttl_ms = 60_000;
        c.api.auth_max_failures = 5;
        c.api.trust_forwarded_for = true;
        c.api.max_concurrent_imports_per_client = 64;
    })
    .await
    else {
        return;
    };
    let other = a.sibling(Roles::API).await;
    let backends = &a.app.as_ref().unwrap().backends;
    assert!(backends.redis.as_ref().unwrap().is_cluster());

    rate_limit_is_shared(&a, &other).await;
    changes_reach_the_other_process(&a, &other).await;
    let (_, key) = a.client(json!({"rate_burst": 200})).await;
    concurrent_repeats_make_one_import(&a, &key, &csv("c", 20)).await;
    failures_lock_out_across_processes(&a, &other, &key).await;
    run_the_walk(&a, &smtp, &hooks).await;
    nothing_is_left_in_redis(&a).await;

    let (token, _) = backends
        .sessions
        .create("ada", "127.0.0.1", Duration::from_secs(60))
        .await
        .unwrap();
    let found = backends.sessions.find(&token, None).await.unwrap();
    assert_eq!(found.map(|s| s.operator).as_deref(), Some("ada"));
    backends.sessions.destroy(&token).await.unwrap();
    assert!(
        backends
            .sessions
            .find(&token, None)
            .await
            .unwrap()
            .is_none()
    );

    let workers = backends.fleet.list().await.unwrap();
    assert_eq!(workers.len(), 1, "the fleet lists the worker: {workers:?}");

    let prefix = a.config.redis_prefix.clone();
    let mut masters_holding_keys = 0;
    for mut master in cluster.master_connections().await {
        let (_, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(0)
            .arg("MATCH")
            .arg(format!("{prefix}:*"))
            .arg("COUNT")
            .arg(100_000)
            .query_async(&mut master)
            .await
            .unwrap();
        masters_holding_keys += usize::from(!keys.is_empty());
    }
    assert!(
        masters_holding_keys >= 2,
        "keys should spread over the masters ({masters_holding_keys} of 3 hold some)"
    );
    assert_no_immortal_keys(&a).await;
    other.stop().await;
    a.stop().await;
}
register!(the_redis_tier_runs_on_a_three_master_cluster);

/// Five failures from one address, counted by two processes together, lock the address
/// out on both; the key's owner elsewhere is not locked out.
async fn failures_lock_out_across_processes(a: &TestApp, other: &TestApp, key: &str) {
    let guess = format!("{}x", &key[..key.len() - 1]);
    let from = |t: &TestApp, ip: &str, key: &str| {
        t.http
            .get(t.url("/v1/batches"))
            .bearer_auth(key)
            .header("x-forwarded-for", ip)
            .send()
    };
    for i in 0..5 {
        let t = if i % 2 == 0 { a } else { other };
        let resp = from(t, "10.9.9.9", &guess).await.unwrap();
        assert_eq!(resp.status(), 401, "failure {i}");
    }
    for t in [a, other] {
        let resp = from(t, "10.9.9.9", &guess).await.unwrap();
        assert_eq!(
            resp.status(),
            429,
            "the address is locked out on every process"
        );
        let resp = from(t, "10.9.9.10", key).await.unwrap();
        assert_eq!(resp.status(), 200, "another address is not");
    }
}

/// The reaper's script finds a dead worker's messages on a cluster, where every key it uses
/// is named by the caller and shares the kind's hash tag.
async fn a_dead_workers_jobs_are_taken_back_on_a_cluster() {
    let Some(cluster) = RedisCluster::start(3, 0).await else {
        return;
    };
    let smtp = SmtpSink::start().await;
    let hooks = WebhookReceiver::start(200).await;
    let Some(api) = TestApp::spawn_on_cluster(Backend::Sqlite, Roles::API, cluster.urls(), |c| {
        quick_reaping(c, &smtp)
    })
    .await
    else {
        return;
    };
    a_dead_workers_job_runs_again(&api, &hooks).await;
    api.stop().await;
}
register!(a_dead_workers_jobs_are_taken_back_on_a_cluster);

/// Three masters with a replica each. While imports flow, every replica takes over its
/// master (`CLUSTER FAILOVER`, one after another): every batch completes and every webhook
/// job is done, none lost and none dead.
async fn the_job_queue_survives_a_failover_of_every_master() {
    let Some(cluster) = RedisCluster::start(3, 1).await else {
        return;
    };
    let smtp = SmtpSink::start().await;
    let hooks = WebhookReceiver::start(200).await;
    let Some(t) = TestApp::spawn_on_cluster(Backend::Postgres, Roles::ALL, cluster.urls(), |c| {
        fast_jobs(c, &smtp)
    })
    .await
    else {
        return;
    };
    let (_, key) = t.client(json!({"webhook_url": hooks.url()})).await;
    let mut batches = Vec::new();
    for replica in cluster.replica_ports() {
        for i in 0..5 {
            let body = csv(&format!("f{replica}-{i}"), 3);
            batches.push(t.import(&key, "text/csv", body).await.batch_id);
        }
        cluster.fail_over(replica).await;
    }
    for batch in &batches {
        t.wait_for(&key, batch, BatchStatus::Completed).await;
    }
    // Every event of every batch is a webhook job: all done, each delivered.
    let filter = JobFilter {
        kind: Some(JobKind::Webhook),
        ..JobFilter::default()
    };
    let jobs: BTreeSet<String> =
        t.db.list_jobs(&filter, None, 1_000)
            .await
            .unwrap()
            .items
            .iter()
            .map(|j| j.id.to_string())
            .collect();
    assert!(jobs.len() >= batches.len(), "{} webhook jobs", jobs.len());
    wait_jobs(&t, "kind=webhook", jobs.len(), JobStatus::Done).await;
    let delivered: BTreeSet<String> = hooks
        .wait_until("every webhook", |h| {
            h.iter()
                .map(|h| h.header("webhook-id"))
                .collect::<BTreeSet<_>>()
                .len()
                >= jobs.len()
        })
        .await
        .iter()
        .map(|h| h.header("webhook-id").to_owned())
        .collect();
    assert_eq!(delivered, jobs);
    t.stop().await;
}
register!(the_job_queue_survives_a_failover_of_every_master);

/// A process started while its cluster is down starts on its fallbacks (`/readyz` says
/// Redis is down), then uses the cluster once it is up: Redis is reported up and the
/// Redis tier carries an import (its rate-limit key lands in the cluster).
async fn a_process_started_before_its_cluster_joins_it_when_it_comes() {
    let ports = free_ports(3);
    let Some(t) =
        TestApp::spawn_on_cluster(Backend::Sqlite, Roles::ALL, urls(&ports), |_| {}).await
    else {
        return;
    };
    let redis_state = async || -> String {
        let resp = t.http.get(t.url("/readyz")).send().await.unwrap();
        assert_eq!(
            resp.status(),
            200,
            "the ledger answers, so the process is ready"
        );
        resp.json::<Readiness>().await.unwrap().redis
    };
    assert_eq!(redis_state().await, "down");
    let Some(_cluster) = RedisCluster::start_on(ports, 3).await else {
        return;
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while redis_state().await != "up" {
        assert!(
            std::time::Instant::now() < deadline,
            "the process never reached the cluster"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (_, key) = t.client(json!({})).await;
    let import = t.import(&key, "text/csv", csv("up", 3)).await;
    t.wait_for(&key, &import.batch_id, BatchStatus::Completed)
        .await;
    let redis = t.app.as_ref().unwrap().backends.redis.clone().unwrap();
    let keys = redis.keys_with_prefix().await.unwrap();
    assert!(keys.iter().any(|k| k.contains(":rl:")), "{keys:?}");
    t.stop().await;
}
register!(a_process_started_before_its_cluster_joins_it_when_it_comes);

/// apalis-redis cannot run on a cluster: a `dataflow serve` so configured refuses to start
/// and says why, before it connects to anything.
fn apalis_redis_on_a_cluster_is_refused_at_start() {
    let dir = std::env::temp_dir().join(format!(
        "dataflow-test-{}",
        ulid::Ulid::new().to_string().to_lowercase()
    ));
    let mut config = Config {
        data_dir: dir.clone(),
        redis_cluster_urls: vec![Secret::new("redis://127.0.0.1:7000/".to_owned())],
        ..Config::default()
    };
    config.jobs.redis_queue = RedisQueue::ApalisRedis;
    config.jobs.redis_working_set = 1_000;
    let log = dir.join("refused.log");
    std::fs::create_dir_all(&dir).unwrap();
    let status = dataflow_command(
        &config,
        "serve",
        "refused",
        Some(std::fs::File::create(&log).unwrap()),
    )
    .status()
    .unwrap();
    let said = std::fs::read_to_string(&log).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!status.success(), "it started: {said}");
    assert!(
        said.contains("apalis-redis") && said.contains("Redis Cluster"),
        "{said}"
    );
}
register!(sync apalis_redis_on_a_cluster_is_refused_at_start);

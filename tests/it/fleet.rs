//! The worker fleet registry: workers appear with their identity and load, a drained
//! worker stops by itself and leaves, and a killed one vanishes once its heartbeat expires.
//! In the ledger without Redis, in Redis with it.

use crate::common::harness::register;
use std::time::{Duration, Instant};

use dataflow::Roles;
use dataflow::cli::ops::{self, WorkersCmd};
use dataflow_contracts::http::WorkerInfo;
use reqwest::Method;

use crate::helpers::{Backend, TestApp};

async fn workers(t: &TestApp) -> Vec<WorkerInfo> {
    let resp = t.admin_send(Method::GET, "/admin/workers").await;
    assert_eq!(resp.status(), 200);
    resp.json().await.unwrap()
}

/// Waits (up to `secs`) until the registry satisfies `pred`.
async fn wait_workers(
    t: &TestApp,
    secs: u64,
    what: &str,
    pred: impl Fn(&[WorkerInfo]) -> bool,
) -> Vec<WorkerInfo> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let ws = workers(t).await;
        if pred(&ws) {
            return ws;
        }
        assert!(Instant::now() < deadline, "{what}: {ws:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn register_drain_and_leave(api: TestApp) {
    let mut first = api.sibling(Roles::WORKER).await;
    let second = api.sibling(Roles::WORKER).await;
    let ids = [first.worker_id(), second.worker_id()];
    let listed = wait_workers(&api, 10, "both workers listed", |ws| {
        ids.iter().all(|id| ws.iter().any(|w| &w.id == id))
    })
    .await;
    for w in &listed {
        assert_eq!(w.pid, std::process::id());
        assert_eq!(w.version, env!("CARGO_PKG_VERSION"));
        assert!(!w.host.is_empty() && !w.draining, "{w:?}");
    }

    let drain = format!("/admin/workers/{}/drain", ids[0]);
    assert_eq!(api.admin_send(Method::POST, &drain).await.status(), 202);
    // Nobody stops it but the drain request.
    let app = first.app.take().unwrap();
    tokio::time::timeout(Duration::from_secs(20), app.wait())
        .await
        .expect("the drained worker stopped by itself");
    let left = workers(&api).await;
    assert!(!left.iter().any(|w| w.id == ids[0]), "{left:?}");
    assert!(left.iter().any(|w| w.id == ids[1]), "{left:?}");
    let unknown = api
        .admin_send(Method::POST, "/admin/workers/nobody-1-abcdef/drain")
        .await;
    assert_eq!(unknown.status(), 404);

    // A worker process killed outright leaves no entry behind once its heartbeat expires.
    let mut child = api.spawn_worker_process("fleet-worker", None);
    let pid = child.id();
    wait_workers(&api, 20, "the child process listed", |ws| {
        ws.iter().any(|w| w.pid == pid)
    })
    .await;
    child.kill().unwrap();
    child.wait().unwrap();
    let killed = Instant::now();
    wait_workers(&api, 15, "the killed process gone", |ws| {
        !ws.iter().any(|w| w.pid == pid)
    })
    .await;
    eprintln!(
        "a killed worker left the registry after {:?}",
        killed.elapsed()
    );

    // The CLI does the same: list, then drain and wait until the worker is gone.
    ops::workers(&api.config, WorkersCmd::List).await.unwrap();
    let drain = WorkersCmd::Drain {
        worker_id: ids[1].clone(),
        wait: true,
    };
    tokio::time::timeout(Duration::from_secs(20), ops::workers(&api.config, drain))
        .await
        .expect("drained within 20 s")
        .unwrap();
    let mut second = second;
    let app = second.app.take().unwrap();
    tokio::time::timeout(Duration::from_secs(20), app.wait())
        .await
        .expect("the second worker stopped by itself");
    assert!(workers(&api).await.is_empty());
    api.stop().await;
}

async fn workers_register_drain_and_leave_in_the_ledger() {
    let Some(api) = TestApp::spawn_with(Backend::Sqlite, Roles::API, |_| {}).await else {
        return;
    };
    register_drain_and_leave(api).await;
}
register!(workers_register_drain_and_leave_in_the_ledger);

async fn workers_register_drain_and_leave_in_redis() {
    let Some(api) = TestApp::spawn_redis(Backend::Sqlite, Roles::API, None, |_| {}).await else {
        return;
    };
    register_drain_and_leave(api).await;
}
register!(workers_register_drain_and_leave_in_redis);

/// A worker process killed with `kill -9` mid-batch: the leader learns from the registry
/// that it is gone and takes its batch back then, not a whole lease later (the lease here
/// is a minute). The takeover spends no attempt.
async fn a_killed_workers_batch_is_taken_back_before_its_lease_lapses(api: TestApp) {
    let (_, key) = api
        .client(serde_json::json!({"rate_per_minute": 60000, "rate_burst": 1000}))
        .await;
    let imp = api
        .import(&key, "text/csv", crate::helpers::csv("gone", 20_000))
        .await;
    let mut child = api.spawn_worker_process("doomed", None);
    let started = Instant::now();
    while api.batch(&key, &imp.batch_id).await.records_processed == 0 {
        assert!(started.elapsed() < Duration::from_secs(30), "never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let killed = Instant::now();
    let successor = api.sibling(Roles::WORKER).await;
    let done = api
        .wait_for(
            &key,
            &imp.batch_id,
            dataflow_contracts::BatchStatus::Completed,
        )
        .await;
    let took = killed.elapsed();
    eprintln!("kill -9 mid-batch -> completed by a successor {took:?} later (lease 60 s)");
    assert!(took < Duration::from_secs(30), "{took:?}");
    assert_eq!((done.attempts, done.takeovers), (1, 1), "{done:?}");
    assert_eq!(done.records_processed, 20_000);
    successor.stop().await;
    api.stop().await;
}

fn long_lease(c: &mut dataflow_platform::Config) {
    c.worker.lease_secs = 60;
    c.worker.chunk_size = 50;
}

async fn a_killed_workers_batch_is_taken_back_early_with_the_registry_in_the_ledger() {
    let Some(api) = TestApp::spawn_with(Backend::Postgres, Roles::API, long_lease).await else {
        return;
    };
    a_killed_workers_batch_is_taken_back_before_its_lease_lapses(api).await;
}
register!(a_killed_workers_batch_is_taken_back_early_with_the_registry_in_the_ledger);

async fn a_killed_workers_batch_is_taken_back_early_with_the_registry_in_redis() {
    let Some(api) = TestApp::spawn_redis(Backend::Postgres, Roles::API, None, long_lease).await
    else {
        return;
    };
    let redis = api.app.as_ref().unwrap().backends.redis.clone().unwrap();
    a_killed_workers_batch_is_taken_back_before_its_lease_lapses(api).await;
    redis.delete_all_under_prefix().await.unwrap();
}
register!(a_killed_workers_batch_is_taken_back_early_with_the_registry_in_redis);

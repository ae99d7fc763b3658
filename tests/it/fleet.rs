//! The worker fleet registry: workers appear with their identity and load, a drained
//! worker stops by itself and leaves, and a killed one vanishes once its heartbeat expires.
//! In the ledger without Redis, in Redis with it.

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_register_drain_and_leave_in_the_ledger() {
    let Some(api) = TestApp::spawn_with(Backend::Sqlite, Roles::API, |_| {}).await else {
        return;
    };
    register_drain_and_leave(api).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_register_drain_and_leave_in_redis() {
    let Some(api) = TestApp::spawn_redis(Backend::Sqlite, Roles::API, None, |_| {}).await else {
        return;
    };
    register_drain_and_leave(api).await;
}

//! The worker: racing workers, the fence, resuming from a checkpoint, poison batches.

use crate::common::harness::register;
use std::sync::atomic::Ordering;

use dataflow::Roles;
use dataflow_contracts::BatchStatus;
use dataflow_platform::Error;
use dataflow_worker::{Outcome, Step, Worker};
use reqwest::Method;
use serde_json::json;

use crate::helpers::{Backend, TestApp, backend_tests, csv, replace_payload, signal};

backend_tests!(
    racing_workers_never_double_complete,
    a_worker_that_lost_its_lease_cannot_commit,
    an_abandoned_batch_resumes_from_its_checkpoint,
    a_poison_batch_goes_dead_while_others_flow,
    shutdown_releases_in_flight_batches,
    a_batch_whose_workers_keep_dying_goes_dead,
    a_budget_of_one_chunk_slows_batches_but_never_stalls_them,
);

/// An API-only process, plus workers the test drives itself.
async fn api_only(b: Backend) -> Option<TestApp> {
    TestApp::spawn_with(b, Roles::API, |_| {}).await
}

fn worker(t: &TestApp) -> Worker {
    t.worker()
}

async fn expire_leases(t: &TestApp) {
    sqlx::query("UPDATE batches SET lease_expires_at = 0 WHERE status = 'processing'")
        .execute(t.db.pool())
        .await
        .unwrap();
}

async fn racing_workers_never_double_complete(b: Backend) {
    let Some(t) = api_only(b).await else { return };
    let (_, key) = t.client(json!({"rate_burst": 100})).await;
    let mut batches = Vec::new();
    for i in 0..12 {
        batches.push(
            t.import(&key, "text/csv", csv(&format!("r{i}"), 25))
                .await
                .batch_id,
        );
    }
    let (w1, w2) = (worker(&t), worker(&t));
    let drain = |w: Worker| async move {
        let mut completed = 0;
        while let Some(outcome) = w.try_process_one().await.unwrap() {
            assert!(matches!(outcome, Outcome::Completed(_)), "{outcome:?}");
            completed += 1;
        }
        completed
    };
    let (a, b2) = tokio::join!(drain(w1), drain(w2));
    assert_eq!(a + b2, 12);
    for id in &batches {
        let view = t.batch(&key, id).await;
        assert_eq!(
            (view.status, view.records_written, view.attempts),
            (BatchStatus::Completed, 25, 1)
        );
        let completions = t.completions(id).await;
        assert_eq!(completions, 1, "batch {id}");
    }
    let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM records")
        .fetch_one(t.db.pool())
        .await
        .unwrap();
    assert_eq!(rows, 12 * 25);
    t.stop().await;
}

async fn a_worker_that_lost_its_lease_cannot_commit(b: Backend) {
    let Some(t) = api_only(b).await else { return };
    let (_, key) = t.client(json!({})).await;
    let imp = t.import(&key, "text/csv", csv("f", 35)).await;
    let (slow, fast) = (worker(&t), worker(&t));

    let lease = slow.claim_next().await.unwrap().expect("a ready batch");
    let mut stale = slow.start(lease).await.unwrap();
    assert!(matches!(
        slow.step(&mut stale).await.unwrap(),
        Step::Chunk(_)
    ));
    // The slow worker stalls past its lease; another takes the batch over and finishes it.
    expire_leases(&t).await;
    let takeover = fast
        .claim_next()
        .await
        .unwrap()
        .expect("expired lease is claimable");
    assert_eq!(takeover.epoch, stale.lease.epoch + 1);
    assert_eq!(
        takeover.checkpoint, 10,
        "the successor resumes after the committed chunk"
    );
    assert!(matches!(
        fast.process(takeover, &Default::default()).await,
        Outcome::Completed(_)
    ));

    // The stale holder wakes up: its chunk write and its completion are both refused.
    let refused = slow.step(&mut stale).await.unwrap_err();
    assert!(
        matches!(refused, Error::FenceRejected { .. }),
        "{refused:?}"
    );
    let completion = t.db.complete_batch(&stale.lease).await.unwrap_err();
    assert!(
        matches!(completion, Error::FenceRejected { .. }),
        "{completion:?}"
    );
    let view = t.batch(&key, &imp.batch_id).await;
    assert_eq!(
        (view.status, view.records_processed, view.records_written),
        (BatchStatus::Completed, 35, 35)
    );
    let completions = t.completions(&imp.batch_id).await;
    assert_eq!(completions, 1);

    // The same through the full processing path counts the rejection.
    let imp2 = t.import(&key, "text/csv", csv("g", 35)).await;
    let lease = slow.claim_next().await.unwrap().unwrap();
    expire_leases(&t).await;
    let thief = fast.claim_next().await.unwrap().unwrap();
    assert_eq!(
        slow.process(lease, &Default::default()).await,
        Outcome::LeaseLost
    );
    assert!(
        slow.stats().fence_rejections.load(Ordering::Relaxed) >= 1,
        "the fence must have refused a write"
    );
    assert!(matches!(
        fast.process(thief, &Default::default()).await,
        Outcome::Completed(_)
    ));
    assert_eq!(t.batch(&key, &imp2.batch_id).await.records_written, 35);
    t.stop().await;
}

async fn an_abandoned_batch_resumes_from_its_checkpoint(b: Backend) {
    let Some(t) = api_only(b).await else { return };
    let (_, key) = t.client(json!({})).await;
    let imp = t.import(&key, "text/csv", csv("c", 35)).await;
    let first = worker(&t);
    let lease = first.claim_next().await.unwrap().unwrap();
    let mut run = first.start(lease).await.unwrap();
    first.step(&mut run).await.unwrap();
    first.step(&mut run).await.unwrap();
    drop(run); // the worker dies here
    assert_eq!(t.batch(&key, &imp.batch_id).await.records_processed, 20);

    expire_leases(&t).await;
    let second = worker(&t);
    let lease = second.claim_next().await.unwrap().unwrap();
    assert_eq!(
        (lease.checkpoint, lease.attempts, lease.takeovers),
        (20, 1, 1),
        "a takeover resumes the attempt, it does not spend another"
    );
    // Only the 15 unprocessed records are left: a chunk of 10, then the last 5 with the
    // completion.
    let mut run = second.start(lease).await.unwrap();
    assert!(matches!(
        second.step(&mut run).await.unwrap(),
        Step::Chunk(c) if c.written == 10
    ));
    assert!(matches!(
        second.step(&mut run).await.unwrap(),
        Step::Completed(_)
    ));
    let view = t.batch(&key, &imp.batch_id).await;
    assert_eq!(
        (
            view.records_written,
            view.records_unchanged,
            view.records_processed
        ),
        (35, 0, 35)
    );
    t.stop().await;
}

async fn a_poison_batch_goes_dead_while_others_flow(b: Backend) {
    let Some(t) = TestApp::spawn_with(b, Roles::ALL, |c| c.worker.max_attempts = 3).await else {
        return;
    };
    let (_, key) = t.client(json!({"rate_burst": 100})).await;
    // Accepted, then its stored payload is corrupted before any worker may touch it (it
    // waits for approval): it can never be processed.
    let (_, held_key) = t.client(json!({"approval_required": true})).await;
    let poison = t
        .import(&held_key, "application/x-ndjson", "{\"id\":1}\n")
        .await;
    replace_payload(&t.db, &poison.batch_id, b"{\"id\":1}\n[not json").await;
    let approve = format!("/admin/batches/{}/approve", poison.batch_id);
    assert_eq!(
        t.admin(Method::POST, &approve)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let mut others = Vec::new();
    for i in 0..5 {
        others.push(
            t.import(&key, "text/csv", csv(&format!("ok{}", i + 1), 20))
                .await
                .batch_id,
        );
    }
    let dead = t
        .wait_for(&held_key, &poison.batch_id, BatchStatus::Dead)
        .await;
    assert!(
        dead.last_error
            .as_deref()
            .unwrap_or("")
            .contains("unreadable"),
        "{dead:?}"
    );
    for id in &others {
        t.wait_for(&key, id, BatchStatus::Completed).await;
    }
    let kinds: Vec<&str> =
        t.db.batch_events(poison.batch_id.as_str())
            .await
            .unwrap()
            .iter()
            .map(|e| e.event.kind())
            .collect::<Vec<_>>();
    assert_eq!(kinds.last(), Some(&"BatchDead"));

    // An operator retries it: it is ready again, fails again, and is dead again.
    let retried = t
        .admin(
            Method::POST,
            &format!("/admin/batches/{}/retry", poison.batch_id),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(retried.status(), 200);
    t.wait_for(&held_key, &poison.batch_id, BatchStatus::Dead)
        .await;

    t.stop().await;
}

async fn shutdown_releases_in_flight_batches(b: Backend) {
    let Some(t) = api_only(b).await else { return };
    let (_, key) = t.client(json!({})).await;
    let imp = t.import(&key, "text/csv", csv("s", 35)).await;
    let w = worker(&t);
    let lease = w.claim_next().await.unwrap().unwrap();
    let release = tokio_util::sync::CancellationToken::new();
    release.cancel();
    assert_eq!(w.process(lease, &release).await, Outcome::Released);
    let view = t.batch(&key, &imp.batch_id).await;
    assert_eq!(
        (view.status, view.attempts),
        (BatchStatus::Ready, 0),
        "a released batch keeps its attempt"
    );
    assert!(matches!(
        w.try_process_one().await.unwrap(),
        Some(Outcome::Completed(_))
    ));
    t.stop().await;
}

async fn a_batch_whose_workers_keep_dying_goes_dead(b: Backend) {
    let Some(t) = TestApp::spawn_with(b, Roles::API, |c| c.worker.max_takeovers = 2).await else {
        return;
    };
    let (_, key) = t.client(json!({})).await;
    let imp = t.import(&key, "text/csv", csv("crash", 5)).await;
    // Workers in a row claim it and die before finishing (their leases run out): the first
    // claim is its attempt, each later one a takeover, which spends no attempt.
    for takeovers in 0..=2 {
        let lease = worker(&t).claim_next().await.unwrap().expect("claimable");
        assert_eq!((lease.attempts, lease.takeovers), (1, takeovers));
        expire_leases(&t).await;
    }
    // The next takeover is one past the cap: the claim buries it instead of trying again.
    assert_eq!(
        worker(&t).try_process_one().await.unwrap(),
        Some(Outcome::Dead)
    );
    let view = t.batch(&key, &imp.batch_id).await;
    assert_eq!(
        (view.status, view.attempts, view.takeovers),
        (BatchStatus::Dead, 1, 3)
    );
    assert!(view.last_error.unwrap().contains("taken over 3 times"));
    assert_eq!(
        worker(&t).try_process_one().await.unwrap(),
        None,
        "dead batches are not claimed"
    );
    t.stop().await;
}

/// A real worker process stopped (`SIGSTOP`) inside a chunk transaction on PostgreSQL
/// cannot stall its batch: the server ends its idle session within a third of a lease, its
/// locks go with it, and a successor completes the batch while it is still stopped. The
/// takeover spends no attempt; the stopped worker, resumed, writes nothing.
async fn a_stopped_worker_cannot_stall_its_batch() {
    // A six-second lease: sessions idle in a transaction end after two seconds, which a
    // live worker on a busy machine does not reach between its statements.
    let Some(api) = TestApp::spawn_with(Backend::Postgres, Roles::API, |c| {
        c.worker.lease_secs = 6;
        c.worker.chunk_size = 50;
    })
    .await
    else {
        return;
    };
    let (_, key) = api
        .client(json!({"rate_per_minute": 60000, "rate_burst": 1000}))
        .await;
    let imp = api.import(&key, "text/csv", csv("frozen", 20_000)).await;
    let log = std::fs::File::create(api.config.data_dir.join("frozen.log")).unwrap();
    let mut child = api.spawn_worker_process("frozen", Some(log));
    let started = std::time::Instant::now();
    while api.batch(&key, &imp.batch_id).await.records_processed == 0 {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(30),
            "never started"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // Stop it at a moment when it is inside a transaction (holding the batch row's lock).
    let in_transaction = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND state = 'idle in transaction' AND pid <> pg_backend_pid()",
        )
        .fetch_one(api.db.pool())
        .await
        .unwrap()
    };
    let mut tries = 0;
    loop {
        signal(&child, "STOP");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        if in_transaction().await > 0 {
            break;
        }
        tries += 1;
        assert!(tries < 200, "never caught the worker inside a transaction");
        signal(&child, "CONT");
        tokio::time::sleep(std::time::Duration::from_millis(7)).await;
    }
    let stopped = std::time::Instant::now();

    let successor = api.sibling(Roles::WORKER).await;
    let done = api
        .wait_for(&key, &imp.batch_id, BatchStatus::Completed)
        .await;
    let took = stopped.elapsed();
    eprintln!(
        "a worker stopped inside a transaction: its batch completed {took:?} later by a successor, {} attempt(s), {} takeover(s)",
        done.attempts, done.takeovers
    );
    assert_eq!(child.try_wait().unwrap(), None, "still stopped, not dead");
    assert_eq!((done.attempts, done.takeovers), (1, 1), "{done:?}");
    assert_eq!(
        (
            done.records_processed,
            done.records_written + done.records_unchanged
        ),
        (20_000, 20_000)
    );

    // Resumed, the stopped worker finds its session gone and the fence closed.
    signal(&child, "CONT");
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    assert_eq!(api.completions(&imp.batch_id).await, 1);
    assert_eq!(
        api.batch(&key, &imp.batch_id).await.status,
        BatchStatus::Completed
    );
    child.kill().unwrap();
    child.wait().unwrap();
    successor.stop().await;
    api.stop().await;
}
register!(a_stopped_worker_cannot_stall_its_batch);

/// With room for one chunk in all, eight slots of big and small batches still drain:
/// a batch never waits for room while it holds a chunk it has not committed, and a bundle
/// takes its members' room at once.
async fn a_budget_of_one_chunk_slows_batches_but_never_stalls_them(b: Backend) {
    let Some(t) = TestApp::spawn_with(b, Roles::ALL, |c| {
        c.worker.records_in_memory = c.worker.chunk_size;
        c.worker.concurrency = 8;
        c.worker.poll_interval_ms = 50;
    })
    .await
    else {
        return;
    };
    let (_, key) = t.client(json!({"rate_burst": 100})).await;
    let mut batches = Vec::new();
    for i in 0..6 {
        let body = csv(&format!("big{i}"), 35);
        batches.push((t.import(&key, "text/csv", body).await.batch_id, 35));
    }
    for i in 0..16 {
        let body = csv(&format!("small{i}"), 2);
        batches.push((t.import(&key, "text/csv", body).await.batch_id, 2));
    }
    for (id, records) in &batches {
        let view = t.wait_for(&key, id, BatchStatus::Completed).await;
        assert_eq!(view.records_written, *records, "batch {id}");
    }
    t.stop().await;
}

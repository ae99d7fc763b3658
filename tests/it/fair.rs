//! The fair share: claims go round the clients with work (weighted), each client's cap on
//! batches in flight holds across the fleet, and priorities order a client's own batches.

use std::time::{Duration, Instant};

use dataflow::Roles;
use dataflow_contracts::http::{ErrorBody, ImportView};
use dataflow_contracts::{BatchId, BatchStatus, ClientId, Priority};
use dataflow_platform::ledger::{Bundle, Claimable};
use serde_json::json;

use crate::helpers::{Backend, TestApp, backend_tests, csv};

backend_tests!(
    a_flooding_client_does_not_hold_back_another,
    weights_share_the_claims,
    priority_orders_a_clients_own_batches,
    concurrent_claims_never_exceed_a_clients_cap,
    the_cap_holds_across_worker_processes,
    a_workers_last_slot_waits_for_a_client_with_nothing_in_progress,
);

/// An API-only process: the test claims, or runs worker processes of its own.
async fn api_only(b: Backend) -> Option<TestApp> {
    TestApp::spawn_with(b, Roles::API, |_| {}).await
}

/// `n` imports of `records` records each, tagged `tag` so no two are the same payload.
async fn submit_many(t: &TestApp, key: &str, tag: &str, n: usize, records: usize) -> Vec<BatchId> {
    let mut ids = Vec::new();
    for i in 0..n {
        let body = csv(&format!("{tag}{i}"), records);
        ids.push(t.import(key, "text/csv", body).await.batch_id);
    }
    ids
}

/// The clients of the next `n` claims of one worker, in claim order (nothing is processed:
/// each claim holds its lease).
async fn claim_order(t: &TestApp, n: usize) -> Vec<ClientId> {
    let w = t.worker();
    let mut order = Vec::new();
    for _ in 0..n {
        let lease = w.claim_next().await.unwrap().expect("a batch to claim");
        order.push(lease.client_id);
    }
    order
}

/// Batches of `client` under a lease right now.
async fn in_flight(t: &TestApp, client: &ClientId) -> i64 {
    sqlx::query_scalar(
        "SELECT COUNT(*) FROM batches WHERE client_id = $1 AND status = 'processing'",
    )
    .bind(client.as_str())
    .fetch_one(t.db.pool())
    .await
    .unwrap()
}

async fn a_flooding_client_does_not_hold_back_another(b: Backend) {
    let Some(t) = api_only(b).await else { return };
    let (noisy, noisy_key) = t.client(json!({})).await;
    let (quiet, quiet_key) = t.client(json!({})).await;
    submit_many(&t, &noisy_key, "noisy", 8, 5).await;
    submit_many(&t, &quiet_key, "quiet", 2, 5).await;
    let order = claim_order(&t, 10).await;
    let quiet_turns: Vec<usize> = (0..order.len()).filter(|&i| order[i] == quiet).collect();
    // Strictly by age the quiet client would wait behind all eight: its turns come every
    // other claim instead.
    assert_eq!(quiet_turns.len(), 2);
    assert!(quiet_turns[1] <= 3, "claims went {order:?}, noisy {noisy}");
    t.stop().await;
}

async fn weights_share_the_claims(b: Backend) {
    let Some(t) = api_only(b).await else { return };
    let (heavy, heavy_key) = t.client(json!({"weight": 3})).await;
    let (_, light_key) = t.client(json!({})).await;
    submit_many(&t, &heavy_key, "heavy", 8, 5).await;
    submit_many(&t, &light_key, "light", 8, 5).await;
    let order = claim_order(&t, 8).await;
    let heavy_turns = order.iter().filter(|c| **c == heavy).count();
    // Weight 3 against 1: six of eight (round robin alone would give four).
    assert!((5..=6).contains(&heavy_turns), "claims went {order:?}");
    t.stop().await;
}

async fn priority_orders_a_clients_own_batches(b: Backend) {
    let Some(t) = api_only(b).await else { return };
    let (_, key) = t.client(json!({})).await;
    let mut submitted = Vec::new();
    for (tag, header) in [
        ("low", Some("low")),
        ("normal", None),
        ("high", Some("HIGH")),
    ] {
        let mut req = t.submit(&key, "text/csv", csv(tag, 3));
        if let Some(h) = header {
            req = req.header("priority", h);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 202);
        let view: ImportView = resp.json().await.unwrap();
        submitted.push(view);
    }
    let priorities: Vec<Priority> = submitted.iter().map(|v| v.priority).collect();
    assert_eq!(
        priorities,
        [Priority::Low, Priority::Normal, Priority::High]
    );
    let shown = t.batch(&key, &submitted[2].batch_id).await;
    assert_eq!(shown.priority, Priority::High);
    let import = t
        .get(&key, &format!("/v1/imports/{}", submitted[0].id))
        .await;
    assert_eq!(
        import.json::<ImportView>().await.unwrap().priority,
        Priority::Low
    );

    let bad = t
        .submit(&key, "text/csv", csv("bad", 3))
        .header("priority", "urgent")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    let body: ErrorBody = bad.json().await.unwrap();
    assert_eq!(body.code, "invalid_priority");
    assert!(body.detail.contains("urgent"), "{}", body.detail);

    // Highest priority first, whatever the order they came in.
    let w = t.worker();
    let mut claimed = Vec::new();
    while let Some(lease) = w.claim_next().await.unwrap() {
        claimed.push(lease.batch_id);
    }
    let expected: Vec<BatchId> = [2, 1, 0]
        .iter()
        .map(|&i| submitted[i].batch_id.clone())
        .collect();
    assert_eq!(claimed, expected, "only three were stored");
    t.stop().await;
}

async fn concurrent_claims_never_exceed_a_clients_cap(b: Backend) {
    let Some(t) = api_only(b).await else { return };
    let (capped, capped_key) = t.client(json!({"max_concurrent_batches": 2})).await;
    let (free, free_key) = t.client(json!({})).await;
    submit_many(&t, &capped_key, "capped", 6, 5).await;
    submit_many(&t, &free_key, "free", 3, 5).await;
    // Eight claimers at once, each as a worker of its own would claim.
    let claims = (0..8).map(|i| {
        let db = t.db.clone();
        async move {
            db.claim_next(
                &format!("claimer-{i}"),
                60_000,
                Claimable::AnyClient,
                Bundle::ONE,
            )
            .await
            .unwrap()
        }
    });
    let leases: Vec<_> = futures::future::join_all(claims)
        .await
        .into_iter()
        .flatten()
        .collect();
    assert_eq!(in_flight(&t, &capped).await, 2, "the cap holds");
    assert_eq!(in_flight(&t, &free).await, 3);
    assert_eq!(leases.len(), 5);
    // A named claim (a wake-up naming the batch) is refused at the cap too.
    let waiting: String = sqlx::query_scalar(
        "SELECT id FROM batches WHERE client_id = $1 AND status = 'ready' LIMIT 1",
    )
    .bind(capped.as_str())
    .fetch_one(t.db.pool())
    .await
    .unwrap();
    let waiting: BatchId = waiting.parse().unwrap();
    assert!(
        t.db.claim(&waiting, "named", 60_000, Claimable::AnyClient, Bundle::ONE)
            .await
            .unwrap()
            .is_empty()
    );
    // A place frees up when a lease ends: the next claim takes it.
    let done = leases.iter().find(|l| l.client_id == capped).unwrap();
    t.db.release_batch(done).await.unwrap();
    // A bundle too stops at the cap: of the capped client's small batches, one fits.
    let room = Bundle {
        records: 100,
        batches: 10,
    };
    let next =
        t.db.claim_next("after", 60_000, Claimable::AnyClient, room)
            .await
            .unwrap();
    assert_eq!(next.len(), 1);
    assert_eq!(next[0].client_id, capped);
    assert!(
        t.db.claim_next("full", 60_000, Claimable::AnyClient, room)
            .await
            .unwrap()
            .is_empty()
    );
    t.stop().await;
}

async fn the_cap_holds_across_worker_processes(b: Backend) {
    let Some(t) = api_only(b).await else { return };
    let (capped, capped_key) = t.client(json!({"max_concurrent_batches": 2})).await;
    let (_, free_key) = t.client(json!({})).await;
    let batches = submit_many(&t, &capped_key, "capped", 8, 600).await;
    let others = submit_many(&t, &free_key, "free", 2, 600).await;
    // Two worker processes with eight slots each: sixteen places for ten batches.
    let mut workers = [
        t.spawn_worker_process("fair-1", None),
        t.spawn_worker_process("fair-2", None),
    ];
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut most = 0;
    loop {
        most = most.max(in_flight(&t, &capped).await);
        let left: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM batches WHERE status <> 'completed'")
                .fetch_one(t.db.pool())
                .await
                .unwrap();
        if left == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{left} batches never completed");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for w in &mut workers {
        w.kill().unwrap();
        w.wait().unwrap();
    }
    assert_eq!(
        most, 2,
        "at most two at once, and the fleet used both places"
    );
    for id in &batches {
        assert_eq!(
            t.batch(&capped_key, id).await.status,
            BatchStatus::Completed
        );
    }
    for id in &others {
        assert_eq!(t.batch(&free_key, id).await.status, BatchStatus::Completed);
    }
    t.stop().await;
}

async fn a_workers_last_slot_waits_for_a_client_with_nothing_in_progress(b: Backend) {
    // Two slots, one of them reserved (the default `worker.reserved_slots`).
    let Some(t) = TestApp::spawn_with(b, Roles::API, |c| c.worker.concurrency = 2).await else {
        return;
    };
    let (busy, busy_key) = t.client(json!({})).await;
    let (_, late_key) = t.client(json!({})).await;
    let waiting = submit_many(&t, &busy_key, "busy", 3, 5).await;
    let w = t.worker();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let first = w.slot(&shutdown).await.unwrap();
    // The first slot serves anyone: the busy client's first two batches, a bundle of ten
    // records (the test's chunk size).
    let leases = w.claim_for(&first).await.unwrap();
    assert_eq!(leases.len(), 2);
    assert!(leases.iter().all(|l| l.client_id == busy));
    // The last free slot: the busy client has a batch waiting but others in progress
    // already, by the fair share's choice and by name (as a worker that locks first claims).
    let last = w.slot(&shutdown).await.unwrap();
    assert!(w.claim_for(&last).await.unwrap().is_empty());
    assert!(
        t.db.claim(
            &waiting[2],
            "named",
            60_000,
            Claimable::IdleClients,
            Bundle::ONE
        )
        .await
        .unwrap()
        .is_empty()
    );
    assert_eq!(in_flight(&t, &busy).await, 2);
    // A client arriving now takes it at once, though it came last.
    let late = submit_many(&t, &late_key, "late", 1, 5).await;
    let leases = w.claim_for(&last).await.unwrap();
    assert_eq!(
        leases.iter().map(|l| &l.batch_id).collect::<Vec<_>>(),
        [&late[0]]
    );
    // Nobody else is idle: the ledger turns a reserved claim away.
    assert!(
        t.db.claim_next("another", 60_000, Claimable::IdleClients, Bundle::ONE)
            .await
            .unwrap()
            .is_empty()
    );
    t.stop().await;
}

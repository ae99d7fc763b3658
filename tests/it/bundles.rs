//! Bundles: a claim takes a client's small batches together, within one chunk's records,
//! and the worker completes them in one commit, each with its own fence, counts and
//! events; a batch of a bundle that fails fails alone.

use std::sync::atomic::Ordering;

use dataflow::Roles;
use dataflow_contracts::{BatchId, BatchStatus, ClientId};
use dataflow_worker::{Outcome, Worker};
use serde_json::json;

use crate::helpers::{Backend, TestApp, backend_tests, csv, replace_payload};

backend_tests!(
    small_batches_are_claimed_and_completed_together,
    a_bundles_batch_that_fails_fails_alone,
    writers_that_share_keys_take_them_in_one_order,
);

/// Claims with `w` until nothing is left: each claim's batches, by client, in claim order.
async fn claim_all(w: &Worker) -> Vec<(ClientId, Vec<BatchId>)> {
    let shutdown = tokio_util::sync::CancellationToken::new();
    let mut claims = Vec::new();
    loop {
        let slot = w.slot(&shutdown).await.unwrap();
        let leases = w.claim_for(&slot).await.unwrap();
        let Some(first) = leases.first() else {
            return claims;
        };
        let client = first.client_id.clone();
        assert!(
            leases.iter().all(|l| l.client_id == client),
            "a bundle is one client's"
        );
        // In the order they were accepted (the client's own, here).
        let mut ids: Vec<BatchId> = leases.iter().map(|l| l.batch_id.clone()).collect();
        ids.sort();
        let outcomes = w.process_all(leases, &Default::default()).await;
        assert!(
            outcomes.iter().all(|o| matches!(o, Outcome::Completed(_))),
            "{outcomes:?}"
        );
        claims.push((client, ids));
        assert!(claims.len() < 20, "claims without end: {claims:?}");
    }
}

async fn small_batches_are_claimed_and_completed_together(b: Backend) {
    // The test chunk size, 10 records, bounds a bundle.
    let Some(t) = TestApp::spawn_with(b, Roles::API, |_| {}).await else {
        return;
    };
    let (a, a_key) = t.client(json!({})).await;
    let (_, b_key) = t.client(json!({})).await;
    let mut a_batches = Vec::new();
    for i in 0..4 {
        let body = csv(&format!("a{i}"), 3);
        a_batches.push(t.import(&a_key, "text/csv", body).await.batch_id);
    }
    let big = t.import(&b_key, "text/csv", csv("b", 25)).await.batch_id;

    let w = t.worker();
    let claims = claim_all(&w).await;
    // A's first three (nine records) go together and move A on by three turns: B's batch,
    // too big for any bundle, goes alone before A's fourth.
    let a_claims: Vec<&Vec<BatchId>> = claims
        .iter()
        .filter(|(c, _)| *c == a)
        .map(|(_, ids)| ids)
        .collect();
    assert_eq!(
        a_claims,
        [&a_batches[..3].to_vec(), &a_batches[3..].to_vec()],
        "{claims:?}"
    );
    assert_eq!(
        claims.last(),
        Some(&(a.clone(), vec![a_batches[3].clone()])),
        "{claims:?}"
    );

    // The three went through one shared commit; the batches alone did not.
    assert_eq!(w.stats().bundled.load(Ordering::Relaxed), 3);
    // Each its own counts, event and report, and its own stretch of the changes feed.
    for id in &a_batches {
        let view = t.batch(&a_key, id).await;
        assert_eq!(
            (view.status, view.records_written, view.attempts),
            (BatchStatus::Completed, 3, 1)
        );
        assert_eq!(t.completions(id).await, 1, "batch {id}");
    }
    let mut ranges: Vec<(i64, i64)> = Vec::new();
    for id in &a_batches {
        let range: (i64, i64) =
            sqlx::query_as("SELECT changes_first, changes_last FROM batches WHERE id = $1")
                .bind(id.as_str())
                .fetch_one(t.db.pool())
                .await
                .unwrap();
        ranges.push(range);
    }
    ranges.sort_unstable();
    assert_eq!(
        ranges,
        [(1, 3), (4, 6), (7, 9), (10, 12)],
        "each batch's three changes, one after another"
    );
    assert_eq!(t.batch(&b_key, &big).await.records_written, 25);
    let reports: i64 =
        sqlx::query_scalar("SELECT COUNT(DISTINCT batch_id) FROM jobs WHERE kind = 'report'")
            .fetch_one(t.db.pool())
            .await
            .unwrap();
    assert_eq!(reports, 5);
    let records: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM records")
        .fetch_one(t.db.pool())
        .await
        .unwrap();
    assert_eq!(records, 4 * 3 + 25);
    t.stop().await;
}

async fn a_bundles_batch_that_fails_fails_alone(b: Backend) {
    let Some(t) = TestApp::spawn_with(b, Roles::API, |_| {}).await else {
        return;
    };
    let (_, key) = t.client(json!({})).await;
    let mut batches = Vec::new();
    for i in 0..3 {
        let body = csv(&format!("m{i}"), 3);
        batches.push(t.import(&key, "text/csv", body).await.batch_id);
    }
    // The third's file turns out longer than one chunk: its batch still counts three
    // records, so the claim bundles it with the others.
    replace_payload(&t.db, &batches[2], csv("long", 25).as_bytes()).await;
    let w = t.worker();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let slot = w.slot(&shutdown).await.unwrap();
    let leases = w.claim_for(&slot).await.unwrap();
    assert_eq!(leases.len(), 3);
    // The second's lease lapses and another worker takes it over.
    sqlx::query("UPDATE batches SET lease_expires_at = 0 WHERE id = $1")
        .bind(batches[1].as_str())
        .execute(t.db.pool())
        .await
        .unwrap();
    let thief = t.worker().claim_batch(&batches[1]).await.unwrap();
    assert!(matches!(thief, dataflow_worker::BatchClaim::Taken(_)));

    let outcomes = w.process_all(leases, &Default::default()).await;
    let completed = outcomes
        .iter()
        .filter(|o| matches!(o, Outcome::Completed(_)))
        .count();
    assert_eq!(completed, 2, "{outcomes:?}");
    assert!(outcomes.contains(&Outcome::LeaseLost), "{outcomes:?}");
    assert_eq!(
        w.stats().bundled.load(Ordering::Relaxed),
        0,
        "the shared commit failed, and each batch went alone"
    );

    let first = t.batch(&key, &batches[0]).await;
    assert_eq!(
        (first.status, first.records_written),
        (BatchStatus::Completed, 3)
    );
    let taken = t.batch(&key, &batches[1]).await;
    assert_eq!(
        (taken.status, taken.records_written),
        (BatchStatus::Processing, 0),
        "the thief holds it, and the stale holder wrote nothing"
    );
    let long = t.batch(&key, &batches[2]).await;
    assert_eq!(
        (long.status, long.records_written),
        (BatchStatus::Completed, 25)
    );
    for (id, n) in [(&batches[0], 1), (&batches[1], 0), (&batches[2], 1)] {
        assert_eq!(t.completions(id).await, n, "batch {id}");
    }
    t.stop().await;
}

/// Upserts `client`'s record `key` in `tx`, as another writer of the client would.
async fn upsert(tx: &mut sqlx::Transaction<'_, sqlx::Any>, client: &ClientId, key: &str) {
    sqlx::query(
        "INSERT INTO records (client_id, record_key, data, checksum, batch_id, accepted_seq, \
                              updated_at) VALUES ($1, $2, '{}', 'other', 'bat_other', 0, 0) \
         ON CONFLICT (client_id, record_key) DO UPDATE SET checksum = excluded.checksum",
    )
    .bind(client.as_str())
    .bind(key)
    .execute(&mut **tx)
    .await
    .expect("the other writer is not aborted");
}

async fn writers_that_share_keys_take_them_in_one_order(b: Backend) {
    let Some(t) = TestApp::spawn_with(b, Roles::API, |_| {}).await else {
        return;
    };
    let (client, key) = t.client(json!({})).await;
    // The bundle's first batch has the later key, its second the earlier one.
    for body in ["id,name\nk2,first\n", "id,name\nk1,second\n"] {
        t.import(&key, "text/csv", body.to_owned()).await;
    }
    let w = t.worker();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let slot = w.slot(&shutdown).await.unwrap();
    let leases = w.claim_for(&slot).await.unwrap();
    assert_eq!(leases.len(), 2);

    // Another writer of the client holds k1 while the bundle commits...
    let mut other = t.db.pool().begin().await.unwrap();
    upsert(&mut other, &client, "k1").await;
    let bundle = tokio::spawn({
        let w = w.clone();
        async move { w.process_all(leases, &Default::default()).await }
    });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    // ...then takes k2. Had the bundle locked its first batch's k2 before waiting for k1,
    // PostgreSQL would abort one of the two as a deadlock.
    upsert(&mut other, &client, "k2").await;
    other.commit().await.unwrap();
    let outcomes = bundle.await.unwrap();
    assert!(
        outcomes.iter().all(|o| matches!(o, Outcome::Completed(_))),
        "{outcomes:?}"
    );
    assert_eq!(
        w.stats().bundled.load(Ordering::Relaxed),
        2,
        "completed together"
    );
    t.stop().await;
}

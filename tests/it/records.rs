//! Records never go back in time: a record holds the values of the newest import that
//! contains it, by the order the imports were accepted in, whatever order their batches run.

use dataflow::Roles;
use dataflow_contracts::http::BatchView;
use dataflow_contracts::{BatchId, BatchStatus, ClientId};
use dataflow_worker::{BatchClaim, Outcome, Step, Worker};
use reqwest::Method;
use serde_json::json;

use crate::helpers::{Backend, TestApp, backend_tests};
use crate::ui::Ui;

backend_tests!(
    an_older_import_retried_after_a_newer_one_leaves_the_newer_values,
    overlapping_batches_processed_at_once_keep_the_newer_values,
    a_newer_import_with_the_same_values_still_outranks_an_older_one,
);

/// A CSV of records `k-{i}` for `keys`, each named `{tag} {i}`.
fn rows(tag: &str, keys: std::ops::Range<usize>) -> String {
    let mut s = String::from("id,name\n");
    for i in keys {
        s.push_str(&format!("k-{i},{tag} {i}\n"));
    }
    s
}

/// The `name` stored for record `k-{i}` of `client`.
async fn name_of(t: &TestApp, client: &ClientId, i: usize) -> String {
    let rec = t.db.get_record(client, &format!("k-{i}")).await.unwrap();
    rec.expect("stored").data.value()["name"]
        .as_str()
        .unwrap()
        .to_owned()
}

async fn claim(w: &Worker, id: &BatchId) -> dataflow_platform::ledger::Lease {
    match w.claim_batch(id).await.unwrap() {
        BatchClaim::Taken(mut leases) => leases.remove(0),
        other => panic!("batch {id} not taken: {other:?}"),
    }
}

async fn process(w: &Worker, id: &BatchId) {
    let outcome = w.process(claim(w, id).await, &Default::default()).await;
    assert!(matches!(outcome, Outcome::Completed(_)), "{outcome:?}");
}

/// (written, unchanged, superseded, failed) of a completed batch.
fn counts(b: &BatchView) -> (u64, u64, u64, u64) {
    assert_eq!(b.status, BatchStatus::Completed, "{b:?}");
    (
        b.records_written,
        b.records_unchanged,
        b.records_superseded,
        b.records_failed,
    )
}

/// The older import's batch dies before it writes anything; the newer one completes; an
/// operator retries the older one, which then runs last: the newer values stay.
async fn an_older_import_retried_after_a_newer_one_leaves_the_newer_values(b: Backend) {
    let Some(t) = TestApp::spawn_with(b, Roles::API, |_| {}).await else {
        return;
    };
    let (client, key) = t.client(json!({})).await;
    let old = t
        .import(&key, "text/csv", rows("old", 0..25))
        .await
        .batch_id;
    let new = t
        .import(&key, "text/csv", rows("new", 5..30))
        .await
        .batch_id;
    let w = t.worker();

    let doomed = claim(&w, &old).await;
    t.db.fail_batch(&doomed, "the worker's disk filled up", 0, 0)
        .await
        .unwrap();
    process(&w, &new).await;
    let retried = t
        .admin_send(Method::POST, &format!("/admin/batches/{old}/retry"))
        .await;
    assert_eq!(retried.status(), 200);
    process(&w, &old).await;

    for i in 0..5 {
        assert_eq!(
            name_of(&t, &client, i).await,
            format!("old {i}"),
            "only in the old import"
        );
    }
    for i in 5..30 {
        assert_eq!(name_of(&t, &client, i).await, format!("new {i}"), "k-{i}");
    }
    assert_eq!(counts(&t.batch(&key, &new).await), (25, 0, 0, 0));
    assert_eq!(
        counts(&t.batch(&key, &old).await),
        (5, 0, 20, 0),
        "the 20 records the newer import holds are superseded"
    );
    let report: serde_json::Value = t
        .get(&key, &format!("/v1/batches/{old}/report"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(report["batch"]["records_superseded"], 20, "{report}");
    let page = Ui::login(&t, "ann")
        .await
        .page(&format!("/ui/batches/{old}"))
        .await;
    assert!(page.contains("<dt>Superseded</dt><dd>20</dd>"), "{page}");
    t.stop().await;
}

/// Two batches with the same 30 keys, three chunks each, committed in turns: the older
/// one's first chunk goes first, the newer one's first after it; then the newer goes first.
async fn overlapping_batches_processed_at_once_keep_the_newer_values(b: Backend) {
    let Some(t) = TestApp::spawn_with(b, Roles::API, |_| {}).await else {
        return;
    };
    let (client, key) = t.client(json!({})).await;
    let old = t
        .import(&key, "text/csv", rows("old", 0..30))
        .await
        .batch_id;
    let new = t
        .import(&key, "text/csv", rows("new", 0..30))
        .await
        .batch_id;
    let (w_old, w_new) = (t.worker(), t.worker());
    let mut run_old = w_old.start(claim(&w_old, &old).await).await.unwrap();
    let mut run_new = w_new.start(claim(&w_new, &new).await).await.unwrap();

    assert!(matches!(
        w_old.step(&mut run_old).await.unwrap(),
        Step::Chunk(_)
    ));
    assert!(matches!(
        w_new.step(&mut run_new).await.unwrap(),
        Step::Chunk(_)
    ));
    for _ in 0..2 {
        w_new.step(&mut run_new).await.unwrap();
        w_old.step(&mut run_old).await.unwrap();
    }

    for i in 0..30 {
        assert_eq!(name_of(&t, &client, i).await, format!("new {i}"), "k-{i}");
    }
    assert_eq!(
        counts(&t.batch(&key, &new).await),
        (30, 0, 0, 0),
        "10 written over the older values, 20 new"
    );
    assert_eq!(counts(&t.batch(&key, &old).await), (10, 0, 20, 0));

    // And truly at once (on PostgreSQL each waits for the other's row locks): whichever
    // commits first, the newer values are the ones left.
    let old = t
        .import(&key, "text/csv", rows("older", 0..30))
        .await
        .batch_id;
    let new = t
        .import(&key, "text/csv", rows("newer", 0..30))
        .await
        .batch_id;
    tokio::join!(process(&w_old, &old), process(&w_new, &new));
    for i in 0..30 {
        assert_eq!(name_of(&t, &client, i).await, format!("newer {i}"), "k-{i}");
    }
    let (older, newer) = (t.batch(&key, &old).await, t.batch(&key, &new).await);
    assert_eq!(counts(&newer).2, 0, "nothing is newer than the newest");
    assert_eq!(
        older.records_written + older.records_superseded + newer.records_written,
        60,
        "each batch wrote or was superseded on every key: {older:?} {newer:?}"
    );
    t.stop().await;
}

/// A newer import that leaves a record unchanged still holds it: an import older than both,
/// run last, does not bring its own (different) values back.
async fn a_newer_import_with_the_same_values_still_outranks_an_older_one(b: Backend) {
    let Some(t) = TestApp::spawn_with(b, Roles::API, |_| {}).await else {
        return;
    };
    let (client, key) = t.client(json!({})).await;
    let first = t
        .import(&key, "text/csv", rows("blue", 0..3))
        .await
        .batch_id;
    let second = t.import(&key, "text/csv", rows("red", 0..3)).await.batch_id;
    // The first import's values again, and one record more (another payload, not a duplicate).
    let third = t
        .import(&key, "text/csv", rows("blue", 0..4))
        .await
        .batch_id;
    let w = t.worker();
    process(&w, &first).await;
    process(&w, &third).await;
    process(&w, &second).await;

    for i in 0..4 {
        assert_eq!(name_of(&t, &client, i).await, format!("blue {i}"), "k-{i}");
    }
    assert_eq!(counts(&t.batch(&key, &third).await), (1, 3, 0, 0));
    assert_eq!(counts(&t.batch(&key, &second).await), (0, 0, 3, 0));
    t.stop().await;
}

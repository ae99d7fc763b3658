//! Payload retention: the leader's upkeep deletes an ended batch's stored file once its
//! client's `payload_retention_secs` is over; the batch, its counts and its records stay,
//! a retry of a dead batch says why it cannot run, and `dataflow status` and the dashboard
//! show the storage each client still holds.

use std::time::Duration;

use dataflow::Roles;
use dataflow_contracts::http::{ErrorBody, RecordPage};
use dataflow_contracts::{BatchId, BatchStatus, ClientId};
use dataflow_platform::ledger::Db;
use dataflow_worker::jobs::upkeep;
use reqwest::Method;
use serde_json::json;

use crate::helpers::{Backend, TestApp, backend_tests, csv, replace_payload};
use crate::ui::Ui;

backend_tests!(
    an_ended_batchs_payload_goes_when_its_retention_is_over,
    a_dead_batch_whose_payload_expired_cannot_be_retried,
);

async fn parts_of(db: &Db, batch: &BatchId) -> i64 {
    sqlx::query_scalar(
        "SELECT COUNT(*) FROM payload_parts \
         WHERE payload_id = (SELECT payload_id FROM batches WHERE id = $1)",
    )
    .bind(batch.as_str())
    .fetch_one(db.pool())
    .await
    .unwrap()
}

/// The storage row of `client` in `dataflow status`, run as an operator would.
fn status_row(t: &TestApp, client: &ClientId) -> String {
    let out = crate::common::process::dataflow_command(&t.config, "status", "status", None)
        .stdout(std::process::Stdio::piped())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        stdout.contains("CLIENT") && stdout.contains("PAYLOADS") && stdout.contains("RECORDS"),
        "{stdout}"
    );
    stdout
        .lines()
        .find(|l| l.starts_with(client.as_str()))
        .unwrap_or_else(|| panic!("no storage row for {client}: {stdout}"))
        .to_owned()
}

/// The `data-…` storage figures of `client` on the dashboard's clients page.
async fn dashboard_storage(ui: &Ui<'_>, client: &ClientId) -> String {
    let page = ui.page("/ui/clients").await;
    let at = page
        .find(&format!("data-client=\"{client}\""))
        .unwrap_or_else(|| panic!("no row for {client}: {page}"));
    let row = &page[at..at + page[at..].find("</tr>").unwrap()];
    let from = row
        .find("data-payload-bytes")
        .unwrap_or_else(|| panic!("no storage in {row}"));
    row[from..from + row[from..].find('>').unwrap()].to_owned()
}

async fn an_ended_batchs_payload_goes_when_its_retention_is_over(b: Backend) {
    let Some(t) = TestApp::spawn_with(b, Roles::ALL, |_| {}).await else {
        return;
    };
    let (brief, brief_key) = t.client(json!({"payload_retention_secs": 1})).await;
    let (kept, kept_key) = t.client(json!({})).await;
    let body = csv("ret", 12);
    let gone = t
        .import(&brief_key, "text/csv", body.clone())
        .await
        .batch_id;
    let stays = t.import(&kept_key, "text/csv", body.clone()).await.batch_id;
    t.wait_for(&brief_key, &gone, BatchStatus::Completed).await;
    t.wait_for(&kept_key, &stays, BatchStatus::Completed).await;
    assert!(parts_of(&t.db, &gone).await > 0);

    tokio::time::sleep(Duration::from_millis(1_100)).await;
    upkeep::expire_stored(&t.db).await.unwrap();
    assert_eq!(parts_of(&t.db, &gone).await, 0, "its retention is over");
    assert!(
        parts_of(&t.db, &stays).await > 0,
        "the default retention (7 days) is not over"
    );
    // The next round has nothing left to delete for it.
    upkeep::expire_stored(&t.db).await.unwrap();

    // The batch, its counts and its records stay readable.
    let batch = t.batch(&brief_key, &gone).await;
    assert_eq!(batch.status, BatchStatus::Completed);
    assert_eq!((batch.records_processed, batch.records_failed), (12, 0));
    let page: RecordPage = t
        .get(&brief_key, "/v1/records?limit=100")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(page.items.len(), 12);

    // What each client holds, as the operator sees it.
    let storage = t.db.storage_by_client().await.unwrap();
    let of = |c: &ClientId| storage.iter().find(|s| &s.client_id == c).unwrap();
    assert_eq!((of(&brief).payload_bytes, of(&brief).records), (0, 12));
    assert_eq!(of(&kept).payload_bytes, body.len() as u64);
    // One client's storage (its dashboard page) is the same figure.
    assert_eq!(
        t.db.storage_of(&kept).await.unwrap().as_ref(),
        Some(of(&kept))
    );
    let brief_row = status_row(&t, &brief);
    assert!(brief_row.contains(" 0 B "), "{brief_row}");
    assert!(brief_row.trim_end().ends_with(" 12"), "{brief_row}");
    let kept_row = status_row(&t, &kept);
    assert!(
        kept_row.contains(&format!(" {} B ", body.len())),
        "{kept_row}"
    );
    let ui = Ui::login(&t, "ann").await;
    assert_eq!(
        dashboard_storage(&ui, &brief).await,
        r#"data-payload-bytes="0" data-upload-bytes="0" data-records="12""#
    );
    assert_eq!(
        dashboard_storage(&ui, &kept).await,
        format!(
            r#"data-payload-bytes="{}" data-upload-bytes="0" data-records="12""#,
            body.len()
        )
    );

    let metrics = t.ops_text("/metrics").await;
    assert!(
        metrics.contains("dataflow_payload_bytes_expired_total"),
        "{metrics}"
    );
    t.stop().await;
}

async fn a_dead_batch_whose_payload_expired_cannot_be_retried(b: Backend) {
    let Some(t) = TestApp::spawn_with(b, Roles::ALL, |c| c.worker.max_attempts = 1).await else {
        return;
    };
    let policy = json!({"approval_required": true, "payload_retention_secs": 1});
    let (_, key) = t.client(policy).await;
    // Accepted while it awaits approval, its stored file corrupted, then approved: it dies.
    let imported = t.import(&key, "application/x-ndjson", "{\"id\":1}\n").await;
    let id = imported.batch_id;
    replace_payload(&t.db, &id, b"{\"id\":1}\n[not json").await;
    let approve = format!("/admin/batches/{id}/approve");
    assert_eq!(t.admin_send(Method::POST, &approve).await.status(), 200);
    t.wait_for(&key, &id, BatchStatus::Dead).await;

    tokio::time::sleep(Duration::from_millis(1_100)).await;
    upkeep::expire_stored(&t.db).await.unwrap();
    assert_eq!(parts_of(&t.db, &id).await, 0);

    let retry = t
        .admin_send(Method::POST, &format!("/admin/batches/{id}/retry"))
        .await;
    assert_eq!(retry.status(), 409);
    let body: ErrorBody = retry.json().await.unwrap();
    assert!(body.detail.contains("retention"), "{body:?}");
    // It stays dead, with its last error, for the operator to discard.
    let batch = t.batch(&key, &id).await;
    assert_eq!(batch.status, BatchStatus::Dead);
    assert!(batch.last_error.is_some(), "{batch:?}");
    t.stop().await;
}

//! Submitting imports: formats, refusals, idempotency, dedup and tenant isolation.

use crate::common::harness::register;
use dataflow_contracts::BatchStatus;
use dataflow_contracts::http::{ErrorBody, ImportView, RecordErrorPage, RecordView};
use dataflow_contracts::{ImportFormat, Priority};
use dataflow_platform::ledger::{IdempotencyStart, NewImport, Payload, SubmitOutcome};
use serde_json::json;

use crate::helpers::{Backend, TestApp, backend_tests, csv};

backend_tests!(
    csv_and_ndjson_flow_end_to_end,
    bad_input_gets_a_4xx_and_stores_nothing,
    other_clients_see_404,
    idempotency_key_replays_conflicts_and_mismatches,
    identical_concurrent_submits_make_one_batch,
    more_connections_than_import_slots_wait_for_one,
    submits_that_meet_share_a_commit_and_keep_their_own_outcomes,
    a_file_accepted_before_is_its_duplicate_under_stricter_checks,
    daily_quota_is_enforced,
    batch_report_counts_and_defuses_formulas,
    a_large_report_streams_every_rejected_row_once,
    the_dedup_window_ends_and_a_huge_one_holds,
);

async fn count(t: &TestApp, table: &'static str) -> i64 {
    let sql = sqlx::AssertSqlSafe(format!("SELECT COUNT(*) FROM {table}"));
    sqlx::query_scalar(sql)
        .fetch_one(t.db.pool())
        .await
        .unwrap()
}

async fn csv_and_ndjson_flow_end_to_end(b: Backend) {
    let Some(t) = TestApp::spawn(b).await else {
        return;
    };
    let (_, key) = t.client(json!({"required_fields": ["email"]})).await;

    let body = "id,email,name\n1,a@x.io,Ann\n2,,Bob\n3,c@x.io,\"Cy, Jr.\"\n1,a2@x.io,Ann again\n";
    let imp = t.import(&key, "text/csv", body).await;
    assert_eq!(
        (imp.records, imp.status, imp.duplicate),
        (4, BatchStatus::Ready, false)
    );
    let done = t
        .wait_for(&key, &imp.batch_id, BatchStatus::Completed)
        .await;
    assert_eq!(
        (
            done.records_total,
            done.records_processed,
            done.records_failed
        ),
        (4, 4, 1)
    );
    assert_eq!(
        done.records_unchanged, 1,
        "the first of the two records with key 1 is superseded"
    );
    assert_eq!(
        done.records_written, 2,
        "key 1 appears twice in one chunk: the last one wins"
    );
    assert!(done.duration_ms.is_some() && done.completed_at.is_some());

    let rec: RecordView = t.get(&key, "/v1/records/1").await.json().await.unwrap();
    assert_eq!(
        rec.data.value(),
        json!({"id": "1", "email": "a2@x.io", "name": "Ann again"})
    );
    assert_eq!(rec.batch_id, imp.batch_id);
    let errors: RecordErrorPage = t
        .get(&key, &format!("/v1/batches/{}/errors", imp.batch_id))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(errors.items.len(), 1);
    assert_eq!(
        (errors.items[0].line, errors.items[0].code.as_str()),
        (3, "missing_field")
    );
    assert_eq!(errors.items[0].field.as_deref(), Some("email"));

    // NDJSON: one record changes, one is unchanged, one is new.
    let nd = "{\"id\":\"1\",\"email\":\"a2@x.io\",\"name\":\"Ann again\"}\n{\"id\":3,\"email\":\"new@x.io\",\"name\":\"Cy\"}\n{\"id\":\"4\",\"email\":\"d@x.io\",\"tags\":[\"a\"]}\n";
    let imp2 = t.import(&key, "application/x-ndjson", nd).await;
    let done2 = t
        .wait_for(&key, &imp2.batch_id, BatchStatus::Completed)
        .await;
    assert_eq!(
        (
            done2.records_written,
            done2.records_unchanged,
            done2.records_failed
        ),
        (2, 1, 0)
    );
    let rec3: RecordView = t.get(&key, "/v1/records/3").await.json().await.unwrap();
    assert_eq!(rec3.data.value()["email"], "new@x.io");
    assert_eq!(rec3.batch_id, imp2.batch_id);

    let got: ImportView = t
        .get(&key, &format!("/v1/imports/{}", imp2.id))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(got.status, BatchStatus::Completed);
    let page: serde_json::Value = t
        .get(&key, "/v1/batches?status=completed&limit=1")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        page["items"][0]["id"],
        imp2.batch_id.as_str(),
        "newest first"
    );
    let cursor = page["next_cursor"].as_str().unwrap();
    let next: serde_json::Value = t
        .get(
            &key,
            &format!("/v1/batches?status=completed&limit=1&cursor={cursor}"),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(next["items"][0]["id"], imp.batch_id.as_str());
    assert!(next["next_cursor"].is_null());

    let events = t.db.batch_events(imp.batch_id.as_str()).await.unwrap();
    let kinds: Vec<&str> = events.iter().map(|e| e.event.kind()).collect();
    assert_eq!(kinds, ["BatchCreated", "BatchReady", "BatchCompleted"]);
    t.stop().await;
}

async fn bad_input_gets_a_4xx_and_stores_nothing(b: Backend) {
    let Some(t) = TestApp::spawn(b).await else {
        return;
    };
    let (_, key) = t
        .client(json!({"max_payload_bytes": 2000, "max_records": 5, "required_fields": ["email"]}))
        .await;
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        (
            "text/csv",
            b"id,email\n1,a\n2\n".to_vec(),
            400,
            "ragged_row",
        ),
        (
            "text/csv",
            b"id,email\n1,\"open\n2,b\n".to_vec(),
            400,
            "unterminated_quote",
        ),
        (
            "text/csv",
            b"id,id\n1,2\n".to_vec(),
            400,
            "duplicate_header",
        ),
        (
            "text/csv",
            b"id,email\n1,\xff\n".to_vec(),
            400,
            "invalid_utf8",
        ),
        ("text/csv", b"id,email\n1,a\0\n".to_vec(), 400, "nul_byte"),
        ("text/csv", b"id,email\n".to_vec(), 400, "empty_import"),
        ("text/csv", b"".to_vec(), 400, "empty_body"),
        (
            "text/csv",
            b"id,name\n1,a\n".to_vec(),
            422,
            "missing_column",
        ),
        (
            "text/csv",
            csv("x", 6).replace("name", "email").into_bytes(),
            413,
            "too_many_records",
        ),
        ("text/csv", vec![b'a'; 3000], 413, "payload_too_large"),
        (
            "application/x-ndjson",
            b"{\"id\":1}\n[2]\n".to_vec(),
            400,
            "not_an_object",
        ),
        (
            "application/x-ndjson",
            b"{\"id\":1,\"n\":123456789012345678901234567890}\n".to_vec(),
            400,
            "number_out_of_range",
        ),
        (
            "application/x-ndjson",
            br#"{"id":"a\u0000"}"#.to_vec(),
            400,
            "nul_character",
        ),
        (
            "application/x-ndjson",
            format!("{{\"a\":{}}}", "[".repeat(1500)).into_bytes(),
            400,
            "invalid_json",
        ),
        (
            "application/json",
            b"{}".to_vec(),
            415,
            "unsupported_media_type",
        ),
        ("", b"id\n1\n".to_vec(), 415, "unsupported_media_type"),
    ];
    for (ct, body, status, code) in cases {
        let resp = t.submit(&key, ct, body).send().await.unwrap();
        assert_eq!(resp.status().as_u16(), status, "{code}");
        let err: ErrorBody = resp.json().await.unwrap();
        assert_eq!(err.code, code);
        assert!(!err.detail.is_empty());
    }
    let bad_key = t
        .submit(&key, "text/csv", "id,email\n1,a\n")
        .header("idempotency-key", "é")
        .send()
        .await
        .unwrap();
    assert_eq!(bad_key.status(), 400);
    let long_key = t
        .submit(&key, "text/csv", "id,email\n1,a\n")
        .header("idempotency-key", "k".repeat(300))
        .send()
        .await
        .unwrap();
    assert_eq!(long_key.status(), 400);
    for table in [
        "imports",
        "batches",
        "payload_parts",
        "uploads",
        "outbox",
        "import_checksums",
        "idempotency_keys",
    ] {
        assert_eq!(count(&t, table).await, 0, "{table} must stay empty");
    }
    // A body whose Content-Length lies (shorter than declared) is refused, not stored.
    let mut stream = tokio::net::TcpStream::connect(t.addr).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let req = format!(
        "POST /v1/imports HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nContent-Type: text/csv\r\nContent-Length: 500\r\n\r\nid,email\n1,a\n"
    );
    stream.write_all(req.as_bytes()).await.unwrap();
    stream.shutdown().await.unwrap();
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer).await;
    assert!(
        !answer.starts_with("HTTP/1.1 2"),
        "a truncated body must not be accepted: {answer}"
    );
    assert_eq!(count(&t, "imports").await, 0);
    assert_eq!(t.get(&key, "/v1/records/a%00b").await.status(), 404);
    let unknown = t.get(&key, "/v1/nope").await;
    assert_eq!(unknown.status(), 404);
    let bad_query = t.get(&key, "/v1/batches?limit=0").await;
    assert_eq!(bad_query.status(), 400);
    let bad_status = t.get(&key, "/v1/batches?status=zzz").await;
    assert_eq!(bad_status.status(), 400);
    t.stop().await;
}

async fn other_clients_see_404(b: Backend) {
    let Some(t) = TestApp::spawn(b).await else {
        return;
    };
    let (_, a) = t.client(json!({})).await;
    let (_, other) = t.client(json!({})).await;
    let imp = t.import(&a, "text/csv", csv("a", 3)).await;
    t.wait_for(&a, &imp.batch_id, BatchStatus::Completed).await;
    for path in [
        format!("/v1/imports/{}", imp.id),
        format!("/v1/batches/{}", imp.batch_id),
        format!("/v1/batches/{}/errors", imp.batch_id),
        "/v1/records/a-1".to_owned(),
        "/v1/batches/not-an-id".to_owned(),
    ] {
        assert_eq!(t.get(&other, &path).await.status(), 404, "{path}");
    }
    let mine: serde_json::Value = t.get(&other, "/v1/batches").await.json().await.unwrap();
    assert_eq!(mine["items"].as_array().unwrap().len(), 0);
    // The same payload from another client is its own import, not a duplicate.
    let theirs = t.import(&other, "text/csv", csv("a", 3)).await;
    assert_ne!(theirs.id, imp.id);
    t.stop().await;
}

async fn idempotency_key_replays_conflicts_and_mismatches(b: Backend) {
    let Some(t) = TestApp::spawn(b).await else {
        return;
    };
    let (client, key) = t.client(json!({"dedup_window_secs": 0})).await;
    let send = |body: String, idem: &str| {
        t.submit(&key, "text/csv", body)
            .header("idempotency-key", idem.to_owned())
            .send()
    };

    let first = send(csv("i", 2), "k-1").await.unwrap();
    assert_eq!(first.status(), 202);
    let first: ImportView = first.json().await.unwrap();
    let again = send(csv("i", 2), "k-1").await.unwrap();
    assert_eq!(again.status(), 202);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(
        again.headers()["location"],
        format!("/v1/batches/{}", first.batch_id).as_str()
    );
    assert_eq!(again.json::<ImportView>().await.unwrap(), first);
    assert_eq!(count(&t, "imports").await, 1);

    let other_body = send(csv("j", 2), "k-1").await.unwrap();
    assert_eq!(other_body.status(), 422);
    assert_eq!(
        other_body.json::<ErrorBody>().await.unwrap().code,
        "idempotency_key_reused"
    );

    // A first request still running (claimed the key, not finished): the second gets 409.
    let started =
        t.db.idempotency_start(
            &client,
            "k-2",
            &format!("csv:{}", sha(&csv("k", 1))),
            86_400_000,
            120_000,
        )
        .await
        .unwrap();
    let IdempotencyStart::Proceed(stale_claim) = started else {
        panic!("a fresh key is ours: {started:?}")
    };
    let busy = send(csv("k", 1), "k-2").await.unwrap();
    assert_eq!(busy.status(), 409);
    let retry_after: u64 = busy.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=120).contains(&retry_after), "{retry_after}");
    // Once that request is past its deadline (it can no longer be running), a retry takes
    // the key over.
    sqlx::query("UPDATE idempotency_keys SET locked_until = created_at WHERE idem_key = 'k-2'")
        .execute(t.db.pool())
        .await
        .unwrap();
    assert_eq!(send(csv("k", 1), "k-2").await.unwrap().status(), 202);
    // The slow first request finally tries to commit with its old claim: refused, nothing stored.
    let client_policy = t.db.get_client(&client).await.unwrap().unwrap().policy;
    let body = csv("slow", 1);
    let checksum = sha(&body);
    let slow = NewImport {
        client_id: &client,
        format: ImportFormat::Csv,
        payload: Payload::Inline(body.as_bytes()),
        bytes: body.len() as u64,
        records: 1,
        checksum: &checksum,
        dedup_key: &checksum,
        policy: &client_policy,
        schema_version: None,
        priority: Priority::Normal,
        idempotency: Some(&stale_claim),
        traceparent: None,
    };
    assert!(matches!(
        t.db.submit_import(&slow).await.unwrap(),
        SubmitOutcome::IdempotencyKeyLost
    ));
    assert_eq!(count(&t, "imports").await, 2);

    // A refused request does not burn its key.
    assert_eq!(
        send("id,id\n1,1\n".into(), "k-3").await.unwrap().status(),
        400
    );
    assert_eq!(send(csv("m", 1), "k-3").await.unwrap().status(), 202);
    assert_eq!(count(&t, "imports").await, 3);
    t.stop().await;
}

/// A request that dies between its `Idempotency-Key` claim and its commit (here: its
/// submit waits on a table lock past the request deadline, and the server gives up on it)
/// holds the key only until that deadline. Meanwhile a retry gets 409 with `Retry-After`;
/// after it, the retry goes through and the import is created once.
async fn a_key_whose_request_died_is_free_at_that_requests_deadline() {
    use sqlx::Connection;
    let Some(t) = TestApp::spawn_with(Backend::Postgres, dataflow::Roles::API, |c| {
        c.api.request_timeout_secs = 2;
    })
    .await
    else {
        return;
    };
    let (_, key) = t.client(json!({})).await;
    let send = || {
        t.submit(&key, "text/csv", csv("held", 3))
            .header("idempotency-key", "held-1")
            .send()
    };
    let mut blocker = sqlx::PgConnection::connect(&t.config.database_url())
        .await
        .unwrap();
    let mut hold = blocker.begin().await.unwrap();
    sqlx::query("LOCK TABLE imports IN EXCLUSIVE MODE")
        .execute(&mut *hold)
        .await
        .unwrap();

    let first = tokio::spawn(send());
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let busy = send().await.unwrap();
    assert_eq!(busy.status(), 409);
    let retry_after: u64 = busy.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2).contains(&retry_after), "{retry_after}");
    assert_eq!(
        busy.json::<ErrorBody>().await.unwrap().code,
        "idempotency_in_progress"
    );
    assert_eq!(first.await.unwrap().unwrap().status(), 408);
    hold.rollback().await.unwrap();

    // A retry that follows `Retry-After` goes through at the first request's deadline
    // (one that arrives within milliseconds of it may still be told to wait a second).
    let mut retried = send().await.unwrap();
    for _ in 0..2 {
        if retried.status() != 409 {
            break;
        }
        let secs: u64 = retried.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(secs <= 2, "{secs}");
        tokio::time::sleep(std::time::Duration::from_secs(secs)).await;
        retried = send().await.unwrap();
    }
    assert_eq!(retried.status(), 202, "{}", retried.text().await.unwrap());
    let replayed = send().await.unwrap();
    assert_eq!(replayed.status(), 202);
    assert_eq!(replayed.headers()["idempotent-replayed"], "true");
    assert_eq!(count(&t, "imports").await, 1);
    t.stop().await;
}
register!(a_key_whose_request_died_is_free_at_that_requests_deadline);

/// Slow clients cannot exhaust the server: a body that stops sending is answered 408 once
/// it has been idle for `api.body_idle_timeout_secs` (not at the whole-request deadline),
/// a body that keeps sending slowly is not cut, and connections past `api.max_connections`
/// wait to be accepted until a slot frees.
async fn slow_clients_are_bounded_in_time_and_in_connections() {
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Some(t) = TestApp::spawn_with(Backend::Sqlite, dataflow::Roles::API, |c| {
        c.api.body_idle_timeout_secs = 1;
        c.api.request_timeout_secs = 60;
        c.api.max_connections = 3;
    })
    .await
    else {
        return;
    };
    // No kept-alive connection of the test's own may hold a slot.
    let mut t = t;
    t.http = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let (_, key) = t.client(json!({})).await;
    let head = |len: usize| {
        format!(
            "POST /v1/imports HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\
             Content-Type: text/csv\r\nContent-Length: {len}\r\n\r\n"
        )
    };

    // Declares 1,000 bytes, sends 12 and stalls, the connection left open.
    let mut stalled = tokio::net::TcpStream::connect(t.addr).await.unwrap();
    stalled.write_all(head(1_000).as_bytes()).await.unwrap();
    stalled.write_all(b"id,name\n1,a\n").await.unwrap();
    let mut answer = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(10), stalled.read(&mut answer))
        .await
        .expect("answered long before the request deadline")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("body_idle_timeout"), "{answer}");

    // A body sent a piece at a time, each within the idle timeout, for longer than it.
    let body = "id,name\n1,a\n2,b\n3,c\n";
    let mut slow = tokio::net::TcpStream::connect(t.addr).await.unwrap();
    slow.write_all(head(body.len()).as_bytes()).await.unwrap();
    for piece in body.as_bytes().chunks(4) {
        tokio::time::sleep(Duration::from_millis(400)).await;
        slow.write_all(piece).await.unwrap();
    }
    let mut answer = vec![0u8; 1024];
    let n = slow.read(&mut answer).await.unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 202"), "{answer}");

    // Three connections that send nothing hold every slot: a fourth waits, then gets in
    // once one of them goes.
    drop((stalled, slow));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut idle = Vec::new();
    for _ in 0..3 {
        idle.push(tokio::net::TcpStream::connect(t.addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let waiting =
        tokio::time::timeout(Duration::from_secs(1), t.http.get(t.url("/healthz")).send());
    assert!(waiting.await.is_err(), "served past the connection bound");
    idle.pop();
    let served = tokio::time::timeout(Duration::from_secs(5), t.http.get(t.url("/healthz")).send())
        .await
        .expect("served once a slot freed")
        .unwrap();
    assert_eq!(served.status(), 200);
    t.stop().await;
}
register!(slow_clients_are_bounded_in_time_and_in_connections);

fn sha(s: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(s.as_bytes()))
}

async fn identical_concurrent_submits_make_one_batch(b: Backend) {
    let Some(t) = TestApp::spawn_with(b, dataflow::Roles::ALL, |c| {
        c.api.max_concurrent_imports_per_client = 64
    })
    .await
    else {
        return;
    };
    let (_, key) = t.client(json!({"rate_burst": 100})).await;
    let body = csv("dup", 50);
    let answers =
        futures::future::join_all((0..50).map(|_| t.submit(&key, "text/csv", body.clone()).send()))
            .await;
    let mut created = 0;
    let mut ids = std::collections::HashSet::new();
    for resp in answers {
        let resp = resp.unwrap();
        let status = resp.status().as_u16();
        let view: ImportView = resp.json().await.unwrap();
        match status {
            202 => created += 1,
            200 => assert!(view.duplicate),
            other => panic!("unexpected status {other}"),
        }
        ids.insert(view.id);
    }
    assert_eq!(created, 1);
    assert_eq!(ids.len(), 1, "every answer names the same import");
    assert_eq!(count(&t, "batches").await, 1);
    t.stop().await;
}

/// A producer sending more imports at once than its slots gets every one through at the
/// slots' pace: a submit waits for a slot to free instead of being refused at once.
async fn more_connections_than_import_slots_wait_for_one(b: Backend) {
    let Some(t) = TestApp::spawn_with(b, dataflow::Roles::ALL, |c| {
        c.api.max_concurrent_imports_per_client = 2
    })
    .await
    else {
        return;
    };
    let (_, key) = t.client(json!({"rate_burst": 100})).await;
    let answers = futures::future::join_all(
        (0..40).map(|i| t.submit(&key, "text/csv", csv(&format!("c{i}"), 20)).send()),
    )
    .await;
    for resp in answers {
        let resp = resp.unwrap();
        assert_eq!(resp.status(), 202, "{}", resp.text().await.unwrap());
    }
    assert_eq!(count(&t, "batches").await, 40);
    t.stop().await;
}

/// Plain submits that arrive together share a transaction (the group commit), and each
/// answer is its own: every new file its own import, one import for a key sent several
/// times (the others its duplicates), and an import that cannot be stored (its client does
/// not exist) fails alone, without failing the others of its group.
async fn submits_that_meet_share_a_commit_and_keep_their_own_outcomes(b: Backend) {
    let Some(t) = TestApp::spawn(b).await else {
        return;
    };
    let (client, _) = t.client(json!({})).await;
    let policy = t.db.get_client(&client).await.unwrap().unwrap().policy;
    let nobody = dataflow_contracts::ClientId::generate();
    // 30 new files, one file 6 times, 5 files of a client that does not exist.
    let mut sent: Vec<(String, &dataflow_contracts::ClientId)> = (0..30)
        .map(|i| (csv(&format!("g{i}"), 3), &client))
        .collect();
    sent.extend((0..6).map(|_| (csv("same", 3), &client)));
    sent.extend((0..5).map(|i| (csv(&format!("n{i}"), 3), &nobody)));
    let checksums: Vec<String> = sent.iter().map(|(body, _)| sha(body)).collect();
    let imports: Vec<NewImport<'_>> = sent
        .iter()
        .zip(&checksums)
        .map(|((body, client), checksum)| NewImport {
            client_id: client,
            format: ImportFormat::Csv,
            payload: Payload::Inline(body.as_bytes()),
            bytes: body.len() as u64,
            records: 3,
            checksum,
            dedup_key: checksum,
            policy: &policy,
            schema_version: None,
            priority: Priority::Normal,
            idempotency: None,
            traceparent: None,
        })
        .collect();
    let outcomes =
        futures::future::join_all(imports.iter().map(|new| t.db.submit_import(new))).await;

    let mut same = std::collections::HashSet::new();
    let mut created_same = 0;
    for (i, outcome) in outcomes.into_iter().enumerate() {
        match (i, outcome) {
            (0..30, Ok(SubmitOutcome::Created(view))) => {
                assert_eq!(
                    view.checksum, checksums[i],
                    "import {i} answered another's view"
                )
            }
            (30..36, Ok(SubmitOutcome::Created(view))) => {
                created_same += 1;
                same.insert(view.id);
            }
            (30..36, Ok(SubmitOutcome::Duplicate(view))) => {
                same.insert(view.id);
            }
            (36.., Err(_)) => {}
            (i, Ok(_)) => panic!("import {i}: unexpected outcome"),
            (i, Err(e)) => panic!("import {i} failed: {e}"),
        }
    }
    assert_eq!(created_same, 1, "one import for the file sent six times");
    assert_eq!(same.len(), 1, "its duplicates name that import");
    assert_eq!(count(&t, "batches").await, 31);
    assert_eq!(count(&t, "imports").await, 31);
    assert_eq!(count(&t, "payload_parts").await, 31);
    // Every batch has its two events, and its own acceptance number.
    let events: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM outbox o JOIN batches b ON b.id = o.batch_id \
         WHERE o.event_type IN ('BatchCreated', 'BatchReady')",
    )
    .fetch_one(t.db.pool())
    .await
    .unwrap();
    assert_eq!(events, 62);
    let numbers: i64 = sqlx::query_scalar("SELECT COUNT(DISTINCT accepted_seq) FROM batches")
        .fetch_one(t.db.pool())
        .await
        .unwrap();
    assert_eq!(numbers, 31);
    t.stop().await;
}

/// A file sent again within the dedup window is answered with the import it made, even
/// when the client's checks have changed since and would refuse it now; a new file is
/// checked as usual.
async fn a_file_accepted_before_is_its_duplicate_under_stricter_checks(b: Backend) {
    let Some(t) = TestApp::spawn(b).await else {
        return;
    };
    let (client, key) = t.client(json!({})).await;
    let body = csv("before", 3);
    let first = t.import(&key, "text/csv", body.clone()).await;
    let patched = t
        .admin(
            reqwest::Method::PATCH,
            &format!("/admin/clients/{client}/policy"),
        )
        .json(&json!({"required_fields": ["email"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(patched.status(), 200);
    let again = t.submit(&key, "text/csv", body).send().await.unwrap();
    assert_eq!(again.status(), 200);
    let view: ImportView = again.json().await.unwrap();
    assert!(view.duplicate);
    assert_eq!(view.id, first.id);
    let new = t
        .submit(&key, "text/csv", csv("after", 3))
        .send()
        .await
        .unwrap();
    assert_eq!(new.status(), 422);
    assert_eq!(count(&t, "imports").await, 1);
    t.stop().await;
}

async fn daily_quota_is_enforced(b: Backend) {
    let Some(t) = TestApp::spawn(b).await else {
        return;
    };
    let (_, key) = t.client(json!({"daily_record_quota": 5})).await;
    t.import(&key, "text/csv", csv("q", 3)).await;
    let over = t
        .submit(&key, "text/csv", csv("r", 3))
        .send()
        .await
        .unwrap();
    assert_eq!(over.status(), 429);
    assert!(over.headers().contains_key("retry-after"));
    assert_eq!(
        over.json::<ErrorBody>().await.unwrap().code,
        "quota_exceeded"
    );
    t.import(&key, "text/csv", csv("s", 2)).await;
    // An import larger than the whole quota is refused for good, not told to wait.
    let never = t
        .submit(&key, "text/csv", csv("big", 6))
        .send()
        .await
        .unwrap();
    assert_eq!(never.status(), 422);
    assert_eq!(
        never.json::<ErrorBody>().await.unwrap().code,
        "import_exceeds_quota"
    );
    assert_eq!(count(&t, "imports").await, 2);
    t.stop().await;
}

async fn batch_report_counts_and_defuses_formulas(b: Backend) {
    let Some(t) = TestApp::spawn(b).await else {
        return;
    };
    let (_, key) = t.client(json!({"required_fields": ["=cmd"]})).await;
    let (_, other) = t.client(json!({})).await;
    let imp = t.import(&key, "text/csv", "id,=cmd\n1,x\n2,\n,y\n").await;
    t.wait_for(&key, &imp.batch_id, BatchStatus::Completed)
        .await;

    let report: serde_json::Value = t
        .get(&key, &format!("/v1/batches/{}/report", imp.batch_id))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        report["errors_by_code"],
        json!({"missing_field": 1, "missing_key": 1})
    );
    assert_eq!(report["batch"]["records_written"], 1);
    let csv_path = report["rejected_rows_csv"].as_str().unwrap().to_owned();

    let resp = t.get(&key, &csv_path).await;
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/csv")
    );
    let text = resp.text().await.unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "line,field,code,detail,value");
    assert!(
        lines[1].starts_with("3,'=cmd,missing_field,"),
        "formula defused: {text}"
    );
    assert!(lines[2].starts_with("4,id,missing_key,"), "{text}");
    assert_eq!(lines.len(), 3);

    for path in [format!("/v1/batches/{}/report", imp.batch_id), csv_path] {
        assert_eq!(t.get(&other, &path).await.status(), 404, "{path}");
    }

    // The report job stores the same, and for a batch without rejects an empty count and
    // a CSV of the header alone.
    let clean = t.import(&key, "text/csv", "id,=cmd\n1,x\n").await;
    t.wait_for(&key, &clean.batch_id, BatchStatus::Completed)
        .await;
    for (batch, codes, csv) in [
        (
            &imp.batch_id,
            json!({"missing_field": 1, "missing_key": 1}),
            text.as_str(),
        ),
        (&clean.batch_id, json!({}), "line,field,code,detail,value\n"),
    ] {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let (summary, stored_csv) = loop {
            if let Some(stored) = t.db.stored_report(batch).await.unwrap() {
                break stored;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no stored report for {batch}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        };
        let summary: serde_json::Value = serde_json::from_str(&summary).unwrap();
        assert_eq!(summary["errors_by_code"], codes, "{batch}");
        assert_eq!(
            String::from_utf8(stored_csv.unwrap()).unwrap(),
            csv,
            "{batch}"
        );
    }
    t.stop().await;
}

async fn a_large_report_streams_every_rejected_row_once(b: Backend) {
    let Some(t) =
        TestApp::spawn_with(b, dataflow::Roles::ALL, |c| c.worker.chunk_size = 5_000).await
    else {
        return;
    };
    let (_, key) = t.client(json!({})).await;
    let rows = 12_001;
    let body: String = std::iter::once("id,v\n".to_owned())
        .chain((0..rows).map(|i| format!(",{i}\n")))
        .collect();
    let imp = t.import(&key, "text/csv", body).await;
    t.wait_for(&key, &imp.batch_id, BatchStatus::Completed)
        .await;
    let text = t
        .get(&key, &format!("/v1/batches/{}/report.csv", imp.batch_id))
        .await
        .text()
        .await
        .unwrap();
    let lines: Vec<u64> = text
        .lines()
        .skip(1)
        .map(|l| l.split(',').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(
        lines.len(),
        rows,
        "one line per rejected row, across several pages"
    );
    assert!(
        lines.windows(2).all(|w| w[0] < w[1]),
        "in file order, no repeats"
    );
    assert_eq!(
        text.matches("line,field,code,detail").count(),
        1,
        "one header"
    );
    t.stop().await;
}

/// The same payload is a duplicate inside the client's window and a new import after it;
/// a window far beyond any clock (up to `u64::MAX` seconds) still works and holds.
async fn the_dedup_window_ends_and_a_huge_one_holds(b: Backend) {
    let Some(t) = TestApp::spawn(b).await else {
        return;
    };
    let send = |key: String| {
        let t = &t;
        async move {
            let resp = t
                .submit(&key, "text/csv", csv("w", 2))
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            (status, resp.json::<ImportView>().await.unwrap())
        }
    };
    let (_, short) = t.client(json!({"dedup_window_secs": 1})).await;
    let (status, first) = send(short.clone()).await;
    assert_eq!(status, 202);
    let (status, again) = send(short.clone()).await;
    assert_eq!(
        (status, again.id.clone(), again.duplicate),
        (200, first.id.clone(), true)
    );
    tokio::time::sleep(std::time::Duration::from_millis(1_100)).await;
    let (status, later) = send(short).await;
    assert_eq!(status, 202, "a new import once the window ended");
    assert_ne!(later.id, first.id);

    for window in [u64::MAX, 10_u64.pow(15)] {
        let (_, key) = t.client(json!({ "dedup_window_secs": window })).await;
        let (status, first) = send(key.clone()).await;
        assert_eq!(status, 202, "window {window}");
        let (status, again) = send(key).await;
        assert_eq!((status, again.id), (200, first.id), "window {window}");
    }
    t.stop().await;
}

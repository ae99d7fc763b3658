//! Files of any size: the tus protocol at `/v1/uploads` (spoken by hand, and by the tus
//! project's own clients, tuspy and tus-js-client), request bodies longer than a part, and
//! compressed bodies with their bounds.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use dataflow::Roles;
use dataflow_contracts::http::{ErrorBody, ImportView, UploadState, UploadView};
use dataflow_contracts::{BatchId, BatchStatus};
use dataflow_platform::ledger::PartsReader;
use reqwest::{Method, StatusCode};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::common::services::unreachable;
use crate::helpers::{Backend, TestApp, backend_tests, csv};

backend_tests!(
    a_tus_upload_in_parts_becomes_an_import,
    a_refused_upload_keeps_its_reason_and_no_file,
    an_upload_over_the_quota_waits_for_it,
    stock_tus_clients_upload_and_resume,
    a_body_longer_than_a_part_is_streamed_and_nothing_is_left_when_it_is_refused,
    a_stored_file_is_read_a_part_at_a_time_when_the_parser_asks,
    compressed_bodies_are_read_and_bombs_refused,
);

fn tus(t: &TestApp, key: &str, method: Method, path: &str) -> reqwest::RequestBuilder {
    t.http
        .request(method, t.url(path))
        .bearer_auth(key)
        .header("tus-resumable", "1.0.0")
}

fn metadata(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| format!("{k} {}", BASE64.encode(v)))
        .collect::<Vec<_>>()
        .join(",")
}

fn header(resp: &reqwest::Response, name: &str) -> String {
    resp.headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

async fn create(t: &TestApp, key: &str, length: usize, meta: &str) -> String {
    let resp = tus(t, key, Method::POST, "/v1/uploads")
        .header("upload-length", length)
        .header("upload-metadata", meta)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201, "{}", resp.text().await.unwrap());
    header(&resp, "location")
}

async fn patch(t: &TestApp, key: &str, at: &str, offset: usize, part: &[u8]) -> reqwest::Response {
    tus(t, key, Method::PATCH, at)
        .header("upload-offset", offset)
        .header("content-type", "application/offset+octet-stream")
        .body(part.to_vec())
        .send()
        .await
        .unwrap()
}

async fn offset(t: &TestApp, key: &str, at: &str) -> reqwest::Response {
    tus(t, key, Method::HEAD, at).send().await.unwrap()
}

async fn view(t: &TestApp, key: &str, at: &str) -> UploadView {
    let resp = t.get(key, at).await;
    assert_eq!(resp.status(), 200);
    resp.json().await.unwrap()
}

async fn parts_of(t: &TestApp, payload: &str) -> i64 {
    sqlx::query_scalar("SELECT COUNT(*) FROM payload_parts WHERE payload_id = $1")
        .bind(payload)
        .fetch_one(t.db.pool())
        .await
        .unwrap()
}

/// Created with an idempotency key, sent in three parts (one with a wrong and then a right
/// checksum, one at a wrong offset), resumed from `HEAD`: the import holds every record,
/// and its checksum is the file's.
async fn a_tus_upload_in_parts_becomes_an_import(b: Backend) {
    let Some(t) = TestApp::spawn(b).await else {
        return;
    };
    let (_, key) = t.client(json!({"rate_burst": 1000})).await;
    let (_, stranger) = t.client(json!({})).await;
    let file = csv("tus", 3000);
    let bytes = file.as_bytes();
    let meta = metadata(&[("filename", "people.csv"), ("idempotencyKey", "people-1")]);

    let unversioned = t
        .http
        .post(t.url("/v1/uploads"))
        .bearer_auth(&key)
        .header("upload-length", bytes.len())
        .send()
        .await
        .unwrap();
    assert_eq!(unversioned.status(), 400);
    let other_version = t
        .http
        .post(t.url("/v1/uploads"))
        .bearer_auth(&key)
        .header("tus-resumable", "0.2.2")
        .header("upload-length", bytes.len())
        .send()
        .await
        .unwrap();
    assert_eq!(other_version.status(), 412);
    let at = create(&t, &key, bytes.len(), &meta).await;
    assert!(at.starts_with("/v1/uploads/upl_"), "{at}");
    assert_eq!(offset(&t, &stranger, &at).await.status(), 404);

    let (first, rest) = bytes.split_at(bytes.len() / 3);
    assert_eq!(patch(&t, &key, &at, 7, first).await.status(), 409);
    let wrong = tus(&t, &key, Method::PATCH, &at)
        .header("upload-offset", 0)
        .header("content-type", "application/offset+octet-stream")
        .header(
            "upload-checksum",
            format!(
                "sha256 {}",
                BASE64.encode(Sha256::digest(b"something else"))
            ),
        )
        .body(first.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status().as_u16(), 460);
    assert_eq!(header(&offset(&t, &key, &at).await, "upload-offset"), "0");
    let right = tus(&t, &key, Method::PATCH, &at)
        .header("upload-offset", 0)
        .header("content-type", "application/offset+octet-stream")
        .header(
            "upload-checksum",
            format!("sha256 {}", BASE64.encode(Sha256::digest(first))),
        )
        .body(first.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(right.status(), 204);
    assert_eq!(header(&right, "upload-offset"), first.len().to_string());

    // The same idempotency key answers the same upload, where it stands.
    assert_eq!(create(&t, &key, bytes.len(), &meta).await, at);
    let head = offset(&t, &key, &at).await;
    assert_eq!(head.status(), 200);
    assert_eq!(header(&head, "upload-length"), bytes.len().to_string());
    assert_eq!(header(&head, "upload-metadata"), meta);
    assert!(!header(&head, "upload-expires").is_empty());
    assert_eq!(view(&t, &key, &at).await.state, UploadState::Receiving);

    let (second, third) = rest.split_at(rest.len() / 2);
    let resp = patch(&t, &key, &at, first.len(), second).await;
    assert_eq!(resp.status(), 204);
    let resp = patch(&t, &key, &at, first.len() + second.len(), third).await;
    assert_eq!(resp.status(), 204);
    let batch: BatchId = header(&resp, "dataflow-batch-id").parse().unwrap();
    t.wait_for(&key, &batch, BatchStatus::Completed).await;
    let done = view(&t, &key, &at).await;
    assert_eq!(done.state, UploadState::Imported);
    let import = done.import.unwrap();
    assert_eq!(import.id.to_string(), header(&resp, "dataflow-import-id"));
    assert_eq!((import.records, import.bytes), (3000, bytes.len() as u64));
    assert_eq!(import.checksum, hex::encode(Sha256::digest(bytes)));
    // The batch owns the parts now; ending the upload forgets it but keeps them.
    assert_eq!(
        tus(&t, &key, Method::DELETE, &at)
            .send()
            .await
            .unwrap()
            .status(),
        204
    );
    assert_eq!(offset(&t, &key, &at).await.status(), 404);
    let upload_id = at.trim_start_matches("/v1/uploads/");
    assert!(parts_of(&t, upload_id).await > 0);

    // An upload ended before it finished leaves nothing.
    let other = create(&t, &key, 10, &metadata(&[("filetype", "text/csv")])).await;
    assert_eq!(patch(&t, &key, &other, 0, b"id\n1\n").await.status(), 204);
    assert_eq!(
        tus(&t, &key, Method::DELETE, &other)
            .send()
            .await
            .unwrap()
            .status(),
        204
    );
    assert_eq!(
        parts_of(&t, other.trim_start_matches("/v1/uploads/")).await,
        0
    );
    t.stop().await;
}

/// A file that does not parse, sent whole in the creating request: the last part is
/// answered with the reason, the upload keeps it and no longer its bytes, and no import
/// exists. A file over the client's upload limit is refused at creation.
async fn a_refused_upload_keeps_its_reason_and_no_file(b: Backend) {
    let Some(t) = TestApp::spawn(b).await else {
        return;
    };
    let (_, key) = t.client(json!({"max_upload_bytes": 1000})).await;
    let too_big = tus(&t, &key, Method::POST, "/v1/uploads")
        .header("upload-length", 1001)
        .header("upload-metadata", metadata(&[("filename", "a.csv")]))
        .send()
        .await
        .unwrap();
    assert_eq!(too_big.status(), 413);
    let unknown = tus(&t, &key, Method::POST, "/v1/uploads")
        .header("upload-length", 10)
        .header("upload-metadata", metadata(&[("filename", "a.xlsx")]))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 415);

    let body = b"id,name\n1,a\n2\n";
    let resp = tus(&t, &key, Method::POST, "/v1/uploads")
        .header("upload-length", body.len())
        .header("upload-metadata", metadata(&[("filename", "a.csv")]))
        .header("content-type", "application/offset+octet-stream")
        .body(body.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let error: ErrorBody = resp.json().await.unwrap();
    assert_eq!(error.code, "ragged_row");
    let at = format!(
        "/v1/uploads/{}",
        sqlx::query_scalar::<_, String>("SELECT id FROM uploads")
            .fetch_one(t.db.pool())
            .await
            .unwrap()
    );
    let refused = view(&t, &key, &at).await;
    assert_eq!(refused.state, UploadState::Refused);
    assert_eq!(refused.error.unwrap().code, "ragged_row");
    assert_eq!(parts_of(&t, at.trim_start_matches("/v1/uploads/")).await, 0);
    let imports: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM imports")
        .fetch_one(t.db.pool())
        .await
        .unwrap();
    assert_eq!(imports, 0);
    t.stop().await;
}

/// A file finished while its client's daily quota is used up is answered `429` and kept,
/// not refused: once the quota allows it, a `PATCH` of no bytes at the end imports it.
async fn an_upload_over_the_quota_waits_for_it(b: Backend) {
    let Some(t) = TestApp::spawn(b).await else {
        return;
    };
    let (client, key) = t.client(json!({"daily_record_quota": 15})).await;
    let used = t.import(&key, "text/csv", csv("used", 10)).await;
    t.wait_for(&key, &used.batch_id, BatchStatus::Completed)
        .await;
    let file = csv("quota", 10);
    let at = create(&t, &key, file.len(), &metadata(&[("filename", "q.csv")])).await;
    let resp = patch(&t, &key, &at, 0, file.as_bytes()).await;
    assert_eq!(resp.status(), 429, "{}", resp.text().await.unwrap());
    assert_eq!(view(&t, &key, &at).await.state, UploadState::Received);
    assert!(parts_of(&t, at.trim_start_matches("/v1/uploads/")).await > 0);

    let resp = t
        .admin(Method::PATCH, &format!("/admin/clients/{client}/policy"))
        .json(&json!({"daily_record_quota": 100}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // The new policy reaches the API through its cache.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(40);
    let resp = loop {
        let resp = patch(&t, &key, &at, file.len(), b"").await;
        if resp.status() != 429 || std::time::Instant::now() > deadline {
            break resp;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    assert_eq!(resp.status(), 204);
    assert!(!header(&resp, "dataflow-import-id").is_empty());
    assert_eq!(view(&t, &key, &at).await.state, UploadState::Imported);
    t.stop().await;
}

/// The tus project's own clients: tuspy sends half of a file (with checksums) to one API
/// process, which then stops, and the rest to another; tus-js-client is cut off in the
/// middle of a part and resumes. Both files become imports with every record.
async fn stock_tus_clients_upload_and_resume(b: Backend) {
    let clients = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients");
    let python = std::process::Command::new("python3")
        .args(["-c", "import tusclient"])
        .output();
    if !python.is_ok_and(|o| o.status.success()) {
        return unreachable::<()>(
            "tuspy",
            "the tus Python client is not installed: pip install tuspy",
        )
        .unwrap_or_default();
    }
    if !clients.join("node_modules/tus-js-client").exists() {
        return unreachable::<()>(
            "tus-js-client",
            "the tus JavaScript client is not installed: npm ci --prefix tests/clients",
        )
        .unwrap_or_default();
    }
    let Some(t) = TestApp::spawn(b).await else {
        return;
    };
    let (_, key) = t
        .client(json!({"rate_burst": 1000, "rate_per_minute": 60000}))
        .await;
    let dir = std::env::temp_dir().join(format!("dataflow-tus-{}", ulid::Ulid::new()));
    std::fs::create_dir_all(&dir).unwrap();
    let endpoint = t.url("/v1/uploads");

    // tuspy: the first half through a second API process that then stops.
    let first = write(&dir, "first.csv", &csv("py", 45_000));
    let other = t.sibling(Roles::API).await;
    let out = run(
        "python3",
        &clients.join("tus_upload.py"),
        &[
            &other.url("/v1/uploads"),
            &key,
            path(&first),
            "--stop-at",
            "400000",
        ],
    );
    let url = out[0].replace(&other.url(""), &t.url(""));
    other.stop().await;
    let at = url.trim_start_matches(&t.url("")).to_owned();
    let stored: u64 = header(&offset(&t, &key, &at).await, "upload-offset")
        .parse()
        .unwrap();
    assert!(stored >= 400_000, "{stored}");
    run(
        "python3",
        &clients.join("tus_upload.py"),
        &[&endpoint, &key, path(&first), "--url", &url],
    );
    expect_import(&t, &key, &at, 45_000).await;

    // tus-js-client: cut off in the middle of a part, then resumed.
    let second = write(&dir, "second.csv", &csv("js", 45_000));
    let out = run(
        "node",
        &clients.join("tus_upload.mjs"),
        &[&endpoint, &key, path(&second), "400000"],
    );
    let url = out[0].clone();
    let at = url.trim_start_matches(&t.url("")).to_owned();
    assert_eq!(view(&t, &key, &at).await.state, UploadState::Receiving);
    run(
        "node",
        &clients.join("tus_upload.mjs"),
        &[&endpoint, &key, path(&second), "0", &url],
    );
    expect_import(&t, &key, &at, 45_000).await;
    std::fs::remove_dir_all(&dir).ok();
    t.stop().await;
}

fn write(dir: &Path, name: &str, body: &str) -> PathBuf {
    let file = dir.join(name);
    std::fs::File::create(&file)
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    file
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Runs a client script; its output lines.
fn run(program: &str, script: &Path, args: &[&str]) -> Vec<String> {
    let out = std::process::Command::new(program)
        .arg(script)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{program} {}: {}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

async fn expect_import(t: &TestApp, key: &str, at: &str, records: u64) -> ImportView {
    let done = view(t, key, at).await;
    assert_eq!(done.state, UploadState::Imported, "{done:?}");
    let import = done.import.unwrap();
    assert_eq!(import.records, records);
    t.wait_for(key, &import.batch_id, BatchStatus::Completed)
        .await;
    import
}

/// A body of several parts is checked as it streams in and imported whole; one that turns
/// out malformed near its end is refused and leaves no part and no upload behind.
async fn a_body_longer_than_a_part_is_streamed_and_nothing_is_left_when_it_is_refused(b: Backend) {
    let Some(t) = TestApp::spawn(b).await else {
        return;
    };
    let (_, key) = t.client(json!({})).await;
    let body = csv("long", 100_000);
    assert!(body.len() > 2 * 1024 * 1024);
    let import = t.import(&key, "text/csv", body.clone()).await;
    assert_eq!(
        import.checksum,
        hex::encode(Sha256::digest(body.as_bytes()))
    );
    assert_eq!(import.records, 100_000);
    let parts = parts_of(&t, &import_payload(&t, &import.batch_id).await).await;
    assert!(parts >= 3, "{parts} parts");

    let broken = format!("{}x\n", csv("broken", 100_000));
    let resp = t.submit(&key, "text/csv", broken).send().await.unwrap();
    assert_eq!(resp.status(), 400);
    assert_eq!(resp.json::<ErrorBody>().await.unwrap().code, "ragged_row");
    let left: i64 = sqlx::query_scalar(
        "SELECT (SELECT COUNT(*) FROM uploads) + \
                (SELECT COUNT(*) FROM payload_parts WHERE payload_id NOT IN \
                   (SELECT payload_id FROM batches))",
    )
    .fetch_one(t.db.pool())
    .await
    .unwrap();
    assert_eq!(left, 0, "a refused body left parts behind");
    t.stop().await;
}

/// A stored file is read back a part at a time, each when its parser asks for more: a
/// reader holds none of the file before its first read and no part beyond the one it
/// reads, so the files of a worker's batches that wait for room hold none of their bytes.
async fn a_stored_file_is_read_a_part_at_a_time_when_the_parser_asks(b: Backend) {
    let Some(t) = TestApp::spawn(b).await else {
        return;
    };
    let id = "read-when-asked";
    let parts: [&[u8]; 3] = [b"first,", b"second,", b"third"];
    let bytes = parts.iter().map(|p| p.len() as u64).sum();
    let reader = t.db.read_payload(id.into(), bytes);
    // Stored after the reader was made: one that read ahead found no file and failed.
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    for (seq, body) in parts.iter().enumerate() {
        sqlx::query("INSERT INTO payload_parts (payload_id, seq, body) VALUES ($1, $2, $3)")
            .bind(id)
            .bind(seq as i64)
            .bind(*body)
            .execute(t.db.pool())
            .await
            .unwrap();
    }
    let (reader, first) = on_blocking_thread(reader, |r| {
        let mut first = [0u8; 6];
        r.read_exact(&mut first).map(|_| first)
    })
    .await;
    assert_eq!(&first.unwrap(), b"first,");
    // The second part is read only now: changed meanwhile, the reader sees the change.
    sqlx::query("UPDATE payload_parts SET body = $2 WHERE payload_id = $1 AND seq = 1")
        .bind(id)
        .bind(&b"SECOND,"[..])
        .execute(t.db.pool())
        .await
        .unwrap();
    let (_, rest) = on_blocking_thread(reader, |r| {
        let mut rest = String::new();
        r.read_to_string(&mut rest).map(|_| rest)
    })
    .await;
    assert_eq!(rest.unwrap(), "SECOND,third");
    // Parts that do not add up to the bytes stored end the file with an error, not early.
    for stored in [bytes - 1, bytes + 1] {
        let reader = t.db.read_payload(id.into(), stored);
        let (_, read) = on_blocking_thread(reader, |r| r.read_to_end(&mut Vec::new())).await;
        let e = read.unwrap_err().to_string();
        assert!(e.contains(&format!("{stored} bytes were stored")), "{e}");
    }
    t.stop().await;
}

/// Runs `read` on `reader` on a blocking thread, where a stored file's reader runs; hands
/// the reader back with what `read` returned.
async fn on_blocking_thread<T: Send + 'static>(
    mut reader: PartsReader,
    read: impl FnOnce(&mut PartsReader) -> std::io::Result<T> + Send + 'static,
) -> (PartsReader, std::io::Result<T>) {
    tokio::task::spawn_blocking(move || {
        let out = read(&mut reader);
        (reader, out)
    })
    .await
    .unwrap()
}

async fn import_payload(t: &TestApp, batch: &BatchId) -> String {
    sqlx::query_scalar("SELECT payload_id FROM batches WHERE id = $1")
        .bind(batch.as_str())
        .fetch_one(t.db.pool())
        .await
        .unwrap()
}

/// gzip and zstd bodies are imported as the files they hold (the same checksum, so the
/// same import); a decompression bomb is a 413 and broken compression a 400, with nothing
/// stored; an unknown encoding is a 415.
async fn compressed_bodies_are_read_and_bombs_refused(b: Backend) {
    let Some(t) = TestApp::spawn(b).await else {
        return;
    };
    let (_, key) = t.client(json!({"rate_burst": 100})).await;
    let body = csv("packed", 2000);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(body.as_bytes()).unwrap();
    let gz = gz.finish().unwrap();
    let zst = zstd::encode_all(body.as_bytes(), 3).unwrap();
    let send = |encoding: &'static str, bytes: Vec<u8>| {
        t.submit(&key, "text/csv", bytes)
            .header("content-encoding", encoding)
            .send()
    };
    let first = send("gzip", gz.clone()).await.unwrap();
    assert_eq!(first.status(), 202);
    assert!(
        first.headers().get("connection").is_none(),
        "a body read whole keeps the connection"
    );
    let first: ImportView = first.json().await.unwrap();
    assert_eq!(first.checksum, hex::encode(Sha256::digest(body.as_bytes())));
    assert_eq!((first.records, first.bytes), (2000, body.len() as u64));
    let again = send("zstd", zst).await.unwrap();
    assert_eq!(again.status(), StatusCode::OK);
    let again: ImportView = again.json().await.unwrap();
    assert!(again.duplicate && again.id == first.id);
    // Two gzip members one after the other are one body: all of it is read.
    let (head, tail) = body.split_at(body.len() / 2);
    let mut members = Vec::new();
    for half in [head, tail] {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(half.as_bytes()).unwrap();
        members.extend(gz.finish().unwrap());
    }
    let whole: ImportView = send("gzip", members).await.unwrap().json().await.unwrap();
    assert!(whole.duplicate && whole.id == first.id, "{whole:?}");
    t.wait_for(&key, &first.batch_id, BatchStatus::Completed)
        .await;

    let before: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM payload_parts")
        .fetch_one(t.db.pool())
        .await
        .unwrap();
    let mut bomb = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    let mut plain = String::from("id\n");
    while plain.len() < 60 * 1024 * 1024 {
        plain.push_str("1111111111111111111111111111111111111111111111111111111111111111\n");
    }
    bomb.write_all(plain.as_bytes()).unwrap();
    let bomb = bomb.finish().unwrap();
    let resp = send("gzip", bomb).await.unwrap();
    assert_eq!(resp.status(), 413);
    // Refused before its end: the connection is not kept, and the client is told so (or
    // its next request goes into the closing connection and fails).
    assert_eq!(resp.headers()["connection"], "close");
    assert_eq!(
        resp.json::<ErrorBody>().await.unwrap().code,
        "compression_ratio_too_high"
    );
    let resp = send("gzip", b"not gzip at all".to_vec()).await.unwrap();
    assert_eq!(resp.status(), 400);
    assert_eq!(
        resp.json::<ErrorBody>().await.unwrap().code,
        "invalid_encoding"
    );
    let resp = send("br", gz).await.unwrap();
    assert_eq!(resp.status(), 415);
    let after: i64 = sqlx::query_scalar(
        "SELECT (SELECT COUNT(*) FROM payload_parts) + (SELECT COUNT(*) FROM uploads)",
    )
    .fetch_one(t.db.pool())
    .await
    .unwrap();
    assert_eq!(after, before, "a refused body left something behind");
    t.stop().await;
}

//! The producer and operator commands against a running DataFlow: `import --wait`,
//! `status`, `batches`, and the dead-letter queue (`dlq list|retry|discard`).

use crate::common::harness::register;
use std::time::{Duration, Instant};

use dataflow::Roles;
use dataflow::cli::import::{self, ImportArgs};
use dataflow::cli::ops::{self, BatchesCmd, DlqCmd};
use dataflow::cli::upload::Compression;
use dataflow_contracts::http::QueueDepth;
use dataflow_contracts::jobs::{JobPage, JobStatus};
use dataflow_contracts::{BatchId, BatchStatus, ClientId};
use dataflow_platform::broker::endpoint;
use reqwest::Method;
use serde_json::json;

use crate::common::proxy::Proxy;
use crate::helpers::{Backend, TestApp, csv, replace_payload};
use crate::sinks::WebhookReceiver;

fn upload(t: &TestApp, key: &str, file: std::path::PathBuf) -> ImportArgs {
    ImportArgs {
        file,
        key: key.to_owned(),
        client: None,
        api: t.url(""),
        format: None,
        idempotency_key: None,
        wait: true,
        dry_run: false,
        compress: None,
        resumable_above: 16 * 1024 * 1024,
        part_size: 8 * 1024 * 1024,
    }
}

/// A file of more parts than the client's rate allows at once: each `429` is waited out
/// (its `Retry-After`) and the import completes, the processing followed to its end too.
async fn import_slows_down_to_the_clients_rate() {
    let Some(t) = TestApp::spawn(Backend::Sqlite).await else {
        return;
    };
    let (_, key) = t
        .client(json!({"rate_per_minute": 120, "rate_burst": 3}))
        .await;
    let file = t.config.data_dir.join("parts.csv");
    std::fs::write(&file, csv("slow", 4_000)).unwrap();
    import::run(ImportArgs {
        resumable_above: 0,
        part_size: 16 * 1024,
        ..upload(&t, &key, file)
    })
    .await
    .unwrap();
    let written = sqlx::query_scalar::<_, i64>("SELECT records_written FROM batches")
        .fetch_one(t.db.pool())
        .await
        .unwrap();
    assert_eq!(written, 4_000);
    t.stop().await;
}
register!(import_slows_down_to_the_clients_rate);

/// A file sent as a resumable upload, interrupted (the command killed while its parts
/// crawl through a slow link) and run again: it resumes the same upload, compressed this
/// time, and the import holds the whole file.
async fn import_resumes_an_interrupted_upload() {
    let Some(t) = TestApp::spawn(Backend::Sqlite).await else {
        return;
    };
    let (_, key) = t.client(json!({"rate_burst": 1000})).await;
    let file = t.config.data_dir.join("big.csv");
    let body = csv("resume", 40_000);
    std::fs::write(&file, &body).unwrap();
    let proxy = Proxy::start(t.addr).await;
    proxy.delay(Duration::from_millis(300));
    let mut first = std::process::Command::new(env!("CARGO_BIN_EXE_dataflow"))
        .args(["import", file.to_str().unwrap(), "--key", &key])
        .args(["--api", &format!("http://{}", proxy.addr)])
        .args(["--resumable-above", "0", "--part-size", "65536"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let received = || async {
        sqlx::query_scalar::<_, i64>("SELECT COALESCE(MAX(received), 0) FROM uploads")
            .fetch_one(t.db.pool())
            .await
            .unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while received().await == 0 {
        assert!(Instant::now() < deadline, "no part arrived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    first.kill().unwrap();
    first.wait().unwrap();
    let stored = received().await;
    assert!(stored > 0 && stored < body.len() as i64, "{stored}");

    import::run(ImportArgs {
        compress: Some(Compression::Zstd),
        resumable_above: 0,
        part_size: 65536,
        ..upload(&t, &key, file)
    })
    .await
    .unwrap();
    let (uploads, payload): (i64, String) = sqlx::query_as(
        "SELECT (SELECT COUNT(*) FROM uploads), \
                (SELECT payload_id FROM batches LIMIT 1)",
    )
    .fetch_one(t.db.pool())
    .await
    .unwrap();
    assert_eq!(uploads, 1, "the second run made a new upload");
    let upload: String = sqlx::query_scalar("SELECT id FROM uploads")
        .fetch_one(t.db.pool())
        .await
        .unwrap();
    assert_eq!(payload, upload);
    let done = sqlx::query_scalar::<_, i64>("SELECT records_written FROM batches")
        .fetch_one(t.db.pool())
        .await
        .unwrap();
    assert_eq!(done, 40_000);
    t.stop().await;
}
register!(import_resumes_an_interrupted_upload);

async fn import_uploads_and_waits_for_its_batch() {
    let Some(t) = TestApp::spawn(Backend::Sqlite).await else {
        return;
    };
    let (_, key) = t.client(json!({})).await;
    let file = t.config.data_dir.join("people.csv");
    std::fs::write(&file, csv("cli", 50)).unwrap();
    import::run(upload(&t, &key, file.clone())).await.unwrap();
    let done =
        t.db.list_batches(None, Some(BatchStatus::Completed), None, 10)
            .await
            .unwrap();
    assert_eq!(
        done.items.len(),
        1,
        "--wait returned before the batch completed"
    );
    assert_eq!(done.items[0].records_written, 50);

    let refused = import::run(upload(&t, "dfk_nobody_secret", file.clone())).await;
    let refused = refused.unwrap_err().to_string();
    assert!(refused.contains("401"), "{refused}");
    let odd = t.config.data_dir.join("people.xlsx");
    std::fs::write(&odd, "x").unwrap();
    let unknown = import::run(upload(&t, &key, odd)).await.unwrap_err();
    assert!(unknown.to_string().contains("--format"), "{unknown}");
    t.stop().await;
}
register!(import_uploads_and_waits_for_its_batch);

/// `import --dry-run` stores nothing, and fails when the import would be refused whole.
async fn import_dry_run_stores_nothing() {
    let Some(t) = TestApp::spawn(Backend::Sqlite).await else {
        return;
    };
    let (_, key) = t.client(json!({"max_error_ratio": 0.5})).await;
    let file = t.config.data_dir.join("people.csv");
    std::fs::write(&file, csv("cli", 20)).unwrap();
    let dry = |file| ImportArgs {
        wait: false,
        dry_run: true,
        ..upload(&t, &key, file)
    };
    import::run(dry(file)).await.unwrap();
    let bad = t.config.data_dir.join("bad.csv");
    std::fs::write(&bad, "id,name\n,a\n,b\n1,c\n").unwrap();
    let refused = import::run(dry(bad)).await.unwrap_err().to_string();
    assert!(
        refused.starts_with("the import would be refused: 2 of 3 records"),
        "{refused}"
    );
    let none = t.db.list_batches(None, None, None, 10).await.unwrap();
    assert!(none.items.is_empty(), "a dry run stores nothing");
    t.stop().await;
}
register!(import_dry_run_stores_nothing);

/// `--client` names the tenant the upload is for; a key of another tenant is refused before
/// anything is sent, by name and by id.
async fn import_checks_the_keys_client_before_uploading() {
    let Some(t) = TestApp::spawn(Backend::Sqlite).await else {
        return;
    };
    let named = |name: &str| {
        t.admin(Method::POST, "/admin/clients")
            .json(&json!({"name": name}))
            .send()
    };
    let acme: ClientId = named("acme")
        .await
        .unwrap()
        .json::<serde_json::Value>()
        .await
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let key = t.new_key(&acme).await;
    let (globex, _) = t.client(json!({})).await;
    let for_client = |client: &str, rows: &str| {
        let file = t.config.data_dir.join(format!("{rows}.csv"));
        std::fs::write(&file, csv(rows, 5)).unwrap();
        ImportArgs {
            client: Some(client.to_owned()),
            ..upload(&t, &key, file)
        }
    };

    for wrong in ["globex", globex.as_str()] {
        let refused = import::run(for_client(wrong, "wrong")).await.unwrap_err();
        let refused = format!("{refused:#}");
        assert!(
            refused.contains("belongs to client `acme`") && refused.contains(acme.as_str()),
            "{refused}"
        );
        assert!(refused.contains("nothing was uploaded"), "{refused}");
    }
    let stored = t.db.list_batches(None, None, None, 10).await.unwrap();
    assert!(
        stored.items.is_empty(),
        "a refused upload stored {stored:?}"
    );

    import::run(for_client("acme", "by-name")).await.unwrap();
    let lower = acme.as_str().to_lowercase();
    import::run(for_client(&lower, "by-id")).await.unwrap();
    let stored =
        t.db.list_batches(Some(&acme), None, None, 10)
            .await
            .unwrap();
    assert_eq!(stored.items.len(), 2);
    assert!(
        stored
            .items
            .iter()
            .all(|b| b.status == BatchStatus::Completed)
    );

    let bad_key = ImportArgs {
        key: "dfk_nobody_secret".into(),
        ..for_client("acme", "bad-key")
    };
    let refused = format!("{:#}", import::run(bad_key).await.unwrap_err());
    assert!(
        refused.contains("which client the key belongs to") && refused.contains("401"),
        "{refused}"
    );
    t.stop().await;
}
register!(import_checks_the_keys_client_before_uploading);

/// A batch that can never be processed: accepted while it awaits approval, its stored
/// payload corrupted, then approved.
async fn poison_batch(t: &TestApp, key: &str, n: u32) -> BatchId {
    let body = format!("{{\"id\":{n}}}\n");
    let imported = t.import(key, "application/x-ndjson", body.clone()).await;
    replace_payload(
        &t.db,
        &imported.batch_id,
        format!("{body}[not json").as_bytes(),
    )
    .await;
    let approve = format!("/admin/batches/{}/approve", imported.batch_id);
    let resp = t.admin(Method::POST, &approve).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    imported.batch_id
}

async fn dead_depths(t: &TestApp) -> (u64, u64) {
    let depths: Vec<QueueDepth> = t
        .admin_send(Method::GET, "/admin/queues")
        .await
        .json()
        .await
        .unwrap();
    let dead = |q: &str| {
        depths
            .iter()
            .find(|d| d.queue == q && d.state == "dead")
            .map_or(0, |d| d.count)
    };
    (dead("batches"), dead("jobs:webhook"))
}

async fn dead_letters_are_listed_retried_and_discarded() {
    let hooks = WebhookReceiver::start(500).await;
    let Some(t) = TestApp::spawn_with(Backend::Sqlite, Roles::ALL, |c| {
        c.worker.max_attempts = 1;
        c.jobs.max_attempts = 1;
        c.jobs.webhook_allow_private = true;
        c.jobs.poll_interval_ms = 50;
    })
    .await
    else {
        return;
    };
    let policy = json!({"approval_required": true, "webhook_url": hooks.url()});
    let (_, key) = t.client(policy).await;
    let (first, second) = (
        poison_batch(&t, &key, 1).await,
        poison_batch(&t, &key, 2).await,
    );
    // Each batch dies, and each of its three events' webhooks (created, ready, dead) too.
    let deadline = Instant::now() + Duration::from_secs(20);
    while dead_depths(&t).await != (2, 6) {
        assert!(Instant::now() < deadline, "{:?}", dead_depths(&t).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ops::status(&t.config).await.unwrap();
    ops::dlq(&t.config, DlqCmd::List { limit: 50 })
        .await
        .unwrap();
    let list = BatchesCmd::List {
        client: None,
        status: Some(BatchStatus::Dead),
        limit: 10,
    };
    ops::batches(&t.config, list).await.unwrap();

    // One dead job retried once its receiver is healthy again: it is delivered.
    hooks.answer(200);
    let dead_jobs: JobPage = t
        .admin_send(Method::GET, "/admin/jobs?status=dead")
        .await
        .json()
        .await
        .unwrap();
    let job = dead_jobs.items[0].id.clone();
    let retry = DlqCmd::Retry {
        ids: vec![job.to_string()],
        all: false,
    };
    ops::dlq(&t.config, retry).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while t.db.get_job(&job).await.unwrap().unwrap().status != JobStatus::Done {
        assert!(Instant::now() < deadline, "the retried job never ran");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }

    // One batch discarded by id, then everything else in bulk.
    let discard = DlqCmd::Discard {
        ids: vec![first.to_string()],
        all: false,
        reason: "bad export, resent".into(),
    };
    ops::dlq(&t.config, discard).await.unwrap();
    let view = t.db.get_batch(None, &first).await.unwrap().unwrap();
    assert_eq!(view.status, BatchStatus::Rejected);
    assert_eq!(dead_depths(&t).await.0, 1);
    let everything = DlqCmd::Discard {
        ids: Vec::new(),
        all: true,
        reason: "cleared".into(),
    };
    ops::dlq(&t.config, everything).await.unwrap();
    let view = t.db.get_batch(None, &second).await.unwrap().unwrap();
    assert_eq!(view.status, BatchStatus::Rejected);
    // The rejections ask for webhooks of their own (now answered 200); nothing stays dead.
    let deadline = Instant::now() + Duration::from_secs(20);
    while dead_depths(&t).await != (0, 0) {
        assert!(Instant::now() < deadline, "{:?}", dead_depths(&t).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let discarded: JobPage = t
        .admin_send(Method::GET, "/admin/jobs?status=discarded")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        discarded.items.len(),
        5,
        "the six dead jobs but the retried one"
    );
    let missing = ops::dlq(
        &t.config,
        DlqCmd::Retry {
            ids: vec![first.to_string()],
            all: false,
        },
    )
    .await;
    assert!(missing.is_err(), "a rejected batch is no dead letter");
    t.stop().await;
}
register!(dead_letters_are_listed_retried_and_discarded);

/// SQLite: other processes open the ledger file too (operator commands, a second DataFlow
/// process, an operator's `sqlite3`), and the last connection to close checkpoints and
/// deletes the write-ahead log when no other process holds the file. So a live process
/// must hold it for as long as it runs, and nothing it does may drop its locks (closing any
/// descriptor of the file drops them all, for the whole process). Imports go on while
/// another process opens, reads and cleanly closes the ledger; afterwards the ledger is
/// whole, and a connection of its own finds every batch completed with all its records.
async fn another_process_closing_the_ledger_leaves_a_live_process_whole() {
    let Some(t) = TestApp::spawn_with(Backend::Sqlite, Roles::ALL, |_| {}).await else {
        return;
    };
    let (_, key) = t
        .client(json!({"rate_per_minute": 60000, "rate_burst": 1000}))
        .await;
    let url = t.config.database_url();
    let path = url.strip_prefix("sqlite://").expect("a SQLite ledger");
    // Python's sqlite3 closes its connection cleanly, as `sqlite3` and most tools do.
    let peek = format!(
        "import sqlite3; c = sqlite3.connect({path:?}); c.execute('SELECT count(*) FROM batches').fetchall(); c.close()"
    );
    let mut batches = Vec::new();
    for i in 0..6 {
        let imported = t
            .import(&key, "text/csv", csv(&format!("c{i}"), 2_000))
            .await;
        batches.push(imported.batch_id);
        let peek = peek.clone();
        let ran = tokio::task::spawn_blocking(move || {
            std::process::Command::new("python3")
                .args(["-c", &peek])
                .status()
                .expect("python3 runs")
        });
        assert!(ran.await.unwrap().success(), "the other process failed");
    }
    for id in &batches {
        let b = t.wait_for(&key, id, BatchStatus::Completed).await;
        assert_eq!((b.attempts, b.records_written), (1, 2_000), "{b:?}");
    }
    // A connection of its own, as the next process would open: it reads what is on disk.
    let mut fresh = <sqlx::SqliteConnection as sqlx::Connection>::connect(&url)
        .await
        .unwrap();
    let check: String = sqlx::query_scalar("PRAGMA integrity_check")
        .fetch_one(&mut fresh)
        .await
        .unwrap();
    assert_eq!(check, "ok");
    let counts: (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM batches WHERE status = 'completed'), \
                (SELECT count(*) FROM records)",
    )
    .fetch_one(&mut fresh)
    .await
    .unwrap();
    assert_eq!(counts, (6, 12_000));
    t.stop().await;
}
register!(another_process_closing_the_ledger_leaves_a_live_process_whole);

/// A command that fails says so in one line with its causes, for the person at the
/// terminal, and prints no backtrace whatever `RUST_BACKTRACE` says.
fn a_failing_command_says_why_in_one_line() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_dataflow"))
        .args(["--config", "/nonexistent/dataflow.toml", "status"])
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("Error: loading configuration: "),
        "{stderr}"
    );
    assert!(
        stderr.contains("/nonexistent/dataflow.toml: No such file"),
        "{stderr}"
    );
}
register!(sync a_failing_command_says_why_in_one_line);

/// `dataflow <args…>` on an embedded ledger in `dir`, configured by nothing but that (the
/// shared [`dataflow_command`] with its output captured).
///
/// [`dataflow_command`]: crate::common::process::dataflow_command
fn embedded(dir: &std::path::Path, args: &[&str]) -> std::process::Command {
    let config = dataflow_platform::Config {
        data_dir: dir.to_owned(),
        ..dataflow_platform::Config::default()
    };
    let mut command = crate::common::process::dataflow_command(&config, args[0], "cli", None);
    command
        .args(&args[1..])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    command
}

/// `dataflow status` checks every RabbitMQ node `amqp_url` lists, says which answer, and
/// warns when fewer than a majority of them do.
async fn status_checks_every_listed_broker_node() {
    let Some(live) = crate::helpers::test_amqp_url().await else {
        return;
    };
    let down = crate::common::services::down_amqp_url();
    let dir = std::env::temp_dir().join(format!("dataflow-status-{}", ulid::Ulid::new()));
    let events = |amqp_url: String| {
        let config = dataflow_platform::Config {
            data_dir: dir.clone(),
            amqp_url: Some(dataflow_platform::config::Secret::new(amqp_url)),
            ..dataflow_platform::Config::default()
        };
        let out = crate::common::process::dataflow_command(&config, "status", "cli", None)
            .stdout(std::process::Stdio::piped())
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        stdout
            .lines()
            .find(|l| l.starts_with("events:"))
            .unwrap()
            .to_owned()
    };
    let (up, gone) = (endpoint(&live), endpoint(&down));
    assert_eq!(
        events(live.clone()),
        format!("events:  RabbitMQ {up} reachable")
    );
    assert_eq!(
        events(format!("{down},{live}")),
        format!(
            "events:  RabbitMQ {gone} UNREACHABLE, {up} reachable: a cluster's majority is \
             down, so its quorum queues neither confirm nor deliver"
        )
    );
    assert_eq!(
        events(down),
        format!("events:  RabbitMQ {gone} UNREACHABLE: workers poll SQL until one returns")
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
register!(status_checks_every_listed_broker_node);

/// Logs follow `DATAFLOW_LOG`, or `RUST_LOG` when that is unset, as Rust tools do.
fn logs_follow_rust_log_when_dataflow_log_is_unset() {
    let dir = std::env::temp_dir().join(format!("dataflow-log-{}", ulid::Ulid::new()));
    let run = |vars: &[(&str, &str)]| {
        let mut command = embedded(&dir, &["clients", "list"]);
        command.env_remove("DATAFLOW_LOG");
        for (name, value) in vars {
            command.env(name, value);
        }
        let out = command.output().unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    assert!(!run(&[]).contains("DEBUG"));
    assert!(run(&[("RUST_LOG", "debug")]).contains("DEBUG"));
    let both = run(&[("RUST_LOG", "debug"), ("DATAFLOW_LOG", "warn")]);
    assert!(!both.contains("DEBUG"), "DATAFLOW_LOG wins: {both}");
    std::fs::remove_dir_all(&dir).unwrap();
}
register!(sync logs_follow_rust_log_when_dataflow_log_is_unset);

/// Operator commands open the ledger and nothing else: listing clients on a fresh data
/// folder migrates the embedded ledger (`auto_migrate`) but generates no secret; minting a
/// key generates the server secret it is hashed with, still not the operator token.
fn operator_commands_open_the_ledger_alone() {
    let dir = std::env::temp_dir().join(format!("dataflow-operator-{}", ulid::Ulid::new()));
    let run = |args: &[&str]| {
        let out = embedded(&dir, args).output().unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    run(&["clients", "list"]);
    assert!(dir.join("dataflow.db").exists());
    assert!(
        !dir.join("server-secret").exists(),
        "a secret for a listing"
    );
    assert!(
        !dir.join("admin-token").exists(),
        "an operator token for a listing"
    );
    let created: serde_json::Value =
        serde_json::from_str(&run(&["clients", "create", "acme"])).unwrap();
    let client = created["id"].as_str().unwrap().to_owned();
    assert!(run(&["keys", "create", &client]).starts_with("dfk_"));
    assert!(dir.join("server-secret").exists());
    assert!(!dir.join("admin-token").exists());
    // A purge asks to be meant, then says what it removed.
    let unsure = embedded(&dir, &["clients", "purge", &client])
        .output()
        .unwrap();
    assert!(!unsure.status.success());
    assert!(
        String::from_utf8_lossy(&unsure.stderr).contains("--yes"),
        "{unsure:?}"
    );
    let purged: serde_json::Value =
        serde_json::from_str(&run(&["clients", "purge", &client, "--yes"])).unwrap();
    assert_eq!(purged["records"], 0);
    std::fs::remove_dir_all(&dir).unwrap();
}
register!(sync operator_commands_open_the_ledger_alone);

/// `schema validate` checks a file against a Frictionless Table Schema with no server and no
/// ledger: each refused cell on a line of its own (line, field, code), exit status 1 when
/// any record is refused, 0 when every record fits; a schema it cannot use is an error that
/// names the property.
fn schema_validate_checks_a_file_offline() {
    let dir = std::env::temp_dir().join(format!("dataflow-schema-{}", ulid::Ulid::new()));
    std::fs::create_dir_all(&dir).unwrap();
    let schema = dir.join("schema.json");
    std::fs::write(
        &schema,
        json!({
            "fields": [
                {"name": "id", "type": "integer"},
                {"name": "email", "format": "email", "aliases": ["E-mail"], "constraints": {"required": true}},
                {"name": "qty", "type": "integer", "constraints": {"minimum": 0}},
                {"name": "day", "type": "date"}
            ],
            "primaryKey": "id"
        })
        .to_string(),
    )
    .unwrap();
    let file = |name: &str, body: &str| {
        let path = dir.join(name);
        std::fs::write(&path, body).unwrap();
        path.to_string_lossy().into_owned()
    };
    let validate = |file: &str, schema: &std::path::Path| {
        embedded(
            &dir,
            &[
                "schema",
                "validate",
                file,
                "--schema",
                schema.to_str().unwrap(),
            ],
        )
        .output()
        .unwrap()
    };
    let bad = file(
        "bad.csv",
        "id,E-mail,qty,day\n007,a@b.co,3,2026-02-28\nx,,-1,2026-02-30\n",
    );
    let out = validate(&bad, &schema);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        [
            r#"line 3, field `id`: type: `x` is not an integer (value: "x")"#,
            r#"line 3, field `email`: constraint.required: a value is required (value: "")"#,
            r#"line 3, field `qty`: constraint.minimum: below the minimum 0 (value: "-1")"#,
            r#"line 3, field `day`: type: `2026-02-30` is not a date (value: "2026-02-30")"#,
            "2 records: 1 valid, 1 refused",
        ]
    );
    // A header without a required column: the server would refuse the whole file.
    let no_mail = file("no-mail.csv", "id,qty\n1,2\n");
    let out = validate(&no_mail, &schema);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with(
            "line 1, field `email`: missing_field: no column for the required field `email`"
        ),
        "{out:?}"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("the server refuses the file (422)"),
        "{out:?}"
    );
    let extra = file(
        "extra.ndjson",
        "{\"id\":1,\"email\":\"a@b.co\",\"colour\":\"red\"}\n",
    );
    let out = validate(&extra, &schema);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("line 1, field `colour`: unknown_field"),
        "{out:?}"
    );
    let good = file("good.csv", "ID,email\n1,a@b.co\n2,c@d.org\n");
    let out = validate(&good, &schema);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("2 records: 2 valid, 0 refused"));
    let unusable = dir.join("unusable.json");
    std::fs::write(&unusable, r#"{"fields":[{"name":"a","type":"money"}]}"#).unwrap();
    let out = validate(&good, &unusable);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("fields[0].type: `money` is not a type"),
        "{stderr}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
register!(sync schema_validate_checks_a_file_offline);

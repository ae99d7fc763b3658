//! Benchmarks that print their figures as `key=value` lines.
//!
//! `dataflow-bench ingest`: submits imports over HTTP to a full in-process DataFlow and
//! measures the submit rate and the end-to-end rate (first submit → last batch completed).
//! On PostgreSQL it also loads the same rows with `COPY` into a table of the same shape in
//! the same database and prints the ratio, and what each path cost PostgreSQL per 1,000
//! records: WAL bytes, and for DataFlow's path transactions (reads included) and rows
//! written.
//!
//! `dataflow-bench limiter`: the Redis rate limiter against `redis-benchmark`.
//!
//! `dataflow-bench jobs` ([`jobs`]): the job queue's throughput and idle pickup latency.
//!
//! `dataflow-bench amqp` ([`amqp`]): commit → worker start with the broker and with polling
//! only, and the outbox relay's events/s against raw lapin publishing.
//!
//! `dataflow-bench records` ([`records`]): a dry run against a full table, and an export
//! of every record, with the peak memory of each.
//!
//! `dataflow-bench neighbours` ([`neighbours`]): one client's steady imports, alone and
//! under another client's flood, through real `dataflow` processes.
//!
//! `dataflow-bench submit` ([`submit`]): small imports from many connections at once,
//! through real `dataflow` processes, beside an axum hello server's ceiling.
//!
//! `dataflow-bench scale` ([`scale`]): 1, 2, 4 worker processes draining a backlog of big
//! or small batches, with what each batch costs PostgreSQL.
//!
//! `dataflow-bench growth` ([`growth`]): the ledger's reads and prunes timed as it grows to
//! 10 million records.

pub mod amqp;
mod baselines;
pub mod growth;
pub mod jobs;
pub mod neighbours;
pub mod processes;
pub mod records;
pub mod scale;
pub mod submit;

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use dataflow_contracts::{BatchStatus, Policy};
use dataflow_platform::Config;
use sqlx::Connection;
use tokio::net::TcpListener;

use dataflow::{App, Roles};

#[derive(Args, Debug, Clone)]
pub struct IngestArgs {
    /// Number of imports to submit.
    #[arg(long, default_value_t = 10)]
    pub imports: usize,
    /// Records per import.
    #[arg(long, default_value_t = 50_000)]
    pub records: usize,
    /// `postgres://…` to benchmark PostgreSQL (a scratch database is created and dropped);
    /// default: SQLite in a temporary folder.
    #[arg(long)]
    pub database_url: Option<String>,
    /// Batches processed at once.
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// Records per committed chunk.
    #[arg(long, default_value_t = 5_000)]
    pub chunk_size: usize,
    /// The worker's budget of records held at once (`worker.records_in_memory`); default:
    /// the configuration's.
    #[arg(long)]
    pub records_in_memory: Option<usize>,
    /// SQLite: answer submits without waiting for their commit to reach the disk
    /// (`sqlite_durable_commits = false`), to measure what durability costs.
    #[arg(long)]
    pub fast_commits: bool,
    /// Rows of ten fields (integers, a number, a date, a datetime, an email, an enum, a
    /// pattern, text) instead of six.
    #[arg(long)]
    pub ten_fields: bool,
    /// Gives the client a schema that types and checks the ten fields (what typing costs:
    /// compare with `--ten-fields` alone).
    #[arg(long, requires = "ten_fields")]
    pub schema: bool,
}

pub async fn ingest(args: IngestArgs) -> anyhow::Result<()> {
    let run = ulid::Ulid::new().to_string().to_lowercase();
    let ledger = ScratchLedger::create(args.database_url.as_deref(), &run).await?;
    let mut config = ledger.config.clone();
    config.worker.concurrency = args.concurrency;
    config.worker.chunk_size = args.chunk_size;
    if let Some(records) = args.records_in_memory {
        config.worker.records_in_memory = records;
    }
    config.worker.poll_interval_ms = 100;
    config.sqlite_durable_commits = !args.fast_commits;
    config.api.max_concurrent_imports_per_client = args.imports.max(1);
    config.validate()?;
    let backend = ledger.backend;
    let result = run_ingest(&args, config, backend).await;
    ledger.remove().await?;
    result
}

/// A throwaway ledger for one benchmark: SQLite in a temporary folder, or a scratch
/// database on the PostgreSQL server of `database_url`.
pub(crate) struct ScratchLedger {
    /// An embedded DataFlow's config living in the scratch folder, on this ledger.
    pub config: Config,
    pub backend: &'static str,
    dir: std::path::PathBuf,
    scratch: Option<ScratchDb>,
}

impl ScratchLedger {
    pub(crate) async fn create(database_url: Option<&str>, run: &str) -> anyhow::Result<Self> {
        let (dir, mut config) = scratch_config(run);
        let scratch = match database_url {
            Some(url) if url.starts_with("postgres") => Some(ScratchDb::create(url, run).await?),
            Some(_) => bail!("--database-url must be a postgres:// URL (SQLite is the default)"),
            None => None,
        };
        if let Some(s) = &scratch {
            config.database_url = Some(s.url.clone());
        }
        let backend = if scratch.is_some() {
            "postgres"
        } else {
            "sqlite"
        };
        Ok(ScratchLedger {
            config,
            backend,
            dir,
            scratch,
        })
    }

    pub(crate) async fn remove(self) -> anyhow::Result<()> {
        if let Some(s) = self.scratch {
            s.drop_db().await?;
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        Ok(())
    }
}

/// The `q` quantile of ascending `sorted` values (nearest rank).
pub(crate) fn percentile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * q).round() as usize]
}

async fn run_ingest(args: &IngestArgs, config: Config, backend: &str) -> anyhow::Result<()> {
    let policy = Policy {
        rate_per_minute: 1_000_000,
        rate_burst: 10_000,
        max_records: args.records as u64,
        dedup_window_secs: 0,
        ..Policy::default()
    };
    // SQLite: the ledger's file, and a folder beside it for the `.import` baseline.
    let sqlite_file = config
        .database_url
        .as_deref()
        .and_then(|url| url.strip_prefix("sqlite://"))
        .map(std::path::PathBuf::from);
    let scratch_dir = config.data_dir.clone();
    let (app, addr, token) = start_with_client(config, Roles::ALL, &policy).await?;
    let db = app.backends.db.clone();
    if args.schema {
        let client = db.list_clients().await?.remove(0);
        db.set_schema(&client.id, &typed_schema().to_string())
            .await?;
    }

    let bodies: Vec<String> = (0..args.imports)
        .map(|i| {
            if args.ten_fields {
                ten_field_body(i, args.records)
            } else {
                csv_body(i, args.records)
            }
        })
        .collect();
    let bytes: usize = bodies.iter().map(String::len).sum();
    let url = db.pool().connect_options().database_url.to_string();
    let work_before = match backend {
        "postgres" => Some(PgWork::read(&url).await?),
        _ => None,
    };
    let started = Instant::now();
    submit_all(addr, &token, bodies).await?;
    let submit_s = started.elapsed().as_secs_f64();
    wait_completed(&db, args.imports as u64, started).await?;
    let e2e_s = started.elapsed().as_secs_f64();
    let wal_after = match backend {
        "postgres" => Some(PgWork::wal(&url).await?),
        _ => None,
    };
    let total = (args.imports * args.records) as f64;
    let e2e_rate = total / e2e_s;
    // The API, the worker, the ledger's connections and the load's bodies are one process
    // here, so this is a bound on a worker's peak, not the worker's own: `submit --records
    // 50000 --connections 10` runs the same files through DataFlow's processes, each
    // measured apart.
    let peak = processes::peak_mib(std::process::id())?;
    print!(
        "name=ingest backend={backend} durable_commits={} fields={} schema={} imports={} \
         records_per_import={} mib={:.1} submit_s={submit_s:.3} submit_records_per_s={:.0} \
         e2e_s={e2e_s:.3} e2e_records_per_s={e2e_rate:.0} peak_mib_all_in_one={peak:.0}",
        !args.fast_commits,
        if args.ten_fields { 10 } else { 6 },
        args.schema,
        args.imports,
        args.records,
        bytes as f64 / 1_048_576.0,
        total / submit_s,
    );
    app.stop().await;
    if let (Some(before), Some(wal_after)) = (work_before, wal_after) {
        // Read once the processes' connections are closed: a backend reports its counts
        // when it exits (or when idle, up to seconds later).
        let after = PgWork::read(&url).await?;
        let per_1k = 1000.0 / total;
        print!(
            " wal_kib_per_1k_records={:.0} transactions_per_1k_records={:.1} \
             rows_written_per_1k_records={:.0}",
            (wal_after - before.wal) as f64 / 1024.0 * per_1k,
            (after.transactions - before.transactions) as f64 * per_1k,
            (after.rows_written - before.rows_written) as f64 * per_1k,
        );
        let (copy_rate, copy_wal) =
            baselines::copy_baseline(&url, args.imports * args.records).await?;
        print!(
            " copy_records_per_s={copy_rate:.0} ratio_vs_copy={:.2} copy_wal_kib_per_1k_records={:.0}",
            e2e_rate / copy_rate,
            copy_wal as f64 / 1024.0 * per_1k,
        );
    }
    if let Some(file) = sqlite_file.filter(|_| backend == "sqlite") {
        let expected = args.imports * args.records;
        if let Some(rate) = baselines::sqlite_import_baseline(&file, &scratch_dir, expected)? {
            print!(
                " sqlite_import_records_per_s={rate:.0} ratio_vs_sqlite_import={:.2}",
                e2e_rate / rate
            );
        }
    }
    println!();
    Ok(())
}

/// What PostgreSQL has done so far, from its statistics: the server's WAL position, and
/// the scratch database's transactions and rows written (inserted, updated, deleted), and
/// its statements when the server loads `pg_stat_statements`.
pub(crate) struct PgWork {
    pub wal: i64,
    pub transactions: i64,
    pub rows_written: i64,
    pub statements: Option<i64>,
}

impl PgWork {
    pub(crate) async fn read(url: &str) -> anyhow::Result<PgWork> {
        let mut conn = sqlx::PgConnection::connect(url).await?;
        let (wal, transactions, rows_written): (i64, i64, i64) = sqlx::query_as(
            "SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint, \
                    xact_commit + xact_rollback, tup_inserted + tup_updated + tup_deleted \
             FROM pg_stat_database WHERE datname = current_database()",
        )
        .fetch_one(&mut conn)
        .await?;
        // Absent unless the server preloads the extension ([`PgWork::count_statements`]).
        let statements = sqlx::query_scalar(
            "SELECT COALESCE(SUM(calls), 0)::bigint FROM pg_stat_statements \
             WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())",
        )
        .fetch_one(&mut conn)
        .await
        .ok();
        Ok(PgWork {
            wal,
            transactions,
            rows_written,
            statements,
        })
    }

    /// Creates `pg_stat_statements` in the scratch database, if the server preloads it, so
    /// that [`PgWork::read`] counts statements too. Before the first read: its own work is
    /// then not counted.
    pub(crate) async fn count_statements(url: &str) -> anyhow::Result<()> {
        let mut conn = sqlx::PgConnection::connect(url).await?;
        let _ = sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            .execute(&mut conn)
            .await;
        Ok(())
    }

    /// Waits until no other session is connected to the scratch database: a backend
    /// reports its counts when it exits, and exits some time after its client closed.
    pub(crate) async fn sessions_gone(url: &str) -> anyhow::Result<()> {
        let mut conn = sqlx::PgConnection::connect(url).await?;
        for _ in 0..100 {
            let others: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM pg_stat_activity \
                 WHERE datname = current_database() AND pid <> pg_backend_pid()",
            )
            .fetch_one(&mut conn)
            .await?;
            if others == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    /// The server's WAL position alone (it moves at once, unlike the counts).
    pub(crate) async fn wal(url: &str) -> anyhow::Result<i64> {
        let mut conn = sqlx::PgConnection::connect(url).await?;
        Ok(
            sqlx::query_scalar("SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint")
                .fetch_one(&mut conn)
                .await?,
        )
    }
}

/// Submits each CSV body as an import, one after another; each must be accepted.
pub(crate) async fn submit_all(
    addr: std::net::SocketAddr,
    token: &str,
    bodies: Vec<String>,
) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    for body in bodies {
        let resp = http
            .post(format!("http://{addr}/v1/imports"))
            .bearer_auth(token)
            .header("content-type", "text/csv")
            .body(body)
            .send()
            .await?;
        if resp.status() != 202 {
            bail!(
                "submit answered {}: {}",
                resp.status(),
                resp.text().await.unwrap_or_default()
            );
        }
    }
    Ok(())
}

/// Waits until `batches` batches ended, every one completed (10 minutes from `started`).
pub(crate) async fn wait_completed(
    db: &dataflow_platform::ledger::Db,
    batches: u64,
    started: Instant,
) -> anyhow::Result<()> {
    loop {
        let counts = db.batch_counts().await?;
        let done = counts
            .iter()
            .filter(|(s, _)| s.is_terminal())
            .map(|(_, n)| n)
            .sum::<u64>();
        if done >= batches {
            if let Some((s, n)) = counts.iter().find(|(s, _)| *s != BatchStatus::Completed) {
                bail!("{n} batches ended {s}");
            }
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(600) {
            bail!("batches did not complete within 10 minutes: {counts:?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A scratch folder under the system's temp dir, and the config of an embedded (SQLite)
/// DataFlow living in it.
pub(crate) fn scratch_config(run: &str) -> (std::path::PathBuf, Config) {
    let dir = std::env::temp_dir().join(format!("dataflow-bench-{run}"));
    let mut config = Config {
        data_dir: dir.clone(),
        ..Config::default()
    };
    config.database_url = Some(format!("sqlite://{}", dir.join("bench.db").display()));
    (dir, config)
}

/// Starts DataFlow on a free port with one client of `policy`; returns it, its address and
/// the client's API key.
pub(crate) async fn start_with_client(
    config: Config,
    roles: Roles,
    policy: &Policy,
) -> anyhow::Result<(App, std::net::SocketAddr, String)> {
    let app = App::start(config, roles, Some(TcpListener::bind("127.0.0.1:0").await?)).await?;
    let addr = app.addr.context("the API did not start")?;
    let db = &app.backends.db;
    let client = db.create_client("bench", policy).await?;
    let key = app.backends.hasher.generate();
    db.create_key(&client.id, &key.key_id, &key.hmac, Some("bench"))
        .await?;
    Ok((app, addr, key.token))
}

/// Rows like `id,name,email,amount,country,created` (about 100 bytes each).
pub(crate) fn csv_body(import: usize, records: usize) -> String {
    let mut s = String::with_capacity(records * 110 + 64);
    s.push_str("id,name,email,amount,country,created\n");
    for n in 0..records {
        use std::fmt::Write;
        let _ = writeln!(
            s,
            "i{import}-{n},Customer {n},customer{n}@example.com,{}.{:02},DE,2026-11-{:02}T10:00:00Z",
            n % 10_000,
            n % 100,
            n % 28 + 1
        );
    }
    s
}

/// Rows of ten fields: `id,qty,price,day,at,email,kind,code,name,note`.
fn ten_field_body(import: usize, records: usize) -> String {
    let mut s = String::with_capacity(records * 150 + 64);
    s.push_str("id,qty,price,day,at,email,kind,code,name,note\n");
    for n in 0..records {
        use std::fmt::Write;
        let _ = writeln!(
            s,
            "{},{},{}.{:02},2026-11-{:02},2026-11-{:02}T10:{:02}:00Z,customer{n}@example.com,{},\
             AB{:04},Customer {n},order note {n}",
            import * records + n,
            n % 1_000,
            n % 10_000,
            n % 100,
            n % 28 + 1,
            n % 28 + 1,
            n % 60,
            ["new", "paid", "shipped"][n % 3],
            n % 10_000,
        );
    }
    s
}

/// A schema typing and checking [`ten_field_body`]'s rows.
fn typed_schema() -> serde_json::Value {
    serde_json::json!({
        "fields": [
            {"name": "id", "type": "integer"},
            {"name": "qty", "type": "integer", "constraints": {"minimum": 0}},
            {"name": "price", "type": "number", "constraints": {"minimum": 0}},
            {"name": "day", "type": "date"},
            {"name": "at", "type": "datetime"},
            {"name": "email", "type": "string", "format": "email", "constraints": {"required": true}},
            {"name": "kind", "constraints": {"enum": ["new", "paid", "shipped"]}},
            {"name": "code", "constraints": {"pattern": "[A-Z]{2}[0-9]{4}"}},
            {"name": "name", "constraints": {"maxLength": 200}},
            {"name": "note"}
        ],
        "primaryKey": "id"
    })
}

/// A throwaway database on the server of a given URL.
struct ScratchDb {
    admin_url: String,
    name: String,
    url: String,
}

impl ScratchDb {
    async fn create(url: &str, run: &str) -> anyhow::Result<ScratchDb> {
        let name = format!("dataflow_bench_{run}");
        let base = url.rsplit_once('/').map_or(url, |(b, _)| b);
        let admin_url = format!("{base}/postgres");
        let mut conn = sqlx::PgConnection::connect(&admin_url)
            .await
            .context("connecting to PostgreSQL")?;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {name}"
        )))
        .execute(&mut conn)
        .await?;
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await?;
        Ok(ScratchDb {
            url: format!("{base}/{name}"),
            admin_url,
            name,
        })
    }

    async fn drop_db(self) -> anyhow::Result<()> {
        let mut conn = sqlx::PgConnection::connect(&self.admin_url).await?;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        )))
        .execute(&mut conn)
        .await?;
        Ok(())
    }
}

#[derive(Args, Debug, Clone)]
pub struct LimiterArgs {
    /// The Redis to measure against.
    #[arg(long, default_value = "redis://127.0.0.1:6379/")]
    pub redis_url: String,
    /// Decisions in the throughput run.
    #[arg(long, default_value_t = 200_000)]
    pub decisions: usize,
    /// Concurrent tasks (and `redis-benchmark` clients).
    #[arg(long, default_value_t = 50)]
    pub concurrency: usize,
    /// Sequential `POST /v1/imports` per latency run.
    #[arg(long, default_value_t = 2_000)]
    pub requests: usize,
}

/// `dataflow-bench limiter`: Redis GCRA decisions/s from many tasks against one client,
/// beside `redis-benchmark` running the same script at the same concurrency; then the
/// latency of `POST /v1/imports` with the Redis limiter and with the in-process one.
pub async fn limiter(args: LimiterArgs) -> anyhow::Result<()> {
    use dataflow_platform::guards::limiter::{Rate, RedisLimiter};
    use dataflow_platform::redis::{Purpose, Redis};
    use std::sync::Arc;

    let run = ulid::Ulid::new().to_string().to_lowercase();
    let prefix = format!("dataflow-bench-{run}");
    let redis = Redis::connect(&args.redis_url, &prefix, None, Purpose::State).await?;
    let limiter = Arc::new(RedisLimiter::new(redis.clone()));
    // Generous enough that every decision is an admit: the cost is the same either way.
    let rate = Rate {
        per_minute: 6_000_000,
        burst: 1_000_000,
    };
    limiter.check("warm-up", rate).await;
    let per_task = args.decisions / args.concurrency.max(1);
    let started = Instant::now();
    let tasks: Vec<_> = (0..args.concurrency)
        .map(|_| {
            let limiter = limiter.clone();
            tokio::spawn(async move {
                let mut admitted = 0usize;
                for _ in 0..per_task {
                    admitted += usize::from(limiter.check("one-client", rate).await.allowed);
                }
                admitted
            })
        })
        .collect();
    let mut admitted = 0;
    for t in tasks {
        admitted += t.await?;
    }
    let ours = (per_task * args.concurrency) as f64 / started.elapsed().as_secs_f64();
    anyhow::ensure!(
        admitted == per_task * args.concurrency,
        "the benchmark rate should admit everything"
    );

    let mut conn = redis.conn();
    let sha: String = redis::cmd("SCRIPT")
        .arg("LOAD")
        .arg(RedisLimiter::script_source())
        .query_async(&mut conn)
        .await?;
    let baseline = redis_benchmark_evalsha(&args, &sha, &redis.key(&["rl", "baseline"]))?;
    println!(
        "name=limiter decisions={} concurrency={} decisions_per_s={ours:.0} redis_benchmark_evalsha_per_s={baseline:.0} ratio={:.2} fallbacks=0",
        per_task * args.concurrency,
        args.concurrency,
        ours / baseline
    );

    let mut p = Vec::new();
    for label in ["in-process", "redis"] {
        let (p50, p99) = import_latency(&args, label == "redis", &prefix).await?;
        println!(
            "name=limiter-http limiter={label} requests={} p50_ms={p50:.3} p99_ms={p99:.3}",
            args.requests
        );
        p.push((p50, p99));
    }
    println!(
        "name=limiter-http-added p50_ms={:.3} p99_ms={:.3}",
        p[1].0 - p[0].0,
        p[1].1 - p[0].1
    );
    redis.delete_all_under_prefix().await?;
    Ok(())
}

/// `redis-benchmark … evalsha <sha> 1 <key> <args>`: the same script from a C client.
fn redis_benchmark_evalsha(args: &LimiterArgs, sha: &str, key: &str) -> anyhow::Result<f64> {
    let rest = args.redis_url.trim_start_matches("redis://");
    let host_port = rest.split('/').next().unwrap_or("127.0.0.1:6379");
    let host_port = host_port.rsplit('@').next().unwrap_or(host_port);
    let (host, port) = host_port.split_once(':').unwrap_or((host_port, "6379"));
    let out = std::process::Command::new("redis-benchmark")
        .args([
            "-h",
            host,
            "-p",
            port,
            "-c",
            &args.concurrency.to_string(),
            "-n",
            &args.decisions.to_string(),
        ])
        .args(["--csv", "evalsha", sha, "1", key, "10", "1000000"])
        .output()
        .context("running redis-benchmark (Debian package redis-tools)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("\"evalsha"))
        .with_context(|| format!("no evalsha line from redis-benchmark: {text}"))?;
    let rps = line
        .split(',')
        .nth(1)
        .context("malformed redis-benchmark line")?
        .trim_matches('"');
    Ok(rps.parse()?)
}

/// p50 and p99 (ms) of sequential single-record imports, on SQLite, with the in-process or
/// the Redis limiter (and the rest of the Redis tier with it).
async fn import_latency(
    args: &LimiterArgs,
    with_redis: bool,
    prefix: &str,
) -> anyhow::Result<(f64, f64)> {
    let (dir, mut config) = scratch_config(&ulid::Ulid::new().to_string().to_lowercase());
    if with_redis {
        config.redis_url = Some(dataflow_platform::config::Secret::new(
            args.redis_url.clone(),
        ));
        config.redis_prefix = format!("{prefix}-http");
    }
    let policy = Policy {
        rate_per_minute: 6_000_000,
        rate_burst: 1_000_000,
        ..Policy::default()
    };
    let (app, addr, token) = start_with_client(config, Roles::API, &policy).await?;
    let http = reqwest::Client::new();
    let mut latencies = Vec::with_capacity(args.requests);
    for i in 0..args.requests + 50 {
        let t = Instant::now();
        let resp = http
            .post(format!("http://{addr}/v1/imports"))
            .bearer_auth(&token)
            .header("content-type", "text/csv")
            .body(format!("id,n\n{i},{i}\n"))
            .send()
            .await?;
        anyhow::ensure!(resp.status() == 202, "submit answered {}", resp.status());
        // The first 50 warm the caches and connections.
        if i >= 50 {
            latencies.push(t.elapsed().as_secs_f64() * 1000.0);
        }
    }
    app.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
    latencies.sort_by(f64::total_cmp);
    Ok((percentile(&latencies, 0.50), percentile(&latencies, 0.99)))
}

//! `dataflow-bench jobs`: the job queue on Redis, measured the way
//! `../shared/bench/peers/` measures BullMQ and Sidekiq.
//!
//! - Throughput: `--jobs` no-op job intents are written to SQL (timed: `enqueue_s`), then one
//!   worker with `--concurrency` runs them; `process_s` ends when SQL records the last one
//!   done. So it covers the whole path: relay (SQL → Redis, bounded working set), take,
//!   handler, settle (SQL), acknowledge (Redis). The largest Redis working set seen is
//!   printed beside the configured bound.
//! - Idle pickup: the worker idles; `--latency-jobs` messages are pushed one at a time at
//!   `--rate`/s onto its Redis queue (what the relay does, and what Sidekiq's
//!   `perform_async` does); each handler measures push → start.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Args;
use dataflow_contracts::jobs::{JobKind, JobMessage, JobStatus};
use dataflow_contracts::{BatchId, ClientId, JobId};
use dataflow_platform::Backends;
use dataflow_platform::config::{APALIS_REDIS_MAX_WORKING_SET, RedisQueue, Secret};
use dataflow_platform::ledger::Handover;
use dataflow_worker::jobs::{self, JobError, JobHandler, JobsSetup};
use dataflow_worker::leader::Term;
use futures::future::BoxFuture;
use serde_json::value::RawValue;
use tokio::sync::{Mutex, watch};
use tokio_util::sync::CancellationToken;

#[derive(Args, Debug, Clone)]
pub struct JobsArgs {
    #[arg(long, default_value = "redis://127.0.0.1:6379/")]
    pub redis_url: String,
    /// Seed nodes of a Redis Cluster (comma-separated), in place of `--redis-url`.
    #[arg(long, value_delimiter = ',')]
    pub redis_cluster_urls: Vec<String>,
    /// `postgres://…` for the ledger; default: SQLite in a temporary folder.
    #[arg(long)]
    pub database_url: Option<String>,
    /// Jobs in the throughput run (written to SQL first, then processed).
    #[arg(long, default_value_t = 50_000)]
    pub jobs: usize,
    /// Jobs one worker runs at once.
    #[arg(long, default_value_t = 50)]
    pub concurrency: usize,
    /// The Redis queue: `lists` (DataFlow's own) or `apalis-redis`.
    #[arg(long, default_value = "lists")]
    pub queue: RedisQueue,
    /// Most jobs held in Redis at once (default: the configured default, capped for
    /// apalis-redis).
    #[arg(long)]
    pub working_set: Option<usize>,
    /// Jobs in the idle-pickup run, pushed one at a time.
    #[arg(long, default_value_t = 2_000)]
    pub latency_jobs: usize,
    /// Pushes per second in the idle-pickup run.
    #[arg(long, default_value_t = 500)]
    pub rate: u64,
}

/// Counts handler runs; with `latency`, records push → start from the message's `ts`.
struct Noop {
    ran: AtomicUsize,
    latencies_us: Mutex<Vec<u64>>,
}

impl JobHandler for Noop {
    fn handle<'a>(&'a self, job: &'a JobMessage) -> BoxFuture<'a, Result<(), JobError>> {
        Box::pin(async move {
            if let Some(ts) = serde_json::from_str::<serde_json::Value>(job.spec.get())
                .ok()
                .and_then(|v| v["ts"].as_u64())
            {
                let lat = now_us().saturating_sub(ts);
                self.latencies_us.lock().await.push(lat);
            }
            self.ran.fetch_add(1, Ordering::Relaxed);
            Ok(())
        })
    }
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

pub async fn run(args: JobsArgs) -> anyhow::Result<()> {
    let run = ulid::Ulid::new().to_string().to_lowercase();
    let (dir, mut config) = super::scratch_config(&run);
    let scratch = match &args.database_url {
        Some(url) if url.starts_with("postgres") => {
            Some(super::ScratchDb::create(url, &run).await?)
        }
        Some(_) => {
            anyhow::bail!("--database-url must be a postgres:// URL (SQLite is the default)")
        }
        None => None,
    };
    if let Some(s) = &scratch {
        config.database_url = Some(s.url.clone());
    }
    if args.redis_cluster_urls.is_empty() {
        config.redis_url = Some(Secret::new(args.redis_url.clone()));
    } else {
        config.redis_cluster_urls = args
            .redis_cluster_urls
            .iter()
            .cloned()
            .map(Secret::new)
            .collect();
    }
    config.redis_prefix = format!("dataflow-bench-{run}");
    config.jobs.concurrency = args.concurrency;
    config.jobs.redis_queue = args.queue;
    config.jobs.redis_working_set = match (args.working_set, args.queue) {
        (Some(n), _) => n,
        (None, RedisQueue::Lists) => config.jobs.redis_working_set,
        (None, RedisQueue::ApalisRedis) => APALIS_REDIS_MAX_WORKING_SET,
    };
    config.validate()?;
    let backends = Backends::build(&config).await?;
    let backend = if config.database_url().starts_with("sqlite") {
        "sqlite"
    } else {
        "postgres"
    };
    let result = measure(&args, &backends, &config, backend).await;
    if let Some(redis) = &backends.redis {
        redis.delete_all_under_prefix().await?;
    }
    backends.db.close().await;
    if let Some(s) = scratch {
        s.drop_db().await?;
    }
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn measure(
    args: &JobsArgs,
    backends: &Arc<Backends>,
    config: &dataflow_platform::Config,
    backend: &str,
) -> anyhow::Result<()> {
    let queue = backends.job_queue.clone().expect("Redis is configured");
    let kind = JobKind::Webhook;
    let queue_name = match config.jobs.redis_queue {
        RedisQueue::Lists => "lists",
        RedisQueue::ApalisRedis => "apalis-redis",
    };
    let redis = if config.redis_cluster_urls.is_empty() {
        "single"
    } else {
        "cluster"
    };
    let db = &backends.db;
    let noop = Arc::new(Noop {
        ran: AtomicUsize::new(0),
        latencies_us: Mutex::new(Vec::new()),
    });
    let start_workers = |stop: CancellationToken| {
        tokio::spawn(jobs::run(
            JobsSetup {
                db: db.clone(),
                queue: Some(queue.clone()),
                config: config.jobs.clone(),
                handler: noop.clone(),
                kinds: vec![kind],
                worker_id: format!("bench-{}", ulid::Ulid::new()),
                events: backends.publisher.subscribe(),
                commits: backends.db.commits().clone(),
                live: backends.live.clone(),
                // No election in a benchmark: every process sweeps.
                leading: watch::channel(Term::alone()).1,
            },
            stop,
        ))
    };

    // Throughput: write the intents, then process them.
    let started = Instant::now();
    write_intents(db, args.jobs).await?;
    let enqueue_s = started.elapsed().as_secs_f64();
    let stop = CancellationToken::new();
    let peak = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (queue, peak, stop) = (queue.clone(), peak.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                if let Ok(n) = queue.outstanding(kind).await {
                    peak.fetch_max(n, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let started = Instant::now();
    let workers = start_workers(stop.clone());
    loop {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if noop.ran.load(Ordering::Relaxed) >= args.jobs && all_done(db, args.jobs).await? {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(600),
            "jobs did not finish"
        );
    }
    let process_s = started.elapsed().as_secs_f64();
    stop.cancel();
    workers.await?;
    sampler.await?;
    println!(
        "name=dataflow-jobs queue={queue_name} redis={redis} backend={backend} jobs={} conc={} working_set={} enqueue_s={enqueue_s:.3} \
         enqueue_per_s={:.0} process_s={process_s:.3} jobs_per_s={:.0} handler_runs={} \
         peak_in_redis={}",
        args.jobs,
        args.concurrency,
        config.jobs.redis_working_set,
        args.jobs as f64 / enqueue_s,
        args.jobs as f64 / process_s,
        noop.ran.load(Ordering::Relaxed),
        peak.load(Ordering::Relaxed),
    );

    // Idle pickup: the worker waits; messages arrive one at a time. Each has its intent in
    // the ledger, handed over as the relay would, since a worker may look a job up there as
    // it starts (apalis-redis takes its delivery); only the push is timed.
    noop.latencies_us.lock().await.clear();
    write_intents(db, args.latency_jobs).await?;
    let mut pushes = db
        .take_due_jobs(kind, args.latency_jobs, Handover::Queue, 600_000)
        .await?;
    anyhow::ensure!(pushes.len() == args.latency_jobs, "intents not taken");
    let stop = CancellationToken::new();
    let workers = start_workers(stop.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let gap = Duration::from_secs_f64(1.0 / args.rate.max(1) as f64);
    let began = Instant::now();
    for (i, mut push) in pushes.drain(..).enumerate() {
        let due = began + gap * u32::try_from(i).unwrap_or(u32::MAX);
        tokio::time::sleep_until(due.into()).await;
        push.spec = RawValue::from_string(format!(r#"{{"kind":"webhook","ts":{}}}"#, now_us()))?;
        queue.push(kind, &[push]).await?;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while noop.latencies_us.lock().await.len() < args.latency_jobs && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.cancel();
    workers.await?;
    let mut lat = noop.latencies_us.lock().await.clone();
    anyhow::ensure!(
        lat.len() == args.latency_jobs,
        "{} of {} picked up",
        lat.len(),
        args.latency_jobs
    );
    lat.sort_unstable();
    let at = |q: f64| lat[((lat.len() as f64 - 1.0) * q).round() as usize] as f64 / 1000.0;
    println!(
        "name=dataflow-jobs-latency queue={queue_name} redis={redis} jobs={} rate={} conc={} p50_ms={:.3} p99_ms={:.3} max_ms={:.3}",
        args.latency_jobs,
        args.rate,
        args.concurrency,
        at(0.5),
        at(0.99),
        at(1.0)
    );
    Ok(())
}

/// `n` due intents of ~100 bytes each (the peers' payload size), 500 per statement.
async fn write_intents(db: &dataflow_platform::ledger::Db, n: usize) -> anyhow::Result<()> {
    let (batch, client) = (BatchId::generate(), ClientId::generate());
    let pad = "x".repeat(58);
    let mut tx = db.pool().begin().await?;
    for chunk_start in (0..n).step_by(500) {
        let rows = (chunk_start..n.min(chunk_start + 500))
            .map(|i| {
                format!(
                    "('{}', 'webhook', '{batch}', '{client}', '{{\"kind\":\"webhook\",\"i\":{i},\"pad\":\"{pad}\"}}', \
                      'pending', 0, 8, 0, 0, 0)",
                    JobId::generate()
                )
            })
            .collect::<Vec<_>>()
            .join(",");
        let sql = format!(
            "INSERT INTO jobs (id, kind, batch_id, client_id, spec, status, attempts, max_attempts, \
                               run_at, created_at, updated_at) VALUES {rows}"
        );
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(())
}

async fn all_done(db: &dataflow_platform::ledger::Db, n: usize) -> anyhow::Result<bool> {
    let done: u64 = db
        .job_counts()
        .await?
        .iter()
        .filter(|c| c.status == JobStatus::Done)
        .map(|c| c.count)
        .sum();
    Ok(done as usize >= n)
}

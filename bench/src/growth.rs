//! `dataflow-bench growth`: how the ledger's reads and prunes hold up as its tables grow.
//!
//! A real `dataflow` process (`all`: the API and a worker) fills a scratch ledger through
//! the API: imports of `--records` rows each, spread over `--clients` clients, every row a
//! new record (so 100,000 batches of 100 rows leave 10 million records, as many feed
//! entries, and the batches' jobs, events and reports). At each size in `--sizes` (batches
//! so far) the filling pauses and the run times, `--rounds` times each, what the system
//! runs against the ledger on a schedule or per request: a worker's claim with nothing to
//! take, the queue depths every `/metrics` scrape reads, the dashboard's overview, batch
//! search, queues and clients pages, the client API's listings and its changes feed, the
//! retention sweeps, the daily summary, the leader's minute sample for the charts and the
//! charts' day of samples, and one more small import from submit to completion. Each line
//! prints the median and the worst in milliseconds, so what grows with the ledger shows
//! between the sizes. The ledger is vacuumed and analysed before it is timed (as
//! autovacuum keeps it), unless `--no-vacuum` asks for it as the fill left it.

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use clap::Args;
use dataflow_contracts::{BatchStatus, ClientId};
use dataflow_platform::ledger::Db;
use dataflow_platform::ledger::batches::{Bundle, Claimable};
use dataflow_platform::ledger::charts::{MINUTE_MS, minute_of};
use dataflow_platform::ledger::jobs::JobFilter;
use dataflow_platform::ledger::operator::BatchFilter;
use serde_json::{Value, json};

use crate::processes::{Api, Processes, StackArgs, with_processes};
use crate::{csv_body, percentile};

#[derive(Args, Debug, Clone)]
pub struct GrowthArgs {
    #[command(flatten)]
    pub stack: StackArgs,
    /// Batches in the ledger when the operations are timed, in increasing order; the last
    /// is its final size.
    #[arg(long, value_delimiter = ',', default_values_t = [1_000, 100_000])]
    pub sizes: Vec<usize>,
    /// Rows of each import (each a new record).
    #[arg(long, default_value_t = 100)]
    pub records: usize,
    /// Clients the imports are spread over.
    #[arg(long, default_value_t = 10)]
    pub clients: usize,
    /// Times each operation is run at each size.
    #[arg(long, default_value_t = 7)]
    pub rounds: usize,
    /// Times the operations right after the fill, before any vacuum: the row versions
    /// every batch's and job's updates left are still in the indexes. By default the
    /// ledger is vacuumed and analysed first, as autovacuum keeps a ledger in steady use.
    #[arg(long)]
    pub no_vacuum: bool,
}

const DAY_MS: i64 = 86_400_000;
const WEEK_MS: i64 = 7 * DAY_MS;

pub async fn run(args: GrowthArgs) -> anyhow::Result<()> {
    ensure!(
        args.sizes.windows(2).all(|w| w[0] < w[1]) && !args.sizes.is_empty(),
        "--sizes must increase"
    );
    with_processes(&args.stack, async |p, backend| {
        grow(&args, p, backend).await
    })
    .await
}

async fn grow(args: &GrowthArgs, p: &mut Processes, backend: &str) -> anyhow::Result<()> {
    p.cli(&["migrate"])?;
    let open = json!({
        "rate_per_minute": 6_000_000,
        "rate_burst": 100_000,
        "max_concurrent_batches": 10_000,
    });
    let keys = (0..args.clients)
        .map(|i| {
            p.client(
                &format!("tenant-{i}"),
                &json!({"max_records": args.records}),
                &open,
            )
        })
        .collect::<anyhow::Result<Vec<String>>>()?;
    // One process for the API and the worker: a commit wakes the worker at once, so the
    // import timed end to end is not waiting for a poll.
    let api = p.start("all", 0, &keys[0]).await?;
    let ledger = Db::connect(&p.database_url, 2).await?;
    let clients: Vec<ClientId> = ledger
        .list_clients()
        .await?
        .into_iter()
        .map(|c| c.id)
        .collect();
    let mut filled = 0;
    let started = Instant::now();
    for &size in &args.sizes {
        api.fill(&keys, args.records, filled..size).await?;
        filled = size;
        wait_drained(&ledger, size).await?;
        if !args.no_vacuum {
            let tidy = match backend {
                "postgres" => "VACUUM (ANALYZE)",
                _ => "ANALYZE",
            };
            sqlx::query(tidy).execute(ledger.pool()).await?;
        }
        let records: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM records")
            .fetch_one(ledger.pool())
            .await?;
        println!(
            "name=growth backend={backend} batches={size} records={records} fill_s={:.0} \
             vacuumed={}",
            started.elapsed().as_secs_f64(),
            !args.no_vacuum
        );
        profile(args, &api, &keys, &ledger, &clients, size).await?;
    }
    ledger.close().await;
    Ok(())
}

/// Waits until the worker has completed every batch (the warm-up's too) and settled every
/// job: the ledger then stands still while it is measured.
async fn wait_drained(ledger: &Db, size: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(3_600);
    loop {
        let done = crate::submit::completed(ledger).await?;
        let depths = ledger.queue_depths().await?;
        let busy = depths
            .iter()
            .filter(|d| d.state != "dead")
            .map(|d| d.count)
            .sum::<u64>();
        if done >= size as u64 && busy == 0 {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "the ledger did not drain in an hour: {done} batches completed, {depths:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Times each operation `rounds` times and prints a line per operation.
async fn profile(
    args: &GrowthArgs,
    api: &Api,
    keys: &[String],
    ledger: &Db,
    clients: &[ClientId],
    size: usize,
) -> anyhow::Result<()> {
    let client = &clients[0];
    let key = &keys[0];
    let changes: i64 =
        sqlx::query_scalar("SELECT COALESCE(MAX(seq), 0) FROM record_changes WHERE client_id = $1")
            .bind(client.as_str())
            .fetch_one(ledger.pool())
            .await?;
    let middle = format!("/v1/changes?after={}&limit=100", changes / 2);
    let today = ledger.now_ms().await? / DAY_MS * DAY_MS;
    // Rows of their own: keys no import of the fill, or of another size's look, has.
    let mut import = 1_000_000_000 + size * args.rounds;
    for &op in OPS {
        let mut ms = Vec::with_capacity(args.rounds);
        for _ in 0..args.rounds {
            let t = Instant::now();
            match op {
                "claim_idle" => {
                    let took = ledger
                        .claim_next("growth-bench", 30_000, Claimable::AnyClient, Bundle::ONE)
                        .await?;
                    ensure!(took.is_empty(), "a claim found work in a drained ledger");
                }
                "queue_depths" => drop(ledger.queue_depths().await?),
                "overview_throughput" => {
                    ledger.throughput(5 * 60_000).await?;
                    ledger.throughput(60 * 60_000).await?;
                }
                "search_batches_24h" => {
                    let filter = BatchFilter {
                        max_age_ms: Some(DAY_MS),
                        ..BatchFilter::default()
                    };
                    ledger.search_batches(&filter, None, 50).await?;
                }
                "search_batches_dead" => {
                    let filter = BatchFilter {
                        status: Some(BatchStatus::Dead),
                        ..BatchFilter::default()
                    };
                    ledger.search_batches(&filter, None, 50).await?;
                }
                "client_queues" => drop(ledger.client_queues().await?),
                "job_counts" => drop(ledger.job_counts().await?),
                "dead_jobs" => {
                    let filter = JobFilter {
                        status: Some(dataflow_contracts::jobs::JobStatus::Dead),
                        ..JobFilter::default()
                    };
                    ledger.list_jobs(&filter, None, 50).await?;
                }
                "storage_by_client" => drop(ledger.storage_by_client().await?),
                "prune_done_jobs" => drop(ledger.prune_done_jobs(WEEK_MS, 1_000).await?),
                "prune_published" => drop(ledger.prune_published(WEEK_MS).await?),
                "expire_payloads_all_clients" => {
                    for c in clients {
                        ledger.expire_payloads(c, WEEK_MS, 100).await?;
                    }
                }
                "daily_summary" => drop(ledger.compute_daily_summary(client, today).await?),
                "chart_sample_minute" => {
                    let now = ledger.now_ms().await?;
                    drop(
                        ledger
                            .measure_minute(minute_of(now) - MINUTE_MS, None)
                            .await?,
                    );
                }
                "chart_samples_day" => {
                    let since = ledger.now_ms().await? - DAY_MS;
                    drop(ledger.chart_samples(None, since).await?);
                    drop(ledger.chart_samples(Some(client), since).await?);
                }
                "api_batches" => get(api, key, "/v1/batches?limit=50").await?,
                "api_batches_completed" => {
                    get(api, key, "/v1/batches?status=completed&limit=50").await?
                }
                "api_records" => get(api, key, "/v1/records?limit=50").await?,
                "api_changes_middle" => get(api, key, &middle).await?,
                "import_end_to_end" => {
                    let batch = api.submit(key, csv_body(import, args.records)).await?;
                    import += 1;
                    api.completion(key, &batch, "growth").await?;
                    // By the ledger's clock, from the batch's creation to its completion
                    // (the look above polls).
                    let took: i64 = sqlx::query_scalar(
                        "SELECT completed_at - created_at FROM batches WHERE id = $1",
                    )
                    .bind(&batch)
                    .fetch_one(ledger.pool())
                    .await?;
                    ms.push(took as f64);
                    continue;
                }
                other => unreachable!("no operation {other}"),
            }
            ms.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        ms.sort_by(f64::total_cmp);
        println!(
            "name=growth_op batches={size} op={op} median_ms={:.2} max_ms={:.2}",
            percentile(&ms, 0.5),
            ms[ms.len() - 1]
        );
    }
    Ok(())
}

/// What is timed, in the order it is printed.
const OPS: &[&str] = &[
    "claim_idle",
    "queue_depths",
    "overview_throughput",
    "search_batches_24h",
    "search_batches_dead",
    "client_queues",
    "job_counts",
    "dead_jobs",
    "storage_by_client",
    "prune_done_jobs",
    "prune_published",
    "expire_payloads_all_clients",
    "daily_summary",
    "chart_sample_minute",
    "chart_samples_day",
    "api_batches",
    "api_batches_completed",
    "api_records",
    "api_changes_middle",
    "import_end_to_end",
];

async fn get(api: &Api, key: &str, path: &str) -> anyhow::Result<()> {
    let body: Value = api
        .get(key, path)
        .await
        .with_context(|| format!("GET {path}"))?;
    ensure!(body.get("items").is_some(), "GET {path}: {body}");
    Ok(())
}

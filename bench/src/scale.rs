//! `dataflow-bench scale`: the worker fleet's own pace as it grows, and what each batch
//! costs the ledger.
//!
//! For each count of worker processes (`--workers 1,2,4`) and each shape of batch (big
//! files, small ones), one API process fills a scratch ledger with a backlog, and only then
//! do the workers start and drain it: nothing else runs while they do. The pace is taken
//! from the ledger's own clock, from the first batch's start to the last one's completion.
//! On PostgreSQL the run also reads the server's statistics around the drain: WAL bytes,
//! transactions and rows written per batch (statements too, when `pg_stat_statements` is
//! loaded), and the CPU time of PostgreSQL's processes beside that of the workers.

use std::time::{Duration, Instant};

use anyhow::ensure;
use clap::{Args, ValueEnum};
use serde_json::json;

use crate::PgWork;
use crate::processes::{Processes, StackArgs, postgres_cpu, with_processes};

#[derive(Args, Debug, Clone)]
pub struct ScaleArgs {
    #[command(flatten)]
    pub stack: StackArgs,
    /// Worker processes, one run each.
    #[arg(long, value_delimiter = ',', default_values_t = [1, 2, 4])]
    pub workers: Vec<usize>,
    /// The shapes of batch, one run each.
    #[arg(long, value_delimiter = ',', default_values_t = [Shape::Big, Shape::Small])]
    pub shapes: Vec<Shape>,
    /// Big batches in a backlog, and their records.
    #[arg(long, default_value_t = 20)]
    pub big: usize,
    #[arg(long, default_value_t = 50_000)]
    pub big_records: usize,
    /// Small batches in a backlog, and their records.
    #[arg(long, default_value_t = 5_000)]
    pub small: usize,
    #[arg(long, default_value_t = 10)]
    pub small_records: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Shape {
    Big,
    Small,
}

impl std::fmt::Display for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Shape::Big => "big",
            Shape::Small => "small",
        })
    }
}

pub async fn run(args: ScaleArgs) -> anyhow::Result<()> {
    for &workers in &args.workers {
        for &shape in &args.shapes {
            with_processes(&args.stack, async |p, backend| {
                drain(&args, p, backend, workers, shape).await
            })
            .await?;
        }
    }
    Ok(())
}

async fn drain(
    args: &ScaleArgs,
    p: &mut Processes,
    backend: &str,
    workers: usize,
    shape: Shape,
) -> anyhow::Result<()> {
    let (batches, records) = match shape {
        Shape::Big => (args.big, args.big_records),
        Shape::Small => (args.small, args.small_records),
    };
    p.cli(&["migrate"])?;
    // One client whose limits stay out of the way: the fleet is what is measured.
    let open = json!({
        "rate_per_minute": 6_000_000,
        "rate_burst": 100_000,
        "max_concurrent_batches": 10_000,
    });
    let key = p.client("producer", &json!({"max_records": records}), &open)?;
    let api = p.start_api("serve").await?;

    // The backlog, from a few submitters at once.
    api.fill(&[key], records, 0..batches).await?;
    // The API goes before the drain, and its sessions with it: PostgreSQL's counts of a
    // session are complete once it has exited.
    p.stop();
    let url = p.database_url.clone();
    let before = match backend {
        "postgres" => {
            PgWork::count_statements(&url).await?;
            PgWork::sessions_gone(&url).await?;
            Some((PgWork::read(&url).await?, postgres_cpu()?))
        }
        _ => None,
    };
    let ledger = dataflow_platform::ledger::Db::connect(&url, 1).await?;
    p.spawn_workers(workers)?;
    let deadline = Instant::now() + Duration::from_secs(1_800);
    // Each look is one transaction of the ledger's, taken off its counts below.
    let mut looks = 0;
    loop {
        looks += 1;
        if crate::submit::completed(&ledger).await? >= batches as u64 {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the backlog was not drained in 30 minutes"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (first_start, last_end): (i64, i64) =
        sqlx::query_as("SELECT MIN(started_at), MAX(completed_at) FROM batches")
            .fetch_one(ledger.pool())
            .await?;
    let drain_s = (last_end - first_start) as f64 / 1000.0;
    // From each worker's start: its start-up and its first look are counted too.
    let dataflow_cpu: f64 = p.cpu_seconds()?.iter().map(|(_, s)| s).sum();
    let after_drain = match before {
        Some(_) => Some((PgWork::wal(&url).await?, postgres_cpu()?)),
        None => None,
    };
    let peaks = p.peaks_line()?;
    ledger.close().await;
    p.stop();
    print!(
        "name=scale backend={backend} workers={workers} shape={shape} batches={batches} \
         records_per_batch={records} drain_s={drain_s:.2} records_s={:.0} batches_s={:.0} \
         cpu_workers_s={dataflow_cpu:.1}",
        (batches * records) as f64 / drain_s,
        batches as f64 / drain_s,
    );
    if let (Some((before, cpu_before)), Some((wal, cpu_after))) = (before, after_drain) {
        PgWork::sessions_gone(&url).await?;
        let after = PgWork::read(&url).await?;
        let per = 1.0 / batches as f64;
        let postgres_cpu = cpu_after - cpu_before;
        print!(
            " cpu_postgres_s={postgres_cpu:.1} postgres_cpu_per_worker_cpu={:.2} \
             wal_kib_per_batch={:.1} transactions_per_batch={:.2} rows_written_per_batch={:.1}",
            postgres_cpu / dataflow_cpu,
            (wal - before.wal) as f64 / 1024.0 * per,
            (after.transactions - before.transactions - looks) as f64 * per,
            (after.rows_written - before.rows_written) as f64 * per,
        );
        if let (Some(s0), Some(s1)) = (before.statements, after.statements) {
            print!(" statements_per_batch={:.1}", (s1 - s0) as f64 * per);
        }
    }
    println!("{peaks}");
    Ok(())
}

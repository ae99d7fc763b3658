//! `dataflow-bench records`: what reading a client's records costs.
//!
//! 1. Ingests `--table` records (imports of `--per-import`), then dry-runs a file of as many rows
//!    against them (`POST /v1/imports?dry_run=true`; a third of the rows changed, the
//!    rest the same): rows/s, and the process's peak memory during the call.
//! 2. Ingests more, up to `--export` records, and exports them all as NDJSON (`GET
//!    /v1/records`, `Accept: application/x-ndjson`), reading the stream as it comes:
//!    records/s, and the peak memory during the export.
//!
//! The peak is the process's high-water mark of resident memory (`VmHWM`), reset before
//! each measurement (Linux: `/proc/self/clear_refs`), beside its resident memory just
//! before; the server and the client reading it share the process, as in `ingest`.

use std::time::Instant;

use anyhow::{Context, bail};
use clap::Args;
use dataflow::Roles;
use dataflow_contracts::Policy;
use dataflow_contracts::http::DryRunView;

use super::{ScratchLedger, csv_body, start_with_client, submit_all, wait_completed};

#[derive(Args, Debug, Clone)]
pub struct RecordsArgs {
    /// Records stored before the dry run, and rows of the file it reads.
    #[arg(long, default_value_t = 500_000)]
    pub table: usize,
    /// Records stored before the export.
    #[arg(long, default_value_t = 1_000_000)]
    pub export: usize,
    /// Records per import that fills the table.
    #[arg(long, default_value_t = 50_000)]
    pub per_import: usize,
    /// `postgres://…` to benchmark PostgreSQL (a scratch database is created and dropped);
    /// default: SQLite in a temporary folder.
    #[arg(long)]
    pub database_url: Option<String>,
}

pub async fn run(args: RecordsArgs) -> anyhow::Result<()> {
    let per = args.per_import.max(1);
    if args.export < args.table
        || !args.table.is_multiple_of(per)
        || !args.export.is_multiple_of(per)
    {
        bail!("--table and --export are multiples of --per-import, --export at least --table");
    }
    let run = ulid::Ulid::new().to_string().to_lowercase();
    let ledger = ScratchLedger::create(args.database_url.as_deref(), &run).await?;
    let mut config = ledger.config.clone();
    config.worker.concurrency = 4;
    config.worker.chunk_size = 5_000;
    // A dry run reads the whole file in one request.
    config.api.max_body_bytes = 256 * 1024 * 1024;
    config.api.request_timeout_secs = 600;
    config.validate()?;
    let backend = ledger.backend;
    let result = measure(&args, config, backend).await;
    ledger.remove().await?;
    result
}

async fn measure(
    args: &RecordsArgs,
    config: dataflow_platform::Config,
    backend: &str,
) -> anyhow::Result<()> {
    let policy = Policy {
        rate_per_minute: 1_000_000,
        rate_burst: 10_000,
        max_records: args.table as u64,
        max_payload_bytes: 256 * 1024 * 1024,
        dedup_window_secs: 0,
        ..Policy::default()
    };
    let (app, addr, token) = start_with_client(config, Roles::ALL, &policy).await?;
    let db = app.backends.db.clone();
    let imports = |range: std::ops::Range<usize>| -> Vec<String> {
        range.map(|i| csv_body(i, args.per_import)).collect()
    };
    let stored = args.table / args.per_import;
    let started = Instant::now();
    submit_all(addr, &token, imports(0..stored)).await?;
    wait_completed(&db, stored as u64, started).await?;

    // The same keys as the table: two rows in three unchanged, one in three with a new name.
    let mut file = String::from("id,name,email,amount,country,created\n");
    for i in 0..stored {
        for (n, line) in csv_body(i, args.per_import).lines().skip(1).enumerate() {
            if n % 3 == 0 {
                file.push_str(&line.replacen("Customer", "Client", 1));
            } else {
                file.push_str(line);
            }
            file.push('\n');
        }
    }
    let http = reqwest::Client::new();
    let before = rss_kib("VmRSS")?;
    reset_peak()?;
    let started = Instant::now();
    let resp = http
        .post(format!("http://{addr}/v1/imports?dry_run=true"))
        .bearer_auth(&token)
        .header("content-type", "text/csv")
        .body(file)
        .send()
        .await?;
    if resp.status() != 200 {
        bail!(
            "the dry run answered {}: {}",
            resp.status(),
            resp.text().await?
        );
    }
    let view: DryRunView = resp.json().await?;
    let dry_s = started.elapsed().as_secs_f64();
    let dry_peak = rss_kib("VmHWM")?;
    if view.would_update as usize != stored * args.per_import.div_ceil(3) {
        bail!("the dry run saw {} updates: {view:?}", view.would_update);
    }
    print!(
        "name=records backend={backend} table={} dry_run_s={dry_s:.3} \
         dry_run_rows_per_s={:.0} dry_run_rss_before_mib={:.0} dry_run_peak_mib={:.0}",
        args.table,
        args.table as f64 / dry_s,
        before as f64 / 1024.0,
        dry_peak as f64 / 1024.0,
    );

    let total = args.export / args.per_import;
    let started = Instant::now();
    submit_all(addr, &token, imports(stored..total)).await?;
    wait_completed(&db, total as u64, started).await?;
    let before = rss_kib("VmRSS")?;
    reset_peak()?;
    let started = Instant::now();
    let resp = http
        .get(format!("http://{addr}/v1/records"))
        .bearer_auth(&token)
        .header("accept", "application/x-ndjson")
        .send()
        .await?;
    let mut resp = resp;
    let (mut lines, mut bytes) = (0usize, 0usize);
    while let Some(chunk) = resp.chunk().await.context("the export broke off")? {
        lines += chunk.iter().filter(|b| **b == b'\n').count();
        bytes += chunk.len();
    }
    let export_s = started.elapsed().as_secs_f64();
    let export_peak = rss_kib("VmHWM")?;
    if lines != args.export {
        bail!("the export held {lines} records, not {}", args.export);
    }
    println!(
        " export={} export_s={export_s:.3} export_records_per_s={:.0} export_mib={:.1} \
         export_rss_before_mib={:.0} export_peak_mib={:.0}",
        args.export,
        args.export as f64 / export_s,
        bytes as f64 / 1_048_576.0,
        before as f64 / 1024.0,
        export_peak as f64 / 1024.0,
    );
    app.stop().await;
    Ok(())
}

/// A memory figure of this process from `/proc/self/status`, in KiB.
fn rss_kib(field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
        .with_context(|| format!("no {field} in /proc/self/status"))
}

/// Starts a new high-water mark of resident memory from what is resident now.
fn reset_peak() -> anyhow::Result<()> {
    std::fs::write("/proc/self/clear_refs", "5").context("resetting the peak memory (Linux)")
}

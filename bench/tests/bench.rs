//! Each benchmark runs end to end (tiny sizes: this checks it works, not its speed).

// Tests fail loudly on the first unexpected value; that is what unwrap is for here.
#![allow(clippy::unwrap_used)]

// The services' addresses, the skip rule and the harness, shared with the end-to-end tests
// (which use more of them than this target does).
#[allow(dead_code)]
#[path = "../../tests/common"]
mod common {
    pub mod harness;
    pub mod services;
}

use common::harness::register;
use common::services::{self, test_amqp_url, test_redis_url};
use dataflow_bench::{IngestArgs, ingest};
use dataflow_platform::config::RedisQueue;

fn tiny(database_url: Option<String>) -> IngestArgs {
    IngestArgs {
        imports: 2,
        records: 200,
        database_url,
        concurrency: 2,
        chunk_size: 50,
        records_in_memory: None,
        fast_commits: false,
        ten_fields: false,
        schema: false,
    }
}

async fn ingest_bench_runs_on_sqlite() {
    ingest(tiny(None)).await.unwrap();
}
register!(ingest_bench_runs_on_sqlite);

async fn ingest_bench_runs_on_postgres() {
    let url = services::test_pg_admin_url();
    if let Err(e) = sqlx::PgPool::connect(&url).await {
        services::unreachable::<()>("PostgreSQL", &e.to_string());
        return;
    }
    ingest(tiny(Some(url.clone()))).await.unwrap();
    let typed = IngestArgs {
        ten_fields: true,
        schema: true,
        ..tiny(Some(url))
    };
    ingest(typed).await.unwrap();
}
register!(ingest_bench_runs_on_postgres);

async fn records_bench_runs() {
    let args = dataflow_bench::records::RecordsArgs {
        table: 400,
        export: 800,
        per_import: 200,
        database_url: None,
    };
    dataflow_bench::records::run(args).await.unwrap();
}
register!(records_bench_runs);

async fn limiter_bench_runs() {
    let Some(redis_url) = test_redis_url().await else {
        return;
    };
    let args = dataflow_bench::LimiterArgs {
        redis_url,
        decisions: 2_000,
        concurrency: 10,
        requests: 20,
    };
    dataflow_bench::limiter(args).await.unwrap();
}
register!(limiter_bench_runs);

async fn jobs_bench_runs_on_both_redis_queues() {
    let Some(redis_url) = test_redis_url().await else {
        return;
    };
    for queue in [RedisQueue::Lists, RedisQueue::ApalisRedis] {
        let args = dataflow_bench::jobs::JobsArgs {
            redis_url: redis_url.clone(),
            redis_cluster_urls: Vec::new(),
            database_url: None,
            jobs: 500,
            concurrency: 10,
            queue,
            working_set: Some(100),
            latency_jobs: 20,
            rate: 200,
        };
        dataflow_bench::jobs::run(args).await.unwrap();
    }
}
register!(jobs_bench_runs_on_both_redis_queues);

async fn amqp_bench_runs() {
    let Some(amqp_url) = test_amqp_url().await else {
        return;
    };
    let samples = std::env::temp_dir().join(format!(
        "dataflow-test-amqp-samples-{}.csv",
        ulid::Ulid::new().to_string().to_lowercase()
    ));
    let args = dataflow_bench::amqp::AmqpArgs {
        amqp_url,
        database_url: None,
        samples: Some(samples.clone()),
        batches: 10,
        rate: 200,
        concurrency: 4,
        db_connections: 10,
        runs: dataflow_bench::amqp::Runs::Both,
        events: 500,
        confirm_window: 100,
        relay_batch: 200,
        rounds: 2,
    };
    dataflow_bench::amqp::run(args).await.unwrap();
    // One line per measured batch and run, each with its relay and start times.
    let csv = std::fs::read_to_string(&samples).unwrap();
    std::fs::remove_file(&samples).unwrap();
    let lines: Vec<Vec<&str>> = csv.lines().map(|l| l.split(',').collect()).collect();
    assert_eq!(lines.len(), 20, "{csv}");
    for line in &lines {
        assert_eq!(line.len(), 4, "{csv}");
        assert!(["broker", "polling"].contains(&line[0]), "{csv}");
        for time in &line[2..] {
            assert!(time.parse::<i64>().unwrap() >= 0, "{csv}");
        }
    }
}
register!(amqp_bench_runs);

/// The benchmarks that run `dataflow` itself as processes run the debug binary that
/// `cargo test --workspace` builds beside this test (`target/debug/dataflow`), on SQLite.
fn debug_processes() -> dataflow_bench::processes::StackArgs {
    let deps = std::env::current_exe().unwrap();
    let bin = deps.parent().unwrap().parent().unwrap().join("dataflow");
    assert!(
        bin.exists(),
        "no {}: build it first (cargo build -p dataflow)",
        bin.display()
    );
    dataflow_bench::processes::StackArgs {
        bin,
        database_url: None,
        redis_url: None,
        amqp_url: None,
        env: Vec::new(),
        keep_ledger: false,
    }
}

async fn neighbours_bench_runs_as_processes() {
    let args = dataflow_bench::neighbours::NeighboursArgs {
        stack: debug_processes(),
        workers: 2,
        flood: 4,
        flood_records: 300,
        imports: 3,
        records: 50,
        interval_ms: 100,
        flood_only: false,
    };
    // The benchmark's HTTP client needs TLS's provider, which an in-process DataFlow would
    // have installed.
    dataflow_platform::install_crypto_provider();
    dataflow_bench::neighbours::run(args).await.unwrap();
}
register!(neighbours_bench_runs_as_processes);

/// The submit benchmark's load against `dataflow` processes (the hello ceiling runs this
/// benchmark's own binary, which a test is not).
async fn submit_bench_runs_as_processes() {
    let args = dataflow_bench::submit::SubmitArgs {
        stack: debug_processes(),
        workers: 1,
        connections: 4,
        seconds: 1,
        records: 5,
        no_ceiling: true,
    };
    dataflow_platform::install_crypto_provider();
    dataflow_bench::submit::run(args).await.unwrap();
}
register!(submit_bench_runs_as_processes);

/// The growth benchmark's fill and every timed operation, at two tiny sizes.
async fn growth_bench_runs_as_processes() {
    let args = dataflow_bench::growth::GrowthArgs {
        stack: debug_processes(),
        sizes: vec![3, 6],
        records: 5,
        clients: 2,
        rounds: 1,
        no_vacuum: false,
    };
    dataflow_platform::install_crypto_provider();
    dataflow_bench::growth::run(args).await.unwrap();
}
register!(growth_bench_runs_as_processes);

fn main() -> std::process::ExitCode {
    common::harness::main()
}

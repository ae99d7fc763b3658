//! `dataflow-bench submit`: small imports by the thousand, the way many producers send them.
//!
//! `--connections` clients each send a `--records`-row CSV import, wait for the answer and
//! send the next, for `--seconds` (wrk's closed loop; a `429` is counted, not waited out).
//! Every body is different, so each accepted one is a new, durable import. It reports the
//! accepted imports/s with the answer's latency, then how soon the workers completed them
//! all (batches/s from the first submit to the last completion), the workers' own pace on
//! the backlog left when the load stopped (the API process then idle), and each process's
//! peak resident memory.
//!
//! The load comes from this process; DataFlow runs as real processes
//! ([`crate::processes`]). Beside it, the same load against an axum "hello" server (this
//! binary, `dataflow-bench hello`, as its own process) gives the HTTP ceiling of the same
//! sitting.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use clap::Args;
use serde_json::json;

use crate::processes::{Processes, StackArgs, cpu_seconds, postgres_cpu, with_processes};
use crate::{csv_body, percentile};

#[derive(Args, Debug, Clone)]
pub struct SubmitArgs {
    #[command(flatten)]
    pub stack: StackArgs,
    /// Worker processes beside the API process; 0 runs one `dataflow all` instead.
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// Requests in flight at once, each on its own connection.
    #[arg(long, default_value_t = 64)]
    pub connections: usize,
    /// How long the load lasts.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Records in each import.
    #[arg(long, default_value_t = 10)]
    pub records: usize,
    /// Skip the axum hello ceiling.
    #[arg(long)]
    pub no_ceiling: bool,
}

pub async fn run(args: SubmitArgs) -> anyhow::Result<()> {
    let ceiling = if args.no_ceiling {
        None
    } else {
        Some(hello_ceiling(&args).await?)
    };
    with_processes(&args.stack, async |p, backend| {
        measure(&args, p, backend, ceiling).await
    })
    .await
}

async fn measure(
    args: &SubmitArgs,
    p: &mut Processes,
    backend: &str,
    ceiling: Option<f64>,
) -> anyhow::Result<()> {
    p.cli(&["migrate"])?;
    let open = json!({"rate_per_minute": 6_000_000, "rate_burst": 100_000});
    let key = p.client("producer", &json!({"max_records": args.records}), &open)?;
    let first = if args.workers == 0 { "all" } else { "serve" };
    p.start(first, args.workers, &key).await?;

    let url = format!("http://{}/v1/imports", p.addr);
    let cpu = CpuSpent::since(p, backend == "postgres")?;
    let next = Arc::new(AtomicUsize::new(0));
    let records = args.records;
    let started = Instant::now();
    let load = load(args, move |http| {
        let i = next.fetch_add(1, Ordering::Relaxed);
        http.post(&url)
            .bearer_auth(&key)
            .header("content-type", "text/csv")
            .body(csv_body(i, records))
    })
    .await?;
    let accepted = load.answered(202);
    let submit_s = load.seconds;

    // The workers' pace: the first submit to the moment the last accepted one completed,
    // and, on its own, the backlog the load left, drained with the API process idle.
    let ledger = dataflow_platform::ledger::Db::connect(&p.database_url, 1).await?;
    let deadline = Instant::now() + Duration::from_secs(600);
    // The warm-up's batch is one of them.
    let (left, drain_started) = (
        accepted as u64 + 1 - completed(&ledger).await?,
        Instant::now(),
    );
    // The looks count only the batches still to run, through the claim index: a count of
    // every batch by status reads the whole table, and at this pace took a large share of
    // PostgreSQL's CPU from the workers it was timing.
    let done_s = loop {
        let unfinished = unfinished(&ledger).await?;
        if unfinished == 0 {
            break started.elapsed().as_secs_f64();
        }
        ensure!(
            Instant::now() < deadline,
            "{unfinished} of {accepted} batches still unfinished after 10 minutes"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let drain_s = drain_started.elapsed().as_secs_f64();
    let cpu = cpu.per_batch(p, accepted as f64)?;
    let completed = completed(&ledger).await?;
    ensure!(
        completed > accepted as u64,
        "{completed} of {} batches completed; the others ended otherwise",
        accepted + 1
    );
    let ceiling = ceiling.map_or(String::new(), |c| {
        format!(
            " hello_req_s={c:.0} accepted_per_hello={:.4}",
            accepted as f64 / submit_s / c
        )
    });
    println!(
        "name=submit backend={backend} workers={} connections={} records={} seconds={submit_s:.1} \
         accepted={accepted} accepted_s={:.0} refused_429={} other={} p50_ms={:.1} p99_ms={:.1} \
         completed_batches_s={:.0} completed_records_s={:.0} backlog_after_load={left} \
         drained_batches_s={:.0}{ceiling}{cpu}{}",
        args.workers,
        args.connections,
        args.records,
        accepted as f64 / submit_s,
        load.answered(429),
        load.requests - accepted - load.answered(429),
        load.at(0.50),
        load.at(0.99),
        accepted as f64 / done_s,
        (accepted * args.records) as f64 / done_s,
        left as f64 / drain_s,
        p.peaks_line()?,
    );
    ensure!(
        load.requests == accepted + load.answered(429),
        "answers other than 202 and 429: {:?}",
        load.statuses
    );
    Ok(())
}

/// Batches still to run: `ready` or `processing`.
async fn unfinished(ledger: &dataflow_platform::ledger::Db) -> anyhow::Result<u64> {
    Ok(ledger
        .queue_depths()
        .await?
        .iter()
        .filter(|d| d.queue == "batches" && matches!(d.state.as_str(), "ready" | "processing"))
        .map(|d| d.count)
        .sum())
}

/// The CPU time each part of the run has used since it was made: DataFlow's processes,
/// PostgreSQL's (when the ledger is there) and this load generator.
struct CpuSpent {
    processes: Vec<(String, f64)>,
    postgres: Option<f64>,
    load: f64,
}

impl CpuSpent {
    fn since(p: &Processes, postgres: bool) -> anyhow::Result<CpuSpent> {
        Ok(CpuSpent {
            processes: p.cpu_seconds()?,
            postgres: postgres.then(postgres_cpu).transpose()?,
            load: cpu_seconds(std::process::id())?,
        })
    }

    /// What each part spent per batch since `self`, in CPU microseconds, as `key=value`
    /// fields (` cpu_us_per_batch_serve=…`), with their sum: the CPU a batch costs the
    /// whole machine, submit to completion, which is what sets its ceiling on this one.
    fn per_batch(self, p: &Processes, batches: f64) -> anyhow::Result<String> {
        let now = CpuSpent::since(p, self.postgres.is_some())?;
        let mut parts: Vec<(String, f64)> = now
            .processes
            .iter()
            .map(|(name, s)| {
                let before = self.processes.iter().find(|(n, _)| n == name);
                (name.replace('-', "_"), s - before.map_or(0.0, |(_, b)| *b))
            })
            .collect();
        if let (Some(before), Some(after)) = (self.postgres, now.postgres) {
            parts.push(("postgres".to_owned(), after - before));
        }
        parts.push(("load".to_owned(), now.load - self.load));
        let total: f64 = parts.iter().map(|(_, s)| s).sum();
        parts.push(("total".to_owned(), total));
        Ok(parts
            .iter()
            .map(|(name, s)| format!(" cpu_us_per_batch_{name}={:.0}", s * 1e6 / batches.max(1.0)))
            .collect())
    }
}

pub(crate) async fn completed(ledger: &dataflow_platform::ledger::Db) -> anyhow::Result<u64> {
    Ok(ledger
        .batch_counts()
        .await?
        .into_iter()
        .filter(|(status, _)| *status == dataflow_contracts::BatchStatus::Completed)
        .map(|(_, n)| n)
        .sum())
}

/// What a load got: answers by status, and the latency of every answer in milliseconds.
struct Load {
    requests: usize,
    statuses: Vec<(u16, usize)>,
    latencies: Vec<f64>,
    seconds: f64,
}

impl Load {
    fn answered(&self, status: u16) -> usize {
        self.statuses
            .iter()
            .find(|(s, _)| *s == status)
            .map_or(0, |(_, n)| *n)
    }

    fn at(&self, q: f64) -> f64 {
        percentile(&self.latencies, q)
    }
}

/// `args.connections` closed loops sending `request`s for `args.seconds`.
async fn load(
    args: &SubmitArgs,
    request: impl Fn(&reqwest::Client) -> reqwest::RequestBuilder + Send + Sync + 'static,
) -> anyhow::Result<Load> {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.connections)
        .build()?;
    let request = Arc::new(request);
    let started = Instant::now();
    let until = started + Duration::from_secs(args.seconds);
    let loops: Vec<_> = (0..args.connections)
        .map(|_| {
            let (http, request) = (http.clone(), request.clone());
            tokio::spawn(async move {
                let mut answers = Vec::new();
                while Instant::now() < until {
                    let sent = Instant::now();
                    let resp = request(&http).send().await?;
                    let status = resp.status().as_u16();
                    // Read to the end: the connection is reused for the next request.
                    resp.bytes().await?;
                    answers.push((status, sent.elapsed().as_secs_f64() * 1000.0));
                }
                anyhow::Ok(answers)
            })
        })
        .collect();
    let mut answers = Vec::new();
    for l in loops {
        answers.extend(l.await??);
    }
    let seconds = started.elapsed().as_secs_f64();
    let mut statuses: Vec<(u16, usize)> = Vec::new();
    for (status, _) in &answers {
        match statuses.iter_mut().find(|(s, _)| s == status) {
            Some((_, n)) => *n += 1,
            None => statuses.push((*status, 1)),
        }
    }
    let mut latencies: Vec<f64> = answers.iter().map(|(_, ms)| *ms).collect();
    latencies.sort_by(f64::total_cmp);
    ensure!(!latencies.is_empty(), "no request was answered");
    Ok(Load {
        requests: answers.len(),
        statuses,
        latencies,
        seconds,
    })
}

/// The same load against `dataflow-bench hello` in a process of its own: requests/s.
async fn hello_ceiling(args: &SubmitArgs) -> anyhow::Result<f64> {
    let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let mut server = std::process::Command::new(std::env::current_exe()?)
        .args(["hello", "--listen", &addr.to_string()])
        .spawn()
        .context("starting the hello server")?;
    let url = format!("http://{addr}/");
    let result = async {
        let http = reqwest::Client::new();
        let mut up = false;
        for _ in 0..100 {
            if http.get(&url).send().await.is_ok() {
                up = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        ensure!(up, "the hello server did not answer within 5 s");
        let load = load(args, move |http| http.get(&url)).await?;
        ensure!(load.answered(200) == load.requests, "{:?}", load.statuses);
        Ok(load.requests as f64 / load.seconds)
    }
    .await;
    let _ = server.kill();
    let _ = server.wait();
    result
}

/// `dataflow-bench hello`: axum answering `GET /` with a fixed text, the least an HTTP
/// service of this stack can do.
pub async fn hello(listen: SocketAddr) -> anyhow::Result<()> {
    let app = axum::Router::new().route("/", axum::routing::get(async || "Hello, World!"));
    let listener = tokio::net::TcpListener::bind(listen).await?;
    axum::serve(listener, app).await?;
    Ok(())
}

//! `dataflow-bench neighbours`: how much one client's flood delays another client's imports.
//!
//! Client A submits `--flood` imports of `--flood-records` rows at once; client B submits an
//! import of `--records` rows every `--interval-ms`. B's latency, from the moment its submit
//! is sent to its batch's `completed_at`, is measured in three phases:
//!
//! - **alone**: nothing else runs;
//! - **apart**: A floods a second DataFlow of its own (another ledger, prefix and set of
//!   processes) on the same machine and the same database server. Nothing inside DataFlow
//!   is shared, only the cores and the server: this is the best any scheduling inside
//!   DataFlow can do, the machine's limit for the next phase;
//! - **flood**: A floods the same DataFlow as B.
//!
//! DataFlow runs as real processes ([`crate::processes`]), so an older build of `dataflow`
//! runs the same benchmark: that is how a change's before is measured.

use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use serde_json::{Value, json};

use crate::processes::{Api, MachineCpu, Processes, StackArgs, with_processes};
use crate::{csv_body, percentile};

#[derive(Args, Debug, Clone)]
pub struct NeighboursArgs {
    #[command(flatten)]
    pub stack: StackArgs,
    /// Worker processes.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// A's imports, submitted at once.
    #[arg(long, default_value_t = 200)]
    pub flood: usize,
    /// Records in each of A's imports.
    #[arg(long, default_value_t = 50_000)]
    pub flood_records: usize,
    /// B's imports in each phase.
    #[arg(long, default_value_t = 60)]
    pub imports: usize,
    /// Records in each of B's imports.
    #[arg(long, default_value_t = 1_000)]
    pub records: usize,
    /// Time between two of B's submits.
    #[arg(long, default_value_t = 1_000)]
    pub interval_ms: u64,
    /// Skip the phases where B runs alone and apart (when only the flood's figures are
    /// wanted).
    #[arg(long)]
    pub flood_only: bool,
}

pub async fn run(args: NeighboursArgs) -> anyhow::Result<()> {
    with_processes(&args.stack, async |p, backend| {
        measure(&args, p, backend).await
    })
    .await
}

async fn measure(args: &NeighboursArgs, p: &mut Processes, backend: &str) -> anyhow::Result<()> {
    p.cli(&["migrate"])?;
    let open = json!({"rate_per_minute": 600_000, "rate_burst": 10_000, "dedup_window_secs": 0});
    let a = p.client("flood", &json!({"max_records": args.flood_records}), &open)?;
    let b = p.client("steady", &json!({"max_records": args.records}), &open)?;
    let api = p.start("serve", args.workers, &b).await?;
    let line = |phase: &str, l: &Latencies| {
        println!(
            "name=neighbours backend={backend} workers={} phase={phase} imports={} records={} \
             p50_ms={:.0} p95_ms={:.0} p99_ms={:.0} max_ms={:.0} answer_p50_ms={:.0} \
             answer_p95_ms={:.0} wait_p50_ms={:.0} wait_p95_ms={:.0} machine_busy_pct={:.0}",
            args.workers,
            args.imports,
            args.records,
            l.at(0.50),
            l.at(0.95),
            l.at(0.99),
            l.at(1.0),
            l.answer_at(0.50),
            l.answer_at(0.95),
            l.wait_at(0.50),
            l.wait_at(0.95),
            l.busy_pct,
        );
    };

    let (alone, apart) = if args.flood_only {
        (None, None)
    } else {
        let l = steady(&api, &b, args, "alone", 0).await?;
        line("alone", &l);
        let apart = with_processes(&args.stack, async |q, _| {
            q.cli(&["migrate"])?;
            let a = q.client("flood", &json!({"max_records": args.flood_records}), &open)?;
            let other = q.start("serve", args.workers, &a).await?;
            let flood = tokio::spawn(flood(other, a, args.clone()));
            let l = steady(&api, &b, args, "apart", args.imports).await;
            // The flood's senders stop now and its processes with the stack: its backlog
            // there ends with the phase.
            flood.abort();
            l
        })
        .await?;
        line("apart", &apart);
        (Some(l), Some(apart))
    };

    let started = Instant::now();
    let flood = tokio::spawn(flood(api.clone(), a.clone(), args.clone()));
    let under = steady(&api, &b, args, "flood", 2 * args.imports).await?;
    let flood_submit_s = flood.await??;
    let a_done = api.completed(&a).await?;
    line("flood", &under);
    println!(
        "name=neighbours-flood backend={backend} flood_imports={} flood_records={} \
         flood_submit_s={flood_submit_s:.1} steady_done_s={:.1} flood_completed_by_then={a_done}{}{}",
        args.flood,
        args.flood_records,
        started.elapsed().as_secs_f64(),
        ratios(alone.as_ref(), apart.as_ref(), &under),
        p.peaks_line()?,
    );
    Ok(())
}

/// B's p95 under the flood, and apart from it, each over its p95 alone, and the first over
/// the second (empty without those phases).
fn ratios(alone: Option<&Latencies>, apart: Option<&Latencies>, under: &Latencies) -> String {
    let (Some(alone), Some(apart)) = (alone, apart) else {
        return String::new();
    };
    format!(
        " p95_ratio={:.2} apart_p95_ratio={:.2} flood_over_apart_p95={:.2}",
        under.at(0.95) / alone.at(0.95),
        apart.at(0.95) / alone.at(0.95),
        under.at(0.95) / apart.at(0.95)
    )
}

/// B's imports, one every `interval_ms`, numbered from `first` (each phase's records are
/// new ones, not updates of the last phase's); returns each one's submit → completed
/// latency once all have completed.
async fn steady(
    api: &Api,
    key: &str,
    args: &NeighboursArgs,
    phase: &str,
    first: usize,
) -> anyhow::Result<Latencies> {
    let cpu = MachineCpu::now()?;
    let mut sent = Vec::with_capacity(args.imports);
    let mut tick = tokio::time::interval(Duration::from_millis(args.interval_ms));
    for i in first..first + args.imports {
        tick.tick().await;
        let at = now_ms();
        let batch = api.submit(key, csv_body(i, args.records)).await?;
        sent.push((batch, at, now_ms()));
    }
    // The machine's load while B's imports were sent (their completions are read after).
    let busy_pct = cpu.busy_pct_since()?;
    let mut latencies = Vec::with_capacity(sent.len());
    for (batch, at, answered) in sent {
        let view = api.completion(key, &batch, phase).await?;
        let started = time_of(&view, "started_at")?;
        let done = time_of(&view, "completed_at")?;
        latencies.push(Sample {
            total: (done - at) as f64,
            answer: (answered - at) as f64,
            wait: (started - at) as f64,
        });
    }
    Ok(Latencies::of(latencies, busy_pct))
}

/// A timestamp of a batch view, in milliseconds since the epoch.
fn time_of(view: &Value, field: &str) -> anyhow::Result<i64> {
    let text = view[field]
        .as_str()
        .with_context(|| format!("no {field}: {view}"))?;
    Ok(chrono::DateTime::parse_from_rfc3339(text)?.timestamp_millis())
}

/// A's imports, four requests at a time (a 429 is waited out); returns the seconds until
/// the last was accepted.
async fn flood(api: Api, key: String, args: NeighboursArgs) -> anyhow::Result<f64> {
    let started = Instant::now();
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // A set: dropped with this future (an aborted flood), it aborts the senders too.
    let mut senders = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let (api, key, next) = (api.clone(), key.clone(), next.clone());
        let (imports, records) = (args.flood, args.flood_records);
        senders.spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= imports {
                    return anyhow::Ok(());
                }
                // Its own key space, apart from B's.
                api.submit(&key, csv_body(1_000_000 + i, records)).await?;
            }
        });
    }
    while let Some(sent) = senders.join_next().await {
        sent??;
    }
    Ok(started.elapsed().as_secs_f64())
}

/// One of B's imports, in milliseconds from the moment its submit was sent.
struct Sample {
    /// Until its batch completed.
    total: f64,
    /// Until the API answered the submit (`202`).
    answer: f64,
    /// Until a worker started its batch.
    wait: f64,
}

/// B's latencies in milliseconds, each ascending: submit → completed, submit → answered,
/// and submit → started (the answer and the wait for a worker to take the batch).
struct Latencies {
    total: Vec<f64>,
    answer: Vec<f64>,
    wait: Vec<f64>,
    /// The share of the machine's CPU that was busy while they were sent.
    busy_pct: f64,
}

impl Latencies {
    fn of(samples: Vec<Sample>, busy_pct: f64) -> Latencies {
        let sorted = |part: fn(&Sample) -> f64| {
            let mut v: Vec<f64> = samples.iter().map(part).collect();
            v.sort_by(f64::total_cmp);
            v
        };
        Latencies {
            total: sorted(|s| s.total),
            answer: sorted(|s| s.answer),
            wait: sorted(|s| s.wait),
            busy_pct,
        }
    }

    fn at(&self, q: f64) -> f64 {
        percentile(&self.total, q)
    }

    fn answer_at(&self, q: f64) -> f64 {
        percentile(&self.answer, q)
    }

    fn wait_at(&self, q: f64) -> f64 {
        percentile(&self.wait, q)
    }
}

fn now_ms() -> i64 {
    dataflow_contracts::time::now_ms()
}

//! `dataflow-bench neighbours`: how much one client's flood delays another client's imports.
//!
//! Client A submits `--flood` imports of `--flood-records` rows at once; client B submits an
//! import of `--records` rows every `--interval-ms`. B's latency, from the moment its submit
//! is sent to its batch's `completed_at`, is measured alone and then under A's flood.
//!
//! DataFlow runs as real processes of `--bin` (one API process and `--workers` worker
//! processes) on a scratch ledger and, when given, Redis and RabbitMQ. The processes are
//! configured through the environment and set up through the CLI alone, so an older build
//! of `dataflow` runs the same benchmark: that is how a change's before is measured.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use clap::Args;
use serde_json::{Value, json};

use crate::{ScratchLedger, csv_body, percentile};

#[derive(Args, Debug, Clone)]
pub struct NeighboursArgs {
    /// The `dataflow` binary whose processes are measured.
    #[arg(long, default_value = "target/release/dataflow")]
    pub bin: PathBuf,
    /// `postgres://…` (a scratch database is created and dropped); default: SQLite in a
    /// temporary folder, shared by the processes.
    #[arg(long)]
    pub database_url: Option<String>,
    /// Redis for the processes (rate limits, locks, the fleet); default: none.
    #[arg(long)]
    pub redis_url: Option<String>,
    /// RabbitMQ for the processes' events and deliveries; default: none (SQL polling).
    #[arg(long)]
    pub amqp_url: Option<String>,
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
    /// Skip the phase where B runs alone (when only the flood's figures are wanted).
    #[arg(long)]
    pub flood_only: bool,
}

pub async fn run(args: NeighboursArgs) -> anyhow::Result<()> {
    let run = ulid::Ulid::new().to_string().to_lowercase();
    let ledger = ScratchLedger::create(args.database_url.as_deref(), &run).await?;
    let prefix = format!("dataflow-bench-{run}");
    let mut processes = Processes::new(&args, &ledger, &prefix)?;
    let result = measure(&args, &mut processes, ledger.backend).await;
    processes.stop();
    if result.is_err() {
        processes.print_logs();
    }
    if let Some(url) = &args.amqp_url {
        let amqp = dataflow_platform::config::AmqpConfig {
            prefix: format!("{prefix}."),
            ..Default::default()
        };
        crate::amqp::delete_topology(url, &amqp).await?;
    }
    if let Some(url) = &args.redis_url {
        use dataflow_platform::redis::{Purpose, Redis};
        Redis::connect(url, &prefix, None, Purpose::State)
            .await?
            .delete_all_under_prefix()
            .await?;
    }
    ledger.remove().await?;
    result
}

async fn measure(args: &NeighboursArgs, p: &mut Processes, backend: &str) -> anyhow::Result<()> {
    p.cli(&["migrate"])?;
    let open = json!({"rate_per_minute": 600_000, "rate_burst": 10_000, "dedup_window_secs": 0});
    let a = p.client("flood", &json!({"max_records": args.flood_records}), &open)?;
    let b = p.client("steady", &json!({"max_records": args.records}), &open)?;
    // The API first: it generates the folder's secrets (older builds cannot share their
    // generation between processes starting together).
    p.spawn("serve")?;
    let api = Api::new(p.addr);
    api.ready().await?;
    for i in 0..args.workers {
        p.spawn(&format!("worker-{i}"))?;
    }
    // A first import of B's, unmeasured: the workers are up and their connections open.
    let warm_up = api.submit(&b, csv_body(usize::MAX, 1)).await?;
    api.completion(&b, &warm_up, "warm-up").await?;
    let line = |phase: &str, l: &Latencies| {
        println!(
            "name=neighbours backend={backend} workers={} phase={phase} imports={} records={} \
             p50_ms={:.0} p95_ms={:.0} p99_ms={:.0} max_ms={:.0} wait_p50_ms={:.0} \
             wait_p95_ms={:.0}",
            args.workers,
            args.imports,
            args.records,
            l.at(0.50),
            l.at(0.95),
            l.at(0.99),
            l.at(1.0),
            l.wait_at(0.50),
            l.wait_at(0.95),
        );
    };

    let alone = if args.flood_only {
        None
    } else {
        let l = steady(&api, &b, args, "alone", 0).await?;
        line("alone", &l);
        Some(l)
    };

    let started = Instant::now();
    let flood = tokio::spawn(flood(api.clone(), a.clone(), args.clone()));
    let under = steady(&api, &b, args, "flood", args.imports).await?;
    let flood_submit_s = flood.await??;
    let a_done = api.completed(&a).await?;
    line("flood", &under);
    println!(
        "name=neighbours-flood backend={backend} flood_imports={} flood_records={} \
         flood_submit_s={flood_submit_s:.1} steady_done_s={:.1} flood_completed_by_then={a_done}{}",
        args.flood,
        args.flood_records,
        started.elapsed().as_secs_f64(),
        alone.map_or(String::new(), |l| format!(
            " p95_ratio={:.2}",
            under.at(0.95) / l.at(0.95)
        )),
    );
    Ok(())
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
    let mut sent = Vec::with_capacity(args.imports);
    let mut tick = tokio::time::interval(Duration::from_millis(args.interval_ms));
    for i in first..first + args.imports {
        tick.tick().await;
        let at = now_ms();
        let batch = api.submit(key, csv_body(i, args.records)).await?;
        sent.push((batch, at));
    }
    let mut latencies = Vec::with_capacity(sent.len());
    for (batch, at) in sent {
        let view = api.completion(key, &batch, phase).await?;
        let started = time_of(&view, "started_at")?;
        let done = time_of(&view, "completed_at")?;
        latencies.push(((done - at) as f64, (started - at) as f64));
    }
    Ok(Latencies::of(latencies))
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
    let senders: Vec<_> = (0..4)
        .map(|_| {
            let (api, key, next) = (api.clone(), key.clone(), next.clone());
            let (imports, records) = (args.flood, args.flood_records);
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= imports {
                        return anyhow::Ok(());
                    }
                    // Its own key space, apart from B's.
                    api.submit(&key, csv_body(1_000_000 + i, records)).await?;
                }
            })
        })
        .collect();
    for s in senders {
        s.await??;
    }
    Ok(started.elapsed().as_secs_f64())
}

/// B's latencies in milliseconds, ascending: submit → completed, and submit → started (the
/// wait for a worker to take the batch).
struct Latencies {
    total: Vec<f64>,
    wait: Vec<f64>,
}

impl Latencies {
    fn of(samples: Vec<(f64, f64)>) -> Latencies {
        let (mut total, mut wait): (Vec<f64>, Vec<f64>) = samples.into_iter().unzip();
        total.sort_by(f64::total_cmp);
        wait.sort_by(f64::total_cmp);
        Latencies { total, wait }
    }

    fn at(&self, q: f64) -> f64 {
        percentile(&self.total, q)
    }

    fn wait_at(&self, q: f64) -> f64 {
        percentile(&self.wait, q)
    }
}

fn now_ms() -> i64 {
    dataflow_contracts::time::now_ms()
}

/// The public API of the processes under test.
#[derive(Clone)]
struct Api {
    http: reqwest::Client,
    base: String,
}

impl Api {
    fn new(addr: std::net::SocketAddr) -> Api {
        Api {
            http: reqwest::Client::new(),
            base: format!("http://{addr}"),
        }
    }

    async fn ready(&self) -> anyhow::Result<()> {
        for _ in 0..300 {
            let up = self.http.get(format!("{}/readyz", self.base)).send().await;
            if up.is_ok_and(|r| r.status().is_success()) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("the API process did not become ready within 30 s")
    }

    /// Submits a CSV import, waiting out 429s; its batch id.
    async fn submit(&self, key: &str, body: String) -> anyhow::Result<String> {
        loop {
            let resp = self
                .http
                .post(format!("{}/v1/imports", self.base))
                .bearer_auth(key)
                .header("content-type", "text/csv")
                .body(body.clone())
                .send()
                .await?;
            match resp.status().as_u16() {
                202 => {
                    let view: Value = resp.json().await?;
                    return view["batch_id"]
                        .as_str()
                        .map(str::to_owned)
                        .context("a 202 without batch_id");
                }
                429 => tokio::time::sleep(Duration::from_millis(200)).await,
                status => bail!("submit answered {status}: {}", resp.text().await?),
            }
        }
    }

    async fn batch(&self, key: &str, id: &str) -> anyhow::Result<Value> {
        let resp = self
            .http
            .get(format!("{}/v1/batches/{id}", self.base))
            .bearer_auth(key)
            .send()
            .await?;
        ensure!(resp.status() == 200, "GET batch answered {}", resp.status());
        Ok(resp.json().await?)
    }

    /// The batch's view once it completed (within 30 minutes).
    async fn completion(&self, key: &str, batch: &str, phase: &str) -> anyhow::Result<Value> {
        let deadline = Instant::now() + Duration::from_secs(1_800);
        loop {
            let view = self.batch(key, batch).await?;
            match view["status"].as_str() {
                Some("completed") => return Ok(view),
                Some("ready" | "processing" | "retrying") => {}
                other => bail!("{phase}: batch {batch} ended {other:?}: {view}"),
            }
            ensure!(
                Instant::now() < deadline,
                "{phase}: batch {batch} did not complete"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// How many of the client's batches have completed.
    async fn completed(&self, key: &str) -> anyhow::Result<usize> {
        let mut count = 0;
        let mut cursor: Option<String> = None;
        loop {
            let mut url = format!("{}/v1/batches?status=completed&limit=100", self.base);
            if let Some(c) = &cursor {
                url.push_str(&format!("&cursor={c}"));
            }
            let resp = self.http.get(url).bearer_auth(key).send().await?;
            ensure!(
                resp.status() == 200,
                "GET batches answered {}",
                resp.status()
            );
            let page: Value = resp.json().await?;
            count += page["items"].as_array().map_or(0, Vec::len);
            match page["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_owned()),
                None => return Ok(count),
            }
        }
    }
}

/// The processes under test, their environment, and the CLI against the same ledger.
struct Processes {
    bin: PathBuf,
    env: Vec<(String, String)>,
    dir: PathBuf,
    addr: std::net::SocketAddr,
    workers: usize,
    running: Vec<Child>,
}

impl Processes {
    fn new(args: &NeighboursArgs, ledger: &ScratchLedger, prefix: &str) -> anyhow::Result<Self> {
        let bin = std::fs::canonicalize(&args.bin)
            .with_context(|| format!("no dataflow binary at {}", args.bin.display()))?;
        let dir = ledger.config.data_dir.clone();
        std::fs::create_dir_all(&dir)?;
        // A free port for the API process.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let mut env = vec![
            ("DATAFLOW_DATA_DIR", dir.display().to_string()),
            ("DATAFLOW_DATABASE_URL", ledger.config.database_url()),
            ("DATAFLOW_LISTEN", addr.to_string()),
            ("DATAFLOW_REDIS_PREFIX", prefix.to_owned()),
            ("DATAFLOW_AMQP__PREFIX", format!("{prefix}.")),
            ("DATAFLOW_LOG", "warn".to_owned()),
        ];
        if let Some(url) = &args.redis_url {
            env.push(("DATAFLOW_REDIS_URL", url.clone()));
        }
        if let Some(url) = &args.amqp_url {
            env.push(("DATAFLOW_AMQP_URL", url.clone()));
        }
        Ok(Processes {
            bin,
            env: env.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
            dir,
            addr,
            workers: args.workers,
            running: Vec::new(),
        })
    }

    /// `dataflow <args>` on the ledger: a command with exactly this benchmark's settings.
    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(&self.bin);
        for (name, _) in std::env::vars() {
            if dataflow_platform::config::read_by_dataflow(&name) {
                command.env_remove(name);
            }
        }
        command.args(args).envs(self.env.iter().cloned());
        command
    }

    /// Runs a CLI command to its end; its standard output.
    fn cli(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self.command(args).output()?;
        ensure!(
            out.status.success(),
            "dataflow {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8(out.stdout)?)
    }

    /// A client with `policy` and then `patch` applied; its API key.
    fn client(&self, name: &str, policy: &Value, patch: &Value) -> anyhow::Result<String> {
        let created: Value = serde_json::from_str(&self.cli(&[
            "clients",
            "create",
            name,
            "--policy",
            &policy.to_string(),
        ])?)?;
        let id = created["id"].as_str().context("a client without id")?;
        self.cli(&["policy", "set", id, &patch.to_string()])?;
        let key = self.cli(&["keys", "create", id])?;
        Ok(key.trim().to_owned())
    }

    /// Starts the process `name` (its role, and a number for a worker: `worker-0`), logging
    /// to a file in the scratch folder; nothing migrates on its own (the ledger was migrated
    /// once before).
    fn spawn(&mut self, name: &str) -> anyhow::Result<()> {
        let role = name.split('-').next().unwrap_or(name);
        let log = std::fs::File::create(self.dir.join(format!("{name}.log")))?;
        let child = self
            .command(&[role])
            .env("DATAFLOW_AUTO_MIGRATE", "false")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        self.running.push(child);
        Ok(())
    }

    /// Interrupts every process (a graceful stop) and waits for it; kills one that does
    /// not stop within 30 s.
    fn stop(&mut self) {
        for child in &self.running {
            let _ = Command::new("kill")
                .arg("-INT")
                .arg(child.id().to_string())
                .status();
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        for child in &mut self.running {
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        self.running.clear();
    }

    /// The end of each process's log, for a run that failed (the folder goes with it).
    fn print_logs(&self) {
        for name in self.names() {
            let text = std::fs::read_to_string(self.dir.join(format!("{name}.log")));
            let text = text.unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(20).collect();
            eprintln!("--- {name}.log (last lines)");
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
    }

    /// `serve`, `worker-0`, `worker-1`, …: each process's name, which starts with its role.
    fn names(&self) -> Vec<String> {
        std::iter::once("serve".to_owned())
            .chain((0..self.workers).map(|i| format!("worker-{i}")))
            .collect()
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        self.stop();
    }
}

//! DataFlow as real processes of a given `dataflow` binary, for the benchmarks that measure
//! it from outside: one API process and worker processes on a scratch ledger and, when
//! given, Redis and RabbitMQ. The processes are configured through the environment and set
//! up through the CLI alone, so an older build runs the same benchmark: that is how a
//! change's before is measured.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use clap::Args;
use serde_json::Value;

use crate::ScratchLedger;

/// The binary the processes run and the services they use.
#[derive(Args, Debug, Clone)]
pub struct StackArgs {
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
    /// A setting for every process, `DATAFLOW_…=value` (repeatable): how a variant of the
    /// configuration is measured against the default.
    #[arg(long = "env", value_name = "NAME=VALUE", value_parser = setting)]
    pub env: Vec<(String, String)>,
    /// Leaves the scratch ledger in place at the end (its URL is printed), to look into it
    /// with the database's own tools.
    #[arg(long)]
    pub keep_ledger: bool,
}

fn setting(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((name, value)) if name.starts_with("DATAFLOW_") => {
            Ok((name.to_owned(), value.to_owned()))
        }
        _ => Err(format!("expected DATAFLOW_…=value, got {text:?}")),
    }
}

/// Runs `measure`, which starts the processes it needs ([`Processes::spawn`]), on a scratch
/// ledger, then stops them and removes everything the run created: the ledger, the Redis
/// keys under its prefix, the broker's topology. Each call is a stack of its own (ledger,
/// prefix, port), so a benchmark can run two side by side.
pub(crate) async fn with_processes<T>(
    stack: &StackArgs,
    measure: impl AsyncFnOnce(&mut Processes, &'static str) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let run = ulid::Ulid::new().to_string().to_lowercase();
    let ledger = ScratchLedger::create(stack.database_url.as_deref(), &run).await?;
    let prefix = format!("dataflow-bench-{run}");
    let mut processes = Processes::new(stack, &ledger, &prefix)?;
    let result = measure(&mut processes, ledger.backend).await;
    processes.stop();
    if result.is_err() {
        processes.print_logs();
    }
    if let Some(url) = &stack.amqp_url {
        let amqp = dataflow_platform::config::AmqpConfig {
            prefix: format!("{prefix}."),
            ..Default::default()
        };
        crate::amqp::delete_topology(url, &amqp).await?;
    }
    if let Some(url) = &stack.redis_url {
        use dataflow_platform::redis::{Purpose, Redis};
        Redis::connect(url, &prefix, None, Purpose::State)
            .await?
            .delete_all_under_prefix()
            .await?;
    }
    if stack.keep_ledger {
        eprintln!("the ledger is kept: {}", processes.database_url);
    } else {
        ledger.remove().await?;
    }
    result
}

/// The public API of the processes under test.
#[derive(Clone)]
pub(crate) struct Api {
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

    pub(crate) async fn ready(&self) -> anyhow::Result<()> {
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
    pub(crate) async fn submit(&self, key: &str, body: String) -> anyhow::Result<String> {
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

    pub(crate) async fn batch(&self, key: &str, id: &str) -> anyhow::Result<Value> {
        self.get(key, &format!("/v1/batches/{id}")).await
    }

    /// Submits the imports numbered `imports` (each `csv_body` of its number, so every
    /// row is a new record) from 16 connections at once, taking the keys in turn.
    pub(crate) async fn fill(
        &self,
        keys: &[String],
        records: usize,
        imports: std::ops::Range<usize>,
    ) -> anyhow::Result<()> {
        let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(imports.start));
        let submitters: Vec<_> = (0..16)
            .map(|_| {
                let (api, keys, next) = (self.clone(), keys.to_vec(), next.clone());
                let end = imports.end;
                tokio::spawn(async move {
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if i >= end {
                            return anyhow::Ok(());
                        }
                        api.submit(&keys[i % keys.len()], crate::csv_body(i, records))
                            .await?;
                    }
                })
            })
            .collect();
        for s in submitters {
            s.await??;
        }
        Ok(())
    }

    /// `GET path` as `key`'s client; its JSON body.
    pub(crate) async fn get(&self, key: &str, path: &str) -> anyhow::Result<Value> {
        let resp = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(key)
            .send()
            .await?;
        ensure!(
            resp.status() == 200,
            "GET {path} answered {}",
            resp.status()
        );
        Ok(resp.json().await?)
    }

    /// The batch's view once it completed (within 30 minutes).
    pub(crate) async fn completion(
        &self,
        key: &str,
        batch: &str,
        phase: &str,
    ) -> anyhow::Result<Value> {
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
    pub(crate) async fn completed(&self, key: &str) -> anyhow::Result<usize> {
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
pub(crate) struct Processes {
    bin: PathBuf,
    env: Vec<(String, String)>,
    dir: PathBuf,
    pub(crate) addr: std::net::SocketAddr,
    /// The ledger's URL, for a benchmark that reads it directly.
    pub(crate) database_url: String,
    /// The processes running now, by name.
    running: Vec<(String, Child)>,
    /// Every process started, by name (its role, and a number for a worker: `worker-0`).
    names: Vec<String>,
}

impl Processes {
    fn new(stack: &StackArgs, ledger: &ScratchLedger, prefix: &str) -> anyhow::Result<Self> {
        let bin = std::fs::canonicalize(&stack.bin)
            .with_context(|| format!("no dataflow binary at {}", stack.bin.display()))?;
        let dir = ledger.config.data_dir.clone();
        std::fs::create_dir_all(&dir)?;
        // A free port for the API process.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let mut env = vec![
            ("DATAFLOW_DATA_DIR".to_owned(), dir.display().to_string()),
            (
                "DATAFLOW_DATABASE_URL".to_owned(),
                ledger.config.database_url(),
            ),
            ("DATAFLOW_LISTEN".to_owned(), addr.to_string()),
            ("DATAFLOW_REDIS_PREFIX".to_owned(), prefix.to_owned()),
            ("DATAFLOW_AMQP__PREFIX".to_owned(), format!("{prefix}.")),
            ("DATAFLOW_LOG".to_owned(), "warn".to_owned()),
        ];
        if let Some(url) = &stack.redis_url {
            env.push(("DATAFLOW_REDIS_URL".to_owned(), url.clone()));
        }
        if let Some(url) = &stack.amqp_url {
            env.push(("DATAFLOW_AMQP_URL".to_owned(), url.clone()));
        }
        // Last, so that they win.
        env.extend(stack.env.iter().cloned());
        Ok(Processes {
            bin,
            env,
            dir,
            addr,
            database_url: ledger.config.database_url(),
            running: Vec::new(),
            names: Vec::new(),
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
    pub(crate) fn cli(&self, args: &[&str]) -> anyhow::Result<String> {
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
    pub(crate) fn client(
        &self,
        name: &str,
        policy: &Value,
        patch: &Value,
    ) -> anyhow::Result<String> {
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
        self.running.push((name.to_owned(), child));
        self.names.push(name.to_owned());
        Ok(())
    }

    /// The peak resident memory of each running process so far, in MiB, by name: the
    /// kernel's high-water mark (`VmHWM`).
    pub(crate) fn peaks_mib(&self) -> anyhow::Result<Vec<(String, f64)>> {
        self.running
            .iter()
            .map(|(name, child)| {
                let mib = peak_mib(child.id()).with_context(|| format!("the peak of {name}"))?;
                Ok((name.clone(), mib))
            })
            .collect()
    }

    /// The peaks of [`Processes::peaks_mib`] as `key=value` fields: ` peak_mib_serve=…`.
    pub(crate) fn peaks_line(&self) -> anyhow::Result<String> {
        Ok(self
            .peaks_mib()?
            .iter()
            .map(|(name, mib)| format!(" peak_mib_{}={mib:.0}", name.replace('-', "_")))
            .collect())
    }

    /// Interrupts every process (a graceful stop) and waits for it; kills one that does
    /// not stop within 30 s.
    pub(crate) fn stop(&mut self) {
        for (_, child) in &self.running {
            let _ = Command::new("kill")
                .arg("-INT")
                .arg(child.id().to_string())
                .status();
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        for (_, child) in &mut self.running {
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        self.running.clear();
    }

    /// Starts `api` (`serve`, or `all`), waits until it is ready, starts `workers` worker
    /// processes, and sends a first import of `key`'s, unmeasured, through them: once it
    /// completed, the workers are up and their connections open. The API process starts
    /// first: it generates the folder's secrets (older builds cannot share their generation
    /// between processes starting together).
    pub(crate) async fn start(
        &mut self,
        api: &str,
        workers: usize,
        key: &str,
    ) -> anyhow::Result<Api> {
        let client = self.start_api(api).await?;
        self.spawn_workers(workers)?;
        let warm_up = client.submit(key, crate::csv_body(usize::MAX, 1)).await?;
        client.completion(key, &warm_up, "warm-up").await?;
        Ok(client)
    }

    /// Starts `api` (`serve`, or `all`) and waits until it is ready.
    pub(crate) async fn start_api(&mut self, api: &str) -> anyhow::Result<Api> {
        self.spawn(api)?;
        let client = Api::new(self.addr);
        client.ready().await?;
        Ok(client)
    }

    /// Starts `workers` more worker processes (`worker-0`, `worker-1`, …).
    pub(crate) fn spawn_workers(&mut self, workers: usize) -> anyhow::Result<()> {
        let first = self
            .names
            .iter()
            .filter(|n| n.starts_with("worker-"))
            .count();
        for i in first..first + workers {
            self.spawn(&format!("worker-{i}"))?;
        }
        Ok(())
    }

    /// The CPU time each running process has used so far, in seconds, by name.
    pub(crate) fn cpu_seconds(&self) -> anyhow::Result<Vec<(String, f64)>> {
        self.running
            .iter()
            .map(|(name, child)| Ok((name.clone(), cpu_seconds(child.id())?)))
            .collect()
    }

    /// The end of each process's log, for a run that failed (the folder goes with it).
    fn print_logs(&self) {
        for name in &self.names {
            let text = std::fs::read_to_string(self.dir.join(format!("{name}.log")));
            let text = text.unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(20).collect();
            eprintln!("--- {name}.log (last lines)");
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The peak resident memory of process `pid` so far, in MiB: the kernel's high-water mark
/// (`VmHWM` in `/proc/<pid>/status`, Linux).
pub(crate) fn peak_mib(pid: u32) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading the status of process {pid} (Linux)"))?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
        .with_context(|| format!("no VmHWM for process {pid}"))?;
    Ok(kib as f64 / 1024.0)
}

/// The CPU time (user and system, every thread) process `pid` has used, in seconds, from
/// `/proc/<pid>/stat` (Linux; its clock ticks are 1/100 s on every mainstream kernel).
pub(crate) fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading the CPU time of process {pid} (Linux)"))?;
    // The fields after the command, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    // utime and stime are the 14th and 15th fields of the line, the 12th and 13th after the
    // command.
    let ticks = |i: usize| -> anyhow::Result<f64> {
        Ok(fields
            .get(i)
            .context("a short /proc/<pid>/stat")?
            .parse::<f64>()?)
    };
    Ok((ticks(11)? + ticks(12)?) / 100.0)
}

/// The CPU time, in seconds, that PostgreSQL's processes on this machine have used so far
/// (those that exited before are not counted: a benchmark reads it around a stretch in
/// which the backends it measures stay connected).
pub(crate) fn postgres_cpu() -> anyhow::Result<f64> {
    let mut total = 0.0;
    for entry in std::fs::read_dir("/proc")? {
        let Some(pid) = entry?.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.trim() == "postgres" {
            // It may have exited since it was listed.
            total += cpu_seconds(pid).unwrap_or(0.0);
        }
    }
    Ok(total)
}

/// The whole machine's CPU ticks so far, from the first line of `/proc/stat` (Linux): the
/// busy ones and all of them, idle and I/O wait included.
#[derive(Clone, Copy)]
pub(crate) struct MachineCpu {
    busy: u64,
    total: u64,
}

impl MachineCpu {
    pub(crate) fn now() -> anyhow::Result<MachineCpu> {
        let stat = std::fs::read_to_string("/proc/stat")
            .context("reading the machine's CPU time (Linux)")?;
        let ticks = stat
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("cpu "))
            .context("no cpu line in /proc/stat")?
            .split_whitespace()
            .map(str::parse::<u64>)
            .collect::<Result<Vec<_>, _>>()?;
        ensure!(ticks.len() >= 8, "a short cpu line in /proc/stat");
        // user nice system idle iowait irq softirq steal, then guest time, which user and
        // nice already hold. Busy is this machine's own work: not idle, I/O wait or steal.
        let total: u64 = ticks[..8].iter().sum();
        Ok(MachineCpu {
            busy: total - ticks[3] - ticks[4] - ticks[7],
            total,
        })
    }

    /// The share of the machine's CPU that was busy since `self`, in percent.
    pub(crate) fn busy_pct_since(self) -> anyhow::Result<f64> {
        let now = MachineCpu::now()?;
        let total = now.total.saturating_sub(self.total).max(1);
        Ok(100.0 * now.busy.saturating_sub(self.busy) as f64 / total as f64)
    }
}

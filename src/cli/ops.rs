//! Operator views on the ledger: `dataflow status`, `dataflow batches …`, `dataflow dlq …`.
//! They read and change SQL directly, like the other operator commands, so they work with
//! no server running; a retried batch or job is picked up by the workers' polling.

use std::time::Duration;

use anyhow::{Context, bail};
use clap::Subcommand;
use dataflow_contracts::http::BatchView;
use dataflow_contracts::jobs::{JobKind, JobStatus, JobView};
use dataflow_contracts::{BatchId, BatchStatus, ClientId, JobId};
use dataflow_platform::Config;
use dataflow_platform::broker::endpoint;
use dataflow_platform::config::Secret;
use dataflow_platform::ledger::{BatchAction, Db, JobFilter, human_bytes};

use super::{backends, ledger, print_json, redact};

#[derive(Subcommand, Debug)]
pub enum BatchesCmd {
    /// Batches newest first.
    List {
        #[arg(long)]
        client: Option<String>,
        /// awaiting_approval, ready, processing, completed, rejected or dead.
        #[arg(long)]
        status: Option<BatchStatus>,
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// One batch as JSON.
    Show { batch_id: String },
    /// Gives a dead batch fresh attempts.
    Retry { batch_id: String },
}

#[derive(Subcommand, Debug)]
pub enum DlqCmd {
    /// Dead batches and dead jobs, newest first.
    List {
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Retries dead batches or jobs (`bat_…` / `job_…` ids), or every dead letter.
    Retry {
        ids: Vec<String>,
        #[arg(long, conflicts_with = "ids")]
        all: bool,
    },
    /// Gives up on dead batches (they end `rejected`) or dead jobs (`discarded`).
    Discard {
        ids: Vec<String>,
        #[arg(long, conflicts_with = "ids")]
        all: bool,
        #[arg(long, default_value = "discarded by an operator")]
        reason: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum WorkersCmd {
    /// Live worker processes: host, pid, version, load.
    List,
    /// Asks a worker to drain: it takes no new work, finishes or hands back what it holds,
    /// leaves the registry and exits 0.
    Drain {
        worker_id: String,
        /// Wait until it has left.
        #[arg(long)]
        wait: bool,
    },
}

pub async fn workers(config: &Config, cmd: WorkersCmd) -> anyhow::Result<()> {
    let backends = backends(config).await?;
    let fleet = &backends.fleet;
    match cmd {
        WorkersCmd::List => {
            let rows: Vec<Vec<String>> = fleet
                .list()
                .await?
                .into_iter()
                .map(|w| {
                    let state = match (w.draining, w.leader) {
                        (true, _) => "draining",
                        (false, true) => "running, leader",
                        (false, false) => "running",
                    };
                    vec![
                        w.id,
                        state.into(),
                        w.in_flight.to_string(),
                        w.processed.to_string(),
                        w.version,
                        w.started_at,
                        w.heartbeat_at,
                    ]
                })
                .collect();
            if rows.is_empty() {
                println!("no worker is running");
            } else {
                let headers = [
                    "WORKER",
                    "STATE",
                    "IN FLIGHT",
                    "PROCESSED",
                    "VERSION",
                    "STARTED",
                    "SEEN",
                ];
                print_table(&headers, &rows);
            }
            Ok(())
        }
        WorkersCmd::Drain { worker_id, wait } => {
            if !fleet.request_drain(&worker_id).await? {
                bail!("no live worker {worker_id} (see `dataflow workers list`)");
            }
            println!("{worker_id}: drain requested");
            if wait {
                while fleet.list().await?.iter().any(|w| w.id == worker_id) {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                println!("{worker_id}: drained and gone");
            }
            Ok(())
        }
    }
}

/// `dataflow status`: what waits where and for how long, whether Redis answers, and the
/// storage each client holds in the ledger (payloads kept for their retention, uploads not
/// yet finished, records).
pub async fn status(config: &Config) -> anyhow::Result<()> {
    let backends = backends(config).await?;
    let redis = match &backends.redis {
        None => "not configured (embedded fallbacks)".to_owned(),
        Some(r) => match r.ping().await {
            Ok(()) => "up".to_owned(),
            Err(e) => format!("DOWN ({e}): limits, cache and locks on their fallbacks"),
        },
    };
    let nodes = config.amqp_nodes();
    let events = if nodes.is_empty() {
        "embedded (workers poll SQL)".to_owned()
    } else {
        broker_reachability(&nodes).await
    };
    let workers = match backends.fleet.list().await {
        Ok(ws) => {
            let draining = ws.iter().filter(|w| w.draining).count();
            let busy: u64 = ws.iter().map(|w| w.in_flight).sum();
            let leader = ws.iter().find(|w| w.leader).map_or_else(
                || "no leader yet".to_owned(),
                |w| format!("leader {}", w.id),
            );
            format!(
                "{} alive ({draining} draining), {busy} batches in flight, {leader}",
                ws.len()
            )
        }
        Err(e) => format!("registry unavailable ({e})"),
    };
    println!("ledger:  {}", redact(&config.database_url()));
    println!("redis:   {redis}");
    println!("events:  {events}");
    println!("workers: {workers}");
    println!();
    let mut rows: Vec<Vec<String>> = backends
        .db
        .queue_depths()
        .await?
        .into_iter()
        .map(|d| {
            vec![
                d.queue,
                d.state,
                d.count.to_string(),
                d.oldest_age_ms.map(age).unwrap_or_default(),
            ]
        })
        .collect();
    if let Some(q) = &backends.job_queue {
        for kind in JobKind::ALL {
            // Redis being down is already reported above.
            if let Ok(n) = q.outstanding(kind).await {
                rows.push(vec![
                    format!("redis:{kind}"),
                    "in redis".into(),
                    n.to_string(),
                    String::new(),
                ]);
            }
        }
    }
    if rows.is_empty() {
        println!("nothing waiting: every batch and job is finished");
    } else {
        print_table(&["QUEUE", "STATE", "COUNT", "OLDEST"], &rows);
    }
    println!();
    let storage: Vec<Vec<String>> = backends
        .db
        .storage_by_client()
        .await?
        .into_iter()
        .map(|s| {
            vec![
                s.client_id.to_string(),
                human_bytes(s.payload_bytes),
                human_bytes(s.upload_bytes),
                s.records.to_string(),
            ]
        })
        .collect();
    if storage.is_empty() {
        println!("no client stores anything yet");
    } else {
        print_table(&["CLIENT", "PAYLOADS", "UPLOADS", "RECORDS"], &storage);
    }
    Ok(())
}

/// Whether each broker node's port answers (a CLI does not open an AMQP session; each
/// running process reports its own mode and node at `/readyz`).
async fn broker_reachability(nodes: &[Secret]) -> String {
    let checks = nodes.iter().map(|url| async move {
        let node = endpoint(url.expose());
        let connect = tokio::net::TcpStream::connect(node.clone());
        let up = matches!(
            tokio::time::timeout(Duration::from_secs(1), connect).await,
            Ok(Ok(_))
        );
        (node, up)
    });
    let checked = futures::future::join_all(checks).await;
    let up = checked.iter().filter(|(_, up)| *up).count();
    let each: Vec<String> = checked
        .iter()
        .map(|(node, up)| format!("{node} {}", if *up { "reachable" } else { "UNREACHABLE" }))
        .collect();
    let verdict = if up == 0 {
        ": workers poll SQL until one returns"
    } else if up <= checked.len() / 2 {
        ": a cluster's majority is down, so its quorum queues neither confirm nor deliver"
    } else {
        ""
    };
    format!("RabbitMQ {}{verdict}", each.join(", "))
}

pub async fn batches(config: &Config, cmd: BatchesCmd) -> anyhow::Result<()> {
    let ledger = ledger(config).await?;
    let db = &ledger.db;
    match cmd {
        BatchesCmd::List {
            client,
            status,
            limit,
        } => {
            let client: Option<ClientId> = client.as_deref().map(parse).transpose()?;
            let page = db
                .list_batches(client.as_ref(), status, None, limit.clamp(1, 1000))
                .await?;
            let rows: Vec<Vec<String>> = page
                .items
                .iter()
                .map(|b| {
                    vec![
                        b.id.to_string(),
                        b.status.to_string(),
                        format!("{}/{}", b.records_processed, b.records_total),
                        b.records_failed.to_string(),
                        b.attempts.to_string(),
                        b.created_at.clone(),
                    ]
                })
                .collect();
            let headers = [
                "BATCH",
                "STATUS",
                "PROCESSED",
                "FAILED",
                "ATTEMPTS",
                "CREATED",
            ];
            print_table(&headers, &rows);
            Ok(())
        }
        BatchesCmd::Show { batch_id } => {
            let id: BatchId = parse(&batch_id)?;
            match db.get_batch(None, &id).await? {
                Some(b) => print_json(&b),
                None => bail!("no batch {id}"),
            }
        }
        BatchesCmd::Retry { batch_id } => {
            let id: BatchId = parse(&batch_id)?;
            print_json(&db.transition_batch(&id, BatchAction::Retry).await?)
        }
    }
}

pub async fn dlq(config: &Config, cmd: DlqCmd) -> anyhow::Result<()> {
    let ledger = ledger(config).await?;
    let db = &ledger.db;
    let (ids, all, discard) = match cmd {
        DlqCmd::List { limit } => {
            let mut rows = Vec::new();
            for b in dead_batches(db, limit).await? {
                let error = b.last_error.unwrap_or_default();
                rows.push(vec![
                    b.id.to_string(),
                    "batch".into(),
                    b.attempts.to_string(),
                    error,
                ]);
            }
            for j in dead_jobs(db, limit).await? {
                let error = j.last_error.unwrap_or_default();
                let what = format!("{} job", j.kind);
                rows.push(vec![j.id.to_string(), what, j.attempts.to_string(), error]);
            }
            if rows.is_empty() {
                println!("the dead-letter queue is empty");
            } else {
                print_table(&["ID", "WHAT", "ATTEMPTS", "LAST ERROR"], &rows);
            }
            return Ok(());
        }
        DlqCmd::Retry { ids, all } => (ids, all, None),
        DlqCmd::Discard { ids, all, reason } => (ids, all, Some(reason)),
    };
    let ids = if all {
        let mut every: Vec<String> = Vec::new();
        every.extend(
            dead_batches(db, u32::MAX)
                .await?
                .into_iter()
                .map(|b| b.id.to_string()),
        );
        every.extend(
            dead_jobs(db, u32::MAX)
                .await?
                .into_iter()
                .map(|j| j.id.to_string()),
        );
        every
    } else if ids.is_empty() {
        bail!("name the dead letters (bat_… or job_… ids), or pass --all");
    } else {
        ids
    };
    let (mut done, mut failed) = (0, 0);
    for id in &ids {
        let outcome = if id.starts_with(BatchId::PREFIX) {
            let id: BatchId = parse(id)?;
            let action = match &discard {
                Some(reason) => BatchAction::Discard {
                    reason: reason.clone(),
                },
                None => BatchAction::Retry,
            };
            db.transition_batch(&id, action)
                .await
                .map(|b| b.status.to_string())
        } else {
            let id: JobId = parse(id)?;
            let changed = match &discard {
                Some(_) => db.discard_job(&id).await,
                None => db.retry_job(&id).await,
            };
            changed.map(|j| j.status.to_string())
        };
        match outcome {
            Ok(status) => {
                done += 1;
                println!("{id}: {status}");
            }
            Err(e) => {
                failed += 1;
                eprintln!("{id}: {e}");
            }
        }
    }
    let verb = if discard.is_some() {
        "discarded"
    } else {
        "retried"
    };
    println!("{verb} {done}, failed {failed}");
    if failed > 0 {
        bail!("{failed} dead letters could not be {verb}");
    }
    Ok(())
}

async fn dead_batches(db: &Db, limit: u32) -> anyhow::Result<Vec<BatchView>> {
    all_pages(limit, async |cursor: Option<BatchId>| {
        let dead = Some(BatchStatus::Dead);
        let page = db.list_batches(None, dead, cursor.as_ref(), 500).await?;
        Ok((page.items, page.next_cursor))
    })
    .await
}

async fn dead_jobs(db: &Db, limit: u32) -> anyhow::Result<Vec<JobView>> {
    let filter = JobFilter {
        status: Some(JobStatus::Dead),
        ..JobFilter::default()
    };
    all_pages(limit, async |cursor: Option<JobId>| {
        let page = db.list_jobs(&filter, cursor.as_ref(), 500).await?;
        Ok((page.items, page.next_cursor))
    })
    .await
}

/// Up to `limit` items, following the cursor from page to page.
async fn all_pages<T, C>(
    limit: u32,
    mut page: impl AsyncFnMut(Option<C>) -> anyhow::Result<(Vec<T>, Option<String>)>,
) -> anyhow::Result<Vec<T>>
where
    C: std::str::FromStr,
    C::Err: std::error::Error + Send + Sync + 'static,
{
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let mut out = Vec::new();
    let mut cursor = None;
    while out.len() < limit {
        let (items, next) = page(cursor.take()).await?;
        out.extend(items);
        match next {
            Some(c) => cursor = Some(parse(&c)?),
            None => break,
        }
    }
    out.truncate(limit);
    Ok(out)
}

fn parse<T>(raw: &str) -> anyhow::Result<T>
where
    T: std::str::FromStr,
    T::Err: std::error::Error + Send + Sync + 'static,
{
    raw.parse()
        .with_context(|| format!("`{raw}` is not a valid id"))
}

/// "350 ms", "12.3 s", "4.0 min", "2.1 h", "3.0 d".
fn age(ms: u64) -> String {
    let d = Duration::from_millis(ms);
    let s = d.as_secs_f64();
    match ms {
        0..1_000 => format!("{ms} ms"),
        1_000..60_000 => format!("{s:.1} s"),
        60_000..3_600_000 => format!("{:.1} min", s / 60.0),
        3_600_000..86_400_000 => format!("{:.1} h", s / 3600.0),
        _ => format!("{:.1} d", s / 86_400.0),
    }
}

/// Left-aligned columns, as wide as their widest cell.
fn print_table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(headers.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

#[cfg(test)]
mod tests {
    use super::age;

    #[test]
    fn ages_read_well() {
        assert_eq!(age(350), "350 ms");
        assert_eq!(age(12_345), "12.3 s");
        assert_eq!(age(240_000), "4.0 min");
        assert_eq!(age(7_560_000), "2.1 h");
        assert_eq!(age(3 * 86_400_000), "3.0 d");
    }
}

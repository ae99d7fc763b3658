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
use dataflow_platform::db::{BatchAction, Db, JobFilter};

use super::{ledger, print_json, redact};

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

/// `dataflow status`: what waits where and for how long, and whether Redis answers.
pub async fn status(config: &Config) -> anyhow::Result<()> {
    let backends = ledger(config).await?;
    let redis = match &backends.redis {
        None => "not configured (embedded fallbacks)".to_owned(),
        Some(r) => match r.ping().await {
            Ok(()) => "up".to_owned(),
            Err(e) => format!("DOWN ({e}): limits, cache and locks on their fallbacks"),
        },
    };
    println!("ledger: {}", redact(&config.database_url()));
    println!("redis:  {redis}");
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
    Ok(())
}

pub async fn batches(config: &Config, cmd: BatchesCmd) -> anyhow::Result<()> {
    let backends = ledger(config).await?;
    let db = &backends.db;
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
    let backends = ledger(config).await?;
    let db = &backends.db;
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
    let mut out = Vec::new();
    let mut cursor: Option<BatchId> = None;
    while (out.len() as u64) < u64::from(limit) {
        let page = db
            .list_batches(None, Some(BatchStatus::Dead), cursor.as_ref(), 500)
            .await?;
        out.extend(page.items);
        match page.next_cursor {
            Some(c) => cursor = Some(parse(&c)?),
            None => break,
        }
    }
    out.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
    Ok(out)
}

async fn dead_jobs(db: &Db, limit: u32) -> anyhow::Result<Vec<JobView>> {
    let mut out = Vec::new();
    let mut cursor: Option<JobId> = None;
    while (out.len() as u64) < u64::from(limit) {
        let filter = JobFilter {
            status: Some(JobStatus::Dead),
            ..JobFilter::default()
        };
        let page = db.list_jobs(&filter, cursor.as_ref(), 500).await?;
        out.extend(page.items);
        match page.next_cursor {
            Some(c) => cursor = Some(parse(&c)?),
            None => break,
        }
    }
    out.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
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

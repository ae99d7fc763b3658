//! `dataflow import FILE --key … [--client NAME|ID] [--wait | --dry-run] [--compress …]`: a
//! producer's upload over the HTTP API (the same path as any client: key, limits, dedup).
//! A file above `--resumable-above` goes as a resumable upload ([`super::upload`]) with a
//! progress bar, and a second run resumes it; a smaller one in one request. Then, with
//! `--wait`, a progress bar of records processed until the batch ends; with `--dry-run`,
//! nothing stored and a table of what the import would do. The exit status says how it
//! ended. With `--client`, the key's client (`GET /v1/client`) must be that one, checked
//! before anything is sent: a key for the wrong tenant would otherwise store the file under
//! that tenant, which no retry undoes.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use dataflow_contracts::http::{
    BatchView, ChangeKind, ClientIdentity, DryRunView, ImportView, RawJson,
};
use dataflow_contracts::{BatchStatus, ClientId, ImportFormat};
use indicatif::{ProgressBar, ProgressStyle};

use super::upload::{Compression, Upload, content_type as media_type, patiently};

#[derive(Args, Debug, Clone)]
pub struct ImportArgs {
    /// A CSV file with a header row, or JSON lines (`.ndjson`, `.jsonl`).
    pub file: PathBuf,
    /// The producer's API key (`dfk_…`).
    #[arg(long, env = "DATAFLOW_API_KEY", hide_env_values = true)]
    pub key: String,
    /// The client the upload is for, by id (`cli_…`) or name: refused before uploading when
    /// the key belongs to another client.
    #[arg(long, env = "DATAFLOW_CLIENT")]
    pub client: Option<String>,
    /// DataFlow's HTTP API.
    #[arg(
        long,
        env = "DATAFLOW_API_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    pub api: String,
    /// `csv` or `ndjson`; default: from the file's extension.
    #[arg(long)]
    pub format: Option<String>,
    /// Makes a retried upload safe: the same key and body answer with the same import.
    #[arg(long)]
    pub idempotency_key: Option<String>,
    /// Follow the batch until it completes, is rejected or dies (exit status 0 only when it
    /// completed).
    #[arg(long, conflicts_with = "dry_run")]
    pub wait: bool,
    /// Store nothing: print what the import would do to the records as they are now
    /// (inserts, updates with the fields they change, row errors); exit status 1 when it
    /// would be refused.
    #[arg(long)]
    pub dry_run: bool,
    /// Compress what is sent (the server stores the file as it was).
    #[arg(long, value_enum)]
    pub compress: Option<Compression>,
    /// Files longer than this many bytes go as a resumable upload (`/v1/uploads`), which a
    /// second run of the same command resumes; 0: always.
    #[arg(long, default_value_t = 16 * 1024 * 1024)]
    pub resumable_above: u64,
    /// Bytes per part of a resumable upload.
    #[arg(long, default_value_t = 8 * 1024 * 1024, value_parser = clap::value_parser!(u64).range(1..=64 * 1024 * 1024))]
    pub part_size: u64,
}

pub async fn run(args: ImportArgs) -> anyhow::Result<()> {
    let format = file_format(&args.file, args.format.as_deref())?;
    let length = tokio::fs::metadata(&args.file)
        .await
        .with_context(|| format!("reading {}", args.file.display()))?
        .len();
    let http = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .build()?;
    let api = args.api.trim_end_matches('/');
    if let Some(expected) = &args.client {
        let identity = whoami(&http, api, &args.key).await?;
        check_client(expected, &identity)?;
    }
    let import: ImportView = if length > args.resumable_above && !args.dry_run {
        Upload {
            http: &http,
            api,
            key: &args.key,
            file: &args.file,
            format,
            part_bytes: usize::try_from(args.part_size).unwrap_or(usize::MAX),
            compression: args.compress,
            idempotency_key: args.idempotency_key.as_deref(),
        }
        .run()
        .await?
    } else {
        // No longer than `resumable_above`: one request, read whole.
        let body = tokio::fs::read(&args.file)
            .await
            .with_context(|| format!("reading {}", args.file.display()))?;
        let mut req = http
            .post(format!("{api}/v1/imports"))
            .timeout(Duration::from_secs(300))
            .bearer_auth(&args.key)
            .header("content-type", media_type(format));
        req = match args.compress {
            Some(c) => req
                .header("content-encoding", c.encoding())
                .body(c.apply(&body)?),
            None => req.body(body),
        };
        if args.dry_run {
            return dry_run(req.query(&[("dry_run", "true")]), api).await;
        }
        if let Some(k) = &args.idempotency_key {
            req = req.header("idempotency-key", k);
        }
        answer(req, api, "the import was refused").await?
    };
    let note = if import.duplicate {
        " (the same payload was imported before: this is that import)"
    } else {
        ""
    };
    println!(
        "import {} · batch {} · {} records · {}{note}",
        import.id, import.batch_id, import.records, import.status
    );
    if !args.wait {
        return Ok(());
    }
    let batch = follow(&http, api, &args.key, &import).await?;
    println!(
        "batch {} {}: {} written, {} unchanged, {} superseded, {} failed{}",
        batch.id,
        batch.status,
        batch.records_written,
        batch.records_unchanged,
        batch.records_superseded,
        batch.records_failed,
        batch
            .last_error
            .as_deref()
            .map(|e| format!(" — {e}"))
            .unwrap_or_default()
    );
    if batch.records_failed > 0 {
        println!("row errors: {api}/v1/batches/{}/errors", batch.id);
    }
    match batch.status {
        BatchStatus::Completed => Ok(()),
        other => bail!("the batch ended {other}"),
    }
}

/// Polls the batch, drawing records processed, until it reaches an end state.
async fn follow(
    http: &reqwest::Client,
    api: &str,
    key: &str,
    import: &ImportView,
) -> anyhow::Result<BatchView> {
    let bar = ProgressBar::new(import.records);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} records ({per_sec}) {msg}",
        )?
        .progress_chars("=> "),
    );
    let url = format!("{api}/v1/batches/{}", import.batch_id);
    let mut failures = 0;
    loop {
        let batch = match get_json::<BatchView>(http, &url, key).await {
            Ok(b) => {
                failures = 0;
                b
            }
            // A restarting API is not the end of the batch: keep asking for a while.
            Err(e) if failures < 30 => {
                failures += 1;
                bar.set_message(format!("(retrying: {e})"));
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        bar.set_length(batch.records_total.max(1));
        bar.set_position(batch.records_processed);
        bar.set_message(batch.status.to_string());
        if matches!(
            batch.status,
            BatchStatus::Completed | BatchStatus::Rejected | BatchStatus::Dead
        ) {
            bar.finish();
            return Ok(batch);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The client the key belongs to.
async fn whoami(http: &reqwest::Client, api: &str, key: &str) -> anyhow::Result<ClientIdentity> {
    get_json(http, &format!("{api}/v1/client"), key)
        .await
        .with_context(|| format!("asking {api} which client the key belongs to"))
}

async fn get_json<T: serde::de::DeserializeOwned>(
    http: &reqwest::Client,
    url: &str,
    key: &str,
) -> anyhow::Result<T> {
    let resp = patiently(http.get(url).bearer_auth(key)).await?;
    let status = resp.status();
    if !status.is_success() {
        bail!("{status}: {}", resp.text().await.unwrap_or_default());
    }
    Ok(resp.json().await?)
}

/// `expected` is an id (`cli_…`) or else a name, compared exactly. Names need not be unique,
/// so only an id pins one client; a name still catches a key for another tenant.
fn check_client(expected: &str, identity: &ClientIdentity) -> anyhow::Result<()> {
    let matches = match expected.parse::<ClientId>() {
        Ok(id) => id == identity.id,
        Err(_) => expected == identity.name,
    };
    if !matches {
        bail!(
            "--client {expected}: the key belongs to client `{}` ({}); nothing was uploaded",
            identity.name,
            identity.id
        );
    }
    Ok(())
}

/// A record file's format: `explicit` (`--format`), else the file's extension.
pub(crate) fn file_format(
    file: &std::path::Path,
    explicit: Option<&str>,
) -> anyhow::Result<ImportFormat> {
    let ext = file
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    let format = explicit.map(str::to_owned).or(ext).unwrap_or_default();
    match format.as_str() {
        "csv" => Ok(ImportFormat::Csv),
        "ndjson" | "jsonl" => Ok(ImportFormat::Ndjson),
        other => bail!("cannot tell the format of `{other}`: pass --format csv or --format ndjson"),
    }
}

/// Sends `req` and reads its JSON answer; a refusal says `refused` with the status and
/// what the server said.
async fn answer<T: serde::de::DeserializeOwned>(
    req: reqwest::RequestBuilder,
    api: &str,
    refused: &str,
) -> anyhow::Result<T> {
    let resp = patiently(req)
        .await
        .with_context(|| format!("sending to {api}"))?;
    let status = resp.status();
    let text = resp.text().await?;
    if !status.is_success() {
        bail!("{refused} ({status}): {text}");
    }
    serde_json::from_str(&text).with_context(|| format!("unexpected answer: {text}"))
}

/// Sends the file as a dry run and prints the answer as a table.
async fn dry_run(req: reqwest::RequestBuilder, api: &str) -> anyhow::Result<()> {
    let view: DryRunView = answer(req, api, "the import would be refused").await?;
    print!("{}", dry_run_table(&view));
    if let Some(why) = &view.refusal {
        bail!("the import would be refused: {why}");
    }
    Ok(())
}

/// A dry run's answer for a terminal: the counts, then the first row errors and changes.
fn dry_run_table(v: &DryRunView) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    if let Some(first) = &v.duplicate_of {
        let _ = writeln!(
            out,
            "the same file was imported as {first}: the import would be answered with it and change nothing"
        );
        return out;
    }
    let schema = v
        .schema_version
        .map_or("no schema".to_owned(), |n| format!("schema version {n}"));
    let _ = writeln!(
        out,
        "dry run, {} records ({schema}); nothing was stored",
        v.records
    );
    for (what, n) in [
        ("valid", v.valid),
        ("rejected", v.rejected),
        ("would insert", v.would_insert),
        ("would update", v.would_update),
        ("unchanged", v.unchanged),
    ] {
        let _ = writeln!(out, "  {what:<13}{n:>12}");
    }
    if !v.errors.is_empty() {
        let _ = writeln!(out, "first row errors:");
        for e in &v.errors {
            let _ = writeln!(
                out,
                "  line {:<7} {:<20} {:<22} {}",
                e.line,
                e.field.as_deref().unwrap_or(""),
                e.code,
                e.value.as_deref().unwrap_or("")
            );
        }
    }
    if !v.changes.is_empty() {
        let _ = writeln!(out, "first changes:");
        for c in &v.changes {
            match c.change {
                ChangeKind::Insert => {
                    let _ = writeln!(out, "  + {}", c.key);
                }
                ChangeKind::Update => {
                    let _ = writeln!(out, "  ~ {}", c.key);
                    for f in &c.fields {
                        let shown = |v: &Option<RawJson>| {
                            v.as_ref()
                                .map_or("(absent)".to_owned(), |r| r.0.get().to_owned())
                        };
                        let _ = writeln!(
                            out,
                            "      {}: {} → {}",
                            f.field,
                            shown(&f.old),
                            shown(&f.new)
                        );
                    }
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dry_run_reads_as_a_table() {
        // As the server sends it: the digits of `2.00` are kept.
        let v: DryRunView = serde_json::from_str(
            r#"{"format": "csv", "records": 4, "valid": 3, "rejected": 1,
                "would_insert": 1, "would_update": 1, "unchanged": 1, "schema_version": 2,
                "refusal": null, "duplicate_of": null,
                "errors": [{"line": 5, "field": "qty", "code": "type", "detail": "x", "value": "x"}],
                "changes": [
                    {"key": "9", "change": "insert", "fields": []},
                    {"key": "4", "change": "update",
                     "fields": [{"field": "price", "old": 1.5, "new": 2.00}]}
                ]}"#,
        )
        .unwrap();
        let table = dry_run_table(&v);
        assert!(table.starts_with("dry run, 4 records (schema version 2); nothing was stored\n"));
        assert!(table.contains("  would update            1\n"), "{table}");
        assert!(
            table.contains("  line 5       qty                  type                   x\n"),
            "{table}"
        );
        assert!(
            table.contains("  + 9\n  ~ 4\n      price: 1.5 → 2.00\n"),
            "{table}"
        );
    }
}

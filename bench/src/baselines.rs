//! What writing the same rows costs each database by its own bulk loader: the ceiling the
//! ingest benchmark prints its ratio against.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::Context;
use sqlx::Connection;

use crate::PgWork;

/// `COPY`s the records the benchmark stored into a fresh table shaped like `records` and
/// returns rows/s: the ceiling for writing these rows on this database.
pub(crate) async fn copy_baseline(url: &str, expected: usize) -> anyhow::Result<(f64, i64)> {
    let mut conn = sqlx::PgConnection::connect(url).await?;
    // Same columns, collations, keys and storage as the ledger's records table.
    sqlx::query("CREATE TABLE bench_copy (LIKE records INCLUDING ALL)")
        .execute(&mut conn)
        .await?;
    // The rows as text, prepared before timing: only the load is measured.
    let rows: Vec<(String, String, String, String, String, i64, i64)> = sqlx::query_as(
        "SELECT client_id, record_key, data::text, checksum, batch_id, updated_at, accepted_seq \
         FROM records",
    )
    .fetch_all(&mut conn)
    .await?;
    anyhow::ensure!(
        rows.len() == expected,
        "expected every record stored, found {}",
        rows.len()
    );
    let mut text = String::new();
    for (c, k, d, s, b, u, a) in &rows {
        text.push_str(&format!(
            "{c}\t{k}\t{}\t{s}\t{b}\t{u}\t{a}\n",
            d.replace('\\', "\\\\")
        ));
    }
    sqlx::query("CHECKPOINT").execute(&mut conn).await?;
    let wal_before = PgWork::wal(url).await?;
    let started = Instant::now();
    let mut copy = conn
        .copy_in_raw(
            "COPY bench_copy (client_id, record_key, data, checksum, batch_id, updated_at, \
             accepted_seq) FROM STDIN",
        )
        .await?;
    copy.send(text.as_bytes()).await?;
    copy.finish().await?;
    let rate = rows.len() as f64 / started.elapsed().as_secs_f64();
    Ok((rate, PgWork::wal(url).await? - wal_before))
}

/// Loads the records the benchmark stored in the SQLite ledger at `ledger` with the
/// `sqlite3` shell's `.import` into a fresh database with the same `records` table (its
/// key and indexes), in `dir`, and returns rows/s: the ceiling for writing these rows on
/// SQLite. `None` when no `sqlite3` shell is installed.
pub(crate) fn sqlite_import_baseline(
    ledger: &Path,
    dir: &Path,
    expected: usize,
) -> anyhow::Result<Option<f64>> {
    let sqlite3 = |db: &Path, commands: &[&str]| -> anyhow::Result<String> {
        let out = Command::new("sqlite3").arg(db).args(commands).output()?;
        anyhow::ensure!(
            out.status.success(),
            "sqlite3 {}: {}",
            commands.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8(out.stdout)?)
    };
    if Command::new("sqlite3").arg("-version").output().is_err() {
        eprintln!("no sqlite3 shell on the PATH: the .import baseline is left out");
        return Ok(None);
    }
    // The rows as CSV and the table's definition, prepared before timing.
    let csv = dir.join("records.csv");
    let csv_path = csv.to_str().context("a temporary path that is not UTF-8")?;
    sqlite3(
        ledger,
        &[
            "-csv",
            &format!(".output {csv_path}"),
            "SELECT client_id, record_key, data, checksum, batch_id, updated_at, accepted_seq, \
             version FROM records",
        ],
    )?;
    let schema = sqlite3(ledger, &[".schema records"])?;
    let target = dir.join("import.db");
    sqlite3(&target, &["PRAGMA journal_mode = WAL", &schema])?;
    let started = Instant::now();
    sqlite3(&target, &[&format!(".import --csv {csv_path} records")])?;
    let rate = expected as f64 / started.elapsed().as_secs_f64();
    let loaded: usize = sqlite3(&target, &["SELECT COUNT(*) FROM records"])?
        .trim()
        .parse()?;
    anyhow::ensure!(
        loaded == expected,
        "expected {expected} rows imported, found {loaded}"
    );
    Ok(Some(rate))
}

//! The CLI's resumable upload: the tus protocol against `/v1/uploads`, a part at a time
//! from the file on disk (never the whole file in memory), each part with its SHA-256 and,
//! when asked, compressed. Run again after an interruption, it resumes where the server
//! says the upload stands: the upload is created with an idempotency key made from the
//! file's path, length and modification time, so the server answers the same upload.

use std::io::{SeekFrom, Write};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use dataflow_contracts::http::ImportView;
use dataflow_contracts::{ImportFormat, ImportId};
use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncSeekExt};

/// How a body or part is compressed on the wire.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Gzip,
    Zstd,
}

impl Compression {
    pub fn encoding(self) -> &'static str {
        match self {
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
        }
    }

    pub fn apply(self, bytes: &[u8]) -> anyhow::Result<Vec<u8>> {
        Ok(match self {
            Compression::Gzip => {
                let mut gz =
                    flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
                gz.write_all(bytes)?;
                gz.finish()?
            }
            Compression::Zstd => zstd::encode_all(bytes, 3)?,
        })
    }
}

/// A transient failure (the connection, a 5xx, a 409 from a part that raced another) is
/// retried from `HEAD` this many times in a row before giving up.
const RETRIES: u32 = 8;

pub struct Upload<'a> {
    pub http: &'a reqwest::Client,
    pub api: &'a str,
    pub key: &'a str,
    pub file: &'a Path,
    pub format: ImportFormat,
    pub part_bytes: usize,
    pub compression: Option<Compression>,
    /// Names the upload across runs instead of the file's fingerprint.
    pub idempotency_key: Option<&'a str>,
}

impl Upload<'_> {
    /// Uploads the file (or the rest of it) and returns the import it became.
    pub async fn run(&self) -> anyhow::Result<ImportView> {
        let meta = tokio::fs::metadata(self.file)
            .await
            .with_context(|| format!("reading {}", self.file.display()))?;
        let length = meta.len();
        let key = match self.idempotency_key {
            Some(k) => k.to_owned(),
            None => fingerprint(self.file, &meta)?,
        };
        let location = self.create(length, &key).await?;
        let url = format!("{}{location}", self.api);
        let mut at = self.offset(&url).await?;
        if at > 0 && at < length {
            println!("resuming at {at} of {length} bytes");
        }
        let bar = ProgressBar::new(length);
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:40} {bytes}/{total_bytes} uploaded ({bytes_per_sec}) {msg}",
            )?
            .progress_chars("=> "),
        );
        bar.set_position(at);
        let mut file = tokio::fs::File::open(self.file).await?;
        let mut failures = 0;
        let mut import = None;
        while at < length {
            let size = usize::try_from(length - at)
                .unwrap_or(usize::MAX)
                .min(self.part_bytes);
            let mut part = vec![0u8; size];
            file.seek(SeekFrom::Start(at)).await?;
            file.read_exact(&mut part).await?;
            match self.send_part(&url, at, &part).await {
                Ok(done) => {
                    failures = 0;
                    at += size as u64;
                    bar.set_position(at);
                    import = done;
                }
                Err(Step::Refused(why)) => {
                    bar.abandon();
                    bail!("the upload was refused: {why}");
                }
                Err(Step::Transient(why)) if failures < RETRIES => {
                    failures += 1;
                    bar.set_message(format!("(retrying: {why})"));
                    tokio::time::sleep(Duration::from_millis(250 << failures.min(5))).await;
                    at = self.offset(&url).await?;
                    bar.set_position(at);
                }
                Err(Step::Transient(why)) => {
                    bar.abandon();
                    bail!("the upload failed: {why}; run the same command again to resume");
                }
            }
        }
        bar.finish();
        if import.is_none() {
            // Whole before this run's last part: a part of no bytes at the end asks the
            // server to make it an import, or says what it became.
            import = match self.send_part(&url, length, &[]).await {
                Ok(done) => done,
                Err(Step::Refused(why) | Step::Transient(why)) => {
                    bail!("the upload was not imported: {why}")
                }
            };
        }
        match import {
            Some(id) => self.import(&id).await,
            None => bail!("the server did not say which import the upload became"),
        }
    }

    /// Creates the upload, or finds the one this file started before.
    async fn create(&self, length: u64, key: &str) -> anyhow::Result<String> {
        let name = self
            .file
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("upload");
        let metadata = [
            ("filename", name),
            ("filetype", content_type(self.format)),
            ("idempotencyKey", key),
        ]
        .iter()
        .map(|(k, v)| format!("{k} {}", BASE64.encode(v)))
        .collect::<Vec<_>>()
        .join(",");
        let create = format!("{}/v1/uploads", self.api);
        let resp = patiently(
            self.tus(reqwest::Method::POST, &create)
                .header("upload-length", length)
                .header("upload-metadata", metadata),
        )
        .await
        .with_context(|| format!("sending to {}", self.api))?;
        let status = resp.status();
        if status != reqwest::StatusCode::CREATED {
            bail!(
                "the upload was refused ({status}): {}",
                resp.text().await.unwrap_or_default()
            );
        }
        resp.headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .context("the server created an upload without saying where")
    }

    async fn offset(&self, url: &str) -> anyhow::Result<u64> {
        let resp = patiently(self.tus(reqwest::Method::HEAD, url)).await?;
        if !resp.status().is_success() {
            bail!("asking where the upload stands: {}", resp.status());
        }
        resp.headers()
            .get("upload-offset")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .context("the server did not say where the upload stands")
    }

    /// Sends one part; the import's id once the last one made the file an import.
    async fn send_part(&self, url: &str, at: u64, part: &[u8]) -> Result<Option<ImportId>, Step> {
        let checksum = format!("sha256 {}", BASE64.encode(Sha256::digest(part)));
        let mut req = self
            .tus(reqwest::Method::PATCH, url)
            .header("upload-offset", at)
            .header("upload-checksum", checksum)
            .header("content-type", "application/offset+octet-stream");
        req = match self.compression {
            Some(c) => req.header("content-encoding", c.encoding()).body(
                c.apply(part)
                    .map_err(|e| Step::Refused(format!("compressing: {e}")))?,
            ),
            None => req.body(part.to_vec()),
        };
        let resp = patiently(req)
            .await
            .map_err(|e| Step::Transient(e.to_string()))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp
                .headers()
                .get("dataflow-import-id")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok()));
        }
        let text = resp.text().await.unwrap_or_default();
        // 460: the part arrived damaged; sent again from where the server stands.
        if status.is_server_error()
            || status == reqwest::StatusCode::CONFLICT
            || status.as_u16() == 460
        {
            Err(Step::Transient(format!("{status}: {text}")))
        } else {
            Err(Step::Refused(format!("{status}: {text}")))
        }
    }

    async fn import(&self, id: &ImportId) -> anyhow::Result<ImportView> {
        let url = format!("{}/v1/imports/{id}", self.api);
        let resp = patiently(self.authed(reqwest::Method::GET, &url)).await?;
        if !resp.status().is_success() {
            bail!("reading import {id}: {}", resp.status());
        }
        Ok(resp.json().await?)
    }

    fn authed(&self, method: reqwest::Method, url: &str) -> reqwest::RequestBuilder {
        self.http.request(method, url).bearer_auth(self.key)
    }

    fn tus(&self, method: reqwest::Method, url: &str) -> reqwest::RequestBuilder {
        self.authed(method, url).header("tus-resumable", "1.0.0")
    }
}

/// The longest `Retry-After` a request waits out by itself; a longer one (a quota that
/// clears tomorrow) is the answer, and the person running the command decides.
const MOST_PATIENCE: Duration = Duration::from_secs(60);

/// How long one request may wait out `429`s in all before the last one is the answer.
const MOST_WAITING: Duration = Duration::from_secs(600);

/// Sends `req`, and again each time the server answers `429` with a `Retry-After` of at
/// most [`MOST_PATIENCE`], after waiting that long (up to [`MOST_WAITING`] in all): the
/// parts of a large file outrun a client's request rate, and that is a reason to slow
/// down, not to stop.
pub(crate) async fn patiently(req: reqwest::RequestBuilder) -> reqwest::Result<reqwest::Response> {
    let mut waited = Duration::ZERO;
    loop {
        // Every body the CLI sends is bytes, which can be sent again; one that could not
        // would be sent once.
        let Some(attempt) = req.try_clone() else {
            return req.send().await;
        };
        let resp = attempt.send().await?;
        if resp.status() != reqwest::StatusCode::TOO_MANY_REQUESTS {
            return Ok(resp);
        }
        let wait = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .map(Duration::from_secs);
        match wait.map(|w| w.max(Duration::from_millis(100))) {
            Some(wait) if wait <= MOST_PATIENCE && waited + wait <= MOST_WAITING => {
                tokio::time::sleep(wait).await;
                waited += wait;
            }
            _ => return Ok(resp),
        }
    }
}

enum Step {
    /// Worth another try from where the server says the upload stands.
    Transient(String),
    /// The server refused the file or the part; trying again changes nothing.
    Refused(String),
}

pub fn content_type(format: ImportFormat) -> &'static str {
    match format {
        ImportFormat::Csv => "text/csv",
        ImportFormat::Ndjson => "application/x-ndjson",
    }
}

/// What names this file's upload across runs: its full path, length and modification time
/// (a file changed since is a new upload).
fn fingerprint(file: &Path, meta: &std::fs::Metadata) -> anyhow::Result<String> {
    let path = std::fs::canonicalize(file)?;
    let modified = meta
        .modified()?
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let seed = format!("{}\n{}\n{modified}", path.display(), meta.len());
    Ok(format!("cli-{}", hex::encode(Sha256::digest(seed))))
}

//! A file on its way in: a request body (`POST /v1/imports`) or a tus part
//! (`PATCH /v1/uploads/{id}`), decompressed when it was sent compressed, within its bounds,
//! and read a part at a time, so that no process ever holds a whole file.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_compression::tokio::bufread::{GzipDecoder, ZstdDecoder};
use axum::body::Body;
use axum::http::{HeaderMap, StatusCode, header};
use bytes::BytesMut;
use futures::TryStreamExt;
use tokio::io::{AsyncRead, AsyncReadExt, BufReader};
use tokio_util::io::StreamReader;

use crate::error::{ApiError, ApiResult};

/// The most a read adds to a part's buffer at once.
const READ_STEP: usize = 64 * 1024;

/// Decompressed bytes are not judged against the ratio below this much: small bodies of
/// repeated values compress very well and are no threat.
const RATIO_FLOOR: u64 = 1024 * 1024;

/// How a body was sent (`Content-Encoding`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Identity,
    Gzip,
    Zstd,
}

impl Encoding {
    /// The body's `Content-Encoding`; anything but `gzip`, `zstd` or `identity` is a 415.
    pub fn of(headers: &HeaderMap) -> ApiResult<Encoding> {
        let Some(value) = headers.get(header::CONTENT_ENCODING) else {
            return Ok(Encoding::Identity);
        };
        match value
            .to_str()
            .map(|v| v.trim().to_ascii_lowercase())
            .as_deref()
        {
            Ok("" | "identity") => Ok(Encoding::Identity),
            Ok("gzip" | "x-gzip") => Ok(Encoding::Gzip),
            Ok("zstd") => Ok(Encoding::Zstd),
            _ => Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_content_encoding",
                "send the body as it is, or with Content-Encoding: gzip or zstd",
            )),
        }
    }
}

/// A body as decompressed bytes, refused past `limit` of them or past the ratio.
pub struct Inflow {
    reader: Pin<Box<dyn AsyncRead + Send>>,
    encoding: Encoding,
    /// Bytes as they came over the wire.
    sent: Arc<AtomicU64>,
    /// Bytes after decompression.
    read: u64,
    limit: u64,
    max_ratio: u64,
    idle_timeout_secs: u64,
}

impl Inflow {
    pub fn new(
        body: Body,
        encoding: Encoding,
        limit: u64,
        max_ratio: u64,
        idle_timeout_secs: u64,
    ) -> Self {
        let sent = Arc::new(AtomicU64::new(0));
        let counted = sent.clone();
        let stream = body
            .into_data_stream()
            .inspect_ok(move |chunk| {
                counted.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            })
            .map_err(io::Error::other);
        let raw = BufReader::new(StreamReader::new(stream));
        // Concatenated members (`cat a.gz b.gz`, bgzip, pzstd) are one body: each is read,
        // and whatever follows the last one must be another, or the body is refused.
        let reader: Pin<Box<dyn AsyncRead + Send>> = match encoding {
            Encoding::Identity => Box::pin(raw),
            Encoding::Gzip => {
                let mut d = GzipDecoder::new(raw);
                d.multiple_members(true);
                Box::pin(d)
            }
            Encoding::Zstd => {
                let mut d = ZstdDecoder::new(raw);
                d.multiple_members(true);
                Box::pin(d)
            }
        };
        Self {
            reader,
            encoding,
            sent,
            read: 0,
            limit,
            max_ratio,
            idle_timeout_secs,
        }
    }

    /// Decompressed bytes read so far.
    pub fn read(&self) -> u64 {
        self.read
    }

    /// Reads into `part` until it holds `size` bytes or the body ends. `false` when the
    /// body ended.
    pub async fn fill(&mut self, part: &mut BytesMut, size: usize) -> ApiResult<bool> {
        while part.len() < size {
            let want = size - part.len();
            // In steps: a short body sent without its length does not take a whole part.
            part.reserve(want.min(READ_STEP));
            let n = match self.reader.as_mut().take(want as u64).read_buf(part).await {
                Ok(n) => n,
                Err(e) => return Err(self.failure(e)),
            };
            if n == 0 {
                return Ok(false);
            }
            self.read += n as u64;
            self.check()?;
        }
        Ok(true)
    }

    fn check(&self) -> ApiResult<()> {
        if self.read > self.limit {
            let what = match self.encoding {
                Encoding::Identity => "the body",
                Encoding::Gzip | Encoding::Zstd => "the body, decompressed,",
            };
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("{what} is over {} bytes", self.limit),
            ));
        }
        let sent = self.sent.load(Ordering::Relaxed).max(1);
        if self.encoding != Encoding::Identity
            && self.read > RATIO_FLOOR
            && self.read / sent > self.max_ratio
        {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "compression_ratio_too_high",
                format!(
                    "the body decompresses to more than {} times its size; send it \
                     uncompressed or less compressed",
                    self.max_ratio
                ),
            ));
        }
        Ok(())
    }

    /// What a failed read means for the sender.
    fn failure(&self, e: io::Error) -> ApiError {
        let from_body = e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<axum::Error>());
        match from_body {
            Some(e) if caused_by::<tower_http::timeout::TimeoutError>(e) => ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "body_idle_timeout",
                format!(
                    "no byte of the body arrived for {} s; send it without pausing, or use a \
                     resumable upload (/v1/uploads)",
                    self.idle_timeout_secs
                ),
            ),
            Some(e) => {
                ApiError::bad_request("body_read_failed", format!("could not read the body: {e}"))
            }
            // Not the connection's: the decoder's.
            None => ApiError::bad_request(
                "invalid_encoding",
                format!("the body is not valid {:?}: {e}", self.encoding).to_lowercase(),
            ),
        }
    }
}

/// Whether `T` is in the cause chain of `e`.
pub fn caused_by<T: std::error::Error + 'static>(e: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if s.is::<T>() {
            return true;
        }
        source = s.source();
    }
    false
}

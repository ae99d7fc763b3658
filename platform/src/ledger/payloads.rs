//! Stored files, a part at a time: uploads on their way in (a tus upload, or a large
//! request body while it is read and checked), the payloads of imports read back as a
//! stream, and payloads deleted once their retention is over.
//!
//! A part is committed together with the upload's new offset and running SHA-256, so an
//! acknowledged byte is never lost and any process can take the next part. When the file
//! becomes an import, the submit transaction hands its parts to the batch
//! (`batches.payload_id`); nothing is copied.

use std::io::{self, Read};

use dataflow_contracts::{ClientId, ImportFormat, ImportId, UploadId};
use tokio::sync::mpsc;

use super::clients::parse_id;
use super::{Db, count};
use crate::{Error, Result};

/// The storage of the clients that `$rest` (a `WHERE` or an `ORDER BY`) selects: id, kept
/// payload bytes, unfinished upload bytes, records. PostgreSQL sums BIGINTs as NUMERIC,
/// which the Any driver cannot read: cast back.
macro_rules! storage_of_clients {
    ($rest:literal) => {
        concat!(
            "SELECT c.id, \
                    CAST(COALESCE((SELECT SUM(payload_bytes) FROM batches b \
                                   WHERE b.client_id = c.id \
                                     AND b.payload_expired_at IS NULL), 0) AS BIGINT), \
                    CAST(COALESCE((SELECT SUM(received) FROM uploads u \
                                   WHERE u.client_id = c.id AND u.import_id IS NULL), 0) \
                         AS BIGINT), \
                    COALESCE((SELECT records FROM change_counters k WHERE k.client_id = c.id), 0) \
             FROM clients c ",
            $rest
        )
    };
}

/// How much of a file one stored part holds: what a reader or writer keeps in memory per
/// file, and the most a connection cut mid-part can lose (the sender resends it).
pub const PART_BYTES: usize = 1024 * 1024;

/// What an upload is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UploadKind {
    /// A tus upload, which its client drives part by part.
    Tus,
    /// A request body larger than one part, kept while the request reads and checks it.
    Body,
}

impl UploadKind {
    fn as_str(self) -> &'static str {
        match self {
            Self::Tus => "tus",
            Self::Body => "body",
        }
    }
}

pub struct NewUpload<'a> {
    pub client_id: &'a ClientId,
    pub kind: UploadKind,
    pub length: u64,
    pub format: ImportFormat,
    /// The `Upload-Metadata` header as sent, answered back on `HEAD`.
    pub metadata: &'a str,
    pub idempotency_key: Option<&'a str>,
    /// The running SHA-256 of no bytes.
    pub digest: &'a [u8],
    /// How long the upload may rest between two parts before it expires.
    pub ttl_ms: i64,
}

/// An upload as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upload {
    pub id: UploadId,
    pub client_id: ClientId,
    pub length: u64,
    /// Bytes received and stored: the tus `Upload-Offset`.
    pub received: u64,
    pub format: ImportFormat,
    pub metadata: String,
    pub idempotency_key: Option<String>,
    /// The running SHA-256 over the bytes received, serialized.
    pub digest: Vec<u8>,
    /// The import the finished file became.
    pub import_id: Option<ImportId>,
    /// Why the finished file was refused (an error body as JSON), if it was.
    pub outcome: Option<String>,
    /// When it expires, by the ledger's clock (milliseconds).
    pub expires_at: i64,
}

/// What [`Db::create_upload`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UploadCreated {
    New(Upload),
    /// The client's idempotency key already named this upload.
    Existing(Upload),
}

/// The storage a client holds in the ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientStorage {
    pub client_id: ClientId,
    /// Payloads kept for its batches.
    pub payload_bytes: u64,
    /// Bytes of uploads not yet finished.
    pub upload_bytes: u64,
    pub records: u64,
}

/// What one [`Db::expire_payloads`] call deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExpiredPayloads {
    /// Batches whose payload is gone (an empty payload counts, so a caller can tell a
    /// full round from the last one).
    pub batches: u64,
    /// Bytes freed.
    pub bytes: u64,
}

/// A size as operators read it: `512 B`, `1.5 KiB`, `20.0 MiB`, `3.2 GiB`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

#[derive(sqlx::FromRow)]
struct UploadColumns {
    id: String,
    client_id: String,
    length: i64,
    received: i64,
    format: String,
    metadata: String,
    idempotency_key: Option<String>,
    digest: Vec<u8>,
    import_id: Option<String>,
    outcome: Option<String>,
    expires_at: i64,
}

impl UploadColumns {
    fn parse(self) -> Result<Upload> {
        Ok(Upload {
            id: parse_id(self.id)?,
            client_id: parse_id(self.client_id)?,
            length: count(self.length),
            received: count(self.received),
            format: self.format.parse().map_err(Error::stored)?,
            metadata: self.metadata,
            idempotency_key: self.idempotency_key,
            digest: self.digest,
            import_id: self.import_id.map(parse_id).transpose()?,
            outcome: self.outcome,
            expires_at: self.expires_at,
        })
    }
}

const UPLOAD_COLUMNS: &str = "id, client_id, length, received, format, metadata, \
     idempotency_key, digest, import_id, outcome, expires_at";

impl Db {
    /// Opens an upload; with an idempotency key the client used before, answers that
    /// upload instead.
    pub async fn create_upload(&self, new: &NewUpload<'_>) -> Result<UploadCreated> {
        if let Some(key) = new.idempotency_key {
            self.release_expired_key(new.client_id, key).await?;
        }
        if let Some(existing) = self.upload_by_key(new).await? {
            return Ok(UploadCreated::Existing(existing));
        }
        let id = UploadId::generate();
        let sql = self.sql(&format!(
            "INSERT INTO uploads (id, client_id, kind, length, format, metadata, \
                                  idempotency_key, digest, created_at, updated_at, expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, {{now}}, {{now}}, {{now}} + $9) \
             ON CONFLICT DO NOTHING RETURNING {UPLOAD_COLUMNS}"
        ));
        let row = sqlx::query_as::<_, UploadColumns>(sql)
            .bind(id.as_str())
            .bind(new.client_id.as_str())
            .bind(new.kind.as_str())
            .bind(i64::try_from(new.length).unwrap_or(i64::MAX))
            .bind(new.format.as_str())
            .bind(new.metadata)
            .bind(new.idempotency_key)
            .bind(new.digest)
            .bind(new.ttl_ms)
            .fetch_optional(&mut *self.writer_for(new.client_id).await?)
            .await?;
        match row {
            Some(row) => Ok(UploadCreated::New(row.parse()?)),
            // Another request with the same key created it first.
            None => self
                .upload_by_key(new)
                .await?
                .map(UploadCreated::Existing)
                .ok_or_else(|| Error::Conflict("the upload was ended while it was created".into())),
        }
    }

    /// An expired upload not swept yet gives its idempotency key up (and its parts, unless
    /// it became an import).
    async fn release_expired_key(&self, client: &ClientId, key: &str) -> Result<()> {
        let mut tx = self.begin_write().await?;
        let sql = self.sql(
            "DELETE FROM uploads WHERE client_id = $1 AND idempotency_key = $2 \
               AND expires_at <= {now} RETURNING id, import_id",
        );
        let gone: Option<(String, Option<String>)> = sqlx::query_as(sql)
            .bind(client.as_str())
            .bind(key)
            .fetch_optional(&mut *tx)
            .await?;
        if let Some((id, None)) = &gone {
            delete_parts(&mut tx, id).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn upload_by_key(&self, new: &NewUpload<'_>) -> Result<Option<Upload>> {
        let Some(key) = new.idempotency_key else {
            return Ok(None);
        };
        let sql = format!(
            "SELECT {UPLOAD_COLUMNS} FROM uploads WHERE client_id = $1 AND idempotency_key = $2"
        );
        sqlx::query_as::<_, UploadColumns>(sqlx::AssertSqlSafe(sql))
            .bind(new.client_id.as_str())
            .bind(key)
            .fetch_optional(self.pool())
            .await?
            .map(UploadColumns::parse)
            .transpose()
    }

    /// One of the client's uploads (another client's is not found), unexpired.
    pub async fn get_upload(&self, client: &ClientId, id: &UploadId) -> Result<Option<Upload>> {
        let sql = self.sql(&format!(
            "SELECT {UPLOAD_COLUMNS} FROM uploads \
             WHERE id = $1 AND client_id = $2 AND expires_at > {{now}}"
        ));
        sqlx::query_as::<_, UploadColumns>(sql)
            .bind(id.as_str())
            .bind(client.as_str())
            .fetch_optional(self.pool())
            .await?
            .map(UploadColumns::parse)
            .transpose()
    }

    /// Stores `part` at `offset` with the running digest over everything up to its end,
    /// and moves the offset on, in one transaction; the expiry starts again. `false` when
    /// the upload is no longer at `offset` (another request wrote first, or it ended):
    /// nothing was stored.
    pub async fn append_part(
        &self,
        client: &ClientId,
        id: &UploadId,
        offset: u64,
        part: &[u8],
        digest: &[u8],
        ttl_ms: i64,
    ) -> Result<bool> {
        let mut tx = self.begin_write_for(client).await?;
        let sql = self.sql(
            "UPDATE uploads SET received = received + $1, parts = parts + 1, digest = $2, \
                                updated_at = {now}, expires_at = {now} + $3 \
             WHERE id = $4 AND received = $5 AND import_id IS NULL AND outcome IS NULL \
               AND received + $1 <= length \
             RETURNING parts - 1",
        );
        let seq: Option<i64> = sqlx::query_scalar(sql)
            .bind(part.len() as i64)
            .bind(digest)
            .bind(ttl_ms)
            .bind(id.as_str())
            .bind(i64::try_from(offset).unwrap_or(i64::MAX))
            .fetch_optional(&mut *tx)
            .await?;
        let Some(seq) = seq else {
            tx.rollback().await?;
            return Ok(false);
        };
        sqlx::query("INSERT INTO payload_parts (payload_id, seq, body) VALUES ($1, $2, $3)")
            .bind(id.as_str())
            .bind(seq)
            .bind(part)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Records why the finished file was not imported and deletes its parts; the upload
    /// stays until it expires, answering with the outcome.
    pub async fn refuse_upload(&self, id: &UploadId, outcome: &str) -> Result<()> {
        let mut tx = self.begin_write().await?;
        let refused =
            sqlx::query("UPDATE uploads SET outcome = $1 WHERE id = $2 AND import_id IS NULL")
                .bind(outcome)
                .bind(id.as_str())
                .execute(&mut *tx)
                .await?;
        if refused.rows_affected() > 0 {
            delete_parts(&mut tx, id.as_str()).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Ends one of the client's uploads (tus termination). Its parts go with it unless it
    /// became an import, whose batch owns them. `false` if there was no such upload.
    pub async fn delete_upload(&self, client: &ClientId, id: &UploadId) -> Result<bool> {
        let mut tx = self.begin_write().await?;
        let import: Option<Option<String>> = sqlx::query_scalar(
            "DELETE FROM uploads WHERE id = $1 AND client_id = $2 RETURNING import_id",
        )
        .bind(id.as_str())
        .bind(client.as_str())
        .fetch_optional(&mut *tx)
        .await?;
        if import == Some(None) {
            delete_parts(&mut tx, id.as_str()).await?;
        }
        tx.commit().await?;
        Ok(import.is_some())
    }

    /// Deletes an upload that did not become an import, with its parts (a refused request
    /// body's).
    pub async fn discard_upload(&self, id: &UploadId) -> Result<()> {
        let mut tx = self.begin_write().await?;
        let gone = sqlx::query("DELETE FROM uploads WHERE id = $1 AND import_id IS NULL")
            .bind(id.as_str())
            .execute(&mut *tx)
            .await?;
        if gone.rows_affected() > 0 {
            delete_parts(&mut tx, id.as_str()).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Deletes up to `limit` expired uploads (and the parts of those that did not become
    /// an import). Returns how many.
    pub async fn expire_uploads(&self, limit: u32) -> Result<u64> {
        let mut tx = self.begin_write().await?;
        let sql = self.sql(
            "SELECT id, import_id FROM uploads WHERE expires_at <= {now} ORDER BY expires_at LIMIT $1",
        );
        let expired: Vec<(String, Option<String>)> = sqlx::query_as(sql)
            .bind(i64::from(limit))
            .fetch_all(&mut *tx)
            .await?;
        for (id, _) in &expired {
            // Deleted by its expiry again: an upload a submit made an import of meanwhile
            // is no longer unfinished, and its parts are the batch's.
            let sql = self.sql(
                "DELETE FROM uploads WHERE id = $1 AND expires_at <= {now} RETURNING import_id",
            );
            let gone: Option<Option<String>> = sqlx::query_scalar(sql)
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
            if gone == Some(None) {
                delete_parts(&mut tx, id).await?;
            }
        }
        tx.commit().await?;
        Ok(expired.len() as u64)
    }

    /// Where a batch's payload is and how long it is; `None` once retention deleted it.
    pub async fn batch_payload(
        &self,
        batch: &dataflow_contracts::BatchId,
    ) -> Result<Option<(String, u64)>> {
        let row: Option<(Option<String>, i64, Option<i64>)> = sqlx::query_as(
            "SELECT payload_id, payload_bytes, payload_expired_at FROM batches WHERE id = $1",
        )
        .bind(batch.as_str())
        .fetch_optional(self.pool())
        .await?;
        let (id, bytes, expired_at) = row.ok_or(Error::NotFound)?;
        Ok(stored_payload(id, bytes, expired_at))
    }

    /// Reads a stored file back in order for a blocking thread, a part when the parser asks
    /// for the next bytes ([`PartsReader`]). Ends after `bytes` (no part after the last is
    /// looked for), or with an error when a part is missing before them or goes past them.
    /// Must be called inside the runtime (a task or a blocking thread of it).
    pub fn read_payload(&self, payload_id: String, bytes: u64) -> PartsReader {
        PartsReader::of(Parts::Stored(StoredParts {
            db: self.clone(),
            runtime: tokio::runtime::Handle::current(),
            payload_id,
            bytes,
            seq: 0,
            read: 0,
        }))
    }

    /// Deletes the payloads of the client's batches that ended more than `retention_ms`
    /// ago, up to `limit` of them; the batches, their counts and errors stay.
    pub async fn expire_payloads(
        &self,
        client: &ClientId,
        retention_ms: i64,
        limit: u32,
    ) -> Result<ExpiredPayloads> {
        // The cutoff as a value, so that it bounds the walk of the client's kept files by
        // age (PostgreSQL reads `{now}` row by row: it would walk them all).
        let cutoff = self.now_ms().await? - retention_ms;
        let mut tx = self.begin_write().await?;
        let sql = self.sql(
            "UPDATE batches SET payload_expired_at = {now} \
             WHERE id IN (SELECT id FROM batches \
                          WHERE client_id = $1 AND payload_expired_at IS NULL \
                            AND updated_at <= $2 \
                            AND status IN ('completed', 'rejected', 'dead') \
                          ORDER BY updated_at LIMIT $3) \
             RETURNING payload_id, payload_bytes",
        );
        let expired: Vec<(Option<String>, i64)> = sqlx::query_as(sql)
            .bind(client.as_str())
            .bind(cutoff)
            .bind(i64::from(limit))
            .fetch_all(&mut *tx)
            .await?;
        let mut freed = 0;
        for (id, bytes) in &expired {
            freed += count(*bytes);
            if let Some(id) = id {
                delete_parts(&mut tx, id).await?;
            }
        }
        tx.commit().await?;
        Ok(ExpiredPayloads {
            batches: expired.len() as u64,
            bytes: freed,
        })
    }

    /// The storage each client holds: kept payloads, unfinished uploads, records.
    pub async fn storage_by_client(&self) -> Result<Vec<ClientStorage>> {
        let rows = sqlx::query_as(storage_of_clients!("ORDER BY c.id"))
            .fetch_all(self.pool())
            .await?;
        rows.into_iter().map(client_storage).collect()
    }

    /// [`Db::storage_by_client`] for one client (its dashboard page), `None` if unknown.
    pub async fn storage_of(&self, client: &ClientId) -> Result<Option<ClientStorage>> {
        let row = sqlx::query_as(storage_of_clients!("WHERE c.id = $1"))
            .bind(client.as_str())
            .fetch_optional(self.pool())
            .await?;
        row.map(client_storage).transpose()
    }
}

fn client_storage(
    (id, payload, upload, records): (String, i64, i64, i64),
) -> Result<ClientStorage> {
    Ok(ClientStorage {
        client_id: parse_id(id)?,
        payload_bytes: count(payload),
        upload_bytes: count(upload),
        records: count(records),
    })
}

/// Deletes the parts of one stored file, inside the caller's transaction.
pub(super) async fn delete_parts(tx: &mut super::Tx, payload_id: &str) -> Result<()> {
    sqlx::query("DELETE FROM payload_parts WHERE payload_id = $1")
        .bind(payload_id)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// A batch's stored file from its `payload_id`, `payload_bytes` and `payload_expired_at`
/// columns: its id and size, or `None` once its retention ended and it was deleted.
pub(super) fn stored_payload(
    id: Option<String>,
    bytes: i64,
    expired_at: Option<i64>,
) -> Option<(String, u64)> {
    match (id, expired_at) {
        (Some(id), None) => Some((id, count(bytes))),
        _ => None,
    }
}

/// A file as a `Read` for the parsers on a blocking thread, a part at a time: parts another
/// task sends ([`PartsReader::new`], a request body on its way in), or a stored file read
/// back from the ledger ([`Db::read_payload`]). A failed read passes the ledger's error on
/// inside the `io::Error`, so an outage stays one.
pub struct PartsReader {
    source: Parts,
    current: Vec<u8>,
    at: usize,
}

enum Parts {
    Sent(mpsc::Receiver<Result<Vec<u8>>>),
    Stored(StoredParts),
}

/// A stored file's parts, each read when the parser has used up the one before.
///
/// Why not read ahead: a worker reads up to `worker.concurrency` files at once, and most
/// of them wait for room in its records budget with a part in hand. Read ahead, each held
/// two or three parts (of [`PART_BYTES`] each) while it waited, the largest share of a
/// worker's heap; read when asked, it holds the one it parses. The wait for a part is a
/// small share of the time its records take to prepare and write.
struct StoredParts {
    db: Db,
    runtime: tokio::runtime::Handle,
    payload_id: String,
    bytes: u64,
    seq: i64,
    read: u64,
}

impl StoredParts {
    /// The next part, or `None` after the last.
    fn next(&mut self) -> Result<Option<Vec<u8>>> {
        // Whole once its bytes are read: no part after the last is looked for.
        if self.read == self.bytes {
            return Ok(None);
        }
        let part: Option<Vec<u8>> = self.runtime.block_on(
            sqlx::query_scalar("SELECT body FROM payload_parts WHERE payload_id = $1 AND seq = $2")
                .bind(&self.payload_id)
                .bind(self.seq)
                .fetch_optional(self.db.pool()),
        )?;
        match part {
            Some(body) if self.read + body.len() as u64 <= self.bytes => {
                self.seq += 1;
                self.read += body.len() as u64;
                Ok(Some(body))
            }
            part => {
                let (id, seq) = (&self.payload_id, self.seq);
                let found = match part {
                    Some(body) => format!("holds {} more", body.len()),
                    None => "is missing".to_owned(),
                };
                Err(Error::stored(format!(
                    "payload {id}: {} bytes were stored, but its parts before part {seq} hold \
                     {} and part {seq} {found}",
                    self.bytes, self.read
                )))
            }
        }
    }
}

impl PartsReader {
    /// A reader over parts sent by another task: each `Ok` is the next bytes of the file,
    /// an `Err` ends it with that error, and the end of the channel ends the file.
    pub fn new(parts: mpsc::Receiver<Result<Vec<u8>>>) -> Self {
        Self::of(Parts::Sent(parts))
    }

    fn of(source: Parts) -> Self {
        Self {
            source,
            current: Vec::new(),
            at: 0,
        }
    }

    fn next_part(&mut self) -> Result<Option<Vec<u8>>> {
        match &mut self.source {
            Parts::Sent(parts) => parts.blocking_recv().transpose(),
            Parts::Stored(stored) => stored.next(),
        }
    }
}

impl Read for PartsReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.at == self.current.len() {
            // The part used up goes before the next arrives.
            self.current = Vec::new();
            self.at = 0;
            match self.next_part().map_err(io::Error::other)? {
                Some(part) => self.current = part,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len() - self.at);
        buf[..n].copy_from_slice(&self.current[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::human_bytes;

    #[test]
    fn sizes_read_well() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(20 * 1024 * 1024), "20.0 MiB");
        assert_eq!(
            human_bytes(3 * 1024 * 1024 * 1024 + 200 * 1024 * 1024),
            "3.2 GiB"
        );
        assert_eq!(human_bytes(u64::MAX), "16777216.0 TiB");
    }
}

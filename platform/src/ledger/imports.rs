//! The submit transaction and what guards it: `Idempotency-Key` (Stripe's semantics),
//! payload-checksum dedup with a window, and the daily record quota.

use dataflow_contracts::events::{BatchCreated, BatchReady, Envelope, Event};
use dataflow_contracts::http::ImportView;
use dataflow_contracts::time::rfc3339;
use dataflow_contracts::{
    BatchId, BatchStatus, ClientId, ImportFormat, ImportId, Policy, Priority, UploadId,
};
use sqlx::Row;

use super::clients::parse_id;
use super::{Db, count};
use crate::{Error, Result};

const MS_PER_DAY: i64 = 86_400_000;

/// An accepted, parsed import about to be stored.
pub struct NewImport<'a> {
    pub client_id: &'a ClientId,
    pub format: ImportFormat,
    pub payload: Payload<'a>,
    /// The file's length.
    pub bytes: u64,
    pub records: u64,
    /// Hex SHA-256 of the file.
    pub checksum: &'a str,
    /// What makes two imports the same within the dedup window (the checksum, and the
    /// schema version when there is one).
    pub dedup_key: &'a str,
    pub policy: &'a Policy,
    /// The version of the client's schema its records are to be checked with.
    pub schema_version: Option<u64>,
    /// Where its batch stands among the client's own batches.
    pub priority: Priority,
    pub idempotency: Option<&'a IdempotencyClaim>,
}

/// Where an import's file is.
#[derive(Debug, Clone, Copy)]
pub enum Payload<'a> {
    /// In the request, no longer than a part: stored by the submit transaction.
    Inline(&'a [u8]),
    /// Already stored as the parts of this upload; the submit transaction hands them to
    /// the batch, and the upload names its import from then on.
    Upload(&'a UploadId),
}

/// A held `Idempotency-Key`: only the holder of the current token may answer or release it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyClaim {
    pub key: String,
    token: String,
}

pub enum SubmitOutcome {
    Created(ImportView),
    /// The same payload arrived within the dedup window; this is the first import.
    Duplicate(ImportView),
    /// The request ran so long that its `Idempotency-Key` was taken over; nothing was stored.
    IdempotencyKeyLost,
    /// The import alone has more records than the daily quota: it can never be accepted.
    LargerThanQuota {
        quota: u64,
    },
    /// Accepting these records would pass the daily quota.
    QuotaExceeded {
        used: u64,
        quota: u64,
        retry_after_ms: u64,
    },
}

/// What to do with a request that carries an `Idempotency-Key`.
#[derive(Debug, PartialEq, Eq)]
pub enum IdempotencyStart {
    /// First use (or an expired or abandoned one): go ahead; finish or abort afterwards.
    Proceed(IdempotencyClaim),
    /// A finished request with this key and the same body: answer with its response.
    Replay { status: u16, body: String },
    /// The key was used with a different request.
    Mismatch,
    /// The first request with this key may still be running: it holds the key for at
    /// most `retry_after_ms` more (until its deadline).
    InProgress { retry_after_ms: u64 },
}

impl Db {
    /// Claims an idempotency key for a request fingerprinted by `request_hash`, held for
    /// `lock_ms` (the time the request has left before its deadline: past it the request
    /// can no longer be running, so the key is free for a retry). The claim's token stays
    /// the fence either way: a request that outlived its claim stores nothing.
    pub async fn idempotency_start(
        &self,
        client: &ClientId,
        key: &str,
        request_hash: &str,
        ttl_ms: i64,
        lock_ms: i64,
    ) -> Result<IdempotencyStart> {
        // An expired record, or an in-progress one whose request is past its deadline, is
        // taken over.
        let token = ulid::Ulid::new().to_string();
        let sql = self.sql(
            "INSERT INTO idempotency_keys \
               (client_id, idem_key, request_hash, created_at, claim_token, locked_until) \
             VALUES ($1, $2, $3, {now}, $6, {now} + $5) \
             ON CONFLICT (client_id, idem_key) DO UPDATE \
               SET request_hash = excluded.request_hash, created_at = excluded.created_at, \
                   claim_token = excluded.claim_token, locked_until = excluded.locked_until, \
                   response_status = NULL, response_body = NULL \
             WHERE idempotency_keys.created_at < {now} - $4 \
                OR (idempotency_keys.response_status IS NULL \
                    AND idempotency_keys.locked_until <= {now}) \
             RETURNING created_at",
        );
        let claimed = sqlx::query(sql)
            .bind(client.as_str())
            .bind(key)
            .bind(request_hash)
            .bind(ttl_ms)
            .bind(lock_ms)
            .bind(&token)
            .fetch_optional(&mut *self.writer().await?)
            .await?;
        if claimed.is_some() {
            return Ok(IdempotencyStart::Proceed(IdempotencyClaim {
                key: key.to_owned(),
                token,
            }));
        }
        let sql = self.sql(
            "SELECT request_hash, response_status, response_body, locked_until - {now} AS left_ms \
             FROM idempotency_keys WHERE client_id = $1 AND idem_key = $2",
        );
        let row = sqlx::query(sql)
            .bind(client.as_str())
            .bind(key)
            .fetch_optional(self.pool())
            .await?;
        let Some(row) = row else {
            // Deleted by an abort between our two statements: the key is free again.
            return Box::pin(self.idempotency_start(client, key, request_hash, ttl_ms, lock_ms))
                .await;
        };
        if row.try_get::<String, _>("request_hash")? != request_hash {
            return Ok(IdempotencyStart::Mismatch);
        }
        Ok(match row.try_get::<Option<i64>, _>("response_status")? {
            None => IdempotencyStart::InProgress {
                retry_after_ms: count(row.try_get("left_ms")?),
            },
            Some(status) => IdempotencyStart::Replay {
                status: u16::try_from(status).unwrap_or(500),
                body: row
                    .try_get::<Option<String>, _>("response_body")?
                    .unwrap_or_default(),
            },
        })
    }

    /// Stores the response to replay for a finished request (if the claim is still ours).
    pub async fn idempotency_finish(
        &self,
        client: &ClientId,
        claim: &IdempotencyClaim,
        status: u16,
        body: &str,
    ) -> Result<()> {
        sqlx::query(
            "UPDATE idempotency_keys SET response_status = $4, response_body = $5 \
             WHERE client_id = $1 AND idem_key = $2 AND claim_token = $3",
        )
        .bind(client.as_str())
        .bind(&claim.key)
        .bind(&claim.token)
        .bind(i64::from(status))
        .bind(body)
        .execute(&mut *self.writer().await?)
        .await?;
        Ok(())
    }

    /// Releases the key of a request that ended without a result worth replaying.
    pub async fn idempotency_abort(
        &self,
        client: &ClientId,
        claim: &IdempotencyClaim,
    ) -> Result<()> {
        sqlx::query(
            "DELETE FROM idempotency_keys \
             WHERE client_id = $1 AND idem_key = $2 AND claim_token = $3 AND response_status IS NULL",
        )
        .bind(client.as_str())
        .bind(&claim.key)
        .bind(&claim.token)
        .execute(&mut *self.writer().await?)
        .await?;
        Ok(())
    }

    /// The import with this checksum inside the dedup window, if any (a cheap pre-check;
    /// the submit transaction decides).
    pub async fn find_duplicate(
        &self,
        client: &ClientId,
        checksum: &str,
    ) -> Result<Option<ImportView>> {
        let sql = self.sql(
            "SELECT import_id FROM import_checksums \
             WHERE client_id = $1 AND checksum = $2 AND expires_at > {now}",
        );
        let id: Option<String> = sqlx::query_scalar(sql)
            .bind(client.as_str())
            .bind(checksum)
            .fetch_optional(self.pool())
            .await?;
        match id {
            Some(id) => self
                .get_import(Some(client), &parse_id(id)?)
                .await
                .map(|v| v.map(ImportView::into_duplicate)),
            None => Ok(None),
        }
    }

    /// Stores an import in one transaction: dedup claim, quota, batch, import, payload,
    /// outbox events and (when given) the idempotent response. Nothing is written unless
    /// all of it is.
    #[tracing::instrument(skip_all, fields(client_id = %new.client_id, records = new.records))]
    pub async fn submit_import(&self, new: &NewImport<'_>) -> Result<SubmitOutcome> {
        if let Some(quota) = new.policy.daily_record_quota
            && new.records > quota
        {
            return Ok(SubmitOutcome::LargerThanQuota { quota });
        }
        let import_id = ImportId::generate();
        let batch_id = BatchId::generate();
        let mut tx = self.begin_write().await?;
        // Capped so that the database's clock plus the window cannot overflow (the cap is
        // millions of years: "forever").
        let window_ms = i64::try_from(new.policy.dedup_window_secs.saturating_mul(1000))
            .unwrap_or(i64::MAX)
            .min(i64::MAX / 4);
        // The claim also tells the transaction's clock (its expiry less the window), which
        // saves a statement of its own for it.
        let claim = self.sql(
            "INSERT INTO import_checksums (client_id, checksum, import_id, expires_at) \
             VALUES ($1, $2, $3, {now} + $4) \
             ON CONFLICT (client_id, checksum) DO UPDATE \
               SET import_id = excluded.import_id, expires_at = excluded.expires_at \
             WHERE import_checksums.expires_at <= {now} \
             RETURNING expires_at - $4",
        );
        let claimed: Option<i64> = sqlx::query_scalar(claim)
            .bind(new.client_id.as_str())
            .bind(new.dedup_key)
            .bind(import_id.as_str())
            .bind(window_ms)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(now) = claimed else {
            let first: String = sqlx::query_scalar(
                "SELECT import_id FROM import_checksums WHERE client_id = $1 AND checksum = $2",
            )
            .bind(new.client_id.as_str())
            .bind(new.dedup_key)
            .fetch_one(&mut *tx)
            .await?;
            tx.rollback().await?;
            let view = self
                .get_import(Some(new.client_id), &parse_id(first)?)
                .await?;
            return view
                .map(|v| SubmitOutcome::Duplicate(v.into_duplicate()))
                .ok_or(Error::NotFound);
        };

        if let Some(quota) = new.policy.daily_record_quota {
            let day = now.div_euclid(MS_PER_DAY);
            let used: Option<i64> = sqlx::query_scalar(
                "INSERT INTO usage_daily (client_id, day, records) VALUES ($1, $2, $3) \
                 ON CONFLICT (client_id, day) DO UPDATE SET records = usage_daily.records + excluded.records \
                 WHERE usage_daily.records + excluded.records <= $4 \
                 RETURNING records",
            )
            .bind(new.client_id.as_str())
            .bind(day)
            .bind(new.records as i64)
            .bind(quota as i64)
            .fetch_optional(&mut *tx)
            .await?;
            if used.is_none() {
                let used: i64 = sqlx::query_scalar(
                    "SELECT COALESCE(MAX(records), 0) FROM usage_daily WHERE client_id = $1 AND day = $2",
                )
                .bind(new.client_id.as_str())
                .bind(day)
                .fetch_one(&mut *tx)
                .await?;
                tx.rollback().await?;
                let retry_after_ms = ((day + 1) * MS_PER_DAY - now) as u64;
                return Ok(SubmitOutcome::QuotaExceeded {
                    used: count(used),
                    quota,
                    retry_after_ms,
                });
            }
        }

        let status = if new.policy.approval_required {
            BatchStatus::AwaitingApproval
        } else {
            BatchStatus::Ready
        };
        let policy_json = serde_json::to_string(new.policy).unwrap_or_default();
        let batch = self.sql(
            "INSERT INTO batches (id, import_id, client_id, status, format, policy, records_total, \
                                  accepted_seq, available_at, created_at, updated_at, schema_version, \
                                  priority, payload_id, payload_bytes) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, {next_accepted_seq}, $8, $8, $8, $9, $10, $11, $12)",
        );
        let payload_id = match new.payload {
            Payload::Inline(_) => batch_id.as_str(),
            Payload::Upload(upload) => upload.as_str(),
        };
        sqlx::query(batch)
            .bind(batch_id.as_str())
            .bind(import_id.as_str())
            .bind(new.client_id.as_str())
            .bind(status.as_str())
            .bind(new.format.as_str())
            .bind(policy_json)
            .bind(new.records as i64)
            .bind(now)
            .bind(new.schema_version.map(|v| v as i64))
            .bind(i64::from(new.priority.rank()))
            .bind(payload_id)
            .bind(new.bytes as i64)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO imports (id, client_id, batch_id, checksum, idempotency_key, format, bytes, records, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(import_id.as_str())
        .bind(new.client_id.as_str())
        .bind(batch_id.as_str())
        .bind(new.checksum)
        .bind(new.idempotency.map(|c| c.key.as_str()))
        .bind(new.format.as_str())
        .bind(new.bytes as i64)
        .bind(new.records as i64)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        match new.payload {
            Payload::Inline(body) => {
                sqlx::query("INSERT INTO payload_parts (payload_id, seq, body) VALUES ($1, 0, $2)")
                    .bind(batch_id.as_str())
                    .bind(body)
                    .execute(&mut *tx)
                    .await?;
            }
            Payload::Upload(upload) => {
                // A request body's upload has done its work; a tus upload stays, answering
                // its client with the import until it expires.
                let taken = sqlx::query(
                    "DELETE FROM uploads WHERE id = $1 AND kind = 'body' AND import_id IS NULL",
                )
                .bind(upload.as_str())
                .execute(&mut *tx)
                .await?
                .rows_affected()
                    + sqlx::query(
                        "UPDATE uploads SET import_id = $1 \
                         WHERE id = $2 AND kind = 'tus' AND import_id IS NULL \
                           AND outcome IS NULL",
                    )
                    .bind(import_id.as_str())
                    .bind(upload.as_str())
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                if taken == 0 {
                    tx.rollback().await?;
                    return Err(Error::Conflict(format!(
                        "upload {upload} was ended or imported by another request"
                    )));
                }
            }
        }

        let created = Event::BatchCreated(BatchCreated {
            import_id: import_id.clone(),
            format: new.format,
            records: new.records,
            bytes: new.bytes,
        });
        let mut events = vec![Envelope::new(
            batch_id.clone(),
            new.client_id.clone(),
            now,
            created,
        )];
        if status == BatchStatus::Ready {
            let ready = Event::BatchReady(BatchReady {
                import_id: import_id.clone(),
            });
            events.push(Envelope::new(
                batch_id.clone(),
                new.client_id.clone(),
                now,
                ready,
            ));
        }
        // The import's own events follow the policy it was accepted under (stored with the
        // batch), which saves reading the client's row once per event.
        let first = self
            .enqueue_events(&mut tx, &events, Some(new.policy))
            .await?;
        tx.hand_over(first);

        let view = ImportView {
            id: import_id,
            batch_id,
            status,
            format: new.format,
            records: new.records,
            bytes: new.bytes,
            checksum: new.checksum.to_owned(),
            created_at: rfc3339(now),
            duplicate: false,
            priority: new.priority,
        };
        if let Some(claim) = new.idempotency {
            // Same transaction: if the process dies after commit, a retry replays this answer.
            let stored = sqlx::query(
                "UPDATE idempotency_keys SET response_status = 202, response_body = $4 \
                 WHERE client_id = $1 AND idem_key = $2 AND claim_token = $3",
            )
            .bind(new.client_id.as_str())
            .bind(&claim.key)
            .bind(&claim.token)
            .bind(serde_json::to_string(&view).unwrap_or_default())
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if stored == 0 {
                tx.rollback().await?;
                return Ok(SubmitOutcome::IdempotencyKeyLost);
            }
        }
        tx.commit().await?;
        Ok(SubmitOutcome::Created(view))
    }

    /// An import with its batch's current status; `client` scopes the lookup to one tenant.
    pub async fn get_import(
        &self,
        client: Option<&ClientId>,
        id: &ImportId,
    ) -> Result<Option<ImportView>> {
        let row = sqlx::query_as::<_, ImportColumns>(
            "SELECT i.id, i.batch_id, b.status, i.format, i.records, i.bytes, i.checksum, i.created_at, \
                    b.priority \
             FROM imports i JOIN batches b ON b.id = i.batch_id \
             WHERE i.id = $1 AND ($2 IS NULL OR i.client_id = $2)",
        )
        .bind(id.as_str())
        .bind(client.map(ClientId::as_str))
        .fetch_optional(self.pool())
        .await?;
        row.map(ImportColumns::parse).transpose()
    }
}

/// An import with its batch's status, as the ledger returns it, before parsing.
#[derive(sqlx::FromRow)]
struct ImportColumns {
    id: String,
    batch_id: String,
    status: String,
    format: String,
    records: i64,
    bytes: i64,
    checksum: String,
    created_at: i64,
    priority: i64,
}

impl ImportColumns {
    fn parse(self) -> Result<ImportView> {
        Ok(ImportView {
            id: parse_id(self.id)?,
            batch_id: parse_id(self.batch_id)?,
            status: self.status.parse().map_err(Error::stored)?,
            format: self.format.parse().map_err(Error::stored)?,
            records: count(self.records),
            bytes: count(self.bytes),
            checksum: self.checksum,
            created_at: rfc3339(self.created_at),
            duplicate: false,
            priority: Priority::from_rank(self.priority).map_err(Error::stored)?,
        })
    }
}

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
use super::{Db, Field, Outgoing, Tx, count};
use crate::{Error, Result};

const MS_PER_DAY: i64 = 86_400_000;

/// The longest file that shares a transaction: small imports are what the group commit is
/// for, and it bounds what a group holds in memory (its files, copied and hex-encoded).
const GROUPED_BODY_BYTES: usize = 16 * 1024;

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
    /// The W3C trace context of the request that submitted it (`None` without traces):
    /// stored with its batch and its events, so what they start elsewhere joins its trace.
    pub traceparent: Option<&'a str>,
}

impl NewImport<'_> {
    /// The file of an import that shares its transaction with others ([`super::submits`]): a
    /// short one kept in the request. What makes an import special takes statements of its
    /// own, and a transaction of its own keeps their outcomes (a spent quota, a lost key, an
    /// upload taken) to it alone.
    fn joins_a_group(&self) -> Option<&[u8]> {
        match self.payload {
            Payload::Inline(body)
                if body.len() <= GROUPED_BODY_BYTES
                    && self.idempotency.is_none()
                    && self.policy.daily_record_quota.is_none() =>
            {
                Some(body)
            }
            _ => None,
        }
    }
}

/// What the dedup claim of one import found.
pub(super) enum Claim {
    /// The key is this import's; `now` is the transaction's clock (read from the claim's
    /// expiry less the window, which saves a statement of its own).
    Claimed { now: i64 },
    /// The key is held by this earlier import.
    DuplicateOf(ImportId),
}

/// An import whose dedup key was claimed, about to be stored.
pub(super) struct Accepted<'a> {
    pub new: &'a NewImport<'a>,
    pub import_id: ImportId,
    pub batch_id: BatchId,
    /// The transaction's clock when the key was claimed.
    pub now: i64,
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

    /// Stores an import: dedup claim, quota, batch, import, payload, outbox events and (when
    /// given) the idempotent response, all or nothing, committed before it returns. A plain
    /// import (its file in the request, no `Idempotency-Key`, no quota to count) shares its
    /// transaction with the other submits of this process that arrive meanwhile
    /// ([`super::submits`]); the others take a transaction of their own.
    #[tracing::instrument(skip_all, fields(client_id = %new.client_id, records = new.records))]
    pub async fn submit_import(&self, new: &NewImport<'_>) -> Result<SubmitOutcome> {
        if let Some(quota) = new.policy.daily_record_quota
            && new.records > quota
        {
            return Ok(SubmitOutcome::LargerThanQuota { quota });
        }
        if let Some(body) = new.joins_a_group() {
            return self.submit_grouped(new, body).await;
        }
        let mut tx = self.begin_write_for(new.client_id).await?;
        let import_id = ImportId::generate();
        let claimed = self
            .claim_keys(&mut tx, &[(new, import_id.clone())])
            .await?
            .pop();
        let claimed = claimed.ok_or_else(|| Error::Internal {
            context: "the dedup claim answered for no import".into(),
            source: None,
        })?;
        let now = match claimed {
            Claim::Claimed { now } => now,
            Claim::DuplicateOf(first) => {
                tx.rollback().await?;
                return self.duplicate_of(new.client_id, &first).await;
            }
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

        let accepted = Accepted {
            new,
            import_id,
            batch_id: BatchId::generate(),
            now,
        };
        let view = self
            .store_accepted(&mut tx, std::slice::from_ref(&accepted))
            .await?
            .remove(0);
        if let Payload::Upload(upload) = new.payload {
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
                .bind(view.id.as_str())
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

    /// Claims each import's dedup key for its import id, in one statement (in key order, so
    /// that transactions claiming the same keys at once take them in the same order), and
    /// says for each whether it claimed its key or is a duplicate of the import holding it.
    /// No two imports of one call may share a client and a key.
    pub(super) async fn claim_keys(
        &self,
        tx: &mut Tx,
        imports: &[(&NewImport<'_>, ImportId)],
    ) -> Result<Vec<Claim>> {
        let windows: Vec<i64> = imports
            .iter()
            .map(|(new, _)| {
                // Capped so that the database's clock plus the window cannot overflow (the
                // cap is millions of years: "forever").
                i64::try_from(new.policy.dedup_window_secs.saturating_mul(1000))
                    .unwrap_or(i64::MAX)
                    .min(i64::MAX / 4)
            })
            .collect();
        let rows: Vec<serde_json::Value> = imports
            .iter()
            .zip(&windows)
            .map(|((new, import_id), window_ms)| {
                serde_json::json!({
                    "client_id": new.client_id.as_str(),
                    "checksum": new.dedup_key,
                    "import_id": import_id.as_str(),
                    "window_ms": window_ms,
                })
            })
            .collect();
        // `WHERE true`: SQLite's parser reads an `ON` after a bare `FROM` as a join's.
        let keys = self.json_rows(
            &[
                ("client_id", Field::Text),
                ("checksum", Field::Text),
                ("import_id", Field::Text),
                ("window_ms", Field::Int),
            ],
            &rows,
        );
        let rows = serde_json::Value::Array(rows).to_string();
        let claim = self.sql(&format!(
            "INSERT INTO import_checksums (client_id, checksum, import_id, expires_at) \
             SELECT m.client_id, m.checksum, m.import_id, {{now}} + m.window_ms FROM {keys} m \
             WHERE true ORDER BY m.client_id, m.checksum \
             ON CONFLICT (client_id, checksum) DO UPDATE \
               SET import_id = excluded.import_id, expires_at = excluded.expires_at \
             WHERE import_checksums.expires_at <= {{now}} \
             RETURNING import_id, expires_at"
        ));
        let claimed: Vec<(String, i64)> = sqlx::query_as(claim)
            .bind(rows.as_str())
            .fetch_all(&mut **tx)
            .await?;
        // The holders of the keys not claimed, read in the same transaction: the claim that
        // made them duplicates is still live there.
        let holders: Vec<(String, String, String)> = if claimed.len() < imports.len() {
            let held = self.sql(&format!(
                "SELECT c.client_id, c.checksum, c.import_id FROM import_checksums c \
                 JOIN {keys} m ON c.client_id = m.client_id AND c.checksum = m.checksum"
            ));
            sqlx::query_as(held)
                .bind(rows.as_str())
                .fetch_all(&mut **tx)
                .await?
        } else {
            Vec::new()
        };
        imports
            .iter()
            .zip(&windows)
            .map(|((new, import_id), window_ms)| {
                if let Some((_, expires_at)) =
                    claimed.iter().find(|(id, _)| id == import_id.as_str())
                {
                    return Ok(Claim::Claimed {
                        now: expires_at - window_ms,
                    });
                }
                let (_, _, first) = holders
                    .iter()
                    .find(|(client, key, _)| {
                        client == new.client_id.as_str() && key == new.dedup_key
                    })
                    .ok_or_else(|| Error::Internal {
                        context: format!("dedup key {} has no holder", new.dedup_key),
                        source: None,
                    })?;
                Ok(Claim::DuplicateOf(parse_id(first.clone())?))
            })
            .collect()
    }

    /// Writes the batches, imports, files kept in the request and events of imports whose
    /// keys were claimed, a statement per table whatever their number; hands the events to
    /// this process's relay for when the transaction commits. Their views, in order.
    pub(super) async fn store_accepted(
        &self,
        tx: &mut Tx,
        accepted: &[Accepted<'_>],
    ) -> Result<Vec<ImportView>> {
        if accepted.is_empty() {
            return Ok(Vec::new());
        }
        let status = |a: &Accepted<'_>| {
            if a.new.policy.approval_required {
                BatchStatus::AwaitingApproval
            } else {
                BatchStatus::Ready
            }
        };
        let rows: Vec<serde_json::Value> = accepted
            .iter()
            .enumerate()
            .map(|(n, a)| {
                let new = a.new;
                serde_json::json!({
                    "n": n + 1,
                    "batch_id": a.batch_id.as_str(),
                    "import_id": a.import_id.as_str(),
                    "client_id": new.client_id.as_str(),
                    "status": status(a).as_str(),
                    "format": new.format.as_str(),
                    "policy": serde_json::to_string(new.policy).unwrap_or_default(),
                    "records": new.records,
                    "now": a.now,
                    "schema_version": new.schema_version,
                    "priority": new.priority.rank(),
                    "payload_id": match new.payload {
                        Payload::Inline(_) => a.batch_id.as_str(),
                        Payload::Upload(upload) => upload.as_str(),
                    },
                    "bytes": new.bytes,
                    "checksum": new.checksum,
                    "idempotency_key": new.idempotency.map(|c| c.key.as_str()),
                    "traceparent": new.traceparent,
                })
            })
            .collect();
        let batches = self.sql(&format!(
            "INSERT INTO batches (id, import_id, client_id, status, format, policy, records_total, \
                                  accepted_seq, available_at, created_at, updated_at, schema_version, \
                                  priority, payload_id, payload_bytes, traceparent) \
             SELECT m.batch_id, m.import_id, m.client_id, m.status, m.format, m.policy, m.records, \
                    {{accepted_seq}}, m.now, m.now, m.now, m.schema_version, m.priority, \
                    m.payload_id, m.bytes, m.traceparent \
             FROM {} m ORDER BY m.n",
            self.json_rows(&[
                ("n", Field::Int),
                ("batch_id", Field::Text),
                ("import_id", Field::Text),
                ("client_id", Field::Text),
                ("status", Field::Text),
                ("format", Field::Text),
                ("policy", Field::Text),
                ("records", Field::Int),
                ("now", Field::Int),
                ("schema_version", Field::Int),
                ("priority", Field::Int),
                ("payload_id", Field::Text),
                ("bytes", Field::Int),
                ("traceparent", Field::Text),
            ], &rows)
        ));
        let imports = self.sql(&format!(
            "INSERT INTO imports (id, client_id, batch_id, checksum, idempotency_key, format, \
                                  bytes, records, created_at) \
             SELECT m.import_id, m.client_id, m.batch_id, m.checksum, m.idempotency_key, \
                    m.format, m.bytes, m.records, m.now \
             FROM {} m",
            self.json_rows(
                &[
                    ("import_id", Field::Text),
                    ("client_id", Field::Text),
                    ("batch_id", Field::Text),
                    ("checksum", Field::Text),
                    ("idempotency_key", Field::Text),
                    ("format", Field::Text),
                    ("bytes", Field::Int),
                    ("records", Field::Int),
                    ("now", Field::Int),
                ],
                &rows
            )
        ));
        let rows = serde_json::Value::Array(rows).to_string();
        for statement in [batches, imports] {
            sqlx::query(statement)
                .bind(rows.as_str())
                .execute(&mut **tx)
                .await?;
        }
        let bodies: Vec<serde_json::Value> = accepted
            .iter()
            .filter_map(|a| match a.new.payload {
                Payload::Inline(body) => Some(serde_json::json!({
                    "batch_id": a.batch_id.as_str(),
                    "body": hex::encode(body),
                })),
                Payload::Upload(_) => None,
            })
            .collect();
        if !bodies.is_empty() {
            let parts = self.sql(&format!(
                "INSERT INTO payload_parts (payload_id, seq, body) \
                 SELECT m.batch_id, 0, m.body FROM {} m",
                self.json_rows(&[("batch_id", Field::Text), ("body", Field::Hex)], &bodies)
            ));
            sqlx::query(parts)
                .bind(serde_json::Value::Array(bodies).to_string())
                .execute(&mut **tx)
                .await?;
        }

        let mut events = Vec::with_capacity(accepted.len() * 2);
        for a in accepted {
            let (batch, client) = (&a.batch_id, a.new.client_id);
            let created = Event::BatchCreated(BatchCreated {
                import_id: a.import_id.clone(),
                format: a.new.format,
                records: a.new.records,
                bytes: a.new.bytes,
            });
            events.push((
                Envelope::new(batch.clone(), client.clone(), a.now, created),
                a,
            ));
            if status(a) == BatchStatus::Ready {
                let ready = Event::BatchReady(BatchReady {
                    import_id: a.import_id.clone(),
                });
                events.push((
                    Envelope::new(batch.clone(), client.clone(), a.now, ready),
                    a,
                ));
            }
        }
        // An import's own events follow the policy it was accepted under (stored with the
        // batch), which saves reading the client's row once per event, and its request's
        // trace.
        let outgoing: Vec<Outgoing<'_>> = events
            .iter()
            .map(|(event, a)| Outgoing {
                event,
                policy: Some(a.new.policy),
                traceparent: a.new.traceparent,
            })
            .collect();
        let first = self.enqueue_events(tx, &outgoing).await?;
        tx.hand_over(first);

        Ok(accepted
            .iter()
            .map(|a| ImportView {
                id: a.import_id.clone(),
                batch_id: a.batch_id.clone(),
                status: status(a),
                format: a.new.format,
                records: a.new.records,
                bytes: a.new.bytes,
                checksum: a.new.checksum.to_owned(),
                created_at: rfc3339(a.now),
                duplicate: false,
                priority: a.new.priority,
            })
            .collect())
    }

    /// The answer to a duplicate of `first`.
    pub(super) async fn duplicate_of(
        &self,
        client: &ClientId,
        first: &ImportId,
    ) -> Result<SubmitOutcome> {
        let view = self.get_import(Some(client), first).await?;
        view.map(|v| SubmitOutcome::Duplicate(v.into_duplicate()))
            .ok_or(Error::NotFound)
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

//! `POST /v1/imports` and `GET /v1/imports/{id}`.
//!
//! The order of checks is chosen so that nothing is stored for a refused request and the
//! cheap refusals come first: media type, idempotency key, declared size, body size,
//! idempotency replay, dedup pre-check, parse, then the one submit transaction.

use std::sync::Arc;
use std::time::Duration;

use std::io::Read;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Extension, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use dataflow_contracts::http::{ErrorBody, ImportView, SubmitAnswer, SubmitQuery};
use dataflow_contracts::live::LiveKind;
use dataflow_contracts::{BatchId, ClientId, ImportFormat, ImportId, Priority, UploadId};
use dataflow_platform::domain::prepare::{Rules, header_errors};
use dataflow_platform::domain::records::{self, Limits, Summary};
use dataflow_platform::domain::schema::Schema;
use dataflow_platform::guards::dedup::DedupClaim;
use dataflow_platform::ledger::payloads::PART_BYTES;
use dataflow_platform::ledger::{
    Db, IdempotencyClaim, IdempotencyStart, NewImport, NewUpload, PartsReader, Payload,
    SubmitOutcome, UploadCreated, UploadKind,
};
use dataflow_platform::traces;
use sha2::digest::common::hazmat::SerializableState;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{PathParam, dry_run, parse_path_id, query};
use crate::auth::Principal;
use crate::error::{ApiError, ApiResult};
use crate::intake::{Encoding, Inflow};
use crate::state::{AppState, Deadline, IMPORT_SLOT_WAIT};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(submit))
        .routes(routes!(show))
}

/// An import and the status of its batch.
#[utoipa::path(
    get,
    path = "/imports/{id}",
    operation_id = "get_import",
    tag = "imports",
    params(("id" = ImportId, Path, description = "The import's id")),
    responses(
        (status = 200, description = "The import", body = ImportView),
        (status = 404, description = "No such import for this client", body = ErrorBody),
    ),
)]
async fn show(
    State(state): State<AppState>,
    p: Principal,
    PathParam(id): PathParam,
) -> ApiResult<Json<ImportView>> {
    let id: ImportId = parse_path_id(&id)?;
    let view = state
        .backends
        .db
        .get_import(Some(&p.client.id), &id)
        .await?;
    view.map(Json).ok_or_else(ApiError::not_found)
}

/// Submits a record batch: stored in one transaction, then processed by the workers.
/// With `dry_run=true`, stores nothing and answers what the import would do.
///
/// A CSV body needs a header row; a JSON-lines body one object per line. Nothing is stored
/// for a refused request. The same payload again within the client's dedup window is
/// answered with the first import (200, `duplicate: true`); the same `Idempotency-Key` and
/// body replay the first answer (`Idempotent-Replayed: true`).
#[utoipa::path(
    post,
    path = "/imports",
    operation_id = "submit_import",
    tag = "imports",
    params(
        ("Idempotency-Key" = Option<String>, Header,
         description = "Makes a retry safe (Stripe's rules): 1 to \
                        `api.max_idempotency_key_len` visible ASCII characters; not used by \
                        a dry run"),
        ("Priority" = Option<Priority>, Header,
         description = "Where the batch stands among this client's own batches: `high`, \
                        `normal` (the default) or `low`"),
        SubmitQuery,
    ),
    request_body(
        description = "The records, at most the smaller of `api.max_body_bytes` and the \
                       policy's `max_payload_bytes`",
        content(
            (String = "text/csv", example = json!("id,email,name\n1,ann@example.com,Ann\n")),
            (String = "application/x-ndjson",
             example = json!("{\"id\": 1, \"email\": \"ann@example.com\"}\n")),
        ),
    ),
    responses(
        (status = 202, description = "Accepted: the import and its batch are stored",
         body = ImportView, headers(
             ("Location" = String, description = "The batch, `/v1/batches/{batch_id}`"),
             ("Idempotent-Replayed" = String, description = "`true` on a replayed answer"),
         )),
        (status = 200, description = "The earlier import of the same payload \
                                      (`duplicate: true`); or, with `dry_run=true`, what the \
                                      import would do (a `DryRunView`, without `Location`)",
         body = SubmitAnswer, headers(
             ("Location" = String, description = "The earlier import's batch"),
             ("Idempotent-Replayed" = String, description = "`true` on a replayed answer"),
         )),
        (status = 400, description = "A malformed body (the detail names the line and field), \
                                      an empty body, a malformed `Idempotency-Key` or an \
                                      unknown `Priority`",
         body = ErrorBody),
        (status = 409, description = "A request with this `Idempotency-Key` is still in \
                                      progress (`Retry-After` says when it will have finished \
                                      or been given up), or this one lost the key to another",
         body = ErrorBody),
        (status = 413, description = "The body or its record count is over the limit",
         body = ErrorBody),
        (status = 415, description = "Neither `text/csv` nor `application/x-ndjson`",
         body = ErrorBody),
        (status = 422, description = "The `Idempotency-Key` was used with another body, the \
                                      CSV header lacks a column the policy requires, or the \
                                      import alone is over the daily quota",
         body = ErrorBody),
        (status = 429, description = "Too many concurrent imports for this client, or the \
                                      daily record quota is used up",
         body = ErrorBody),
    ),
)]
async fn submit(
    State(state): State<AppState>,
    p: Principal,
    deadline: Option<Extension<Deadline>>,
    q: Result<Query<SubmitQuery>, QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let dry_run = query(q)?.dry_run.unwrap_or(false);
    let client = p.client.id.clone();
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let format = ImportFormat::from_content_type(content_type).ok_or_else(|| {
        ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send text/csv (with a header row) or application/x-ndjson",
        )
    })?;
    let idem_key = idempotency_key(&state, &headers)?;
    let priority = priority(&headers)?;
    let _slot = state.import_slot(&client).await.ok_or_else(|| {
        ApiError::too_many(
            "too_many_concurrent_imports",
            format!(
                "this client's {} imports in flight did not make room within {} ms; retry \
                 after the time in Retry-After, or send fewer at once",
                state.config.max_concurrent_imports_per_client,
                IMPORT_SLOT_WAIT.as_millis()
            ),
            1000,
        )
    })?;
    let file = receive(&state, &p, format, &headers, body).await?;
    let answer = respond(&state, &p, deadline, dry_run, idem_key, priority, &file).await;
    // Only an import created from it keeps the file (its upload is gone then, and this
    // deletes nothing); every other answer, a replayed 202 too, leaves nothing behind.
    file.discard(&state.backends.db).await;
    answer
}

/// Everything after the body was received: the dry run, or the idempotency key, dedup and
/// the submit transaction.
async fn respond(
    state: &AppState,
    p: &Principal,
    deadline: Option<Extension<Deadline>>,
    dry_run: bool,
    idem_key: Option<String>,
    priority: Priority,
    file: &Received,
) -> ApiResult<Response> {
    let client = p.client.id.clone();
    let dedup_key = dedup_key(&file.checksum, p);
    if dry_run {
        let view = dry_run::preview(state, p, file, &dedup_key).await?;
        return Ok((StatusCode::OK, Json(view)).into_response());
    }

    let claim = match &idem_key {
        Some(key) => {
            // The key is held while this request can still run: until its deadline.
            let left = deadline.map_or(
                Duration::from_secs(state.config.request_timeout_secs),
                |Extension(Deadline(at))| at.saturating_duration_since(tokio::time::Instant::now()),
            );
            let request_hash = format!("{}:{}", file.format.as_str(), file.checksum);
            match start_idempotent(state, &client, key, &request_hash, left).await? {
                IdempotencyStart::Proceed(c) => Some(c),
                IdempotencyStart::Replay { status, body } => return Ok(replay(status, body)),
                IdempotencyStart::Mismatch => {
                    return Err(ApiError::unprocessable(
                        "idempotency_key_reused",
                        "this Idempotency-Key was used with a different request",
                    ));
                }
                IdempotencyStart::InProgress { retry_after_ms } => {
                    let secs = retry_after_ms.div_ceil(1000).max(1);
                    return Err(ApiError {
                        retry_after_secs: Some(secs),
                        ..ApiError::new(
                            StatusCode::CONFLICT,
                            "idempotency_in_progress",
                            format!(
                                "a request with this Idempotency-Key is still in progress; \
                                 retry in {secs} s, when it has finished or been given up"
                            ),
                        )
                    });
                }
            }
        }
        None => None,
    };

    let submission = Submission {
        file,
        dedup_key: &dedup_key,
        priority,
        idempotency: claim.as_ref(),
    };
    let result = accept(state, p, &submission).await;
    if let Some(key) = &claim {
        let finished = match &result {
            // Created imports stored their answer in the submit transaction itself.
            Ok((StatusCode::ACCEPTED, _)) => Ok(()),
            Ok((status, view)) => {
                let body = serde_json::to_string(view).unwrap_or_default();
                state
                    .backends
                    .db
                    .idempotency_finish(&client, key, status.as_u16(), &body)
                    .await
            }
            // Refused requests are not replayed: the sender fixes them and tries again.
            Err(_) => state.backends.db.idempotency_abort(&client, key).await,
        };
        if let Err(e) = finished {
            tracing::warn!(error = %e, "could not settle the idempotency key; it expires on its own");
        }
    }
    let (status, view) = result?;
    let batch_id = view.batch_id.clone();
    Ok(with_location(
        (status, Json(view)).into_response(),
        &batch_id,
    ))
}

/// Claims `key` for this request, or says why it cannot go ahead (a replay, another body,
/// a request still running under it).
async fn start_idempotent(
    state: &AppState,
    client: &ClientId,
    key: &str,
    request_hash: &str,
    left: Duration,
) -> ApiResult<IdempotencyStart> {
    let cfg = &state.config;
    Ok(state
        .backends
        .db
        .idempotency_start(
            client,
            key,
            request_hash,
            (cfg.idempotency_ttl_secs * 1000) as i64,
            i64::try_from(left.as_millis()).unwrap_or(i64::MAX),
        )
        .await?)
}

/// The dedup fast path around [`decide`]: a payload the fast path already knows is answered
/// from SQL by id; anything else is decided by the submit transaction.
pub(super) async fn accept(
    state: &AppState,
    p: &Principal,
    sub: &Submission<'_>,
) -> ApiResult<(StatusCode, ImportView)> {
    let client = &p.client.id;
    let key = sub.dedup_key;
    let window = Duration::from_secs(p.client.policy.dedup_window_secs);
    let dedup = &state.backends.dedup;
    let claim = dedup.claim(client, key, window).await;
    // Redis knows the payload: the ledger's live claim says which import it was (none
    // when the claim was purged since, and the import goes ahead).
    if let DedupClaim::Known(_) = &claim
        && let Some(first) = state.backends.db.find_duplicate(client, key).await?
    {
        metrics::counter!("dataflow_dedup_hits_total", "via" => "redis").increment(1);
        metrics::counter!("dataflow_imports_total", "outcome" => "duplicate").increment(1);
        return Ok((StatusCode::OK, first));
    }
    let result = decide(state, p, sub).await;
    let outcome = match &result {
        Ok((StatusCode::ACCEPTED, _)) => "accepted",
        Ok(_) => {
            metrics::counter!("dataflow_dedup_hits_total", "via" => "sql").increment(1);
            "duplicate"
        }
        Err(_) => "refused",
    };
    metrics::counter!("dataflow_imports_total", "outcome" => outcome).increment(1);
    // Only a new import arms the fast path, with the window starting now; a duplicate
    // answer must not stretch the window of the import it names.
    let owner = result
        .as_ref()
        .ok()
        .filter(|(s, _)| *s == StatusCode::ACCEPTED)
        .map(|(_, view)| &view.id);
    dedup.settle(client, key, &claim, owner, window).await;
    result
}

/// The checks every file passes before it becomes an import (or, for a dry run, is
/// compared): it parsed within the limits (see [`receive`]), and a CSV header has the
/// columns the client's schema (or, without one, its policy) requires. Returns the schema,
/// compiled.
pub(super) fn admit(
    state: &AppState,
    p: &Principal,
    summary: &Summary,
) -> ApiResult<Option<Arc<Schema>>> {
    let schema = p
        .client
        .schema
        .as_ref()
        .map(|s| s.compiled(&p.client.id, &state.schemas))
        .transpose()?;
    if let Some(columns) = &summary.columns {
        let errors = header_errors(
            Rules::of(schema.as_deref(), &p.client.policy, false),
            columns,
        );
        if let Some(first) = errors.first() {
            // Each detail names its column.
            let detail = errors
                .iter()
                .map(|e| e.detail.as_str())
                .collect::<Vec<_>>()
                .join("; ");
            return Err(ApiError::unprocessable(
                &first.code,
                format!("line 1: {detail}"),
            ));
        }
    }
    Ok(schema)
}

/// A file received whole: checked as it arrived, hashed, and kept in the request (when it
/// is no longer than a part) or as the parts of an upload.
pub(super) struct Received {
    pub format: ImportFormat,
    /// Hex SHA-256 of the file.
    pub checksum: String,
    pub bytes: u64,
    pub summary: Summary,
    pub stored: Stored,
}

pub(super) enum Stored {
    Inline(Bytes),
    /// The parts of an upload. `owned`: the request made it for its body, and it goes
    /// unless the body became an import.
    Upload {
        id: UploadId,
        owned: bool,
    },
}

impl Received {
    fn payload(&self) -> Payload<'_> {
        match &self.stored {
            Stored::Inline(body) => Payload::Inline(body),
            Stored::Upload { id, .. } => Payload::Upload(id),
        }
    }

    /// The file as a `Read`, for a blocking thread.
    pub fn reader(&self, db: &Db) -> Box<dyn Read + Send> {
        match &self.stored {
            Stored::Inline(body) => Box::new(std::io::Cursor::new(body.clone())),
            Stored::Upload { id, .. } => Box::new(db.read_payload(id.to_string(), self.bytes)),
        }
    }

    /// Deletes the parts a request body left, if it left any.
    async fn discard(&self, db: &Db) {
        if let Stored::Upload { id, owned: true } = &self.stored {
            discard_upload(db, id).await;
        }
    }
}

/// Deletes the upload a request made for its body; if that fails, it expires on its own.
async fn discard_upload(db: &Db, id: &UploadId) {
    if let Err(e) = db.discard_upload(id).await {
        tracing::warn!(error = %e, upload_id = %id, "could not delete a refused body's parts; they expire on their own");
    }
}

/// Reads the body: decompressed, within the smaller of the server's and the client's limit,
/// hashed, and checked record by record on a blocking thread as it arrives. A body longer
/// than a part is kept as an upload's parts while it is read, so memory holds a few parts
/// whatever its size. Nothing is left behind for a refused body.
async fn receive(
    state: &AppState,
    p: &Principal,
    format: ImportFormat,
    headers: &HeaderMap,
    body: Body,
) -> ApiResult<Received> {
    let cfg = &state.config;
    let limit = cfg.max_body_bytes.min(p.client.policy.max_payload_bytes);
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the body is over {limit} bytes"),
        ));
    }
    let encoding = Encoding::of(headers)?;
    let mut inflow = Inflow::new(
        body,
        encoding,
        limit,
        cfg.max_compression_ratio,
        cfg.body_idle_timeout_secs,
    );
    let limits = Limits {
        max_records: p.client.policy.max_records,
        max_field_bytes: cfg.max_field_bytes,
    };
    if let Some(length) = declared.filter(|n| *n <= CHECKED_IN_PLACE)
        && encoding == Encoding::Identity
    {
        return receive_short(format, &mut inflow, length, limits).await;
    }
    let (tx, rx) = mpsc::channel(2);
    let scan = tokio::task::spawn_blocking(move || {
        records::validate(format, PartsReader::new(rx), limits)
    });
    let mut kept = Kept {
        hasher: Sha256::new(),
        upload: None,
        cut: false,
    };
    let read = read_parts(state, p, format, limit, &mut inflow, &tx, &mut kept).await;
    drop(tx);
    let scanned = scan
        .await
        .map_err(|e| dataflow_platform::Error::internal("checking the records", e))?;
    let bytes = inflow.read();
    let result = match (read, scanned) {
        (Ok(_), _) if bytes == 0 => Err(ApiError::bad_request("empty_body", "the body is empty")),
        // The check stopped taking parts: its refusal is the answer.
        (_, Err(e)) if kept.cut => Err(e.into()),
        (Err(e), _) => Err(e),
        (Ok(_), Err(e)) => Err(e.into()),
        (Ok(tail), Ok(summary)) => Ok(Received {
            format,
            checksum: hex::encode(kept.hasher.clone().finalize()),
            bytes,
            summary,
            stored: match &kept.upload {
                Some(id) => Stored::Upload {
                    id: id.clone(),
                    owned: true,
                },
                None => Stored::Inline(tail),
            },
        }),
    };
    if result.is_err()
        && let Some(id) = &kept.upload
    {
        discard_upload(&state.backends.db, id).await;
    }
    result
}

/// A body declared this short (and not compressed) is read whole and checked where it is
/// read: handing it to a blocking thread would cost more than checking it.
const CHECKED_IN_PLACE: u64 = 16 * 1024;

/// [`receive`] for a body of `length` bytes, at most [`CHECKED_IN_PLACE`].
async fn receive_short(
    format: ImportFormat,
    inflow: &mut Inflow,
    length: u64,
    limits: Limits,
) -> ApiResult<Received> {
    // One more than declared: reads to the end, which the declared length bounds.
    let mut body = bytes::BytesMut::with_capacity(length as usize + 1);
    if inflow.fill(&mut body, length as usize + 1).await? {
        return Err(ApiError::bad_request(
            "length_mismatch",
            "the body is longer than its Content-Length",
        ));
    }
    if body.is_empty() {
        return Err(ApiError::bad_request("empty_body", "the body is empty"));
    }
    let summary = records::validate(format, &body[..], limits)?;
    Ok(Received {
        format,
        checksum: hex::encode(Sha256::digest(&body)),
        bytes: body.len() as u64,
        summary,
        stored: Stored::Inline(body.freeze()),
    })
}

/// What [`read_parts`] keeps of a body as it goes.
struct Kept {
    hasher: Sha256,
    /// The upload its parts are kept under, once it is longer than one part.
    upload: Option<UploadId>,
    /// The check stopped taking parts: it refused the file.
    cut: bool,
}

/// Reads the body a part at a time: each part is hashed, handed to the check and, once the
/// body is longer than one part, stored. Returns the body when it fits in one part.
async fn read_parts(
    state: &AppState,
    p: &Principal,
    format: ImportFormat,
    limit: u64,
    inflow: &mut Inflow,
    check: &mpsc::Sender<dataflow_platform::Result<Vec<u8>>>,
    kept: &mut Kept,
) -> ApiResult<Bytes> {
    let db = &state.backends.db;
    let ttl_ms = (state.config.upload_ttl_secs * 1000) as i64;
    let mut offset = 0u64;
    loop {
        // Grown as the body arrives: a short body sent without its length stays small.
        let mut part = bytes::BytesMut::new();
        let more = inflow.fill(&mut part, PART_BYTES).await?;
        if part.is_empty() {
            return Ok(Bytes::new());
        }
        kept.hasher.update(&part);
        if check.send(Ok(part.to_vec())).await.is_err() {
            kept.cut = true;
            return Ok(Bytes::new());
        }
        if !more && kept.upload.is_none() {
            return Ok(part.freeze());
        }
        let id = match &kept.upload {
            Some(id) => id.clone(),
            None => {
                let empty = Sha256::new().serialize();
                let new = NewUpload {
                    client_id: &p.client.id,
                    kind: UploadKind::Body,
                    length: limit,
                    format,
                    metadata: "",
                    idempotency_key: None,
                    digest: &empty,
                    ttl_ms,
                };
                let (UploadCreated::New(upload) | UploadCreated::Existing(upload)) =
                    db.create_upload(&new).await?;
                kept.upload = Some(upload.id.clone());
                upload.id
            }
        };
        let digest = kept.hasher.serialize();
        if !db
            .append_part(&p.client.id, &id, offset, &part, &digest, ttl_ms)
            .await?
        {
            return Err(dataflow_platform::Error::Conflict(
                "the upload keeping this body ended while it was read".into(),
            )
            .into());
        }
        offset += part.len() as u64;
        if !more {
            return Ok(Bytes::new());
        }
    }
}

/// A file that passed its checks, about to become an import.
pub(super) struct Submission<'a> {
    pub file: &'a Received,
    /// See [`dedup_key`].
    pub dedup_key: &'a str,
    pub priority: Priority,
    pub idempotency: Option<&'a IdempotencyClaim>,
}

/// What makes two imports the same within the dedup window: the body, and the version of
/// the client's schema it is checked with. A file refused under one version (too many
/// errors) is imported again when it is sent after the schema changed.
pub(super) fn dedup_key(checksum: &str, p: &Principal) -> String {
    match &p.client.schema {
        Some(s) => format!("{checksum}/schema-{}", s.version),
        None => checksum.to_owned(),
    }
}

/// The file's checks against the client's schema and policy, then the submit transaction.
async fn decide(
    state: &AppState,
    p: &Principal,
    sub: &Submission<'_>,
) -> ApiResult<(StatusCode, ImportView)> {
    let Submission {
        file,
        dedup_key,
        priority,
        idempotency,
    } = *sub;
    let db = &state.backends.db;
    let policy = &p.client.policy;
    // A file accepted before is answered as its duplicate even if it would not pass
    // today's checks; the submit transaction finds every other duplicate.
    if let Err(refused) = admit(state, p, &file.summary) {
        return match db.find_duplicate(&p.client.id, dedup_key).await? {
            Some(first) => Ok((StatusCode::OK, first)),
            None => Err(refused),
        };
    }
    let summary = &file.summary;
    let traceparent = traces::current();
    let new = NewImport {
        client_id: &p.client.id,
        format: file.format,
        payload: file.payload(),
        bytes: file.bytes,
        records: summary.records,
        checksum: &file.checksum,
        dedup_key,
        policy,
        schema_version: p.client.schema.as_ref().map(|s| s.version),
        priority,
        idempotency,
        traceparent: traceparent.as_deref(),
    };
    let outcome = db.submit_import(&new).await?;
    match outcome {
        SubmitOutcome::Created(view) => {
            let batch = view.batch_id.as_str();
            state.backends.live.publish(LiveKind::BatchCreated, batch);
            tracing::info!(import_id = %view.id, batch_id = %view.batch_id, records = view.records, "import accepted");
            Ok((StatusCode::ACCEPTED, view))
        }
        SubmitOutcome::Duplicate(view) => Ok((StatusCode::OK, view)),
        SubmitOutcome::IdempotencyKeyLost => Err(ApiError::new(
            StatusCode::CONFLICT,
            "idempotency_key_lost",
            "this request ran past the Idempotency-Key lock and another request took the key; nothing was stored",
        )),
        SubmitOutcome::LargerThanQuota { quota } => Err(ApiError::unprocessable(
            "import_exceeds_quota",
            format!(
                "this import has {} records; the daily quota is {quota}",
                summary.records
            ),
        )),
        SubmitOutcome::QuotaExceeded {
            used,
            quota,
            retry_after_ms,
        } => Err(ApiError::too_many(
            "quota_exceeded",
            format!(
                "daily record quota is {quota}; {used} used today; this import has {}",
                summary.records
            ),
            retry_after_ms,
        )),
    }
}

/// Visible ASCII, bounded length; `None` when absent.
fn idempotency_key(state: &AppState, headers: &HeaderMap) -> ApiResult<Option<String>> {
    let Some(raw) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let max = state.config.max_idempotency_key_len;
    let key = raw
        .to_str()
        .ok()
        .filter(|k| !k.is_empty() && k.len() <= max && k.bytes().all(|b| b.is_ascii_graphic()));
    key.map(|k| Some(k.to_owned())).ok_or_else(|| {
        ApiError::bad_request(
            "invalid_idempotency_key",
            format!("Idempotency-Key must be 1 to {max} visible ASCII characters"),
        )
    })
}

/// The `Priority` header: `high`, `normal` or `low`; normal without one.
fn priority(headers: &HeaderMap) -> ApiResult<Priority> {
    let Some(raw) = headers.get("priority") else {
        return Ok(Priority::default());
    };
    raw.to_str()
        .map_err(|_| "the Priority header is not text".to_owned())
        .and_then(str::parse)
        .map_err(|why| ApiError::bad_request("invalid_priority", why))
}

fn replay(status: u16, body: String) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    let batch_id = serde_json::from_str::<ImportView>(&body)
        .ok()
        .map(|v| v.batch_id);
    let mut resp = (status, [(header::CONTENT_TYPE, "application/json")], body).into_response();
    resp.headers_mut()
        .insert("idempotent-replayed", HeaderValue::from_static("true"));
    match batch_id {
        Some(id) => with_location(resp, &id),
        None => resp,
    }
}

/// Points the answer at the batch the import created (or the earlier import's batch).
fn with_location(mut resp: Response, batch_id: &BatchId) -> Response {
    if let Ok(v) = HeaderValue::from_str(&format!("/v1/batches/{batch_id}")) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp
}

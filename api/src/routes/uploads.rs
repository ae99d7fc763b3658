//! `/v1/uploads`: resumable uploads with the tus 1.0 protocol (core, creation,
//! creation-with-upload, termination, checksum with `sha1` and `sha256`, expiration), for
//! files of any size up to the client's `max_upload_bytes`.
//!
//! Every part is committed with the upload's new offset and running SHA-256 before it is
//! acknowledged, so any API process can take the next `PATCH` and a restart loses nothing:
//! the client asks `HEAD` where to resume. When the last byte arrives, the stored file is
//! checked and becomes an import through the same admission and submit transaction as
//! `POST /v1/imports`; the last `PATCH` answers once it committed, naming the import in
//! `DataFlow-Import-Id` and `DataFlow-Batch-Id`.

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::BytesMut;
use dataflow_contracts::http::{ErrorBody, ImportView, UploadState, UploadView};
use dataflow_contracts::time::rfc3339;
use dataflow_contracts::{ImportFormat, Priority, UploadId};
use dataflow_platform::domain::records::{self, Limits};
use dataflow_platform::ledger::payloads::PART_BYTES;
use dataflow_platform::ledger::{NewUpload, Upload, UploadCreated, UploadKind};
use sha2::digest::common::hazmat::{SerializableState, SerializedState};
use sha2::{Digest, Sha256};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::imports::{Received, Stored, Submission, accept, dedup_key};
use super::{PathParam, parse_path_id};
use crate::auth::Principal;
use crate::error::{ApiError, ApiResult};
use crate::intake::{Encoding, Inflow};
use crate::state::AppState;

const TUS_VERSION: &str = "1.0.0";
const EXTENSIONS: &str = "creation,creation-with-upload,termination,checksum,expiration";
const PART_MEDIA_TYPE: &str = "application/offset+octet-stream";
/// The longest `Upload-Metadata` kept.
const MAX_METADATA: usize = 4096;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(options, create))
        .routes(routes!(offset, append, terminate, show))
}

/// What the server supports of tus.
#[utoipa::path(
    options,
    path = "/uploads",
    operation_id = "upload_options",
    tag = "uploads",
    responses((status = 204, description = "`Tus-Version`, `Tus-Extension`, `Tus-Max-Size` \
                                            (the client's `max_upload_bytes`), \
                                            `Tus-Checksum-Algorithm`")),
)]
async fn options(p: Principal) -> Response {
    let mut resp = StatusCode::NO_CONTENT.into_response();
    let h = resp.headers_mut();
    tus_headers(h);
    h.insert("tus-version", HeaderValue::from_static(TUS_VERSION));
    h.insert("tus-extension", HeaderValue::from_static(EXTENSIONS));
    h.insert(
        "tus-checksum-algorithm",
        HeaderValue::from_static("sha1,sha256"),
    );
    h.insert(
        "tus-max-size",
        HeaderValue::from(p.client.policy.max_upload_bytes),
    );
    resp
}

/// Creates an upload (tus creation); with a body (`Content-Type:
/// application/offset+octet-stream`) its first part comes with it.
///
/// `Upload-Metadata` may carry `filename` and `filetype` (which say the format: `text/csv`
/// or a `.csv` name, `application/x-ndjson` or a `.ndjson`/`.jsonl` name), `idempotencyKey`
/// (the same key answers the same upload) and `priority` (`high`, `normal`, `low`).
#[utoipa::path(
    post,
    path = "/uploads",
    operation_id = "create_upload",
    tag = "uploads",
    params(
        ("Tus-Resumable" = String, Header, description = "`1.0.0`"),
        ("Upload-Length" = u64, Header, description = "The file's length in bytes"),
        ("Upload-Metadata" = Option<String>, Header,
         description = "tus metadata: `key base64value` pairs, comma-separated"),
    ),
    responses(
        (status = 201, description = "Created; `Location` is the upload", headers(
            ("Location" = String, description = "`/v1/uploads/{id}`"),
            ("Upload-Offset" = u64, description = "Bytes stored"),
            ("Upload-Expires" = String, description = "When an unfinished upload expires"),
        )),
        (status = 400, description = "A missing or malformed tus header", body = ErrorBody),
        (status = 412, description = "Not tus 1.0.0", body = ErrorBody),
        (status = 413, description = "Longer than the client's `max_upload_bytes`",
         body = ErrorBody),
        (status = 415, description = "The metadata names no format DataFlow reads",
         body = ErrorBody),
    ),
)]
async fn create(
    State(state): State<AppState>,
    p: Principal,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    check_version(&headers)?;
    if headers.contains_key("upload-defer-length") {
        return Err(ApiError::bad_request(
            "defer_length_unsupported",
            "declare Upload-Length when creating the upload",
        ));
    }
    let length = number_header(&headers, "upload-length")?
        .ok_or_else(|| ApiError::bad_request("missing_upload_length", "send Upload-Length"))?;
    let max = p.client.policy.max_upload_bytes;
    if length > max {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "upload_too_large",
            format!("the file is {length} bytes; this client may upload at most {max}"),
        ));
    }
    if length == 0 {
        return Err(ApiError::bad_request("empty_body", "the file is empty"));
    }
    let raw = headers
        .get("upload-metadata")
        .map(|v| v.to_str().unwrap_or("\u{fffd}"))
        .unwrap_or("");
    let meta = Metadata::parse(raw)?;
    let format = meta.format()?;
    meta.priority()?;
    let empty = Sha256::new().serialize();
    let new = NewUpload {
        client_id: &p.client.id,
        kind: UploadKind::Tus,
        length,
        format,
        metadata: raw,
        idempotency_key: meta.get("idempotencyKey"),
        digest: &empty,
        ttl_ms: ttl_ms(&state),
    };
    let upload = match state.backends.db.create_upload(&new).await? {
        UploadCreated::New(u) | UploadCreated::Existing(u) => u,
    };
    let location = format!("/v1/uploads/{}", upload.id);
    let with_part = headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes() == PART_MEDIA_TYPE.as_bytes());
    let mut resp = if with_part && upload.received == 0 {
        // creation-with-upload: the first part, at offset 0.
        receive_part(&state, &p, &headers, body, upload, 0).await?
    } else {
        upload_headers(StatusCode::NO_CONTENT, &upload)
    };
    *resp.status_mut() = StatusCode::CREATED;
    if let Ok(v) = HeaderValue::from_str(&location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    Ok(resp)
}

/// Where the upload stands (tus `HEAD`): `Upload-Offset` is where the next part starts.
#[utoipa::path(
    head,
    path = "/uploads/{id}",
    operation_id = "upload_offset",
    tag = "uploads",
    params(
        ("id" = UploadId, Path, description = "The upload's id"),
        ("Tus-Resumable" = String, Header, description = "`1.0.0`"),
    ),
    responses(
        (status = 200, description = "`Upload-Offset`, `Upload-Length`, `Upload-Metadata`, \
                                      `Upload-Expires`; once imported, `DataFlow-Import-Id` \
                                      and `DataFlow-Batch-Id`"),
        (status = 400, description = "No `Tus-Resumable` header", body = ErrorBody),
        (status = 404, description = "No such upload for this client, or it expired"),
        (status = 412, description = "Not tus 1.0.0", body = ErrorBody),
    ),
)]
async fn offset(
    State(state): State<AppState>,
    p: Principal,
    headers: HeaderMap,
    PathParam(id): PathParam,
) -> ApiResult<Response> {
    check_version(&headers)?;
    let upload = find(&state, &p, &id).await?;
    let mut resp = upload_headers(StatusCode::OK, &upload);
    if let Some(view) = imported(&state, &p, &upload).await? {
        import_headers(resp.headers_mut(), &view);
    }
    Ok(resp)
}

/// Stores the next part (tus `PATCH`) at `Upload-Offset`; the last one makes the file an
/// import. `Upload-Checksum` (`sha1` or `sha256`, base64) checks the part before any of it
/// is kept.
#[utoipa::path(
    patch,
    path = "/uploads/{id}",
    operation_id = "upload_part",
    tag = "uploads",
    params(
        ("id" = UploadId, Path, description = "The upload's id"),
        ("Tus-Resumable" = String, Header, description = "`1.0.0`"),
        ("Upload-Offset" = u64, Header, description = "Where this part starts"),
        ("Upload-Checksum" = Option<String>, Header,
         description = "`sha1 <base64>` or `sha256 <base64>`"),
    ),
    request_body(content = String, content_type = "application/offset+octet-stream",
                 description = "The part, as it is or with `Content-Encoding: gzip` or `zstd`"),
    responses(
        (status = 204, description = "Stored; `Upload-Offset` is the new offset. After the \
                                      last part, `DataFlow-Import-Id` and `DataFlow-Batch-Id` \
                                      name the import"),
        (status = 400, description = "A malformed tus header, an unknown checksum \
                                      algorithm, or a file that does not parse",
         body = ErrorBody),
        (status = 404, description = "No such upload for this client, or it expired",
         body = ErrorBody),
        (status = 409, description = "`Upload-Offset` is not where the upload stands",
         body = ErrorBody),
        (status = 413, description = "The part runs past `Upload-Length`", body = ErrorBody),
        (status = 415, description = "Not `application/offset+octet-stream`",
         body = ErrorBody),
        (status = 412, description = "Not tus 1.0.0", body = ErrorBody),
        (status = 460, description = "The part does not match `Upload-Checksum`",
         body = ErrorBody),
    ),
)]
async fn append(
    State(state): State<AppState>,
    p: Principal,
    headers: HeaderMap,
    PathParam(id): PathParam,
    body: Body,
) -> ApiResult<Response> {
    check_version(&headers)?;
    let is_part = headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes() == PART_MEDIA_TYPE.as_bytes());
    if !is_part {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!("send parts as {PART_MEDIA_TYPE}"),
        ));
    }
    let at = number_header(&headers, "upload-offset")?
        .ok_or_else(|| ApiError::bad_request("missing_upload_offset", "send Upload-Offset"))?;
    let upload = find(&state, &p, &id).await?;
    receive_part(&state, &p, &headers, body, upload, at).await
}

/// Ends an upload and deletes what it stored (tus termination). An upload that became an
/// import is forgotten; the import keeps its file.
#[utoipa::path(
    delete,
    path = "/uploads/{id}",
    operation_id = "terminate_upload",
    tag = "uploads",
    params(
        ("id" = UploadId, Path, description = "The upload's id"),
        ("Tus-Resumable" = String, Header, description = "`1.0.0`"),
    ),
    responses(
        (status = 204, description = "Ended"),
        (status = 400, description = "No `Tus-Resumable` header", body = ErrorBody),
        (status = 404, description = "No such upload for this client", body = ErrorBody),
        (status = 412, description = "Not tus 1.0.0", body = ErrorBody),
    ),
)]
async fn terminate(
    State(state): State<AppState>,
    p: Principal,
    headers: HeaderMap,
    PathParam(id): PathParam,
) -> ApiResult<Response> {
    check_version(&headers)?;
    let id: UploadId = parse_path_id(&id)?;
    if !state.backends.db.delete_upload(&p.client.id, &id).await? {
        return Err(ApiError::not_found());
    }
    let mut resp = StatusCode::NO_CONTENT.into_response();
    tus_headers(resp.headers_mut());
    Ok(resp)
}

/// The upload as JSON: its offset, whether it became an import (and which), or why it
/// was refused.
#[utoipa::path(
    get,
    path = "/uploads/{id}",
    operation_id = "get_upload",
    tag = "uploads",
    params(("id" = UploadId, Path, description = "The upload's id")),
    responses(
        (status = 200, description = "The upload", body = UploadView),
        (status = 404, description = "No such upload for this client, or it expired",
         body = ErrorBody),
    ),
)]
async fn show(
    State(state): State<AppState>,
    p: Principal,
    PathParam(id): PathParam,
) -> ApiResult<Json<UploadView>> {
    let upload = find(&state, &p, &id).await?;
    let import = imported(&state, &p, &upload).await?;
    let error = upload
        .outcome
        .as_deref()
        .and_then(|o| serde_json::from_str::<ErrorBody>(o).ok());
    let state = match (&import, &error) {
        (Some(_), _) => UploadState::Imported,
        (None, Some(_)) => UploadState::Refused,
        _ if upload.received == upload.length => UploadState::Received,
        _ => UploadState::Receiving,
    };
    Ok(Json(UploadView {
        id: upload.id,
        length: upload.length,
        offset: upload.received,
        state,
        import,
        error,
        expires_at: rfc3339(upload.expires_at),
    }))
}

/// Reads one `PATCH` body into the upload a part at a time, each part committed with the
/// new offset and digest; after the last byte, makes the file an import.
async fn receive_part(
    state: &AppState,
    p: &Principal,
    headers: &HeaderMap,
    body: Body,
    upload: Upload,
    at: u64,
) -> ApiResult<Response> {
    if at != upload.received {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "offset_mismatch",
            format!(
                "the upload stands at {}, not {at}; ask HEAD and resume from there",
                upload.received
            ),
        ));
    }
    if upload.import_id.is_some() || upload.outcome.is_some() {
        return finished(state, p, &upload).await;
    }
    let expected = checksum(headers)?;
    let left = upload.length - upload.received;
    let cfg = &state.config;
    let mut hasher = resume_digest(&upload)?;
    let mut inflow = Inflow::new(
        body,
        Encoding::of(headers)?,
        left,
        cfg.max_compression_ratio,
        cfg.body_idle_timeout_secs,
    );
    let mut offset = upload.received;
    // A part with a checksum is checked whole before any of it is kept (tus: a mismatch
    // leaves the offset where it was), so it may be no longer than a request body.
    let part_size = match expected {
        Some(_) => usize::try_from(cfg.max_body_bytes.min(left)).unwrap_or(usize::MAX),
        None => PART_BYTES,
    };
    let stored = loop {
        let mut part = BytesMut::with_capacity(part_size.min(PART_BYTES));
        let read = inflow.fill(&mut part, part_size).await;
        let more = match read {
            Ok(more) => more,
            // Keep what arrived before the connection failed or went quiet: the client
            // resumes after it. Bytes a decoder produced before it failed are not kept.
            Err(e)
                if expected.is_none()
                    && !part.is_empty()
                    && matches!(e.code.as_str(), "body_read_failed" | "body_idle_timeout") =>
            {
                store(state, &upload, &mut hasher, offset, &part).await?;
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        // A full part may still be the body's last: one more byte tells (past the upload's
        // length, that byte is a 413).
        let more = if more && (expected.is_some() || offset + part.len() as u64 == upload.length) {
            inflow.fill(&mut BytesMut::new(), 1).await?
        } else {
            more
        };
        if let Some(expected) = &expected {
            if more {
                return Err(ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "part_too_large",
                    format!(
                        "a part sent with Upload-Checksum may be at most {} bytes",
                        cfg.max_body_bytes
                    ),
                ));
            }
            if !expected.matches(&part) {
                return Err(ApiError::new(
                    StatusCode::from_u16(460).unwrap_or(StatusCode::BAD_REQUEST),
                    "checksum_mismatch",
                    "the part does not match its Upload-Checksum; nothing of it was kept",
                ));
            }
        }
        // Stored in parts of the usual size, whatever the size of the request's part.
        for piece in part.chunks(PART_BYTES) {
            store(state, &upload, &mut hasher, offset, piece).await?;
            offset += piece.len() as u64;
        }
        if !more {
            break offset;
        }
    };
    let upload = Upload {
        received: stored,
        digest: hasher.serialize().to_vec(),
        ..upload
    };
    if upload.received < upload.length {
        let mut resp = upload_headers(StatusCode::NO_CONTENT, &upload);
        tus_headers(resp.headers_mut());
        return Ok(resp);
    }
    // The check of a large file takes a while: it runs to its end even if the client stops
    // waiting, and a `PATCH` of no bytes at the end asks again.
    let (state, p) = (state.clone(), p.clone());
    tokio::spawn(async move { complete(&state, &p, upload).await })
        .await
        .map_err(|e| dataflow_platform::Error::internal("completing an upload", e))?
}

/// Commits one part; a `409` if another request moved the upload on meanwhile.
async fn store(
    state: &AppState,
    upload: &Upload,
    hasher: &mut Sha256,
    offset: u64,
    part: &[u8],
) -> ApiResult<()> {
    hasher.update(part);
    let digest = hasher.serialize();
    if !state
        .backends
        .db
        .append_part(
            &upload.client_id,
            &upload.id,
            offset,
            part,
            &digest,
            ttl_ms(state),
        )
        .await?
    {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "offset_mismatch",
            "another request wrote to this upload meanwhile; ask HEAD and resume from there",
        ));
    }
    Ok(())
}

/// The whole file is stored: check it and make it an import, as `POST /v1/imports` would.
/// A refusal of the file is kept with the upload (and its parts deleted), so asking again
/// answers the same; one that waiting can lift (a quota, an outage) leaves it to the next
/// `PATCH`.
async fn complete(state: &AppState, p: &Principal, upload: Upload) -> ApiResult<Response> {
    let db = &state.backends.db;
    let limits = Limits {
        max_records: p.client.policy.max_records,
        max_field_bytes: state.config.max_field_bytes,
    };
    let reader = db.read_payload(upload.id.to_string(), upload.length);
    let format = upload.format;
    let scanned = tokio::task::spawn_blocking(move || records::validate(format, reader, limits))
        .await
        .map_err(|e| dataflow_platform::Error::internal("checking an upload", e))?;
    let meta = Metadata::parse(&upload.metadata)?;
    let result = match scanned {
        Err(e) => Err(ApiError::from(e)),
        Ok(summary) => {
            let file = Received {
                format,
                checksum: hex::encode(resume_digest(&upload)?.finalize()),
                bytes: upload.length,
                summary,
                stored: Stored::Upload {
                    id: upload.id.clone(),
                    owned: false,
                },
            };
            let dedup_key = dedup_key(&file.checksum, p);
            let submission = Submission {
                file: &file,
                dedup_key: &dedup_key,
                priority: meta.priority()?,
                idempotency: None,
            };
            accept(state, p, &submission).await
        }
    };
    match result {
        Ok((status, view)) => {
            if status != StatusCode::ACCEPTED {
                // A duplicate: the earlier import answers, and this file is not kept.
                let outcome = serde_json::to_string(&view).unwrap_or_default();
                db.refuse_upload(&upload.id, &duplicate_outcome(&outcome))
                    .await?;
            }
            let mut resp = upload_headers(StatusCode::NO_CONTENT, &upload);
            import_headers(resp.headers_mut(), &view);
            Ok(resp)
        }
        Err(e)
            if e.status.is_server_error()
                || matches!(
                    e.status,
                    StatusCode::TOO_MANY_REQUESTS | StatusCode::CONFLICT
                ) =>
        {
            Err(e)
        }
        Err(e) => {
            let body = ErrorBody {
                code: e.code.clone(),
                detail: e.detail.clone(),
            };
            db.refuse_upload(
                &upload.id,
                &serde_json::to_string(&body).unwrap_or_default(),
            )
            .await?;
            Err(e)
        }
    }
}

/// The outcome stored for a duplicate: the earlier import, marked.
fn duplicate_outcome(view: &str) -> String {
    format!("{{\"duplicate\":{view}}}")
}

/// Answers a finished upload again: its import, or its refusal.
async fn finished(state: &AppState, p: &Principal, upload: &Upload) -> ApiResult<Response> {
    let mut resp = upload_headers(StatusCode::NO_CONTENT, upload);
    if let Some(view) = imported(state, p, upload).await? {
        import_headers(resp.headers_mut(), &view);
        return Ok(resp);
    }
    let error = upload
        .outcome
        .as_deref()
        .and_then(|o| serde_json::from_str::<ErrorBody>(o).ok())
        .unwrap_or(ErrorBody {
            code: "upload_refused".into(),
            detail: "the file was refused".into(),
        });
    Err(ApiError::unprocessable(&error.code, error.detail))
}

/// The import the upload became, or the earlier one it duplicated.
async fn imported(
    state: &AppState,
    p: &Principal,
    upload: &Upload,
) -> ApiResult<Option<ImportView>> {
    if let Some(id) = &upload.import_id {
        return Ok(state.backends.db.get_import(Some(&p.client.id), id).await?);
    }
    #[derive(serde::Deserialize)]
    struct Duplicate {
        duplicate: ImportView,
    }
    Ok(upload
        .outcome
        .as_deref()
        .and_then(|o| serde_json::from_str::<Duplicate>(o).ok())
        .map(|d| d.duplicate))
}

async fn find(state: &AppState, p: &Principal, id: &str) -> ApiResult<Upload> {
    let id: UploadId = parse_path_id(id)?;
    state
        .backends
        .db
        .get_upload(&p.client.id, &id)
        .await?
        .ok_or_else(ApiError::not_found)
}

fn resume_digest(upload: &Upload) -> ApiResult<Sha256> {
    SerializedState::<Sha256>::try_from(upload.digest.as_slice())
        .ok()
        .and_then(|state| Sha256::deserialize(&state).ok())
        .ok_or_else(|| {
            dataflow_platform::Error::stored(format!("upload {} has no readable digest", upload.id))
                .into()
        })
}

fn ttl_ms(state: &AppState) -> i64 {
    (state.config.upload_ttl_secs * 1000) as i64
}

/// `Tus-Resumable` must say 1.0.0: missing, the request is malformed (400); another
/// version is one this server does not speak (tus: 412).
fn check_version(headers: &HeaderMap) -> ApiResult<()> {
    match headers.get("tus-resumable") {
        Some(v) if v.as_bytes() == TUS_VERSION.as_bytes() => Ok(()),
        Some(v) if v.is_empty() => Err(missing_version()),
        None => Err(missing_version()),
        _ => Err(ApiError::new(
            StatusCode::PRECONDITION_FAILED,
            "tus_version_unsupported",
            format!("send Tus-Resumable: {TUS_VERSION}"),
        )),
    }
}

fn missing_version() -> ApiError {
    ApiError::bad_request(
        "missing_tus_resumable",
        format!("send Tus-Resumable: {TUS_VERSION} with every upload request"),
    )
}

fn number_header(headers: &HeaderMap, name: &str) -> ApiResult<Option<u64>> {
    let Some(v) = headers.get(name) else {
        return Ok(None);
    };
    v.to_str()
        .ok()
        .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|s| s.parse::<u64>().ok())
        .filter(|n| i64::try_from(*n).is_ok())
        .map(Some)
        .ok_or_else(|| {
            ApiError::bad_request(
                "invalid_header",
                format!("{name} must be a non-negative integer"),
            )
        })
}

/// An `Upload-Checksum`: the algorithm and the digest the part must have.
enum Checksum {
    Sha1(Vec<u8>),
    Sha256(Vec<u8>),
}

impl Checksum {
    fn matches(&self, part: &[u8]) -> bool {
        match self {
            Checksum::Sha1(d) => sha1::Sha1::digest(part).as_slice() == d.as_slice(),
            Checksum::Sha256(d) => Sha256::digest(part).as_slice() == d.as_slice(),
        }
    }
}

/// `Upload-Checksum`: `sha1` (which tus requires every server to accept) or `sha256`.
fn checksum(headers: &HeaderMap) -> ApiResult<Option<Checksum>> {
    let Some(v) = headers.get("upload-checksum") else {
        return Ok(None);
    };
    let bad = || {
        ApiError::bad_request(
            "invalid_checksum",
            "Upload-Checksum must be `sha1 <base64 digest>` or `sha256 <base64 digest>`",
        )
    };
    let (algorithm, digest) = v
        .to_str()
        .ok()
        .and_then(|s| s.split_once(' '))
        .ok_or_else(bad)?;
    let digest = BASE64.decode(digest.trim()).map_err(|_| bad())?;
    match (algorithm, digest.len()) {
        ("sha1", 20) => Ok(Some(Checksum::Sha1(digest))),
        ("sha256", 32) => Ok(Some(Checksum::Sha256(digest))),
        ("sha1" | "sha256", _) => Err(bad()),
        _ => Err(ApiError::bad_request(
            "checksum_algorithm_unsupported",
            format!("Upload-Checksum algorithm `{algorithm}` is not supported; use sha1 or sha256"),
        )),
    }
}

fn tus_headers(h: &mut HeaderMap) {
    h.insert("tus-resumable", HeaderValue::from_static(TUS_VERSION));
}

fn upload_headers(status: StatusCode, upload: &Upload) -> Response {
    let mut resp = status.into_response();
    let h = resp.headers_mut();
    tus_headers(h);
    h.insert("upload-offset", HeaderValue::from(upload.received));
    h.insert("upload-length", HeaderValue::from(upload.length));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if !upload.metadata.is_empty()
        && let Ok(v) = HeaderValue::from_str(&upload.metadata)
    {
        h.insert("upload-metadata", v);
    }
    if let Some(at) = chrono::DateTime::from_timestamp_millis(upload.expires_at)
        && let Ok(v) = HeaderValue::from_str(&at.format("%a, %d %b %Y %H:%M:%S GMT").to_string())
    {
        h.insert("upload-expires", v);
    }
    resp
}

fn import_headers(h: &mut HeaderMap, view: &ImportView) {
    for (name, value) in [
        ("dataflow-import-id", view.id.as_str()),
        ("dataflow-batch-id", view.batch_id.as_str()),
    ] {
        if let Ok(v) = HeaderValue::from_str(value) {
            h.insert(HeaderName::from_static(name), v);
        }
    }
}

/// `Upload-Metadata`: comma-separated `key base64value` pairs (the value may be absent).
struct Metadata(Vec<(String, String)>);

impl Metadata {
    fn parse(raw: &str) -> ApiResult<Metadata> {
        let bad = |why: &str| {
            ApiError::bad_request("invalid_metadata", format!("Upload-Metadata: {why}"))
        };
        if raw.len() > MAX_METADATA {
            return Err(bad(&format!("longer than {MAX_METADATA} bytes")));
        }
        let mut pairs = Vec::new();
        for item in raw.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let (key, value) = item.split_once(' ').unwrap_or((item, ""));
            if key.is_empty() || !key.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(bad("keys must be visible ASCII"));
            }
            let value = BASE64
                .decode(value.trim())
                .ok()
                .and_then(|v| String::from_utf8(v).ok())
                .ok_or_else(|| bad(&format!("the value of `{key}` is not base64 of UTF-8 text")))?;
            pairs.push((key.to_owned(), value));
        }
        Ok(Metadata(pairs))
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The format from `filetype`, else from the `filename`'s extension.
    fn format(&self) -> ApiResult<ImportFormat> {
        let by_type = self
            .get("filetype")
            .and_then(ImportFormat::from_content_type);
        let by_name = self.get("filename").and_then(|name| {
            let ext = name.rsplit_once('.')?.1.to_ascii_lowercase();
            match ext.as_str() {
                "csv" => Some(ImportFormat::Csv),
                "ndjson" | "jsonl" => Some(ImportFormat::Ndjson),
                _ => None,
            }
        });
        by_type.or(by_name).ok_or_else(|| {
            ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "say the file's format in Upload-Metadata: filetype text/csv or \
                 application/x-ndjson, or a filename ending .csv, .ndjson or .jsonl",
            )
        })
    }

    fn priority(&self) -> ApiResult<Priority> {
        match self.get("priority") {
            None => Ok(Priority::default()),
            Some(p) => p.parse().map_err(|why: String| {
                ApiError::bad_request("invalid_priority", format!("Upload-Metadata: {why}"))
            }),
        }
    }
}

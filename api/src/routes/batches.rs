//! `GET /v1/batches`, `/v1/batches/{id}`, `/v1/batches/{id}/errors`, the batch report
//! (`/report` as JSON, `/report.csv` with the rejected rows) and `/v1/records/{key}`:
//! every query is scoped to the caller's client, so another client's ids answer 404.
//! Once the report job has stored a batch's report, that copy is served; before, the report
//! is built on request. Also `/v1/webhooks/secret`, the key the client's webhooks are
//! signed with.

use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Extension, Path, Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use dataflow_contracts::http::{BatchPage, BatchReport, BatchView, RecordErrorPage, RecordView};
use dataflow_contracts::jobs::WebhookSecret;
use dataflow_contracts::{BatchId, BatchStatus};
use dataflow_platform::db::Db;
use dataflow_platform::{report, webhook};
use serde::Deserialize;

use super::{page_limit, parse_path_id, query};
use crate::auth::Principal;
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/batches", get(list))
        .route("/batches/{id}", get(show))
        .route("/batches/{id}/errors", get(errors))
        .route("/batches/{id}/report", get(report))
        .route("/batches/{id}/report.csv", get(report_csv))
        .route("/records/{key}", get(record))
        .route("/webhooks/secret", get(webhook_secret))
}

async fn webhook_secret(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
) -> Json<WebhookSecret> {
    let key = state.backends.hasher.webhook_key(p.client.id.as_str());
    Json(WebhookSecret {
        secret: webhook::secret_text(&key),
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    status: Option<String>,
    cursor: Option<String>,
    limit: Option<u32>,
}

async fn list(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> ApiResult<Json<BatchPage>> {
    let q = query(q)?;
    let status = q
        .status
        .map(|s| s.parse::<BatchStatus>())
        .transpose()
        .map_err(|e| ApiError::bad_request("invalid_status", e))?;
    let cursor = q
        .cursor
        .map(|c| c.parse::<BatchId>())
        .transpose()
        .map_err(|_| {
            ApiError::bad_request(
                "invalid_cursor",
                "cursor must be a next_cursor from a previous page",
            )
        })?;
    let page = state
        .backends
        .db
        .list_batches(
            Some(&p.client.id),
            status,
            cursor.as_ref(),
            page_limit(q.limit)?,
        )
        .await?;
    Ok(Json(page))
}

async fn show(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(id): Path<String>,
) -> ApiResult<Json<BatchView>> {
    let id: BatchId = parse_path_id(&id)?;
    let view = state.backends.db.get_batch(Some(&p.client.id), &id).await?;
    view.map(Json).ok_or_else(ApiError::not_found)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ErrorsQuery {
    cursor: Option<u64>,
    limit: Option<u32>,
}

async fn errors(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(id): Path<String>,
    q: Result<Query<ErrorsQuery>, QueryRejection>,
) -> ApiResult<Json<RecordErrorPage>> {
    let q = query(q)?;
    let id: BatchId = parse_path_id(&id)?;
    let db = &state.backends.db;
    if db.get_batch(Some(&p.client.id), &id).await?.is_none() {
        return Err(ApiError::not_found());
    }
    Ok(Json(
        db.list_record_errors(&id, q.cursor.unwrap_or(0), page_limit(q.limit)?)
            .await?,
    ))
}

async fn report(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(id): Path<String>,
) -> ApiResult<Json<BatchReport>> {
    let id: BatchId = parse_path_id(&id)?;
    let db = &state.backends.db;
    let batch = db
        .get_batch(Some(&p.client.id), &id)
        .await?
        .ok_or_else(ApiError::not_found)?;
    if let Some((summary, _)) = db.stored_report(&id).await?
        && let Ok(stored) = serde_json::from_str::<BatchReport>(&summary)
    {
        return Ok(Json(stored));
    }
    Ok(Json(report::summary(db, batch).await?))
}

/// Rows per page while streaming the CSV: memory stays flat however many rows failed.
const REPORT_PAGE: u32 = 5_000;

async fn report_csv(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let id: BatchId = parse_path_id(&id)?;
    let db = state.backends.db.clone();
    if db.get_batch(Some(&p.client.id), &id).await?.is_none() {
        return Err(ApiError::not_found());
    }
    rejected_rows_csv(db, id).await
}

/// The rejected rows of a batch the caller may see, as a CSV download: the stored copy,
/// or streamed page by page.
pub(crate) async fn rejected_rows_csv(db: Db, id: BatchId) -> ApiResult<Response> {
    let filename = format!("attachment; filename=\"{id}-rejected.csv\"");
    let headers = [
        (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_owned()),
        (header::CONTENT_DISPOSITION, filename),
    ];
    if let Some((_, Some(csv))) = db.stored_report(&id).await? {
        return Ok((headers, csv).into_response());
    }
    // (cursor, first page?) until a page comes back without a next cursor.
    let pages = futures::stream::unfold(Some((0u64, true)), move |state| {
        let (db, id) = (db.clone(), id.clone());
        async move {
            let (after, first) = state?;
            match db.list_record_errors(&id, after, REPORT_PAGE).await {
                Ok(page) => {
                    let next = page
                        .next_cursor
                        .as_deref()
                        .and_then(|c| c.parse().ok())
                        .map(|c| (c, false));
                    let bytes = report::rejected_rows_csv(&page.items, first);
                    Some((Ok::<_, std::io::Error>(Bytes::from(bytes)), next))
                }
                Err(e) => Some((Err(std::io::Error::other(e.to_string())), None)),
            }
        }
    });
    Ok((headers, Body::from_stream(pages)).into_response())
}

async fn record(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(key): Path<String>,
) -> ApiResult<Json<RecordView>> {
    // No stored key holds a NUL (or is longer than the key limit), and PostgreSQL would
    // refuse the parameter outright.
    if key.contains('\0') || key.len() > dataflow_contracts::MAX_RECORD_KEY_BYTES {
        return Err(ApiError::not_found());
    }
    let view = state.backends.db.get_record(&p.client.id, &key).await?;
    view.map(Json).ok_or_else(ApiError::not_found)
}

//! `GET /v1/batches`, `/v1/batches/{id}`, `/v1/batches/{id}/errors` and the batch report
//! (`/report` as JSON, `/report.csv` with the rejected rows): every query is scoped to the caller's client, so another client's ids answer 404.
//! Once the report job has stored a batch's report, that copy is served; before, the report
//! is built on request. Also `/v1/webhooks/secret`, the key the client's webhooks are
//! signed with.

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use dataflow_contracts::http::{
    BatchListQuery, BatchPage, BatchReport, BatchView, ErrorBody, ErrorPageQuery, RecordErrorPage,
};
use dataflow_contracts::jobs::WebhookSecret;
use dataflow_contracts::{BatchId, BatchStatus};
use dataflow_platform::effects::{report, webhook};
use dataflow_platform::ledger::{Db, ErrorCursor};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{PathParam, page_limit, parse_path_id, query};
use crate::auth::Principal;
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list))
        .routes(routes!(show))
        .routes(routes!(errors))
        .routes(routes!(report))
        .routes(routes!(report_csv))
        .routes(routes!(webhook_secret))
}

/// The key this client's webhooks are signed with (Standard Webhooks).
#[utoipa::path(
    get,
    path = "/webhooks/secret",
    operation_id = "get_webhook_secret",
    tag = "client",
    responses((status = 200, description = "The signing key", body = WebhookSecret)),
)]
async fn webhook_secret(State(state): State<AppState>, p: Principal) -> Json<WebhookSecret> {
    let key = state.backends.hasher.webhook_key(p.client.id.as_str());
    Json(WebhookSecret {
        secret: webhook::secret_text(&key),
    })
}

/// The client's batches, newest first.
#[utoipa::path(
    get,
    path = "/batches",
    operation_id = "list_batches",
    tag = "batches",
    params(BatchListQuery),
    responses(
        (status = 200, description = "One page of batches", body = BatchPage),
        (status = 400, description = "An unknown status, a malformed cursor or a limit out of \
                                      range", body = ErrorBody),
    ),
)]
async fn list(
    State(state): State<AppState>,
    p: Principal,
    q: Result<Query<BatchListQuery>, QueryRejection>,
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

/// A batch: status, counts, attempts, timings.
#[utoipa::path(
    get,
    path = "/batches/{id}",
    operation_id = "get_batch",
    tag = "batches",
    params(("id" = BatchId, Path, description = "The batch's id")),
    responses(
        (status = 200, description = "The batch", body = BatchView),
        (status = 404, description = "No such batch for this client", body = ErrorBody),
    ),
)]
async fn show(
    State(state): State<AppState>,
    p: Principal,
    PathParam(id): PathParam,
) -> ApiResult<Json<BatchView>> {
    let id: BatchId = parse_path_id(&id)?;
    let view = state.backends.db.get_batch(Some(&p.client.id), &id).await?;
    view.map(Json).ok_or_else(ApiError::not_found)
}

/// The batch's row errors by line and field, in line order.
#[utoipa::path(
    get,
    path = "/batches/{id}/errors",
    operation_id = "list_batch_errors",
    tag = "batches",
    params(("id" = BatchId, Path, description = "The batch's id"), ErrorPageQuery),
    responses(
        (status = 200, description = "One page of row errors", body = RecordErrorPage),
        (status = 400, description = "A malformed cursor or a limit out of range",
         body = ErrorBody),
        (status = 404, description = "No such batch for this client", body = ErrorBody),
    ),
)]
async fn errors(
    State(state): State<AppState>,
    p: Principal,
    PathParam(id): PathParam,
    q: Result<Query<ErrorPageQuery>, QueryRejection>,
) -> ApiResult<Json<RecordErrorPage>> {
    let q = query(q)?;
    let id: BatchId = parse_path_id(&id)?;
    let db = &state.backends.db;
    if db.get_batch(Some(&p.client.id), &id).await?.is_none() {
        return Err(ApiError::not_found());
    }
    let after = match q.cursor.as_deref() {
        Some(c) => c
            .parse::<ErrorCursor>()
            .map_err(|e| ApiError::bad_request("invalid_cursor", e))?,
        None => ErrorCursor::default(),
    };
    Ok(Json(
        db.list_record_errors(&id, after, page_limit(q.limit)?)
            .await?,
    ))
}

/// The outcome of the batch in numbers (the stored report once the report job ran).
#[utoipa::path(
    get,
    path = "/batches/{id}/report",
    operation_id = "get_batch_report",
    tag = "batches",
    params(("id" = BatchId, Path, description = "The batch's id")),
    responses(
        (status = 200, description = "The report", body = BatchReport),
        (status = 404, description = "No such batch for this client", body = ErrorBody),
    ),
)]
async fn report(
    State(state): State<AppState>,
    p: Principal,
    PathParam(id): PathParam,
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

/// The rejected rows as CSV, formula cells defused (stored, or streamed page by page).
#[utoipa::path(
    get,
    path = "/batches/{id}/report.csv",
    operation_id = "get_batch_report_csv",
    tag = "batches",
    params(("id" = BatchId, Path, description = "The batch's id")),
    responses(
        (status = 200, description = "`line,field,code,detail` rows with a header",
         body = String, content_type = "text/csv",
         headers(("Content-Disposition" = String,
                  description = "`attachment; filename=\"<batch id>-rejected.csv\"`"))),
        (status = 404, description = "No such batch for this client", body = ErrorBody),
    ),
)]
async fn report_csv(
    State(state): State<AppState>,
    p: Principal,
    PathParam(id): PathParam,
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
    let pages = futures::stream::unfold(Some((ErrorCursor::default(), true)), move |state| {
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
                Err(e) => Some((Err(std::io::Error::other(e)), None)),
            }
        }
    });
    Ok((headers, Body::from_stream(pages)).into_response())
}

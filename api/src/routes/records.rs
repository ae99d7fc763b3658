//! `GET /v1/records`: the caller's records in key order — a page as JSON, or, by `Accept`,
//! every matching record streamed as NDJSON or CSV in constant memory (pages read one after
//! another, each written out before the next is read) — `GET` and `DELETE
//! /v1/records/{key}`, and `GET /v1/changes`, the feed of every change to them in order.

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use dataflow_contracts::http::{
    ChangePage, ChangesQuery, ErrorBody, RecordListQuery, RecordPage, RecordView,
};
use dataflow_contracts::{BatchId, ClientId};
use dataflow_platform::effects::export::{CsvColumns, ndjson_line};
use dataflow_platform::ledger::{Db, RecordFilter};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{PathParam, page_limit, query};
use crate::auth::Principal;
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list))
        .routes(routes!(record, delete))
        .routes(routes!(changes))
}

/// Whether `text` could be (part of) a stored key: none holds a NUL or is longer than the
/// key limit, and PostgreSQL would refuse a NUL in a parameter outright.
fn could_be_key(text: &str) -> bool {
    !text.contains('\0') && text.len() <= dataflow_contracts::MAX_RECORD_KEY_BYTES
}

/// Records read per query of an export.
const EXPORT_PAGE: u32 = 1_000;

/// How the records are wanted, by `Accept`.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Shape {
    Page,
    Ndjson,
    Csv,
}

fn shape(headers: &HeaderMap) -> Shape {
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if accept.contains("application/x-ndjson") {
        Shape::Ndjson
    } else if accept.contains("text/csv") {
        Shape::Csv
    } else {
        Shape::Page
    }
}

/// The caller's records in key order, filtered. `Accept: application/x-ndjson` or
/// `text/csv` exports every matching record (after `cursor`, if given) as one stream.
#[utoipa::path(
    get,
    path = "/records",
    operation_id = "list_records",
    tag = "records",
    params(RecordListQuery),
    responses(
        (status = 200, description = "A page of records; or, by `Accept`, every matching \
                                      record as NDJSON (one `RecordView` per line) or CSV (the \
                                      key, the fields, and `_extra` for fields outside them)",
         content(
             (RecordPage = "application/json"),
             (String = "application/x-ndjson"),
             (String = "text/csv"),
         )),
        (status = 400, description = "A malformed filter or a limit out of range",
         body = ErrorBody),
    ),
)]
async fn list(
    State(state): State<AppState>,
    p: Principal,
    headers: HeaderMap,
    q: Result<Query<RecordListQuery>, QueryRejection>,
) -> ApiResult<Response> {
    let q = query(q)?;
    let filter = RecordFilter {
        updated_since_ms: q
            .updated_since
            .as_deref()
            .map(|t| {
                chrono::DateTime::parse_from_rfc3339(t)
                    .map(|at| at.timestamp_millis())
                    .map_err(|e| {
                        ApiError::bad_request(
                            "invalid_query",
                            format!("updated_since `{t}` is not an RFC 3339 time: {e}"),
                        )
                    })
            })
            .transpose()?,
        batch_id: q
            .batch_id
            .as_deref()
            .map(|b| {
                b.parse::<BatchId>().map_err(|_| {
                    ApiError::bad_request(
                        "invalid_query",
                        format!("batch_id `{b}` is not a batch id"),
                    )
                })
            })
            .transpose()?,
        key_prefix: q.key_prefix.filter(|p| !p.is_empty()),
    };
    for text in [q.cursor.as_deref(), filter.key_prefix.as_deref()]
        .into_iter()
        .flatten()
    {
        if !could_be_key(text) {
            return Err(ApiError::bad_request(
                "invalid_query",
                "a cursor or key prefix is at most 512 bytes, without NUL",
            ));
        }
    }
    let db = state.backends.db.clone();
    let client = p.client.id.clone();
    let shape = shape(&headers);
    if shape == Shape::Page {
        let limit = page_limit(q.limit)?;
        let mut items = db
            .list_records(&client, &filter, q.cursor.as_deref(), limit + 1)
            .await?;
        let next_cursor = (items.len() > limit as usize).then(|| {
            items.truncate(limit as usize);
            items.last().map(|r| r.key.clone()).unwrap_or_default()
        });
        return Ok(Json(RecordPage { items, next_cursor }).into_response());
    }
    let columns = match shape {
        Shape::Csv => Some(match &p.client.schema {
            Some(s) => {
                let schema = s.compiled(&client, &state.schemas)?;
                CsvColumns::of_schema(schema.fields.iter().map(|f| f.name.clone()).collect())
            }
            None => {
                let sample = db
                    .list_records(&client, &filter, q.cursor.as_deref(), EXPORT_PAGE)
                    .await?;
                CsvColumns::of_records(&sample)
            }
        }),
        _ => None,
    };
    let content_type = match shape {
        Shape::Csv => "text/csv; charset=utf-8",
        _ => "application/x-ndjson",
    };
    let header_row = columns.as_ref().map(CsvColumns::header);
    let stream = export(db, client, filter, q.cursor, columns);
    let first = header_row.map(|h| Ok::<_, std::io::Error>(Bytes::from(h)));
    let body = futures::StreamExt::chain(futures::stream::iter(first), stream);
    Ok((
        [(header::CONTENT_TYPE, content_type)],
        Body::from_stream(body),
    )
        .into_response())
}

/// Every matching record after `cursor`, a page at a time, as NDJSON lines or CSV rows.
fn export(
    db: Db,
    client: ClientId,
    filter: RecordFilter,
    cursor: Option<String>,
    columns: Option<CsvColumns>,
) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> {
    futures::stream::unfold(Some(cursor), move |after| {
        let (db, client, filter, columns) =
            (db.clone(), client.clone(), filter.clone(), columns.clone());
        async move {
            let after = after?;
            match db
                .list_records(&client, &filter, after.as_deref(), EXPORT_PAGE)
                .await
            {
                Ok(page) => {
                    let next = (page.len() == EXPORT_PAGE as usize)
                        .then(|| page.last().map(|r| r.key.clone()));
                    let mut out = Vec::new();
                    for record in &page {
                        match &columns {
                            Some(c) => out.extend(c.row(record)),
                            None => out.extend(ndjson_line(record).into_bytes()),
                        }
                    }
                    Some((Ok(Bytes::from(out)), next))
                }
                // Cut short: the client sees a broken stream, not a partial file posing as whole.
                Err(e) => Some((Err(std::io::Error::other(e)), None)),
            }
        }
    })
}

/// A stored record, by the value of the policy's `key_field`.
#[utoipa::path(
    get,
    path = "/records/{key}",
    operation_id = "get_record",
    tag = "records",
    params(("key" = String, Path, description = "The record's key")),
    responses(
        (status = 200, description = "The record", body = RecordView),
        (status = 404, description = "No such record for this client", body = ErrorBody),
    ),
)]
async fn record(
    State(state): State<AppState>,
    p: Principal,
    PathParam(key): PathParam,
) -> ApiResult<Json<RecordView>> {
    if !could_be_key(&key) {
        return Err(ApiError::not_found());
    }
    let view = state.backends.db.get_record(&p.client.id, &key).await?;
    view.map(Json).ok_or_else(ApiError::not_found)
}

/// Deletes a record: gone from the ledger, and a `deleted` change in the feed.
#[utoipa::path(
    delete,
    path = "/records/{key}",
    operation_id = "delete_record",
    tag = "records",
    params(("key" = String, Path, description = "The record's key")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No such record for this client", body = ErrorBody),
    ),
)]
async fn delete(
    State(state): State<AppState>,
    p: Principal,
    PathParam(key): PathParam,
) -> ApiResult<StatusCode> {
    if !could_be_key(&key) {
        return Err(ApiError::not_found());
    }
    match state.backends.db.delete_record(&p.client.id, &key).await? {
        true => Ok(StatusCode::NO_CONTENT),
        false => Err(ApiError::not_found()),
    }
}

/// The caller's record changes after `after`, in the order they committed: every insert,
/// update and deletion, each once. Follow the feed by passing each answer's `cursor` as the
/// next `after`; an answer with `more: false` is the end for now.
#[utoipa::path(
    get,
    path = "/changes",
    operation_id = "list_changes",
    tag = "records",
    params(ChangesQuery),
    responses(
        (status = 200, description = "The next changes", body = ChangePage),
        (status = 400, description = "A malformed cursor or a limit out of range",
         body = ErrorBody),
    ),
)]
async fn changes(
    State(state): State<AppState>,
    p: Principal,
    q: Result<Query<ChangesQuery>, QueryRejection>,
) -> ApiResult<Json<ChangePage>> {
    let q = query(q)?;
    let limit = match q.limit.unwrap_or(100) {
        n @ 1..=1000 => n,
        _ => {
            return Err(ApiError::bad_request(
                "invalid_limit",
                "limit must be between 1 and 1000",
            ));
        }
    };
    let after = q.after.unwrap_or(0);
    let mut items = state
        .backends
        .db
        .list_changes(&p.client.id, after, limit + 1)
        .await?;
    let more = items.len() > limit as usize;
    items.truncate(limit as usize);
    let cursor = items.last().map_or(after, |c| c.seq).to_string();
    Ok(Json(ChangePage {
        items,
        cursor,
        more,
    }))
}

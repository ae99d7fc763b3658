//! `/ui/batches`: every client's batches filtered by client, status and age, a search by
//! id, and one batch in detail (counts, last error, row errors, its events, the rejected
//! rows as CSV) with the transitions its state allows.

use std::collections::HashMap;

use axum::Extension;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Redirect, Response};
use dataflow_contracts::http::BatchView;
use dataflow_contracts::{BatchId, BatchStatus, ClientId};
use dataflow_platform::ledger::{BatchFilter, ErrorCursor};
use maud::{Markup, html};
use serde::Deserialize;

use super::layout::{self, Nav, Notice};
use super::session::Operator;
use super::{cursor, optional};
use crate::error::{ApiError, ApiResult};
use crate::routes::batches::rejected_rows_csv;
use crate::routes::{parse_path_id, query};
use crate::state::AppState;

const PAGE: u32 = 50;

/// The age windows the filter offers.
const WINDOWS: [(&str, &str, i64); 5] = [
    ("", "any time", 0),
    ("1h", "last hour", 3_600_000),
    ("24h", "last 24 hours", 86_400_000),
    ("7d", "last 7 days", 7 * 86_400_000),
    ("30d", "last 30 days", 30 * 86_400_000),
];

#[derive(Deserialize, Default)]
pub struct ListQuery {
    #[serde(default)]
    client: String,
    #[serde(default)]
    status: String,
    #[serde(default)]
    window: String,
    /// A batch id to jump to.
    #[serde(default)]
    id: String,
    #[serde(default)]
    cursor: String,
}

fn invalid(code: &str, detail: String) -> ApiError {
    ApiError::bad_request(code, detail)
}

fn filter(q: &ListQuery) -> ApiResult<BatchFilter> {
    let client = optional::<ClientId>(&q.client).map_err(|_| {
        invalid(
            "invalid_client",
            format!("{:?} is not a client id", q.client),
        )
    })?;
    let status = optional::<BatchStatus>(&q.status).map_err(|e| invalid("invalid_status", e))?;
    let max_age_ms = WINDOWS
        .iter()
        .find(|(key, _, _)| *key == q.window)
        .ok_or_else(|| {
            invalid(
                "invalid_window",
                format!("{:?} is not a window: 1h, 24h, 7d or 30d", q.window),
            )
        })?
        .2;
    Ok(BatchFilter {
        client,
        status,
        max_age_ms: (max_age_ms > 0).then_some(max_age_ms),
    })
}

fn records(b: &BatchView) -> Markup {
    html! { (b.records_processed) " / " (b.records_total) }
}

pub async fn list(
    State(state): State<AppState>,
    Extension(op): Extension<Operator>,
    notice: Notice,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> ApiResult<Response> {
    let q = query(q)?;
    let db = &state.backends.db;
    let id = q.id.trim();
    if !id.is_empty() {
        let found = match id.parse::<BatchId>() {
            Ok(id) => db.get_batch(None, &id).await?.map(|b| b.id),
            Err(_) => None,
        };
        return match found {
            Some(id) => Ok(Redirect::to(&format!("/ui/batches/{id}")).into_response()),
            None => Err(ApiError::new(
                axum::http::StatusCode::NOT_FOUND,
                "not_found",
                format!("no batch has the id {id:?} (ids look like bat_01KB…)"),
            )),
        };
    }
    let f = filter(&q)?;
    let cursor = cursor::<BatchId>(&q.cursor)?;
    let (rows, next) = db.search_batches(&f, cursor.as_ref(), PAGE).await?;
    let clients = db.list_clients().await?;
    let names: HashMap<&ClientId, &str> =
        clients.iter().map(|c| (&c.id, c.name.as_str())).collect();
    let here = layout::link(
        "/ui/batches",
        &[
            ("client", &q.client),
            ("status", &q.status),
            ("window", &q.window),
            ("cursor", &q.cursor),
        ],
    );
    let body = html! {
        form.filters method="get" action="/ui/batches" {
            label { "Client"
                select name="client" {
                    option value="" { "every client" }
                    @for c in &clients { option value=(c.id) selected[c.id.as_str() == q.client] { (c.name) " (" (c.id) ")" } }
                }
            }
            label { "Status"
                select name="status" {
                    option value="" { "any status" }
                    @for s in BatchStatus::ALL { option value=(s.as_str()) selected[s.as_str() == q.status] { (s.as_str()) } }
                }
            }
            label { "Created"
                select name="window" {
                    @for (key, label, _) in WINDOWS { option value=(key) selected[key == q.window] { (label) } }
                }
            }
            button type="submit" { "Filter" }
        }
        form.search method="get" action="/ui/batches" {
            label { "Batch id" input name="id" placeholder="bat_01KB…" size="32"; }
            button type="submit" { "Open" }
        }
        (layout::live("batches", html! {
            @if rows.is_empty() {
                (layout::empty(if cursor.is_some() { "No older batches match." } else { "No batch matches these filters yet." }))
            } @else {
                table {
                    thead { tr { th { "Batch" } th { "Client" } th { "Status" } th.num { "Records" } th.num { "Rejected" } th.num { "Attempts" } th { "Created" } th.num { "Took" } th {} } }
                    tbody {
                        @for r in &rows {
                            @let b = &r.batch;
                            tr data-batch=(b.id) {
                                td.mono { a href={ "/ui/batches/" (b.id) } { (b.id) } }
                                td { (names.get(&r.client_id).copied().unwrap_or(r.client_id.as_str())) }
                                td.status { (layout::status(b.status.as_str())) }
                                td.num { (records(b)) }
                                td.num.refused[b.records_failed > 0] { (b.records_failed) }
                                td.num { (b.attempts) }
                                td { (layout::time(&b.created_at)) }
                                td.num { (b.duration_ms.map(layout::age).unwrap_or_default()) }
                                td { (transitions(&op, b, &here)) }
                            }
                        }
                    }
                }
                (layout::pager(next.map(|c| html! {
                    a href=(layout::link("/ui/batches", &[("client", &q.client), ("status", &q.status), ("window", &q.window), ("cursor", &c)])) { "Older batches →" }
                })))
            }
        }))
    };
    Ok(layout::page(&op, Nav::Batches, "Batches", &notice, body).into_response())
}

/// The buttons for what an operator may do to a batch in its state.
fn transitions(op: &Operator, b: &BatchView, back: &str) -> Markup {
    let id = b.id.as_str();
    html! {
        @match b.status {
            BatchStatus::AwaitingApproval => {
                (layout::action_button(op, "approve", id, back, "Approve", false))
                (layout::action_button(op, "reject", id, back, "Reject", true))
            }
            BatchStatus::Dead => {
                (layout::action_button(op, "retry", id, back, "Retry", false))
                (layout::action_button(op, "discard", id, back, "Discard", true))
            }
            _ => {}
        }
    }
}

#[derive(Deserialize, Default)]
pub struct DetailQuery {
    /// Row errors after this one (`LINE.POSITION`).
    after: Option<String>,
}

pub async fn detail(
    State(state): State<AppState>,
    Extension(op): Extension<Operator>,
    Path(id): Path<String>,
    notice: Notice,
    q: Result<Query<DetailQuery>, QueryRejection>,
) -> ApiResult<Markup> {
    let q = query(q)?;
    let id: BatchId = parse_path_id(&id)?;
    let db = &state.backends.db;
    let b = db
        .get_batch(None, &id)
        .await?
        .ok_or_else(ApiError::not_found)?;
    let after = match q.after.as_deref() {
        Some(c) => c
            .parse::<ErrorCursor>()
            .map_err(|e| ApiError::bad_request("invalid_cursor", e))?,
        None => ErrorCursor::default(),
    };
    let errors = db.list_record_errors(&id, after, PAGE).await?;
    let by_code = db.record_error_counts(&id).await?;
    let events = db.batch_events(id.as_str()).await?;
    let here = format!("/ui/batches/{id}");
    let title = format!("Batch {id}");
    let body = html! {
        (layout::live("batch", html! {
            div.cards {
                div.card {
                    h2 { "State" }
                    dl {
                        dt { "Status" } dd.status { (layout::status(b.status.as_str())) }
                        dt { "Import" } dd.mono { (b.import_id) }
                        dt { "Attempts" } dd { (b.attempts) }
                        dt { "Takeovers" } dd { (b.takeovers) }
                        dt { "Created" } dd { (layout::time(&b.created_at)) }
                        dt { "Started" } dd { @if let Some(t) = &b.started_at { (layout::time(t)) } @else { "—" } }
                        dt { "Finished" } dd { @if let Some(t) = &b.completed_at { (layout::time(t)) } @else { "—" } }
                        dt { "Took" } dd { (b.duration_ms.map(layout::age).unwrap_or_else(|| "—".to_owned())) }
                    }
                    div.actions { (transitions(&op, &b, &here)) }
                }
                div.card {
                    h2 { "Records" }
                    dl {
                        dt { "Total" } dd.big { (b.records_total) }
                        dt { "Processed" } dd { (b.records_processed) }
                        dt { "Written" } dd { (b.records_written) }
                        dt { "Unchanged" } dd { (b.records_unchanged) }
                        dt { "Superseded" } dd { (b.records_superseded) }
                        dt { "Rejected" } dd.refused[b.records_failed > 0] { (b.records_failed) }
                    }
                    @if b.records_failed > 0 {
                        p { a.button href={ "/ui/batches/" (id) "/report.csv" } download { "Download rejected rows (CSV)" } }
                    }
                }
            }
            @if let Some(e) = &b.last_error {
                div.error { strong { "Last error: " } (e) }
            }
            h2 { "Row errors" }
            @if by_code.is_empty() {
                (layout::empty("No row was rejected."))
            } @else {
                p { @for (code, n) in &by_code { span.chip { (code) " × " (n) } " " } }
                table {
                    thead { tr { th.num { "Line" } th { "Field" } th { "Code" } th { "Detail" } th { "Value" } } }
                    tbody {
                        @for e in &errors.items {
                            tr { td.num { (e.line) } td { (e.field.as_deref().unwrap_or("")) } td { (e.code) } td { (e.detail) } td.mono { (e.value.as_deref().unwrap_or("")) } }
                        }
                    }
                }
                (layout::pager(errors.next_cursor.map(|c| html! {
                    a href=(layout::link(&here, &[("after", &c)])) { "More errors →" }
                })))
            }
            h2 { "Events" }
            @if events.is_empty() {
                (layout::empty("No events recorded (published events are pruned after the outbox retention)."))
            } @else {
                table {
                    thead { tr { th { "Time" } th { "Event" } th { "Id" } } }
                    tbody {
                        @for e in &events {
                            tr { td { (layout::time(&e.occurred_at)) } td { (e.event.kind()) } td.mono { (e.id) } }
                        }
                    }
                }
            }
        }))
        p { a href="/ui/batches" { "← All batches" } }
    };
    Ok(layout::page(&op, Nav::Batches, &title, &notice, body))
}

/// The rejected rows of any client's batch (operators see every client).
pub async fn report_csv(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let id: BatchId = parse_path_id(&id)?;
    let db = state.backends.db.clone();
    if db.get_batch(None, &id).await?.is_none() {
        return Err(ApiError::not_found());
    }
    rejected_rows_csv(db, id).await
}

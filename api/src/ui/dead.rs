//! `/ui/dead`: the dead letters — batches that used up their attempts and jobs that were
//! dead-lettered — each with retry and discard, one at a time or ticked in bulk.

use axum::Extension;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use dataflow_contracts::jobs::JobStatus;
use dataflow_contracts::{BatchId, BatchStatus, JobId};
use dataflow_platform::ledger::JobFilter;
use maud::{Markup, html};
use serde::Deserialize;

use super::cursor;
use super::layout::{self, Nav, Notice};
use super::session::Operator;
use crate::error::ApiResult;
use crate::routes::query;
use crate::state::AppState;

const PAGE: u32 = 50;

#[derive(Deserialize, Default)]
pub struct DeadQuery {
    #[serde(default)]
    batches: String,
    #[serde(default)]
    jobs: String,
}

/// The bulk form of one list: its buttons; the rows' checkboxes join it by `form=`.
fn bulk(op: &Operator, form: &str, back: &str) -> Markup {
    html! {
        form.bulk #(form) method="post" action="/ui/actions" {
            input type="hidden" name="csrf" value=(op.session.csrf);
            input type="hidden" name="back" value=(back);
            label.check { input type="checkbox" data-select-all=(form); " all on this page" }
            button type="submit" name="action" value="retry" { "Retry selected" }
            input name="reason" placeholder="reason for discarding (optional)" maxlength="1000";
            button.danger type="submit" name="action" value="discard" data-confirm="Discard the selected dead letters for good?" { "Discard selected" }
        }
    }
}

fn tick(form: &str, id: &str) -> Markup {
    html! { input type="checkbox" name="target" value=(id) form=(form) aria-label={ "select " (id) }; }
}

pub async fn page(
    State(state): State<AppState>,
    Extension(op): Extension<Operator>,
    notice: Notice,
    q: Result<Query<DeadQuery>, QueryRejection>,
) -> ApiResult<Markup> {
    let q = query(q)?;
    let batch_cursor = cursor::<BatchId>(&q.batches)?;
    let job_cursor = cursor::<JobId>(&q.jobs)?;
    let db = &state.backends.db;
    let batches = db
        .list_batches(None, Some(BatchStatus::Dead), batch_cursor.as_ref(), PAGE)
        .await?;
    let filter = JobFilter {
        status: Some(JobStatus::Dead),
        kind: None,
        batch_id: None,
    };
    let jobs = db.list_jobs(&filter, job_cursor.as_ref(), PAGE).await?;
    let here = layout::link("/ui/dead", &[("batches", &q.batches), ("jobs", &q.jobs)]);
    let body = html! {
        (layout::live("dead", html! {
            h2 { "Dead batches" }
            @if batches.items.is_empty() {
                (layout::empty("No dead batch. Batches land here when they fail on every attempt."))
            } @else {
                (bulk(&op, "bulk-batches", &here))
                table {
                    thead { tr { th {} th { "Batch" } th.num { "Attempts" } th { "Last error" } th { "Created" } th {} } }
                    tbody {
                        @for b in &batches.items {
                            tr data-batch=(b.id) {
                                td { (tick("bulk-batches", b.id.as_str())) }
                                td.mono { a href={ "/ui/batches/" (b.id) } { (b.id) } }
                                td.num { (b.attempts) }
                                td.error-text { (b.last_error.as_deref().unwrap_or("")) }
                                td { (layout::time(&b.created_at)) }
                                td {
                                    (layout::action_button(&op, "retry", b.id.as_str(), &here, "Retry", false))
                                    (layout::action_button(&op, "discard", b.id.as_str(), &here, "Discard", true))
                                }
                            }
                        }
                    }
                }
                (layout::pager(batches.next_cursor.map(|c| html! {
                    a href=(layout::link("/ui/dead", &[("batches", &c), ("jobs", &q.jobs)])) { "Older dead batches →" }
                })))
            }
            h2 { "Dead jobs" }
            @if jobs.items.is_empty() {
                (layout::empty("No dead job. Webhooks, reports and emails land here after their last attempt."))
            } @else {
                (bulk(&op, "bulk-jobs", &here))
                table {
                    thead { tr { th {} th { "Job" } th { "Kind" } th { "Batch" } th.num { "Attempts" } th { "Last error" } th { "Created" } th {} } }
                    tbody {
                        @for j in &jobs.items {
                            tr data-job=(j.id) {
                                td { (tick("bulk-jobs", j.id.as_str())) }
                                td.mono { (j.id) }
                                td { (j.kind) }
                                td.mono { a href={ "/ui/batches/" (j.batch_id) } { (j.batch_id) } }
                                td.num { (j.attempts) " / " (j.max_attempts) }
                                td.error-text { (j.last_error.as_deref().unwrap_or("")) }
                                td { (layout::time(&j.created_at)) }
                                td {
                                    (layout::action_button(&op, "retry", j.id.as_str(), &here, "Retry", false))
                                    (layout::action_button(&op, "discard", j.id.as_str(), &here, "Discard", true))
                                }
                            }
                        }
                    }
                }
                (layout::pager(jobs.next_cursor.map(|c| html! {
                    a href=(layout::link("/ui/dead", &[("batches", &q.batches), ("jobs", &c)])) { "Older dead jobs →" }
                })))
            }
        }))
    };
    Ok(layout::page(&op, Nav::Dead, "Dead letters", &notice, body))
}

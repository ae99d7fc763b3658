//! `/ui/workers`: the live worker registry, with a drain button per worker.

use axum::Extension;
use axum::extract::State;
use maud::{Markup, html};

use super::layout::{self, Nav, Notice};
use super::session::Operator;
use crate::error::ApiResult;
use crate::state::AppState;

pub async fn page(
    State(state): State<AppState>,
    Extension(op): Extension<Operator>,
    notice: Notice,
) -> ApiResult<Markup> {
    let workers = state.backends.fleet.list().await?;
    let body = html! {
        (layout::live("workers", html! {
            p.lead { "Worker processes beating their heartbeat. Draining one lets it finish or hand back what it holds, then it exits." }
            @if workers.is_empty() {
                (layout::empty("No worker is running. Start one with `dataflow worker` (or `dataflow` for everything in one process)."))
            } @else {
                table {
                    thead { tr { th { "Worker" } th { "Host" } th.num { "PID" } th { "Version" } th { "Started" } th { "Heartbeat" } th.num { "In flight" } th.num { "Processed" } th { "State" } th {} } }
                    tbody {
                        @for w in &workers {
                            tr data-worker=(w.id) {
                                td.mono { (w.id) }
                                td { (w.host) }
                                td.num { (w.pid) }
                                td { (w.version) }
                                td { (layout::time(&w.started_at)) }
                                td { (layout::time(&w.heartbeat_at)) }
                                td.num { (w.in_flight) }
                                td.num { (w.processed) }
                                td {
                                    @if w.draining { (layout::status("draining")) } @else { (layout::status("active")) }
                                    // The leader runs the job sweeper and writes the daily summaries.
                                    @if w.leader { " " (layout::status("leader")) }
                                }
                                td { @if !w.draining { (layout::action_button(&op, "drain", &w.id, "/ui/workers", "Drain", true)) } }
                            }
                        }
                    }
                }
            }
        }))
    };
    Ok(layout::page(&op, Nav::Workers, "Workers", &notice, body))
}

//! `/ui/queues`: every queue by state with its oldest entry, the batch queue per client,
//! and the jobs by kind.

use axum::Extension;
use axum::extract::State;
use dataflow_contracts::http::QueueDepth;
use dataflow_platform::ledger::ClientQueue;
use maud::{Markup, html};

use super::layout::{self, Nav, Notice};
use super::session::Operator;
use crate::error::ApiResult;
use crate::state::AppState;

/// Every queue by state with its count and oldest entry (also on the overview).
pub(super) fn depth_table(depths: &[QueueDepth]) -> Markup {
    html! {
        @if depths.is_empty() {
            (layout::empty("Every queue is empty."))
        } @else {
            table {
                thead { tr { th { "Queue" } th { "State" } th.num { "Count" } th.num { "Oldest waiting" } } }
                tbody {
                    @for d in depths {
                        tr data-queue=(d.queue) data-state=(d.state) {
                            td { (d.queue) }
                            td { (layout::status(&d.state)) }
                            td.num { (d.count) }
                            td.num { (d.oldest_age_ms.map(layout::age).unwrap_or_default()) }
                        }
                    }
                }
            }
        }
    }
}

/// The batch queue per client: how deep, how old its oldest, and its fair-share policy.
fn client_table(clients: &[ClientQueue]) -> Markup {
    html! {
        @if clients.is_empty() {
            (layout::empty("No client has a batch waiting or running."))
        } @else {
            table {
                thead { tr {
                    th { "Client" } th.num { "Ready" } th.num { "Processing" }
                    th.num { "Cap" } th.num { "Weight" } th.num { "Oldest waiting" }
                } }
                tbody {
                    @for c in clients {
                        tr data-client=(c.client_id) data-ready=(c.ready) data-processing=(c.processing) {
                            td { a href={ "/ui/batches?client=" (c.client_id) } { (c.name) } }
                            td.num { (c.ready) }
                            td.num { (c.processing) }
                            td.num { (c.max_concurrent_batches.map(|n| n.to_string()).unwrap_or_else(|| "none".into())) }
                            td.num { (c.weight) }
                            td.num { (c.oldest_ready_age_ms.map(layout::age).unwrap_or_default()) }
                        }
                    }
                }
            }
        }
    }
}

pub async fn page(
    State(state): State<AppState>,
    Extension(op): Extension<Operator>,
    notice: Notice,
) -> ApiResult<Markup> {
    let depths = state.backends.db.queue_depths().await?;
    let clients = state.backends.db.client_queues().await?;
    let jobs = state.backends.db.job_counts().await?;
    let body = html! {
        (layout::live("queues", html! {
            p.lead { "Unfinished batches, the unpublished outbox and unfinished or dead jobs; empty states are left out." }
            (depth_table(&depths))
            h2 { "Batches by client" }
            p { "Workers take turns between these clients (by weight), up to each one's cap." }
            (client_table(&clients))
            h2 { "Jobs by kind and status" }
            @if jobs.is_empty() {
                (layout::empty("No jobs yet: webhooks, reports and emails appear here once batches finish."))
            } @else {
                table {
                    thead { tr { th { "Kind" } th { "Status" } th.num { "Count" } } }
                    tbody {
                        @for j in &jobs {
                            tr { td { (j.kind) } td { (layout::status(&j.status.to_string())) } td.num { (j.count) } }
                        }
                    }
                }
            }
        }))
    };
    Ok(layout::page(&op, Nav::Queues, "Queues", &notice, body))
}

//! `/ui`: what the system is doing now — throughput and latency over the last five
//! minutes and hour, what waits in each queue, how events reach workers, the fleet's
//! charts over the last hour and day, and a feed of live updates.

use std::time::Duration;

use axum::Extension;
use axum::extract::State;
use dataflow_platform::ledger::Throughput;
use maud::{Markup, html};

use super::layout::{self, Nav, Notice};
use super::session::Operator;
use crate::error::ApiResult;
use crate::state::AppState;

const MINUTE_MS: i64 = 60_000;

fn latency(ms: Option<u64>) -> String {
    ms.map_or_else(|| "—".to_owned(), layout::age)
}

fn throughput_card(title: &str, minutes: i64, t: &Throughput) -> Markup {
    let per_minute = t.records_written / u64::try_from(minutes).unwrap_or(1).max(1);
    html! {
        div.card {
            h2 { (title) }
            dl {
                dt { "Batches completed" } dd.big { (t.completed) }
                dt { "Records written" } dd { (t.records_written) " (" (per_minute) "/min)" }
                dt { "Records rejected" } dd { (t.records_failed) }
                dt { "Batches gone dead" } dd.refused[t.dead > 0] { (t.dead) }
                dt { "Latency p50 / p95 / max" } dd { (latency(t.latency_p50_ms)) " / " (latency(t.latency_p95_ms)) " / " (latency(t.latency_max_ms)) }
            }
        }
    }
}

pub async fn page(
    State(state): State<AppState>,
    Extension(op): Extension<Operator>,
    notice: Notice,
) -> ApiResult<Markup> {
    let b = &state.backends;
    let recent = b.db.throughput(5 * MINUTE_MS).await?;
    let hour = b.db.throughput(60 * MINUTE_MS).await?;
    let depths = b.db.queue_depths().await?;
    let charts = super::charts::section(&b.db, None).await?;
    let workers = b.fleet.list().await?;
    let mode = b.mode.borrow().as_str();
    let redis = match &b.redis {
        Some(r) => match tokio::time::timeout(Duration::from_secs(1), r.ping()).await {
            Ok(Ok(())) => "up",
            _ => "down",
        },
        None => "not configured",
    };
    let waiting: u64 = depths
        .iter()
        .filter(|d| d.queue == "batches" && d.state != "dead")
        .map(|d| d.count)
        .sum();
    let body = html! {
        (layout::live("overview-cards", html! {
            div.cards {
                (throughput_card("Last 5 minutes", 5, &recent))
                (throughput_card("Last hour", 60, &hour))
                div.card {
                    h2 { "Now" }
                    dl {
                        dt { "Batches waiting or running" } dd.big { (waiting) }
                        dt { "Workers" } dd { (workers.len()) }
                        dt { "Events mode" } dd { span class={ "badge mode-" (mode) } { (mode) } }
                        dt { "Redis" } dd { (redis) }
                    }
                }
            }
            h2 { "Queue depth" }
            (super::queues::depth_table(&depths))
        }))
        h2 { "Charts" }
        (layout::live("charts", charts))
        section.feed {
            h2 { "Live updates" }
            ol #feed { li.empty { "Waiting for changes… (this list fills while the page is open)" } }
        }
    };
    Ok(layout::page(&op, Nav::Overview, "Overview", &notice, body))
}

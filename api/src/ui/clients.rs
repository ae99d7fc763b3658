//! `/ui/clients`: every client with its policy, keys and the storage it holds in the
//! ledger, and the rate-limit refusals this process made recently (a bounded in-memory ring: see [`crate::ratelimit::Rejections`]).
//! `/ui/clients/{id}`: one client's charts, its policy and what it holds.

use std::collections::HashMap;

use axum::Extension;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use dataflow_contracts::ClientId;
use dataflow_contracts::time::{now_ms, rfc3339};
use dataflow_platform::ledger::{ClientRecord, ClientStorage, human_bytes};
use maud::{Markup, html};
use serde::Deserialize;

use super::layout::{self, Nav, Notice};
use super::session::Operator;
use crate::error::{ApiError, ApiResult};
use crate::routes::{parse_path_id, query};
use crate::state::AppState;

const PAGE: usize = 25;

#[derive(Deserialize, Default)]
pub struct ClientsQuery {
    page: Option<usize>,
}

/// Payloads kept for their retention, uploads not yet finished, records.
fn storage(s: Option<&ClientStorage>) -> Markup {
    let Some(s) = s else {
        return html! { span.muted { "none" } };
    };
    html! {
        ul.storage data-payload-bytes=(s.payload_bytes) data-upload-bytes=(s.upload_bytes) data-records=(s.records) {
            li { (human_bytes(s.payload_bytes)) " payloads" }
            li { (human_bytes(s.upload_bytes)) " unfinished uploads" }
            li { (s.records) " records" }
        }
    }
}

fn policy(c: &ClientRecord) -> Markup {
    let p = &c.policy;
    html! {
        ul.policy {
            li { "rate " (p.rate_per_minute) "/min, burst " (p.rate_burst) }
            li { "quota " @match p.daily_record_quota { Some(q) => { (q) " records/day" }, None => "none" } }
            li { "max " (p.max_records) " records, " (p.max_payload_bytes) " bytes" }
            li { "payloads kept " (layout::age(p.payload_retention_secs.saturating_mul(1000))) }
            @if p.approval_required { li { "approval required" } }
            @if !p.required_fields.is_empty() { li { "requires " (p.required_fields.join(", ")) } }
            @if p.webhook_url.is_some() { li { "webhook on" } }
            @if p.notify_email.is_some() { li { "email on" } }
        }
    }
}

pub async fn page(
    State(state): State<AppState>,
    Extension(op): Extension<Operator>,
    notice: Notice,
    q: Result<Query<ClientsQuery>, QueryRejection>,
) -> ApiResult<Markup> {
    let q = query(q)?;
    let db = &state.backends.db;
    let clients = db.list_clients().await?;
    let page = q.page.unwrap_or(0);
    let shown: Vec<&ClientRecord> = clients
        .iter()
        .skip(page.saturating_mul(PAGE))
        .take(PAGE)
        .collect();
    let mut keys = Vec::with_capacity(shown.len());
    for c in &shown {
        keys.push(db.list_keys(&c.id).await?);
    }
    let stored: HashMap<String, ClientStorage> = db
        .storage_by_client()
        .await?
        .into_iter()
        .map(|s| (s.client_id.to_string(), s))
        .collect();
    let names: HashMap<String, &str> = clients
        .iter()
        .map(|c| (format!("client:{}", c.id), c.name.as_str()))
        .collect();
    let rejections = state.rejections.recent();
    let now = now_ms();
    let more = clients.len() > (page + 1) * PAGE;
    let body = html! {
        (layout::live("clients", html! {
            @if shown.is_empty() {
                (layout::empty("No client yet. Create one with `dataflow clients create NAME` or POST /admin/clients."))
            } @else {
                table {
                    thead { tr { th { "Client" } th { "State" } th { "Policy" } th { "Schema" } th { "Keys" } th { "Storage" } th { "Created" } th { "" } } }
                    tbody {
                        @for (c, ks) in shown.iter().zip(&keys) {
                            tr data-client=(c.id) {
                                td { a href=(format!("/ui/clients/{}", c.id)) { strong { (c.name) } } br; span.mono.muted { (c.id) } }
                                td { @if c.active { (layout::status("active")) } @else { (layout::status("inactive")) } }
                                td { (policy(c)) }
                                td {
                                    a href=(format!("/ui/clients/{}/schema", c.id)) {
                                        @match &c.schema { Some(s) => { "version " (s.version) }, None => { "none" } }
                                    }
                                }
                                td {
                                    @if ks.is_empty() { span.muted { "no key" } }
                                    ul.keys {
                                        @for k in ks {
                                            li.revoked[k.revoked_at.is_some()] {
                                                span.mono { (k.key_id) }
                                                @if let Some(l) = &k.label { " " span.muted { (l) } }
                                                @if k.revoked_at.is_some() { " (revoked)" }
                                                @else if let Some(used) = &k.last_used_at { " · used " (layout::time(used)) }
                                                @else { " · never used" }
                                            }
                                        }
                                    }
                                }
                                td { (storage(stored.get(c.id.as_str()))) }
                                td { (layout::time(&rfc3339(c.created_at))) }
                                td { (layout::action_button(&op, "purge", c.id.as_str(), "/ui/clients", "Purge data", true)) }
                            }
                        }
                    }
                }
                nav.pager {
                    @if page > 0 { a href=(layout::link("/ui/clients", &[("page", &(page - 1).to_string())])) { "← Previous" } " " }
                    @if more { a href=(layout::link("/ui/clients", &[("page", &(page + 1).to_string())])) { "Next →" } }
                }
            }
            h2 { "Recent rate-limit refusals" }
            p.lead { "The last " (rejections.len()) " refusals this API process made (kept in memory, per process; the fleet-wide counts are in dataflow_ratelimit_decisions_total)." }
            @if rejections.is_empty() {
                (layout::empty("No request was refused for its rate."))
            } @else {
                table {
                    thead { tr { th { "When" } th { "Who" } th.num { "Retry after" } } }
                    tbody {
                        @for r in &rejections {
                            tr {
                                td { (layout::age(u64::try_from(now - r.at_ms).unwrap_or(0))) " ago" }
                                td {
                                    @match names.get(&r.subject) {
                                        Some(name) => { (name) " " span.mono.muted { (r.subject) } },
                                        None => span.mono { (r.subject) },
                                    }
                                }
                                td.num { (layout::age(r.retry_after_ms)) }
                            }
                        }
                    }
                }
            }
        }))
    };
    Ok(layout::page(&op, Nav::Clients, "Clients", &notice, body))
}

pub async fn detail(
    State(state): State<AppState>,
    Extension(op): Extension<Operator>,
    Path(id): Path<String>,
    notice: Notice,
) -> ApiResult<Markup> {
    let id: ClientId = parse_path_id(&id)?;
    let db = &state.backends.db;
    let client = db.get_client(&id).await?.ok_or_else(ApiError::not_found)?;
    let charts = super::charts::section(db, Some(&id)).await?;
    let stored = db.storage_of(&id).await?;
    let body = html! {
        p.lead {
            "Client " span.mono.muted { (client.id) } ", created " (layout::time(&rfc3339(client.created_at))) ". "
            a href=(layout::link("/ui/batches", &[("client", id.as_str())])) { "Its batches" } " · "
            a href=(format!("/ui/clients/{id}/schema")) { "its schema" }
        }
        div.cards {
            div.card {
                h2 { "State" }
                @if client.active { (layout::status("active")) } @else { (layout::status("inactive")) }
            }
            div.card { h2 { "Policy" } (policy(&client)) }
            div.card { h2 { "Storage" } (storage(stored.as_ref())) }
        }
        h2 { "Charts" }
        (layout::live("charts", charts))
    };
    Ok(layout::page(&op, Nav::Clients, &client.name, &notice, body))
}

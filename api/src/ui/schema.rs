//! `/ui/clients/{id}/schema`: a client's schema as operators read it — its fields with
//! their types, formats, constraints and aliases, its key and its error threshold — and
//! every version it had (`?version=N` shows an older one).

use axum::Extension;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use dataflow_contracts::ClientId;
use dataflow_contracts::http::SchemaView;
use maud::{Markup, html};
use serde::Deserialize;
use serde_json::Value;

use super::layout::{self, Nav, Notice};
use super::session::Operator;
use crate::error::{ApiError, ApiResult};
use crate::routes::{parse_path_id, query};
use crate::state::AppState;

#[derive(Deserialize, Default)]
pub struct SchemaPageQuery {
    version: Option<u64>,
}

pub async fn page(
    State(state): State<AppState>,
    Extension(op): Extension<Operator>,
    Path(id): Path<String>,
    notice: Notice,
    q: Result<Query<SchemaPageQuery>, QueryRejection>,
) -> ApiResult<Markup> {
    let q = query(q)?;
    let id: ClientId = parse_path_id(&id)?;
    let db = &state.backends.db;
    let client = db.get_client(&id).await?.ok_or_else(ApiError::not_found)?;
    let versions = db.schema_versions(&id).await?;
    let shown = match q.version {
        Some(v) => Some(
            versions
                .iter()
                .find(|s| s.version == v)
                .ok_or_else(ApiError::not_found)?,
        ),
        None => versions.iter().find(|s| s.current),
    };
    let here = format!("/ui/clients/{id}/schema");
    let body = html! {
        p.lead {
            "Client " strong { (client.name) } " " span.mono.muted { (client.id) } ". "
            @match &client.schema {
                Some(s) => { "Imports are checked with version " (s.version) "." },
                None => { "No schema: records are stored as they come, checked for the policy's key field `" (client.policy.key_field) "`." },
            }
        }
        @match shown {
            Some(s) => { (fields(s)) },
            None => { (layout::empty("Set one with `dataflow schema set CLIENT FILE` or PUT /admin/clients/{id}/schema (a Frictionless Table Schema).")) },
        }
        @if !versions.is_empty() {
            h2 { "Versions" }
            table {
                thead { tr { th.num { "Version" } th { "Set" } th { "" } } }
                tbody {
                    @for v in &versions {
                        tr.selected[shown.is_some_and(|s| s.version == v.version)] {
                            td.num { a href=(layout::link(&here, &[("version", &v.version.to_string())])) { (v.version) } }
                            td { (layout::time(&v.created_at)) }
                            td { @if v.current { (layout::status("current")) } }
                        }
                    }
                }
            }
        }
    };
    let title = format!("Schema of {}", client.name);
    Ok(layout::page(&op, Nav::Clients, &title, &notice, body))
}

/// One version's fields, key and threshold, read from the document as it was set.
fn fields(s: &SchemaView) -> Markup {
    let doc = &s.schema;
    let text = |v: &Value| match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let list = |v: Option<&Value>| match v {
        Some(Value::Array(items)) => items.iter().map(text).collect::<Vec<_>>().join(", "),
        Some(other) => text(other),
        None => String::new(),
    };
    let none = Vec::new();
    let field_docs = doc["fields"].as_array().unwrap_or(&none);
    html! {
        h2 { "Version " (s.version) @if s.current { " (current)" } }
        dl {
            dt { "Key" } dd.mono { @match doc.get("primaryKey") { Some(k) => { (list(Some(k))) }, None => { "the policy's key field" } } }
            dt { "Unknown columns" } dd { (doc.get("unknownFields").map(text).unwrap_or_else(|| "reject".into())) }
            dt { "Error threshold" } dd {
                @match doc.get("maxErrorRatio").and_then(Value::as_f64) {
                    Some(r) => { "a batch with more than " (r * 100.0) " % of its records refused writes none" },
                    None => { "none in the schema (the policy's applies)" },
                }
            }
        }
        table {
            thead { tr { th { "Field" } th { "Type" } th { "Format" } th { "Constraints" } th { "Aliases" } th { "Transforms" } } }
            tbody {
                @for f in field_docs {
                    tr {
                        td.mono { (f.get("name").map(text).unwrap_or_default()) }
                        td { (f.get("type").map(text).unwrap_or_else(|| "string".into())) }
                        td { (f.get("format").map(text).unwrap_or_default()) }
                        td.mono {
                            @if let Some(Value::Object(c)) = f.get("constraints") {
                                @for (name, value) in c { (name) " " (text(value)) br; }
                            }
                        }
                        td { (list(f.get("aliases"))) }
                        td { (list(f.get("transforms"))) }
                    }
                }
            }
        }
    }
}

//! The one endpoint every dashboard form posts to (`POST /ui/actions`), and the action log
//! page. Each action on each target runs the same code as its `/admin` JSON route and is
//! written to the action log with its outcome, refused ones included.

use axum::Extension;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Redirect, Response};
use dataflow_contracts::{ClientId, JobId};
use dataflow_platform::ledger::BatchAction;
use maud::{Markup, html};
use serde::Deserialize;

use super::csrf::Verified;
use super::form::FormData;
use super::layout::{self, Nav, Notice};
use super::session::Operator;
use crate::error::{ApiError, ApiResult};
use crate::routes::admin::{checked_reason, transition};
use crate::routes::query;
use crate::state::AppState;

/// Targets one post may name (a page of dead letters, with room).
const MAX_TARGETS: usize = 500;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Approve,
    Reject,
    Retry,
    Discard,
    Drain,
    Purge,
}

impl Action {
    pub fn parse(s: &str) -> Option<Action> {
        Some(match s {
            "approve" => Action::Approve,
            "reject" => Action::Reject,
            "retry" => Action::Retry,
            "discard" => Action::Discard,
            "drain" => Action::Drain,
            "purge" => Action::Purge,
            _ => return None,
        })
    }

    pub fn verb(self) -> &'static str {
        match self {
            Action::Approve => "approve",
            Action::Reject => "reject",
            Action::Retry => "retry",
            Action::Discard => "discard",
            Action::Drain => "drain",
            Action::Purge => "purge",
        }
    }
}

/// One action on one target, as it will run.
enum Step {
    Batch(BatchAction),
    RetryJob(JobId),
    DiscardJob(JobId),
    Drain,
    /// Removes a client's data from the ledger.
    Purge(ClientId),
}

impl Step {
    /// What `action` on `target` means, or why it means nothing. `reason` gives the
    /// reason a reject or discard records.
    fn plan(
        action: Action,
        target: &str,
        reason: impl FnOnce() -> ApiResult<String>,
    ) -> ApiResult<Step> {
        let kind = target.split_once('_').map(|(prefix, _)| prefix);
        let job = || target.parse::<JobId>().map_err(|_| ApiError::not_found());
        Ok(match (action, kind) {
            (Action::Drain, _) => Step::Drain,
            (Action::Approve, Some("bat")) => Step::Batch(BatchAction::Approve),
            (Action::Retry, Some("bat")) => Step::Batch(BatchAction::Retry),
            (Action::Reject, Some("bat")) => Step::Batch(BatchAction::Reject { reason: reason()? }),
            (Action::Discard, Some("bat")) => {
                Step::Batch(BatchAction::Discard { reason: reason()? })
            }
            (Action::Retry, Some("job")) => Step::RetryJob(job()?),
            (Action::Discard, Some("job")) => Step::DiscardJob(job()?),
            (Action::Purge, Some("cli")) => {
                Step::Purge(target.parse().map_err(|_| ApiError::not_found())?)
            }
            _ => {
                return Err(ApiError::bad_request(
                    "invalid_target",
                    format!(
                        "cannot {} {target:?}: batches are approved, rejected, retried or discarded, jobs retried or discarded, clients purged",
                        action.verb()
                    ),
                ));
            }
        })
    }

    /// The name the action log records, such as `batch.retry`.
    fn name(&self, action: Action) -> String {
        let noun = match self {
            Step::Batch(_) => "batch",
            Step::RetryJob(_) | Step::DiscardJob(_) => "job",
            Step::Drain => "worker",
            Step::Purge(_) => "client",
        };
        format!("{noun}.{}", action.verb())
    }

    /// Runs through the same code as the `/admin` route of the action; what it did, where
    /// the log should say more than "ok".
    async fn run(self, state: &AppState, target: &str) -> ApiResult<Option<String>> {
        let db = &state.backends.db;
        match self {
            Step::Batch(a) => transition(state.clone(), target.to_owned(), a)
                .await
                .map(|_| None),
            Step::RetryJob(id) => Ok(db.retry_job(&id).await.map(|_| None)?),
            Step::DiscardJob(id) => Ok(db.discard_job(&id).await.map(|_| None)?),
            Step::Drain => match state.backends.fleet.request_drain(target).await? {
                true => Ok(None),
                false => Err(ApiError::not_found()),
            },
            Step::Purge(client) => Ok(Some(db.purge_client(&client).await?.to_string())),
        }
    }
}

/// Runs `action` on one target; the name the log records it under, and the outcome.
async fn run(
    state: &AppState,
    op: &Operator,
    action: Action,
    target: &str,
    reason: Option<&str>,
) -> (String, ApiResult<Option<String>>) {
    let reason = || {
        let given = reason.map(str::trim).filter(|r| !r.is_empty());
        let default = || {
            format!(
                "{} from the dashboard by {}",
                action.verb(),
                op.session.operator
            )
        };
        checked_reason(given.map_or_else(default, str::to_owned))
    };
    match Step::plan(action, target, reason) {
        Ok(step) => {
            let name = step.name(action);
            (name, step.run(state, target).await)
        }
        Err(e) => (action.verb().to_owned(), Err(e)),
    }
}

/// Where to go after the action: a dashboard path from the form, else the overview.
fn back(form: &FormData) -> &str {
    form.get("back")
        .filter(|b| b.starts_with("/ui") && !b.starts_with("//") && !b.contains(['\\', '\r', '\n']))
        .unwrap_or("/ui")
}

pub async fn perform(
    State(state): State<AppState>,
    Extension(op): Extension<Operator>,
    Verified(form): Verified,
) -> ApiResult<Response> {
    let action = form
        .get("action")
        .and_then(Action::parse)
        .ok_or_else(|| ApiError::bad_request("invalid_action", "unknown action"))?;
    let targets: Vec<&str> = form.all("target").collect();
    if targets.is_empty() {
        return Err(ApiError::bad_request(
            "no_target",
            "select at least one row first",
        ));
    }
    if targets.len() > MAX_TARGETS {
        return Err(ApiError::bad_request(
            "too_many_targets",
            format!("at most {MAX_TARGETS} at once"),
        ));
    }
    let (mut ok, mut refused) = (0u32, 0u32);
    for target in targets {
        let (name, result) = run(&state, &op, action, target, form.get("reason")).await;
        let outcome = match &result {
            Ok(None) => "ok".to_owned(),
            Ok(Some(what)) => format!("ok: {what}"),
            Err(e) => format!("refused: {}", e.detail),
        };
        op.record(&state, &name, target, &outcome).await?;
        match result {
            Ok(_) => ok += 1,
            Err(_) => refused += 1,
        }
    }
    let back = back(&form);
    let sep = if back.contains('?') { '&' } else { '?' };
    let to = format!(
        "{back}{sep}done={}&ok={ok}&refused={refused}",
        action.verb()
    );
    Ok(Redirect::to(&to).into_response())
}

#[derive(Deserialize)]
pub struct LogQuery {
    cursor: Option<i64>,
}

pub async fn log(
    State(state): State<AppState>,
    Extension(op): Extension<Operator>,
    notice: Notice,
    q: Result<Query<LogQuery>, QueryRejection>,
) -> ApiResult<Markup> {
    let q = query(q)?;
    let (entries, next) = state.backends.db.list_actions(q.cursor, 50).await?;
    let body = html! {
        p.lead { "Every login, logout and dashboard action, newest first, with who did it and how it ended." }
        @if entries.is_empty() {
            (layout::empty("Nothing yet: actions taken on the dashboard appear here."))
        } @else {
            table {
                thead { tr { th { "Time" } th { "Operator" } th { "Session" } th { "Action" } th { "Target" } th { "Outcome" } th { "IP" } } }
                tbody {
                    @for a in &entries {
                        tr {
                            td { (layout::time(&a.at)) }
                            td { (a.operator) }
                            td.mono { (a.session) }
                            td { (a.action) }
                            td.mono { (a.target) }
                            td.refused[a.outcome != "ok"] { (a.outcome) }
                            td.mono { (a.ip) }
                        }
                    }
                }
            }
            (layout::pager(next.map(|c| html! { a href=(layout::link("/ui/actions", &[("cursor", &c)])) { "Older entries →" } })))
        }
    };
    Ok(layout::page(&op, Nav::Actions, "Action log", &notice, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_dashboard_paths_are_followed_back() {
        let back_of = |b: &str| back(&FormData::parse(format!("back={b}").as_bytes())).to_owned();
        assert_eq!(back_of("/ui/dead"), "/ui/dead");
        assert_eq!(back_of("https://evil.example"), "/ui");
        assert_eq!(back_of("//evil.example"), "/ui");
        assert_eq!(back_of("/admin"), "/ui");
    }

    #[test]
    fn action_names_round_trip() {
        for a in [
            Action::Approve,
            Action::Reject,
            Action::Retry,
            Action::Discard,
            Action::Drain,
        ] {
            assert_eq!(Action::parse(a.verb()), Some(a));
        }
        assert_eq!(Action::parse("delete"), None);
    }
}

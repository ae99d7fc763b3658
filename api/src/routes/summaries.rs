//! The daily per-client summaries the fleet leader writes after each UTC day:
//! `GET /v1/summaries` for the caller's client, `GET /admin/clients/{id}/summaries` for
//! operators. Newest day first; `?day=YYYY-MM-DD` picks one, `?limit=` (1–500, 50).

use axum::extract::rejection::QueryRejection;
use axum::extract::{Extension, Path, Query, State};
use axum::routing::get;
use axum::{Json, Router};
use dataflow_contracts::ClientId;
use dataflow_contracts::http::DailySummary;
use serde::Deserialize;

use super::{admin, page_limit, query};
use crate::auth::Principal;
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;

/// `/v1` routes.
pub fn router() -> Router<AppState> {
    Router::new().route("/summaries", get(own))
}

/// `/admin` routes.
pub fn admin_router() -> Router<AppState> {
    Router::new().route("/clients/{id}/summaries", get(of_client))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SummaryQuery {
    day: Option<String>,
    limit: Option<u32>,
}

async fn own(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    q: Result<Query<SummaryQuery>, QueryRejection>,
) -> ApiResult<Json<Vec<DailySummary>>> {
    list(&state, &p.client.id, query(q)?).await
}

async fn of_client(
    State(state): State<AppState>,
    Path(id): Path<String>,
    q: Result<Query<SummaryQuery>, QueryRejection>,
) -> ApiResult<Json<Vec<DailySummary>>> {
    let client = admin::load_client(&state, &id).await?;
    list(&state, &client.id, query(q)?).await
}

async fn list(
    state: &AppState,
    client: &ClientId,
    q: SummaryQuery,
) -> ApiResult<Json<Vec<DailySummary>>> {
    let limit = page_limit(q.limit)?;
    if let Some(day) = &q.day
        && !is_day(day)
    {
        return Err(ApiError::bad_request(
            "invalid_day",
            "day must be a date as YYYY-MM-DD",
        ));
    }
    let summaries = state
        .backends
        .db
        .list_daily_summaries(client, q.day.as_deref(), limit)
        .await?;
    Ok(Json(summaries))
}

/// `YYYY-MM-DD` with a plausible month and day (the lookup is by exact key, so this only
/// turns typos into a 400 instead of an empty list).
fn is_day(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    let num = |p: &str, len: usize, max: u32| {
        p.len() == len
            && p.bytes().all(|b| b.is_ascii_digit())
            && p.parse::<u32>().is_ok_and(|n| (1..=max).contains(&n))
    };
    matches!(parts.as_slice(), [y, m, d] if num(y, 4, 9999) && num(m, 2, 12) && num(d, 2, 31))
}

#[cfg(test)]
mod tests {
    use super::is_day;

    #[test]
    fn days_are_checked() {
        assert!(is_day("2026-12-01"));
        for bad in [
            "2026-13-01",
            "2026-12-00",
            "26-12-01",
            "2026-1-01",
            "2026-12-01x",
            "",
        ] {
            assert!(!is_day(bad), "{bad}");
        }
    }
}

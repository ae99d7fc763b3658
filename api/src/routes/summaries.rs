//! The daily per-client summaries the fleet leader writes after each UTC day:
//! `GET /v1/summaries` for the caller's client, `GET /admin/clients/{id}/summaries` for
//! operators. Newest day first; `?day=YYYY-MM-DD` picks one, `?limit=` (1–500, 50).

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use dataflow_contracts::ClientId;
use dataflow_contracts::http::{DailySummary, ErrorBody, SummaryQuery};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{PathParam, admin, page_limit, query};
use crate::auth::Principal;
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;

/// `/v1` routes.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(own))
}

/// `/admin` routes.
pub fn admin_router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(of_client))
}

/// The caller's daily summaries, newest day first.
#[utoipa::path(
    get,
    path = "/summaries",
    operation_id = "list_summaries",
    tag = "client",
    params(SummaryQuery),
    responses(
        (status = 200, description = "Summaries of ended UTC days", body = Vec<DailySummary>),
        (status = 400, description = "A malformed day or a limit out of range", body = ErrorBody),
    ),
)]
async fn own(
    State(state): State<AppState>,
    p: Principal,
    q: Result<Query<SummaryQuery>, QueryRejection>,
) -> ApiResult<Json<Vec<DailySummary>>> {
    list(&state, &p.client.id, query(q)?).await
}

/// A client's daily summaries, newest day first.
#[utoipa::path(
    get,
    path = "/clients/{id}/summaries",
    operation_id = "list_client_summaries",
    tag = "admin",
    params(("id" = ClientId, Path, description = "The client's id"), SummaryQuery),
    responses(
        (status = 200, description = "Summaries of ended UTC days", body = Vec<DailySummary>),
        (status = 400, description = "A malformed day or a limit out of range", body = ErrorBody),
        (status = 404, description = "No such client", body = ErrorBody),
    ),
)]
async fn of_client(
    State(state): State<AppState>,
    PathParam(id): PathParam,
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

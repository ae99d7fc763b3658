//! `GET /metrics`: Prometheus text for this process, with the queue gauges refreshed from
//! the ledger on each scrape. Open like `/healthz`, so a scraper needs no credentials.

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::state::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(render))
}

/// Prometheus text exposition of this process's metrics.
#[utoipa::path(
    get,
    path = "/metrics",
    operation_id = "metrics",
    tag = "operations",
    responses((status = 200, description = "Prometheus text format 0.0.4", body = String,
               content_type = "text/plain; version=0.0.4; charset=utf-8")),
)]
async fn render(State(state): State<AppState>) -> impl IntoResponse {
    let body = dataflow_platform::telemetry::render(&state.backends).await;
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
}

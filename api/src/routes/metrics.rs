//! `GET /metrics`: Prometheus text for this process, with the queue gauges refreshed from
//! the ledger on each scrape. Open like `/healthz`, so a scraper needs no credentials.

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

use crate::state::AppState;

pub fn router() -> Router<AppState> {
    Router::new().route("/metrics", get(render))
}

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

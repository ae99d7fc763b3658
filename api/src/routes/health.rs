//! `GET /healthz` (the process answers) and `GET /readyz` (the ledger answers).

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Value, json};

use crate::state::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
}

async fn ready(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    match state.backends.db.ping().await {
        Ok(()) => (
            StatusCode::OK,
            Json(json!({"status": "ready", "ledger": "up"})),
        ),
        Err(e) => {
            tracing::warn!(error = %e, "readiness: ledger unreachable");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({"status": "unavailable", "ledger": "down"})),
            )
        }
    }
}

//! `GET /healthz` (the process answers) and `GET /readyz` (the ledger answers; Redis, the
//! events mode (`embedded`, `broker`, or `polling` while RabbitMQ is unreachable), the outbox
//! backlog and the fallbacks in use are reported, but only a missing ledger makes it 503).

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
    let b = &state.backends;
    let redis = match &b.redis {
        None => "embedded",
        Some(r) if r.ping().await.is_ok() => "up",
        Some(_) => "down",
    };
    let fallbacks = json!({"limiter": b.limiter.fallbacks(), "lockout": b.lockout.fallbacks()});
    let events = json!({
        "mode": b.mode.borrow().as_str(),
        "outbox_backlog": b.db.outbox_backlog().await.ok(),
    });
    let ledger = b.db.ping().await;
    let status = if ledger.is_ok() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    if let Err(e) = &ledger {
        tracing::warn!(error = %e, "readiness: ledger unreachable");
    }
    let body = json!({
        "status": if ledger.is_ok() { "ready" } else { "unavailable" },
        "ledger": if ledger.is_ok() { "up" } else { "down" },
        "redis": redis,
        "events": events,
        "fallbacks": fallbacks,
    });
    (status, Json(body))
}

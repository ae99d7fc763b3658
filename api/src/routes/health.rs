//! `GET /healthz` (the process answers) and `GET /readyz` (the ledger answers; Redis, the
//! events mode (`embedded`, `broker`, or `polling` while RabbitMQ is unreachable) and the
//! RabbitMQ node the link is up to, the outbox backlog and the fallbacks in use are
//! reported, but only a missing ledger makes it 503).

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use dataflow_contracts::http::{EventsReadiness, FallbackCounts, Readiness};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::state::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(alive))
        .routes(routes!(ready))
}

/// The process answers.
#[utoipa::path(
    get,
    path = "/healthz",
    operation_id = "healthz",
    tag = "operations",
    responses((status = 200, description = "`ok`", body = String, content_type = "text/plain")),
)]
async fn alive() -> &'static str {
    "ok"
}

/// The ledger answers; the other parts are reported.
#[utoipa::path(
    get,
    path = "/readyz",
    operation_id = "readyz",
    tag = "operations",
    responses(
        (status = 200, description = "Ready: the ledger answers", body = Readiness),
        (status = 503, description = "The ledger does not answer", body = Readiness),
    ),
)]
async fn ready(State(state): State<AppState>) -> (StatusCode, Json<Readiness>) {
    let b = &state.backends;
    let redis = match &b.redis {
        None => "embedded",
        Some(r) if r.ping().await.is_ok() => "up",
        Some(_) => "down",
    };
    let fallbacks = FallbackCounts {
        limiter: b.limiter.fallbacks(),
        lockout: b.lockout.fallbacks(),
    };
    // Read before any await: the watch guard must not be held across one.
    let mode = b.mode.borrow().as_str().to_owned();
    let events = EventsReadiness {
        mode,
        node: b.broker.as_ref().and_then(|broker| broker.node()),
        outbox_backlog: b
            .db
            .outbox_backlog()
            .await
            .ok()
            .map(|n| u64::try_from(n).unwrap_or(0)),
    };
    let ledger = b.db.ping().await;
    let status = if ledger.is_ok() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    if let Err(e) = &ledger {
        tracing::warn!(error = %e, "readiness: ledger unreachable");
    }
    let body = Readiness {
        status: if ledger.is_ok() {
            "ready"
        } else {
            "unavailable"
        }
        .to_owned(),
        ledger: if ledger.is_ok() { "up" } else { "down" }.to_owned(),
        redis: redis.to_owned(),
        events,
        fallbacks,
    };
    (status, Json(body))
}

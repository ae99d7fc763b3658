//! The DataFlow HTTP API.
//!
//! Layout:
//! - [`router`]: every route and layer, assembled once;
//! - [`auth`]: API keys for `/v1`, the operator token for `/admin`, lock-out;
//! - [`ratelimit`]: GCRA per client and per anonymous IP, with `RateLimit` headers;
//! - `routes/`: one module per resource (imports, batches, admin, health, metrics);
//! - `ui/`: the operator dashboard at `/ui` (sessions, CSRF, SSE, one module per page);
//! - [`error`]: the one error type and its JSON form.

pub mod auth;
pub mod error;
pub mod ratelimit;
mod routes;
pub mod state;
mod ui;

use std::time::Duration;

use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};

pub use error::{ApiError, ApiResult};
pub use state::AppState;

/// The whole HTTP application.
pub fn router(state: AppState) -> Router {
    let v1 = Router::new()
        .merge(routes::imports::router())
        .merge(routes::batches::router())
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_api_key,
        ));
    let admin = routes::admin::router().route_layer(middleware::from_fn_with_state(
        state.clone(),
        auth::require_operator,
    ));
    Router::new()
        .nest("/v1", v1)
        .nest("/admin", admin)
        .nest("/ui", ui::router(state.clone()))
        .merge(routes::health::router())
        .merge(routes::metrics::router())
        .fallback(|| async { ApiError::not_found() })
        .layer(middleware::from_fn_with_state(state.clone(), deadline))
        .layer(middleware::from_fn(track))
        .with_state(state)
}

/// What a process without the API serves for operations: `/healthz`, `/readyz`,
/// `/metrics`.
pub fn ops_router(state: AppState) -> Router {
    Router::new()
        .merge(routes::health::router())
        .merge(routes::metrics::router())
        .fallback(|| async { ApiError::not_found() })
        .layer(middleware::from_fn(track))
        .with_state(state)
}

/// Counts every request by method, matched route (never the raw path: ids would make a
/// series per batch) and status, and times it.
async fn track(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = req.method().as_str().to_owned();
    let started = std::time::Instant::now();
    let resp = next.run(req).await;
    let status = resp.status().as_u16().to_string();
    let elapsed = started.elapsed().as_secs_f64();
    metrics::histogram!("dataflow_http_request_duration_seconds", "method" => method.clone(), "route" => route.clone())
        .record(elapsed);
    metrics::counter!("dataflow_http_requests_total", "method" => method, "route" => route, "status" => status)
        .increment(1);
    resp
}

/// Bounds the time of every request; a slow sender gets 408 instead of holding a slot.
async fn deadline(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let limit = Duration::from_secs(state.config.request_timeout_secs);
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(resp) => resp,
        Err(_) => ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            "the request took too long",
        )
        .into_response(),
    }
}

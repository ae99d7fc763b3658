//! The DataFlow HTTP API.
//!
//! Layout:
//! - [`router`]: every route and layer, assembled once;
//! - [`auth`]: API keys for `/v1`, the operator token for `/admin`, lock-out;
//! - [`ratelimit`]: GCRA per client and per anonymous IP, with `RateLimit` headers;
//! - `routes/`: one module per resource (imports, batches, summaries, client, admin,
//!   health, metrics);
//! - `ui/`: the operator dashboard at `/ui` (sessions, CSRF, SSE, one module per page);
//! - [`error`]: the one error type and its JSON form;
//! - [`listener`]: the bound on connections served at once;
//! - [`openapi`]: the OpenAPI 3.1 document the handlers' annotations make, served at
//!   `/openapi.json`.

pub mod auth;
pub mod error;
mod intake;
pub mod listener;
pub mod openapi;
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
use dataflow_platform::traces;
use tower_http::timeout::TimeoutBody;
use tracing::Instrument;
use utoipa_axum::router::OpenApiRouter;

pub use error::{ApiError, ApiResult};
pub use state::AppState;

/// Every route with its documentation. `guard_with` puts the credential checks in front
/// of `/v1` and `/admin`; the document is built without them (they need the state), and
/// [`openapi::finish`] describes what they add.
fn api(guard_with: Option<&AppState>) -> OpenApiRouter<AppState> {
    let mut v1 = OpenApiRouter::new()
        .merge(routes::imports::router())
        .merge(routes::batches::router())
        .merge(routes::client::router())
        .merge(routes::summaries::router())
        .merge(routes::schemas::router())
        .merge(routes::records::router())
        .merge(routes::uploads::router());
    let mut admin = routes::admin::router()
        .merge(routes::summaries::admin_router())
        .merge(routes::schemas::admin_router());
    if let Some(state) = guard_with {
        v1 = v1.route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_api_key,
        ));
        admin = admin.route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_operator,
        ));
    }
    OpenApiRouter::with_openapi(openapi::base())
        .nest("/v1", v1)
        .nest("/admin", admin)
        .merge(routes::health::router())
        .merge(openapi::router())
}

/// The OpenAPI 3.1 document of [`router`] (served at `GET /openapi.json`).
pub fn openapi() -> utoipa::openapi::OpenApi {
    let mut doc = api(None).into_openapi();
    openapi::finish(&mut doc);
    doc
}

/// The whole HTTP application. `/metrics` names every tenant and counts the ledger, so it
/// is served here only behind `api.metrics_token`; scrapers use the operations listener
/// ([`ops_router`] on `ops_listen`).
pub fn router(state: AppState) -> Router {
    let (mut routes, _) = api(Some(&state)).split_for_parts();
    if state.config.metrics_token.is_some() {
        let (metrics, _) = routes::metrics::router().split_for_parts();
        routes = routes.merge(metrics.route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_metrics_token,
        )));
    }
    // The dashboard is HTML for browsers, not part of the JSON API's document.
    routes
        .nest("/ui", ui::router(state.clone()))
        .fallback(|| async { ApiError::not_found() })
        .layer(middleware::from_fn_with_state(state.clone(), durable))
        .layer(middleware::from_fn_with_state(state.clone(), deadline))
        .layer(middleware::from_fn(close_unread))
        .layer(middleware::from_fn(track))
        .with_state(state)
}

/// A request whose body was not read to its end (refused before or while it was read: too
/// large, rate-limited, a decompression bomb, out of time) is answered with `Connection:
/// close`. The server does not keep such a connection, and a client told so sends its next
/// request on a new one rather than into the one being closed, where it would fail.
async fn close_unread(req: Request, next: Next) -> Response {
    use axum::body::HttpBody;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    if req.body().is_end_stream() || req.version() > axum::http::Version::HTTP_11 {
        return next.run(req).await;
    }
    let read_to_end = Arc::new(AtomicBool::new(false));
    let flag = read_to_end.clone();
    // Polled once the body has no more frames: the handler read it to its end.
    let end = futures::stream::poll_fn(move |_| {
        flag.store(true, Ordering::Relaxed);
        std::task::Poll::<Option<Result<bytes::Bytes, axum::Error>>>::Ready(None)
    });
    let (parts, body) = req.into_parts();
    let body =
        axum::body::Body::from_stream(futures::StreamExt::chain(body.into_data_stream(), end));
    let mut resp = next.run(Request::from_parts(parts, body)).await;
    if !read_to_end.load(Ordering::Relaxed) {
        resp.headers_mut().insert(
            axum::http::header::CONNECTION,
            axum::http::HeaderValue::from_static("close"),
        );
    }
    resp
}

/// A request that may have written is answered only once its writes are on disk
/// ([`dataflow_platform::ledger::Db::durable`]: SQLite's commits share a sync; PostgreSQL's
/// are durable already). A `202` promises the import is never lost, power cut included.
async fn durable(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let reads_only = matches!(
        *req.method(),
        axum::http::Method::GET | axum::http::Method::HEAD | axum::http::Method::OPTIONS
    );
    let resp = next.run(req).await;
    if reads_only || resp.status().is_server_error() {
        return resp;
    }
    match state.backends.db.durable().await {
        Ok(()) => resp,
        Err(e) => ApiError::from(e).into_response(),
    }
}

/// What every process serves on its operations listener (`ops_listen`): `/healthz`,
/// `/readyz`, `/metrics`, open to whoever reaches that address.
pub fn ops_router(state: AppState) -> Router {
    let (routes, _) = OpenApiRouter::new()
        .merge(routes::health::router())
        .merge(routes::metrics::router())
        .split_for_parts();
    routes
        .fallback(|| async { ApiError::not_found() })
        .layer(middleware::from_fn(track))
        .with_state(state)
}

/// Counts every request by method, matched route (never the raw path: ids would make a
/// series per batch) and status, and times it. While traces are exported, each request is
/// a server span named by its method and route, continuing the caller's trace when the
/// request carries a `traceparent`.
async fn track(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = req.method().as_str().to_owned();
    // Only for the exporter: a span per request would add nothing to the logs but its
    // fields on every line, and its cost to every request.
    let span = if traces::exporting() {
        tracing::info_span!(
            "http.request",
            otel.name = %format_args!("{method} {route}"),
            otel.kind = "server",
            http.request.method = %method,
            http.route = %route,
            http.response.status_code = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        )
    } else {
        tracing::Span::none()
    };
    traces::follow(
        &span,
        req.headers()
            .get(traces::TRACEPARENT)
            .and_then(|v| v.to_str().ok()),
    );
    let started = std::time::Instant::now();
    let resp = next.run(req).instrument(span.clone()).await;
    span.record(
        "http.response.status_code",
        u64::from(resp.status().as_u16()),
    );
    if resp.status().is_server_error() {
        span.record("otel.status_code", "ERROR");
    }
    let status = resp.status().as_u16().to_string();
    let elapsed = started.elapsed().as_secs_f64();
    metrics::histogram!("dataflow_http_request_duration_seconds", "method" => method.clone(), "route" => route.clone())
        .record(elapsed);
    metrics::counter!("dataflow_http_requests_total", "method" => method, "route" => route, "status" => status)
        .increment(1);
    resp
}

/// Bounds the time of every request but a tus upload's; a slow sender gets 408 instead of
/// holding a slot:
/// at the request deadline, or as soon as its body sends nothing for
/// `body_idle_timeout_secs` (the body fails with tower-http's `TimeoutError`, which the
/// handlers that read bodies answer with 408). The handler sees its deadline
/// ([`state::Deadline`]): whatever it holds for the request (an `Idempotency-Key`) it can
/// hold until then and no longer.
async fn deadline(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let idle = Duration::from_secs(state.config.body_idle_timeout_secs);
    // A tus part may take as long as it keeps sending: each stored part is kept whatever
    // happens to the request, and the idle timeout still cuts a sender that stopped.
    let whole = !req.uri().path().starts_with("/v1/uploads");
    let at = tokio::time::Instant::now() + Duration::from_secs(state.config.request_timeout_secs);
    let (mut parts, body) = req.into_parts();
    if whole {
        parts.extensions.insert(state::Deadline(at));
    }
    let req = Request::from_parts(parts, axum::body::Body::new(TimeoutBody::new(idle, body)));
    if !whole {
        return next.run(req).await;
    }
    match tokio::time::timeout_at(at, next.run(req)).await {
        Ok(resp) => resp,
        Err(_) => ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            "the request took too long",
        )
        .into_response(),
    }
}

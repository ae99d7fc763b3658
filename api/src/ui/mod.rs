//! The operator dashboard at `/ui`: server-rendered HTML (maud, escaped by construction),
//! one stylesheet and one small script compiled into the binary, no build step. Every
//! page works with a plain reload; with the script, live updates (SSE) re-read the parts
//! of the page that change.
//!
//! Layout:
//! - [`session`]: login with the operator token and a name, the session cookie, logout;
//! - [`csrf`]: the synchronizer token and the origin check of every form post;
//! - [`actions`]: the one endpoint dashboard forms post to, and the action log;
//! - [`events`]: live updates over SSE;
//! - one module per page: [`overview`], [`batches`], [`queues`], [`workers`], [`dead`],
//!   [`clients`] (and a client's own page), [`schema`] (a client's schema and its versions);
//! - [`charts`]: the throughput, latency and queue-depth charts, drawn as SVG;
//! - [`layout`]: the page shell and view helpers; [`form`]: form bodies;
//!   [`errors`]: error answers as pages; [`assets`]: the stylesheet and script.

mod actions;
mod assets;
mod batches;
mod charts;
mod clients;
mod csrf;
mod dead;
mod errors;
mod events;
mod form;
mod layout;
mod overview;
mod queues;
mod schema;
mod session;
mod workers;

use std::str::FromStr;

use axum::Router;
use axum::extract::Request;
use axum::http::{HeaderValue, header};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};

use crate::error::{ApiError, ApiResult};
use crate::state::AppState;

pub fn router(state: AppState) -> Router<AppState> {
    let signed_in = Router::new()
        .route("/", get(overview::page))
        .route("/batches", get(batches::list))
        .route("/batches/{id}", get(batches::detail))
        .route("/batches/{id}/report.csv", get(batches::report_csv))
        .route("/queues", get(queues::page))
        .route("/workers", get(workers::page))
        .route("/dead", get(dead::page))
        .route("/clients", get(clients::page))
        .route("/clients/{id}", get(clients::detail))
        .route("/clients/{id}/schema", get(schema::page))
        .route("/actions", get(actions::log).post(actions::perform))
        .route("/events", get(events::stream))
        .route("/logout", post(session::logout))
        .route_layer(middleware::from_fn_with_state(state, session::require));
    Router::new()
        .merge(signed_in)
        .route("/login", get(session::login_page).post(session::login))
        .route("/static/{file}", get(assets::serve))
        .fallback(|| async { ApiError::not_found() })
        .layer(middleware::from_fn(errors::as_html))
        .layer(middleware::from_fn(security_headers))
}

/// A query parameter that may be left empty (as an unchosen `<select>` sends it).
fn optional<T: FromStr>(raw: &str) -> Result<Option<T>, T::Err> {
    (!raw.is_empty()).then(|| raw.parse()).transpose()
}

/// A page cursor from an "Older" link, when there is one.
fn cursor<T: FromStr>(raw: &str) -> ApiResult<Option<T>> {
    optional(raw).map_err(|_| {
        ApiError::bad_request("invalid_cursor", "cursor must come from an \"Older\" link")
    })
}

/// Pages load only their own script and stylesheet, are never framed and never cached.
async fn security_headers(req: Request, next: Next) -> Response {
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
             connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    resp
}

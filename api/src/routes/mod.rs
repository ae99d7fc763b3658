//! One module per resource, each exporting `router()`.

pub mod admin;
pub mod batches;
pub mod client;
mod dry_run;
pub mod health;
pub mod imports;
pub mod metrics;
pub mod records;
pub mod schemas;
pub mod summaries;
pub mod uploads;

use std::str::FromStr;

use axum::extract::rejection::QueryRejection;
use axum::extract::{FromRequestParts, Path, Query};
use axum::http::request::Parts;

use crate::error::{ApiError, ApiResult};

/// A route's one path parameter, as text. One whose percent-encoding is not UTF-8 names
/// nothing that exists, so it is a JSON 404 like any unknown id (axum's own answer would be
/// a plain-text 400).
pub(crate) struct PathParam(pub String);

impl<S: Send + Sync> FromRequestParts<S> for PathParam {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> ApiResult<Self> {
        Path::<String>::from_request_parts(parts, state)
            .await
            .map(|Path(raw)| PathParam(raw))
            .map_err(|_| ApiError::not_found())
    }
}

/// An id from the path; a malformed one cannot exist, so it is a 404 like any unknown id.
pub(crate) fn parse_path_id<T: FromStr>(raw: &str) -> ApiResult<T> {
    raw.parse().map_err(|_| ApiError::not_found())
}

/// Query parameters, with a JSON 400 naming the problem instead of axum's text answer.
pub(crate) fn query<T>(q: Result<Query<T>, QueryRejection>) -> ApiResult<T> {
    q.map(|Query(v)| v)
        .map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))
}

/// Page sizes: default 50, at most 500.
pub(crate) fn page_limit(limit: Option<u32>) -> ApiResult<u32> {
    match limit.unwrap_or(50) {
        n @ 1..=500 => Ok(n),
        _ => Err(ApiError::bad_request(
            "invalid_limit",
            "limit must be between 1 and 500",
        )),
    }
}

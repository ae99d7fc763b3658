//! The API's one error type. Client errors are JSON `{code, detail}` with the status that
//! fits; internal errors are logged with their cause and answered opaquely.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use dataflow_contracts::http::ErrorBody;
use dataflow_platform::Error as PlatformError;
use dataflow_platform::domain::records::ParseError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: String,
    pub detail: String,
    pub retry_after_secs: Option<u64>,
}

pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    pub fn new(status: StatusCode, code: &str, detail: impl Into<String>) -> Self {
        Self {
            status,
            code: code.to_owned(),
            detail: detail.into(),
            retry_after_secs: None,
        }
    }

    pub fn bad_request(code: &str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, detail)
    }

    pub fn not_found() -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", "no such resource")
    }

    /// The one answer for every authentication failure, so a caller learns nothing about
    /// which part was wrong.
    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or invalid credentials",
        )
    }

    pub fn too_many(code: &str, detail: impl Into<String>, retry_after_ms: u64) -> Self {
        Self {
            retry_after_secs: Some(retry_after_ms.div_ceil(1000).max(1)),
            ..Self::new(StatusCode::TOO_MANY_REQUESTS, code, detail)
        }
    }

    /// 503 with `Retry-After`: the request was fine, a dependency was not.
    pub fn unavailable(code: &str, detail: impl Into<String>) -> Self {
        Self {
            retry_after_secs: Some(1),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, code, detail)
        }
    }

    pub fn unprocessable(code: &str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, code, detail)
    }
}

impl From<ParseError> for ApiError {
    fn from(e: ParseError) -> Self {
        let status = if e.code == "too_many_records" {
            StatusCode::PAYLOAD_TOO_LARGE
        } else {
            StatusCode::BAD_REQUEST
        };
        Self::new(status, e.code, e.to_string())
    }
}

impl From<PlatformError> for ApiError {
    fn from(e: PlatformError) -> Self {
        match e {
            PlatformError::NotFound => Self::not_found(),
            PlatformError::Invalid(detail) => Self::unprocessable("invalid", detail),
            PlatformError::Conflict(detail) => {
                Self::new(StatusCode::CONFLICT, "invalid_state", detail)
            }
            PlatformError::Parse(p) => p.into(),
            e if e.is_unavailable() => {
                tracing::error!(error = %e, "ledger unavailable");
                Self::unavailable(
                    "ledger_unavailable",
                    "the ledger is unavailable; retry later",
                )
            }
            other => {
                // The message carries its causes (see `platform::Error`); the debug form
                // keeps what only it shows (a database error's code, table, constraint).
                tracing::error!(error = %other, debug = ?other, "internal error");
                Self::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "internal error",
                )
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            code: self.code,
            detail: self.detail,
        };
        let mut resp = (self.status, Json(body)).into_response();
        if let Some(secs) = self.retry_after_secs {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

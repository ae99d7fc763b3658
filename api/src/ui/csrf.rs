//! Cross-site request forgery: every form post must carry its session's synchronizer
//! token (field `csrf`, or header `X-CSRF-Token`), compared in constant time, and must not
//! come from another origin. `SameSite=Strict` already keeps the cookie off cross-site
//! requests; these two checks hold even where a browser or proxy gets that wrong.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{HeaderMap, StatusCode, header};
use dataflow_platform::dashboard::sessions::Session;
use dataflow_platform::domain::keys;

use super::form::FormData;
use super::session::Operator;
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;

/// The body of a form post that passed [`check`] for the request's session.
pub struct Verified(pub FormData);

impl FromRequest<AppState> for Verified {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> ApiResult<Self> {
        let headers = req.headers().clone();
        let op = req
            .extensions()
            .get::<Operator>()
            .cloned()
            .ok_or_else(|| forbidden("log in first"))?;
        let body = Bytes::from_request(req, state)
            .await
            .map_err(|e| ApiError::new(e.status(), "invalid_body", e.body_text()))?;
        let form = FormData::parse(&body);
        check(state, &headers, &op.session, form.get("csrf"))?;
        Ok(Verified(form))
    }
}

fn forbidden(detail: &str) -> ApiError {
    ApiError::new(StatusCode::FORBIDDEN, "csrf_failed", detail)
}

/// A form post of `session`: its token, and its origin.
fn check(
    state: &AppState,
    headers: &HeaderMap,
    session: &Session,
    form_token: Option<&str>,
) -> ApiResult<()> {
    same_origin(state, headers)?;
    let presented = form_token
        .or_else(|| headers.get("x-csrf-token").and_then(|v| v.to_str().ok()))
        .unwrap_or_default();
    if keys::constant_time_eq(presented.as_bytes(), session.csrf.as_bytes()) {
        Ok(())
    } else {
        Err(forbidden(
            "this form is not from your current session; reload the page and try again",
        ))
    }
}

/// The request's `Origin` (when the browser sent one) is the dashboard's own: the
/// configured `api.ui.origin`, else the `Host` the request was sent to. Without `Origin`,
/// `Sec-Fetch-Site` (when sent) must not say cross-site.
pub fn same_origin(state: &AppState, headers: &HeaderMap) -> ApiResult<()> {
    let text = |name| {
        headers
            .get(name)
            .and_then(|v: &axum::http::HeaderValue| v.to_str().ok())
    };
    // A browser sends one Origin; a request with several is not a browser's form.
    if headers.get_all(header::ORIGIN).iter().count() > 1 {
        return Err(forbidden("a form post carries one Origin"));
    }
    let Some(origin) = text(header::ORIGIN) else {
        return match text(axum::http::HeaderName::from_static("sec-fetch-site")) {
            Some("cross-site" | "same-site") => Err(forbidden("cross-site form posts are refused")),
            _ => Ok(()),
        };
    };
    let allowed = match &state.config.ui.origin {
        Some(configured) => origin == configured,
        None => text(header::HOST).is_some_and(|host| {
            origin
                .strip_prefix("https://")
                .or_else(|| origin.strip_prefix("http://"))
                == Some(host)
        }),
    };
    if allowed {
        Ok(())
    } else {
        Err(forbidden("this form was sent from another site"))
    }
}

//! Error answers as pages: the handlers return [`crate::ApiError`] like the JSON API does,
//! and this layer turns its `{code, detail}` into HTML for the browser.

use axum::extract::Request;
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use dataflow_contracts::http::ErrorBody;
use maud::html;

use super::layout::shell;

/// Error bodies are small; anything larger is not one of ours.
const MAX_ERROR_BODY: usize = 64 * 1024;

pub async fn as_html(req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(resp.status().is_client_error() || resp.status().is_server_error()) || !is_json {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    let error = match axum::body::to_bytes(body, MAX_ERROR_BODY).await {
        Ok(bytes) => serde_json::from_slice::<ErrorBody>(&bytes).ok(),
        Err(_) => None,
    };
    let detail = error.map_or_else(|| "something went wrong".to_owned(), |e| e.detail);
    let status = parts.status;
    let title = status.canonical_reason().unwrap_or("Error");
    let page = shell(
        title,
        html! {
            main.login {
                h1 { (status.as_u16()) " · " (title) }
                p.error role="alert" { (detail) }
                p { a href="/ui" { "Back to the dashboard" } }
            }
        },
        None,
    );
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.remove(header::CONTENT_TYPE);
    (parts, page).into_response()
}

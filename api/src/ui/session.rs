//! Logging in and out of the dashboard, and the session every other page requires.
//!
//! One operator token exists, so the login form also asks for a name: the session carries
//! it and the action log records it (with the session's label and the IP), which tells
//! operators sharing the token apart. A failed login counts towards the same per-IP
//! lock-out as a bad bearer token on `/admin`. The cookie is `HttpOnly` and
//! `SameSite=Strict`, `Secure` with `api.ui.cookie_secure`; it holds a random token whose
//! digest keys the session in the store.

use std::net::IpAddr;
use std::time::Duration;

use axum::Extension;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use dataflow_platform::dashboard::sessions::Session;
use dataflow_platform::domain::keys;
use dataflow_platform::ledger::NewAction;
use maud::{Markup, html};

use super::csrf::{self, Verified};
use super::form::FormData;
use super::layout::shell;
use crate::auth::{client_ip, locked};
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;

pub const COOKIE: &str = "dataflow_session";
/// Longest operator name accepted at login.
const MAX_NAME: usize = 64;

/// The logged-in operator of a request.
#[derive(Debug, Clone)]
pub struct Operator {
    pub session: Session,
    /// The cookie's token, to look the session up again (the live stream's heartbeat).
    pub token: String,
    pub ip: IpAddr,
}

impl Operator {
    /// Records an action in the log.
    pub async fn record(
        &self,
        state: &AppState,
        action: &str,
        target: &str,
        outcome: &str,
    ) -> ApiResult<()> {
        let ip = self.ip.to_string();
        let entry = NewAction {
            operator: &self.session.operator,
            session: &self.session.label,
            action,
            target,
            outcome,
            ip: &ip,
        };
        Ok(state.backends.db.record_action(&entry).await?)
    }
}

pub fn ttl(state: &AppState) -> Duration {
    Duration::from_secs(state.config.ui.session_ttl_secs)
}

fn cookie_token(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.to_owned())
        .filter(|v| !v.is_empty())
}

fn cookie(state: &AppState, value: &str, clear: bool) -> HeaderValue {
    let secure = if state.config.ui.cookie_secure {
        "; Secure"
    } else {
        ""
    };
    let expiry = if clear { "; Max-Age=0" } else { "" };
    let text = format!("{COOKIE}={value}; Path=/ui; HttpOnly; SameSite=Strict{secure}{expiry}");
    // The token is hex, so the header value is always valid.
    HeaderValue::from_str(&text)
        .unwrap_or_else(|_| HeaderValue::from_static("dataflow_session=; Path=/ui"))
}

fn to_login(state: &AppState, clear: bool) -> Response {
    let mut resp = Redirect::to("/ui/login").into_response();
    if clear {
        resp.headers_mut()
            .insert(header::SET_COOKIE, cookie(state, "", true));
    }
    resp
}

fn store_unavailable(e: dataflow_platform::Error) -> ApiError {
    tracing::error!(error = %e, "session store unavailable");
    ApiError::unavailable(
        "sessions_unavailable",
        "the session store is unavailable; try again shortly (the /admin API still answers)",
    )
}

/// Middleware for every page but the login: the session, renewed, or a redirect to login.
pub async fn require(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let Some(token) = cookie_token(req.headers()) else {
        return to_login(&state, false);
    };
    match state
        .backends
        .sessions
        .find(&token, Some(ttl(&state)))
        .await
    {
        Ok(Some(session)) => {
            let ip = client_ip(&state, &req);
            req.extensions_mut().insert(Operator { session, token, ip });
            next.run(req).await
        }
        Ok(None) => to_login(&state, true),
        Err(e) => store_unavailable(e).into_response(),
    }
}

fn login_form(error: Option<&str>, operator: &str) -> Markup {
    shell(
        "Log in",
        html! {
            main.login {
                h1 { "DataFlow" }
                p.muted { "Operator dashboard" }
                @if let Some(e) = error { p.error role="alert" { (e) } }
                form method="post" action="/ui/login" {
                    label { "Your name" input name="operator" value=(operator) required maxlength=(MAX_NAME) autocomplete="username" autofocus; }
                    label { "Operator token" input type="password" name="token" required autocomplete="current-password"; }
                    button type="submit" { "Log in" }
                }
                p.hint { "The token is the one /admin takes (" code { "data/admin-token" } " unless configured); the name goes into the action log." }
            }
        },
        None,
    )
}

pub async fn login_page() -> Markup {
    login_form(None, "")
}

/// A valid name: 1 to 64 characters after trimming, no control characters.
fn operator_name(raw: &str) -> Option<&str> {
    let name = raw.trim();
    (!name.is_empty() && name.chars().count() <= MAX_NAME && !name.chars().any(char::is_control))
        .then_some(name)
}

pub async fn login(State(state): State<AppState>, req: Request) -> ApiResult<Response> {
    let ip = client_ip(&state, &req);
    let headers = req.headers().clone();
    let body = axum::body::to_bytes(req.into_body(), 64 * 1024)
        .await
        .map_err(|_| ApiError::bad_request("invalid_body", "the login form is too large"))?;
    csrf::same_origin(&state, &headers)?;
    let form = FormData::parse(&body);
    let raw_name = form.get("operator").unwrap_or_default();
    let Some(name) = operator_name(raw_name) else {
        let page = login_form(
            Some("Give your name (up to 64 characters): the action log records it."),
            "",
        );
        return Ok((StatusCode::BAD_REQUEST, page).into_response());
    };
    let expected = state.backends.admin_token.expose().as_bytes();
    let presented = form.get("token").unwrap_or_default().trim();
    let ip_text = ip.to_string();
    let mut entry = NewAction {
        operator: name,
        session: "",
        action: "login",
        target: "",
        outcome: "refused: wrong token",
        ip: &ip_text,
    };
    let db = &state.backends.db;
    // A token that verifies is never locked out (as for API keys); a wrong one is refused
    // unheard while its IP is locked out, else counted.
    if !keys::constant_time_eq(presented.as_bytes(), expected) {
        let lockout = &state.backends.lockout;
        let subject = format!("ip:{ip}");
        if let Some(left) = lockout.locked(&subject).await {
            return Err(locked(left));
        }
        lockout.record_failure(&subject).await;
        db.record_action(&entry).await?;
        let page = login_form(Some("That token is not the operator token."), name);
        return Ok((StatusCode::UNAUTHORIZED, page).into_response());
    }
    let (token, session) = state
        .backends
        .sessions
        .create(name, &ip_text, ttl(&state))
        .await
        .map_err(store_unavailable)?;
    entry.session = &session.label;
    entry.outcome = "ok";
    db.record_action(&entry).await?;
    let mut resp = Redirect::to("/ui").into_response();
    resp.headers_mut()
        .insert(header::SET_COOKIE, cookie(&state, &token, false));
    Ok(resp)
}

pub async fn logout(
    State(state): State<AppState>,
    Extension(op): Extension<Operator>,
    _: Verified,
) -> ApiResult<Response> {
    state
        .backends
        .sessions
        .destroy(&op.token)
        .await
        .map_err(store_unavailable)?;
    op.record(&state, "logout", "", "ok").await?;
    Ok(to_login(&state, true))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_session_cookie_is_found_among_others() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; dataflow_session=abc; b=2"),
        );
        assert_eq!(cookie_token(&h).as_deref(), Some("abc"));
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("dataflow_session="),
        );
        assert_eq!(cookie_token(&h), None);
    }

    #[test]
    fn operator_names_are_bounded() {
        assert_eq!(operator_name("  ann "), Some("ann"));
        assert_eq!(operator_name(""), None);
        assert_eq!(operator_name("a\nb"), None);
        assert_eq!(operator_name(&"x".repeat(65)), None);
    }
}

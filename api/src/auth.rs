//! Authentication: API keys for `/v1`, the operator token for `/admin`.
//!
//! Failures are counted per IP and per (IP, key id) with a TTL; past the threshold the
//! subject is locked out for a while. Counting a key id only together with the address it
//! was tried from means nobody who learns a key's visible id can lock its owner out, and a
//! request whose secret verifies is never locked out at all: a secret has 256 random bits,
//! so the lock-out only has to stop probing, not guessing. Unknown key, wrong secret and
//! revoked key all get the same 401, so a caller cannot probe which key ids exist.
//!
//! Only a refused credential counts toward the anonymous per-IP rate limit; a ledger that
//! cannot be asked is the server's outage, answered 503 with `Retry-After`.

use std::net::{IpAddr, SocketAddr};

use axum::extract::{ConnectInfo, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use dataflow_platform::domain::keys;
use dataflow_platform::guards::lockout::Lockout;
use dataflow_platform::ledger::ClientRecord;

use crate::error::ApiError;
use crate::ratelimit;
use crate::state::{AppState, ClientIp};

/// The authenticated caller of a `/v1` request.
#[derive(Debug, Clone)]
pub struct Principal {
    pub client: ClientRecord,
    pub key_id: String,
}

/// A handler takes the caller as an argument; [`require_api_key`] put it there. A route
/// left outside that guard by mistake answers 401, never a 500 for a missing extension.
impl<S: Send + Sync> FromRequestParts<S> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<Principal>()
            .cloned()
            .ok_or_else(ApiError::unauthorized)
    }
}

/// Middleware for `/v1`: authenticates the key, then applies the client's rate limit.
pub async fn require_api_key(
    State(state): State<AppState>,
    mut req: Request,
    next: Next,
) -> Response {
    let ip = client_ip(&state, &req);
    req.extensions_mut().insert(ClientIp(ip));
    match authenticate(&state, ip, req.headers()).await {
        Ok(principal) => {
            let rate = ratelimit::client_rate(&principal.client.policy);
            let subject = format!("client:{}", principal.client.id);
            req.extensions_mut().insert(principal);
            ratelimit::limited(&state, &subject, rate, req, next).await
        }
        Err(Refusal::Credentials(e)) => ratelimit::anonymous(&state, ip, e).await,
        Err(Refusal::Outage(e)) => e.into_response(),
    }
}

/// Why a request was not authenticated.
enum Refusal {
    /// The caller's credentials were refused (missing, wrong, revoked, locked out, or of a
    /// deactivated client): the request counts as anonymous.
    Credentials(ApiError),
    /// The credentials could not be checked: the caller did nothing wrong.
    Outage(ApiError),
}

async fn authenticate(
    state: &AppState,
    ip: IpAddr,
    headers: &HeaderMap,
) -> Result<Principal, Refusal> {
    let lockout = &state.backends.lockout;
    let ip_subject = format!("ip:{ip}");
    let Some(presented) = bearer(headers).and_then(keys::parse) else {
        return Err(Refusal::Credentials(refuse(lockout, &[&ip_subject]).await));
    };
    let key = state.key(presented.key_id).await.map_err(unavailable)?;
    let valid =
        key.filter(|k| !k.revoked && state.backends.hasher.verify(&presented, &k.secret_hmac));
    let Some(key) = valid else {
        let key_subject = format!("key:{}@{ip}", presented.key_id);
        return Err(Refusal::Credentials(
            refuse(lockout, &[&ip_subject, &key_subject]).await,
        ));
    };
    let client = state
        .client(&key.client_id)
        .await
        .map_err(unavailable)?
        .ok_or_else(|| Refusal::Credentials(ApiError::unauthorized()))?;
    if !client.active {
        return Err(Refusal::Credentials(ApiError::new(
            StatusCode::FORBIDDEN,
            "client_inactive",
            "this client is deactivated",
        )));
    }
    state.touch_key(&key.key_id);
    Ok(Principal {
        client,
        key_id: key.key_id,
    })
}

/// The answer to credentials that did not verify: locked out while any of `subjects` is
/// (without counting more), else 401 with a failure counted against each.
async fn refuse(lockout: &Lockout, subjects: &[&str]) -> ApiError {
    for subject in subjects {
        if let Some(left) = lockout.locked(subject).await {
            return locked(left);
        }
    }
    for subject in subjects {
        lockout.record_failure(subject).await;
    }
    ApiError::unauthorized()
}

/// Middleware for `/admin`: the operator token, compared in constant time, with the same
/// per-IP lock-out as API keys (and likewise never for a token that verifies).
pub async fn require_operator(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let expected = state.backends.admin_token.expose().as_bytes();
    match bearer(req.headers()) {
        Some(token) if keys::constant_time_eq(token.as_bytes(), expected) => next.run(req).await,
        _ => {
            let subject = format!("ip:{}", client_ip(&state, &req));
            refuse(&state.backends.lockout, &[&subject])
                .await
                .into_response()
        }
    }
}

/// Middleware for `/metrics` on the public listener: `api.metrics_token`, compared in
/// constant time, under the same per-IP lock-out.
pub async fn require_metrics_token(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Response {
    let expected = state
        .config
        .metrics_token
        .as_ref()
        .map(|t| t.expose().as_bytes());
    match (bearer(req.headers()), expected) {
        (Some(token), Some(expected)) if keys::constant_time_eq(token.as_bytes(), expected) => {
            next.run(req).await
        }
        _ => {
            let subject = format!("ip:{}", client_ip(&state, &req));
            refuse(&state.backends.lockout, &[&subject])
                .await
                .into_response()
        }
    }
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

pub(crate) fn locked(left: std::time::Duration) -> ApiError {
    ApiError::too_many(
        "auth_locked",
        "too many failed authentication attempts; try again later",
        left.as_millis() as u64,
    )
}

fn unavailable(e: std::sync::Arc<dataflow_platform::Error>) -> Refusal {
    tracing::error!(error = %e, "credential lookup failed");
    Refusal::Outage(ApiError::unavailable(
        "ledger_unavailable",
        "the ledger is unavailable; retry later",
    ))
}

/// The peer address, or — behind a trusted proxy — the right-most `X-Forwarded-For` entry:
/// the one that proxy appended, which the client cannot choose.
pub(crate) fn client_ip(state: &AppState, req: &Request) -> IpAddr {
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map_or(IpAddr::from([127, 0, 0, 1]), |c| c.0.ip());
    if !state.config.trust_forwarded_for {
        return peer;
    }
    req.headers()
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.rsplit(',').next())
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(peer)
}

#[cfg(test)]
mod tests {
    use axum::extract::FromRequestParts;
    use axum::http::{Request, StatusCode};

    use super::Principal;

    /// A handler reached without the key guard (a route registered outside it) is refused
    /// as unauthenticated, not failed as a server error.
    #[tokio::test]
    async fn a_request_without_the_guard_has_no_principal_and_is_a_401() {
        let (mut parts, ()) = Request::new(()).into_parts();
        let refused = Principal::from_request_parts(&mut parts, &()).await.err();
        assert_eq!(refused.map(|e| e.status), Some(StatusCode::UNAUTHORIZED));
    }
}

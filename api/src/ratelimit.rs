//! The rate-limit layer: GCRA per client from its policy, per IP for callers without a
//! valid key. Every response carries `RateLimit-Policy` and `RateLimit` (IETF
//! draft-ietf-httpapi-ratelimit-headers); a refusal is 429 with `Retry-After`.

use std::net::IpAddr;

use axum::extract::Request;
use axum::http::{HeaderMap, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use dataflow_contracts::Policy;
use dataflow_platform::limiter::{Decision, Rate};

use crate::error::ApiError;
use crate::state::AppState;

pub fn client_rate(policy: &Policy) -> Rate {
    Rate {
        per_minute: policy.rate_per_minute,
        burst: policy.rate_burst,
    }
}

/// Runs the request if `subject` is within `rate`, and stamps the headers either way.
pub async fn limited(
    state: &AppState,
    subject: &str,
    rate: Rate,
    req: Request,
    next: Next,
) -> Response {
    let decision = state.backends.limiter.check(subject, rate).await;
    record(subject.trim_start_matches("client:"), decision.allowed);
    let mut resp = if decision.allowed {
        next.run(req).await
    } else {
        ApiError::too_many(
            "rate_limited",
            "request rate over the client's limit",
            decision.retry_after_ms,
        )
        .into_response()
    };
    stamp(resp.headers_mut(), rate, decision);
    resp
}

fn record(client: &str, allowed: bool) {
    let outcome = if allowed { "allowed" } else { "limited" };
    metrics::counter!("dataflow_ratelimit_decisions_total", "client" => client.to_owned(), "outcome" => outcome)
        .increment(1);
}

/// The answer to a request without valid credentials: `err`, or 429 when this IP is over
/// the anonymous limit.
pub async fn anonymous(state: &AppState, ip: IpAddr, err: ApiError) -> Response {
    let rate = Rate {
        per_minute: state.config.anonymous_rate_per_minute,
        burst: state.config.anonymous_rate_burst,
    };
    let decision = state
        .backends
        .limiter
        .check(&format!("anon:{ip}"), rate)
        .await;
    // One series for all anonymous callers: a label per IP would grow without bound.
    record("anonymous", decision.allowed);
    let mut resp = if decision.allowed {
        err.into_response()
    } else {
        ApiError::too_many(
            "rate_limited",
            "too many unauthenticated requests",
            decision.retry_after_ms,
        )
        .into_response()
    };
    stamp(resp.headers_mut(), rate, decision);
    resp
}

fn stamp(headers: &mut HeaderMap, rate: Rate, d: Decision) {
    let policy = format!("\"default\";q={};w=60", rate.per_minute);
    let current = format!(
        "\"default\";r={};t={}",
        d.remaining,
        d.reset_ms.div_ceil(1000)
    );
    if let (Ok(p), Ok(c)) = (
        HeaderValue::from_str(&policy),
        HeaderValue::from_str(&current),
    ) {
        headers.insert("ratelimit-policy", p);
        headers.insert("ratelimit", c);
    }
}

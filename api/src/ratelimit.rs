//! The rate-limit layer: GCRA per client from its policy, per IP for callers without a
//! valid key. Every response carries `RateLimit-Policy` and `RateLimit` (IETF
//! draft-ietf-httpapi-ratelimit-headers); a refusal is 429 with `Retry-After`.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::Mutex;

use axum::extract::Request;
use axum::http::{HeaderMap, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use dataflow_contracts::Policy;
use dataflow_platform::guards::limiter::{Decision, Rate};

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
        state.rejections.record(subject, decision.retry_after_ms);
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
        state
            .rejections
            .record(&format!("anon:{ip}"), decision.retry_after_ms);
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

/// Refusals kept for the dashboard.
const REJECTIONS_KEPT: usize = 200;

/// One refusal: `subject` is `client:<id>` or `anon:<ip>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub at_ms: i64,
    pub subject: String,
    pub retry_after_ms: u64,
}

/// The newest rate-limit refusals of this process, for the dashboard's clients page. In
/// memory and per process on purpose: it costs a mutex and a bounded ring on a path that
/// is already refusing, nothing on the path that serves, and the counters in
/// `dataflow_ratelimit_decisions_total` cover the whole fleet.
#[derive(Debug, Default)]
pub struct Rejections(Mutex<VecDeque<Rejection>>);

impl Rejections {
    pub fn record(&self, subject: &str, retry_after_ms: u64) {
        let mut ring = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if ring.len() == REJECTIONS_KEPT {
            ring.pop_back();
        }
        ring.push_front(Rejection {
            at_ms: dataflow_contracts::time::now_ms(),
            subject: subject.to_owned(),
            retry_after_ms,
        });
    }

    /// Newest first.
    pub fn recent(&self) -> Vec<Rejection> {
        let ring = self.0.lock().unwrap_or_else(|p| p.into_inner());
        ring.iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_keeps_the_newest() {
        let r = Rejections::default();
        for i in 0..REJECTIONS_KEPT + 5 {
            r.record(&format!("client:{i}"), 1);
        }
        let recent = r.recent();
        assert_eq!(recent.len(), REJECTIONS_KEPT);
        assert_eq!(recent[0].subject, format!("client:{}", REJECTIONS_KEPT + 4));
        assert_eq!(recent[REJECTIONS_KEPT - 1].subject, "client:5");
    }
}

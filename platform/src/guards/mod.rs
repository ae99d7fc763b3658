//! The request path's guards, each with an in-process backend and a Redis backend shared
//! by every process: rate limits ([`limiter`]), failed-login lock-out ([`lockout`]), the
//! policy and key cache ([`cache`]) and the checksum-dedup fast path ([`dedup`]). None of
//! them is the truth: SQL decides, and a Redis outage costs speed, never correctness.

pub mod cache;
pub mod dedup;
pub mod limiter;
pub mod lockout;

//! Prometheus metrics. One recorder per process behind the `metrics` facade, so every crate
//! records with `metrics::counter!` and friends, rendered at `GET /metrics`. Names start
//! with `dataflow_`; labels stay low-cardinality (matched routes, states, kinds, outcomes;
//! client ids only on rate-limit decisions, one series per tenant).
//!
//! Gauges of shared state — queue depths and ages from the ledger, Redis reachability, the
//! job messages in Redis, fallback and cache counts — are refreshed on a scrape at most
//! once a second ([`refresh`]), so every process reports the same queue figures and no
//! scraper can make the ledger count faster than that.

use std::sync::OnceLock;

use dataflow_contracts::jobs::JobKind;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::Backends;

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Histogram buckets for every `*_seconds` metric: 1 ms to 5 min.
const BUCKETS: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// The process's recorder, installed on first use (before anything is recorded: the
/// backend factory calls this first). Several apps in one process (tests) share it.
pub fn handle() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &BUCKETS)
                .unwrap_or_else(|_| PrometheusBuilder::new());
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!(
                    "a metrics recorder was already installed; /metrics shows only its own"
                );
            }
            handle
        })
        .clone()
}

/// The least time between two refreshes of the shared-state gauges ([`render`]).
const REFRESH_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Batch states a queue gauge is kept for (zero when empty, so a drained queue reads 0).
const BATCH_STATES: [&str; 4] = ["awaiting_approval", "ready", "processing", "dead"];
const JOB_STATES: [&str; 4] = ["pending", "queued", "running", "dead"];

/// Updates the shared-state gauges; cheap enough for every scrape (one SQL statement, one
/// Redis ping and a count per job kind).
pub async fn refresh(b: &Backends) {
    let mut depths: Vec<(String, String, u64, f64)> = Vec::new();
    for state in BATCH_STATES {
        depths.push(("batches".into(), state.into(), 0, 0.0));
    }
    depths.push(("outbox".into(), "unpublished".into(), 0, 0.0));
    for kind in JobKind::ALL {
        for state in JOB_STATES {
            depths.push((format!("jobs:{kind}"), state.into(), 0, 0.0));
        }
    }
    match b.db.queue_depths().await {
        Ok(found) => {
            for d in found {
                let age = d.oldest_age_ms.unwrap_or(0) as f64 / 1000.0;
                match depths
                    .iter_mut()
                    .find(|(q, s, _, _)| *q == d.queue && *s == d.state)
                {
                    Some(slot) => (slot.2, slot.3) = (d.count, age),
                    None => depths.push((d.queue, d.state, d.count, age)),
                }
            }
            for (queue, state, n, age) in depths {
                let labels = [("queue", queue), ("state", state)];
                metrics::gauge!("dataflow_queue_depth", &labels).set(n as f64);
                metrics::gauge!("dataflow_queue_oldest_age_seconds", &labels).set(age);
            }
        }
        Err(e) => tracing::warn!(error = %e, "metrics: queue depths unavailable"),
    }
    metrics::gauge!("dataflow_ledger_up").set(f64::from(u8::from(b.db.ping().await.is_ok())));
    if let Some(r) = &b.redis {
        let up = r.ping().await.is_ok();
        metrics::gauge!("dataflow_redis_up").set(f64::from(u8::from(up)));
        if let (true, Some(q)) = (up, &b.job_queue) {
            for kind in JobKind::ALL {
                if let Ok(n) = q.outstanding(kind).await {
                    metrics::gauge!("dataflow_job_queue_redis_messages", "kind" => kind.as_str())
                        .set(n as f64);
                }
            }
        }
    }
    metrics::counter!("dataflow_limiter_fallbacks_total").absolute(b.limiter.fallbacks());
    metrics::counter!("dataflow_lockout_fallbacks_total").absolute(b.lockout.fallbacks());
    metrics::counter!("dataflow_lock_degraded_total").absolute(b.mutex.degraded());
    for (cache, stats) in [("keys", b.keys.stats()), ("clients", b.clients.stats())] {
        metrics::counter!("dataflow_cache_requests_total", "cache" => cache, "result" => "hit")
            .absolute(stats.hits);
        metrics::counter!("dataflow_cache_requests_total", "cache" => cache, "result" => "miss")
            .absolute(stats.misses);
    }
}

/// The Prometheus text of everything recorded in this process.
pub async fn render(b: &Backends) -> String {
    // Scrapes that come closer together share one refresh: however often (or however many
    // at once) they come, the ledger is counted at most once a second.
    {
        let mut last = b.gauges_refreshed.lock().await;
        if last.is_none_or(|at| at.elapsed() >= REFRESH_EVERY) {
            refresh(b).await;
            *last = Some(std::time::Instant::now());
        }
    }
    let handle = handle();
    handle.run_upkeep();
    handle.render()
}

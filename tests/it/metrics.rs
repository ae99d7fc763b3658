//! `GET /metrics`: Prometheus text with the figures operators chart, low-cardinality labels.

use crate::common::harness::register;
use std::time::{Duration, Instant};

use dataflow::Roles;
use dataflow_contracts::BatchStatus;
use serde_json::json;

use crate::helpers::{Backend, TestApp, csv};

/// The value of the first series whose line starts with `series` (name and labels).
fn value(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

async fn metrics_cover_requests_queues_batches_locks_and_the_cache() {
    let Some(t) = TestApp::spawn_redis(Backend::Sqlite, Roles::ALL, None, |_| {}).await else {
        return;
    };
    let (client, key) = t.client(json!({})).await;
    let imported = t.import(&key, "text/csv", csv("m", 30)).await;
    t.wait_for(&key, &imported.batch_id, BatchStatus::Completed)
        .await;
    let wanted = [
        r#"dataflow_http_requests_total{method="POST",route="/v1/imports",status="202"}"#
            .to_owned(),
        r#"dataflow_http_request_duration_seconds_bucket{method="GET",route="/v1/batches/{id}""#
            .to_owned(),
        r#"dataflow_imports_total{outcome="accepted"}"#.to_owned(),
        format!(r#"dataflow_ratelimit_decisions_total{{client="{client}",outcome="allowed"}}"#),
        r#"dataflow_queue_depth{queue="batches",state="ready"}"#.to_owned(),
        r#"dataflow_queue_oldest_age_seconds{queue="jobs:report",state="pending"}"#.to_owned(),
        "dataflow_batch_enqueue_to_start_seconds_bucket".to_owned(),
        "dataflow_batch_enqueue_to_complete_seconds_bucket".to_owned(),
        "dataflow_batch_duration_seconds_bucket".to_owned(),
        r#"dataflow_records_total{outcome="written"}"#.to_owned(),
        r#"dataflow_batches_total{outcome="completed"}"#.to_owned(),
        r#"dataflow_lock_acquisitions_total{outcome="held"}"#.to_owned(),
        r#"dataflow_cache_requests_total{cache="keys",result="hit"}"#.to_owned(),
        r#"dataflow_jobs_total{kind="report",outcome="done"}"#.to_owned(),
        r#"dataflow_events_mode{mode="embedded"}"#.to_owned(),
    ];
    // The report job settles a moment after the batch completes: scrape until it shows.
    let deadline = Instant::now() + Duration::from_secs(10);
    let body = loop {
        let resp = t.http.get(t.ops_url("/metrics")).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        let ctype = resp.headers()["content-type"].to_str().unwrap().to_owned();
        assert!(ctype.starts_with("text/plain"), "{ctype}");
        let body = resp.text().await.unwrap();
        let missing: Vec<&String> = wanted
            .iter()
            .filter(|s| value(&body, s).is_none())
            .collect();
        if missing.is_empty() {
            break body;
        }
        assert!(Instant::now() < deadline, "missing {missing:?} in:\n{body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(value(&body, "dataflow_ledger_up"), Some(1.0));
    assert_eq!(value(&body, "dataflow_redis_up"), Some(1.0));
    // Routes are labelled by their pattern, never by the ids in the path.
    assert!(
        !body.lines().any(|l| l.contains("route=\"/v1/batches/bat_")),
        "a raw path became a label"
    );
    t.stop().await;
}
register!(metrics_cover_requests_queues_batches_locks_and_the_cache);

/// `dataflow worker` serves no API, but on `ops_listen` it answers health checks and
/// scrapes, so Prometheus sees the worker's own series (batches, records, locks).
async fn a_worker_process_serves_health_and_metrics_on_its_ops_listener() {
    let Some(api) = TestApp::spawn_with(Backend::Sqlite, Roles::API, |_| {}).await else {
        return;
    };
    let worker = api.sibling(Roles::WORKER).await;
    let (_, key) = api.client(json!({})).await;
    let imported = api.import(&key, "text/csv", csv("w", 10)).await;
    api.wait_for(&key, &imported.batch_id, BatchStatus::Completed)
        .await;
    let get = |path: &str| worker.http.get(worker.ops_url(path)).send();
    assert_eq!(get("/healthz").await.unwrap().status(), 200);
    assert_eq!(get("/readyz").await.unwrap().status(), 200);
    assert_eq!(
        get("/v1/batches").await.unwrap().status(),
        404,
        "no API here"
    );
    let body = get("/metrics").await.unwrap().text().await.unwrap();
    assert!(body.contains("dataflow_queue_depth{"), "{body}");
    assert!(
        body.contains("dataflow_batches_total{outcome=\"completed\"}"),
        "{body}"
    );
    worker.stop().await;
    api.stop().await;
}
register!(a_worker_process_serves_health_and_metrics_on_its_ops_listener);

/// `/metrics` names every tenant and counts the ledger: the public listener does not serve
/// it, unless `api.metrics_token` is set, and then only to that bearer.
async fn metrics_stay_off_the_public_listener_unless_a_token_is_set() {
    let Some(t) = TestApp::spawn_with(Backend::Sqlite, Roles::API, |_| {}).await else {
        return;
    };
    let scrape = |url: String| t.http.get(url).send();
    assert_eq!(scrape(t.url("/metrics")).await.unwrap().status(), 404);
    assert_eq!(scrape(t.ops_url("/metrics")).await.unwrap().status(), 200);
    assert_eq!(scrape(t.url("/healthz")).await.unwrap().status(), 200);
    let with_token = t
        .sibling_with(Roles::API, |c| {
            c.api.metrics_token = Some(dataflow_platform::config::Secret::new(
                "scrape-token-0123456789",
            ));
        })
        .await;
    let url = with_token.url("/metrics");
    assert_eq!(
        with_token.http.get(&url).send().await.unwrap().status(),
        401
    );
    let wrong = with_token.http.get(&url).bearer_auth("nope").send().await;
    assert_eq!(wrong.unwrap().status(), 401);
    let scraped = with_token
        .http
        .get(&url)
        .bearer_auth("scrape-token-0123456789")
        .send()
        .await
        .unwrap();
    assert_eq!(scraped.status(), 200);
    assert!(scraped.text().await.unwrap().contains("dataflow_"));
    with_token.stop().await;
    t.stop().await;
}
register!(metrics_stay_off_the_public_listener_unless_a_token_is_set);

/// A scrape counts the ledger at most once a second, however often scrapes come: the
/// queue gauges of a scrape right after another are the earlier count, and a scrape a
/// second later sees the change.
async fn scrapes_count_the_ledger_at_most_once_a_second() {
    let Some(t) = TestApp::spawn_with(Backend::Sqlite, Roles::API, |_| {}).await else {
        return;
    };
    let (_, key) = t.client(json!({})).await;
    let ready = r#"dataflow_queue_depth{queue="batches",state="ready"}"#;
    let scrape = async || {
        let resp = t.http.get(t.ops_url("/metrics")).send().await.unwrap();
        value(&resp.text().await.unwrap(), ready)
    };
    t.import(&key, "text/csv", csv("first", 3)).await;
    let counted = Instant::now();
    assert_eq!(scrape().await, Some(1.0));
    t.import(&key, "text/csv", csv("second", 3)).await;
    let again = scrape().await;
    assert!(
        counted.elapsed() < Duration::from_millis(900),
        "the second scrape came {:?} after the first: too late to tell",
        counted.elapsed()
    );
    assert_eq!(again, Some(1.0), "counted again within the second");
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    assert_eq!(scrape().await, Some(2.0));
    t.stop().await;
}
register!(scrapes_count_the_ledger_at_most_once_a_second);

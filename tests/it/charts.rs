//! The history of the dashboard's charts: the leader samples each minute once it is over
//! (a row for the fleet and one per client with activity, written once), prunes samples
//! past a day, and the pages read them back with the minute in progress measured live.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use dataflow_contracts::{BatchStatus, ClientId};
use dataflow_platform::ledger::Db;
use dataflow_platform::ledger::charts::{MINUTE_MS, Sample, minute_of};
use dataflow_worker::charts::{KEEP, sample_ended};
use serde_json::json;

use crate::helpers::{Backend, TestApp, backend_tests, csv};
use crate::ui::Ui;

backend_tests!(
    the_leader_samples_each_ended_minute_once_and_prunes_past_a_day,
    the_overview_and_a_client_page_draw_the_charts,
);

/// The stored samples of `client` (`None`: the fleet) by minute.
async fn stored(db: &Db, client: Option<&ClientId>) -> Vec<(i64, i64)> {
    sqlx::query_as("SELECT minute, batches FROM chart_samples WHERE client_id = $1 ORDER BY minute")
        .bind(client.map_or("", ClientId::as_str))
        .fetch_all(db.pool())
        .await
        .unwrap()
}

/// Samples `minute` as the leader does once it is over.
async fn sample(db: &Db, minute: i64) -> u64 {
    sample_ended(db, minute + MINUTE_MS + MINUTE_MS / 2)
        .await
        .unwrap()
}

async fn the_leader_samples_each_ended_minute_once_and_prunes_past_a_day(b: Backend) {
    let Some(t) = TestApp::spawn(b).await else {
        return;
    };
    // On winning, the leader samples the minute that ended last.
    let deadline = Instant::now() + Duration::from_secs(15);
    while stored(&t.db, None).await.is_empty() {
        assert!(Instant::now() < deadline, "no sample from the leader");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let (busy, busy_key) = t.client(json!({})).await;
    let (held, held_key) = t.client(json!({"approval_required": true})).await;
    let (idle, _) = t.client(json!({})).await;
    t.import(&held_key, "text/csv", csv("held", 3)).await;
    let mut batches = Vec::new();
    for i in 0..3 {
        let body = csv(&format!("busy{i}"), 5);
        batches.push(t.import(&busy_key, "text/csv", body).await.batch_id);
    }
    for batch in &batches {
        t.wait_for(&busy_key, batch, BatchStatus::Completed).await;
    }
    let minutes: BTreeSet<i64> =
        sqlx::query_scalar::<_, i64>("SELECT completed_at FROM batches WHERE client_id = $1")
            .bind(busy.as_str())
            .fetch_all(t.db.pool())
            .await
            .unwrap()
            .into_iter()
            .map(minute_of)
            .collect();
    for &m in &minutes {
        sample(&t.db, m).await;
        // A minute is written once: sampling it again (a second leader) adds nothing.
        assert_eq!(sample(&t.db, m).await, 0);
        // A client's page measures that client alone, to the same figures (in a minute
        // of fewer completions than the latency sample, as here).
        let everyone = t.db.measure_minute(m, None).await.unwrap();
        for client in [&busy, &held, &idle] {
            let alone = t.db.measure_minute(m, Some(client)).await.unwrap();
            let among = everyone
                .iter()
                .find(|s| s.client_id.as_ref() == Some(client))
                .cloned()
                .unwrap_or(Sample {
                    client_id: Some(client.clone()),
                    minute: m,
                    ..Sample::default()
                });
            assert_eq!(alone, [among], "{client}");
        }
    }

    let since = *minutes.first().unwrap();
    let in_minutes = |rows: Vec<(i64, i64)>| -> Vec<(i64, i64)> {
        rows.into_iter()
            .filter(|(m, _)| minutes.contains(m))
            .collect()
    };
    let fleet = in_minutes(stored(&t.db, None).await);
    let busy_rows = in_minutes(stored(&t.db, Some(&busy)).await);
    assert_eq!(fleet.len(), minutes.len());
    assert_eq!(fleet.iter().map(|(_, n)| n).sum::<i64>(), 3);
    assert_eq!(busy_rows.iter().map(|(_, n)| n).sum::<i64>(), 3);
    // Only clients with activity have rows: the held one (waiting), never the idle one.
    assert_eq!(
        in_minutes(stored(&t.db, Some(&held)).await).len(),
        minutes.len()
    );
    assert!(stored(&t.db, Some(&idle)).await.is_empty());

    // Read back as the charts read them: the client's numbers, zero where it was idle.
    let read = t.db.chart_samples(Some(&busy), since).await.unwrap();
    let ours: Vec<&Sample> = read
        .iter()
        .filter(|s| minutes.contains(&s.minute))
        .collect();
    assert_eq!(ours.iter().map(|s| s.batches).sum::<u64>(), 3);
    assert_eq!(ours.iter().map(|s| s.records).sum::<u64>(), 15);
    for s in &ours {
        let l = s.latency.expect("completions have a latency");
        assert!(l.p50_ms <= l.p95_ms && l.p95_ms <= l.p99_ms, "{s:?}");
        assert_eq!(s.depth.ready + s.depth.processing, 0, "{s:?}");
    }
    let held_read = t.db.chart_samples(Some(&held), since).await.unwrap();
    assert!(
        held_read
            .iter()
            .filter(|s| minutes.contains(&s.minute))
            .all(|s| s.depth.awaiting_approval == 1 && s.batches == 0 && s.latency.is_none()),
        "{held_read:?}"
    );
    let idle_read = t.db.chart_samples(Some(&idle), since).await.unwrap();
    assert_eq!(
        idle_read.len(),
        read.len(),
        "a row for every sampled minute"
    );
    assert!(
        idle_read
            .iter()
            .all(|s| s.batches == 0 && s.latency.is_none() && s.depth.dead == 0)
    );

    // Past its day a sample goes; within it, it stays.
    let now = t.db.now_ms().await.unwrap();
    let keep = i64::try_from(KEEP.as_millis()).unwrap();
    let old = |minute: i64| Sample {
        minute,
        batches: 7,
        ..Sample::default()
    };
    let (gone, kept) = (
        minute_of(now - keep) - MINUTE_MS,
        minute_of(now - keep) + 2 * MINUTE_MS,
    );
    assert_eq!(
        t.db.store_samples(&[old(gone), old(kept)]).await.unwrap(),
        2
    );
    sample_ended(&t.db, now).await.unwrap();
    let left: Vec<i64> = stored(&t.db, None)
        .await
        .into_iter()
        .map(|(m, _)| m)
        .collect();
    assert!(!left.contains(&gone), "{left:?}");
    assert!(left.contains(&kept), "{left:?}");
    assert!(left.iter().all(|&m| m >= now - keep), "{left:?}");
    t.stop().await;
}

/// Waits, when the ledger's minute is near its end, for the next one: what a test does
/// next then lands in the minute the charts draw last.
pub(crate) async fn clear_of_a_minutes_end(t: &TestApp) {
    let into = t.db.now_ms().await.unwrap() % MINUTE_MS;
    if into > 40_000 {
        let rest = u64::try_from(MINUTE_MS - into).unwrap() + 500;
        tokio::time::sleep(Duration::from_millis(rest)).await;
    }
}

/// The `data-last` of `series` in the chart `chart` of `page`.
fn last(page: &str, chart: &str, series: &str) -> Option<f64> {
    let at = page.find(&format!("data-chart=\"{chart}\""))?;
    let rest = &page[at..];
    let s = rest.find(&format!("data-series=\"{series}\""))?;
    let tail = &rest[s..rest[s..].find('>')? + s];
    let v = tail.split("data-last=\"").nth(1)?.split('"').next()?;
    v.parse().ok()
}

async fn the_overview_and_a_client_page_draw_the_charts(b: Backend) {
    let Some(t) = TestApp::spawn(b).await else {
        return;
    };
    let (client, key) = t.client(json!({})).await;
    let (held, held_key) = t.client(json!({"approval_required": true})).await;
    let ui = Ui::login(&t, "ann").await;
    let overview = ui.page("/ui").await;
    for chart in ["records", "batches", "latency", "depth"] {
        for window in ["hour", "day"] {
            assert!(
                overview.contains(&format!("data-chart=\"{chart}-{window}\"")),
                "{chart}-{window}: {overview}"
            );
        }
    }
    assert!(overview.contains("<svg class=\"chart\""), "{overview}");
    assert!(overview.contains("role=\"img\""), "{overview}");

    // A completion shows in the minute in progress at once, before any sample.
    clear_of_a_minutes_end(&t).await;
    let done = t.import(&key, "text/csv", csv("chart", 6)).await.batch_id;
    t.import(&held_key, "text/csv", csv("chart-held", 2)).await;
    t.wait_for(&key, &done, BatchStatus::Completed).await;
    let overview = ui.page("/ui").await;
    assert!(
        last(&overview, "batches-hour", "batches").unwrap() >= 1.0,
        "{overview}"
    );
    assert!(
        last(&overview, "records-hour", "records").unwrap() >= 6.0,
        "{overview}"
    );
    assert!(
        last(&overview, "latency-hour", "p99").is_some(),
        "{overview}"
    );
    assert_eq!(
        last(&overview, "depth-hour", "awaiting_approval"),
        Some(1.0)
    );

    let page = ui.page(&format!("/ui/clients/{client}")).await;
    assert_eq!(last(&page, "batches-hour", "batches"), Some(1.0), "{page}");
    // Over the day a point is its quarter hour's mean per minute.
    assert!(
        last(&page, "records-day", "records").unwrap() > 0.0,
        "{page}"
    );
    assert_eq!(last(&page, "depth-hour", "awaiting_approval"), Some(0.0));
    let page = ui.page(&format!("/ui/clients/{held}")).await;
    assert_eq!(last(&page, "batches-hour", "batches"), Some(0.0), "{page}");
    assert_eq!(last(&page, "depth-hour", "awaiting_approval"), Some(1.0));
    assert!(
        ui.page("/ui/clients")
            .await
            .contains(&format!("href=\"/ui/clients/{client}\""))
    );

    let unknown = ClientId::generate();
    assert_eq!(
        ui.get(&format!("/ui/clients/{unknown}"))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    assert_eq!(
        ui.get("/ui/clients/nope").send().await.unwrap().status(),
        404
    );
    t.stop().await;
}

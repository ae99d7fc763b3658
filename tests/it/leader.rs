//! The fleet leader: exactly one worker holds the leader lease and runs the singleton
//! duties; a stopped leader hands over at once, a killed one once its lease lapses; the
//! leader writes each client's daily summary once, for days that ended.

use std::time::{Duration, Instant};

use dataflow::Roles;
use dataflow_contracts::http::{DailySummary, WorkerInfo};
use dataflow_contracts::time::{DAY_MS, utc_day};
use dataflow_contracts::{BatchId, ClientId, ImportId};
use dataflow_platform::ledger::leases::LEADER;
use reqwest::Method;
use serde_json::json;

use crate::helpers::{Backend, TestApp, backend_tests};

/// Short enough that a test sees a hand-over; validation allows 300 ms and up.
const LEASE_MS: u64 = 900;

backend_tests!(
    one_leader_hands_over_when_it_stops_or_dies,
    daily_summaries_are_written_once_for_ended_days
);

/// Waits (up to `secs`) until the lease has an owner satisfying `pred`; returns it.
pub(crate) async fn wait_leader(t: &TestApp, secs: u64, pred: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(owner) = t.db.lease_owner(LEADER).await.unwrap()
            && pred(&owner)
        {
            return owner;
        }
        assert!(Instant::now() < deadline, "no such leader within {secs} s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn one_leader_hands_over_when_it_stops_or_dies(backend: Backend) {
    let Some(api) = TestApp::spawn_with(backend, Roles::API, |c| {
        c.worker.leader_lease_ms = LEASE_MS;
    })
    .await
    else {
        return;
    };
    let mut first = api.sibling(Roles::WORKER).await;
    let mut second = api.sibling(Roles::WORKER).await;
    let ids = [first.worker_id(), second.worker_id()];
    let leader = wait_leader(&api, 10, |o| ids.iter().any(|id| id == o)).await;

    // The registry agrees: exactly one worker says it leads, and it is the lease's owner.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ws: Vec<WorkerInfo> = api
            .admin_send(Method::GET, "/admin/workers")
            .await
            .json()
            .await
            .unwrap();
        let leaders: Vec<&WorkerInfo> = ws.iter().filter(|w| w.leader).collect();
        if ws.len() == 2 && leaders.len() == 1 {
            assert_eq!(leaders[0].id, leader);
            break;
        }
        assert!(Instant::now() < deadline, "one leader in {ws:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Leadership stays put while the leader lives.
    tokio::time::sleep(Duration::from_millis(LEASE_MS * 2)).await;
    assert_eq!(
        api.db.lease_owner(LEADER).await.unwrap().as_deref(),
        Some(leader.as_str())
    );

    // A leader that stops hands the lease back: the other worker leads well within a lease.
    let (stopping, staying) = if leader == ids[0] {
        (&mut first, &mut second)
    } else {
        (&mut second, &mut first)
    };
    let stopped = Instant::now();
    stopping.app.take().unwrap().stop().await;
    let next = wait_leader(&api, 5, |o| o != leader).await;
    assert_eq!(next, staying.worker_id());
    eprintln!(
        "a stopped leader was succeeded after {:?}",
        stopped.elapsed()
    );
    staying.app.take().unwrap().stop().await;

    // A leader killed outright keeps its lease until it lapses; then another worker leads.
    let mut child = api.spawn_worker_process("leader-worker", None);
    let pid = child.id().to_string();
    let killed_leader = wait_leader(&api, 20, |o| o.contains(&format!("-{pid}-"))).await;
    let survivor = api.sibling(Roles::WORKER).await;
    tokio::time::sleep(Duration::from_millis(LEASE_MS)).await;
    assert_eq!(
        api.db.lease_owner(LEADER).await.unwrap().as_deref(),
        Some(killed_leader.as_str()),
        "a live leader keeps its lease while another worker campaigns"
    );
    child.kill().unwrap();
    child.wait().unwrap();
    let killed = Instant::now();
    let next = wait_leader(&api, 10, |o| o != killed_leader).await;
    assert_eq!(next, survivor.worker_id());
    let took = killed.elapsed();
    eprintln!("a killed leader was succeeded after {took:?}");
    assert!(
        took < Duration::from_millis(LEASE_MS * 3),
        "succeeded within the lease and a renewal: {took:?}"
    );
    survivor.stop().await;
    api.stop().await;
}

/// A batch of `client` whose id was minted at `at_ms`, with `failed` rejected rows.
async fn past_batch(t: &TestApp, client: &ClientId, at_ms: i64, status: &str, failed: i64) {
    let ulid = ulid::Ulid::from_parts(u64::try_from(at_ms).unwrap(), rand_part());
    let id = BatchId::from_ulid(ulid);
    sqlx::query(
        "INSERT INTO batches (id, import_id, client_id, status, format, policy, records_total, \
         records_written, records_failed, available_at, created_at, updated_at) \
         VALUES ($1, $2, $3, $4, 'csv', '{}', $5, $6, $7, $8, $8, $8)",
    )
    .bind(id.as_str())
    .bind(ImportId::from_ulid(ulid).as_str())
    .bind(client.as_str())
    .bind(status)
    .bind(10_i64)
    .bind(10 - failed)
    .bind(failed)
    .bind(at_ms)
    .execute(t.db.pool())
    .await
    .unwrap();
    for line in 0..failed {
        let code = if line == 0 {
            "invalid_email"
        } else {
            "missing_field"
        };
        sqlx::query(
            "INSERT INTO record_errors (batch_id, line, field, code, detail) VALUES ($1, $2, 'email', $3, 'bad')",
        )
        .bind(id.as_str())
        .bind(line + 2)
        .bind(code)
        .execute(t.db.pool())
        .await
        .unwrap();
    }
}

fn rand_part() -> u128 {
    ulid::Ulid::new().random()
}

async fn summaries(t: &TestApp, key: &str, query: &str) -> Vec<DailySummary> {
    let resp = t.get(key, &format!("/v1/summaries{query}")).await;
    assert_eq!(resp.status(), 200);
    resp.json().await.unwrap()
}

async fn daily_summaries_are_written_once_for_ended_days(backend: Backend) {
    let Some(t) = TestApp::spawn_with(backend, Roles::ALL, |c| {
        c.worker.leader_lease_ms = LEASE_MS;
        c.worker.summary_schedule = "* * * * * *".into();
    })
    .await
    else {
        return;
    };
    let (client, key) = t.client(json!({})).await;
    let (_, other_key) = t.client(json!({})).await;
    // Today's import is not summarized: the day has not ended.
    t.import(&key, "text/csv", "id,email\n1,a@example.com\n")
        .await;
    let today = t.db.now_ms().await.unwrap().div_euclid(DAY_MS) * DAY_MS;
    let yesterday = today - DAY_MS;
    past_batch(&t, &client, yesterday + 3_600_000, "completed", 3).await;
    past_batch(&t, &client, yesterday + 7_200_000, "dead", 0).await;
    past_batch(&t, &client, today - 3 * DAY_MS + 60_000, "completed", 1).await;
    // The client has existed for ten days (moved last: no day before its creation is
    // summarized, so no tick can summarize those days before their batches are in).
    sqlx::query("UPDATE clients SET created_at = $1 WHERE id = $2")
        .bind(today - 10 * DAY_MS)
        .bind(client.as_str())
        .execute(t.db.pool())
        .await
        .unwrap();

    let deadline = Instant::now() + Duration::from_secs(20);
    let listed = loop {
        let listed = summaries(&t, &key, "").await;
        if listed.len() == 7 {
            break listed;
        }
        assert!(Instant::now() < deadline, "a week of summaries: {listed:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let days: Vec<String> = (1..=7).map(|back| utc_day(today - back * DAY_MS)).collect();
    assert_eq!(
        listed.iter().map(|s| s.day.clone()).collect::<Vec<_>>(),
        days,
        "newest first"
    );
    let y = &listed[0];
    assert_eq!(y.client_id, client);
    assert_eq!(y.imports, 2);
    assert_eq!(y.batches_by_status.get("completed"), Some(&1));
    assert_eq!(y.batches_by_status.get("dead"), Some(&1));
    assert_eq!(
        (y.records_total, y.records_written, y.records_failed),
        (20, 17, 3)
    );
    assert_eq!(y.top_errors.len(), 2);
    assert_eq!(
        (y.top_errors[0].code.as_str(), y.top_errors[0].count),
        ("missing_field", 2)
    );
    assert_eq!(
        (y.top_errors[1].code.as_str(), y.top_errors[1].count),
        ("invalid_email", 1)
    );
    assert_eq!(listed[2].imports, 1);
    assert_eq!(listed[2].records_failed, 1);
    assert!(
        listed
            .iter()
            .enumerate()
            .all(|(i, s)| i == 0 || i == 2 || s.imports == 0)
    );
    assert!(!listed.iter().any(|s| s.day == utc_day(today)));

    // Written once: a late batch of yesterday does not change the kept summary.
    past_batch(&t, &client, yesterday + 10_800_000, "completed", 0).await;
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let again = summaries(&t, &key, &format!("?day={}", days[0])).await;
    assert_eq!(again, vec![y.clone()]);

    // A client sees only its own; the other client, created today, has none yet.
    assert!(summaries(&t, &other_key, "").await.is_empty());
    // Operators see any client's; bad input is a 400, an unknown client a 404.
    let resp = t
        .admin_send(
            Method::GET,
            &format!("/admin/clients/{client}/summaries?limit=2"),
        )
        .await;
    assert_eq!(resp.status(), 200);
    let two: Vec<DailySummary> = resp.json().await.unwrap();
    assert_eq!(two, listed[..2].to_vec());
    for bad in ["?day=2026-13-01", "?limit=0", "?limit=x", "?when=1"] {
        let resp = t.get(&key, &format!("/v1/summaries{bad}")).await;
        assert_eq!(resp.status(), 400, "{bad}");
    }
    let unknown = format!("/admin/clients/{}/summaries", ClientId::generate());
    assert_eq!(t.admin_send(Method::GET, &unknown).await.status(), 404);
    t.stop().await;
}

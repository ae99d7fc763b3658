//! The RabbitMQ tier against a real broker: events on the exchange in lifecycle order, a
//! broker cut through a proxy (polling takes over, the outbox drains after), duplicate and
//! unacknowledged `BatchReady` deliveries, and poison messages in the dead-letter queue.
//! Every test uses its own exchange and queue prefix and deletes them at the end.

use crate::common::harness::register;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use dataflow::Roles;
use dataflow_contracts::events::{BatchReady, Envelope, Event};
use dataflow_contracts::jobs::JobStatus;
use dataflow_contracts::{BatchId, BatchStatus, ClientId, ImportId};
use dataflow_platform::Config;
use dataflow_platform::broker::Names;
use dataflow_platform::config::Secret;
use dataflow_platform::events::Mode;
use dataflow_platform::ledger::leases::OUTBOX_RELAY;
use dataflow_platform::ledger::{Bundle, Claimable};
use futures::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, BasicQosOptions,
    ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use reqwest::Method;
use serde_json::{Value, json};

use crate::common::services::url_via;
use crate::helpers::{Backend, Proxy, TestApp, backend_tests, csv, service_addr, test_amqp_url};
use crate::jobs::wait_jobs;

backend_tests!(
    events_arrive_in_lifecycle_order_with_the_documented_shape,
    broker_outage_falls_back_to_polling_and_the_outbox_drains,
    duplicate_and_unacknowledged_deliveries_complete_each_batch_once,
    poison_messages_end_in_the_dead_letter_queue,
    the_outbox_marks_exact_ids_and_one_relay_holds_the_lease,
    a_backlog_leaves_in_id_order_past_pages_and_the_confirm_window,
    the_outbox_prunes_published_rows_past_retention_page_by_page,
    amqps_failure_is_an_error_and_polling_carries_on,
    a_returned_batch_ready_is_published_again_after_the_topology_is_restored,
    a_worker_without_the_relay_runs_its_own_jobs_at_once,
    concurrent_submits_publish_each_event_once_in_lifecycle_order,
    a_lapsed_lease_is_taken_over_when_it_runs_out_not_at_the_sweep,
    deliveries_keep_a_clients_cap_and_its_turn,
);

/// The test's own view of the broker: a direct connection (never through the proxy) and
/// the names of one test's exchanges and queues.
pub(crate) struct TestBroker {
    url: String,
    prefix: String,
    pub(crate) names: Names,
    _conn: Connection,
    ch: Channel,
    taps: Vec<String>,
}

impl TestBroker {
    async fn new() -> Option<TestBroker> {
        Some(Self::on(test_amqp_url().await?).await)
    }

    /// The view through `url` (one node of a cluster, say).
    pub(crate) async fn on(url: String) -> TestBroker {
        let prefix = format!("dftest-{}.", ulid::Ulid::new().to_string().to_lowercase());
        let mut config = Config::default().amqp;
        config.prefix = prefix.clone();
        let conn = Connection::connect(&url, ConnectionProperties::default())
            .await
            .unwrap();
        let ch = conn.create_channel().await.unwrap();
        TestBroker {
            url,
            prefix,
            names: Names::new(&config),
            _conn: conn,
            ch,
            taps: Vec::new(),
        }
    }

    /// Moves the test's own connection to `url` (another node of a cluster).
    pub(crate) async fn view_through(&mut self, url: String) {
        let conn = Connection::connect(&url, ConnectionProperties::default())
            .await
            .unwrap();
        self.ch = conn.create_channel().await.unwrap();
        self._conn = conn;
        self.url = url;
    }

    /// Points a process at `url` (default: the broker itself) under this test's prefix.
    fn configure(&self, c: &mut Config, url: Option<&str>) {
        c.amqp_url = Some(Secret::new(url.unwrap_or(&self.url)));
        c.amqp.prefix = self.prefix.clone();
        c.amqp.reconnect_min_ms = 50;
        c.amqp.reconnect_max_ms = 200;
    }

    /// A queue bound to every `batch.*` event (the exchange must exist: wait for `broker`);
    /// a quorum queue like DataFlow's own, so that on a cluster it outlives a node.
    pub(crate) async fn tap(&mut self) -> String {
        let name = format!("{}tap", self.prefix);
        let mut quorum = FieldTable::default();
        quorum.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
        self.ch
            .queue_declare(
                name.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                quorum,
            )
            .await
            .unwrap();
        self.ch
            .queue_bind(
                name.as_str().into(),
                self.names.exchange.as_str().into(),
                "batch.#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        self.taps.push(name.clone());
        name
    }

    /// Takes every message now in `queue` (acknowledging them).
    async fn drain(&self, queue: &str) -> Vec<lapin::message::Delivery> {
        let mut out = Vec::new();
        while let Some(m) = self
            .ch
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
        {
            out.push(m.delivery);
        }
        out
    }

    async fn publish(&self, routing_key: &str, body: &[u8]) {
        let confirm = self
            .ch
            .basic_publish(
                self.names.exchange.as_str().into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                body,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .unwrap();
        drop(confirm);
    }

    pub(crate) async fn depth(&self, queue: &str) -> u32 {
        let passive = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        self.ch
            .queue_declare(queue.into(), passive, FieldTable::default())
            .await
            .unwrap()
            .message_count()
    }

    async fn cleanup(self) {
        let n = &self.names;
        for q in self
            .taps
            .iter()
            .chain([&n.ready_queue, &n.dead_letter_queue])
        {
            let _ = self
                .ch
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        for x in [&n.exchange, &n.dead_letter_exchange] {
            let _ = self
                .ch
                .exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default())
                .await;
        }
    }
}

async fn spawn(b: Backend, broker: &TestBroker, roles: Roles, url: Option<&str>) -> TestApp {
    spawn_tweaked(b, broker, roles, url, |_| {}).await
}

pub(crate) async fn spawn_tweaked(
    b: Backend,
    broker: &TestBroker,
    roles: Roles,
    url: Option<&str>,
    tweak: impl FnOnce(&mut Config),
) -> TestApp {
    TestApp::spawn_with(b, roles, |c| {
        broker.configure(c, url);
        tweak(c);
    })
    .await
    .expect("database available")
}

/// Waits (up to 15 s) until `/readyz` reports the events `mode`; returns the body.
async fn wait_mode(t: &TestApp, mode: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let r = t.readyz().await;
        if r["events"]["mode"] == mode {
            return r;
        }
        assert!(Instant::now() < deadline, "mode never became {mode}: {r}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits (up to 15 s) until the outbox has `n` unpublished rows.
pub(crate) async fn wait_backlog(t: &TestApp, n: i64) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while t.db.outbox_backlog().await.unwrap() != n {
        assert!(
            Instant::now() < deadline,
            "outbox backlog never reached {n}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Collects envelopes from `queue` until `done` holds for them (up to 15 s).
pub(crate) async fn collect(
    broker: &TestBroker,
    queue: &str,
    done: impl Fn(&[Envelope]) -> bool,
) -> Vec<Envelope> {
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut got = Vec::new();
    loop {
        for d in broker.drain(queue).await {
            let v: Value = serde_json::from_slice(&d.data).unwrap();
            assert_documented_shape(&v);
            let env: Envelope = serde_json::from_value(v).unwrap();
            assert_eq!(
                d.properties.message_id().as_ref().map(|m| m.as_str()),
                Some(env.id.as_str()),
                "the message id is the event id"
            );
            assert_eq!(*d.properties.delivery_mode(), Some(2), "persistent");
            assert_eq!(d.routing_key.as_str(), env.event.routing_key());
            got.push(env);
        }
        if done(&got) {
            return got;
        }
        assert!(
            Instant::now() < deadline,
            "events still missing: {:?}",
            got.iter().map(|e| e.event.kind()).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The JSON form documented in `contracts/schema/events.schema.json`.
fn assert_documented_shape(v: &Value) {
    let keys: HashSet<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    let expected: HashSet<&str> = [
        "id",
        "type",
        "version",
        "occurred_at",
        "batch_id",
        "client_id",
        "payload",
    ]
    .into();
    assert_eq!(keys, expected, "envelope keys of {v}");
    assert!(v["id"].as_str().unwrap().starts_with("evt_"));
    assert!(v["batch_id"].as_str().unwrap().starts_with("bat_"));
    assert_eq!(v["version"], 1);
    assert!(v["payload"].is_object());
}

pub(crate) fn kinds_of(events: &[Envelope], batch: &BatchId) -> Vec<&'static str> {
    events
        .iter()
        .filter(|e| &e.batch_id == batch)
        .map(|e| e.event.kind())
        .collect()
}

async fn events_arrive_in_lifecycle_order_with_the_documented_shape(b: Backend) {
    let Some(mut broker) = TestBroker::new().await else {
        return;
    };
    let t = spawn(b, &broker, Roles::ALL, None).await;
    wait_mode(&t, "broker").await;
    let tap = broker.tap().await;
    let (_, key) = t.client(json!({})).await;
    let (_, gated) = t.client(json!({"approval_required": true})).await;
    let mut batches = Vec::new();
    for i in 0..3 {
        let import = t.import(&key, "text/csv", csv(&format!("o{i}"), 25)).await;
        batches.push(import.batch_id);
    }
    // An operator rejects a batch that awaited approval: BatchRejected.
    let rejected = t.import(&gated, "text/csv", csv("r", 3)).await.batch_id;
    let resp = t
        .admin(Method::POST, &format!("/admin/batches/{rejected}/reject"))
        .json(&json!({"reason": "not today"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    for id in &batches {
        t.wait_for(&key, id, BatchStatus::Completed).await;
    }
    let want = ["BatchCreated", "BatchReady", "BatchCompleted"];
    let events = collect(&broker, &tap, |got| {
        batches.iter().all(|id| kinds_of(got, id) == want)
            && kinds_of(got, &rejected) == ["BatchCreated", "BatchRejected"]
    })
    .await;
    // Exactly the outbox, once each.
    let mut recorded = Vec::new();
    for id in batches.iter().chain([&rejected]) {
        recorded.extend(t.db.batch_events(id.as_str()).await.unwrap());
    }
    let ids: HashSet<_> = events.iter().map(|e| e.id.clone()).collect();
    assert_eq!(ids.len(), events.len(), "no duplicates");
    assert_eq!(
        ids,
        recorded
            .iter()
            .map(|e| e.id.clone())
            .collect::<HashSet<_>>()
    );
    // The last acks are marked within the relay's gathering window.
    wait_backlog(&t, 0).await;
    let ready = t.readyz().await;
    assert_eq!(ready["events"]["outbox_backlog"], 0, "{ready}");
    t.stop().await;
    broker.cleanup().await;
}

/// Submits racing the relay: their first events are handed to it at commit while its
/// reads find others' rows in SQL, and still every event leaves once, each batch's in order.
async fn concurrent_submits_publish_each_event_once_in_lifecycle_order(b: Backend) {
    let Some(mut broker) = TestBroker::new().await else {
        return;
    };
    let t = spawn_tweaked(b, &broker, Roles::ALL, None, |c| {
        c.api.max_concurrent_imports_per_client = 64;
    })
    .await;
    wait_relaying(&t).await;
    let tap = broker.tap().await;
    let (_, key) = t.client(json!({})).await;
    let submits = (0..40).map(|i| t.import(&key, "text/csv", csv(&format!("c{i}"), 2)));
    let batches: Vec<BatchId> = futures::future::join_all(submits)
        .await
        .into_iter()
        .map(|v| v.batch_id)
        .collect();
    for id in &batches {
        t.wait_for(&key, id, BatchStatus::Completed).await;
    }
    let want = ["BatchCreated", "BatchReady", "BatchCompleted"];
    let events = collect(&broker, &tap, |got| {
        batches
            .iter()
            .all(|id| kinds_of(got, id).len() >= want.len())
    })
    .await;
    for id in &batches {
        assert_eq!(kinds_of(&events, id), want, "{id}");
    }
    let ids: HashSet<_> = events.iter().map(|e| e.id.clone()).collect();
    assert_eq!(ids.len(), events.len(), "no event was published twice");
    // Nothing more arrives later either.
    wait_backlog(&t, 0).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(broker.drain(&tap).await.is_empty());
    t.stop().await;
    broker.cleanup().await;
}

async fn broker_outage_falls_back_to_polling_and_the_outbox_drains(b: Backend) {
    let Some(mut broker) = TestBroker::new().await else {
        return;
    };
    let proxy = Proxy::start("127.0.0.1:5672".parse().unwrap()).await;
    let via_proxy = broker
        .url
        .replacen("127.0.0.1:5672", &proxy.addr.to_string(), 1);
    // A long safety sweep: while the broker is healthy, batches move by broker only. Small
    // relay pages: the backlog drains over several, each read while the one before is sent.
    let t = spawn_tweaked(b, &broker, Roles::ALL, Some(&via_proxy), |c| {
        c.amqp.safety_sweep_ms = 60_000;
        c.outbox.batch_size = 4;
    })
    .await;
    wait_mode(&t, "broker").await;
    let tap = broker.tap().await;
    let (_, key) = t.client(json!({})).await;
    let before = t.import(&key, "text/csv", csv("before", 5)).await.batch_id;
    t.wait_for(&key, &before, BatchStatus::Completed).await;
    // Cut with nothing in flight: a publish confirmed by the broker but cut before its ack
    // arrived would be sent again, a duplicate this test is not about.
    wait_backlog(&t, 0).await;

    proxy.cut();
    wait_mode(&t, "polling").await;
    let mut during = Vec::new();
    for i in 0..5 {
        let resp = t
            .submit(&key, "text/csv", csv(&format!("cut{i}"), 5))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 202, "submits succeed with the broker down");
        let view: dataflow_contracts::http::ImportView = resp.json().await.unwrap();
        during.push(view.batch_id);
    }
    for id in &during {
        t.wait_for(&key, id, BatchStatus::Completed).await;
    }
    let cut = t.readyz().await;
    assert_eq!(cut["events"]["mode"], "polling", "{cut}");
    let backlog = cut["events"]["outbox_backlog"].as_i64().unwrap();
    assert!(
        backlog >= 15,
        "created, ready and completed of 5 batches wait in the outbox: {cut}"
    );

    proxy.heal();
    wait_mode(&t, "broker").await;
    let all: Vec<BatchId> = [before].into_iter().chain(during).collect();
    let want = ["BatchCreated", "BatchReady", "BatchCompleted"];
    let events = collect(&broker, &tap, |got| {
        all.iter().all(|id| kinds_of(got, id).len() >= 3)
    })
    .await;
    // Let a straggler (a duplicate) arrive if there were one.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut events = events;
    events.extend(collect(&broker, &tap, |_| true).await);
    for id in &all {
        assert_eq!(
            kinds_of(&events, id),
            want,
            "every event once, in order, for {id}"
        );
    }
    wait_backlog(&t, 0).await;
    let ready = t.readyz().await;
    assert_eq!(ready["events"]["outbox_backlog"], 0, "drained: {ready}");
    for id in &all {
        assert_eq!(t.completions(id).await, 1);
    }
    t.stop().await;
    broker.cleanup().await;
}

async fn duplicate_and_unacknowledged_deliveries_complete_each_batch_once(b: Backend) {
    let Some(broker) = TestBroker::new().await else {
        return;
    };
    // An API process (it relays the outbox); no worker yet.
    let api = spawn(b, &broker, Roles::API, None).await;
    wait_mode(&api, "broker").await;
    // A consumer that takes the BatchReady messages and dies before acknowledging them.
    let doomed = broker._conn.create_channel().await.unwrap();
    doomed
        .basic_qos(100, BasicQosOptions::default())
        .await
        .unwrap();
    let mut deliveries = doomed
        .basic_consume(
            broker.names.ready_queue.as_str().into(),
            "doomed".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let (_, key) = api.client(json!({})).await;
    let mut batches = Vec::new();
    for i in 0..3 {
        batches.push(
            api.import(&key, "text/csv", csv(&format!("d{i}"), 30))
                .await
                .batch_id,
        );
    }
    let mut taken = Vec::new();
    while taken.len() < batches.len() {
        let d = tokio::time::timeout(Duration::from_secs(10), deliveries.next())
            .await
            .expect("BatchReady delivered")
            .unwrap()
            .unwrap();
        taken.push(d.data);
    }
    doomed.close(200, "consumer died".into()).await.unwrap();
    // And every BatchReady twice more, as a broker may after a lost ack.
    for body in &taken {
        broker.publish("batch.ready", body).await;
        broker.publish("batch.ready", body).await;
    }

    let worker = api
        .sibling_with(Roles::WORKER, |c| c.amqp.safety_sweep_ms = 60_000)
        .await;
    for id in &batches {
        api.wait_for(&key, id, BatchStatus::Completed).await;
    }
    let stats = worker.worker_stats();
    let deadline = Instant::now() + Duration::from_secs(10);
    while stats.deliveries.load(Ordering::Relaxed) < 9 {
        assert!(
            Instant::now() < deadline,
            "3 redelivered + 6 duplicate deliveries settled, saw {}",
            stats.deliveries.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for id in &batches {
        assert_eq!(api.completions(id).await, 1, "one completion for {id}");
    }
    assert_eq!(stats.completed.load(Ordering::Relaxed), 3);
    assert_eq!(broker.depth(&broker.names.ready_queue).await, 0);
    assert_eq!(broker.depth(&broker.names.dead_letter_queue).await, 0);
    worker.stop().await;
    api.stop().await;
    broker.cleanup().await;
}

async fn poison_messages_end_in_the_dead_letter_queue(b: Backend) {
    let Some(broker) = TestBroker::new().await else {
        return;
    };
    let t = spawn_tweaked(b, &broker, Roles::ALL, None, |c| {
        c.amqp.delivery_limit = 3;
    })
    .await;
    wait_mode(&t, "broker").await;
    // Not an envelope at all: dead-lettered at once.
    broker.publish("batch.ready", b"{\"surprise\": true").await;
    // Well formed, but no such batch here: requeued until the delivery limit.
    let stranger = Envelope::new(
        BatchId::generate(),
        ClientId::generate(),
        0,
        Event::BatchReady(BatchReady {
            import_id: ImportId::generate(),
        }),
    );
    broker
        .publish("batch.ready", &serde_json::to_vec(&stranger).unwrap())
        .await;
    let (_, key) = t.client(json!({})).await;
    let mut batches = Vec::new();
    for i in 0..3 {
        batches.push(
            t.import(&key, "text/csv", csv(&format!("p{i}"), 10))
                .await
                .batch_id,
        );
    }
    for id in &batches {
        t.wait_for(&key, id, BatchStatus::Completed).await;
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut dead = Vec::new();
    while dead.len() < 2 {
        dead.extend(broker.drain(&broker.names.dead_letter_queue).await);
        assert!(Instant::now() < deadline, "dead letters: {}", dead.len());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let reasons: HashMap<Vec<u8>, String> = dead
        .iter()
        .map(|d| (d.data.clone(), death_reason(d)))
        .collect();
    assert_eq!(reasons[b"{\"surprise\": true".as_slice()], "rejected");
    assert_eq!(
        reasons[&serde_json::to_vec(&stranger).unwrap()],
        "delivery_limit",
        "requeued until the broker's delivery limit"
    );
    let stats = t.worker_stats();
    // 1 malformed + 4 deliveries of the stranger (the limit is 3 redeliveries) + 3 batches.
    assert!(stats.deliveries.load(Ordering::Relaxed) >= 1 + 3 + 3);
    assert_eq!(broker.depth(&broker.names.ready_queue).await, 0);
    t.stop().await;
    broker.cleanup().await;
}

/// The `reason` of the first `x-death` entry the broker put on a dead letter.
fn death_reason(d: &lapin::message::Delivery) -> String {
    use lapin::types::AMQPValue;
    let headers = d
        .properties
        .headers()
        .as_ref()
        .expect("dead letters carry headers");
    let Some(AMQPValue::FieldArray(deaths)) = headers.inner().get("x-death") else {
        panic!("no x-death header: {headers:?}");
    };
    let Some(AMQPValue::FieldTable(first)) = deaths.as_slice().first() else {
        panic!("empty x-death: {deaths:?}");
    };
    match first.inner().get("reason") {
        Some(AMQPValue::LongString(r)) => String::from_utf8_lossy(r.as_bytes()).into_owned(),
        other => panic!("x-death without a reason: {other:?}"),
    }
}

async fn the_outbox_marks_exact_ids_and_one_relay_holds_the_lease(b: Backend) {
    let Some((_test_db, db)) = outbox_ledger(b).await else {
        return;
    };
    for i in 0..4 {
        sqlx::query(
            "INSERT INTO outbox (event_id, batch_id, event_type, routing_key, body, created_at) \
             VALUES ($1, 'bat_x', 'BatchReady', 'batch.ready', '{}', 0)",
        )
        .bind(format!("evt_{i}"))
        .execute(db.pool())
        .await
        .unwrap();
    }
    let ids = pending_ids(&db, 10, &[]).await;
    assert_eq!(ids.len(), 4);
    // Only the ids handed over, never the rows between them.
    assert_eq!(db.mark_published(&[ids[0], ids[2]]).await.unwrap(), 2);
    let left = pending_ids(&db, 10, &[]).await;
    assert_eq!(left, [ids[1], ids[3]]);
    assert_eq!(
        pending_ids(&db, 10, &[ids[1]]).await,
        [ids[3]],
        "not in flight"
    );
    assert_eq!(db.mark_published(&[ids[0]]).await.unwrap(), 0, "idempotent");

    assert!(db.take_lease(OUTBOX_RELAY, "a", 10_000).await.unwrap());
    assert!(
        !db.take_lease(OUTBOX_RELAY, "b", 10_000).await.unwrap(),
        "held by a"
    );
    assert!(
        db.take_lease(OUTBOX_RELAY, "a", 10_000).await.unwrap(),
        "renewed"
    );
    db.release_lease(OUTBOX_RELAY, "a").await.unwrap();
    assert!(
        db.take_lease(OUTBOX_RELAY, "b", 1).await.unwrap(),
        "handed back"
    );
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(
        db.take_lease(OUTBOX_RELAY, "c", 10_000).await.unwrap(),
        "lapsed"
    );
    db.close().await;
}

/// The relay queues each publish without waiting for lapin to write it, so many are on
/// their way at once: a backlog of several read pages, far past the confirm window, still
/// reaches a queue bound to the exchange exactly once and in id order, every row marked.
async fn a_backlog_leaves_in_id_order_past_pages_and_the_confirm_window(b: Backend) {
    let Some(mut tb) = TestBroker::new().await else {
        return;
    };
    let Some((_test_db, db)) = outbox_ledger(b).await else {
        return;
    };
    let link = BrokerLink::connect(&tb, |c| c.confirm_window = 16).await;
    let tap = tb.tap().await;
    let keys = ["batch.created", "batch.ready", "batch.completed"];
    let expected: Vec<String> = (0..600).map(|i| format!("evt_{i:04}")).collect();
    for (i, event_id) in expected.iter().enumerate() {
        let key = keys[i % keys.len()];
        sqlx::query(
            "INSERT INTO outbox (event_id, batch_id, event_type, routing_key, body, created_at) \
             VALUES ($1, 'bat_x', 'Backlog', $2, '{}', 0)",
        )
        .bind(event_id)
        .bind(key)
        .execute(db.pool())
        .await
        .unwrap();
    }

    let publisher = dataflow_platform::events::Publisher::broker(link.broker.clone());
    let relayed = dataflow_platform::events::relay_once(&db, &publisher, 100)
        .await
        .unwrap();
    assert_eq!(relayed, expected.len(), "one round drains the backlog");
    assert_eq!(db.outbox_backlog().await.unwrap(), 0, "every row marked");
    let got = message_ids(&tb, &tap).await;
    assert_eq!(got, expected, "each row once, in id order");

    link.close().await;
    db.close().await;
    tb.cleanup().await;
}

/// A broker link of a test's own, for relays the test runs itself.
struct BrokerLink {
    broker: std::sync::Arc<dataflow_platform::broker::Broker>,
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl BrokerLink {
    /// Connected, with the AMQP settings `tweak` adjusts.
    async fn connect(
        tb: &TestBroker,
        tweak: impl FnOnce(&mut dataflow_platform::config::AmqpConfig),
    ) -> BrokerLink {
        let mut config = Config::default();
        tb.configure(&mut config, None);
        tweak(&mut config.amqp);
        let broker = std::sync::Arc::new(dataflow_platform::broker::Broker::new(
            vec![Secret::new(tb.url.clone())],
            config.amqp.clone(),
            tokio::sync::watch::channel(Mode::Polling).0,
        ));
        let stop = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(broker.clone().run(stop.clone()));
        tokio::time::timeout(Duration::from_secs(15), broker.connected())
            .await
            .expect("the broker connects");
        BrokerLink { broker, stop, task }
    }

    async fn close(self) {
        self.stop.cancel();
        self.task.await.unwrap();
    }
}

/// The message ids in `queue` now, in the order they arrived.
async fn message_ids(tb: &TestBroker, queue: &str) -> Vec<String> {
    tb.drain(queue)
        .await
        .iter()
        .map(|d| d.properties.message_id().clone().unwrap().to_string())
        .collect()
}

/// PostgreSQL numbers outbox rows when they are written, not when they commit. A submit
/// holds its batch's first two events (the lowest ids) uncommitted while the relay reads a
/// backlog page by page; the submit then commits and its batch completes while the relay
/// still reads ahead. The completion must not leave before the events of the submit.
async fn a_batchs_events_leave_in_lifecycle_order_past_a_submit_held_open_across_a_page() {
    let Some(mut tb) = TestBroker::new().await else {
        return;
    };
    let Some((_test_db, db)) = outbox_ledger(Backend::Postgres).await else {
        return;
    };
    // One confirm at a time: the backlog takes a while to send, page after page.
    let link = BrokerLink::connect(&tb, |c| c.confirm_window = 1).await;
    let tap = tb.tap().await;
    let event = |event_id: &str, key: &str| {
        sqlx::query(
            "INSERT INTO outbox (event_id, batch_id, event_type, routing_key, body, created_at) \
             VALUES ($1, 'bat_x', 'Batch', $2, '{}', 0)",
        )
        .bind(event_id.to_owned())
        .bind(key.to_owned())
    };
    let mut submit = db.pool().begin().await.unwrap();
    event("evt_x_created", "batch.created")
        .execute(&mut *submit)
        .await
        .unwrap();
    event("evt_x_ready", "batch.ready")
        .execute(&mut *submit)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO outbox (event_id, batch_id, event_type, routing_key, body, created_at) \
         SELECT 'evt_backlog_' || i, 'bat_y', 'Backlog', 'batch.created', '{}', 0 \
         FROM generate_series(1, 2000) AS i",
    )
    .execute(db.pool())
    .await
    .unwrap();

    let publisher = dataflow_platform::events::Publisher::broker(link.broker.clone());
    let round = {
        let (db, publisher) = (db.clone(), publisher.clone());
        tokio::spawn(
            async move { dataflow_platform::events::relay_once(&db, &publisher, 10).await },
        )
    };
    // The first page went out without the submit's rows…
    let deadline = Instant::now() + Duration::from_secs(10);
    while tb.depth(&tap).await == 0 {
        assert!(Instant::now() < deadline, "the relay published nothing");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // …then the submit commits, and its batch completes, while the relay reads on.
    submit.commit().await.unwrap();
    event("evt_x_completed", "batch.completed")
        .execute(db.pool())
        .await
        .unwrap();
    round.await.unwrap().unwrap();
    dataflow_platform::events::relay_once(&db, &publisher, 10)
        .await
        .unwrap();
    assert_eq!(db.outbox_backlog().await.unwrap(), 0);

    let got = message_ids(&tb, &tap).await;
    assert_eq!(got.len(), 2003, "every row once");
    let batch: Vec<&str> = got
        .iter()
        .map(String::as_str)
        .filter(|id| id.starts_with("evt_x_"))
        .collect();
    assert_eq!(
        batch,
        ["evt_x_created", "evt_x_ready", "evt_x_completed"],
        "the batch's events in lifecycle order"
    );
    link.close().await;
    db.close().await;
    tb.cleanup().await;
}
register!(a_batchs_events_leave_in_lifecycle_order_past_a_submit_held_open_across_a_page);

/// A migrated ledger of its own, for the outbox tests that need no broker.
async fn outbox_ledger(
    b: Backend,
) -> Option<(crate::helpers::TestDb, dataflow_platform::ledger::Db)> {
    let test_db = crate::helpers::TestDb::create(b).await?;
    let db = dataflow_platform::ledger::Db::connect(&test_db.url, 2)
        .await
        .unwrap();
    db.migrate().await.unwrap();
    Some((test_db, db))
}

/// The ids the relay would read: unpublished, not in `except`.
async fn pending_ids(db: &dataflow_platform::ledger::Db, limit: u32, except: &[i64]) -> Vec<i64> {
    db.unpublished_events(limit, except)
        .await
        .unwrap()
        .iter()
        .map(|r| r.id)
        .collect()
}

/// Pruning walks the outbox a page at a time from its oldest row: it deletes every row
/// published before the retention, over more than one page, and keeps rows still
/// unpublished and rows published within the retention.
async fn the_outbox_prunes_published_rows_past_retention_page_by_page(b: Backend) {
    let Some((_test_db, db)) = outbox_ledger(b).await else {
        return;
    };
    sqlx::query(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 2500) \
         INSERT INTO outbox (event_id, batch_id, event_type, routing_key, body, created_at) \
         SELECT 'evt_old_' || i, 'bat_x', 'BatchReady', 'batch.ready', '{}', 0 FROM n",
    )
    .execute(db.pool())
    .await
    .unwrap();
    let old = pending_ids(&db, 5_000, &[]).await;
    assert_eq!(old.len(), 2_500);
    // Two old rows stay unpublished: one on the first page, one on the second.
    let pending = [old[5], old[1_500]];
    let published: Vec<i64> = old
        .iter()
        .copied()
        .filter(|id| !pending.contains(id))
        .collect();
    assert_eq!(db.mark_published(&published).await.unwrap(), 2_498);
    sqlx::query("UPDATE outbox SET published_at = 1 WHERE published_at IS NOT NULL")
        .execute(db.pool())
        .await
        .unwrap();
    let now = db.now_ms().await.unwrap();
    for i in 0..10 {
        sqlx::query(
            "INSERT INTO outbox (event_id, batch_id, event_type, routing_key, body, created_at) \
             VALUES ($1, 'bat_y', 'BatchReady', 'batch.ready', '{}', $2)",
        )
        .bind(format!("evt_young_{i}"))
        .bind(now)
        .execute(db.pool())
        .await
        .unwrap();
    }
    let young = pending_ids(&db, 100, &pending).await;
    assert_eq!(db.mark_published(&young).await.unwrap(), 10);

    assert_eq!(db.prune_published(60_000).await.unwrap(), 2_498);
    let left: Vec<i64> = sqlx::query_scalar("SELECT id FROM outbox ORDER BY id")
        .fetch_all(db.pool())
        .await
        .unwrap();
    let kept: Vec<i64> = pending.iter().chain(&young).copied().collect();
    assert_eq!(left, kept, "the unpublished and the young rows are kept");
    let still = pending_ids(&db, 10, &[]).await;
    assert_eq!(still, pending, "the unpublished rows are still relayed");
    assert_eq!(
        db.prune_published(60_000).await.unwrap(),
        0,
        "nothing left to prune"
    );
    db.close().await;
}

/// `amqps://` to something that does not speak TLS: the handshake fails as an error (the
/// process-wide rustls provider is in place, so nothing panics), the supervisor keeps
/// retrying, and batches are processed by polling meanwhile.
async fn amqps_failure_is_an_error_and_polling_carries_on(b: Backend) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let attempts = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = attempts.clone();
    let server = tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            use tokio::io::AsyncWriteExt;
            let _ = sock.write_all(b"not tls\r\n").await;
        }
    });
    let Some(t) = TestApp::spawn_with(b, Roles::ALL, |c| {
        c.amqp_url = Some(Secret::new(format!(
            "amqps://guest:guest@127.0.0.1:{port}/%2f"
        )));
        c.amqp.reconnect_min_ms = 20;
        c.amqp.reconnect_max_ms = 50;
    })
    .await
    else {
        server.abort();
        return;
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while attempts.load(Ordering::SeqCst) < 3 {
        assert!(Instant::now() < deadline, "the supervisor stopped retrying");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(t.readyz().await["events"]["mode"], "polling");
    let (_, key) = t.client(json!({})).await;
    let id = t.import(&key, "text/csv", csv("tls", 3)).await.batch_id;
    t.wait_for(&key, &id, BatchStatus::Completed).await;
    t.stop().await;
    server.abort();
}

/// `amqp_url` lists a node that is down before the live one: the link passes over it, comes
/// up on the next, and `/readyz` names that node; batches then move by the broker.
async fn a_node_that_is_down_is_passed_over_for_the_next_listed() {
    let Some(broker) = TestBroker::new().await else {
        return;
    };
    let down = crate::common::services::down_amqp_url();
    let urls = format!("{down},{}", broker.url);
    let t = spawn_tweaked(Backend::Sqlite, &broker, Roles::ALL, Some(&urls), |c| {
        c.amqp.safety_sweep_ms = 60_000;
    })
    .await;
    let ready = wait_mode(&t, "broker").await;
    let live = dataflow_platform::broker::endpoint(&broker.url);
    assert_eq!(ready["events"]["node"], live.as_str(), "{ready}");
    let (_, key) = t.client(json!({})).await;
    let id = t.import(&key, "text/csv", csv("next", 3)).await.batch_id;
    t.wait_for(&key, &id, BatchStatus::Completed).await;
    assert!(t.worker_stats().deliveries.load(Ordering::Relaxed) >= 1);
    t.stop().await;
    broker.cleanup().await;
}
register!(a_node_that_is_down_is_passed_over_for_the_next_listed);

/// A link reported broken twice in a row (a publish and its confirm failing together): the
/// supervisor replaces it once, and the second report, about a link already lost, does not
/// end the new one.
async fn a_late_report_about_a_lost_link_leaves_its_successor_up() {
    let Some(broker) = TestBroker::new().await else {
        return;
    };
    let proxy = Proxy::start(service_addr(&broker.url, 5672)).await;
    let via_proxy = url_via(&broker.url, proxy.addr);
    let t = spawn(Backend::Sqlite, &broker, Roles::API, Some(&via_proxy)).await;
    wait_mode(&t, "broker").await;
    assert_eq!(proxy.accepted(), 1);
    let link = t.app.as_ref().unwrap().backends.broker.clone().unwrap();
    let sender = link.sender().unwrap();
    sender.broken();
    sender.broken();
    drop(sender);
    let deadline = Instant::now() + Duration::from_secs(10);
    while proxy.accepted() < 2 || !link.is_connected() {
        assert!(Instant::now() < deadline, "the link never came back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Long enough for the reconnects after a second lost link (backoff 50–200 ms).
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(proxy.accepted(), 2, "one new link, kept");
    assert!(link.is_connected());
    t.stop().await;
    broker.cleanup().await;
}
register!(a_late_report_about_a_lost_link_leaves_its_successor_up);

/// Someone removes the ready queue's binding: the relay's `mandatory` publish of
/// `batch.ready` comes back unroutable, is not marked published, and after the relay's
/// fresh link declared the topology again it is delivered; with the safety sweep at a
/// minute, only that delivery can start the batch in time.
async fn a_returned_batch_ready_is_published_again_after_the_topology_is_restored(b: Backend) {
    let Some(broker) = TestBroker::new().await else {
        return;
    };
    let api = spawn_tweaked(b, &broker, Roles::API, None, |c| {
        c.amqp.safety_sweep_ms = 60_000;
    })
    .await;
    // The API process relays, so only the broker can wake the worker process.
    wait_relaying(&api).await;
    let worker = api.sibling(Roles::WORKER).await;
    wait_mode_of(&worker, Mode::Broker).await;
    let (_, key) = api.client(json!({})).await;
    let first = api.import(&key, "text/csv", csv("bound", 3)).await.batch_id;
    api.wait_for(&key, &first, BatchStatus::Completed).await;
    let stats = worker.worker_stats();
    // What shows the republish is the worker's consumer receiving it. Which claim starts
    // the batch is not: no poll is due for a minute, but the worker looks for more work
    // once a batch ends, and on a busy machine that look after the first batch can come
    // after the second submit and take it (its republished `batch.ready` then finds it
    // taken, and is settled all the same).
    let before = stats.deliveries.load(Ordering::Relaxed);

    broker
        .ch
        .queue_unbind(
            broker.names.ready_queue.as_str().into(),
            broker.names.exchange.as_str().into(),
            "batch.ready".into(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let id = api
        .import(&key, "text/csv", csv("unbound", 3))
        .await
        .batch_id;
    api.wait_for(&key, &id, BatchStatus::Completed).await;
    assert_eq!(api.completions(&id).await, 1);
    wait_backlog(&api, 0).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while stats.deliveries.load(Ordering::Relaxed) <= before {
        assert!(
            Instant::now() < deadline,
            "the returned batch.ready never reached the worker"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    worker.stop().await;
    api.stop().await;
    broker.cleanup().await;
}

/// Waits until the API process `api` is in broker mode and holds the relay lease (it
/// started before any other process of the test).
async fn wait_relaying(api: &TestApp) {
    wait_mode(api, "broker").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while api.db.lease_owner(OUTBOX_RELAY).await.unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "the API process never took the relay lease"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A worker process that does not relay the outbox runs the follow-up jobs its own
/// completions wrote right after the commit, not at its next job poll (an hour here; the
/// wait gives up after 20 s).
async fn a_worker_without_the_relay_runs_its_own_jobs_at_once(b: Backend) {
    let Some(broker) = TestBroker::new().await else {
        return;
    };
    let api = spawn(b, &broker, Roles::API, None).await;
    wait_relaying(&api).await;
    let worker = api
        .sibling_with(Roles::WORKER, |c| c.jobs.poll_interval_ms = 3_600_000)
        .await;
    wait_mode_of(&worker, Mode::Broker).await;
    let (_, key) = api.client(json!({})).await;
    for i in 0..3 {
        let id = api
            .import(&key, "text/csv", csv(&format!("j{i}"), 3))
            .await
            .batch_id;
        api.wait_for(&key, &id, BatchStatus::Completed).await;
        let query = format!("batch_id={id}&kind=report");
        wait_jobs(&api, &query, 1, JobStatus::Done).await;
    }
    worker.stop().await;
    api.stop().await;
    broker.cleanup().await;
}

/// Waits (up to 15 s) until a process without HTTP reaches `mode`.
async fn wait_mode_of(t: &TestApp, want: Mode) {
    let mut mode = t.app.as_ref().unwrap().backends.mode.subscribe();
    tokio::time::timeout(Duration::from_secs(15), mode.wait_for(|m| *m == want))
        .await
        .expect("mode reached in time")
        .unwrap();
}

/// A relay whose lease lapses while it reads a page (here: the read waits on a table lock
/// past the lease) must not publish that page once a successor holds the lease.
async fn a_relay_whose_lease_lapsed_mid_round_publishes_nothing_beside_its_successor() {
    let Some(mut tb) = TestBroker::new().await else {
        return;
    };
    let Some((test_db, db)) = outbox_ledger(Backend::Postgres).await else {
        return;
    };
    let link = BrokerLink::connect(&tb, |c| c.confirm_timeout_ms = 200).await;
    let tap = tb.tap().await;
    sqlx::query(
        "INSERT INTO outbox (event_id, batch_id, event_type, routing_key, body, created_at) \
         SELECT 'evt_' || i, 'bat_x', 'Batch', 'batch.created', '{}', 0 \
         FROM generate_series(1, 5) AS i",
    )
    .execute(db.pool())
    .await
    .unwrap();
    // Its own session: the ledger's end a transaction left idle for long.
    let mut session = <sqlx::PgConnection as sqlx::Connection>::connect(&test_db.url)
        .await
        .unwrap();
    let mut stall = sqlx::Connection::begin(&mut session).await.unwrap();
    sqlx::query("LOCK TABLE outbox_pending IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *stall)
        .await
        .unwrap();

    let lease = Duration::from_millis(1_000);
    let settings = dataflow_platform::events::OutboxRelaySettings {
        poll_interval: Duration::from_millis(50),
        retention: Duration::from_secs(3_600),
        batch_size: 100,
        lease,
    };
    let shutdown = tokio_util::sync::CancellationToken::new();
    let relay = tokio::spawn(dataflow_platform::events::run_relay(
        db.clone(),
        dataflow_platform::events::Publisher::broker(link.broker.clone()),
        db.commits().outbox(),
        settings,
        shutdown.clone(),
    ));
    let deadline = Instant::now() + Duration::from_secs(10);
    while db.lease_owner(OUTBOX_RELAY).await.unwrap().is_none() {
        assert!(Instant::now() < deadline, "the relay never took its lease");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The relay reads, and waits; its lease lapses and a successor takes it.
    tokio::time::sleep(lease + Duration::from_millis(200)).await;
    assert!(
        db.take_lease(OUTBOX_RELAY, "successor", 60_000)
            .await
            .unwrap(),
        "the relay's lease lapsed"
    );
    stall.commit().await.unwrap();

    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        tb.depth(&tap).await,
        0,
        "nothing published after the lease lapsed"
    );
    assert_eq!(
        db.outbox_backlog().await.unwrap(),
        5,
        "the rows are the successor's"
    );
    shutdown.cancel();
    relay.await.unwrap();
    assert_eq!(
        db.lease_owner(OUTBOX_RELAY).await.unwrap().as_deref(),
        Some("successor")
    );
    link.close().await;
    db.close().await;
    tb.cleanup().await;
}
register!(a_relay_whose_lease_lapsed_mid_round_publishes_nothing_beside_its_successor);

/// With the broker healthy the claim loop sleeps for the long safety sweep; a lease that
/// simply lapses (its holder froze or lost the ledger, and no failure was recorded)
/// announces nothing on the broker. The loop must still wake when that lease runs out, not
/// a whole sweep later.
async fn a_lapsed_lease_is_taken_over_when_it_runs_out_not_at_the_sweep(b: Backend) {
    let Some(broker) = TestBroker::new().await else {
        return;
    };
    let api = spawn(b, &broker, Roles::API, None).await;
    wait_mode(&api, "broker").await;
    let (_, key) = api.client(json!({})).await;
    let imp = api.import(&key, "text/csv", csv("lapse", 30)).await;
    wait_backlog(&api, 0).await;
    // A holder that claimed the batch and was never heard of again; its lease is short, so
    // it lapses before the fleet registry could judge the holder gone.
    let ghost = api
        .db
        .claim_next("ghost", 2_000, Claimable::AnyClient, Bundle::ONE)
        .await
        .unwrap();
    let ghost: Vec<BatchId> = ghost.into_iter().map(|l| l.batch_id).collect();
    assert_eq!(ghost, std::slice::from_ref(&imp.batch_id));

    let worker = api
        .sibling_with(Roles::WORKER, |c| c.amqp.safety_sweep_ms = 60_000)
        .await;
    let started = Instant::now();
    let done = api
        .wait_for(&key, &imp.batch_id, BatchStatus::Completed)
        .await;
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "taken over after {:?}",
        started.elapsed()
    );
    assert_eq!((done.attempts, done.takeovers), (1, 1), "{done:?}");
    worker.stop().await;
    api.stop().await;
    broker.cleanup().await;
}

/// `batch.ready` deliveries start batches under the same rules as the claim loop: a client
/// at its cap does not get another batch because a message named one, and the batches its
/// deliveries could not start are started as places free up (nothing else wakes this
/// worker: its polls and sweeps are a minute apart).
async fn deliveries_keep_a_clients_cap_and_its_turn(b: Backend) {
    let Some(broker) = TestBroker::new().await else {
        return;
    };
    let api = spawn(b, &broker, Roles::API, None).await;
    wait_mode(&api, "broker").await;
    let (capped, capped_key) = api.client(json!({"max_concurrent_batches": 1})).await;
    let (_, other_key) = api.client(json!({})).await;
    let mut worker = api.spawn_worker_process_with("broker-fair", None, |c| {
        c.worker.poll_interval_ms = 60_000;
        c.amqp.safety_sweep_ms = 60_000;
    });
    let mut capped_batches = Vec::new();
    for i in 0..4 {
        let body = csv(&format!("capped{i}"), 400);
        capped_batches.push(api.import(&capped_key, "text/csv", body).await.batch_id);
    }
    let other = api
        .import(&other_key, "text/csv", csv("other", 400))
        .await
        .batch_id;
    let deadline = Instant::now() + Duration::from_secs(45);
    let (mut most, mut other_done_at, mut capped_done) = (0, None, 0);
    while capped_done < capped_batches.len() || other_done_at.is_none() {
        let held: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM batches WHERE client_id = $1 AND status = 'processing'",
        )
        .bind(capped.as_str())
        .fetch_one(api.db.pool())
        .await
        .unwrap();
        most = most.max(held);
        capped_done = 0;
        for id in &capped_batches {
            if api.db.get_batch(None, id).await.unwrap().unwrap().status == BatchStatus::Completed {
                capped_done += 1;
            }
        }
        if other_done_at.is_none()
            && api
                .db
                .get_batch(None, &other)
                .await
                .unwrap()
                .unwrap()
                .status
                == BatchStatus::Completed
        {
            other_done_at = Some(capped_done);
        }
        assert!(
            Instant::now() < deadline,
            "{capped_done} of the capped client's batches completed, the other's: {other_done_at:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    worker.kill().unwrap();
    worker.wait().unwrap();
    assert_eq!(most, 1, "one of the capped client's batches at a time");
    assert!(
        other_done_at.is_some_and(|n| n < capped_batches.len()),
        "the other client's batch went before the capped client's backlog ended"
    );
    assert_eq!(broker.depth(&broker.names.ready_queue).await, 0);
    api.stop().await;
    broker.cleanup().await;
}

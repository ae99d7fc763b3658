//! One import, one trace: the API and a worker as separate `dataflow` processes on
//! PostgreSQL, Redis and RabbitMQ, exporting over OTLP/HTTP to a receiver the test runs,
//! which decodes each export as the collector would. The trace of one import must hold the
//! API's request, the relay's publish, the worker's delivery, claim, chunk and completion,
//! and the webhook job with its request, each span's parent in the trace; the webhook's
//! receiver must get the trace's context in its `traceparent` header.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use dataflow_contracts::BatchStatus;
use dataflow_platform::config::Secret;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use prost::Message;
use serde_json::json;
use tokio::net::TcpListener;

use crate::common::harness::register;
use crate::common::process::dataflow_command;
use crate::common::services::delete_amqp_topology;
use crate::helpers::{
    Backend, Spawned, TestApp, TestDb, csv, test_amqp_url, test_config, test_redis_url,
};
use crate::sinks::WebhookReceiver;

/// One exported span, as the receiver keeps it.
#[derive(Debug, Clone)]
struct Exported {
    service: String,
    trace_id: String,
    span_id: String,
    /// Empty for a root.
    parent_id: String,
    name: String,
    kind: SpanKind,
    attributes: HashMap<String, String>,
}

/// An OTLP/HTTP trace receiver on loopback: `POST /v1/traces` with a protobuf
/// `ExportTraceServiceRequest`, kept span by span.
struct Receiver {
    addr: SocketAddr,
    spans: Arc<Mutex<Vec<Exported>>>,
}

impl Receiver {
    async fn start() -> Receiver {
        let spans: Arc<Mutex<Vec<Exported>>> = Arc::default();
        let app = axum::Router::new()
            .route("/v1/traces", axum::routing::post(export))
            .with_state(spans.clone());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Receiver { addr, spans }
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn trace(&self, trace_id: &str) -> Vec<Exported> {
        let spans = self.spans.lock().unwrap();
        spans
            .iter()
            .filter(|s| s.trace_id == trace_id)
            .cloned()
            .collect()
    }
}

async fn export(State(spans): State<Arc<Mutex<Vec<Exported>>>>, body: Bytes) -> StatusCode {
    let Ok(request) = ExportTraceServiceRequest::decode(body) else {
        return StatusCode::BAD_REQUEST;
    };
    let mut kept = spans.lock().unwrap();
    for resource in request.resource_spans {
        let service = resource
            .resource
            .iter()
            .flat_map(|r| r.attributes.iter())
            .find(|kv| kv.key == "service.name")
            .map(|kv| text(kv.value.as_ref()))
            .unwrap_or_default();
        for span in resource.scope_spans.into_iter().flat_map(|s| s.spans) {
            kept.push(Exported {
                service: service.clone(),
                trace_id: hex::encode(&span.trace_id),
                span_id: hex::encode(&span.span_id),
                parent_id: hex::encode(&span.parent_span_id),
                kind: SpanKind::try_from(span.kind).unwrap_or(SpanKind::Unspecified),
                attributes: span
                    .attributes
                    .iter()
                    .map(|kv| (kv.key.clone(), text(kv.value.as_ref())))
                    .collect(),
                name: span.name,
            });
        }
    }
    StatusCode::OK
}

/// An attribute's value as text.
fn text(value: Option<&opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match value.and_then(|v| v.value.as_ref()) {
        Some(AnyValue::StringValue(s)) => s.clone(),
        Some(AnyValue::IntValue(n)) => n.to_string(),
        Some(AnyValue::BoolValue(b)) => b.to_string(),
        Some(AnyValue::DoubleValue(d)) => d.to_string(),
        _ => String::new(),
    }
}

/// A loopback port nobody listens on now, for a process that binds it itself.
async fn free_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

/// A `dataflow <role>` process exporting its traces to `receiver` as `service`.
fn spawn(
    config: &dataflow_platform::Config,
    role: &str,
    service: &str,
    receiver: &Receiver,
) -> Spawned {
    std::fs::create_dir_all(&config.data_dir).unwrap();
    let log = std::fs::File::create(config.data_dir.join(format!("{role}.log"))).unwrap();
    let child = dataflow_command(config, role, role, Some(log))
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint())
        .env("OTEL_SERVICE_NAME", service)
        // Exported within a tenth of a second, not the default five.
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .spawn()
        .unwrap();
    Spawned(child)
}

/// The API and a worker as `dataflow` processes exporting to `receiver`, on a database,
/// Redis prefix and exchange of their own, with a client whose webhooks go to `hooks`.
struct Stack {
    receiver: Receiver,
    hooks: WebhookReceiver,
    config: dataflow_platform::Config,
    names: dataflow_platform::broker::Names,
    api: TestApp,
    key: String,
    amqp_url: String,
    _api_process: Spawned,
}

impl Stack {
    /// The API process and the client; `None` when a service is missing and not required.
    async fn start() -> Option<Stack> {
        let amqp_url = test_amqp_url().await?;
        let redis_url = test_redis_url().await?;
        let test_db = TestDb::create(Backend::Postgres).await?;
        let receiver = Receiver::start().await;
        let hooks = WebhookReceiver::start(200).await;
        let tag = ulid::Ulid::new().to_string().to_lowercase();
        let mut config = test_config(&test_db);
        config.listen = free_port().await;
        config.redis_url = Some(Secret::new(redis_url));
        config.redis_prefix = format!("dftest-{tag}");
        config.amqp_url = Some(Secret::new(amqp_url.clone()));
        config.amqp.prefix = format!("dftest-{tag}.");
        // The delivery claims the batch, not a sweep that happens to come first.
        config.amqp.safety_sweep_ms = 60_000;
        config.jobs.webhook_allow_private = true;
        config.jobs.poll_interval_ms = 50;
        let names = dataflow_platform::broker::Names::new(&config.amqp);
        let api_process = spawn(&config, "serve", "dataflow-api", &receiver);
        let api = TestApp::attach(config.clone(), test_db).await;
        let deadline = Instant::now() + Duration::from_secs(30);
        while api.http.get(api.url("/healthz")).send().await.is_err() {
            assert!(Instant::now() < deadline, "the API process never answered");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let (_, key) = api
            .client(json!({"webhook_url": hooks.url(), "rate_burst": 100}))
            .await;
        Some(Stack {
            receiver,
            hooks,
            config,
            names,
            api,
            key,
            amqp_url,
            _api_process: api_process,
        })
    }

    /// Starts the worker process and waits until its consumer is on the ready queue.
    async fn worker(&self) -> Spawned {
        let worker = spawn(&self.config, "worker", "dataflow-worker", &self.receiver);
        let conn = self.connection().await;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            // A passive declare of a queue not there yet closes its channel: one per look.
            let ch = conn.create_channel().await.unwrap();
            let passive = QueueDeclareOptions {
                passive: true,
                ..Default::default()
            };
            let declared = ch
                .queue_declare(
                    self.names.ready_queue.as_str().into(),
                    passive,
                    FieldTable::default(),
                )
                .await;
            if declared.is_ok_and(|q| q.consumer_count() >= 1) {
                return worker;
            }
            assert!(Instant::now() < deadline, "the worker never consumed");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn connection(&self) -> lapin::Connection {
        lapin::Connection::connect(&self.amqp_url, lapin::ConnectionProperties::default())
            .await
            .unwrap()
    }

    /// The spans of `trace_id` once every `wanted` one (service, name — a trailing space
    /// matches a prefix — and kind) is there and every parent is in the trace.
    async fn trace(&self, trace_id: &str, wanted: &[(&str, &str, SpanKind)]) -> Vec<Exported> {
        let found = |spans: &[Exported], (service, name, kind): (&str, &str, SpanKind)| {
            spans.iter().any(|s| {
                (service.is_empty() || s.service == service)
                    && s.kind == kind
                    && if name.ends_with(' ') {
                        s.name.starts_with(name)
                    } else {
                        s.name == name
                    }
            })
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let spans = self.receiver.trace(trace_id);
            let ids: HashSet<&str> = spans.iter().map(|s| s.span_id.as_str()).collect();
            let orphans = spans
                .iter()
                .filter(|s| !s.parent_id.is_empty() && !ids.contains(s.parent_id.as_str()))
                .count();
            if orphans == 0 && wanted.iter().all(|w| found(&spans, *w)) {
                return spans;
            }
            assert!(
                Instant::now() < deadline,
                "trace {trace_id} is missing spans or parents: {spans:#?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn finish(self) {
        let ch = self.connection().await.create_channel().await.unwrap();
        delete_amqp_topology(&ch, &self.names, &[]).await;
    }
}

/// The trace id and parent span id of a webhook's `traceparent`.
fn trace_of(hook: &crate::sinks::Hook) -> (String, String) {
    let traceparent = hook.header("traceparent").to_owned();
    let parts: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(parts.len(), 4, "a W3C traceparent: {traceparent:?}");
    (parts[1].to_owned(), parts[2].to_owned())
}

async fn one_import_is_one_trace_from_the_request_to_the_webhook() {
    let Some(stack) = Stack::start().await else {
        return;
    };
    let _worker_process = stack.worker().await;
    let (api, key, names, hooks) = (&stack.api, &stack.key, &stack.names, &stack.hooks);

    let import = api.import(key, "text/csv", csv("traced", 3)).await;
    api.wait_for(key, &import.batch_id, BatchStatus::Completed)
        .await;
    let hook = hooks
        .wait_until("a webhook", |h| !h.is_empty())
        .await
        .remove(0);
    let (trace_id, webhook_parent) = trace_of(&hook);

    // Every span named here is in the trace once exported, each under a parent of the trace.
    let spans = stack
        .trace(
            &trace_id,
            &[
                ("dataflow-api", "POST /v1/imports", SpanKind::Server),
                ("", "publish ", SpanKind::Producer),
                ("dataflow-worker", "process ", SpanKind::Consumer),
                ("dataflow-worker", "claim", SpanKind::Internal),
                ("dataflow-worker", "process", SpanKind::Internal),
                ("dataflow-worker", "chunk", SpanKind::Internal),
                ("dataflow-worker", "complete", SpanKind::Internal),
                ("dataflow-worker", "process webhook", SpanKind::Consumer),
                ("dataflow-worker", "POST", SpanKind::Client),
            ],
        )
        .await;

    // One root: the producer's request.
    let roots: Vec<&Exported> = spans.iter().filter(|s| s.parent_id.is_empty()).collect();
    assert_eq!(roots.len(), 1, "one root: {roots:#?}");
    assert_eq!(roots[0].name, "POST /v1/imports");
    assert_eq!(roots[0].attributes["http.route"], "/v1/imports");
    assert_eq!(roots[0].attributes["http.response.status_code"], "202");
    // The receiver's request is the webhook job's client span.
    let post = spans
        .iter()
        .find(|s| s.span_id == webhook_parent)
        .expect("the webhook's traceparent names a span of the trace");
    assert_eq!((post.name.as_str(), post.kind), ("POST", SpanKind::Client));
    // Broker spans follow the messaging conventions.
    let publish = spans.iter().find(|s| s.kind == SpanKind::Producer).unwrap();
    assert_eq!(publish.attributes["messaging.system"], "rabbitmq");
    assert_eq!(publish.attributes["messaging.operation.type"], "publish");
    assert_eq!(
        publish.attributes["messaging.destination.name"],
        names.exchange
    );
    let delivery = spans
        .iter()
        .find(|s| s.kind == SpanKind::Consumer && s.name.starts_with("process dftest-"))
        .unwrap();
    assert_eq!(delivery.attributes["messaging.operation.type"], "process");
    assert_eq!(
        delivery.attributes["messaging.destination.name"],
        names.ready_queue
    );
    // The delivery is the child of a publish: the context went through the message headers.
    let parent_of_delivery = spans
        .iter()
        .find(|s| s.span_id == delivery.parent_id)
        .unwrap();
    assert_eq!(parent_of_delivery.kind, SpanKind::Producer);
    let job = spans.iter().find(|s| s.name == "process webhook").unwrap();
    assert_eq!(job.attributes["messaging.system"], "redis");

    // Logs of the worker lead to the trace.
    let log = std::fs::read_to_string(stack.config.data_dir.join("worker.log")).unwrap();
    assert!(
        log.lines()
            .any(|l| l.contains("batch completed") && l.contains(&format!("trace_id={trace_id}"))),
        "the worker's log names the trace: {log}"
    );
    stack.finish().await;
}
register!(one_import_is_one_trace_from_the_request_to_the_webhook);

/// Small imports waiting when the worker starts are claimed and completed together, as a
/// bundle in one commit; each is still a trace of its own: its completion, its event and its
/// webhook continue its own request's trace, not the bundle's first member's.
async fn each_import_of_a_bundle_is_a_trace_of_its_own() {
    let Some(stack) = Stack::start().await else {
        return;
    };
    let (api, key) = (&stack.api, &stack.key);
    let mut batches = Vec::new();
    for i in 0..3 {
        let body = csv(&format!("bundled{i}"), 2);
        batches.push(api.import(key, "text/csv", body).await.batch_id);
    }
    let _worker_process = stack.worker().await;
    for id in &batches {
        api.wait_for(key, id, BatchStatus::Completed).await;
    }
    // Each batch's webhooks: its creation's (sent at submit, in its request's trace) and
    // its completion's, which must continue the same trace.
    let of_type = |hooks: &[crate::sinks::Hook], kind: &str| -> HashMap<String, String> {
        hooks
            .iter()
            .filter(|h| h.json()["type"] == kind)
            .map(|h| {
                (
                    h.json()["batch_id"].as_str().unwrap().to_owned(),
                    trace_of(h).0,
                )
            })
            .collect()
    };
    let hooks = stack
        .hooks
        .wait_until("each batch's created and completed webhooks", |h| {
            of_type(h, "BatchCreated").len() == 3 && of_type(h, "BatchCompleted").len() == 3
        })
        .await;
    let (created, completed) = (
        of_type(&hooks, "BatchCreated"),
        of_type(&hooks, "BatchCompleted"),
    );
    assert_eq!(
        created, completed,
        "each completion in its own import's trace"
    );
    let traces: HashSet<&String> = completed.values().collect();
    assert_eq!(traces.len(), 3, "one trace per import: {traces:?}");
    for trace_id in &traces {
        let spans = stack
            .trace(
                trace_id,
                &[
                    ("dataflow-api", "POST /v1/imports", SpanKind::Server),
                    ("dataflow-worker", "complete", SpanKind::Internal),
                    ("dataflow-worker", "process webhook", SpanKind::Consumer),
                    ("dataflow-worker", "POST", SpanKind::Client),
                ],
            )
            .await;
        let roots = spans.iter().filter(|s| s.parent_id.is_empty()).count();
        assert_eq!(roots, 1, "one root in {trace_id}: {spans:#?}");
    }
    // The worker logs each member's completion after the shared commit, in its own trace.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = std::fs::read_to_string(stack.config.data_dir.join("worker.log")).unwrap();
        let completions: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("batch completed"))
            .collect();
        let bundled = completions
            .iter()
            .any(|l| l.contains("bundled=") && !l.contains("bundled=1"));
        let named = traces.iter().all(|trace_id| {
            completions
                .iter()
                .any(|l| l.contains(&format!("trace_id={trace_id}")))
        });
        if bundled && named {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the imports were completed as a bundle, each logged in its trace: {log}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stack.finish().await;
}
register!(each_import_of_a_bundle_is_a_trace_of_its_own);

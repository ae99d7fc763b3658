//! Follow-up jobs end to end: email into a real SMTP server, signed webhooks into a real
//! HTTP receiver, stored reports; retries, dead letters and operator retry; and, with
//! Redis, a dead worker's jobs taken back and jobs Redis lost handed over again.

use crate::common::harness::register;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use base64::Engine;
use dataflow::Roles;
use dataflow_contracts::http::WorkerInfo;
use dataflow_contracts::jobs::{JobKind, JobMessage, JobPage, JobStatus, JobView};
use dataflow_contracts::{BatchStatus, JobId};
use dataflow_platform::Config;
use dataflow_platform::config::{RedisQueue, Secret};
use dataflow_platform::effects::webhook;
use dataflow_platform::jobqueue::{JobQueues, QueueKeys, RedisJobQueue};
use dataflow_platform::ledger::{Failure, Handover};
use dataflow_platform::redis::{Purpose, Redis};
use dataflow_worker::jobs::upkeep;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::helpers::{
    Backend, Proxy, Spawned, TestApp, backend_tests, csv, service_addr, signal, test_redis_url,
};
use crate::leader::wait_leader;
use crate::sinks::{Hook, SmtpSink, WebhookReceiver};

backend_tests!(batch_results_are_mailed_reported_and_signed_webhooks_delivered);
backend_tests!(a_batchs_end_follows_the_clients_policy_at_that_time);
backend_tests!(only_the_current_delivery_of_a_job_settles);
backend_tests!(a_slow_webhook_receiver_holds_no_more_slots_than_its_caps);

/// Fast retries and local targets.
pub(crate) fn fast_jobs(c: &mut Config, smtp: &SmtpSink) {
    c.jobs.smtp_url = Some(Secret::new(smtp.url()));
    c.jobs.webhook_allow_private = true;
    c.jobs.retry_base_ms = 20;
    c.jobs.retry_max_ms = 100;
    c.jobs.poll_interval_ms = 50;
    c.jobs.timeout_secs = 5;
    c.jobs.requeue_after_secs = 6;
}

const CSV: &str = "id,name\n1,ada\n2,grace\n,nameless\n3,=cmd()\n";

async fn jobs(t: &TestApp, query: &str) -> Vec<JobView> {
    let resp = t
        .admin_send(reqwest::Method::GET, &format!("/admin/jobs?{query}"))
        .await;
    assert_eq!(resp.status(), 200);
    resp.json::<JobPage>().await.unwrap().items
}

/// Waits (up to 20 s) until the query lists `n` jobs, all in `status`.
pub(crate) async fn wait_jobs(
    t: &TestApp,
    query: &str,
    n: usize,
    status: JobStatus,
) -> Vec<JobView> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let js = jobs(t, query).await;
        if js.len() == n && js.iter().all(|j| j.status == status) {
            return js;
        }
        assert!(Instant::now() < deadline, "jobs never all {status}: {js:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn verify_signature(hook: &Hook, secret: &str) {
    let key = base64::engine::general_purpose::STANDARD
        .decode(secret.trim_start_matches("whsec_"))
        .unwrap();
    let ts: i64 = hook.header("webhook-timestamp").parse().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!((now - ts).abs() < 60, "timestamp is current");
    let expected = webhook::signature(&key, hook.header("webhook-id"), ts, &hook.body);
    assert_eq!(hook.header("webhook-signature"), expected);
}

async fn batch_results_are_mailed_reported_and_signed_webhooks_delivered(b: Backend) {
    let smtp = SmtpSink::start().await;
    let hooks = WebhookReceiver::start(200).await;
    let Some(t) = TestApp::spawn_with(b, Roles::ALL, |c| fast_jobs(c, &smtp)).await else {
        return;
    };
    run_the_walk(&t, &smtp, &hooks).await;
    t.stop().await;
}

/// The import's own events follow the policy it was accepted under; the end of its batch
/// follows the client's policy when the batch ends. A webhook URL set while the batch
/// waited gets the `BatchCompleted` (and only that).
async fn a_batchs_end_follows_the_clients_policy_at_that_time(b: Backend) {
    let smtp = SmtpSink::start().await;
    let hooks = WebhookReceiver::start(200).await;
    let Some(api) = TestApp::spawn_with(b, Roles::API, |c| fast_jobs(c, &smtp)).await else {
        return;
    };
    let (client, key) = api.client(json!({})).await;
    let import = api.import(&key, "text/csv", CSV).await;
    let patched = api
        .admin(
            reqwest::Method::PATCH,
            &format!("/admin/clients/{client}/policy"),
        )
        .json(&json!({"webhook_url": hooks.url()}))
        .send()
        .await
        .unwrap();
    assert_eq!(patched.status(), 200);

    let worker = api.sibling(Roles::WORKER).await;
    api.wait_for(&key, &import.batch_id, BatchStatus::Completed)
        .await;
    let got = hooks
        .wait_until("BatchCompleted", |h| {
            h.iter().any(|h| h.json()["type"] == "BatchCompleted")
        })
        .await;
    // Every job of the batch is settled by now: nothing else is on its way.
    wait_jobs(
        &api,
        &format!("batch_id={}", import.batch_id),
        2,
        JobStatus::Done,
    )
    .await;
    let types: Vec<String> = hooks
        .hooks()
        .iter()
        .map(|h| h.json()["type"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(types, ["BatchCompleted"], "{got:?}");
    worker.stop().await;
    api.stop().await;
}

/// Submit a batch with a rejected row; check the mail, the webhooks and the report.
pub(crate) async fn run_the_walk(t: &TestApp, smtp: &SmtpSink, hooks: &WebhookReceiver) {
    let (_, key) = t
        .client(json!({"notify_email": "ops@example.com", "webhook_url": hooks.url()}))
        .await;
    let import = t.import(&key, "text/csv", CSV).await;
    let batch = t
        .wait_for(&key, &import.batch_id, BatchStatus::Completed)
        .await;
    assert_eq!(batch.records_failed, 1);

    // Webhooks: created, ready, completed, each signed with the client's secret.
    let secret: Value = t
        .get(&key, "/v1/webhooks/secret")
        .await
        .json()
        .await
        .unwrap();
    let secret = secret["secret"].as_str().unwrap().to_owned();
    let got = hooks
        .wait_until("BatchCompleted", |h| {
            h.iter().any(|h| h.json()["type"] == "BatchCompleted")
        })
        .await;
    for h in &got {
        verify_signature(h, &secret);
        assert!(h.header("webhook-id").starts_with("job_"));
        assert_eq!(h.json()["batch_id"], import.batch_id.as_str());
    }
    let types: Vec<String> = got
        .iter()
        .map(|h| h.json()["type"].as_str().unwrap().to_owned())
        .collect();
    for want in ["BatchCreated", "BatchReady", "BatchCompleted"] {
        assert!(types.iter().any(|t| t == want), "{want} in {types:?}");
    }

    // The mail: one message, keyed by its job, with the rejected rows attached and defused.
    let mail = smtp.wait_for(1).await;
    let text = &mail[0];
    assert!(text.contains("To: ops@example.com"), "{text}");
    assert!(
        text.contains(&format!("batch {} completed", import.batch_id)),
        "{text}"
    );
    assert!(text.contains("Message-ID: <job_"), "{text}");
    assert!(
        text.contains(&format!("{}-rejected.csv", import.batch_id)),
        "{text}"
    );

    // The stored report.
    let report_jobs = wait_jobs(
        t,
        &format!("batch_id={}&kind=report", import.batch_id),
        1,
        JobStatus::Done,
    )
    .await;
    assert_eq!(report_jobs[0].kind, JobKind::Report);
    let report: Value = t
        .get(&key, &format!("/v1/batches/{}/report", import.batch_id))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(report["errors_by_code"]["missing_key"], 1);
    let csv = t
        .get(&key, &format!("/v1/batches/{}/report.csv", import.batch_id))
        .await
        .text()
        .await
        .unwrap();
    assert!(csv.starts_with("line,field,code,detail,value\n4,"), "{csv}");

    // Every job done once: no duplicate mail or webhook in a clean run.
    let all = wait_jobs(
        t,
        &format!("batch_id={}", import.batch_id),
        5,
        JobStatus::Done,
    )
    .await;
    assert!(all.iter().all(|j| j.attempts == 1), "{all:?}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(smtp.messages().len(), 1);
    let ids: std::collections::HashSet<String> = hooks
        .hooks()
        .iter()
        .map(|h| h.header("webhook-id").to_owned())
        .collect();
    assert_eq!(
        ids.len(),
        hooks.hooks().len(),
        "each webhook delivered once"
    );
}

async fn failing_webhooks_retry_then_dead_letter_and_an_operator_retry_delivers() {
    let smtp = SmtpSink::start().await;
    let hooks = WebhookReceiver::start(500).await;
    let Some(t) = TestApp::spawn_with(Backend::Sqlite, Roles::ALL, |c| {
        fast_jobs(c, &smtp);
        c.jobs.max_attempts = 3;
    })
    .await
    else {
        return;
    };
    let (_, key) = t.client(json!({"webhook_url": hooks.url()})).await;
    let import = t.import(&key, "text/csv", "id\n1\n").await;
    t.wait_for(&key, &import.batch_id, BatchStatus::Completed)
        .await;
    let query = format!("batch_id={}&kind=webhook", import.batch_id);
    let dead = wait_jobs(&t, &query, 3, JobStatus::Dead).await;
    for j in &dead {
        assert_eq!(j.attempts, 3);
        assert!(
            j.last_error.as_deref().unwrap_or("").contains("500"),
            "{j:?}"
        );
        let tries = hooks
            .hooks()
            .iter()
            .filter(|h| h.header("webhook-id") == j.id.as_str())
            .count();
        assert_eq!(tries, 3, "three attempts, one webhook-id");
    }
    let listed = jobs(&t, "status=dead").await;
    assert_eq!(listed.len(), 3);

    hooks.answer(204);
    let retried = t
        .admin_send(
            reqwest::Method::POST,
            &format!("/admin/jobs/{}/retry", dead[0].id),
        )
        .await;
    assert_eq!(retried.status(), 200);
    let again = t
        .admin_send(
            reqwest::Method::POST,
            &format!("/admin/jobs/{}/retry", dead[0].id),
        )
        .await;
    assert_eq!(again.status(), 409, "only a dead job can be retried");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let j: JobView = t
            .admin_send(reqwest::Method::GET, &format!("/admin/jobs/{}", dead[0].id))
            .await
            .json()
            .await
            .unwrap();
        if j.status == JobStatus::Done {
            assert_eq!(j.attempts, 1, "an operator retry starts afresh");
            break;
        }
        assert!(Instant::now() < deadline, "retried job never done: {j:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }

    // Retention: the done job goes once it is old enough; dead letters stay for operators.
    let day = Duration::from_secs(86_400);
    assert_eq!(upkeep::prune(&t.db, day).await.unwrap(), 0);
    let done = jobs(&t, "status=done").await;
    assert_eq!(
        done.len(),
        2,
        "the retried webhook and the report: {done:?}"
    );
    assert_eq!(upkeep::prune(&t.db, Duration::ZERO).await.unwrap(), 2);
    assert!(t.db.get_job(&dead[0].id).await.unwrap().is_none());
    assert_eq!(jobs(&t, "status=dead").await.len(), 2);
    t.stop().await;
}
register!(failing_webhooks_retry_then_dead_letter_and_an_operator_retry_delivers);

async fn private_webhook_targets_are_refused_without_retrying() {
    let smtp = SmtpSink::start().await;
    let hooks = WebhookReceiver::start(200).await;
    let Some(t) = TestApp::spawn_with(Backend::Sqlite, Roles::ALL, |c| {
        fast_jobs(c, &smtp);
        c.jobs.webhook_allow_private = false;
    })
    .await
    else {
        return;
    };
    for url in [
        hooks.url(),
        format!("http://localhost:{}/hook", hooks.addr.port()),
    ] {
        let (_, key) = t.client(json!({"webhook_url": url})).await;
        let import = t.import(&key, "text/csv", "id\n1\n").await;
        t.wait_for(&key, &import.batch_id, BatchStatus::Completed)
            .await;
        let query = format!("batch_id={}&kind=webhook", import.batch_id);
        for j in wait_jobs(&t, &query, 3, JobStatus::Dead).await {
            assert_eq!(j.attempts, 1, "a refused target is not retried");
            assert!(j.last_error.unwrap().contains("public address"));
        }
    }
    assert!(
        hooks.hooks().is_empty(),
        "nothing reached the private target"
    );
    t.stop().await;
}
register!(private_webhook_targets_are_refused_without_retrying);

/// Redis: the same walk through the Redis queue; nothing is left in Redis afterwards.
async fn jobs_run_through_the_redis_queue() {
    walk_through_redis(RedisQueue::Lists).await;
}
register!(jobs_run_through_the_redis_queue);

/// The same walk on apalis-redis storage; afterwards apalis-redis holds nothing either
/// (DataFlow removes the finished tasks apalis-redis would keep forever).
async fn jobs_run_through_apalis_redis() {
    walk_through_redis(RedisQueue::ApalisRedis).await;
}
register!(jobs_run_through_apalis_redis);

async fn walk_through_redis(queue: RedisQueue) {
    let smtp = SmtpSink::start().await;
    let hooks = WebhookReceiver::start(200).await;
    let Some(t) = TestApp::spawn_redis(Backend::Sqlite, Roles::ALL, None, |c| {
        fast_jobs(c, &smtp);
        c.jobs.redis_queue = queue;
        c.jobs.redis_working_set = 100;
    })
    .await
    else {
        return;
    };
    run_the_walk(&t, &smtp, &hooks).await;
    nothing_is_left_in_redis(&t).await;
    let redis = t.app.as_ref().unwrap().backends.redis.clone().unwrap();
    t.stop().await;
    redis.delete_all_under_prefix().await.unwrap();
}

/// Waits (up to 10 s) until `t`'s Redis job queue holds nothing of any kind.
pub(crate) async fn nothing_is_left_in_redis(t: &TestApp) {
    let backends = &t.app.as_ref().unwrap().backends;
    let jobs = backends.job_queue.clone().unwrap();
    // apalis-redis acknowledges a moment after the handler returns: wait for it.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut conn = backends.redis.as_ref().unwrap().conn();
    for kind in JobKind::ALL {
        loop {
            let mut left = (jobs.outstanding(kind).await.unwrap(), 0, 0, 0);
            if let RedisJobQueue::Apalis(q) = &jobs {
                let c = q.config(kind);
                (left.1, left.2, left.3) = redis::pipe()
                    .hlen(c.job_data_hash())
                    .scard(c.done_jobs_set())
                    .scard(c.dead_jobs_set())
                    .query_async(&mut conn)
                    .await
                    .unwrap();
            }
            if left == (0, 0, 0, 0) {
                break;
            }
            assert!(Instant::now() < deadline, "{kind}: {left:?} left in Redis");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

/// An API process on Redis whose job workers are dead after 2 s without a heartbeat.
async fn api_with_quick_reaping(smtp: &SmtpSink) -> Option<TestApp> {
    TestApp::spawn_redis(Backend::Sqlite, Roles::API, None, |c| {
        quick_reaping(c, smtp)
    })
    .await
}

/// Does what the relay does for the one webhook of a batch awaiting approval (its only
/// event is `BatchCreated`): takes the intent as `queued` with `lease_ms`.
async fn take_one_webhook(api: &TestApp, hooks: &WebhookReceiver, lease_ms: u64) -> JobMessage {
    let policy = json!({"webhook_url": hooks.url(), "approval_required": true});
    let (_, key) = api.client(policy).await;
    api.import(&key, "text/csv", "id\n1\n").await;
    let mut taken = api
        .db
        .take_due_jobs(JobKind::Webhook, 10, Handover::Queue, lease_ms)
        .await
        .unwrap();
    assert_eq!(taken.len(), 1);
    taken.remove(0)
}

/// [`take_one_webhook`], and pushes it.
async fn relay_one_webhook(
    api: &TestApp,
    hooks: &WebhookReceiver,
    lease_ms: u64,
) -> (JobQueues, JobMessage) {
    let job = take_one_webhook(api, hooks, lease_ms).await;
    let queues = api
        .app
        .as_ref()
        .unwrap()
        .backends
        .job_queue
        .as_ref()
        .and_then(RedisJobQueue::lists)
        .cloned()
        .unwrap();
    queues
        .queue(JobKind::Webhook)
        .push(std::slice::from_ref(&job))
        .await
        .unwrap();
    (queues, job)
}

/// Worker "ghost" takes the one webhook message waiting (and is never heard of again).
async fn taken_by_a_ghost(queues: &JobQueues) {
    let queue = queues.queue(JobKind::Webhook);
    let mut conn = queue.blocking_connection().await.unwrap();
    let held = queue.take(&mut conn, "ghost", 10, Duration::from_millis(100));
    assert_eq!(held.await.unwrap().len(), 1);
}

/// Redis: a worker that took jobs and died (`kill -9`: no release, no more heartbeats) has
/// them taken back by a live worker, which runs them; the lost attempt is counted.
async fn a_dead_workers_jobs_are_taken_back() {
    let smtp = SmtpSink::start().await;
    let hooks = WebhookReceiver::start(200).await;
    let Some(api) = api_with_quick_reaping(&smtp).await else {
        return;
    };
    a_dead_workers_job_runs_again(&api, &hooks).await;
    api.stop().await;
}
register!(a_dead_workers_jobs_are_taken_back);

/// The settings under which a dead worker is found within two seconds.
pub(crate) fn quick_reaping(c: &mut Config, smtp: &SmtpSink) {
    fast_jobs(c, smtp);
    c.jobs.dead_worker_ms = 2_000;
}

/// A job a worker took before it died (on `api`'s Redis, under [`quick_reaping`]) is
/// taken back and run by a live worker, its lost attempt counted.
pub(crate) async fn a_dead_workers_job_runs_again(api: &TestApp, hooks: &WebhookReceiver) {
    // The dead worker: the job was relayed, it took it, beat once, and was killed.
    let (queues, job) = relay_one_webhook(api, hooks, 60_000).await;
    taken_by_a_ghost(&queues).await;
    queues.heartbeat("ghost").await.unwrap();

    let started = Instant::now();
    let worker = api.sibling(Roles::WORKER).await;
    let hook = hooks
        .wait_until("the dead worker's job", |h| !h.is_empty())
        .await;
    assert_eq!(hook[0].header("webhook-id"), job.id.as_str());
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "recovered in {:?}",
        started.elapsed()
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let j = api.db.get_job(&job.id).await.unwrap().unwrap();
        if j.status == JobStatus::Done {
            assert_eq!(j.attempts, 2, "the lost attempt counts");
            break;
        }
        assert!(Instant::now() < deadline, "{j:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    worker.stop().await;
}

/// A real `dataflow worker` process is killed with SIGKILL while its three webhook
/// deliveries are in flight. With the default dead-worker timeout and job timeout, a live
/// worker takes the jobs back and delivers them within 30 s; the receiver sees the same
/// `webhook-id` twice (the one duplicate a crash may cause). On DataFlow's lists and on SQL
/// claims the lost attempt counts. The killed process led the fleet, so the duty that
/// takes the jobs back (the reaper of the lists, the reclaim of SQL claims) runs only once
/// the live worker has succeeded it.
async fn a_killed_worker_process_has_its_jobs_recovered_within_30s() {
    recover_from_kill(Some(RedisQueue::Lists)).await;
}
register!(a_killed_worker_process_has_its_jobs_recovered_within_30s);

/// The same on apalis-redis, whose orphan recovery does not count the lost attempt.
async fn a_killed_apalis_redis_worker_process_has_its_jobs_recovered_within_30s() {
    recover_from_kill(Some(RedisQueue::ApalisRedis)).await;
}
register!(a_killed_apalis_redis_worker_process_has_its_jobs_recovered_within_30s);

/// The same without Redis: the jobs were claimed from SQL, under a claim lease of twice the
/// job timeout (two minutes by default), which the fleet registry makes no one wait out.
async fn a_killed_worker_process_has_its_sql_claimed_jobs_recovered_within_30s() {
    recover_from_kill(None).await;
}
register!(a_killed_worker_process_has_its_sql_claimed_jobs_recovered_within_30s);

async fn recover_from_kill(queue: Option<RedisQueue>) {
    let smtp = SmtpSink::start().await;
    let hooks = WebhookReceiver::start(0).await;
    let tweak = |c: &mut Config| {
        fast_jobs(c, &smtp);
        c.jobs.dead_worker_ms = Config::default().jobs.dead_worker_ms;
        c.jobs.timeout_secs = Config::default().jobs.timeout_secs;
        c.jobs.requeue_after_secs = Config::default().jobs.requeue_after_secs;
        c.jobs.redis_working_set = 100;
        if let Some(queue) = queue {
            c.jobs.redis_queue = queue;
        }
    };
    let api = match queue {
        Some(_) => TestApp::spawn_redis(Backend::Postgres, Roles::API, None, tweak).await,
        None => TestApp::spawn_with(Backend::Postgres, Roles::API, tweak).await,
    };
    let Some(api) = api else {
        return;
    };
    let log = std::fs::File::create(api.config.data_dir.join("worker.log")).unwrap();
    let mut child = api.spawn_worker_process("worker", Some(log));

    let (_, key) = api.client(json!({"webhook_url": hooks.url()})).await;
    let batch = api.import(&key, "text/csv", CSV).await;
    // Kill only once the receiver holds every delivery of the batch: a delivery the process
    // had started but whose request had not arrived yet would be a cut attempt that the
    // receiver never saw.
    let in_flight = |h: &[Hook]| {
        h.iter()
            .map(|h| h.header("webhook-id").to_owned())
            .collect::<BTreeSet<String>>()
    };
    let cut = in_flight(
        &hooks
            .wait_until("the worker process's three deliveries", |h| {
                in_flight(h).len() == 3
            })
            .await,
    );
    child.kill().unwrap();
    child.wait().unwrap();
    let killed = Instant::now();
    hooks.answer(200);

    let worker = api.sibling(Roles::WORKER).await;
    hooks
        .wait_until("every cut delivery made again", |h| {
            cut.iter()
                .all(|id| h.iter().filter(|h| h.header("webhook-id") == id).count() >= 2)
        })
        .await;
    let recovered = killed.elapsed();
    eprintln!(
        "{queue:?}: kill -9 -> {} cut deliveries made again by a live worker in {recovered:?}",
        cut.len()
    );
    assert!(recovered < Duration::from_secs(30), "took {recovered:?}");
    let query = format!("batch_id={}&kind=webhook", batch.batch_id);
    let webhooks = wait_jobs(&api, &query, 3, JobStatus::Done).await;
    let hooks = hooks.hooks();
    // On DataFlow's lists the reaper counts the cut attempt; apalis-redis's orphan recovery
    // does not.
    let attempts = match queue {
        Some(RedisQueue::Lists) | None => 2,
        Some(RedisQueue::ApalisRedis) => 1,
    };
    for job in &webhooks {
        assert!(cut.contains(job.id.as_str()), "{job:?}");
        let seen = hooks
            .iter()
            .filter(|h| h.header("webhook-id") == job.id.as_str())
            .count();
        assert_eq!((seen, job.attempts), (2, attempts), "{job:?}");
    }
    worker.stop().await;
    let redis = api.app.as_ref().unwrap().backends.redis.clone();
    api.stop().await;
    if let Some(redis) = redis {
        redis.delete_all_under_prefix().await.unwrap();
    }
}

/// Deliveries never go through a proxy named in the environment: a proxy would make the
/// request from its own network, past the check of the target's address. A real worker
/// process with every proxy variable pointing at a listener delivers straight to the
/// receiver, and the listener sees no connection.
async fn webhooks_ignore_proxies_from_the_environment() {
    let smtp = SmtpSink::start().await;
    let hooks = WebhookReceiver::start(200).await;
    let Some(api) = TestApp::spawn_with(Backend::Sqlite, Roles::API, |c| fast_jobs(c, &smtp)).await
    else {
        return;
    };
    let proxy = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_url = format!("http://{}", proxy.local_addr().unwrap());
    let proxied = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = proxied.clone();
    let listener = tokio::spawn(async move {
        while let Ok((conn, _)) = proxy.accept().await {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            drop(conn);
        }
    });
    let mut worker = api.worker_process("proxied-worker", None, |_| {});
    for var in [
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
    ] {
        worker.env(var, &proxy_url);
    }
    let mut child = worker
        .env_remove("NO_PROXY")
        .env_remove("no_proxy")
        .spawn()
        .unwrap();

    let (_, key) = api.client(json!({"webhook_url": hooks.url()})).await;
    let batch = api.import(&key, "text/csv", CSV).await;
    let query = format!("batch_id={}&kind=webhook", batch.batch_id);
    wait_jobs(&api, &query, 3, JobStatus::Done).await;
    assert_eq!(hooks.hooks().len(), 3);
    assert_eq!(proxied.load(std::sync::atomic::Ordering::SeqCst), 0);
    child.kill().unwrap();
    child.wait().unwrap();
    listener.abort();
    api.stop().await;
}
register!(webhooks_ignore_proxies_from_the_environment);

/// J1 at the ledger: each take of a job is a new delivery, and only the current one settles.
/// A delivery that was handed over again (reaped from Redis; an embedded claim that expired)
/// and answers late changes nothing, and the current one settles once.
async fn only_the_current_delivery_of_a_job_settles(b: Backend) {
    let Some(api) = TestApp::spawn_with(b, Roles::API, |c| c.jobs.max_attempts = 2).await else {
        return;
    };
    // One webhook job per import (a batch awaiting approval has one event); nobody runs it.
    let policy = json!({"webhook_url": "http://127.0.0.1:9/hook", "approval_required": true});
    let (_, key) = api.client(policy).await;
    let db = &api.db;
    let take = async |handover, lease_ms| {
        let mut taken = db
            .take_due_jobs(JobKind::Webhook, 10, handover, lease_ms)
            .await
            .unwrap();
        assert_eq!(taken.len(), 1);
        taken.remove(0).ticket()
    };
    let lost = "the worker running it stopped (no heartbeat)";

    // Through a queue: the first delivery is reaped (its attempt counted), the job taken again.
    api.import(&key, "text/csv", "id\n1\n").await;
    let first = take(Handover::Queue, 60_000).await;
    let reaped = db.fail_job(&first, true, lost, Failure::Retry { backoff_ms: 0 });
    assert_eq!(reaped.await.unwrap(), Some(JobStatus::Pending));
    let second = take(Handover::Queue, 60_000).await;
    assert_eq!(second.id, first.id);
    assert_ne!(second.epoch, first.epoch);
    // The first answers late, failed or done: refused, whatever it says.
    let late = db.fail_job(&first, true, "late", Failure::Permanent);
    assert_eq!(late.await.unwrap(), None);
    assert_eq!(db.finish_jobs(&[&first], true).await.unwrap(), 0);
    assert_eq!(db.requeue_lost_jobs(&[&first]).await.unwrap(), 0);
    assert_eq!(db.extend_job_leases(&[&first], 1).await.unwrap(), 0);
    // The second settles, once.
    assert_eq!(db.finish_jobs(&[&second, &first], true).await.unwrap(), 1);
    assert_eq!(db.finish_jobs(&[&second], true).await.unwrap(), 0);
    let j = db.get_job(&first.id).await.unwrap().unwrap();
    assert_eq!((j.status, j.attempts), (JobStatus::Done, 2));

    // A queue that runs one message twice (apalis-redis's orphan recovery): each run takes
    // the delivery as it starts, and only the latest run settles; once it has, no run starts.
    api.import(&key, "text/csv", "id\n0\n").await;
    let message = take(Handover::Queue, 60_000).await;
    let presumed_dead = db.start_queued_run(&message).await.unwrap().unwrap();
    let rerun = db.start_queued_run(&message).await.unwrap().unwrap();
    assert_ne!(presumed_dead.epoch, rerun.epoch);
    let late = db.fail_job(&presumed_dead, true, "late", Failure::Permanent);
    assert_eq!(
        late.await.unwrap(),
        None,
        "the presumed-dead run cannot bury the job"
    );
    assert_eq!(db.finish_jobs(&[&presumed_dead], true).await.unwrap(), 0);
    assert_eq!(db.finish_jobs(&[&rerun], true).await.unwrap(), 1);
    assert_eq!(db.start_queued_run(&message).await.unwrap(), None);
    let j = db.get_job(&message.id).await.unwrap().unwrap();
    assert_eq!((j.status, j.attempts), (JobStatus::Done, 1));

    // While a run goes on, the sweeper still looks for the message (not the run's delivery),
    // so a job whose queue lease runs out mid-run is found, not handed over again; once it
    // is handed over again (the queue lost it), the old message can no longer start.
    api.import(&key, "text/csv", "id\n00\n").await;
    let message = take(Handover::Queue, 0).await;
    let running = db.start_queued_run(&message).await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_millis(10)).await;
    let expired = db.expired_queued_jobs(10).await.unwrap();
    assert_eq!(expired.len(), 1);
    assert_eq!(expired[0].0, message, "the sweeper looks for the message");
    assert_eq!(db.extend_job_leases(&[&message], 60_000).await.unwrap(), 1);
    assert_eq!(db.requeue_lost_jobs(&[&message]).await.unwrap(), 1);
    let again = take(Handover::Queue, 60_000).await;
    assert_eq!(
        db.start_queued_run(&message).await.unwrap(),
        None,
        "an old message"
    );
    assert_eq!(db.finish_jobs(&[&running], true).await.unwrap(), 0);
    let current = db.start_queued_run(&again).await.unwrap().unwrap();
    assert_eq!(db.finish_jobs(&[&current], true).await.unwrap(), 1);

    // Claimed from SQL: a claim whose lease ran out goes back, and its late result is refused.
    api.import(&key, "text/csv", "id\n2\n").await;
    let claimed = take(Handover::Claim { by: "w" }, 0).await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(db.expire_running_jobs().await.unwrap(), 1);
    let again = take(Handover::Claim { by: "w" }, 60_000).await;
    assert_eq!(db.finish_jobs(&[&claimed], false).await.unwrap(), 0);
    assert_eq!(db.hand_back_claims(&[&claimed]).await.unwrap(), 0);
    assert_eq!(db.finish_jobs(&[&again], false).await.unwrap(), 1);

    // Claimed by a worker the registry no longer lists: back at once, not at the lease's
    // end, and the gone worker's late result is refused. A live holder keeps its claim.
    api.import(&key, "text/csv", "id\n3\n").await;
    let orphan = take(Handover::Claim { by: "w" }, 60_000).await;
    let live = ["w".to_owned()];
    assert_eq!(
        db.end_job_claims_of_gone_workers(&live, 0).await.unwrap(),
        0
    );
    // Untouched for longer than the quiet time (zero here) by the ledger's clock.
    tokio::time::sleep(Duration::from_millis(10)).await;
    let gone = ["other".to_owned()];
    assert_eq!(
        db.end_job_claims_of_gone_workers(&gone, 0).await.unwrap(),
        1
    );
    let adopted = take(Handover::Claim { by: "other" }, 60_000).await;
    assert_eq!(adopted.id, orphan.id);
    assert_eq!(db.finish_jobs(&[&orphan], false).await.unwrap(), 0);
    assert_eq!(db.finish_jobs(&[&adopted], false).await.unwrap(), 1);
    api.stop().await;
}

/// How long the cut worker's attempt runs in
/// [`a_superseded_delivery_cannot_settle_or_ack_the_live_one`]: long enough for the leader to
/// reap its job and start it again meanwhile.
const CUT_ATTEMPT_SECS: u64 = 8;

/// J1, with two real worker processes: worker A runs webhook job J and loses Redis for
/// longer than `dead_worker_ms`, so the leader B reaps J and runs it again. A's attempt then
/// fails (it times out) while B's delivery still runs, and A acknowledges it once Redis is
/// back: both belong to a superseded delivery and change nothing. J ends `done` once, after
/// two deliveries, and is never `dead` (A's failure would have been its last attempt).
async fn a_superseded_delivery_cannot_settle_or_ack_the_live_one() {
    let smtp = SmtpSink::start().await;
    let hooks = WebhookReceiver::start(0).await;
    let Some(url) = test_redis_url().await else {
        return;
    };
    let (a_redis, b_redis) = (
        Proxy::start(service_addr(&url, 6379)).await,
        Proxy::start(service_addr(&url, 6379)).await,
    );
    let Some(api) = TestApp::spawn_redis(Backend::Postgres, Roles::API, None, |c| {
        fast_jobs(c, &smtp);
        c.jobs.dead_worker_ms = 2_000;
        c.jobs.max_attempts = 2;
        c.jobs.requeue_after_secs = 120;
    })
    .await
    else {
        return;
    };
    let a_log = api.config.data_dir.join("a.log");
    let spawn = |name: &str, proxy: &Proxy, attempt_secs: u64| {
        let log = std::fs::File::create(api.config.data_dir.join(format!("{name}.log"))).unwrap();
        let redis = Secret::new(format!("redis://{}/", proxy.addr));
        Spawned(api.spawn_worker_process_with(name, Some(log), |c| {
            c.redis_url = Some(redis);
            c.jobs.timeout_secs = attempt_secs;
        }))
    };
    // B leads (its sweeper reaps); its attempt outlasts A's.
    let b = spawn("b", &b_redis, 60);
    wait_leader(&api, 20, |o| o.contains(&format!("-{}-", b.0.id()))).await;
    let _a = spawn("a", &a_redis, CUT_ATTEMPT_SECS);
    wait_workers(&api, 2).await;

    // Only A can take J: B is cut from Redis meanwhile.
    b_redis.cut();
    let policy = json!({"webhook_url": hooks.url(), "approval_required": true});
    let (_, key) = api.client(policy).await;
    api.import(&key, "text/csv", "id\n1\n").await;
    let first = hooks.wait_until("A's delivery", |h| !h.is_empty()).await;
    let began = Instant::now();
    a_redis.cut();
    b_redis.heal();
    let job: JobId = first[0].header("webhook-id").parse().unwrap();

    let second = hooks
        .wait_until("B's delivery of the reaped job", |h| h.len() >= 2)
        .await;
    assert_eq!(second[1].header("webhook-id"), job.as_str());
    assert!(
        began.elapsed() < Duration::from_secs(CUT_ATTEMPT_SECS),
        "B's delivery must start while A's attempt still runs"
    );
    // A's attempt fails while B's delivery is J's live one: the ledger refuses it.
    let deadline = Instant::now() + Duration::from_secs(CUT_ATTEMPT_SECS + 10);
    loop {
        let j = api.db.get_job(&job).await.unwrap().unwrap();
        assert_eq!(
            j.status,
            JobStatus::Queued,
            "B's delivery is J's live one: {j:?}"
        );
        let log = std::fs::read_to_string(&a_log).unwrap();
        if log.contains("refused results of superseded job deliveries") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "A's late failure was never refused"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Redis back, A acknowledges its delivery (its retries are at most 2 s apart): B's stays.
    a_redis.heal();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let redis = api.app.as_ref().unwrap().backends.redis.clone().unwrap();
    let present: Option<f64> = redis::cmd("ZSCORE")
        .arg(QueueKeys::new(&redis, JobKind::Webhook).present)
        .arg(job.as_str())
        .query_async(&mut redis.conn())
        .await
        .unwrap();
    assert!(present.is_some(), "A's late ack removed B's live delivery");

    hooks.answer(200);
    let deadline = Instant::now() + Duration::from_secs(20);
    let j = loop {
        let j = api.db.get_job(&job).await.unwrap().unwrap();
        assert_ne!(j.status, JobStatus::Dead, "{j:?}");
        if j.status == JobStatus::Done {
            break j;
        }
        assert!(Instant::now() < deadline, "J never done: {j:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    assert_eq!(j.attempts, 2, "A's reaped attempt and B's: {j:?}");
    let deliveries = hooks
        .hooks()
        .iter()
        .filter(|h| h.header("webhook-id") == job.as_str())
        .count();
    assert_eq!(deliveries, 2);
    api.stop().await;
    redis.delete_all_under_prefix().await.unwrap();
}
register!(a_superseded_delivery_cannot_settle_or_ack_the_live_one);

/// Waits (up to 20 s) until the fleet registry lists `n` workers.
async fn wait_workers(api: &TestApp, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ws: Vec<WorkerInfo> = api
            .admin_send(reqwest::Method::GET, "/admin/workers")
            .await
            .json()
            .await
            .unwrap();
        if ws.len() == n {
            return;
        }
        assert!(Instant::now() < deadline, "{n} workers: {ws:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Redis: a message moved into a live worker's in-flight list whose take reply was lost (the
/// connection reset after `BLMOVE` ran) is not stranded there: the worker, still beating its
/// heart and so never reaped, gives it back within about `dead_worker_ms`, and runs it.
async fn a_message_a_lost_take_reply_stranded_is_given_back() {
    let smtp = SmtpSink::start().await;
    let hooks = WebhookReceiver::start(200).await;
    let Some(api) = api_with_quick_reaping(&smtp).await else {
        return;
    };
    // Taken before a worker's relay could. Its lease is short: the sweeper looks for it
    // soon, finds it in Redis, and leaves it there.
    let job = take_one_webhook(&api, &hooks, 1_000).await;
    let worker = api.sibling(Roles::WORKER).await;
    // What a move leaves when its reply never reaches the worker: the message in the worker's
    // in-flight list (and in `present`), and the worker none the wiser.
    let redis = api.app.as_ref().unwrap().backends.redis.clone().unwrap();
    let keys = QueueKeys::new(&redis, JobKind::Webhook);
    let inflight = keys.inflight(&worker.worker_id());
    let present = keys.present;
    redis::pipe()
        .rpush(&inflight, serde_json::to_string(&job).unwrap())
        .zadd(&present, job.id.as_str(), job.epoch)
        .query_async::<()>(&mut redis.conn())
        .await
        .unwrap();

    let hook = hooks
        .wait_until("the stranded job", |h| !h.is_empty())
        .await;
    assert_eq!(hook[0].header("webhook-id"), job.id.as_str());
    let query = format!("batch_id={}", job.batch_id);
    let done = wait_jobs(&api, &query, 1, JobStatus::Done).await;
    assert_eq!(done[0].attempts, 1, "{done:?}");
    worker.stop().await;
    api.stop().await;
    redis.delete_all_under_prefix().await.unwrap();
}
register!(a_message_a_lost_take_reply_stranded_is_given_back);

/// Redis: a push that Redis applied while its client saw it fail (the reply was lost) does
/// not leave the job queued twice. The relay hands back only what it finds Redis does not
/// hold; what it cannot look for (Redis still unreachable) waits for the sweeper.
async fn an_ambiguous_push_leaves_the_job_queued_once() {
    let smtp = SmtpSink::start().await;
    let hooks = WebhookReceiver::start(200).await;
    let Some(url) = test_redis_url().await else {
        return;
    };
    let Some(api) =
        TestApp::spawn_redis(Backend::Sqlite, Roles::API, None, |c| fast_jobs(c, &smtp)).await
    else {
        return;
    };
    // This test's relay reaches Redis through a proxy that loses the push's reply.
    let proxy = Proxy::start(service_addr(&url, 6379)).await;
    let proxied = format!("redis://{}/", proxy.addr);
    let redis = Redis::connect(&proxied, &api.config.redis_prefix, None, Purpose::State)
        .await
        .unwrap();
    let settings = upkeep::JobRelaySettings {
        kinds: vec![JobKind::Webhook],
        working_set: 100,
        lease: Duration::from_secs(60),
        poll: Duration::from_millis(50),
    };
    let stop = CancellationToken::new();
    let relay = tokio::spawn(upkeep::relay(
        api.db.clone(),
        RedisJobQueue::Lists(JobQueues::new(redis)),
        settings,
        api.db.commits().clone(),
        stop.clone(),
    ));
    proxy.mute_after(b"RPUSH");
    let policy = json!({"webhook_url": hooks.url(), "approval_required": true});
    let (_, key) = api.client(policy).await;
    api.import(&key, "text/csv", "id\n1\n").await;

    let direct = api.app.as_ref().unwrap().backends.redis.clone().unwrap();
    let ready = QueueKeys::new(&direct, JobKind::Webhook).ready;
    let queued = async || -> Vec<String> {
        redis::cmd("LRANGE")
            .arg(&ready)
            .arg(0)
            .arg(-1)
            .query_async(&mut direct.conn())
            .await
            .unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while queued().await.is_empty() {
        assert!(Instant::now() < deadline, "the push never reached Redis");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The relay's push fails (its reply times out), and so does anything it asks next.
    tokio::time::sleep(Duration::from_secs(2)).await;
    proxy.cut();
    proxy.heal();
    // Redis is reachable again; the relay goes on with what SQL says is due.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.cancel();
    relay.await.unwrap();

    let copies = queued().await;
    assert_eq!(copies.len(), 1, "queued more than once: {copies:?}");
    let message: JobMessage = serde_json::from_str(&copies[0]).unwrap();
    let job = api.db.get_job(&message.id).await.unwrap().unwrap();
    assert_eq!(job.status, JobStatus::Queued);
    let epoch: i64 = sqlx::query_scalar("SELECT delivery_epoch FROM jobs WHERE id = $1")
        .bind(message.id.as_str())
        .fetch_one(api.db.pool())
        .await
        .unwrap();
    assert_eq!(
        u64::try_from(epoch).unwrap(),
        message.epoch,
        "Redis holds the current delivery"
    );
    api.stop().await;
    direct.delete_all_under_prefix().await.unwrap();
}
register!(an_ambiguous_push_leaves_the_job_queued_once);

/// The leader's reaper acts only while the leader's lease surely holds. The leader, a real
/// worker process, is stopped (SIGSTOP) past its lease and another worker leads; a worker
/// dies meanwhile. Resumed, the ex-leader's sweeper is due at once, before its campaign
/// has found the lease gone: it must not reap beside its successor, which does.
async fn a_paused_ex_leader_does_not_reap_beside_its_successor() {
    let smtp = SmtpSink::start().await;
    let hooks = WebhookReceiver::start(200).await;
    let Some(api) = TestApp::spawn_redis(Backend::Postgres, Roles::API, None, |c| {
        fast_jobs(c, &smtp);
        c.worker.leader_lease_ms = 900;
    })
    .await
    else {
        return;
    };
    // A worker took J and died before its first heartbeat: no reaper sees it yet.
    let (queues, job) = relay_one_webhook(&api, &hooks, 60_000).await;
    taken_by_a_ghost(&queues).await;

    let log = api.config.data_dir.join("leader.log");
    let leader =
        Spawned(api.spawn_worker_process("leader", Some(std::fs::File::create(&log).unwrap())));
    wait_leader(&api, 20, |o| o.contains(&format!("-{}-", leader.0.id()))).await;
    // Stopped between two sweeps (they are a second apart and take milliseconds).
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    signal(&leader.0, "STOP");
    // The successor sweeps rarely: the first sweep after the ghost is found dead is the
    // resumed ex-leader's, unless its lapsed lease stops it.
    let successor = api
        .sibling_with(Roles::WORKER, |c| c.jobs.poll_interval_ms = 5_000)
        .await;
    let successor_id = successor.worker_id();
    wait_leader(&api, 20, |o| o == successor_id).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let redis = api.app.as_ref().unwrap().backends.redis.clone().unwrap();
    redis::cmd("ZADD")
        .arg(QueueKeys::new(&redis, JobKind::Webhook).workers)
        .arg(1)
        .arg("ghost")
        .query_async::<()>(&mut redis.conn())
        .await
        .unwrap();
    signal(&leader.0, "CONT");

    let deadline = Instant::now() + Duration::from_secs(20);
    let j = loop {
        let j = api.db.get_job(&job.id).await.unwrap().unwrap();
        if j.status == JobStatus::Done {
            break j;
        }
        assert!(
            Instant::now() < deadline,
            "the dead worker's job never ran: {j:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(j.attempts, 2, "the ghost's attempt counts: {j:?}");
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(
        !log.contains("took back a job from a dead worker"),
        "the ex-leader reaped after its lease lapsed:\n{log}"
    );
    assert!(log.contains("the leader lease may have lapsed"), "{log}");
    successor.stop().await;
    api.stop().await;
    redis.delete_all_under_prefix().await.unwrap();
}
register!(a_paused_ex_leader_does_not_reap_beside_its_successor);

/// Redis: jobs Redis lost (flushed) are found by the sweeper and handed over again.
async fn jobs_lost_by_redis_are_handed_over_again() {
    let smtp = SmtpSink::start().await;
    let hooks = WebhookReceiver::start(200).await;
    let Some(api) = TestApp::spawn_redis(Backend::Sqlite, Roles::API, None, |c| {
        fast_jobs(c, &smtp);
        c.jobs.timeout_secs = 1;
        c.jobs.requeue_after_secs = 2;
    })
    .await
    else {
        return;
    };
    let (queues, job) = relay_one_webhook(&api, &hooks, 2_000).await;
    let queue = queues.queue(JobKind::Webhook);
    // Redis loses everything under this prefix.
    let redis = api.app.as_ref().unwrap().backends.redis.clone().unwrap();
    redis.delete_all_under_prefix().await.unwrap();
    assert_eq!(queue.outstanding().await.unwrap(), 0);

    let worker = api.sibling(Roles::WORKER).await;
    let hook = hooks.wait_until("the lost job", |h| !h.is_empty()).await;
    assert_eq!(hook[0].header("webhook-id"), job.id.as_str());
    worker.stop().await;
    api.stop().await;
}
register!(jobs_lost_by_redis_are_handed_over_again);

/// Two clients' webhooks to one receiver that holds every request open: at most one
/// delivery per client is in flight (`webhook_max_per_client`), under the host's cap of
/// two. The others are deferred, not failed: no attempt is spent on them, and each lands
/// once the receiver answers.
async fn a_slow_webhook_receiver_holds_no_more_slots_than_its_caps(b: Backend) {
    let smtp = SmtpSink::start().await;
    let hooks = WebhookReceiver::start(0).await;
    let Some(t) = TestApp::spawn_with(b, Roles::ALL, |c| {
        fast_jobs(c, &smtp);
        c.jobs.webhook_max_per_host = 2;
        c.jobs.webhook_max_per_client = 1;
    })
    .await
    else {
        return;
    };
    let mut batches = Vec::new();
    for tag in ["a", "b"] {
        let (_, key) = t.client(json!({"webhook_url": hooks.url()})).await;
        let import = t.import(&key, "text/csv", csv(tag, 3)).await;
        t.wait_for(&key, &import.batch_id, BatchStatus::Completed)
            .await;
        batches.push(import.batch_id);
    }
    // Three events per batch, six webhooks; give the held ones time to pile up.
    hooks.wait_until("one per client", |h| h.len() >= 2).await;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let held = hooks.hooks();
    let clients: BTreeSet<String> = held
        .iter()
        .map(|h| h.json()["client_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        (held.len(), clients.len()),
        (2, 2),
        "one delivery in flight per client: {held:?}"
    );
    hooks.answer(204);
    for batch in &batches {
        let done = wait_jobs(
            &t,
            &format!("batch_id={batch}&kind=webhook"),
            3,
            JobStatus::Done,
        )
        .await;
        assert!(
            done.iter().all(|j| j.attempts == 1),
            "a deferral spends no attempt: {done:?}"
        );
    }
    t.stop().await;
}

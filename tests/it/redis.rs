//! The Redis tier: shared limits across processes, cache invalidation across processes,
//! the dedup fast path, fallbacks when Redis is cut, and no immortal keys.

use crate::common::harness::register;
use std::time::{Duration, Instant};

use dataflow::Roles;
use dataflow_contracts::http::ImportView;
use dataflow_contracts::{BatchId, BatchStatus};
use dataflow_platform::Error;
use dataflow_platform::config::Secret;
use dataflow_platform::coordination::mutex::{Acquired, BatchMutex, LOCK_TIMEOUT, Redlock};
use dataflow_platform::redis::{Purpose, Redis};
use dataflow_worker::{Outcome, Step};
use reqwest::Method;
use serde_json::json;

use crate::helpers::{Backend, Proxy, TestApp, backend_tests, csv, service_addr, test_redis_url};

backend_tests!(
    rate_limit_is_exact_across_two_processes,
    revocation_and_policy_changes_reach_every_process_within_a_second,
    redis_outage_falls_back_without_going_unlimited,
    dedup_holds_with_redis_flushed_and_with_redis_cut,
    a_paused_worker_cannot_commit_with_redis_up_or_down,
);

async fn status_of(t: &TestApp, key: &str) -> u16 {
    t.get(key, "/v1/batches").await.status().as_u16()
}

async fn rate_limit_is_exact_across_two_processes(b: Backend) {
    let Some(a) = TestApp::spawn_redis(b, Roles::API, None, |_| {}).await else {
        return;
    };
    let other = a.sibling(Roles::API).await;
    rate_limit_is_shared(&a, &other).await;
    other.stop().await;
    a.stop().await;
}

/// Requests alternating between `a` and `other` are limited as one client's.
pub(crate) async fn rate_limit_is_shared(a: &TestApp, other: &TestApp) {
    let (_, key) = a
        .client(json!({"rate_per_minute": 60, "rate_burst": 10}))
        .await;
    let started = Instant::now();
    let requests = (0..60).map(|i| {
        let target = if i % 2 == 0 { a } else { other };
        target.get(&key, "/v1/batches")
    });
    let answers = futures::future::join_all(requests).await;
    let elapsed = started.elapsed().as_secs_f64();
    let mut admitted = 0;
    for resp in answers {
        match resp.status().as_u16() {
            200 => admitted += 1,
            429 => assert!(resp.headers().contains_key("retry-after")),
            other => panic!("unexpected {other}"),
        }
    }
    // Burst 10, then one per second: never more, whichever process answered.
    let ceiling = 10 + elapsed.ceil() as u32;
    assert!(
        (10..=ceiling).contains(&admitted),
        "admitted {admitted} in {elapsed:.2}s (ceiling {ceiling})"
    );
}

async fn revocation_and_policy_changes_reach_every_process_within_a_second(b: Backend) {
    let Some(a) =
        TestApp::spawn_redis(b, Roles::API, None, |c| c.api.cache_l1_ttl_ms = 60_000).await
    else {
        return;
    };
    let other = a.sibling(Roles::API).await;
    changes_reach_the_other_process(&a, &other).await;
    other.stop().await;
    a.stop().await;
}

/// A policy change, a revocation through `/admin` and one through the operator CLI, made
/// on `a`, are enforced by `other` (whose L1 cache holds the old values) within a second.
pub(crate) async fn changes_reach_the_other_process(a: &TestApp, other: &TestApp) {
    let (client, key) = a.client(json!({"rate_per_minute": 600})).await;
    // Both processes now hold the key and the client in their own L1.
    assert_eq!(status_of(a, &key).await, 200);
    assert_eq!(status_of(other, &key).await, 200);

    let patched = a
        .admin(Method::PATCH, &format!("/admin/clients/{client}/policy"))
        .json(&json!({"rate_per_minute": 120}))
        .send()
        .await
        .unwrap();
    assert_eq!(patched.status(), 200);
    let started = Instant::now();
    loop {
        let resp = other.get(&key, "/v1/batches").await;
        if resp.headers()["ratelimit-policy"] == "\"default\";q=120;w=60" {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "policy change not seen within 1 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    revoke_and_see_it_refused(a, other, &key).await;

    // The operator CLI writes the ledger directly and announces the change the same way.
    let cli_key = a.new_key(&client).await;
    assert_eq!(status_of(other, &cli_key).await, 200);
    let cli_key_id = cli_key.split('_').nth(1).unwrap().to_owned();
    dataflow::cli::keys(
        &a.config,
        dataflow::cli::KeysCmd::Revoke { key_id: cli_key_id },
    )
    .await
    .unwrap();
    within_a_second(other, &cli_key).await;
}

/// Revokes `key` through `a`'s `/admin`; `other` must refuse it within a second.
async fn revoke_and_see_it_refused(a: &TestApp, other: &TestApp, key: &str) {
    let key_id = key.split('_').nth(1).unwrap();
    let revoked = a
        .admin(Method::POST, &format!("/admin/keys/{key_id}/revoke"))
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status(), 204);
    within_a_second(other, key).await;
}

/// Polls until `key` is refused by `t`, which must happen within a second.
async fn within_a_second(t: &TestApp, key: &str) {
    let started = Instant::now();
    while status_of(t, key).await != 401 {
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "revocation not enforced within 1 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A process whose Redis traffic goes through a proxy the test can cut.
pub(crate) async fn behind_proxy(
    b: Backend,
    roles: Roles,
    tweak: impl FnOnce(&mut dataflow_platform::Config),
) -> Option<(TestApp, Proxy)> {
    let url = test_redis_url().await?;
    let proxy = Proxy::start(service_addr(&url, 6379)).await;
    let via_proxy = format!("redis://{}/", proxy.addr);
    let t = TestApp::spawn_redis(b, roles, Some(via_proxy), tweak).await?;
    Some((t, proxy))
}

async fn redis_outage_falls_back_without_going_unlimited(b: Backend) {
    let Some((t, proxy)) = behind_proxy(b, Roles::API, |c| c.api.auth_max_failures = 3).await
    else {
        return;
    };
    let (_, key) = t
        .client(json!({"rate_per_minute": 60, "rate_burst": 3}))
        .await;
    assert_eq!(status_of(&t, &key).await, 200);

    proxy.cut();
    // Quota limits fail open to the in-process limiter: limited, never unlimited.
    let started = Instant::now();
    let statuses: Vec<u16> = futures::future::join_all((0..8).map(|_| t.get(&key, "/v1/batches")))
        .await
        .iter()
        .map(|r| r.status().as_u16())
        .collect();
    // The burst of 3, plus one per second the requests took (the machine may be busy).
    let ceiling = 3 + started.elapsed().as_secs_f64().ceil() as usize;
    let admitted = statuses.iter().filter(|s| **s == 200).count();
    assert!(
        (1..=ceiling).contains(&admitted),
        "with Redis cut: {statuses:?}"
    );
    assert!(statuses.contains(&429));
    // Lock-out counters fail closed to their in-process twin.
    t.assert_locks_out(3, &key).await;
    let ready = t.readyz().await;
    assert_eq!(ready["redis"], "down");
    assert!(ready["fallbacks"]["limiter"].as_u64().unwrap() > 0);
    assert!(ready["fallbacks"]["lockout"].as_u64().unwrap() > 0);

    // A process whose Redis is down when it starts comes up on its fallbacks.
    let late = t.sibling(Roles::API).await;
    assert_eq!(status_of(&late, &key).await, 200);
    let ready = late.readyz().await;
    assert_eq!(
        (ready["status"].as_str(), ready["redis"].as_str()),
        (Some("ready"), Some("down"))
    );

    proxy.heal();
    let started = Instant::now();
    while late.readyz().await["redis"] != "up" {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "Redis did not come back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    late.stop().await;
    t.stop().await;
}

/// Thirty submits of `body` at once make one import (its id returned), and a repeat is
/// answered as its duplicate, by the fast path once it knows the payload.
pub(crate) async fn concurrent_repeats_make_one_import(
    t: &TestApp,
    key: &str,
    body: &str,
) -> dataflow_contracts::ImportId {
    let answers = futures::future::join_all(
        (0..30).map(|_| t.submit(key, "text/csv", body.to_owned()).send()),
    )
    .await;
    let mut created = Vec::new();
    for resp in answers {
        let resp = resp.unwrap();
        let status = resp.status().as_u16();
        let view: ImportView = resp.json().await.unwrap();
        assert!(
            status == 202 || (status == 200 && view.duplicate),
            "{status}"
        );
        if status == 202 {
            created.push(view.id);
        }
    }
    assert_eq!(created.len(), 1);
    let first = created[0].clone();
    let again: ImportView = t
        .submit(key, "text/csv", body.to_owned())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!((again.id.clone(), again.duplicate), (first.clone(), true));
    first
}

async fn dedup_holds_with_redis_flushed_and_with_redis_cut(b: Backend) {
    let Some((t, proxy)) = behind_proxy(b, Roles::ALL, |c| {
        c.api.max_concurrent_imports_per_client = 64
    })
    .await
    else {
        return;
    };
    let (_, key) = t.client(json!({"rate_burst": 200})).await;
    let body = csv("d", 20);
    let first = concurrent_repeats_make_one_import(&t, &key, &body).await;

    // Redis loses the dedup keys: SQL still decides.
    let redis = t.app.as_ref().unwrap().backends.redis.clone().unwrap();
    let mut conn = redis.conn();
    for k in redis
        .keys_with_prefix()
        .await
        .unwrap()
        .iter()
        .filter(|k| k.contains(":dedup:"))
    {
        let _: () = redis::cmd("DEL")
            .arg(k)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    let after_flush = t
        .submit(&key, "text/csv", body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(after_flush.status(), 200);
    assert_eq!(after_flush.json::<ImportView>().await.unwrap().id, first);

    // Redis unreachable: still one import per payload.
    proxy.cut();
    let during_outage = t
        .submit(&key, "text/csv", body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(during_outage.status(), 200);
    let fresh = t
        .submit(&key, "text/csv", csv("e", 5))
        .send()
        .await
        .unwrap();
    assert_eq!(
        fresh.status(),
        202,
        "new payloads are still accepted with Redis down"
    );
    let fresh: ImportView = fresh.json().await.unwrap();
    t.wait_for(&key, &fresh.batch_id, BatchStatus::Completed)
        .await;
    proxy.heal();

    let batches: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM batches")
        .fetch_one(t.db.pool())
        .await
        .unwrap();
    assert_eq!(batches, 2);
    assert_no_immortal_keys(&t).await;
    t.stop().await;
}

/// K1: every limiter, lock, dedup and cache key DataFlow wrote under its prefix carries a
/// TTL. The job queue's keys (`<prefix>:{jobs:<kind>}:…`) are the queue itself and must not
/// expire.
pub(crate) async fn assert_no_immortal_keys(t: &TestApp) {
    let redis = t.app.as_ref().unwrap().backends.redis.clone().unwrap();
    let started = Instant::now();
    let keys = loop {
        match redis.keys_with_prefix().await {
            Ok(keys) => break keys,
            Err(_) if started.elapsed() < Duration::from_secs(10) => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => panic!("Redis did not come back: {e}"),
        }
    };
    assert!(!keys.is_empty(), "the scenario should have written keys");
    let mut conn = redis.conn();
    let queue = redis.key(&["{jobs:"]);
    for k in keys.into_iter().filter(|k| !k.starts_with(&queue)) {
        let ttl: i64 = redis::cmd("PTTL")
            .arg(&k)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(ttl > 0 || ttl == -2, "key {k} has no TTL ({ttl})");
    }
}

async fn a_paused_worker_cannot_commit_with_redis_up_or_down(b: Backend) {
    let Some((t, proxy)) = behind_proxy(b, Roles::API, |c| c.worker.lease_secs = 2).await else {
        return;
    };
    let (_, key) = t.client(json!({})).await;
    for redis_up in [true, false] {
        if !redis_up {
            proxy.cut();
        }
        let imp = t
            .import(&key, "text/csv", csv(&format!("p{redis_up}"), 35))
            .await;
        let (paused, successor) = (t.worker(), t.worker());
        let lease = paused.claim_next().await.unwrap().expect("a ready batch");
        let mut run = paused.start(lease).await.unwrap();
        assert!(matches!(
            paused.step(&mut run).await.unwrap(),
            Step::Chunk(_)
        ));
        assert!(
            successor.claim_next().await.unwrap().is_none(),
            "held batches are left alone"
        );

        // The paused worker sleeps past its lease (and its lock's TTL): real time, since
        // both expiries are judged by the servers' clocks.
        tokio::time::sleep(Duration::from_millis(2_300)).await;
        let takeover = successor
            .claim_next()
            .await
            .unwrap()
            .expect("the expired batch is claimable");
        assert!(matches!(
            successor.process(takeover, &Default::default()).await,
            Outcome::Completed(_)
        ));

        let refused = paused.step(&mut run).await.unwrap_err();
        assert!(
            matches!(refused, Error::FenceRejected { .. }),
            "redis up: {redis_up}: {refused:?}"
        );
        let view = t.batch(&key, &imp.batch_id).await;
        assert_eq!(
            (view.status, view.records_written),
            (BatchStatus::Completed, 35)
        );
        let completions = t.completions(&imp.batch_id).await;
        assert_eq!(completions, 1);
    }
    let mutex = &t.app.as_ref().unwrap().backends.mutex;
    assert!(
        mutex.degraded() > 0,
        "the Redis-down round must have run on the SQL lease alone"
    );
    proxy.heal();
    t.stop().await;
}

/// The batch mutex on three lock servers (three databases of the test Redis, each behind
/// its own proxy): a lock needs two of them; with one cut it is still taken and still
/// exclusive; with two cut the worker goes on with the SQL lease alone.
async fn the_batch_mutex_needs_a_majority_of_its_lock_servers() {
    let Some(url) = test_redis_url().await else {
        return;
    };
    let mut proxies = Vec::new();
    for _ in 0..3 {
        proxies.push(Proxy::start(service_addr(&url, 6379)).await);
    }
    let nodes: Vec<_> = proxies
        .iter()
        .enumerate()
        .map(|(db, p)| Secret::new(format!("redis://{}/{db}", p.addr)))
        .collect();
    let Some(t) = TestApp::spawn_redis(Backend::Sqlite, Roles::API, None, |c| {
        c.redlock_urls = nodes;
    })
    .await
    else {
        return;
    };
    let mutex = &t.app.as_ref().unwrap().backends.mutex;
    let ttl = Duration::from_secs(5);
    let acquire = async |b: &BatchId| mutex.acquire(b, ttl).await;
    let (all, one_cut, two_cut) = (
        BatchId::generate(),
        BatchId::generate(),
        BatchId::generate(),
    );

    assert!(matches!(acquire(&all).await, Acquired::Held(_)));
    assert!(matches!(acquire(&all).await, Acquired::Contended));

    proxies[0].cut();
    assert!(matches!(acquire(&one_cut).await, Acquired::Held(_)));
    assert!(matches!(acquire(&one_cut).await, Acquired::Contended));
    assert_eq!(mutex.degraded(), 0);

    proxies[1].cut();
    assert!(matches!(acquire(&two_cut).await, Acquired::Degraded));
    assert!(mutex.degraded() > 0);

    proxies[0].heal();
    proxies[1].heal();
    let healed = BatchId::generate();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !matches!(acquire(&healed).await, Acquired::Held(_)) {
        assert!(
            Instant::now() < deadline,
            "the lock servers never came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    t.stop().await;
}
register!(the_batch_mutex_needs_a_majority_of_its_lock_servers);

/// A lock attempt cut by the mutex's timeout after two of its three lock servers took its
/// keys, the third hanging (it accepts connections and never answers, as a stopped Redis
/// does): the cut is not contention, and the keys it may have set are given back, so another
/// worker takes the batch's lock within seconds, not after the lock's TTL (a whole lease).
async fn a_lock_attempt_cut_by_its_timeout_leaves_no_lock_behind() {
    let Some(url) = test_redis_url().await else {
        return;
    };
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let silent = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((conn, _)) = silent.accept().await {
            open.push(conn);
        }
    });
    let hung = Proxy::start(silent_addr).await;
    let server = service_addr(&url, 6379);
    let prefix = format!("dftest-{}", ulid::Ulid::new().to_string().to_lowercase());
    let mut nodes = Vec::new();
    for url in [
        format!("redis://{server}/0"),
        format!("redis://{server}/1"),
        format!("redis://{}/2", hung.addr),
    ] {
        nodes.push(
            Redis::connect(&url, &prefix, None, Purpose::State)
                .await
                .unwrap(),
        );
    }
    // The seam: a timeout well below the hung server's connect timeout cuts every attempt.
    let cut_short = BatchMutex::Redlock(Box::new(Redlock::new(
        nodes.clone(),
        Duration::from_millis(200),
    )));
    let other_worker = BatchMutex::Redlock(Box::new(Redlock::new(nodes.clone(), LOCK_TIMEOUT)));
    let (batch, ttl) = (BatchId::generate(), Duration::from_secs(60));
    let key = nodes[0].key(&["batch-lock", batch.as_str()]);

    let keys_on_a_majority = async {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let mut held = 0;
            for node in &nodes[..2] {
                let exists = redis::cmd("EXISTS")
                    .arg(&key)
                    .query_async::<bool>(&mut node.conn())
                    .await;
                held += usize::from(exists.unwrap());
            }
            if held == 2 {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    let (answer, set) = tokio::join!(cut_short.acquire(&batch, ttl), keys_on_a_majority);
    assert!(
        set,
        "the attempt never set its keys on the two servers that answer"
    );
    assert!(
        matches!(answer, Acquired::Degraded),
        "a cut attempt must not read its own keys as another worker's lock"
    );

    // The hung server now refuses: the next attempts end as soon as the two others answer.
    hung.cut();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Acquired::Held(lock) = other_worker.acquire(&batch, ttl).await {
            lock.release().await;
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the cut attempt's keys kept the batch from every worker"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    silent.abort();
}
register!(a_lock_attempt_cut_by_its_timeout_leaves_no_lock_behind);

/// `redis_cache_url`: the cache and its invalidations live on their own Redis (one that
/// may evict), nothing of the cache on the main one, and a revocation still reaches every
/// process within a second.
async fn a_separate_cache_redis_carries_the_cache_and_its_invalidations() {
    let Some(url) = test_redis_url().await else {
        return;
    };
    let cache_url = format!("redis://{}/1", service_addr(&url, 6379));
    let Some(a) = TestApp::spawn_redis(Backend::Sqlite, Roles::API, None, |c| {
        c.redis_cache_url = Some(Secret::new(cache_url));
        c.api.cache_l1_ttl_ms = 60_000;
    })
    .await
    else {
        return;
    };
    let other = a.sibling(Roles::API).await;
    let (_, key) = a.client(json!({})).await;
    assert_eq!(status_of(&a, &key).await, 200);
    assert_eq!(status_of(&other, &key).await, 200);

    let backends = &a.app.as_ref().unwrap().backends;
    let is_cache = |k: &String| k.contains(":cache:");
    let main = backends
        .redis
        .as_ref()
        .unwrap()
        .keys_with_prefix()
        .await
        .unwrap();
    let cache = backends.cache_redis.as_ref().unwrap();
    let cached = cache.keys_with_prefix().await.unwrap();
    assert!(
        !main.iter().any(is_cache),
        "cache keys on the main Redis: {main:?}"
    );
    assert!(
        cached.iter().any(is_cache),
        "no cache keys on the cache Redis"
    );

    revoke_and_see_it_refused(&a, &other, &key).await;
    cache.delete_all_under_prefix().await.unwrap();
    other.stop().await;
    a.stop().await;
}
register!(a_separate_cache_redis_carries_the_cache_and_its_invalidations);

/// A Redis with TLS and a password, started by the test itself (skipped when this
/// machine's redis-server or openssl cannot do it).
struct TlsRedis {
    child: std::process::Child,
    port: u16,
    _dir: std::path::PathBuf,
}

impl TlsRedis {
    fn start() -> Option<TlsRedis> {
        let dir = std::env::temp_dir().join(format!("dataflow-tls-{}", ulid::Ulid::new()));
        std::fs::create_dir_all(&dir).ok()?;
        let cert = dir.join("cert.pem");
        let key = dir.join("key.pem");
        // A CA, and a server certificate for 127.0.0.1 signed by it.
        let script = r#"set -e
openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=dataflow-test-ca -keyout ca.key -out ca.pem
openssl req -newkey rsa:2048 -nodes -subj /CN=localhost -keyout key.pem -out server.csr
printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' > ext.cnf
openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 1 -extfile ext.cnf -out cert.pem
"#;
        let made = std::process::Command::new("sh")
            .args(["-c", script])
            .current_dir(&dir)
            .output()
            .ok()?;
        if !made.status.success() {
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .ok()?
            .local_addr()
            .ok()?
            .port();
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                "0",
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args([
                "--tls-port",
                &port.to_string(),
                "--tls-auth-clients",
                "no",
                "--requirepass",
                "s3cret-pass",
            ])
            .arg("--tls-cert-file")
            .arg(&cert)
            .arg("--tls-key-file")
            .arg(&key)
            .arg("--dir")
            .arg(&dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .ok()?;
        Some(TlsRedis {
            child,
            port,
            _dir: dir,
        })
    }

    fn url(&self) -> String {
        format!("rediss://:s3cret-pass@127.0.0.1:{}/", self.port)
    }

    /// The CA clients must trust.
    fn ca(&self) -> std::path::PathBuf {
        self._dir.join("ca.pem")
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self._dir);
    }
}

async fn redis_over_tls_with_a_password() {
    let Some(mut server) = TlsRedis::start() else {
        crate::common::harness::skip(
            "cannot start a TLS redis-server here (needs redis-server with TLS and openssl)".into(),
        );
        return;
    };
    // Wait until it answers over TLS, or skip if this redis-server has no TLS support.
    dataflow_platform::install_crypto_provider();
    let started = Instant::now();
    let ready = loop {
        if let Ok(Some(status)) = server.child.try_wait() {
            eprintln!("TLS redis-server exited: {status}");
            break false;
        }
        let ca = std::fs::read(server.ca()).unwrap();
        let certs = redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(ca),
        };
        let client = redis::Client::build_with_tls(server.url(), certs).unwrap();
        let connect = client.get_multiplexed_async_connection();
        match tokio::time::timeout(Duration::from_secs(1), connect).await {
            Ok(Ok(mut c)) => match redis::cmd("PING").query_async::<String>(&mut c).await {
                Ok(_) => break true,
                Err(e) => eprintln!("TLS Redis: PING failed: {e}"),
            },
            Ok(Err(e)) => eprintln!("TLS Redis not ready: {e}"),
            Err(_) => eprintln!("TLS Redis: connect timed out"),
        }
        if started.elapsed() > Duration::from_secs(10) {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    if !ready {
        crate::common::harness::skip("this redis-server does not serve TLS".into());
        return;
    }
    let Some(t) = TestApp::spawn_redis(Backend::Sqlite, Roles::API, Some(server.url()), |c| {
        c.redis_ca_file = Some(server.ca());
    })
    .await
    else {
        return;
    };
    let (_, key) = t
        .client(json!({"rate_per_minute": 60, "rate_burst": 2}))
        .await;
    let statuses: Vec<u16> = [(); 3].iter().map(|_| 0).collect();
    let mut got = statuses;
    for s in got.iter_mut() {
        *s = status_of(&t, &key).await;
    }
    assert_eq!(
        got,
        [200, 200, 429],
        "limits enforced through the TLS Redis"
    );
    assert_eq!(t.readyz().await["redis"], "up");
    let redis = t.app.as_ref().unwrap().backends.redis.clone().unwrap();
    assert!(
        redis
            .keys_with_prefix()
            .await
            .unwrap()
            .iter()
            .any(|k| k.contains(":rl:"))
    );
    t.stop().await;
}
register!(redis_over_tls_with_a_password);

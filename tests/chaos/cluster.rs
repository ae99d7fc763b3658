//! The system under test: two `dataflow serve` and three `dataflow worker` processes on a
//! PostgreSQL database, a Redis prefix and a RabbitMQ prefix of their own, each service
//! reached through a proxy the test controls. Every process is a child of the test, signalled
//! by its pid only, and all of them are killed when the cluster is dropped, whatever happened.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Child;
use std::time::Duration;

use dataflow_platform::Config;
use dataflow_platform::config::Secret;
use dataflow_platform::redis::{Purpose, Redis};
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio::time::Instant;

use crate::common::admin::Admin;
use crate::common::db::{Backend, TestDb};
use crate::common::process::{self, dataflow_command};
use crate::common::proxy::Proxy;
use crate::common::services::{
    delete_amqp_topology, on_private_runtime, service_addr, test_amqp_url, test_redis_url, url_via,
};

pub const APIS: usize = 2;
pub const WORKERS: usize = 3;
/// The batch lease: short, so a killed or stopped worker's batch is taken over within a
/// fault, yet longer than the fleet registry takes to lose a silent worker
/// (`fleet::MEMBER_TTL` and a beat), as with the default lease, so that the leader's reclaim
/// is what ends the lease early.
pub const LEASE: Duration = Duration::from_secs(10);
const ADMIN_TOKEN: &str = "chaos-operator-token-0123456789";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Api,
    Worker,
}

/// One process of the cluster: an API (`addr` is its listener) or a worker (`addr` is its
/// operations listener: `/readyz`, `/metrics`).
pub struct Proc {
    pub name: String,
    pub role: Role,
    pub addr: SocketAddr,
    child: Option<Child>,
    /// Stopped by `SIGSTOP` (and not continued yet).
    stopped: bool,
}

impl Proc {
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

/// A batch a worker is in the middle of, as SQL has it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Held {
    pub id: String,
    pub lease_owner: String,
    pub lease_epoch: i64,
    pub attempts: i32,
    pub takeovers: i32,
    pub status: String,
}

pub struct Cluster {
    pub procs: Vec<Proc>,
    pub pg: Proxy,
    pub redis: Proxy,
    pub amqp: Proxy,
    /// The ledger, straight (not through the proxy).
    pub sql: PgPool,
    /// This cluster's Redis prefix, straight.
    pub redis_direct: Redis,
    /// Where each process writes its output.
    pub logs: PathBuf,
    config: Config,
    amqp_url: String,
    http: reqwest::Client,
    // Last: the database outlives every process using it.
    _db: TestDb,
}

impl Cluster {
    /// `None` (with a message) when a service is unreachable and not required.
    pub async fn start() -> Option<Cluster> {
        // The TLS provider every DataFlow process installs, for the test's own clients.
        dataflow_platform::install_crypto_provider();
        let redis_url = test_redis_url().await?;
        let amqp_url = test_amqp_url().await?;
        let db = TestDb::create(Backend::Postgres).await?;
        let pg = Proxy::start(service_addr(&db.url, 5432)).await;
        let redis = Proxy::start(service_addr(&redis_url, 6379)).await;
        let amqp = Proxy::start(service_addr(&amqp_url, 5672)).await;
        let tag = ulid::Ulid::new().to_string().to_lowercase();
        let prefix = format!("dfchaos-{tag}");
        let config = chaos_config(
            &db,
            url_via(&db.url, pg.addr),
            url_via(&redis_url, redis.addr),
            url_via(&amqp_url, amqp.addr),
            &prefix,
        );
        let logs = std::env::temp_dir().join(format!("dataflow-chaos-{tag}"));
        std::fs::create_dir_all(&logs).unwrap();
        let sql = sqlx::postgres::PgPoolOptions::new()
            .max_connections(4)
            .connect(&db.url)
            .await
            .expect("the test's own ledger connection");
        let redis_direct = Redis::connect(&redis_url, &prefix, None, Purpose::State)
            .await
            .expect("the test's own Redis connection");
        let roles =
            std::iter::repeat_n(Role::Api, APIS).chain(std::iter::repeat_n(Role::Worker, WORKERS));
        let procs = roles
            .enumerate()
            .map(|(i, role)| Proc {
                name: match role {
                    Role::Api => format!("api-{i}"),
                    Role::Worker => format!("worker-{}", i - APIS),
                },
                role,
                addr: free_addr(),
                child: None,
                stopped: false,
            })
            .collect();
        let mut cluster = Cluster {
            procs,
            pg,
            redis,
            amqp,
            sql,
            redis_direct,
            logs,
            config,
            amqp_url,
            http: reqwest::Client::builder()
                .no_proxy()
                .timeout(Duration::from_secs(2))
                .build()
                .unwrap(),
            _db: db,
        };
        // The first process migrates the ledger; the others start on it.
        cluster.spawn(0);
        cluster.wait_healthy(0).await;
        for i in 1..cluster.procs.len() {
            cluster.spawn(i);
        }
        for i in 1..cluster.procs.len() {
            cluster.wait_healthy(i).await;
        }
        // A service that answers but does not work (a broker that cannot declare its queues)
        // would make every scenario fail for the same reason: say so once.
        if let Err(why) = cluster.wait_ready(Duration::from_secs(60)).await {
            panic!(
                "the cluster never became ready: {why}; see {}",
                cluster.logs.display()
            );
        }
        Some(cluster)
    }

    pub fn api_urls(&self) -> Vec<String> {
        self.apis().map(|i| self.procs[i].url("")).collect()
    }

    pub fn apis(&self) -> impl Iterator<Item = usize> + use<> {
        0..APIS
    }

    pub fn workers(&self) -> impl Iterator<Item = usize> + use<> {
        APIS..APIS + WORKERS
    }

    fn spawn(&mut self, i: usize) {
        let proc = &mut self.procs[i];
        let mut config = self.config.clone();
        // Its sessions carry its name, so SQL can tell whose they are.
        let url = config.database_url.take().unwrap_or_default();
        config.database_url = Some(format!("{url}?application_name={}", proc.name));
        let role = match proc.role {
            Role::Api => {
                config.listen = proc.addr;
                "serve"
            }
            Role::Worker => {
                config.ops_listen = Some(proc.addr);
                "worker"
            }
        };
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(self.logs.join(format!("{}.log", proc.name)))
            .unwrap();
        let child = dataflow_command(&config, role, &proc.name, Some(log))
            .spawn()
            .unwrap();
        proc.child = Some(child);
    }

    /// Waits (up to a minute) until process `i` answers `/healthz`.
    async fn wait_healthy(&mut self, i: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let answered = self.http.get(self.procs[i].url("/healthz")).send().await;
            if answered.is_ok_and(|r| r.status().is_success()) {
                return;
            }
            let proc = &mut self.procs[i];
            let exited = proc
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            assert!(
                exited.is_none() && Instant::now() < deadline,
                "{} did not come up ({exited:?}); see {}",
                proc.name,
                self.logs.join(format!("{}.log", proc.name)).display()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `kill -9` of process `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.procs[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts process `i` again (after [`Cluster::kill`]) on the same address.
    pub async fn restart(&mut self, i: usize) {
        self.spawn(i);
        self.wait_healthy(i).await;
    }

    /// Sends `signal` (`STOP`, `CONT`) to process `i`, by its pid.
    pub fn signal(&mut self, i: usize, signal: &str) {
        let proc = &mut self.procs[i];
        process::signal(proc.child.as_ref().expect("a running process"), signal);
        proc.stopped = signal == "STOP";
    }

    /// `GET /readyz` of process `i` (an answer with any status), `None` without one.
    pub async fn readyz(&self, i: usize) -> Option<Value> {
        let proc = &self.procs[i];
        if proc.child.is_none() || proc.stopped {
            return None;
        }
        let resp = self
            .http
            .get(self.procs[i].url("/readyz"))
            .send()
            .await
            .ok()?;
        resp.json().await.ok()
    }

    /// `GET /metrics` of process `i`.
    pub async fn metrics(&self, i: usize) -> Option<String> {
        let resp = self
            .http
            .get(self.procs[i].url("/metrics"))
            .send()
            .await
            .ok()?;
        resp.text().await.ok()
    }

    /// Waits (up to `limit`) until every process answers `/readyz` with the ledger and Redis
    /// up and events through the broker; the first process that does not, otherwise.
    pub async fn wait_ready(&self, limit: Duration) -> Result<(), String> {
        let deadline = Instant::now() + limit;
        loop {
            let mut not_ready = None;
            for (i, proc) in self.procs.iter().enumerate() {
                let r = self.readyz(i).await;
                let ready = r.as_ref().is_some_and(|r| {
                    r["ledger"] == "up" && r["redis"] == "up" && r["events"]["mode"] == "broker"
                });
                if !ready {
                    not_ready = Some(format!("{}: {}", proc.name, r.unwrap_or(Value::Null)));
                    break;
                }
            }
            match not_ready {
                None => return Ok(()),
                Some(why) if Instant::now() >= deadline => return Err(why),
                Some(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    /// A new client (tenant) with limits no load of this suite reaches: its id and API key.
    pub async fn new_client(&self, name: &str) -> (String, String) {
        let admin = Admin {
            http: &self.http,
            base: self.procs[0].url(""),
            token: ADMIN_TOKEN,
        };
        let policy = json!({"rate_per_minute": 60000, "rate_burst": 1000});
        let id = admin.create_client(name, policy).await;
        let key = admin.create_key(&id).await;
        (id, key)
    }

    /// Waits (up to `limit`) for a worker in the first half of a batch; the worker's index
    /// and the batch. Batches are short, so the caller checks that it still holds it once
    /// it has signalled the worker.
    pub async fn worker_in_a_batch(&self, limit: Duration) -> Option<(usize, Held)> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            let held: Vec<Held> = sqlx::query_as(
                "SELECT id, lease_owner, lease_epoch, attempts, takeovers, status FROM batches \
                 WHERE status = 'processing' AND lease_owner IS NOT NULL \
                 AND checkpoint * 2 < records_total",
            )
            .fetch_all(&self.sql)
            .await
            .unwrap();
            for batch in held {
                if let Some(i) = self.worker_named(&batch.lease_owner) {
                    return Some((i, batch));
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }

    /// The worker whose id (`<host>-<pid>-<nonce>`) is `owner`.
    fn worker_named(&self, owner: &str) -> Option<usize> {
        self.process_named(owner)
            .filter(|&i| self.procs[i].role == Role::Worker)
    }

    /// The running process whose id (`<host>-<pid>-<nonce>`) is `owner`.
    fn process_named(&self, owner: &str) -> Option<usize> {
        (0..self.procs.len()).find(|&i| {
            self.procs[i]
                .pid()
                .is_some_and(|pid| owner.contains(&format!("-{pid}-")))
        })
    }

    /// The name of the process whose id is `owner` (`owner` itself for none of them).
    pub fn name_of(&self, owner: &str) -> String {
        match self.process_named(owner) {
            Some(i) => self.procs[i].name.clone(),
            None if owner.is_empty() => "a successor (done when seen)".to_owned(),
            None => owner.to_owned(),
        }
    }

    /// The process that leads the worker fleet now (`none`: no lease is current).
    pub async fn leader(&self) -> String {
        let owner: Option<String> = sqlx::query_scalar(
            "SELECT owner FROM leases WHERE name = 'leader' \
             AND expires_at > CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)",
        )
        .fetch_optional(&self.sql)
        .await
        .unwrap()
        .flatten();
        owner.map_or_else(|| "none".to_owned(), |o| self.name_of(&o))
    }

    /// Whether process `i` has a transaction open that wrote rows (and so holds their locks)
    /// but runs no statement: the state a worker stopped inside a chunk is left in.
    pub async fn in_a_writing_transaction(&self, i: usize) -> bool {
        sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_stat_activity a JOIN pg_locks l ON l.pid = a.pid \
             WHERE a.application_name = $1 AND a.state LIKE 'idle in transaction%' \
             AND l.locktype = 'transactionid' AND l.granted)",
        )
        .bind(&self.procs[i].name)
        .fetch_one(&self.sql)
        .await
        .unwrap()
    }

    /// The batch `id` as SQL has it now.
    pub async fn batch(&self, id: &str) -> Held {
        sqlx::query_as(
            "SELECT id, COALESCE(lease_owner, '') AS lease_owner, lease_epoch, attempts, \
             takeovers, status \
             FROM batches WHERE id = $1",
        )
        .bind(id)
        .fetch_one(&self.sql)
        .await
        .unwrap()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.procs.len() {
            self.kill(i);
        }
        let redis = self.redis_direct.clone();
        let (amqp_url, amqp) = (self.amqp_url.clone(), self.config.amqp.clone());
        on_private_runtime(async move {
            let _ = redis.delete_all_under_prefix().await;
            let props = lapin::ConnectionProperties::default();
            if let Ok(conn) = lapin::Connection::connect(&amqp_url, props).await
                && let Ok(ch) = conn.create_channel().await
            {
                let names = dataflow_platform::broker::Names::new(&amqp);
                delete_amqp_topology(&ch, &names, &[]).await;
            }
        });
    }
}

/// An address on loopback that nothing listens on now.
fn free_addr() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

/// Every process's configuration: the services through their proxies, short leases and
/// timeouts so that a fault's effects (takeovers, lapsed keys, requeued jobs) show within it.
fn chaos_config(db: &TestDb, pg: String, redis: String, amqp: String, prefix: &str) -> Config {
    let mut c = Config {
        database_url: Some(pg),
        data_dir: db.dir.clone(),
        admin_token: Some(Secret::new(ADMIN_TOKEN)),
        secret: Some(Secret::new("chaos-server-secret-0123456789")),
        db_max_connections: 5,
        redis_url: Some(Secret::new(redis)),
        redis_prefix: prefix.to_owned(),
        amqp_url: Some(Secret::new(amqp)),
        ..Config::default()
    };
    c.amqp.prefix = format!("{prefix}.");
    c.amqp.reconnect_min_ms = 50;
    c.amqp.reconnect_max_ms = 1000;
    c.amqp.confirm_timeout_ms = 2000;
    c.amqp.relay_lease_ms = 4000;
    // An unfinished request holds its Idempotency-Key this long.
    c.api.request_timeout_secs = 15;
    // Short enough that a ledger cut reaches authentication.
    c.api.cache_ttl_ms = 5000;
    c.api.cache_l1_ttl_ms = 1000;
    c.worker.concurrency = 2;
    c.worker.chunk_size = 10;
    c.worker.lease_secs = LEASE.as_secs();
    c.worker.poll_interval_ms = 200;
    c.worker.retry_base_ms = 200;
    c.worker.retry_max_ms = 2000;
    c.worker.shutdown_grace_secs = 2;
    c.worker.leader_lease_ms = 2000;
    c.worker.summary_schedule = String::new();
    c.outbox.poll_interval_ms = 200;
    c.jobs.poll_interval_ms = 200;
    c.jobs.retry_base_ms = 200;
    c.jobs.retry_max_ms = 2000;
    c.jobs.timeout_secs = 10;
    c.jobs.requeue_after_secs = 15;
    c.jobs.dead_worker_ms = 3000;
    c.validate().expect("a valid chaos config");
    c
}

//! The test harness: a DataFlow process per test on a fresh database, a typed HTTP client,
//! and the switch that runs every scenario on SQLite and on PostgreSQL.

use std::time::{Duration, Instant};

use dataflow::{App, Roles};
use dataflow_contracts::http::{BatchView, ImportView};
use dataflow_contracts::{BatchId, BatchStatus, ClientId};
use dataflow_platform::Config;
use dataflow_platform::ledger::Db;
use serde_json::Value;
use tokio::net::TcpListener;

pub use crate::common::db::{Backend, TestDb};
pub use crate::common::process::{Spawned, signal};
pub use crate::common::proxy::Proxy;
pub use crate::common::records::csv;
pub use crate::common::services::{service_addr, test_amqp_url, test_redis_url};

/// Runs each named scenario `async fn name(backend: Backend)` once per backend.
macro_rules! backend_tests {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            async fn sqlite() {
                super::$name(crate::helpers::Backend::Sqlite).await
            }
            crate::common::harness::register!(sqlite);
            async fn postgres() {
                super::$name(crate::helpers::Backend::Postgres).await
            }
            crate::common::harness::register!(postgres);
        }
    )*};
}
pub(crate) use backend_tests;

/// The operator token of every test process.
const OPERATOR_TOKEN: &str = "test-operator-token-0123456789";

/// Configuration for a test process: fast polling, small chunks, loopback.
pub fn test_config(db: &TestDb) -> Config {
    let mut c = Config {
        database_url: Some(db.url.clone()),
        data_dir: db.dir.clone(),
        ..Config::default()
    };
    c.admin_token = Some(dataflow_platform::config::Secret::new(OPERATOR_TOKEN));
    c.worker.poll_interval_ms = 50;
    c.worker.chunk_size = 10;
    c.worker.retry_base_ms = 50;
    c.worker.retry_max_ms = 200;
    c.worker.shutdown_grace_secs = 2;
    c.outbox.poll_interval_ms = 50;
    // Every test process answers scrapes and health checks on an operations port too.
    c.ops_listen = Some(std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
    c
}

pub struct TestApp {
    pub app: Option<App>,
    pub addr: std::net::SocketAddr,
    /// The operations listener (`/metrics`, `/healthz`, `/readyz`).
    pub ops_addr: Option<std::net::SocketAddr>,
    pub http: reqwest::Client,
    pub db: Db,
    pub config: Config,
    // Last: the database outlives the process using it. Siblings share it and hold none.
    _test_db: Option<TestDb>,
}

impl TestApp {
    /// A process with `roles` on a fresh database; `tweak` adjusts its config.
    pub async fn spawn_with(
        backend: Backend,
        roles: Roles,
        tweak: impl FnOnce(&mut Config),
    ) -> Option<TestApp> {
        let test_db = TestDb::create(backend).await?;
        Some(Self::spawn_on(test_db, roles, tweak).await)
    }

    /// A process with `roles` on `test_db`; `tweak` adjusts its config.
    pub async fn spawn_on(
        test_db: TestDb,
        roles: Roles,
        tweak: impl FnOnce(&mut Config),
    ) -> TestApp {
        let mut config = test_config(&test_db);
        tweak(&mut config);
        Self::start(config, roles, Some(test_db)).await
    }

    async fn start(config: Config, roles: Roles, test_db: Option<TestDb>) -> TestApp {
        config.validate().expect("valid test config");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let app = App::start(config.clone(), roles, Some(listener))
            .await
            .expect("start DataFlow");
        // A worker-only process serves no HTTP; its address is never used.
        let addr = app
            .addr
            .unwrap_or(std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
        let ops_addr = app.ops_addr;
        let db = app.backends.db.clone();
        let http = reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("http client");
        TestApp {
            app: Some(app),
            addr,
            ops_addr,
            http,
            db,
            config,
            _test_db: test_db,
        }
    }

    /// The handle of a `dataflow serve` process the test started on `config`, listening on
    /// `config.listen`: the same typed client, and a ledger handle of the test's own.
    pub async fn attach(config: Config, test_db: TestDb) -> TestApp {
        // No backends are built in this process to install it.
        dataflow_platform::install_crypto_provider();
        let db = dataflow_platform::backends::open_ledger(&config)
            .await
            .expect("open the ledger");
        let http = reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("http client");
        TestApp {
            app: None,
            addr: config.listen,
            ops_addr: None,
            http,
            db,
            config,
            _test_db: Some(test_db),
        }
    }

    /// A second process on the same database and Redis prefix (stop it before this one).
    pub async fn sibling(&self, roles: Roles) -> TestApp {
        self.sibling_with(roles, |_| {}).await
    }

    /// A sibling whose config `tweak` adjusts.
    pub async fn sibling_with(&self, roles: Roles, tweak: impl FnOnce(&mut Config)) -> TestApp {
        let mut config = self.config.clone();
        tweak(&mut config);
        Self::start(config, roles, None).await
    }

    /// A process whose Redis is `redis_url` (default: the test Redis) under a fresh prefix;
    /// `None` when Redis is unreachable and not required.
    pub async fn spawn_redis(
        backend: Backend,
        roles: Roles,
        redis_url: Option<String>,
        tweak: impl FnOnce(&mut Config),
    ) -> Option<TestApp> {
        let direct = test_redis_url().await?;
        let url = redis_url.unwrap_or(direct);
        let prefix = format!("dftest-{}", ulid::Ulid::new().to_string().to_lowercase());
        Self::spawn_with(backend, roles, |c| {
            c.redis_url = Some(dataflow_platform::config::Secret::new(url));
            c.redis_prefix = prefix;
            tweak(c);
        })
        .await
    }

    /// A process on the Redis Cluster whose seed nodes are `urls`, under a fresh prefix.
    pub async fn spawn_on_cluster(
        backend: Backend,
        roles: Roles,
        urls: Vec<String>,
        tweak: impl FnOnce(&mut Config),
    ) -> Option<TestApp> {
        let prefix = format!("dftest-{}", ulid::Ulid::new().to_string().to_lowercase());
        Self::spawn_with(backend, roles, |c| {
            c.redis_cluster_urls = urls
                .into_iter()
                .map(dataflow_platform::config::Secret::new)
                .collect();
            c.redis_prefix = prefix;
            tweak(c);
        })
        .await
    }

    pub async fn spawn(backend: Backend) -> Option<TestApp> {
        Self::spawn_with(backend, Roles::ALL, |_| {}).await
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// `path` on the operations listener.
    pub fn ops_url(&self, path: &str) -> String {
        format!(
            "http://{}{path}",
            self.ops_addr.expect("an operations listener")
        )
    }

    pub fn admin(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, self.url(path))
            .bearer_auth(OPERATOR_TOKEN)
    }

    /// A client with `policy` (a policy patch) and one API key.
    pub async fn client(&self, policy: Value) -> (ClientId, String) {
        let id = self.operator().create_client("test client", policy).await;
        let id: ClientId = id.parse().unwrap();
        let key = self.new_key(&id).await;
        (id, key)
    }

    pub async fn new_key(&self, client: &ClientId) -> String {
        self.operator().create_key(client.as_str()).await
    }

    fn operator(&self) -> crate::common::admin::Admin<'_> {
        crate::common::admin::Admin {
            http: &self.http,
            base: self.url(""),
            token: OPERATOR_TOKEN,
        }
    }

    pub fn submit(
        &self,
        key: &str,
        content_type: &str,
        body: impl Into<reqwest::Body>,
    ) -> reqwest::RequestBuilder {
        self.http
            .post(self.url("/v1/imports"))
            .bearer_auth(key)
            .header("content-type", content_type)
            .body(body)
    }

    /// Submits and expects 202.
    pub async fn import(
        &self,
        key: &str,
        content_type: &str,
        body: impl Into<reqwest::Body>,
    ) -> ImportView {
        let resp = self.submit(key, content_type, body).send().await.unwrap();
        assert_eq!(resp.status(), 202, "submit: {}", resp.text().await.unwrap());
        resp.json().await.unwrap()
    }

    pub async fn get(&self, key: &str, path: &str) -> reqwest::Response {
        self.http
            .get(self.url(path))
            .bearer_auth(key)
            .send()
            .await
            .unwrap()
    }

    pub async fn batch(&self, key: &str, id: &BatchId) -> BatchView {
        let resp = self.get(key, &format!("/v1/batches/{id}")).await;
        assert_eq!(resp.status(), 200);
        resp.json().await.unwrap()
    }

    /// Waits until the batch reaches `status`, polling politely: a 429 from the client's
    /// own rate limit means wait and ask again. Fails when the batch has not moved (its
    /// status or the records it processed) for 20 s: a large file on a busy machine may
    /// take longer than that as a whole, but not between two of its chunks.
    pub async fn wait_for(&self, key: &str, id: &BatchId, status: BatchStatus) -> BatchView {
        let mut deadline = Instant::now() + Duration::from_secs(20);
        let mut seen = None;
        loop {
            let resp = self.get(key, &format!("/v1/batches/{id}")).await;
            if resp.status() == 429 {
                assert!(Instant::now() < deadline, "batch {id}: still rate limited");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            assert_eq!(resp.status(), 200);
            let b: BatchView = resp.json().await.unwrap();
            if b.status == status {
                return b;
            }
            let now = Some((b.status, b.records_processed));
            if now != seen {
                seen = now;
                deadline = Instant::now() + Duration::from_secs(20);
            }
            assert!(
                Instant::now() < deadline,
                "batch {id} stuck in {:?}, wanted {status:?}: {b:?}",
                b.status
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `GET /readyz` as JSON.
    pub async fn readyz(&self) -> Value {
        self.open_json("/readyz").await
    }

    /// A route that needs no credentials, as JSON.
    pub async fn open_json(&self, path: &str) -> Value {
        self.http
            .get(self.url(path))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// `path` on the operations listener, as text.
    pub async fn ops_text(&self, path: &str) -> String {
        let resp = self.http.get(self.ops_url(path)).send().await.unwrap();
        resp.text().await.unwrap()
    }

    /// `path` on the operations listener, as JSON.
    pub async fn ops_json(&self, path: &str) -> Value {
        serde_json::from_str(&self.ops_text(path).await).unwrap()
    }

    /// An admin request without a body, sent.
    pub async fn admin_send(&self, method: reqwest::Method, path: &str) -> reqwest::Response {
        self.admin(method, path).send().await.unwrap()
    }

    /// `failures` bad keys from this IP lock it out: a wrong secret is then refused as
    /// locked out, while `valid_key`, whose secret verifies, still passes.
    pub async fn assert_locks_out(&self, failures: u32, valid_key: &str) {
        for _ in 0..failures {
            assert_eq!(
                self.get("dfk_0000000000000000_00", "/v1/batches")
                    .await
                    .status(),
                401
            );
        }
        let locked = self.get(&wrong_secret(valid_key), "/v1/batches").await;
        assert_eq!(
            locked.status(),
            429,
            "a locked-out IP's next guess is refused"
        );
        assert!(locked.headers().contains_key("retry-after"));
        let body: dataflow_contracts::http::ErrorBody = locked.json().await.unwrap();
        assert_eq!(body.code, "auth_locked");
        assert_eq!(
            self.get(valid_key, "/v1/batches").await.status(),
            200,
            "a secret that verifies is never locked out"
        );
    }

    /// How many `BatchCompleted` events the batch has in the outbox.
    pub async fn completions(&self, batch: &BatchId) -> usize {
        let events = self.db.batch_events(batch.as_str()).await.unwrap();
        events
            .iter()
            .filter(|e| {
                matches!(
                    e.event,
                    dataflow_contracts::events::Event::BatchCompleted(_)
                )
            })
            .count()
    }

    /// A real `dataflow worker` process on this process's config (so it can be killed
    /// outright); its output goes to `log` when given, else nowhere.
    pub fn spawn_worker_process(
        &self,
        name: &str,
        log: Option<std::fs::File>,
    ) -> std::process::Child {
        self.spawn_worker_process_with(name, log, |_| {})
    }

    /// A real `dataflow worker` process on this process's config as `tweak` adjusts it.
    pub fn spawn_worker_process_with(
        &self,
        name: &str,
        log: Option<std::fs::File>,
        tweak: impl FnOnce(&mut Config),
    ) -> std::process::Child {
        self.worker_process(name, log, tweak).spawn().unwrap()
    }

    /// The command [`TestApp::spawn_worker_process_with`] runs, for a test to adjust first.
    pub fn worker_process(
        &self,
        name: &str,
        log: Option<std::fs::File>,
        tweak: impl FnOnce(&mut Config),
    ) -> std::process::Command {
        let mut config = self.config.clone();
        tweak(&mut config);
        crate::common::process::dataflow_command(&config, "worker", name, log)
    }

    /// This process's own worker (it must run one).
    fn own_worker(&self) -> &dataflow_worker::Worker {
        let app = self.app.as_ref().expect("running");
        app.worker.as_ref().expect("a worker role")
    }

    /// The id of this process's own worker.
    pub fn worker_id(&self) -> String {
        self.own_worker().id().to_owned()
    }

    /// The counters of this process's own worker.
    pub fn worker_stats(&self) -> &dataflow_worker::WorkerStats {
        self.own_worker().stats()
    }

    /// A worker on this process's backends that the test drives itself.
    pub fn worker(&self) -> dataflow_worker::Worker {
        let backends = &self.app.as_ref().expect("running").backends;
        dataflow_worker::Worker::new(
            self.db.clone(),
            self.config.worker.clone(),
            backends.mutex.clone(),
            backends.live.clone(),
        )
    }

    pub async fn stop(mut self) {
        if let Some(app) = self.app.take() {
            app.stop().await;
        }
    }
}

/// `key` (`dfk_<id>_<secret>`) with its key id kept and its secret wrong.
pub fn wrong_secret(key: &str) -> String {
    let (id, secret) = key.rsplit_once('_').unwrap();
    format!("{id}_{}", "0".repeat(secret.len()))
}

/// Replaces a batch's stored file with `body` (a test's way to make it unreadable).
pub async fn replace_payload(db: &Db, batch: &BatchId, body: &[u8]) {
    sqlx::query("DELETE FROM payload_parts WHERE payload_id = (SELECT payload_id FROM batches WHERE id = $1)")
        .bind(batch.as_str())
        .execute(db.pool())
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO payload_parts (payload_id, seq, body) \
         SELECT payload_id, 0, $2 FROM batches WHERE id = $1",
    )
    .bind(batch.as_str())
    .bind(body)
    .execute(db.pool())
    .await
    .unwrap();
    sqlx::query("UPDATE batches SET payload_bytes = $2 WHERE id = $1")
        .bind(batch.as_str())
        .bind(body.len() as i64)
        .execute(db.pool())
        .await
        .unwrap();
}

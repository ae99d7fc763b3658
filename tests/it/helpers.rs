//! The test harness: a DataFlow process per test on a fresh database, a typed HTTP client,
//! and the switch that runs every scenario on SQLite and on PostgreSQL.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use dataflow::{App, Roles};
use dataflow_contracts::http::{BatchView, ImportView};
use dataflow_contracts::{BatchId, BatchStatus, ClientId};
use dataflow_platform::Config;
use dataflow_platform::db::Db;
use serde_json::{Value, json};
use sqlx::Connection;
use tokio::net::TcpListener;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Runs each named scenario `async fn name(backend: Backend)` once per backend.
macro_rules! backend_tests {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$name(crate::helpers::Backend::Sqlite).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                super::$name(crate::helpers::Backend::Postgres).await
            }
        }
    )*};
}
pub(crate) use backend_tests;

fn services_required() -> bool {
    std::env::var("DATAFLOW_TEST_REQUIRE_SERVICES").is_ok_and(|v| v == "1")
}

/// A database that exists for one test and is removed afterwards.
pub struct TestDb {
    pub url: String,
    dir: PathBuf,
    pg: Option<(String, String)>,
}

impl TestDb {
    /// `None` (with a message) when PostgreSQL is unreachable and not required.
    pub async fn create(backend: Backend) -> Option<TestDb> {
        let tag = ulid::Ulid::new().to_string().to_lowercase();
        let dir = std::env::temp_dir().join(format!("dataflow-test-{tag}"));
        match backend {
            Backend::Sqlite => {
                let url = format!("sqlite://{}", dir.join("ledger.db").display());
                Some(TestDb { url, dir, pg: None })
            }
            Backend::Postgres => {
                let admin = std::env::var("DATAFLOW_TEST_PG_URL")
                    .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
                let mut conn = match sqlx::PgConnection::connect(&admin).await {
                    Ok(c) => c,
                    Err(e) if !services_required() => {
                        eprintln!(
                            "SKIPPED: PostgreSQL unreachable at {admin} ({e}); set DATAFLOW_TEST_REQUIRE_SERVICES=1 to fail instead"
                        );
                        return None;
                    }
                    Err(e) => panic!("PostgreSQL is required but unreachable at {admin}: {e}"),
                };
                let name = format!("dataflow_test_{tag}");
                sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                    .execute(&mut conn)
                    .await
                    .expect("create test database");
                let base = admin
                    .rsplit_once('/')
                    .map_or(admin.as_str(), |(b, _)| b)
                    .to_owned();
                Some(TestDb {
                    url: format!("{base}/{name}"),
                    dir,
                    pg: Some((admin, name)),
                })
            }
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
        if let Some((admin, name)) = self.pg.take() {
            // Drop runs outside any runtime guarantee; use a private one on its own thread.
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .ok()?;
                rt.block_on(async {
                    let mut conn = sqlx::PgConnection::connect(&admin).await.ok()?;
                    let sql = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
                    sqlx::query(sqlx::AssertSqlSafe(sql))
                        .execute(&mut conn)
                        .await
                        .ok()
                })
            })
            .join();
        }
    }
}

/// Configuration for a test process: fast polling, small chunks, loopback.
pub fn test_config(db: &TestDb) -> Config {
    let mut c = Config {
        database_url: Some(db.url.clone()),
        data_dir: db.dir.clone(),
        ..Config::default()
    };
    c.admin_token = Some(dataflow_platform::config::Secret::new(
        "test-operator-token-0123456789",
    ));
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
            .bearer_auth("test-operator-token-0123456789")
    }

    /// A client with `policy` (a policy patch) and one API key.
    pub async fn client(&self, policy: Value) -> (ClientId, String) {
        let resp = self
            .admin(reqwest::Method::POST, "/admin/clients")
            .json(&json!({"name": "test client", "policy": policy}))
            .send()
            .await
            .unwrap();
        assert_eq!(
            resp.status(),
            201,
            "create client: {}",
            resp.text().await.unwrap()
        );
        let client: Value = resp.json().await.unwrap();
        let id: ClientId = client["id"].as_str().unwrap().parse().unwrap();
        let key = self.new_key(&id).await;
        (id, key)
    }

    pub async fn new_key(&self, client: &ClientId) -> String {
        let resp = self
            .admin(
                reqwest::Method::POST,
                &format!("/admin/clients/{client}/keys"),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 201);
        resp.json::<Value>().await.unwrap()["api_key"]
            .as_str()
            .unwrap()
            .to_owned()
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

    /// Waits (up to 20 s) until the batch reaches `status`, polling politely: a 429 from
    /// the client's own rate limit means wait and ask again.
    pub async fn wait_for(&self, key: &str, id: &BatchId, status: BatchStatus) -> BatchView {
        let deadline = Instant::now() + Duration::from_secs(20);
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
        let config_file = config.data_dir.join(format!("{name}.toml"));
        std::fs::write(&config_file, toml::to_string(&config).unwrap()).unwrap();
        let (stdout, stderr) = match log {
            Some(f) => (f.try_clone().unwrap().into(), f.into()),
            None => (std::process::Stdio::null(), std::process::Stdio::null()),
        };
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_dataflow"));
        command
            .arg("--config")
            .arg(&config_file)
            .arg("worker")
            .env("DATAFLOW_LOG", "info")
            .stdout(stdout)
            .stderr(stderr);
        command
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

/// Sends `signal` (`STOP`, `CONT`, …) to a process the test started.
pub fn signal(child: &std::process::Child, signal: &str) {
    let sent = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(sent.success(), "kill -{signal} {}", child.id());
}

/// A process the test started, killed when this is dropped, so a failing test leaves none
/// running.
pub struct Spawned(pub std::process::Child);

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The test Redis URL, or `None` (with a message) when it is unreachable and not required.
pub async fn test_redis_url() -> Option<String> {
    let url = std::env::var("DATAFLOW_TEST_REDIS_URL")
        .unwrap_or_else(|_| "redis://127.0.0.1:6379/".into());
    let reachable = async {
        let client = redis::Client::open(url.as_str()).ok()?;
        let mut conn = client.get_multiplexed_async_connection().await.ok()?;
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .ok()
    };
    match tokio::time::timeout(Duration::from_secs(2), reachable).await {
        Ok(Some(_)) => Some(url),
        _ if services_required() => panic!("Redis is required but unreachable at {url}"),
        _ => {
            eprintln!(
                "SKIPPED: Redis unreachable at {url}; set DATAFLOW_TEST_REQUIRE_SERVICES=1 to fail instead"
            );
            None
        }
    }
}

/// The test RabbitMQ URL, or `None` (with a message) when it is unreachable and not required.
pub async fn test_amqp_url() -> Option<String> {
    let url = std::env::var("DATAFLOW_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let props = lapin::ConnectionProperties::default();
    let reachable = lapin::Connection::connect(&url, props);
    match tokio::time::timeout(Duration::from_secs(3), reachable).await {
        Ok(Ok(conn)) => {
            let _ = conn.close(200, "probe".into()).await;
            Some(url)
        }
        _ if services_required() => panic!("RabbitMQ is required but unreachable at {url}"),
        _ => {
            eprintln!(
                "SKIPPED: RabbitMQ unreachable at {url}; set DATAFLOW_TEST_REQUIRE_SERVICES=1 to fail instead"
            );
            None
        }
    }
}

/// The address of the service a URL such as `redis://host:port/0` or
/// `postgres://user@host:port/db` names (`default_port` when it names none).
pub fn service_addr(url: &str, default_port: u16) -> std::net::SocketAddr {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split('/').next().unwrap();
    let host_port = authority.rsplit('@').next().unwrap();
    let host_port = if host_port.contains(':') {
        host_port.to_owned()
    } else {
        format!("{host_port}:{default_port}")
    };
    host_port.replace("localhost", "127.0.0.1").parse().unwrap()
}

/// A TCP proxy the test can cut (drop every connection, refuse new ones) and heal, or mute
/// (requests still reach the target, its replies are dropped).
pub struct Proxy {
    pub addr: std::net::SocketAddr,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    mute: std::sync::Arc<Mute>,
    conns: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(target: std::net::SocketAddr) -> Proxy {
        use std::sync::atomic::Ordering;
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let cut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mute = std::sync::Arc::new(Mute::default());
        let conns = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (cut2, mute2, conns2) = (cut.clone(), mute.clone(), conns.clone());
        let accept = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                if cut2.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let mute = mute2.clone();
                let task = tokio::spawn(async move {
                    let Ok(outbound) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    let ((client_in, client_out), (target_in, target_out)) =
                        (inbound.into_split(), outbound.into_split());
                    let requests = forward(client_in, target_out, |request| {
                        mute.see(request);
                        true
                    });
                    let replies =
                        forward(target_in, client_out, |_| !mute.on.load(Ordering::SeqCst));
                    let _ = tokio::try_join!(requests, replies);
                });
                conns2.lock().unwrap().push(task.abort_handle());
            }
        });
        Proxy {
            addr,
            cut,
            mute,
            conns,
            accept,
        }
    }

    /// Once a request containing `request` passes (it still reaches the target), the
    /// target's replies are dropped: that request and those after it run, and their
    /// clients time out (a reply lost after the request applied).
    pub fn mute_after(&self, request: &'static [u8]) {
        *self.mute.after.lock().unwrap() = Some(request);
    }

    pub fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
        for c in self.conns.lock().unwrap().drain(..) {
            c.abort();
        }
    }

    /// Accepts connections again, and passes replies on again.
    pub fn heal(&self) {
        self.cut.store(false, std::sync::atomic::Ordering::SeqCst);
        *self.mute.after.lock().unwrap() = None;
        self.mute
            .on
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Copies `from` to `to` until `from` ends, then shuts `to` down; drops each chunk that
/// `pass` refuses.
async fn forward(
    mut from: impl tokio::io::AsyncRead + Unpin,
    mut to: impl tokio::io::AsyncWrite + Unpin,
    pass: impl Fn(&[u8]) -> bool,
) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0; 64 * 1024];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return to.shutdown().await;
        }
        if pass(&buf[..n]) {
            to.write_all(&buf[..n]).await?;
        }
    }
}

/// When a [`Proxy`] drops replies.
#[derive(Default)]
struct Mute {
    /// Requests containing this switch `on`.
    after: std::sync::Mutex<Option<&'static [u8]>>,
    on: std::sync::atomic::AtomicBool,
}

impl Mute {
    fn see(&self, request: &[u8]) {
        let after = *self.after.lock().unwrap();
        if after.is_some_and(|a| request.windows(a.len()).any(|w| w == a)) {
            self.on.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}

/// `key` (`dfk_<id>_<secret>`) with its key id kept and its secret wrong.
pub fn wrong_secret(key: &str) -> String {
    let (id, secret) = key.rsplit_once('_').unwrap();
    format!("{id}_{}", "0".repeat(secret.len()))
}

/// `n` CSV rows `id,name` with ids `prefix-0..n`.
pub fn csv(prefix: &str, n: usize) -> String {
    let mut s = String::from("id,name\n");
    for i in 0..n {
        s.push_str(&format!("{prefix}-{i},name {i}\n"));
    }
    s
}

//! Configuration: built-in defaults, then an optional TOML file, then the environment,
//! merged into one struct and validated once at startup.
//!
//! Environment names: `DATABASE_URL` for the ledger, `REDIS_URL`, `AMQP_URL`, `SMTP_URL`, and `DATAFLOW_<KEY>` or
//! `DATAFLOW_<SECTION>__<KEY>` for everything else (`DATAFLOW_WORKER__CONCURRENCY=8`).
//! Values are read as TOML scalars (`8`, `true`) and otherwise as strings. Unknown keys are
//! errors, so a misspelt variable does not silently fall back to a default.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Environment variables with the `DATAFLOW_` prefix that are not configuration keys.
/// (`DATAFLOW_API_KEY` and `DATAFLOW_API_URL` belong to `dataflow import`, a producer.)
const NON_CONFIG_ENV: &[&str] = &[
    "DATAFLOW_CONFIG",
    "DATAFLOW_LOG",
    "DATAFLOW_TEST_",
    "DATAFLOW_API_KEY",
    "DATAFLOW_API_URL",
];

/// The service URLs' conventional variables, read as configuration without the prefix.
const URL_ENV: &[&str] = &["DATABASE_URL", "REDIS_URL", "AMQP_URL", "SMTP_URL"];

/// Whether a `dataflow` process reads the environment variable `name`: its configuration,
/// its log filter or its config file's path. A harness that starts `dataflow` on settings
/// of its own removes these from what the child inherits.
pub fn read_by_dataflow(name: &str) -> bool {
    URL_ENV.contains(&name) || name.starts_with("DATAFLOW_")
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `sqlite://path` or `postgres://…`. Default: `sqlite://<data_dir>/dataflow.db`.
    pub database_url: Option<String>,
    /// Where the embedded database, the generated operator token and server secret live.
    pub data_dir: PathBuf,
    /// Address the HTTP API binds.
    pub listen: SocketAddr,
    /// Where a process answers `/healthz`, `/readyz` and `/metrics` for operators, apart
    /// from the public API: Prometheus scrapes here (`/metrics` names every tenant and is
    /// not on the public listener unless `api.metrics_token` is set). Unset: nowhere.
    pub ops_listen: Option<SocketAddr>,
    /// Bearer token for `/admin`. Generated into the data folder when unset.
    pub admin_token: Option<Secret>,
    /// Key for the HMAC that stores API key secrets. Generated into the data folder when unset.
    pub secret: Option<Secret>,
    /// SQLite: nothing is answered (a `202`, an operator's change) or published before the
    /// writes it acknowledges are on disk; writers that meet share one sync. `false` trades
    /// that away: a power cut or host crash may lose the last ~10 ms of answered writes.
    /// (PostgreSQL's commits are durable either way.)
    pub sqlite_durable_commits: bool,
    /// Apply the ledger's migrations when a process starts (and before an operator
    /// command). On by default, for the embedded single process. A fleet turns it off and
    /// runs `dataflow migrate` once per upgrade: processes then never race to migrate, and
    /// one whose version does not match the ledger's schema refuses to start and says so.
    pub auto_migrate: bool,
    /// Connections in the SQL pool. On PostgreSQL a process opens up to half as many again
    /// (at least one) for bookkeeping writes, which commit without waiting for the disk.
    pub db_max_connections: u32,
    /// SQLite: the page cache, in MiB, that a process's connections share evenly (at least
    /// 1 MiB each); with the pool's size, it sets most of an embedded process's memory.
    pub sqlite_cache_mib: u32,
    /// `redis://` or `rediss://` (TLS), password in the URL. Unset (and no cluster):
    /// embedded fallbacks.
    pub redis_url: Option<Secret>,
    /// Seed nodes of a Redis Cluster, in place of `redis_url` (any one answering is enough;
    /// the rest of the cluster is learnt from it).
    pub redis_cluster_urls: Vec<Secret>,
    /// Every Redis key DataFlow writes starts with `<redis_prefix>:`.
    pub redis_prefix: String,
    /// PEM file of a private CA to trust for `rediss://` (default: the public web roots).
    pub redis_ca_file: Option<PathBuf>,
    /// A separate Redis for the key/client cache and its invalidations, which may evict
    /// (`allkeys-lru`); unset: the cache lives on `redis_url` or the cluster.
    pub redis_cache_url: Option<Secret>,
    /// The Redis servers the batch mutex locks on (Redlock: a lock needs N/2+1 of them);
    /// independent servers, not replicas nor a cluster. Empty: `redis_url` alone; on a
    /// cluster, the SQL lease alone.
    pub redlock_urls: Vec<Secret>,
    /// `amqp://` or `amqps://` (TLS) RabbitMQ URL with credentials and vhost; for a
    /// RabbitMQ cluster, one URL per node separated by commas, tried in turn (a comma inside
    /// a password is written `%2C`). Unset: events stay in process and workers find batches
    /// by SQL polling.
    pub amqp_url: Option<Secret>,
    pub amqp: AmqpConfig,
    pub api: ApiConfig,
    pub worker: WorkerConfig,
    pub outbox: OutboxConfig,
    pub jobs: JobsConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            database_url: None,
            data_dir: PathBuf::from("data"),
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            ops_listen: None,
            admin_token: None,
            secret: None,
            db_max_connections: 10,
            sqlite_cache_mib: crate::ledger::DEFAULT_SQLITE_CACHE_MIB,
            sqlite_durable_commits: true,
            auto_migrate: true,
            redis_url: None,
            redis_cluster_urls: Vec::new(),
            redis_prefix: "dataflow".to_owned(),
            redis_ca_file: None,
            redis_cache_url: None,
            redlock_urls: Vec::new(),
            amqp_url: None,
            amqp: AmqpConfig::default(),
            api: ApiConfig::default(),
            worker: WorkerConfig::default(),
            outbox: OutboxConfig::default(),
            jobs: JobsConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// Hard cap on any request body; a client's policy can only lower it.
    pub max_body_bytes: u64,
    /// Longest accepted value of one field.
    pub max_field_bytes: usize,
    /// A compressed body (gzip, zstd) may grow by at most this factor when decompressed;
    /// past it the request is a decompression bomb and is refused (413).
    pub max_compression_ratio: u64,
    /// How long a resumable upload may rest between two parts before it expires.
    pub upload_ttl_secs: u64,
    /// Longest accepted `Idempotency-Key`.
    pub max_idempotency_key_len: usize,
    /// How long a finished idempotent response is replayed.
    pub idempotency_ttl_secs: u64,
    /// Whole-request deadline. An unfinished request holds its `Idempotency-Key` until then.
    pub request_timeout_secs: u64,
    /// A request body that sends nothing for this long is answered 408 (an upload that
    /// keeps sending is never cut by it; `request_timeout_secs` bounds the whole).
    pub body_idle_timeout_secs: u64,
    /// Serves `/metrics` on the public listener too, to requests bearing this token (for
    /// setups that cannot reach `ops_listen`). Unset: not served there.
    pub metrics_token: Option<Secret>,
    /// Connections a listener serves at once; past it, new ones wait to be accepted, so a
    /// client holding many slow connections cannot exhaust the process.
    pub max_connections: usize,
    /// Imports one client may have in flight on this process at once; another waits for
    /// one of them to end (up to a second, then `429`).
    pub max_concurrent_imports_per_client: usize,
    /// Use the right-most `X-Forwarded-For` address (the one the proxy appended) as the
    /// client IP; only behind exactly one trusted proxy.
    pub trust_forwarded_for: bool,
    /// Failed authentications per IP, and per key id tried from one IP, within
    /// `auth_window_secs` before lock-out (a secret that verifies is never locked out).
    pub auth_max_failures: u32,
    pub auth_window_secs: u64,
    pub auth_lockout_secs: u64,
    /// Per-IP limit on requests that carry no valid key.
    pub anonymous_rate_per_minute: u32,
    pub anonymous_rate_burst: u32,
    /// How long a key or client lookup is cached, with ±10 % jitter (in Redis when it is
    /// configured, else in process).
    pub cache_ttl_ms: u64,
    /// With Redis: how long each process keeps its own copy; the bound on staleness when
    /// invalidation messages are lost.
    pub cache_l1_ttl_ms: u64,
    /// How long "no such key" is cached.
    pub cache_negative_ttl_ms: u64,
    /// The operator dashboard at `/ui`.
    pub ui: UiConfig,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: 64 * 1024 * 1024,
            max_field_bytes: 64 * 1024,
            max_compression_ratio: 200,
            upload_ttl_secs: 24 * 3600,
            max_idempotency_key_len: 255,
            idempotency_ttl_secs: 24 * 3600,
            request_timeout_secs: 120,
            body_idle_timeout_secs: 15,
            max_connections: 1024,
            metrics_token: None,
            max_concurrent_imports_per_client: 32,
            trust_forwarded_for: false,
            auth_max_failures: 10,
            auth_window_secs: 300,
            auth_lockout_secs: 300,
            anonymous_rate_per_minute: 120,
            anonymous_rate_burst: 30,
            cache_ttl_ms: 30_000,
            cache_l1_ttl_ms: 5_000,
            cache_negative_ttl_ms: 2_000,
            ui: UiConfig::default(),
        }
    }
}

/// The operator dashboard (`[api.ui]`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UiConfig {
    /// A dashboard session ends after this long without a request (each request renews it).
    pub session_ttl_secs: u64,
    /// Mark the session cookie `Secure` (browsers then send it over HTTPS only): set it
    /// whenever the dashboard is reached through TLS, directly or behind a proxy.
    pub cookie_secure: bool,
    /// The origin browsers reach the dashboard at (`https://ops.example.com`), which a
    /// form's `Origin` header must match. Unset: it must match the request's `Host`.
    pub origin: Option<String>,
    /// Live updates one process buffers for its SSE clients; a client further behind is
    /// told to resync (reload) instead of being buffered for.
    pub sse_buffer: usize,
    /// Seconds between SSE heartbeat comments (they keep proxies from closing idle streams).
    pub sse_heartbeat_secs: u64,
}

impl Default for UiConfig {
    fn default() -> Self {
        Self {
            session_ttl_secs: 1_800,
            cookie_secure: false,
            origin: None,
            sse_buffer: 256,
            sse_heartbeat_secs: 15,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    /// Batches processed at once by one worker process. A batch holds its slot from the
    /// claim to its outcome, mostly waiting on the ledger, and its payload and prepared
    /// records stay in memory meanwhile.
    pub concurrency: usize,
    /// Of a worker's slots, how many are kept for clients with nothing in progress
    /// anywhere in the fleet: the last free ones, which a client already being served may
    /// not take. A client that arrives while another's backlog fills the fleet then starts
    /// at once instead of waiting for one of that backlog's batches to end. At most
    /// `concurrency - 1` of them are kept; 0 turns it off.
    pub reserved_slots: usize,
    /// Records per committed chunk (and per checkpoint).
    pub chunk_size: usize,
    /// Records one worker process holds in memory at once across all its batches, read,
    /// prepared or being committed: a chunk waits for room before it is read, so memory
    /// stays bounded whatever the size and number of files (a chunk larger than this takes
    /// all of it). Each batch overlaps reading one chunk with committing the one before
    /// when the budget has room for both. The reserved slots keep a chunk's room each (or
    /// their share, `reserved_slots / concurrency`, when that is more), so a newcomer's
    /// chunk does not wait for the room a busy client's batches fill.
    pub records_in_memory: usize,
    /// Small batches one slot may take in one claim and complete in one commit (a bundle),
    /// as long as their records together fit in one chunk; 1 takes batches one at a time.
    /// Many small imports then cost the ledger a claim and a commit per bundle, not per
    /// batch.
    pub bundle_batches: u32,
    /// Lease length; every chunk renews it.
    pub lease_secs: u64,
    /// SQL polling interval when no wake-up arrives (with a broker: while it is
    /// unreachable; `amqp.safety_sweep_ms` while it is healthy).
    pub poll_interval_ms: u64,
    /// Attempts before a batch is `dead`.
    pub max_attempts: u32,
    /// Takeovers (another worker taking the batch because its holder's lease lapsed)
    /// before a batch is `dead`: a batch that kills or stalls every worker that takes it
    /// still ends. Takeovers spend no attempt.
    pub max_takeovers: u32,
    /// Retry backoff: base × 2^(attempt-1), capped.
    pub retry_base_ms: u64,
    pub retry_max_ms: u64,
    /// On shutdown, in-flight batches get this long to finish before they are released.
    pub shutdown_grace_secs: u64,
    /// The fleet leader's lease (renewed at a third of it): the singleton duties (job
    /// sweeper with its reaper and pruning, daily summaries) move to another worker this
    /// long after their leader died.
    pub leader_lease_ms: u64,
    /// When the leader writes the daily per-client summaries of the days that ended (cron
    /// with seconds, UTC: `sec min hour day month weekday`); empty: never.
    pub summary_schedule: String,
}

impl WorkerConfig {
    /// The slots kept for clients with nothing in progress: never all of them.
    pub fn reserved_slots(&self) -> usize {
        self.reserved_slots.min(self.concurrency.saturating_sub(1))
    }

    /// The records kept for the batches of the reserved slots, out of `records_in_memory`:
    /// their share of it, as they are of the slots, and at least a chunk each, so that a
    /// reserved batch's chunk never holds more than its room; always leaving a chunk's room
    /// to the open slots.
    pub fn reserved_records(&self) -> usize {
        let share =
            self.records_in_memory.saturating_mul(self.reserved_slots()) / self.concurrency.max(1);
        let chunks = self.reserved_slots().saturating_mul(self.chunk_size);
        share
            .max(chunks)
            .min(self.records_in_memory.saturating_sub(self.chunk_size))
    }

    /// The summary schedule, or `None` when summaries are off.
    pub fn summary_schedule(&self) -> Result<Option<cron::Schedule>> {
        if self.summary_schedule.trim().is_empty() {
            return Ok(None);
        }
        self.summary_schedule
            .parse()
            .map(Some)
            .map_err(|e| Error::Config(format!("worker.summary_schedule: {e}")))
    }
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            // Fewer slots leave `batch.ready` deliveries queued for one at a steady load, which
            // shows in the commit → start tail (docs/performance.md, "Why the code is as it is").
            concurrency: 8,
            reserved_slots: 1,
            chunk_size: 5_000,
            records_in_memory: 20_000,
            bundle_batches: 64,
            lease_secs: 30,
            poll_interval_ms: 1_000,
            max_attempts: 5,
            max_takeovers: 8,
            retry_base_ms: 1_000,
            retry_max_ms: 300_000,
            shutdown_grace_secs: 10,
            leader_lease_ms: 10_000,
            summary_schedule: "0 0 1 * * *".into(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutboxConfig {
    /// Safety-net polling interval; commits wake the relay directly.
    pub poll_interval_ms: u64,
    /// Published rows are deleted after this long.
    pub retention_secs: u64,
    /// Rows per relay round.
    pub batch_size: u32,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        Self {
            poll_interval_ms: 1_000,
            retention_secs: 7 * 24 * 3600,
            batch_size: 500,
        }
    }
}

/// The RabbitMQ tier (used only with `amqp_url`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AmqpConfig {
    /// Put before every exchange and queue name (isolates tests and deployments on one vhost).
    pub prefix: String,
    /// Durable topic exchange the outbox relay publishes to (routing keys `batch.<state>`).
    pub exchange: String,
    /// Quorum queue of `batch.ready` that workers consume.
    pub ready_queue: String,
    /// Where rejected and over-delivered `batch.ready` messages go, and the queue behind it.
    pub dead_letter_exchange: String,
    pub dead_letter_queue: String,
    /// Deliveries of one message before the broker dead-letters it (`x-delivery-limit`).
    pub delivery_limit: u32,
    /// Unacknowledged deliveries per consumer; never more than `worker.concurrency`.
    pub prefetch: u16,
    /// Publishes awaiting their confirm at once (pipelined publisher confirms).
    pub confirm_window: usize,
    /// A publish not confirmed within this long is treated as failed and retried.
    pub confirm_timeout_ms: u64,
    /// Reconnect backoff: doubles from min to max while the broker is unreachable.
    pub reconnect_min_ms: u64,
    pub reconnect_max_ms: u64,
    /// SQL polling interval while the broker is healthy (a safety sweep for lost messages,
    /// retries and expired leases); `worker.poll_interval_ms` applies while it is not.
    pub safety_sweep_ms: u64,
    /// One relay publishes at a time (per-batch order); its lease lasts this long (at
    /// least twice `confirm_timeout_ms`) and another process's relay takes over when it
    /// lapses.
    pub relay_lease_ms: u64,
}

impl Default for AmqpConfig {
    fn default() -> Self {
        Self {
            prefix: String::new(),
            exchange: "dataflow.events".to_owned(),
            ready_queue: "dataflow.batch-ready".to_owned(),
            dead_letter_exchange: "dataflow.dead-letter".to_owned(),
            dead_letter_queue: "dataflow.dead-letter".to_owned(),
            delivery_limit: 5,
            prefetch: 64,
            confirm_window: 1_000,
            confirm_timeout_ms: 5_000,
            reconnect_min_ms: 100,
            reconnect_max_ms: 5_000,
            safety_sweep_ms: 30_000,
            relay_lease_ms: 10_000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JobsConfig {
    /// Jobs (emails, reports, webhooks) run at once per kind by one worker process.
    pub concurrency: usize,
    /// Attempts before a job is dead-lettered.
    pub max_attempts: u32,
    /// Retry backoff: base × 2^(attempt-1), capped, with jitter down to half of it.
    pub retry_base_ms: u64,
    pub retry_max_ms: u64,
    /// One attempt is abandoned (and counted as failed) after this long.
    pub timeout_secs: u64,
    /// Safety-net polling of the SQL intents; commits in this process wake the relay directly.
    pub poll_interval_ms: u64,
    /// With Redis: which queue carries the jobs. `lists` is DataFlow's own; `apalis-redis`
    /// is apalis-redis 1.0 storage, for tools of the apalis ecosystem (see docs/architecture.md).
    pub redis_queue: RedisQueue,
    /// With Redis: most jobs of one kind held in Redis at once; the rest wait in SQL.
    pub redis_working_set: usize,
    /// With Redis: a worker that has not beaten its heart for this long is dead and its
    /// jobs go back to the queue.
    pub dead_worker_ms: u64,
    /// With Redis: a job handed to Redis and not finished after this long is checked for in
    /// Redis and handed over again if Redis lost it.
    pub requeue_after_secs: u64,
    /// Finished jobs are deleted this long after they were done; dead jobs stay until an
    /// operator retries them.
    pub retention_secs: u64,
    /// `smtp://user:pass@host:587?tls=required` or `smtps://…`. Unset: messages are written
    /// as `.eml` files into `<data_dir>/mail`.
    pub smtp_url: Option<Secret>,
    /// The sender of notification mail.
    pub mail_from: String,
    /// Deliver webhooks to loopback, private and link-local addresses (for local testing).
    pub webhook_allow_private: bool,
    /// Deadline of one webhook request.
    pub webhook_timeout_ms: u64,
    /// Webhook deliveries at once to one target host, per worker process: a slow or
    /// failing receiver holds at most this many webhook slots. A delivery over it is
    /// deferred (back to the queue shortly, its attempt not counted), not failed.
    pub webhook_max_per_host: usize,
    /// Webhook deliveries at once for one client, per worker process (deferred the same
    /// way): one client's receivers hold at most this many webhook slots.
    pub webhook_max_per_client: usize,
}

impl Default for JobsConfig {
    fn default() -> Self {
        Self {
            concurrency: 50,
            max_attempts: 8,
            retry_base_ms: 2_000,
            retry_max_ms: 3_600_000,
            timeout_secs: 60,
            poll_interval_ms: 500,
            redis_queue: RedisQueue::Lists,
            redis_working_set: 10_000,
            dead_worker_ms: 10_000,
            requeue_after_secs: 300,
            retention_secs: 7 * 24 * 3600,
            smtp_url: None,
            mail_from: "DataFlow <dataflow@localhost>".to_owned(),
            webhook_allow_private: false,
            webhook_timeout_ms: 10_000,
            webhook_max_per_host: 10,
            webhook_max_per_client: 20,
        }
    }
}

/// The state Redis: one server (`redis_url`) or a cluster (`redis_cluster_urls`).
#[derive(Debug, Clone, Copy)]
pub enum RedisTarget<'a> {
    Server(&'a Secret),
    Cluster(&'a [Secret]),
}

/// The Redis job queue implementation (`jobs.redis_queue`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RedisQueue {
    Lists,
    ApalisRedis,
}

impl std::str::FromStr for RedisQueue {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "lists" => Ok(Self::Lists),
            "apalis-redis" => Ok(Self::ApalisRedis),
            other => Err(format!(
                "unknown job queue {other:?}: lists or apalis-redis"
            )),
        }
    }
}

/// apalis-redis 1.0.0 promotes every due task in one Lua `unpack`, which fails above about
/// 8,000: its working set must stay below that.
pub const APALIS_REDIS_MAX_WORKING_SET: usize = 5_000;

/// A string that never appears in logs or `Debug` output.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(****)")
    }
}

impl Config {
    /// Defaults, then `file` (or `./dataflow.toml` when it exists), then the process environment.
    pub fn load(file: Option<&Path>) -> Result<Config> {
        let default_file = Path::new("dataflow.toml");
        let file = file.or_else(|| default_file.exists().then_some(default_file));
        let file_text = match file {
            Some(path) => Some(std::fs::read_to_string(path).map_err(|e| {
                Error::Config(format!("cannot read config file {}: {e}", path.display()))
            })?),
            None => None,
        };
        Self::from_sources(file_text.as_deref(), std::env::vars())
    }

    /// The merge itself, separated from the process environment so tests can drive it.
    pub fn from_sources(
        file_text: Option<&str>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config> {
        let mut merged = toml::Value::try_from(Config::default())
            .map_err(|e| Error::Config(format!("defaults: {e}")))?;
        if let Some(text) = file_text {
            let file: toml::Value = text
                .parse()
                .map_err(|e| Error::Config(format!("config file: {e}")))?;
            merge(&mut merged, file);
        }
        for (name, raw) in env {
            let path: Vec<String> = if name == "DATABASE_URL" {
                vec!["database_url".into()]
            } else if name == "REDIS_URL" {
                vec!["redis_url".into()]
            } else if name == "AMQP_URL" {
                vec!["amqp_url".into()]
            } else if name == "SMTP_URL" {
                vec!["jobs".into(), "smtp_url".into()]
            } else if let Some(rest) = name.strip_prefix("DATAFLOW_") {
                if NON_CONFIG_ENV.iter().any(|p| name.starts_with(p)) {
                    continue;
                }
                rest.to_ascii_lowercase()
                    .split("__")
                    .map(str::to_owned)
                    .collect()
            } else {
                continue;
            };
            set_path(&mut merged, &path, scalar(&raw));
        }
        let config: Config = merged
            .try_into()
            .map_err(|e: toml::de::Error| Error::Config(e.message().to_owned()))?;
        config.validate()?;
        Ok(config)
    }

    /// Where the state Redis is, if anywhere.
    pub fn redis(&self) -> Option<RedisTarget<'_>> {
        match &self.redis_url {
            Some(url) => Some(RedisTarget::Server(url)),
            None if !self.redis_cluster_urls.is_empty() => {
                Some(RedisTarget::Cluster(&self.redis_cluster_urls))
            }
            None => None,
        }
    }

    /// The RabbitMQ nodes `amqp_url` lists, in the order they are tried; empty when unset.
    pub fn amqp_nodes(&self) -> Vec<Secret> {
        self.amqp_url.as_ref().map_or_else(Vec::new, |urls| {
            urls.expose()
                .split(',')
                .map(str::trim)
                .filter(|u| !u.is_empty())
                .map(Secret::new)
                .collect()
        })
    }

    /// Rules that serde's types cannot express.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(Error::Config(m.to_owned()));
        let url = self.database_url();
        if !(url.starts_with("sqlite:")
            || url.starts_with("postgres:")
            || url.starts_with("postgresql:"))
        {
            return bad("database_url must start with sqlite:, postgres: or postgresql:");
        }
        if self.db_max_connections == 0 {
            return bad("db_max_connections must be at least 1");
        }
        if self.sqlite_cache_mib == 0 {
            return bad("sqlite_cache_mib must be at least 1");
        }
        if self.worker.concurrency == 0 || self.worker.chunk_size == 0 {
            return bad("worker.concurrency and worker.chunk_size must be at least 1");
        }
        if self.worker.records_in_memory == 0 {
            return bad("worker.records_in_memory must be at least 1");
        }
        if self.worker.bundle_batches == 0 {
            return bad("worker.bundle_batches must be at least 1");
        }
        if self.worker.chunk_size > 100_000 {
            return bad("worker.chunk_size must be at most 100000");
        }
        if self.worker.lease_secs < 2 {
            return bad("worker.lease_secs must be at least 2");
        }
        if self.worker.max_attempts == 0 {
            return bad("worker.max_attempts must be at least 1");
        }
        // Also the claim loop's shortest sleep: zero would spin it on a batch that is due
        // but held by another worker's mutex.
        if self.worker.poll_interval_ms == 0 {
            return bad("worker.poll_interval_ms must be at least 1");
        }
        if self.worker.leader_lease_ms < 300 {
            return bad("worker.leader_lease_ms must be at least 300");
        }
        self.worker.summary_schedule()?;
        if self.api.body_idle_timeout_secs == 0 || self.api.max_connections == 0 {
            return bad("api.body_idle_timeout_secs and api.max_connections must be at least 1");
        }
        if self.api.max_body_bytes == 0 || self.api.max_field_bytes == 0 {
            return bad("api.max_body_bytes and api.max_field_bytes must be at least 1");
        }
        if self.api.max_compression_ratio == 0 || self.api.upload_ttl_secs == 0 {
            return bad("api.max_compression_ratio and api.upload_ttl_secs must be at least 1");
        }
        if self.api.upload_ttl_secs > i64::MAX as u64 / 4000 {
            return bad("api.upload_ttl_secs is too large");
        }
        if self.api.auth_max_failures == 0 {
            return bad("api.auth_max_failures must be at least 1");
        }
        if self.api.anonymous_rate_per_minute == 0 || self.api.anonymous_rate_burst == 0 {
            return bad(
                "api.anonymous_rate_per_minute and api.anonymous_rate_burst must be at least 1",
            );
        }
        if self.api.max_concurrent_imports_per_client == 0 {
            return bad("api.max_concurrent_imports_per_client must be at least 1");
        }
        let ui = &self.api.ui;
        if ui.session_ttl_secs < 60 {
            return bad("api.ui.session_ttl_secs must be at least 60");
        }
        if ui.sse_buffer < 16 || ui.sse_heartbeat_secs == 0 {
            return bad(
                "api.ui.sse_buffer must be at least 16 and api.ui.sse_heartbeat_secs at least 1",
            );
        }
        if let Some(origin) = &ui.origin
            && !valid_origin(origin)
        {
            return bad(
                "api.ui.origin must be scheme and host only, such as \"https://ops.example.com\"",
            );
        }
        let jobs = &self.jobs;
        if jobs.concurrency == 0 || jobs.max_attempts == 0 || jobs.redis_working_set == 0 {
            return bad(
                "jobs.concurrency, jobs.max_attempts and jobs.redis_working_set must be at least 1",
            );
        }
        if jobs.redis_queue == RedisQueue::ApalisRedis
            && jobs.redis_working_set > APALIS_REDIS_MAX_WORKING_SET
        {
            return bad(&format!(
                "jobs.redis_working_set must be at most {APALIS_REDIS_MAX_WORKING_SET} with \
                 jobs.redis_queue = \"apalis-redis\" (apalis-redis 1.0 fails above ~8,000 due tasks)"
            ));
        }
        if jobs.timeout_secs == 0 || jobs.webhook_timeout_ms == 0 {
            return bad("jobs.timeout_secs and jobs.webhook_timeout_ms must be at least 1");
        }
        if jobs.webhook_max_per_host == 0 || jobs.webhook_max_per_client == 0 {
            return bad(
                "jobs.webhook_max_per_host and jobs.webhook_max_per_client must be at least 1",
            );
        }
        if jobs.dead_worker_ms < 2_000 {
            return bad("jobs.dead_worker_ms must be at least 2000 (heartbeats are 1 s apart)");
        }
        if jobs.requeue_after_secs <= jobs.timeout_secs {
            return bad("jobs.requeue_after_secs must be longer than jobs.timeout_secs");
        }
        if let Some(url) = &jobs.smtp_url
            && !(url.expose().starts_with("smtp://") || url.expose().starts_with("smtps://"))
        {
            return bad("jobs.smtp_url must start with smtp:// or smtps://");
        }
        if jobs.mail_from.parse::<lettre::message::Mailbox>().is_err() {
            return bad("jobs.mail_from must be a mailbox such as \"DataFlow <ops@example.com>\"");
        }
        let redis_urls = self.redis_url.iter().map(|u| ("redis_url", u));
        let cluster_urls = self
            .redis_cluster_urls
            .iter()
            .map(|u| ("redis_cluster_urls", u));
        let cache_urls = self.redis_cache_url.iter().map(|u| ("redis_cache_url", u));
        let lock_urls = self.redlock_urls.iter().map(|u| ("redlock_urls", u));
        for (name, url) in redis_urls
            .chain(cluster_urls)
            .chain(cache_urls)
            .chain(lock_urls)
        {
            let url = url.expose();
            if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                return bad(&format!("{name} must start with redis:// or rediss://"));
            }
        }
        if self.redis_url.is_some() && !self.redis_cluster_urls.is_empty() {
            return bad(
                "set redis_url (one Redis) or redis_cluster_urls (a Redis Cluster), not both",
            );
        }
        if self.redis().is_none()
            && (self.redis_cache_url.is_some() || !self.redlock_urls.is_empty())
        {
            return bad("redis_cache_url and redlock_urls need redis_url or redis_cluster_urls");
        }
        // apalis-redis 1.0's scripts build key names inside Lua (a task's metadata key from
        // its id), which a cluster cannot route.
        if matches!(self.redis(), Some(RedisTarget::Cluster(_)))
            && jobs.redis_queue == RedisQueue::ApalisRedis
        {
            return bad(
                "jobs.redis_queue = \"apalis-redis\" cannot run on a Redis Cluster (apalis-redis \
                 1.0 builds key names inside its Lua scripts); use \"lists\", the default",
            );
        }
        let nodes = self.amqp_nodes();
        if self.amqp_url.is_some() && nodes.is_empty() {
            return bad("amqp_url is set but lists no node: give amqp://… or leave it unset");
        }
        if nodes
            .iter()
            .any(|u| !(u.expose().starts_with("amqp://") || u.expose().starts_with("amqps://")))
        {
            return bad(
                "amqp_url must start with amqp:// or amqps:// (each node's URL, when it lists \
                 several separated by commas)",
            );
        }
        if self.outbox.batch_size == 0 || self.outbox.poll_interval_ms == 0 {
            return bad("outbox.batch_size and outbox.poll_interval_ms must be at least 1");
        }
        let amqp = &self.amqp;
        if amqp.delivery_limit == 0 || amqp.prefetch == 0 || amqp.confirm_window == 0 {
            return bad(
                "amqp.delivery_limit, amqp.prefetch and amqp.confirm_window must be at least 1",
            );
        }
        if amqp.reconnect_min_ms == 0 || amqp.reconnect_max_ms < amqp.reconnect_min_ms {
            return bad(
                "amqp.reconnect_min_ms must be at least 1 and at most amqp.reconnect_max_ms",
            );
        }
        if amqp.confirm_timeout_ms == 0 || amqp.relay_lease_ms <= amqp.confirm_timeout_ms {
            return bad(
                "amqp.relay_lease_ms must be longer than amqp.confirm_timeout_ms (at least 1)",
            );
        }
        if amqp.safety_sweep_ms == 0 {
            return bad("amqp.safety_sweep_ms must be at least 1");
        }
        // Braces would make the prefix a hash tag, and every key one cluster slot.
        if self.redis_prefix.is_empty()
            || self
                .redis_prefix
                .contains(|c: char| c.is_whitespace() || c == '{' || c == '}')
        {
            return bad("redis_prefix must be non-empty without spaces or braces");
        }
        for (name, s) in [("admin_token", &self.admin_token), ("secret", &self.secret)] {
            if let Some(s) = s
                && s.expose().len() < 16
            {
                return Err(Error::Config(format!(
                    "{name} must be at least 16 characters"
                )));
            }
        }
        Ok(())
    }

    pub fn database_url(&self) -> String {
        self.database_url
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}", self.data_dir.join("dataflow.db").display()))
    }
}

/// `http(s)://host[:port]`, nothing after it: the form browsers put in `Origin`.
fn valid_origin(origin: &str) -> bool {
    let rest = origin
        .strip_prefix("https://")
        .or_else(|| origin.strip_prefix("http://"));
    rest.is_some_and(|host| {
        !host.is_empty()
            && !host.contains(['/', '?', '#', '@'])
            && !host.contains(char::is_whitespace)
    })
}

fn merge(base: &mut toml::Value, over: toml::Value) {
    match (base, over) {
        (toml::Value::Table(b), toml::Value::Table(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(existing) => merge(existing, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (slot, v) => *slot = v,
    }
}

fn set_path(root: &mut toml::Value, path: &[String], value: toml::Value) {
    let mut cur = root;
    for (i, key) in path.iter().enumerate() {
        let toml::Value::Table(t) = cur else { return };
        if i + 1 == path.len() {
            t.insert(key.clone(), value);
            return;
        }
        cur = t
            .entry(key.clone())
            .or_insert_with(|| toml::Value::Table(Default::default()));
    }
}

/// `8` → integer, `true` → bool, `[…]` → array; anything else is the raw string.
fn scalar(raw: &str) -> toml::Value {
    format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .filter(|v| !v.is_table())
        .unwrap_or_else(|| toml::Value::String(raw.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_are_embedded_sqlite_on_loopback() {
        let c = Config::from_sources(None, env(&[])).unwrap();
        assert_eq!(c.database_url(), "sqlite://data/dataflow.db");
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
    }

    #[test]
    fn the_reserved_slots_keep_a_chunks_room_each_or_their_share() {
        let mut w = Config::from_sources(None, env(&[])).unwrap().worker;
        assert_eq!((w.concurrency, w.reserved_slots()), (8, 1));
        // The default: one chunk, more than the reserve's eighth of the budget.
        assert_eq!((w.records_in_memory, w.chunk_size), (20_000, 5_000));
        assert_eq!(w.reserved_records(), 5_000);
        // Their share, when it is more than a chunk each.
        w.records_in_memory = 80_000;
        assert_eq!(w.reserved_records(), 10_000);
        // The open slots keep a chunk's room, however many slots are reserved.
        (w.records_in_memory, w.reserved_slots) = (12_000, 4);
        assert_eq!(w.reserved_records(), 7_000);
        w.reserved_slots = 0;
        assert_eq!(w.reserved_records(), 0);
        // Never all of the slots, so never all of the room.
        (w.concurrency, w.reserved_slots) = (1, 1);
        assert_eq!(w.reserved_records(), 0);
    }

    #[test]
    fn env_overrides_file_overrides_defaults() {
        let file = "listen = \"0.0.0.0:9000\"\n[worker]\nconcurrency = 2\nchunk_size = 10\n";
        let c = Config::from_sources(
            Some(file),
            env(&[
                ("DATAFLOW_WORKER__CONCURRENCY", "7"),
                ("DATABASE_URL", "postgres://x@localhost/db"),
                ("DATAFLOW_TEST_REQUIRE_SERVICES", "1"),
                ("HOME", "/root"),
            ]),
        )
        .unwrap();
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.worker.concurrency, 7);
        assert_eq!(c.worker.chunk_size, 10);
        assert_eq!(c.database_url(), "postgres://x@localhost/db");
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors() {
        assert!(Config::from_sources(None, env(&[("DATAFLOW_WORKER__CONCURENCY", "2")])).is_err());
        assert!(Config::from_sources(Some("nope = 1"), env(&[])).is_err());
        let e = Config::from_sources(None, env(&[("DATAFLOW_WORKER__CONCURRENCY", "0")]));
        assert!(e.unwrap_err().to_string().contains("concurrency"));
        assert!(Config::from_sources(None, env(&[("DATABASE_URL", "mysql://x")])).is_err());
    }

    #[test]
    fn example_config_matches_the_defaults() {
        let text = include_str!("../../dataflow.example.toml");
        let from_file = Config::from_sources(Some(text), env(&[])).unwrap();
        let defaults = Config::default();
        assert_eq!(
            toml::Value::try_from(from_file).unwrap(),
            toml::Value::try_from(defaults).unwrap(),
            "dataflow.example.toml documents the defaults; keep them in step"
        );
    }

    #[test]
    fn amqp_url_from_env_and_checked() {
        let c =
            Config::from_sources(None, env(&[("AMQP_URL", "amqps://u:p@mq:5671/%2f")])).unwrap();
        assert_eq!(c.amqp_url.unwrap().expose(), "amqps://u:p@mq:5671/%2f");
        assert!(Config::from_sources(None, env(&[("AMQP_URL", "http://mq")])).is_err());
        assert!(Config::from_sources(None, env(&[("AMQP_URL", " , ")])).is_err());
        let short_lease = env(&[("DATAFLOW_AMQP__RELAY_LEASE_MS", "10")]);
        assert!(Config::from_sources(None, short_lease).is_err());
        let no_poll = env(&[("DATAFLOW_WORKER__POLL_INTERVAL_MS", "0")]);
        assert!(Config::from_sources(None, no_poll).is_err());
        // A relay reading pages of no rows would never see the outbox drained.
        let e = Config::from_sources(None, env(&[("DATAFLOW_OUTBOX__BATCH_SIZE", "0")]));
        assert!(e.unwrap_err().to_string().contains("outbox.batch_size"));
    }

    #[test]
    fn amqp_url_lists_the_nodes_of_a_cluster_in_order() {
        let urls = "amqp://u:p@mq1:5672/%2f, amqp://u:p@mq2:5672/%2f,amqp://u:p@mq3:5672/%2f";
        let c = Config::from_sources(None, env(&[("AMQP_URL", urls)])).unwrap();
        let nodes: Vec<String> = c.amqp_nodes().iter().map(|n| n.expose().into()).collect();
        assert_eq!(
            nodes,
            [
                "amqp://u:p@mq1:5672/%2f",
                "amqp://u:p@mq2:5672/%2f",
                "amqp://u:p@mq3:5672/%2f"
            ]
        );
        let one_bad = "amqp://u:p@mq1:5672/%2f,mq2:5672";
        let e = Config::from_sources(None, env(&[("AMQP_URL", one_bad)])).unwrap_err();
        assert!(e.to_string().contains("each node"), "{e}");
    }

    #[test]
    fn a_redis_cluster_is_configured_by_its_seeds_alone() {
        let seeds = r#"["redis://10.0.0.1:7000","redis://10.0.0.2:7000"]"#;
        let c = Config::from_sources(None, env(&[("DATAFLOW_REDIS_CLUSTER_URLS", seeds)])).unwrap();
        assert!(matches!(c.redis(), Some(RedisTarget::Cluster(urls)) if urls.len() == 2));
        let both = env(&[
            ("DATAFLOW_REDIS_CLUSTER_URLS", seeds),
            ("REDIS_URL", "redis://10.0.0.3:6379"),
        ]);
        let e = Config::from_sources(None, both).unwrap_err().to_string();
        assert!(e.contains("not both"), "{e}");
        let braces = env(&[
            ("DATAFLOW_REDIS_CLUSTER_URLS", seeds),
            ("DATAFLOW_REDIS_PREFIX", "{df}"),
        ]);
        let e = Config::from_sources(None, braces).unwrap_err().to_string();
        assert!(e.contains("braces"), "{e}");
        let apalis = env(&[
            ("DATAFLOW_REDIS_CLUSTER_URLS", seeds),
            ("DATAFLOW_JOBS__REDIS_QUEUE", "apalis-redis"),
            ("DATAFLOW_JOBS__REDIS_WORKING_SET", "1000"),
        ]);
        let e = Config::from_sources(None, apalis).unwrap_err().to_string();
        assert!(e.contains("cannot run on a Redis Cluster"), "{e}");
    }

    #[test]
    fn ui_origin_is_checked() {
        let ok = env(&[("DATAFLOW_API__UI__ORIGIN", "https://ops.example.com:8443")]);
        assert!(Config::from_sources(None, ok).is_ok());
        for bad in ["ops.example.com", "https://ops.example.com/", "https://"] {
            let e = Config::from_sources(None, env(&[("DATAFLOW_API__UI__ORIGIN", bad)]));
            assert!(e.is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn secrets_do_not_print() {
        let c = Config::from_sources(
            None,
            env(&[("DATAFLOW_ADMIN_TOKEN", "super-secret-token-123")]),
        )
        .unwrap();
        assert!(!format!("{c:?}").contains("super-secret"));
    }
}

//! The one place where backends are chosen from configuration. Callers get [`Backends`]
//! and never learn which implementation sits behind each part.
//!
//! | part | with `redis_url` or `redis_cluster_urls` | without |
//! | --- | --- | --- |
//! | rate limiter | Redis GCRA script, in-process fallback | in-process GCRA |
//! | auth lock-out | Redis counters with TTL, in-process fallback | in-process |
//! | key / client cache | L1 in process + L2 in Redis, pub/sub invalidation | in process |
//! | dedup fast path | Redis `SET NX PX` before the SQL decider | SQL only |
//! | batch mutex | Redlock (on `redlock_urls`, else `redis_url`; a cluster needs `redlock_urls`), fenced by the SQL lease epoch | the SQL lease alone |
//! | job queue | Redis lists (or apalis-redis) fed from the SQL intents | workers claim the SQL intents |
//! | mail | SMTP when `jobs.smtp_url` is set | `.eml` files in `<data_dir>/mail` |
//! | live updates (dashboard SSE) | Redis pub/sub across processes | in-process broadcast |
//! | dashboard sessions | keys with a sliding TTL | `ui_sessions` rows in the ledger |
//!
//! | part | with `amqp_url` | without |
//! | --- | --- | --- |
//! | events | RabbitMQ topic exchange with confirms, then the in-process bus | the in-process bus |
//! | worker wake-up | `batch.ready` consumer; SQL swept every `amqp.safety_sweep_ms` | SQL polling |

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::broker::Broker;
use crate::config::RedisQueue;
use crate::config::{Config, RedisTarget, Secret};
use crate::coordination::fleet::Fleet;
use crate::coordination::mutex::{BatchMutex, LOCK_TIMEOUT, Redlock};
use crate::dashboard::live::LiveBus;
use crate::dashboard::sessions::SessionStore;
use crate::domain::keys::{self, KeyHasher};
use crate::effects::mail::Mailer;
use crate::effects::webhook::WebhookSender;
use crate::events::{Mode, Publisher};
use crate::guards::cache::{Cache, SharedTier};
use crate::guards::dedup::DedupFastPath;
use crate::guards::limiter::{InProcessLimiter, Limiter, RedisLimiter};
use crate::guards::lockout::{InProcessLockout, Lockout, LockoutPolicy, RedisLockout};
use crate::jobqueue::{ApalisQueues, JobQueues, RedisJobQueue};
use crate::ledger::{ClientRecord, Db, KeyRecord, PoolSettings};
use crate::redis::{Purpose, Redis};
use crate::{Error, Result};

pub struct Backends {
    pub db: Db,
    pub redis: Option<Redis>,
    /// Where the cache and its invalidations live: `redis_cache_url`, else `redis`.
    pub cache_redis: Option<Redis>,
    pub limiter: Limiter,
    pub lockout: Lockout,
    /// API keys by key id.
    pub keys: Cache<KeyRecord>,
    /// Clients (with their policies) by client id.
    pub clients: Cache<ClientRecord>,
    pub dedup: DedupFastPath,
    pub mutex: Arc<BatchMutex>,
    pub publisher: Publisher,
    /// The RabbitMQ link, when `amqp_url` is set (its supervisor runs in `App::start`).
    pub broker: Option<Arc<Broker>>,
    /// How batches reach workers now; the broker moves it between `broker` and `polling`.
    pub mode: watch::Sender<Mode>,
    pub hasher: KeyHasher,
    pub admin_token: Secret,
    /// The job queue in Redis; `None`: workers claim job intents from SQL.
    pub job_queue: Option<RedisJobQueue>,
    pub mailer: Arc<Mailer>,
    /// The worker fleet registry: in Redis when configured, else in the ledger.
    pub fleet: Arc<Fleet>,
    pub webhooks: Arc<WebhookSender>,
    /// Live updates for dashboards: Redis pub/sub when configured, else in process.
    pub live: Arc<LiveBus>,
    /// Dashboard sessions: in Redis when configured, else in the ledger.
    pub sessions: SessionStore,
    /// When the scraped gauges were last refreshed from the ledger ([`crate::telemetry`]).
    pub gauges_refreshed: tokio::sync::Mutex<Option<std::time::Instant>>,
}

/// What an operator command (`clients`, `keys`, `policy`, `batches`, `dlq`) needs, and no
/// more: the ledger, ready as a process would find it, and the key and client caches, so a
/// change is announced to running processes through Redis when it is configured. No
/// limiter, queue, broker, mailer, fleet or generated secret.
pub struct Operator {
    pub db: Db,
    pub keys: Cache<KeyRecord>,
    pub clients: Cache<ClientRecord>,
}

impl Operator {
    pub async fn open(config: &Config) -> Result<Operator> {
        let db = ready_ledger(config).await?;
        let ca = redis_ca(config)?;
        let cache_redis = match (&config.redis_cache_url, config.redis()) {
            (Some(url), _) => Some(
                connect_redis(
                    config,
                    ca.as_deref(),
                    RedisTarget::Server(url),
                    Purpose::Cache,
                )
                .await?,
            ),
            (None, Some(target)) => {
                Some(connect_redis(config, ca.as_deref(), target, Purpose::Cache).await?)
            }
            (None, None) => None,
        };
        let (keys, clients) = caches(config, cache_redis.as_ref());
        Ok(Operator { db, keys, clients })
    }

    /// The hasher of API key secrets, with the deployment's secret (generated into the
    /// data folder the first time, as a server's start-up would).
    pub fn key_hasher(config: &Config) -> Result<KeyHasher> {
        let secret = resolve_secret(config.secret.as_ref(), &config.data_dir, "server-secret")?;
        Ok(KeyHasher::new(secret.expose()))
    }
}

/// The ledger as a process starts on it: migrated with `auto_migrate`, else checked to be
/// exactly this binary's schema.
async fn ready_ledger(config: &Config) -> Result<Db> {
    let db = open_ledger(config).await?;
    if config.auto_migrate {
        db.migrate().await?;
    } else {
        db.check_schema().await?;
    }
    Ok(db)
}

/// The private CA for `rediss://`, read once for every connection of a start-up.
fn redis_ca(config: &Config) -> Result<Option<Vec<u8>>> {
    config
        .redis_ca_file
        .as_ref()
        .map(|path| {
            std::fs::read(path).map_err(|source| Error::Io {
                context: format!("reading redis_ca_file {}", path.display()),
                source,
            })
        })
        .transpose()
}

/// A Redis connection (to one server or a cluster) under the configured prefix and `ca`.
async fn connect_redis(
    config: &Config,
    ca: Option<&[u8]>,
    target: RedisTarget<'_>,
    purpose: Purpose,
) -> Result<Redis> {
    let prefix = &config.redis_prefix;
    let ca = ca.map(<[u8]>::to_vec);
    match target {
        RedisTarget::Server(url) => Redis::connect(url.expose(), prefix, ca, purpose).await,
        RedisTarget::Cluster(urls) => {
            let urls: Vec<&str> = urls.iter().map(Secret::expose).collect();
            Redis::connect_cluster(&urls, prefix, ca, purpose).await
        }
    }
}

/// The key and client caches: in process, with a shared tier in `cache_redis` when there
/// is one (whose shorter local TTL is safe because every change is announced).
fn caches(config: &Config, cache_redis: Option<&Redis>) -> (Cache<KeyRecord>, Cache<ClientRecord>) {
    let api = &config.api;
    let ttl = Duration::from_millis(api.cache_ttl_ms);
    let negative_ttl = Duration::from_millis(api.cache_negative_ttl_ms);
    let l1_ttl = match cache_redis {
        Some(_) => Duration::from_millis(api.cache_l1_ttl_ms),
        None => ttl,
    };
    let tier = |namespace| {
        cache_redis.map(|r| SharedTier {
            redis: r.clone(),
            namespace,
            ttl,
            negative_ttl,
        })
    };
    (
        Cache::new(l1_ttl, negative_ttl, tier("keys")),
        Cache::new(l1_ttl, negative_ttl, tier("clients")),
    )
}

/// Connects to the ledger with the process's settings, neither migrating nor checking its
/// schema ([`Backends::build`] does one or the other, `dataflow migrate` the first).
pub async fn open_ledger(config: &Config) -> Result<Db> {
    // No session may keep a transaction's locks past a third of a lease (at least a
    // second): a stopped worker's successor takes its batch within about a lease.
    let hold = (Duration::from_secs(config.worker.lease_secs) / 3).max(Duration::from_secs(1));
    Ok(Db::connect_with(
        &config.database_url(),
        PoolSettings {
            max_connections: config.db_max_connections,
            idle_in_transaction: hold,
            sqlite_cache_mib: config.sqlite_cache_mib,
        },
    )
    .await?
    .with_job_max_attempts(config.jobs.max_attempts)
    .with_durable_commits(config.sqlite_durable_commits))
}

impl Backends {
    /// Connects and migrates the ledger, connects Redis when configured, builds the rest.
    pub async fn build(config: &Config) -> Result<Arc<Backends>> {
        // For processes that build backends without the CLI's start-up (tests, benches).
        crate::install_crypto_provider();
        // Before anything records a metric.
        crate::telemetry::handle();
        let db = ready_ledger(config).await?;
        let hasher = Operator::key_hasher(config)?;
        let admin_token =
            resolve_secret(config.admin_token.as_ref(), &config.data_dir, "admin-token")?;
        let ca = redis_ca(config)?;
        let connect =
            async |target, purpose| connect_redis(config, ca.as_deref(), target, purpose).await;
        let redis = match config.redis() {
            Some(target) => Some(connect(target, Purpose::State).await?),
            None => None,
        };
        let cache_redis = match &config.redis_cache_url {
            Some(url) => Some(connect(RedisTarget::Server(url), Purpose::Cache).await?),
            None => redis.clone(),
        };
        let mut lock_nodes = Vec::with_capacity(config.redlock_urls.len());
        for url in &config.redlock_urls {
            lock_nodes.push(connect(RedisTarget::Server(url), Purpose::State).await?);
        }
        // Redlock needs independent servers: a cluster is not one, so without `redlock_urls`
        // a cluster's workers hold batches by the SQL lease alone (the fence either way).
        if lock_nodes.is_empty()
            && let Some(r) = redis.as_ref().filter(|r| !r.is_cluster())
        {
            lock_nodes.push(r.clone());
        }
        if redis.as_ref().is_some_and(Redis::is_cluster) && lock_nodes.is_empty() {
            tracing::info!(
                "Redis Cluster without redlock_urls: the batch mutex is the SQL lease alone"
            );
        }

        let api = &config.api;
        let lockout_policy = LockoutPolicy {
            max_failures: api.auth_max_failures,
            window: Duration::from_secs(api.auth_window_secs),
            lockout: Duration::from_secs(api.auth_lockout_secs),
        };
        let (limiter, lockout, dedup) = match &redis {
            Some(r) => (
                Limiter::Redis(Box::new(RedisLimiter::new(r.clone()))),
                Lockout::Redis(Box::new(RedisLockout::new(r.clone(), lockout_policy))),
                DedupFastPath::Redis(Box::new(r.clone())),
            ),
            None => (
                Limiter::InProcess(InProcessLimiter::default()),
                Lockout::InProcess(InProcessLockout::new(lockout_policy)),
                DedupFastPath::Off,
            ),
        };
        let mutex = if lock_nodes.is_empty() {
            BatchMutex::SqlOnly
        } else {
            BatchMutex::Redlock(Box::new(Redlock::new(lock_nodes, LOCK_TIMEOUT)))
        };
        let (keys, clients) = caches(config, cache_redis.as_ref());
        let mailer = Mailer::from_config(&config.jobs, &config.data_dir)?;
        let webhooks = WebhookSender::new(
            Duration::from_millis(config.jobs.webhook_timeout_ms),
            config.jobs.webhook_allow_private,
        )?;
        let mode = watch::channel(Mode::Embedded).0;
        let nodes = config.amqp_nodes();
        let broker = (!nodes.is_empty())
            .then(|| Arc::new(Broker::new(nodes, config.amqp.clone(), mode.clone())));
        mode.borrow().record();
        let publisher = match &broker {
            Some(b) => Publisher::broker(b.clone()),
            None => Publisher::in_process(),
        };
        Ok(Arc::new(Backends {
            job_queue: redis.clone().map(|r| match config.jobs.redis_queue {
                RedisQueue::Lists => RedisJobQueue::Lists(JobQueues::new(r)),
                RedisQueue::ApalisRedis => RedisJobQueue::Apalis(ApalisQueues::new(
                    r,
                    Duration::from_millis(config.jobs.dead_worker_ms),
                )),
            }),
            mailer: Arc::new(mailer),
            fleet: Arc::new(match &redis {
                Some(r) => Fleet::Redis(Box::new(r.clone())),
                None => Fleet::Sql(db.clone()),
            }),
            webhooks: Arc::new(webhooks),
            live: Arc::new(match &redis {
                Some(r) => LiveBus::redis(r.clone(), api.ui.sse_buffer),
                None => LiveBus::in_process(api.ui.sse_buffer),
            }),
            sessions: match &redis {
                Some(r) => SessionStore::Redis(Box::new(r.clone())),
                None => SessionStore::Sql(db.clone()),
            },
            gauges_refreshed: tokio::sync::Mutex::new(None),
            keys,
            clients,
            db,
            redis,
            cache_redis,
            limiter,
            lockout,
            dedup,
            mutex: Arc::new(mutex),
            publisher,
            broker,
            mode,
            hasher,
            admin_token,
        }))
    }

    /// Listens for cache invalidations from other processes until `shutdown` (a no-op
    /// without Redis). After every (re)subscribe the local copies are dropped, since
    /// messages sent while disconnected are lost.
    pub async fn run_invalidation_listener(self: Arc<Self>, shutdown: CancellationToken) {
        let Some(redis) = self.cache_redis.clone() else {
            return;
        };
        let channel = SharedTier::channel(&redis);
        let forget_all = || {
            self.keys.forget_all_local();
            self.clients.forget_all_local();
        };
        let forget = |payload: String| match payload.split_once('\n') {
            Some(("keys", key)) => self.keys.forget_local(key),
            Some(("clients", id)) => self.clients.forget_local(id),
            _ => tracing::debug!(%payload, "unknown cache invalidation"),
        };
        redis
            .listen(
                &channel,
                "cache invalidation",
                &shutdown,
                forget_all,
                forget,
            )
            .await;
    }
}

/// The configured secret, or the one kept in `<data_dir>/<name>` (created on first start).
fn resolve_secret(configured: Option<&Secret>, data_dir: &Path, name: &str) -> Result<Secret> {
    if let Some(s) = configured {
        return Ok(s.clone());
    }
    let path = data_dir.join(name);
    let io = |context: String| move |source| Error::Io { context, source };
    let read = |path: &Path| match std::fs::read_to_string(path) {
        Ok(s) if !s.trim().is_empty() => Ok(Some(Secret::new(s.trim()))),
        Ok(_) => Err(Error::Config(format!(
            "{} is empty: delete it and a new one is generated (or set it in the configuration)",
            path.display()
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(format!("reading {}", path.display()))(e)),
    };
    if let Some(secret) = read(&path)? {
        return Ok(secret);
    }
    std::fs::create_dir_all(data_dir).map_err(io(format!("creating {}", data_dir.display())))?;
    // Processes sharing the folder may start together: each writes a whole file of its
    // own, and a hard link publishes it under the name only if no other did first, so
    // every process reads the same complete secret and none finds the name half written.
    let token = keys::random_token();
    let draft = data_dir.join(format!(".{name}.{}", keys::random_token()));
    write_private(&draft, &token).map_err(io(format!("writing {}", draft.display())))?;
    let published = std::fs::hard_link(&draft, &path);
    let _ = std::fs::remove_file(&draft);
    match published {
        Ok(()) => {
            tracing::info!(path = %path.display(), "generated {name}; keep this file private");
            Ok(Secret::new(token))
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            read(&path)?.ok_or_else(|| Error::Config(format!("{} vanished", path.display())))
        }
        // A file system without hard links (vfat, some network and FUSE mounts): the name
        // is created directly, as one process starting alone needs.
        Err(_) => {
            write_private(&path, &token).map_err(io(format!("writing {}", path.display())))?;
            tracing::info!(path = %path.display(), "generated {name}; keep this file private");
            Ok(Secret::new(token))
        }
    }
}

fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path)?;
    file.write_all(contents.as_bytes())?;
    // On disk before it is published: a power cut must not leave an empty secret.
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn processes_starting_together_share_one_generated_secret() {
        for round in 0..20 {
            let dir = std::env::temp_dir()
                .join(format!("dataflow-secret-{}-{round}", keys::random_token()));
            let start = std::sync::Arc::new(std::sync::Barrier::new(8));
            let racers: Vec<_> = (0..8)
                .map(|_| {
                    let (dir, start) = (dir.clone(), start.clone());
                    std::thread::spawn(move || {
                        start.wait();
                        resolve_secret(None, &dir, "admin-token").map(|s| s.expose().to_owned())
                    })
                })
                .collect();
            let secrets: Vec<String> = racers
                .into_iter()
                .map(|r| r.join().unwrap().unwrap())
                .collect();
            assert!(secrets.iter().all(|s| s == &secrets[0]), "{secrets:?}");
            let files = std::fs::read_dir(&dir).unwrap().count();
            assert_eq!(files, 1, "only the secret is left in the folder");
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }

    #[test]
    fn an_empty_secret_file_says_what_to_do() {
        let dir = std::env::temp_dir().join(format!("dataflow-secret-{}", keys::random_token()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("server-secret"), "\n").unwrap();
        let e = resolve_secret(None, &dir, "server-secret").unwrap_err();
        assert!(e.to_string().contains("delete it"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

//! The Redis foundation: one multiplexed, self-reconnecting connection per process, with
//! explicit timeouts, TLS (`rediss://`) and passwords from the URL, and every key under one
//! configurable prefix. The same handle works on one Redis server or on a Redis Cluster
//! (`redis_cluster_urls`): callers send commands through [`Conn`] and never learn which.
//!
//! On a cluster every command, script and pipeline must touch keys of one hash slot. Keys
//! that a script or a pipeline uses together share a hash tag ([`tag`]): the job queue's keys
//! of one kind, the fleet's entries, a subject's lock-out counter and lock. Nothing derives a
//! key name inside Lua. Keys used alone carry no tag, so they spread over the masters.
//!
//! Redis is a fast path, never the ledger: every caller has an answer for "Redis is down".

use std::time::Duration;

use futures::StreamExt;
use redis::aio::{ConnectionLike, ConnectionManager, MultiplexedConnection};
use redis::cluster::{ClusterClient, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{AsyncCommands, Client, Cmd, Pipeline, RedisFuture, Value};
use tokio_util::sync::CancellationToken;

use crate::{Error, Result};

/// Timeouts short enough that a hung Redis costs a request milliseconds, not seconds.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
const RESPONSE_TIMEOUT: Duration = Duration::from_millis(500);
/// A blocking connection's connect timeout: it waits on an empty queue, so no reply timeout.
const BLOCKING_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// What a Redis holds, which decides whether it may evict keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// Limits, lock-outs, dedup claims, locks, the job queue: must not evict.
    State,
    /// The cache: a lost entry is a miss, so eviction is fine.
    Cache,
}

/// A hash tag of `parts` joined by `:`: keys that carry the same tag live in one cluster
/// slot, so a script or a pipeline may use them together. Never empty, so never ignored.
pub fn tag(parts: &[&str]) -> String {
    format!("{{{}}}", parts.join(":"))
}

/// A connection for commands, to a server or to a cluster; cheap to clone (multiplexed).
#[derive(Clone)]
pub enum Conn {
    /// The shared connection to one server, reconnecting on its own.
    Server(ConnectionManager),
    /// A connection of its own to one server (for blocking commands).
    Dedicated(MultiplexedConnection),
    /// The cluster: each command goes to the master of its keys' slot.
    Cluster(ClusterConnection),
}

/// How often a cluster command refused before it ran is sent again, and how long apart.
const NOT_RUN_RETRIES: u32 = 3;
const NOT_RUN_PAUSE: Duration = Duration::from_millis(50);

/// Whether the cluster refused `e`'s command without running it: its slot is served
/// elsewhere now (`MOVED`, `ASK`), is moving or has no master for a moment, or the client
/// had no connection for it. Sending it again cannot run it twice.
fn not_run(e: &redis::RedisError) -> bool {
    use redis::ServerErrorKind as S;
    matches!(
        e.kind(),
        redis::ErrorKind::Server(S::Moved | S::Ask | S::TryAgain | S::ClusterDown | S::MasterDown)
            | redis::ErrorKind::ClusterConnectionNotFound
    )
}

/// A future of `$send` on the cluster, sent again (a few times, a moment apart) while the
/// cluster refuses it without running it.
macro_rules! resend_if_not_run {
    ($send:expr) => {
        Box::pin(async move {
            let mut tries = 0;
            loop {
                match $send.await {
                    Err(e) if not_run(&e) && tries < NOT_RUN_RETRIES => {
                        tries += 1;
                        tokio::time::sleep(NOT_RUN_PAUSE).await;
                    }
                    done => return done,
                }
            }
        })
    };
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Server(c) => c.req_packed_command(cmd),
            Conn::Dedicated(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => resend_if_not_run!(c.req_packed_command(cmd)),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Server(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Dedicated(c) => c.req_packed_commands(pipeline, offset, count),
            // A pipeline goes to one slot's node: refused there, none of it ran.
            Conn::Cluster(c) => resend_if_not_run!(c.req_packed_commands(pipeline, offset, count)),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Server(c) => c.get_db(),
            Conn::Dedicated(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// Where the connection goes, kept for the connections made apart from the shared one.
#[derive(Clone)]
enum Target {
    Server(Box<Client>),
    /// The cluster's client, and a client per seed node for pub/sub, which a cluster
    /// delivers on every node.
    Cluster {
        client: Box<ClusterClient>,
        seeds: Vec<Client>,
    },
}

#[derive(Clone)]
pub struct Redis {
    conn: Conn,
    target: Target,
    prefix: String,
}

impl Redis {
    /// Prepares the connection to one server (made lazily: a process whose Redis is down
    /// at startup starts anyway, on its fallbacks) and, for state, checks the eviction
    /// policy. `ca_pem`: a private CA to trust for `rediss://` instead of the public roots.
    pub async fn connect(
        url: &str,
        prefix: &str,
        ca_pem: Option<Vec<u8>>,
        purpose: Purpose,
    ) -> Result<Redis> {
        let client = server_client(url, ca_pem)?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), config)?;
        let target = Target::Server(Box::new(client));
        Redis::ready(Conn::Server(conn), target, prefix, purpose).await
    }

    /// Prepares the connection to a Redis Cluster through its seed nodes `urls` (any of
    /// them answering is enough; the rest of the cluster is learnt from it). Lazy, as
    /// [`Redis::connect`]: the nodes are reached in the background and again after a loss.
    pub async fn connect_cluster(
        urls: &[&str],
        prefix: &str,
        ca_pem: Option<Vec<u8>>,
        purpose: Purpose,
    ) -> Result<Redis> {
        // No retries by the client: it would send a command again after a timeout or a
        // dropped connection, and a push, a reap or a counted failure must not run twice.
        // [`Conn`] sends again only what the cluster refused without running (`MOVED`…),
        // while the client learns the slot's new owner.
        let mut builder = ClusterClient::builder(urls.iter().copied())
            .connection_timeout(CONNECT_TIMEOUT)
            .retries(0);
        if let Some(root_cert) = ca_pem.clone() {
            builder = builder.certs(redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(root_cert),
            });
        }
        let client = builder
            .build()
            .map_err(|e| Error::Config(format!("redis_cluster_urls: {e}")))?;
        // The reply timeout is the shared connection's alone (not the client's), so that a
        // blocking connection made from the same client may wait as long as it asks.
        let conn = client.get_pending_async_connection_with_config(
            ClusterConfig::new()
                .set_connection_timeout(CONNECT_TIMEOUT)
                .set_response_timeout(RESPONSE_TIMEOUT),
        );
        let seeds = urls
            .iter()
            .map(|url| server_client(url, ca_pem.clone()))
            .collect::<Result<_>>()?;
        let target = Target::Cluster {
            client: Box::new(client),
            seeds,
        };
        Redis::ready(Conn::Cluster(conn), target, prefix, purpose).await
    }

    async fn ready(conn: Conn, target: Target, prefix: &str, purpose: Purpose) -> Result<Redis> {
        let redis = Redis {
            conn,
            target,
            prefix: prefix.to_owned(),
        };
        if purpose == Purpose::State {
            redis.warn_unless_noeviction().await;
        }
        Ok(redis)
    }

    /// Whether this is a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self.target, Target::Cluster { .. })
    }

    /// `<prefix>:<part>:<part>…`
    pub fn key(&self, parts: &[&str]) -> String {
        let mut key = self.prefix.clone();
        for p in parts {
            key.push(':');
            key.push_str(p);
        }
        key
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// A handle for commands; cheap (the connection is multiplexed).
    pub fn conn(&self) -> Conn {
        self.conn.clone()
    }

    /// The client of a single server, for what needs one server by design (a Redlock
    /// node); `None` on a cluster.
    pub fn server_client(&self) -> Option<&Client> {
        match &self.target {
            Target::Server(client) => Some(client),
            Target::Cluster { .. } => None,
        }
    }

    /// A connection of its own, with no reply timeout, for a command that blocks (`BLMOVE`)
    /// and would stall every other command on the shared one.
    pub async fn blocking_connection(&self) -> Result<Conn> {
        Ok(match &self.target {
            Target::Server(client) => {
                let config = redis::AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(BLOCKING_CONNECT_TIMEOUT))
                    .set_response_timeout(None);
                Conn::Dedicated(
                    client
                        .get_multiplexed_async_connection_with_config(&config)
                        .await?,
                )
            }
            Target::Cluster { client, .. } => Conn::Cluster(
                client
                    .get_async_connection_with_config(
                        ClusterConfig::new().set_connection_timeout(BLOCKING_CONNECT_TIMEOUT),
                    )
                    .await?,
            ),
        })
    }

    /// Listens on the pub/sub `channel` until `shutdown`, resubscribing with backoff when
    /// the subscription fails or drops. `on_subscribed` runs after every (re)subscribe —
    /// messages published while disconnected are lost, so that is where a listener catches
    /// up — and `on_message` for every payload. `what` names the channel in logs.
    ///
    /// On a cluster the subscription is on one seed node, the next one after a failure: a
    /// cluster delivers every `PUBLISH` to the subscribers of every node. (Sharded pub/sub
    /// would confine a channel to its slot's shard; these channels are fan-outs to every
    /// process, few messages each, so the classic form fits them.)
    pub async fn listen(
        &self,
        channel: &str,
        what: &str,
        shutdown: &CancellationToken,
        mut on_subscribed: impl FnMut(),
        mut on_message: impl FnMut(String),
    ) {
        let mut backoff = Duration::from_millis(100);
        let mut attempt = 0usize;
        while !shutdown.is_cancelled() {
            let client = self.subscriber(attempt).await;
            attempt = attempt.wrapping_add(1);
            let subscribed = async {
                let mut pubsub = client?.get_async_pubsub().await?;
                pubsub.subscribe(channel).await?;
                redis::RedisResult::Ok(pubsub)
            }
            .await;
            let pubsub = match subscribed {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(error = %e, "{what} channel unavailable; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            backoff = Duration::from_millis(100);
            on_subscribed();
            let mut messages = pubsub.into_on_message();
            loop {
                let msg = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    m = messages.next() => m,
                };
                let Some(msg) = msg else { break };
                on_message(msg.get_payload().unwrap_or_default());
            }
            tracing::warn!("{what} channel closed; resubscribing");
        }
    }

    /// The client to subscribe with on attempt `attempt`: the one server; on a cluster, in
    /// turn, each master the cluster now has (so a fleet whose seed nodes were replaced
    /// still hears), then each seed node (so a subscription survives a cluster that cannot
    /// be asked).
    async fn subscriber(&self, attempt: usize) -> redis::RedisResult<Client> {
        let seeds = match &self.target {
            Target::Server(client) => return Ok(Client::clone(client)),
            Target::Cluster { seeds, .. } => seeds,
        };
        let seed = seeds[0].get_connection_info();
        let mut candidates = Vec::with_capacity(seeds.len() + 3);
        if let Ok(masters) = self.masters().await {
            for (host, port) in masters.into_iter().flatten() {
                let addr = match seed.addr() {
                    redis::ConnectionAddr::TcpTls {
                        insecure,
                        tls_params,
                        ..
                    } => redis::ConnectionAddr::TcpTls {
                        host,
                        port,
                        insecure: *insecure,
                        tls_params: tls_params.clone(),
                    },
                    _ => redis::ConnectionAddr::Tcp(host, port),
                };
                candidates.push(Client::open(seed.clone().set_addr(addr))?);
            }
        }
        candidates.extend(seeds.iter().cloned());
        Ok(candidates.swap_remove(attempt % candidates.len()))
    }

    pub async fn ping(&self) -> Result<()> {
        let _: String = redis::cmd("PING").query_async(&mut self.conn()).await?;
        Ok(())
    }

    /// Limits, lock-outs and dedup claims must not be evicted: only `noeviction` keeps
    /// them. Managed Redis often forbids `CONFIG`; then say so and go on. On a cluster,
    /// every master is asked.
    async fn warn_unless_noeviction(&self) {
        let mut config_get = redis::cmd("CONFIG");
        config_get.arg("GET").arg("maxmemory-policy");
        let policies: Result<Vec<Vec<String>>> = async {
            let mut out = Vec::new();
            for node in self.masters().await? {
                out.push(parse(self.on(&node, &config_get).await?)?);
            }
            Ok(out)
        }
        .await;
        let unreadable =
            || tracing::warn!("could not read Redis maxmemory-policy; make sure it is noeviction");
        let Ok(policies) = policies else {
            return unreadable();
        };
        for policy in policies {
            match policy.as_slice() {
                [_, p] if p == "noeviction" => {}
                [_, p] => tracing::warn!(
                    policy = %p,
                    "Redis maxmemory-policy is not noeviction: limiter, lock-out and dedup keys may \
                     be evicted under memory pressure; set `maxmemory-policy noeviction`"
                ),
                _ => unreadable(),
            }
        }
    }

    /// Every key under this prefix (for audits such as "no key without a TTL"), from every
    /// master of a cluster.
    pub async fn keys_with_prefix(&self) -> Result<Vec<String>> {
        self.scan(&format!("{}:*", self.prefix)).await
    }

    /// Deletes every key whose name starts with the prefix, the apalis-redis queues
    /// (`<prefix>-jobs-…`) included: the clean-up of a test or benchmark run, whose prefix
    /// is its own.
    pub async fn delete_all_under_prefix(&self) -> Result<usize> {
        let keys = self.scan(&format!("{}*", self.prefix)).await?;
        let mut conn = self.conn();
        // `DEL` of several keys: the cluster connection splits it by slot.
        for chunk in keys.chunks(500) {
            let _: () = redis::cmd("DEL").arg(chunk).query_async(&mut conn).await?;
        }
        Ok(keys.len())
    }

    async fn scan(&self, pattern: &str) -> Result<Vec<String>> {
        if !self.is_cluster() {
            let mut conn = self.conn();
            let mut iter: redis::AsyncIter<String> = conn.scan_match(pattern).await?;
            let mut keys = Vec::new();
            while let Some(k) = iter.next().await {
                keys.push(k?);
            }
            return Ok(keys);
        }
        let mut keys = Vec::new();
        for node in self.masters().await? {
            let mut cursor = 0u64;
            loop {
                let mut scan = redis::cmd("SCAN");
                scan.arg(cursor)
                    .arg("MATCH")
                    .arg(pattern)
                    .arg("COUNT")
                    .arg(1000);
                let (next, batch): (u64, Vec<String>) = parse(self.on(&node, &scan).await?)?;
                keys.extend(batch);
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        Ok(keys)
    }

    /// The masters of a cluster (`host`, `port`) as the cluster client knows them (from
    /// `CLUSTER SLOTS`, as its slot map is); `None` for the one server of a single Redis.
    async fn masters(&self) -> Result<Vec<Option<(String, u16)>>> {
        if !self.is_cluster() {
            return Ok(vec![None]);
        }
        let slots: Value = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query_async(&mut self.conn())
            .await?;
        Ok(masters_of(&slots).into_iter().map(Some).collect())
    }

    /// Runs `cmd` on `node` (a master of [`Redis::masters`]), or on the one server.
    async fn on(&self, node: &Option<(String, u16)>, cmd: &Cmd) -> Result<Value> {
        Ok(match (&self.conn, node) {
            (Conn::Cluster(cluster), Some((host, port))) => {
                let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                    host: host.clone(),
                    port: *port,
                });
                cluster.clone().route_command(cmd.clone(), route).await?
            }
            _ => cmd.query_async(&mut self.conn()).await?,
        })
    }
}

/// A reply read as `T`.
fn parse<T: redis::FromRedisValue>(value: Value) -> Result<T> {
    Ok(redis::from_redis_value(value).map_err(redis::RedisError::from)?)
}

/// A client of one server, trusting `ca_pem` for `rediss://` when given.
fn server_client(url: &str, ca_pem: Option<Vec<u8>>) -> Result<Client> {
    match ca_pem {
        Some(root_cert) => Client::build_with_tls(
            url,
            redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(root_cert),
            },
        ),
        None => Client::open(url),
    }
    .map_err(|e| Error::Config(format!("Redis URL: {e}")))
}

/// The masters' addresses in a `CLUSTER SLOTS` reply, once each: per slot range, its
/// start, its end, then its master (`host`, `port`, id, …) and its replicas.
fn masters_of(slots: &Value) -> Vec<(String, u16)> {
    let Value::Array(ranges) = slots else {
        return Vec::new();
    };
    let mut masters = Vec::new();
    for range in ranges {
        let Value::Array(fields) = range else {
            continue;
        };
        let Some(Value::Array(master)) = fields.get(2) else {
            continue;
        };
        let host = match master.first() {
            Some(Value::BulkString(host)) => String::from_utf8_lossy(host).into_owned(),
            Some(Value::SimpleString(host)) => host.clone(),
            _ => continue,
        };
        let Some(Value::Int(port)) = master.get(1) else {
            continue;
        };
        let Ok(port) = u16::try_from(*port) else {
            continue;
        };
        if !masters.contains(&(host.clone(), port)) {
            masters.push((host, port));
        }
    }
    masters
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masters_are_read_from_cluster_slots() {
        let node = |host: &str, port: i64| {
            Value::Array(vec![
                Value::BulkString(host.as_bytes().to_vec()),
                Value::Int(port),
                Value::BulkString(b"id".to_vec()),
            ])
        };
        let range = |start: i64, end: i64, nodes: Vec<Value>| {
            let mut fields = vec![Value::Int(start), Value::Int(end)];
            fields.extend(nodes);
            Value::Array(fields)
        };
        let reply = Value::Array(vec![
            range(
                0,
                5460,
                vec![node("10.0.0.1", 7000), node("10.0.0.4", 7003)],
            ),
            range(5461, 10922, vec![node("10.0.0.2", 7001)]),
            range(10923, 12000, vec![node("10.0.0.3", 7002)]),
            range(12001, 16383, vec![node("10.0.0.3", 7002)]),
        ]);
        assert_eq!(
            masters_of(&reply),
            vec![
                ("10.0.0.1".to_owned(), 7000),
                ("10.0.0.2".to_owned(), 7001),
                ("10.0.0.3".to_owned(), 7002),
            ]
        );
    }

    #[test]
    fn a_tag_joins_its_parts_inside_braces() {
        assert_eq!(tag(&["jobs", "email"]), "{jobs:email}");
        assert_eq!(tag(&["fleet"]), "{fleet}");
    }
}

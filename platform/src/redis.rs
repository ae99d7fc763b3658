//! The Redis foundation: one multiplexed, self-reconnecting connection per process, with
//! explicit timeouts, TLS (`rediss://`) and passwords from the URL, and every key under one
//! configurable prefix.
//!
//! Redis is a fast path, never the ledger: every caller has an answer for "Redis is down".

use std::time::Duration;

use futures::StreamExt;
use redis::aio::ConnectionManager;
use redis::{AsyncCommands, Client};
use tokio_util::sync::CancellationToken;

use crate::{Error, Result};

/// Timeouts short enough that a hung Redis costs a request milliseconds, not seconds.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
const RESPONSE_TIMEOUT: Duration = Duration::from_millis(500);

/// What a Redis holds, which decides whether it may evict keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// Limits, lock-outs, dedup claims, locks, the job queue: must not evict.
    State,
    /// The cache: a lost entry is a miss, so eviction is fine.
    Cache,
}

#[derive(Clone)]
pub struct Redis {
    conn: ConnectionManager,
    client: Client,
    prefix: String,
}

impl Redis {
    /// Prepares the connection (made lazily: a process whose Redis is down at startup
    /// starts anyway, on its fallbacks) and, for state, checks the eviction policy.
    /// `ca_pem`: a private CA to trust for `rediss://` instead of the public roots.
    pub async fn connect(
        url: &str,
        prefix: &str,
        ca_pem: Option<Vec<u8>>,
        purpose: Purpose,
    ) -> Result<Redis> {
        let client = match ca_pem {
            Some(root_cert) => Client::build_with_tls(
                url,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(root_cert),
                },
            ),
            None => Client::open(url),
        }
        .map_err(|e| Error::Config(format!("Redis URL: {e}")))?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), config)?;
        let redis = Redis {
            conn,
            client,
            prefix: prefix.to_owned(),
        };
        if purpose == Purpose::State {
            redis.warn_unless_noeviction().await;
        }
        Ok(redis)
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
    pub fn conn(&self) -> ConnectionManager {
        self.conn.clone()
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Listens on the pub/sub `channel` until `shutdown`, resubscribing with backoff when
    /// the subscription fails or drops. `on_subscribed` runs after every (re)subscribe —
    /// messages published while disconnected are lost, so that is where a listener catches
    /// up — and `on_message` for every payload. `what` names the channel in logs.
    pub async fn listen(
        &self,
        channel: &str,
        what: &str,
        shutdown: &CancellationToken,
        mut on_subscribed: impl FnMut(),
        mut on_message: impl FnMut(String),
    ) {
        let mut backoff = Duration::from_millis(100);
        while !shutdown.is_cancelled() {
            let subscribed = async {
                let mut pubsub = self.client.get_async_pubsub().await?;
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

    pub async fn ping(&self) -> Result<()> {
        let _: String = redis::cmd("PING").query_async(&mut self.conn()).await?;
        Ok(())
    }

    /// Limits, lock-outs and dedup claims must not be evicted: only `noeviction` keeps
    /// them. Managed Redis often forbids `CONFIG`; then say so and go on.
    async fn warn_unless_noeviction(&self) {
        let policy: redis::RedisResult<Vec<String>> = redis::cmd("CONFIG")
            .arg("GET")
            .arg("maxmemory-policy")
            .query_async(&mut self.conn())
            .await;
        match policy.as_deref() {
            Ok([_, p]) if p == "noeviction" => {}
            Ok([_, p]) => tracing::warn!(
                policy = %p,
                "Redis maxmemory-policy is not noeviction: limiter, lock-out and dedup keys may be \
                 evicted under memory pressure; set `maxmemory-policy noeviction`"
            ),
            _ => {
                tracing::warn!("could not read Redis maxmemory-policy; make sure it is noeviction")
            }
        }
    }

    /// Every key under this prefix (for audits such as "no key without a TTL").
    pub async fn keys_with_prefix(&self) -> Result<Vec<String>> {
        self.scan(&format!("{}:*", self.prefix)).await
    }

    /// Deletes every key whose name starts with the prefix, the apalis-redis queues
    /// (`<prefix>-jobs-…`) included: the clean-up of a test or benchmark run, whose prefix
    /// is its own.
    pub async fn delete_all_under_prefix(&self) -> Result<usize> {
        let keys = self.scan(&format!("{}*", self.prefix)).await?;
        let mut conn = self.conn();
        for chunk in keys.chunks(500) {
            let _: () = redis::cmd("DEL").arg(chunk).query_async(&mut conn).await?;
        }
        Ok(keys.len())
    }

    async fn scan(&self, pattern: &str) -> Result<Vec<String>> {
        let mut conn = self.conn();
        let mut iter: redis::AsyncIter<String> = conn.scan_match(pattern).await?;
        let mut keys = Vec::new();
        while let Some(k) = iter.next().await {
            keys.push(k?);
        }
        Ok(keys)
    }
}

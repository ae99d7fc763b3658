//! The live-update bus behind the dashboard's SSE: changes are published where they
//! happen (the API for imports and operator actions, the worker for claims, outcomes, dead
//! jobs and fleet membership) and heard by every process that serves dashboards.
//!
//! Embedded: a tokio broadcast channel, so one process hears its own changes. With Redis:
//! publishes go to the `<prefix>:live` pub/sub channel through one background publisher
//! (a bounded queue: a slow or absent Redis drops updates instead of delaying the worker),
//! and a listener feeds every message into this process's broadcast channel.
//!
//! Memory stays bounded either way: the broadcast channel keeps the last
//! `api.ui.sse_buffer` updates for all of this process's subscribers together; a subscriber
//! further behind gets [`Live::Resync`] (re-read everything) instead of a growing queue. A
//! resync is also sent after each Redis (re)subscribe, since updates sent while the
//! subscription was down are lost.

use std::sync::Mutex;

use dataflow_contracts::live::{LiveEvent, LiveKind};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use crate::redis::Redis;

/// Updates waiting for the Redis publisher; beyond this they are dropped.
const PUBLISH_QUEUE: usize = 1024;

/// What a subscriber hears.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Live {
    Changed(LiveEvent),
    /// Updates may have been missed: re-read the state.
    Resync,
}

pub struct LiveBus {
    transport: Transport,
    /// Cancelled when [`LiveBus::run`] ends (process shutdown), so SSE streams end too and
    /// the server's graceful shutdown does not wait for them.
    stopped: CancellationToken,
}

enum Transport {
    InProcess(broadcast::Sender<Live>),
    Redis(Box<RedisBus>),
}

struct RedisBus {
    redis: Redis,
    local: broadcast::Sender<Live>,
    outgoing: mpsc::Sender<String>,
    /// Taken by [`LiveBus::run`], the one publisher.
    queued: Mutex<Option<mpsc::Receiver<String>>>,
}

impl LiveBus {
    pub fn in_process(buffer: usize) -> Self {
        Self {
            transport: Transport::InProcess(broadcast::channel(buffer).0),
            stopped: CancellationToken::new(),
        }
    }

    pub fn redis(redis: Redis, buffer: usize) -> Self {
        let (outgoing, queued) = mpsc::channel(PUBLISH_QUEUE);
        Self {
            transport: Transport::Redis(Box::new(RedisBus {
                redis,
                local: broadcast::channel(buffer).0,
                outgoing,
                queued: Mutex::new(Some(queued)),
            })),
            stopped: CancellationToken::new(),
        }
    }

    fn local(&self) -> &broadcast::Sender<Live> {
        match &self.transport {
            Transport::InProcess(tx) => tx,
            Transport::Redis(bus) => &bus.local,
        }
    }

    /// Hears every update from now on (with Redis: from every process).
    pub fn subscribe(&self) -> broadcast::Receiver<Live> {
        self.local().subscribe()
    }

    /// Cancelled once this process stops serving live updates.
    pub fn stopped(&self) -> &CancellationToken {
        &self.stopped
    }

    /// Announces that `kind` happened to `subject`. Never waits: an update that cannot be
    /// queued is dropped (it is a hint; the ledger has the truth).
    pub fn publish(&self, kind: LiveKind, subject: impl Into<String>) {
        let event = LiveEvent::now(kind, subject);
        match &self.transport {
            // No subscriber is not an error: nobody is watching.
            Transport::InProcess(tx) => {
                let _ = tx.send(Live::Changed(event));
            }
            Transport::Redis(bus) => match serde_json::to_string(&event) {
                Ok(json) => {
                    if bus.outgoing.try_send(json).is_err() {
                        tracing::debug!("live update dropped: the Redis publisher is behind");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "live update not serialisable"),
            },
        }
    }

    /// Runs the bus: with Redis the publisher and the listener, in process nothing but the
    /// waiting. At `shutdown` the SSE streams are told to end ([`LiveBus::stopped`]) while
    /// updates still go out; at `stop` (after the rest of the process stopped) what is
    /// queued is published and the bus ends.
    pub async fn run(&self, shutdown: CancellationToken, stop: CancellationToken) {
        let streams = async {
            shutdown.cancelled().await;
            self.stopped.cancel();
            stop.cancelled().await;
        };
        match &self.transport {
            Transport::Redis(bus) => bus.run(streams).await,
            Transport::InProcess(_) => streams.await,
        }
    }
}

impl RedisBus {
    /// Publishes and listens until `until` resolves, then publishes what is still queued.
    async fn run(&self, until: impl std::future::Future<Output = ()>) {
        let queued = self.queued.lock().unwrap_or_else(|p| p.into_inner()).take();
        let Some(mut queued) = queued else {
            tracing::warn!("the live-update bus is already running");
            return until.await;
        };
        let channel = self.redis.key(&["live"]);
        let mut conn = self.redis.conn();
        let publish = async |conn: &mut crate::redis::Conn, json: String| {
            let sent: redis::RedisResult<()> = redis::cmd("PUBLISH")
                .arg(&channel)
                .arg(json)
                .query_async(conn)
                .await;
            if let Err(e) = sent {
                tracing::debug!(error = %e, "live update not published");
            }
        };
        let resync = || {
            let _ = self.local.send(Live::Resync);
        };
        let deliver = |payload: String| match serde_json::from_str::<LiveEvent>(&payload) {
            Ok(event) => {
                let _ = self.local.send(Live::Changed(event));
            }
            Err(e) => tracing::debug!(error = %e, "ignoring a malformed live update"),
        };
        // Ends with the select below, which drops it; it needs no shutdown of its own.
        let never = CancellationToken::new();
        let listener = self
            .redis
            .listen(&channel, "live updates", &never, resync, deliver);
        let publisher = async {
            while let Some(json) = queued.recv().await {
                publish(&mut conn, json).await;
            }
        };
        tokio::select! {
            _ = until => {}
            _ = listener => {}
            _ = publisher => {}
        }
        while let Ok(json) = queued.try_recv() {
            publish(&mut conn, json).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_lagging_subscriber_is_told_so_not_buffered_for() {
        let bus = LiveBus::in_process(16);
        let mut rx = bus.subscribe();
        for i in 0..40 {
            bus.publish(LiveKind::BatchCreated, format!("bat_{i}"));
        }
        assert!(matches!(
            rx.recv().await,
            Err(broadcast::error::RecvError::Lagged(24))
        ));
        let Ok(Live::Changed(next)) = rx.recv().await else {
            panic!("the newest updates are still there");
        };
        assert_eq!(next.subject, "bat_24");
    }
}

//! Publishing outbox events, and the relay that drains the outbox into a publisher.
//!
//! The in-process bus is the embedded backend: subscribers in this process (the worker's
//! wake-up) hear about events right after their transaction commits. A broker backend
//! plugs into [`Publisher`] beside it.

use std::sync::Arc;
use std::time::Duration;

use dataflow_contracts::events::Envelope;
use tokio::sync::{Notify, broadcast};
use tokio_util::sync::CancellationToken;

use crate::db::{Db, OutboxRow};
use crate::{Error, Result};

/// Where relayed events go.
#[derive(Clone)]
pub enum Publisher {
    InProcess(broadcast::Sender<Arc<Envelope>>),
}

impl Publisher {
    pub fn in_process() -> Self {
        Publisher::InProcess(broadcast::channel(1024).0)
    }

    /// Listen to events published from now on (in-process bus only).
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Envelope>> {
        match self {
            Publisher::InProcess(tx) => tx.subscribe(),
        }
    }

    async fn publish(&self, rows: &[OutboxRow]) -> Result<()> {
        match self {
            Publisher::InProcess(tx) => {
                for row in rows {
                    let env: Envelope = serde_json::from_str(&row.body)
                        .map_err(|e| Error::Invalid(format!("outbox row {}: {e}", row.id)))?;
                    // No subscriber is not an error: the event is still recorded in SQL.
                    let _ = tx.send(Arc::new(env));
                }
                Ok(())
            }
        }
    }
}

/// Relay settings, from [`crate::config::OutboxConfig`].
#[derive(Debug, Clone, Copy)]
pub struct RelaySettings {
    pub poll_interval: Duration,
    pub retention: Duration,
    pub batch_size: u32,
}

/// Publishes outbox rows in id order and marks them published after the publisher accepted
/// them. Woken by `wake` right after commits; polls as a safety net; prunes old rows.
pub async fn run_relay(
    db: Db,
    publisher: Publisher,
    wake: Arc<Notify>,
    settings: RelaySettings,
    shutdown: CancellationToken,
) {
    let mut last_prune = tokio::time::Instant::now();
    loop {
        match relay_once(&db, &publisher, settings.batch_size).await {
            Ok(n) if n == settings.batch_size as usize => continue,
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "outbox relay round failed; retrying"),
        }
        if last_prune.elapsed() > Duration::from_secs(60) {
            last_prune = tokio::time::Instant::now();
            let retention = i64::try_from(settings.retention.as_millis()).unwrap_or(i64::MAX);
            if let Err(e) = db.prune_published(retention).await {
                tracing::warn!(error = %e, "outbox prune failed");
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = wake.notified() => {}
            _ = tokio::time::sleep(settings.poll_interval) => {}
        }
    }
    // A last round so events committed just before shutdown are not left for the next start.
    if let Err(e) = relay_once(&db, &publisher, settings.batch_size).await {
        tracing::warn!(error = %e, "final outbox relay round failed");
    }
}

/// One round: publish up to `limit` rows; returns how many.
pub async fn relay_once(db: &Db, publisher: &Publisher, limit: u32) -> Result<usize> {
    let rows = db.unpublished_events(limit).await?;
    let (Some(first), Some(last)) = (rows.first(), rows.last()) else {
        return Ok(0);
    };
    publisher.publish(&rows).await?;
    db.mark_published(first.id, last.id).await?;
    Ok(rows.len())
}

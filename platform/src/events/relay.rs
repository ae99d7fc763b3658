//! The relay loop: a round after each commit's wake-up (and on a poll interval as a safety
//! net), under the relay lease when a broker is in use, with pruning of published rows and
//! the backlog gauge on the side.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Publisher, confirms};
use crate::Result;
use crate::ledger::Db;
use crate::ledger::leases::OUTBOX_RELAY;

/// Relay settings, from [`crate::config::OutboxConfig`] and [`crate::config::AmqpConfig`].
#[derive(Debug, Clone, Copy)]
pub struct OutboxRelaySettings {
    pub poll_interval: Duration,
    pub retention: Duration,
    pub batch_size: u32,
    /// With a broker: how long the relay lease lasts (renewed at a third of it).
    pub lease: Duration,
}

/// The relay lease, as this relay sees it.
struct RelayLease {
    owner: String,
    held_until: Option<Instant>,
    /// Standing by: another relay held the lease; ask again after this.
    retry_at: Option<Instant>,
    lease: Duration,
}

impl RelayLease {
    /// Whether this relay may publish now, renewing the lease when a third of it is used.
    async fn hold(&mut self, db: &Db) -> Result<bool> {
        let now = Instant::now();
        if self
            .held_until
            .is_some_and(|until| until.saturating_duration_since(now) > self.lease * 2 / 3)
        {
            return Ok(true);
        }
        // A standby asks at a third of the lease, not on every wake-up: the ledger need not
        // take a write per commit from every process.
        if self.retry_at.is_some_and(|at| now < at) {
            return Ok(false);
        }
        let ms = i64::try_from(self.lease.as_millis()).unwrap_or(i64::MAX);
        let taken = db.take_lease(OUTBOX_RELAY, &self.owner, ms).await?;
        if taken && self.held_until.is_none() {
            tracing::info!(owner = %self.owner, "this process relays the outbox");
        }
        self.held_until = taken.then_some(now + self.lease);
        self.retry_at = (!taken).then_some(now + self.lease / 3);
        Ok(taken)
    }
}

/// How often the relay counts the outbox backlog (the `dataflow_outbox_backlog` gauge).
const BACKLOG_EVERY: Duration = Duration::from_secs(1);

/// Publishes outbox rows in id order and marks them published after the publisher accepted
/// them. Woken by `wake` right after commits; polls as a safety net; prunes old rows.
pub async fn run_relay(
    db: Db,
    publisher: Publisher,
    wake: Arc<Notify>,
    settings: OutboxRelaySettings,
    shutdown: CancellationToken,
) {
    let mut lease = matches!(publisher, Publisher::Broker { .. }).then(|| RelayLease {
        owner: format!("relay-{}", ulid::Ulid::new()),
        held_until: None,
        retry_at: None,
        lease: settings.lease,
    });
    let mut last_prune = Instant::now();
    let mut failing = false;
    let mut counted: Option<Instant> = None;
    loop {
        match relay_round(
            &db,
            &publisher,
            lease.as_mut(),
            settings.batch_size,
            Some(&wake),
        )
        .await
        {
            Ok(n) => {
                if failing {
                    tracing::info!("outbox relay publishing again");
                    failing = false;
                }
                // A full round may have left more behind (or stopped at its deadline).
                if n >= settings.batch_size as usize {
                    continue;
                }
            }
            Err(e) => {
                // Once per outage: the backlog metric and /readyz tell the rest.
                if !failing {
                    tracing::warn!(error = %e, "outbox relay round failed; retrying");
                }
                failing = true;
            }
        }
        if last_prune.elapsed() > Duration::from_secs(60) {
            last_prune = Instant::now();
            let retention = i64::try_from(settings.retention.as_millis()).unwrap_or(i64::MAX);
            if let Err(e) = db.prune_published(retention).await {
                tracing::warn!(error = %e, "outbox prune failed");
            }
        }
        // Counted at most once a second, not after every round: under load that would be a
        // statement per batch between a commit's wake-up and the next read (and a relay
        // without the lease finds nothing on each of the wake-ups it gets).
        if counted.is_none_or(|at| at.elapsed() >= BACKLOG_EVERY) {
            counted = Some(Instant::now());
            if let Ok(backlog) = db.outbox_backlog().await {
                metrics::gauge!("dataflow_outbox_backlog").set(backlog as f64);
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = wake.notified() => {}
            _ = tokio::time::sleep(settings.poll_interval) => {}
        }
    }
    // A last round so events committed just before shutdown are not left for the next start.
    if let Err(e) = relay_round(&db, &publisher, lease.as_mut(), settings.batch_size, None).await {
        tracing::warn!(error = %e, "final outbox relay round failed");
    }
    if let Some(l) = &lease
        && l.held_until.is_some()
        && let Err(e) = db.release_lease(OUTBOX_RELAY, &l.owner).await
    {
        tracing::warn!(error = %e, "could not hand the relay lease back");
    }
}

async fn relay_round(
    db: &Db,
    publisher: &Publisher,
    lease: Option<&mut RelayLease>,
    limit: u32,
    wake: Option<&Notify>,
) -> Result<usize> {
    // Rows are handed to this relay at commit only while it publishes them (`Fresh`).
    let fresh = db.commits().fresh();
    if let Publisher::Broker { broker, .. } = publisher
        && !broker.is_connected()
    {
        // The rows wait in SQL; the link supervisor reports the outage, `/readyz` the backlog.
        fresh.open(false);
        return Ok(0);
    }
    let mut lease_end = None;
    if let Some(lease) = lease {
        let held = lease.hold(db).await;
        if !matches!(held, Ok(true)) {
            // Another process's relay publishes; this one stands by.
            fresh.open(false);
            return held.map(|_| 0);
        }
        fresh.open(true);
        lease_end = lease.held_until;
    }
    let relayed = relay_until(db, publisher, limit, lease_end, wake).await;
    if relayed.is_err() {
        fresh.open(false);
    }
    relayed
}

/// One round: relays what is in the outbox (with a broker: until it is drained, `limit`
/// rows per read; in process: up to `limit` rows); returns how many were published.
pub async fn relay_once(db: &Db, publisher: &Publisher, limit: u32) -> Result<usize> {
    relay_until(db, publisher, limit, None, None).await
}

async fn relay_until(
    db: &Db,
    publisher: &Publisher,
    limit: u32,
    lease_end: Option<Instant>,
    wake: Option<&Notify>,
) -> Result<usize> {
    let done = match publisher {
        Publisher::InProcess(_) => {
            let rows = db.unpublished_events(limit, &[]).await?;
            publisher.notify_local(&rows);
            let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
            db.mark_published(&ids).await?;
            rows.len()
        }
        Publisher::Broker { broker, .. } => {
            confirms::relay(broker, db, limit, lease_end, wake, &|rows| {
                publisher.notify_local(rows)
            })
            .await?
        }
    };
    metrics::counter!("dataflow_outbox_published_total").increment(done as u64);
    Ok(done)
}

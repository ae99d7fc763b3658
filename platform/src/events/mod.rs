//! Publishing outbox events: the [`Publisher`] (in process, or RabbitMQ with in-process
//! listeners beside it) and the [`relay`] that drains the outbox into it.
//!
//! The in-process bus is the embedded backend: subscribers in this process (the worker's
//! wake-up, the job relay's) hear about events right after their transaction commits. With
//! a broker the relay publishes to RabbitMQ with confirms and, after each ack, tells the
//! in-process subscribers too, so they keep working unchanged.
//!
//! Ordering and duplicates with several processes: with a broker, one relay publishes at a
//! time, under a lease in SQL (`leases`, `outbox-relay`), publishes nothing once its lease
//! ended (even mid-round), and stops at the first row the broker did not ack, so the events
//! of one batch leave in commit order. (Rows of one batch commit in id order: each is written
//! after its transaction updated the batch row, which serialises them.) A row is marked
//! published only after its ack, by its own id. A duplicate is published only when a relay
//! dies, or stalls past its lease, between a publish and its mark;
//! consumers deduplicate by event id or, for `BatchReady`, by the fenced claim. The
//! in-process bus needs no lease: it only wakes this process's own tasks.

mod confirms;
mod relay;

pub use relay::{OutboxRelaySettings, relay_once, run_relay};

use std::sync::Arc;

use dataflow_contracts::events::Envelope;
use tokio::sync::broadcast;

use crate::broker::Broker;
use crate::ledger::OutboxRow;

/// How batches reach workers right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// No broker configured: in-process wake-ups and SQL polling.
    Embedded,
    /// The broker is connected: `BatchReady` wakes workers; SQL is swept rarely.
    Broker,
    /// A broker is configured but unreachable: workers poll SQL at the short interval.
    Polling,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Embedded => "embedded",
            Mode::Broker => "broker",
            Mode::Polling => "polling",
        }
    }

    /// Sets the `dataflow_events_mode{mode}` gauge: 1 for this mode, 0 for the others.
    pub fn record(self) {
        for m in [Mode::Embedded, Mode::Broker, Mode::Polling] {
            metrics::gauge!("dataflow_events_mode", "mode" => m.as_str()).set(if m == self {
                1.0
            } else {
                0.0
            });
        }
    }
}

/// Where relayed events go.
#[derive(Clone)]
pub enum Publisher {
    InProcess(broadcast::Sender<Arc<Envelope>>),
    /// RabbitMQ first; in-process subscribers hear each event once it is acked and marked.
    Broker {
        broker: Arc<Broker>,
        local: broadcast::Sender<Arc<Envelope>>,
    },
}

impl Publisher {
    pub fn in_process() -> Self {
        Publisher::InProcess(broadcast::channel(1024).0)
    }

    pub fn broker(broker: Arc<Broker>) -> Self {
        Publisher::Broker {
            broker,
            local: broadcast::channel(1024).0,
        }
    }

    /// Listen to events relayed by this process from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Envelope>> {
        self.local().subscribe()
    }

    fn local(&self) -> &broadcast::Sender<Arc<Envelope>> {
        match self {
            Publisher::InProcess(tx) | Publisher::Broker { local: tx, .. } => tx,
        }
    }

    /// Tells this process's subscribers about relayed rows.
    pub(super) fn notify_local(&self, rows: &[OutboxRow]) {
        let local = self.local();
        // Parsing is only worth it for a listener (the relay may run without any).
        if local.receiver_count() == 0 {
            return;
        }
        for row in rows {
            match serde_json::from_str::<Envelope>(&row.body) {
                // No subscriber left is not an error: the event is still recorded in SQL.
                Ok(env) => {
                    let _ = local.send(Arc::new(env));
                }
                Err(e) => tracing::warn!(id = row.id, error = %e, "outbox row is not an envelope"),
            }
        }
    }
}

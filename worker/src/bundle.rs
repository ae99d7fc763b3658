//! Bundles: the small batches one claim took together ([`Bundle`]), each prepared as one
//! chunk and all completed in one ledger transaction, each under its own fence with its
//! own counts, event and jobs ([`Db::complete_bundle`]).
//!
//! Anything that is not the plain case leaves the bundle and is processed alone, the way
//! a batch claimed alone is: a batch whose file turns out longer than one chunk, one that
//! is refused for its errors, one whose file cannot be read, a poison batch, and, when the
//! shared commit fails (a lease lost, say), every batch of it. So a failure of one batch
//! stays that batch's, and every path it can take is the single batch's path.
//!
//! [`Bundle`]: dataflow_platform::ledger::Bundle
//! [`Db::complete_bundle`]: dataflow_platform::ledger::Db::complete_bundle

use std::sync::atomic::Ordering;

use dataflow_contracts::live::LiveKind;
use dataflow_platform::domain::prepare::Chunk;
use dataflow_platform::ledger::{Completing, Lease};
use dataflow_platform::traces;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::budget::Budget;
use crate::chunks::Handed;
use crate::{Outcome, Worker, record_outcome};

/// Files read and prepared at once while a bundle is gathered: enough to overlap their
/// ledger reads, few enough to leave the pool's connections to the rest of the process.
const PREPARED_AT_ONCE: usize = 4;

impl Worker {
    /// Processes what one claim took: a batch alone, or a bundle. Their outcomes, in no
    /// particular order.
    pub async fn process_all(
        &self,
        leases: Vec<Lease>,
        release: &CancellationToken,
    ) -> Vec<Outcome> {
        self.process_all_in_room(leases, &self.budget, release)
            .await
    }

    /// [`Worker::process_all`], the records taking their room in `room`: the open slots'
    /// or the reserved ones'.
    pub(crate) async fn process_all_in_room(
        &self,
        leases: Vec<Lease>,
        room: &Budget,
        release: &CancellationToken,
    ) -> Vec<Outcome> {
        let alone = if leases.len() > 1 {
            let (worker, room) = (self.clone(), room.clone());
            let bundle = leases.clone();
            // One commit for the bundle: its span continues the first member's trace, and
            // each member's completion is a span of its own import's trace inside it.
            let span = tracing::info_span!("bundle", batches = bundle.len());
            traces::follow(&span, bundle[0].traceparent.as_deref());
            let together =
                async move { worker.complete_together(bundle, &room).await }.instrument(span);
            // A panic in the shared part ends it, not the worker: every batch goes alone.
            match tokio::spawn(together).await {
                Ok(left) => left,
                Err(e) => {
                    tracing::error!(error = %e, "a bundle's shared commit panicked; its batches go one at a time");
                    leases
                }
            }
        } else {
            leases
        };
        let mut outcomes = Vec::with_capacity(alone.len());
        for lease in alone {
            outcomes.push(self.process_in_room(lease, room, release).await);
        }
        outcomes
    }

    /// Completes in one commit the members whose file is a single chunk; the members left
    /// to process alone.
    async fn complete_together(&self, leases: Vec<Lease>, room: &Budget) -> Vec<Lease> {
        // The room of all the members at once: a bundle that took it member by member
        // could wait for room that other bundles hold while they wait for its own.
        // A member's records before its checkpoint are read too.
        let records = leases.iter().map(|l| l.records_total).sum();
        let budget = match leases.first() {
            // A bundle is one client's batches.
            Some(first) => room.for_client(&first.client_id),
            None => return leases,
        };
        let _room = budget.room(records).await;
        let prepared: Vec<(Lease, Option<Option<Chunk>>)> = futures::stream::iter(leases)
            .map(async |lease| {
                let whole = self.whole(&lease).await;
                (lease, whole)
            })
            .buffered(PREPARED_AT_ONCE)
            .collect()
            .await;
        let mut alone = Vec::new();
        let mut together = Vec::new();
        for (lease, whole) in prepared {
            match whole {
                Some(chunk) => together.push((lease, chunk)),
                None => alone.push(lease),
            }
        }
        if together.is_empty() {
            return alone;
        }
        let claimed = std::time::Instant::now();
        for (lease, _) in &together {
            self.live
                .publish(LiveKind::BatchProcessing, lease.batch_id.as_str());
        }
        // Each member's completion in its own import's trace, as a batch alone has it.
        let spans: Vec<tracing::Span> = together
            .iter()
            .map(|(lease, _)| {
                let span = tracing::info_span!(
                    "complete",
                    batch_id = %lease.batch_id,
                    otel.status_code = tracing::field::Empty,
                );
                traces::follow(&span, lease.traceparent.as_deref());
                span
            })
            .collect();
        let members: Vec<Completing<'_>> = together
            .iter()
            .zip(&spans)
            .map(|((lease, chunk), span)| Completing {
                lease,
                chunk: chunk.as_ref(),
                traceparent: traces::of(span),
            })
            .collect();
        match self.db.complete_bundle(&members).await {
            Ok(done) => {
                metrics::histogram!("dataflow_bundle_size").record(members.len() as f64);
                self.stats
                    .bundled
                    .fetch_add(members.len() as u64, Ordering::Relaxed);
                for (((lease, _), done), span) in together.iter().zip(done).zip(&spans) {
                    if lease.attempts == 1 && !lease.took_over {
                        metrics::histogram!("dataflow_batch_enqueue_to_start_seconds")
                            .record(lease.waited_ms as f64 / 1000.0);
                    }
                    self.stats.completed.fetch_add(1, Ordering::Relaxed);
                    // The log line names the member's own trace.
                    span.in_scope(|| {
                        tracing::info!(
                            batch_id = %lease.batch_id,
                            records = done.records_total,
                            failed = done.records_failed,
                            bundled = members.len(),
                            "batch completed"
                        );
                    });
                    self.unlock(lease).await;
                    let outcome = Outcome::Completed(done);
                    record_outcome(&outcome, lease, claimed);
                    self.announce(lease, &outcome);
                }
            }
            Err(e) => {
                // The member's trace shows this attempt failed; its completion alone follows.
                for span in &spans {
                    span.record("otel.status_code", "ERROR");
                }
                tracing::info!(error = %e, batches = members.len(), "a bundle's shared commit failed; its batches commit one at a time");
                alone.extend(together.into_iter().map(|(lease, _)| lease));
            }
        }
        alone
    }

    /// The batch's records as its one and only chunk (`Some(None)`: it has none left);
    /// `None` when it must be processed alone.
    async fn whole(&self, lease: &Lease) -> Option<Option<Chunk>> {
        if lease.takeovers > self.config.max_takeovers {
            return None;
        }
        let mut run = self.start_in(lease.clone(), Budget::Taken).await.ok()?;
        match self.next_chunk(&run.lease, &mut run.chunks).await.ok()? {
            None => Some(None),
            Some(Handed::Chunk {
                chunk, last: true, ..
            }) => Some(Some(chunk)),
            Some(Handed::Chunk { .. } | Handed::Refused { .. }) => None,
        }
    }
}

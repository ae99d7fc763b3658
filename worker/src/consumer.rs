//! The `batch.ready` consumer: RabbitMQ delivers, the SQL lease decides.
//!
//! Each delivery is parsed as an [`Envelope`]; anything that is not a `BatchReady` this
//! code understands is rejected without requeue, so the queue's dead-letter exchange moves
//! it to the dead-letter queue (with a warning and `dataflow_amqp_malformed_total`). A valid
//! one wakes the worker's own claim (the fair share's next batch, under each client's cap;
//! Redlock, then the fenced SQL lease), which need not take the batch it names: another
//! client's turn may come first, or the named batch's client may be at its cap. It is
//! acknowledged once a lease is taken, or once the claim found nothing it may take yet:
//! either way SQL now owns the batch's fate (a `ready` batch is found by the claim loop,
//! which looks again whenever a batch ends), and a redelivery would only be a duplicate or
//! jump the fair share's queue. A `BatchReady` for a batch this ledger does not know, or one that could not
//! be claimed because the ledger failed, is requeued; the quorum queue's `x-delivery-limit`
//! dead-letters it after a bounded number of deliveries, and meanwhile SQL polling still
//! finds every real batch.
//!
//! Each delivery is claimed only when a worker slot is free, and the prefetch is at most
//! the worker's concurrency, so a busy worker leaves messages to others.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use dataflow_contracts::events::{ENVELOPE_VERSION, Envelope, Event};
use dataflow_platform::broker::Broker;
use dataflow_platform::traces;
use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use lapin::types::AMQPValue;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::{BatchClaim, Worker};

/// Consumes `batch.ready` until `shutdown`, reopening the consumer after every lost link.
pub async fn run(worker: Worker, broker: Arc<Broker>, shutdown: CancellationToken) {
    let prefetch = broker
        .config()
        .prefetch
        .min(u16::try_from(worker.config.concurrency).unwrap_or(u16::MAX));
    let tag = format!("dataflow-{}", worker.id());
    loop {
        let (channel, mut deliveries) = match broker.consume_ready(prefetch, &tag, &shutdown).await
        {
            None => return,
            Some(Ok(opened)) => opened,
            Some(Err(e)) => {
                tracing::warn!(error = %e, "cannot consume batch.ready; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(broker.config().reconnect_min_ms)) => continue,
                }
            }
        };
        tracing::info!(queue = %broker.names().ready_queue, prefetch, "consuming batch.ready");
        // Deliveries are handled side by side (at most `prefetch` are unacked), so one claim
        // waiting for the ledger does not hold back the next batch's.
        let mut handling = tokio::task::JoinSet::new();
        loop {
            let next = tokio::select! {
                _ = shutdown.cancelled() => {
                    // Claims under way end first (none starts after shutdown); then unacked
                    // deliveries go back to the queue for other workers.
                    while handling.join_next().await.is_some() {}
                    let _ = channel.close(200, "shutdown".into()).await;
                    return;
                }
                Some(_) = handling.join_next() => continue,
                d = deliveries.next() => d,
            };
            match next {
                Some(Ok(delivery)) => {
                    let (worker, shutdown) = (worker.clone(), shutdown.clone());
                    let span = delivery_span(&broker.names().ready_queue, &delivery);
                    handling.spawn(
                        async move { handle(&worker, delivery, &shutdown).await }.instrument(span),
                    );
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "batch.ready consumer failed; reopening");
                    break;
                }
                None => {
                    tracing::warn!("batch.ready consumer was cancelled; reopening");
                    break;
                }
            }
        }
        // A claim cut off halfway would leave its batch leased to no one until the lease
        // expires: let the handlers end on their own (their acks fail with the channel, and
        // the broker redelivers to a claim that finds the batch taken).
        handling.detach_all();
        // The supervisor notices a lost connection within a tick; wait for its new link.
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(broker.config().reconnect_min_ms)) => {}
        }
    }
}

/// What to tell the broker about one delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Ack,
    /// Deliver again (counted against the delivery limit).
    Requeue,
    /// To the dead-letter queue now.
    DeadLetter,
}

/// The consumer span of one delivery (OpenTelemetry messaging conventions), continuing the
/// trace of the publish that sent it (the message's `traceparent` header).
fn delivery_span(queue: &str, delivery: &Delivery) -> tracing::Span {
    let span = tracing::info_span!(
        "amqp.process",
        otel.name = %format_args!("process {queue}"),
        otel.kind = "consumer",
        "messaging.system" = "rabbitmq",
        "messaging.operation.type" = "process",
        "messaging.destination.name" = queue,
        "messaging.rabbitmq.destination.routing_key" = delivery.routing_key.as_str(),
        "messaging.message.id" = delivery.properties.message_id().as_ref().map(|id| id.as_str()),
        delivery_tag = delivery.delivery_tag,
        redelivered = delivery.redelivered,
    );
    let traceparent = delivery.properties.headers().as_ref().and_then(|headers| {
        match headers.inner().get(traces::TRACEPARENT) {
            Some(AMQPValue::LongString(value)) => std::str::from_utf8(value.as_bytes()).ok(),
            _ => None,
        }
    });
    traces::follow(&span, traceparent);
    span
}

async fn handle(worker: &Worker, delivery: Delivery, shutdown: &CancellationToken) {
    let verdict = match ready_batch(&delivery.data) {
        Err(why) => {
            metrics::counter!("dataflow_amqp_malformed_total").increment(1);
            tracing::warn!(
                why,
                bytes = delivery.data.len(),
                "malformed batch.ready message; dead-lettered"
            );
            Verdict::DeadLetter
        }
        Ok(env) => {
            let Some(slot) = worker.slot(shutdown).await else {
                // Shutting down: the broker redelivers it to another worker.
                return;
            };
            // The claim takes the fair share's next batch, which need not be this one: the
            // batch it took continues its own trace when it is processed.
            let claim = tracing::info_span!("claim", batch_id = %env.batch_id);
            match worker
                .claim_delivered(&env.batch_id, &slot)
                .instrument(claim)
                .await
            {
                Ok(BatchClaim::Taken(leases)) => {
                    worker.stats.delivery_claims.fetch_add(1, Ordering::Relaxed);
                    worker.spawn_process(leases, slot);
                    Verdict::Ack
                }
                Ok(BatchClaim::Held | BatchClaim::NotClaimable) => Verdict::Ack,
                Ok(BatchClaim::Unknown) => {
                    tracing::warn!(batch_id = %env.batch_id, "batch.ready names no batch of this ledger; requeued");
                    Verdict::Requeue
                }
                Err(e) => {
                    tracing::warn!(batch_id = %env.batch_id, error = %e, "claim failed; requeued");
                    Verdict::Requeue
                }
            }
        }
    };
    let settled = match verdict {
        Verdict::Ack => delivery.acker.ack(BasicAckOptions::default()).await,
        Verdict::Requeue | Verdict::DeadLetter => {
            let requeue = verdict == Verdict::Requeue;
            let options = BasicNackOptions {
                requeue,
                multiple: false,
            };
            delivery.acker.nack(options).await
        }
    };
    worker.stats.deliveries.fetch_add(1, Ordering::Relaxed);
    if let Err(e) = settled {
        // The broker redelivers it; the claim path makes the repeat harmless.
        tracing::warn!(error = %e, ?verdict, "could not settle a batch.ready delivery");
    }
}

/// The envelope, if the bytes are a `BatchReady` of a version this code reads.
fn ready_batch(data: &[u8]) -> Result<Envelope, &'static str> {
    let env: Envelope = serde_json::from_slice(data).map_err(|_| "not an event envelope")?;
    if env.version != ENVELOPE_VERSION {
        return Err("unknown envelope version");
    }
    match env.event {
        Event::BatchReady(_) => Ok(env),
        _ => Err("not a BatchReady event"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dataflow_contracts::events::BatchReady;
    use dataflow_contracts::{BatchId, ClientId, ImportId};

    #[test]
    fn only_current_batch_ready_envelopes_are_accepted() {
        let ready = Envelope::new(
            BatchId::generate(),
            ClientId::generate(),
            0,
            Event::BatchReady(BatchReady {
                import_id: ImportId::generate(),
            }),
        );
        let json = serde_json::to_vec(&ready).expect("serialize");
        assert_eq!(ready_batch(&json).expect("accepted"), ready);
        assert!(ready_batch(b"{not json").is_err());
        let mut future = ready.clone();
        future.version = ENVELOPE_VERSION + 1;
        assert!(ready_batch(&serde_json::to_vec(&future).expect("serialize")).is_err());
        let rejected = Envelope {
            event: Event::BatchRejected(dataflow_contracts::events::BatchRejected {
                reason: "r".into(),
                code: None,
            }),
            ..ready
        };
        assert!(ready_batch(&serde_json::to_vec(&rejected).expect("serialize")).is_err());
    }
}

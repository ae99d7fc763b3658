//! Publishing with confirms: a [`Sender`] on the current link queues a [`Message`] and hands
//! back a [`Pending`] publish that resolves when the broker acks it, within the configured
//! confirm timeout.
//!
//! Returns: every publish is `mandatory`. A returned `batch.ready` (no queue bound: the
//! topology was lost) comes back to the caller as [`Returned`], which must retry it once
//! the topology is declared again. Other routing keys have no queue of DataFlow's own;
//! their return means "no subscriber today" and is only counted.

use std::sync::Arc;
use std::time::Duration;

use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation, PublisherConfirm};
use tokio::time::Instant;

use super::topology::READY_KEY;
use super::{Broker, Link};
use crate::{Error, Result, traces};

/// One event as it goes on the wire.
#[derive(Debug, Clone, Copy)]
pub struct Message<'a> {
    /// The event id: the message id consumers deduplicate by.
    pub id: &'a str,
    /// The event type.
    pub kind: &'a str,
    pub routing_key: &'a str,
    /// The JSON envelope.
    pub body: &'a str,
    /// The trace context it travels in (the `traceparent` header), if any.
    pub traceparent: Option<&'a str>,
}

impl Message<'_> {
    /// `mandatory` (an unroutable `batch.ready` comes back rather than vanishing),
    /// persistent, JSON, with the event id as message id and the event type.
    fn options(&self) -> (BasicPublishOptions, BasicProperties) {
        let options = BasicPublishOptions {
            mandatory: true,
            ..Default::default()
        };
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_message_id(self.id.into())
            .with_type(self.kind.into());
        let props = match self.traceparent {
            Some(traceparent) => {
                let mut headers = FieldTable::default();
                headers.insert(
                    traces::TRACEPARENT.into(),
                    AMQPValue::LongString(traceparent.into()),
                );
                props.with_headers(headers)
            }
            None => props,
        };
        (options, props)
    }
}

/// Publishes `message` to `exchange` as a [`Sender`] does. The future owns what it needs,
/// so it can be kept and awaited later: its first poll queues the frames.
pub fn publish(
    channel: &Channel,
    exchange: &str,
    message: Message<'_>,
) -> impl Future<Output = lapin::Result<PublisherConfirm>> + Send + Sync + 'static {
    let (options, props) = message.options();
    let (channel, exchange) = (channel.clone(), exchange.to_owned());
    let (key, body) = (message.routing_key.to_owned(), message.body.to_owned());
    async move {
        channel
            .basic_publish(exchange.into(), key.into(), options, body.as_bytes(), props)
            .await
    }
}

/// Publishing on one link. Taken from [`Broker::sender`]; when the link fails, a new sender
/// is taken from the next one.
pub struct Sender<'a> {
    broker: &'a Broker,
    link: Arc<Link>,
}

impl Broker {
    /// A sender on the current link, or an error while the broker is unreachable.
    pub fn sender(&self) -> Result<Sender<'_>> {
        match self.link.borrow().clone() {
            Some(link) => Ok(Sender { broker: self, link }),
            None => Err(Error::Broker {
                context: "not connected".into(),
                source: None,
            }),
        }
    }
}

impl Sender<'_> {
    /// How many publishes may await their confirms at once.
    pub fn window(&self) -> usize {
        self.broker.config.confirm_window
    }

    /// How long a publish may wait for its confirm.
    pub fn confirm_timeout(&self) -> Duration {
        Duration::from_millis(self.broker.config.confirm_timeout_ms)
    }

    /// Queues `message`'s publish on the link without waiting for lapin to write it.
    ///
    /// lapin's `basic_publish` resolves only once its connection thread has written the
    /// frames, a round trip between threads for every message; awaited one by one, that
    /// wait, not the broker, sets the pace of a sender once the broker is fast. The frames
    /// are queued, and the delivery tag taken, at the future's first poll (lapin 4.12 awaits
    /// nothing before it), so polling each publish once here, in the caller's order, keeps
    /// that order on the wire; the write is awaited later, just before its confirm. A lapin
    /// that awaited first would reorder messages, which the test relaying a backlog through
    /// a small confirm window checks.
    ///
    /// A message with a trace context is published in a producer span of that trace, which
    /// lasts until the broker's confirm, and travels with the span's own context.
    pub async fn send(&self, message: Message<'_>) -> Result<Pending> {
        let exchange = &self.broker.names.exchange;
        let span = publish_span(exchange, &message);
        let carried = traces::of(&span);
        let message = Message {
            traceparent: carried.as_deref().or(message.traceparent),
            ..message
        };
        let mut write: Write = Box::pin(publish(&self.link.publisher, exchange, message));
        let stage = match futures::poll!(write.as_mut()) {
            std::task::Poll::Pending => Stage::Writing(write),
            std::task::Poll::Ready(Ok(confirm)) => Stage::Confirming(confirm),
            std::task::Poll::Ready(Err(e)) => {
                return Err(Error::broker(format!("publishing event {}", message.id), e));
            }
        };
        Ok(Pending {
            deadline: Instant::now() + self.confirm_timeout(),
            stage,
            span,
        })
    }

    /// Tells the supervisor that this link is in doubt (a publish was refused or not
    /// confirmed): it starts over on a fresh link, which also declares the topology again.
    pub fn broken(&self) {
        self.broker.report_broken(&self.link);
    }
}

/// A publish whose frames lapin has queued but may not have written yet.
type Write = std::pin::Pin<Box<dyn Future<Output = lapin::Result<PublisherConfirm>> + Send + Sync>>;

/// Where a publish in flight is.
enum Stage {
    Writing(Write),
    Confirming(PublisherConfirm),
}

/// The producer span of one publish (OpenTelemetry messaging conventions), continuing the
/// trace its event was written in; none for an event written outside any trace.
fn publish_span(exchange: &str, message: &Message<'_>) -> tracing::Span {
    let Some(traceparent) = message.traceparent else {
        return tracing::Span::none();
    };
    let span = tracing::info_span!(
        "amqp.publish",
        otel.name = %format_args!("publish {exchange}"),
        otel.kind = "producer",
        otel.status_code = tracing::field::Empty,
        "messaging.system" = "rabbitmq",
        "messaging.operation.type" = "publish",
        "messaging.destination.name" = exchange,
        "messaging.rabbitmq.destination.routing_key" = message.routing_key,
        "messaging.message.id" = message.id,
    );
    traces::follow(&span, Some(traceparent));
    span
}

/// A publish awaiting its confirm; its span (if traced) ends when it is dropped.
pub struct Pending {
    deadline: Instant,
    stage: Stage,
    span: tracing::Span,
}

/// Why a publish did not count.
#[derive(Debug, thiserror::Error)]
pub enum Unconfirmed {
    #[error("no confirm within the timeout")]
    TimedOut,
    #[error("nacked by the broker")]
    Nacked,
    #[error("the link failed: {0}")]
    Link(#[source] lapin::Error),
}

/// A `batch.ready` the broker returned unroutable. lapin hands a returned message to
/// whichever confirm it resolves next, not necessarily the returned publish's own, so the
/// return names its own message: the caller finds it by id.
#[derive(Debug)]
pub struct Returned {
    pub id: String,
}

impl Pending {
    /// The broker's answer: `Ok(None)` once acked, `Ok(Some(_))` when the ack came with a
    /// returned `batch.ready` (of this publish or an earlier one). Cancel-safe: a write that
    /// finished is kept as its confirm.
    pub async fn confirmed(&mut self) -> std::result::Result<Option<Returned>, Unconfirmed> {
        let answer = tokio::time::timeout_at(self.deadline, self.confirmation()).await;
        let returned = match answer {
            Err(_) => return Err(self.failed(Unconfirmed::TimedOut)),
            Ok(Err(e)) => return Err(self.failed(Unconfirmed::Link(e))),
            Ok(Ok(Confirmation::Nack(_))) => return Err(self.failed(Unconfirmed::Nacked)),
            Ok(Ok(Confirmation::Ack(returned))) => returned,
            Ok(Ok(Confirmation::NotRequested)) => None,
        };
        let Some(ret) = returned else {
            return Ok(None);
        };
        let key = ret.delivery.routing_key.as_str();
        if key != READY_KEY {
            unroutable(key);
            return Ok(None);
        }
        let id = ret.delivery.properties.message_id().clone();
        Ok(Some(Returned {
            id: id.map(|id| id.to_string()).unwrap_or_default(),
        }))
    }

    /// Marks the span failed, with why.
    fn failed(&self, why: Unconfirmed) -> Unconfirmed {
        self.span.record("otel.status_code", "ERROR");
        why
    }

    async fn confirmation(&mut self) -> lapin::Result<Confirmation> {
        loop {
            match &mut self.stage {
                Stage::Writing(write) => self.stage = Stage::Confirming(write.await?),
                Stage::Confirming(confirm) => return confirm.await,
            }
        }
    }
}

/// How often one unroutable routing key is logged.
const UNROUTABLE_LOG_EVERY: Duration = Duration::from_secs(60);

/// Counts a returned event of a routing key nobody binds, and logs the key once per
/// [`UNROUTABLE_LOG_EVERY`]: such a key returns every one of its events, and a line each
/// would bury everything else in the log.
fn unroutable(key: &str) {
    static LOGGED: std::sync::LazyLock<std::sync::Mutex<LogThrottle>> =
        std::sync::LazyLock::new(|| std::sync::Mutex::new(LogThrottle::new(UNROUTABLE_LOG_EVERY)));
    metrics::counter!("dataflow_amqp_unroutable_total", "routing_key" => key.to_owned())
        .increment(1);
    let due = LOGGED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .due(key, Instant::now());
    if due {
        tracing::info!(
            routing_key = key,
            "events of this routing key are unroutable (no queue is bound to it); each is \
             counted in dataflow_amqp_unroutable_total and the key logged once a minute"
        );
    }
}

/// Which keys may be logged again: each at most once per interval. The keys are routing
/// keys, a handful, so the map stays small.
struct LogThrottle {
    every: Duration,
    last: std::collections::HashMap<String, Instant>,
}

impl LogThrottle {
    fn new(every: Duration) -> Self {
        Self {
            every,
            last: std::collections::HashMap::new(),
        }
    }

    fn due(&mut self, key: &str, now: Instant) -> bool {
        match self.last.get_mut(key) {
            Some(at) if now.duration_since(*at) < self.every => false,
            Some(at) => {
                *at = now;
                true
            }
            None => {
                self.last.insert(key.to_owned(), now);
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unroutable_key_is_logged_once_per_interval() {
        let mut t = LogThrottle::new(Duration::from_secs(60));
        let t0 = Instant::now();
        assert!(t.due("batch.created", t0));
        assert!(!t.due("batch.created", t0 + Duration::from_secs(1)));
        assert!(t.due("batch.completed", t0 + Duration::from_secs(1)));
        assert!(!t.due("batch.created", t0 + Duration::from_secs(59)));
        assert!(t.due("batch.created", t0 + Duration::from_secs(60)));
        assert!(!t.due("batch.created", t0 + Duration::from_secs(61)));
    }
}

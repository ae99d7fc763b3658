//! DataFlow's exchanges, queues and bindings: a topic exchange, the `batch.ready` quorum
//! queue with a delivery limit, and a fanout dead-letter exchange with its queue. Declared
//! after every connect, so a broker that lost them gets them back.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, ExchangeKind};

use crate::config::AmqpConfig;

/// The routing key workers consume.
pub const READY_KEY: &str = "batch.ready";

/// Exchange and queue names, with the configured prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    pub exchange: String,
    pub ready_queue: String,
    pub dead_letter_exchange: String,
    pub dead_letter_queue: String,
}

impl Names {
    pub fn new(config: &AmqpConfig) -> Names {
        let p = &config.prefix;
        Names {
            exchange: format!("{p}{}", config.exchange),
            ready_queue: format!("{p}{}", config.ready_queue),
            dead_letter_exchange: format!("{p}{}", config.dead_letter_exchange),
            dead_letter_queue: format!("{p}{}", config.dead_letter_queue),
        }
    }
}

/// Declares the exchanges, queues and bindings (idempotent).
pub(super) async fn declare(ch: &Channel, n: &Names, config: &AmqpConfig) -> lapin::Result<()> {
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.exchange_declare(
        n.exchange.as_str().into(),
        ExchangeKind::Topic,
        durable,
        FieldTable::default(),
    )
    .await?;
    ch.exchange_declare(
        n.dead_letter_exchange.as_str().into(),
        ExchangeKind::Fanout,
        durable,
        FieldTable::default(),
    )
    .await?;
    let queue = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.queue_declare(n.dead_letter_queue.as_str().into(), queue, quorum())
        .await?;
    ch.queue_bind(
        n.dead_letter_queue.as_str().into(),
        n.dead_letter_exchange.as_str().into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    let mut args = quorum();
    args.insert(
        "x-delivery-limit".into(),
        AMQPValue::LongInt(i32::try_from(config.delivery_limit).unwrap_or(i32::MAX)),
    );
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(n.dead_letter_exchange.as_str().into()),
    );
    ch.queue_declare(n.ready_queue.as_str().into(), queue, args)
        .await?;
    ch.queue_bind(
        n.ready_queue.as_str().into(),
        n.exchange.as_str().into(),
        READY_KEY.into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
}

fn quorum() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    args
}

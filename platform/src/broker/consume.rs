//! The consumer side: a channel of its own on the current link, consuming the ready queue.

use lapin::options::{BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Consumer};
use tokio_util::sync::CancellationToken;

use super::Broker;
use crate::{Error, Result};

impl Broker {
    /// Waits for a link, then opens a consumer of the ready queue with `prefetch`
    /// unacknowledged deliveries. `None` on shutdown.
    pub async fn consume_ready(
        &self,
        prefetch: u16,
        tag: &str,
        shutdown: &CancellationToken,
    ) -> Option<Result<(Channel, Consumer)>> {
        let mut link_rx = self.link.subscribe();
        let link = tokio::select! {
            _ = shutdown.cancelled() => return None,
            l = link_rx.wait_for(Option::is_some) => l.ok()?.clone()?,
        };
        let opened = async {
            let ch = link.conn.create_channel().await?;
            ch.basic_qos(prefetch, BasicQosOptions::default()).await?;
            let consumer = ch
                .basic_consume(
                    self.names.ready_queue.as_str().into(),
                    tag.into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            lapin::Result::Ok((ch, consumer))
        }
        .await;
        Some(opened.map_err(|e| {
            self.report_broken(&link);
            Error::broker(
                format!("opening the {} consumer", self.names.ready_queue),
                e,
            )
        }))
    }
}

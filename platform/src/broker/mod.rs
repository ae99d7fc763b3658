//! The RabbitMQ adapter (lapin 4): one supervised connection, the topology, the publisher
//! with pipelined confirms, and the consumer channel of `batch.ready`.
//!
//! Design notes:
//! - lapin's own auto-recovery is off. Its recovery does not resend an unconfirmed publish,
//!   and the outbox already is the retry buffer, so a lost link is simply dropped: the
//!   supervisor ([`Broker::run`]) reconnects with backoff, declares the topology again and
//!   hands out the new link. Until then [`Mode`] says `polling` and workers poll SQL.
//! - Startup never waits for the broker: the process starts in `polling` mode and the
//!   supervisor connects in the background.
//! - A publish counts only when the broker acked it. A `mandatory` publish of `batch.ready`
//!   that the broker returns (no queue bound: the topology was lost) is a failure and is
//!   retried after the topology is declared again. Other routing keys have no queue of
//!   DataFlow's own; their return means "no subscriber today" and is only counted.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer, ExchangeKind};
use lapin::{Confirmation, PublisherConfirm};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{AmqpConfig, Secret};
use crate::events::Mode;
use crate::ledger::{Db, OutboxRow};
use crate::{Error, Result};

/// Connecting, the handshake and declaring the topology must finish within this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

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

/// The connection's event stream.
type Events = std::pin::Pin<Box<dyn futures::Stream<Item = lapin::Event> + Send>>;

/// A live connection and its confirm-mode publishing channel.
struct Link {
    conn: Connection,
    publisher: Channel,
}

pub struct Broker {
    url: Secret,
    config: AmqpConfig,
    names: Names,
    link: watch::Sender<Option<Arc<Link>>>,
    mode: watch::Sender<Mode>,
    /// A user of the link saw it fail before the connection noticed.
    broken: Notify,
}

impl Broker {
    /// A broker handle in `polling` mode; [`Broker::run`] connects it.
    pub fn new(url: Secret, config: AmqpConfig, mode: watch::Sender<Mode>) -> Broker {
        mode.send_replace(Mode::Polling);
        Broker {
            url,
            names: Names::new(&config),
            config,
            link: watch::channel(None).0,
            mode,
            broken: Notify::new(),
        }
    }

    pub fn names(&self) -> &Names {
        &self.names
    }

    pub fn config(&self) -> &AmqpConfig {
        &self.config
    }

    pub fn is_connected(&self) -> bool {
        self.link.borrow().is_some()
    }

    /// Waits until the supervisor has a link up.
    pub async fn connected(&self) {
        // The sender is `self.link`, so the wait cannot end in an error.
        let _ = self.link.subscribe().wait_for(Option::is_some).await;
    }

    /// Keeps a connection up until `shutdown`: connects, declares the topology, watches
    /// the link, and reconnects with exponential backoff after it fails.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let min = Duration::from_millis(self.config.reconnect_min_ms);
        let max = Duration::from_millis(self.config.reconnect_max_ms);
        let mut backoff = min;
        let mut failures = 0u64;
        loop {
            let connected = tokio::select! {
                _ = shutdown.cancelled() => return,
                c = tokio::time::timeout(CONNECT_TIMEOUT, self.connect()) => c,
            };
            match connected {
                Ok(Ok((link, mut events))) => {
                    backoff = min;
                    failures = 0;
                    tracing::info!(exchange = %self.names.exchange, "RabbitMQ connected; events flow through the broker");
                    self.link.send_replace(Some(link.clone()));
                    self.set_mode(Mode::Broker);
                    let reason = self.watch(&link, &mut events, &shutdown).await;
                    self.link.send_replace(None);
                    self.set_mode(Mode::Polling);
                    let closing = link.conn.close(200, "dataflow link closed".into());
                    let _ = tokio::time::timeout(Duration::from_secs(1), closing).await;
                    if shutdown.is_cancelled() {
                        return;
                    }
                    tracing::warn!(%reason, "RabbitMQ link lost; workers poll SQL until it is back");
                }
                Ok(Err(e)) => log_connect_failure(&mut failures, &e.to_string()),
                Err(_) => log_connect_failure(&mut failures, "timed out"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(max);
        }
    }

    fn set_mode(&self, mode: Mode) {
        self.mode.send_replace(mode);
        mode.record();
    }

    async fn connect(&self) -> lapin::Result<(Arc<Link>, Events)> {
        let props = ConnectionProperties::default().with_connection_name("dataflow".into());
        let conn = Connection::connect(self.url.expose(), props).await?;
        // Listen before anything can fail, so no error event is missed.
        let events = conn.events_listener();
        let publisher = conn.create_channel().await?;
        self.declare(&publisher).await?;
        publisher
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok((Arc::new(Link { conn, publisher }), Box::pin(events)))
    }

    /// Declares the exchanges, queues and bindings (idempotent; after every reconnect).
    async fn declare(&self, ch: &Channel) -> lapin::Result<()> {
        let n = &self.names;
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
            AMQPValue::LongInt(i32::try_from(self.config.delivery_limit).unwrap_or(i32::MAX)),
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

    /// Waits until the link fails (or `shutdown`) and says why.
    async fn watch(
        &self,
        link: &Link,
        events: &mut Events,
        shutdown: &CancellationToken,
    ) -> String {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return "shutdown".into(),
                _ = self.broken.notified() => return "a publish or consume failed".into(),
                ev = events.next() => match ev {
                    Some(lapin::Event::Error(e)) => return e.to_string(),
                    Some(other) => tracing::debug!(event = ?other, "RabbitMQ connection event"),
                    None => return "connection events ended".into(),
                },
                _ = tick.tick() => {
                    if !link.conn.status().connected() || !link.publisher.status().connected() {
                        return "connection or channel closed".into();
                    }
                }
            }
        }
    }

    /// Tells the supervisor that `link` failed, unless it was replaced already.
    fn report_broken(&self, link: &Arc<Link>) {
        let current = self.link.borrow().clone();
        if current.is_some_and(|c| Arc::ptr_eq(&c, link)) {
            self.broken.notify_one();
        }
    }

    /// Relays the outbox until it is drained: rows in id order, persistent and `mandatory`,
    /// with up to `confirm_window` confirms in flight across reads (a `wake` from a new
    /// commit starts the next read at once). While a backlog is sent, the page after it is
    /// already being read, and acked rows are marked published by id in a task of their own,
    /// one statement at a time, then handed to `confirmed`: neither a read nor a mark waiting
    /// for the ledger holds back publishing. The first row not acked ends the relay: it and
    /// every row sent after it stay unmarked and are sent again on a fresh link, so a
    /// batch's events keep their order. Under a relay lease that ends at `lease_end`, no
    /// rows are read once the lease no longer covers a confirm's wait, and none is published
    /// once it ended: a successor may be publishing the same rows by then.
    pub async fn relay(
        &self,
        db: &Db,
        limit: u32,
        lease_end: Option<Instant>,
        wake: Option<&Notify>,
        confirmed: &(dyn Fn(&[OutboxRow]) + Sync),
    ) -> Result<usize> {
        let Some(link) = self.link.borrow().clone() else {
            return Err(Error::Broker("not connected".into()));
        };
        let timeout = self.confirm_timeout();
        let until = lease_end.map(|end| end.checked_sub(timeout).unwrap_or_else(Instant::now));
        let mut inflight: VecDeque<InFlight> = VecDeque::new();
        // Acked rows waiting for the next mark (since when), and the mark under way.
        let mut acked: Vec<OutboxRow> = Vec::new();
        let mut acked_since: Option<Instant> = None;
        let mut marking: Option<Marking> = None;
        let mut marked = 0;
        let mut reads = Reads::default();
        let mut read = true;
        // A read put off until then: only handed-over rows came since a recent one.
        let mut read_at: Option<Instant> = None;
        let mut stop = None;
        loop {
            let late = until.is_some_and(|u| Instant::now() >= u);
            if read && !late && stop.is_none() {
                // The first events of batches committed in this process go out before the
                // read, which leaves them out as rows in hand. Not while a backlog is read
                // page by page: a page read ahead does not leave out what is in hand.
                let fresh = db.commits().fresh();
                let ahead = reads.reading_ahead();
                if !ahead {
                    let handed = fresh.take();
                    if !handed.is_empty() {
                        stop = self
                            .send_rows(&link, handed, &mut inflight, &mut acked, lease_end)
                            .await
                            .err();
                    }
                }
                // Nothing this process committed is left to read: the rows of others wait
                // for the next read, at most `READ_EVERY` after the last. (A round that
                // listens for no wake-up, the last one at shutdown, reads at once.)
                let due = Instant::from_std(fresh.read_due());
                read_at = (wake.is_some() && !ahead && due > Instant::now()).then_some(due);
                if read_at.is_some() {
                    read = false;
                } else {
                    if !ahead {
                        fresh.reading();
                    }
                    let in_hand = || {
                        inflight
                            .iter()
                            .map(|f| &f.row)
                            .chain(&acked)
                            .chain(marking.iter().flat_map(|m| &m.rows))
                            .map(|r| r.id)
                            .collect::<Vec<i64>>()
                    };
                    let got = match stop {
                        Some(_) => Ok(Vec::new()),
                        None => reads.next(db, limit, in_hand).await,
                    };
                    match got {
                        Err(e) => stop = Some(Stop::Ledger(e)),
                        Ok(rows) => {
                            fresh.seen(rows.iter().map(|r| r.id));
                            // A full read may have left rows behind: read again first.
                            read = rows.len() >= limit as usize;
                            stop = self
                                .send_rows(&link, rows, &mut inflight, &mut acked, lease_end)
                                .await
                                .err();
                        }
                    }
                }
            }
            // Take the confirms that are in already, so that a returned `batch.ready` is seen
            // before the row it belongs to could join a mark.
            while stop.is_none() && !inflight.is_empty() {
                match settle_front(&mut inflight, &mut acked, timeout).now_or_never() {
                    None => break,
                    Some(settled) => stop = settled.err().map(Stop::Link),
                }
            }
            if let Some(m) = marking.take_if(|m| m.done.is_finished()) {
                stop = stop.or(m.end(confirmed, &mut marked).await);
            }
            if acked.is_empty() {
                acked_since = None;
            } else {
                acked_since.get_or_insert_with(Instant::now);
            }
            let ending = stop.is_some() || late;
            let gathered = acked_since.is_some_and(|s| s.elapsed() >= MARK_GATHER);
            if marking.is_none()
                && !acked.is_empty()
                && (ending || gathered || acked.len() >= limit as usize)
            {
                marking = Some(Marking::start(db, std::mem::take(&mut acked)));
                acked_since = None;
            }
            let waiting = inflight.is_empty() || stop.is_some();
            if marking.is_none()
                && acked.is_empty()
                && waiting
                && (ending || (!read && read_at.is_none()))
            {
                break;
            }
            if read && !late && stop.is_none() {
                // Catching up on a backlog: the next page is being read already.
                continue;
            }
            let listen = wake.filter(|_| !late && stop.is_none());
            let gather_end = acked_since
                .filter(|_| marking.is_none())
                .map(|s| s + MARK_GATHER);
            let next = tokio::select! {
                settled = settle_front(&mut inflight, &mut acked, timeout), if !waiting => Next::Settled(settled),
                done = or_pending(marking.as_mut().map(|m| &mut m.done)) => Next::Marked(joined(done)),
                _ = or_pending(listen.map(Notify::notified)) => Next::Woken,
                _ = or_pending(gather_end.map(tokio::time::sleep_until)) => Next::Gathered,
                _ = or_pending(read_at.map(tokio::time::sleep_until)) => Next::ReadDue,
            };
            match next {
                Next::Settled(settled) => stop = settled.err().map(Stop::Link),
                Next::Woken => read = true,
                Next::ReadDue => {
                    read = true;
                    read_at = None;
                }
                Next::Gathered => {}
                Next::Marked(done) => {
                    if let Some(m) = marking.take() {
                        stop = stop.or(Marking::finish(m.rows, done, confirmed, &mut marked));
                    }
                }
            }
        }
        match stop {
            None => Ok(marked),
            Some(Stop::Lapsed) => {
                tracing::warn!(
                    published = marked,
                    "the relay lease lapsed mid-round; the rows not sent are left to its next holder"
                );
                Ok(marked)
            }
            Some(Stop::Ledger(e)) => Err(e),
            Some(Stop::Link(e)) => {
                tracing::warn!(error = %e, published = marked, "outbox relay stopped at an unconfirmed row; it is retried");
                // A refused or unconfirmed publish leaves the channel in doubt: start over on
                // a fresh link (which also declares the topology again).
                self.report_broken(&link);
                Err(e)
            }
        }
    }

    /// How long a publish may wait for its confirm.
    fn confirm_timeout(&self) -> Duration {
        Duration::from_millis(self.config.confirm_timeout_ms)
    }

    /// Publishes `rows` in order, keeping at most `confirm_window` confirms in flight, and
    /// none once `lease_end` passed. Checked before each publish, however long the round
    /// waited before it (a read, a full window, a stopped process): the successor's rounds
    /// start from the oldest unpublished row, and a row sent beside them could overtake an
    /// earlier event of its batch that they send.
    async fn send_rows(
        &self,
        link: &Link,
        rows: Vec<OutboxRow>,
        inflight: &mut VecDeque<InFlight>,
        acked: &mut Vec<OutboxRow>,
        lease_end: Option<Instant>,
    ) -> std::result::Result<(), Stop> {
        let timeout = self.confirm_timeout();
        for row in rows {
            while inflight.len() >= self.config.confirm_window {
                settle_front(inflight, acked, timeout)
                    .await
                    .map_err(Stop::Link)?;
            }
            if lease_end.is_some_and(|end| Instant::now() >= end) {
                return Err(Stop::Lapsed);
            }
            let stage = self.send(link, &row).await.map_err(Stop::Link)?;
            inflight.push_back(InFlight {
                row,
                sent: Instant::now(),
                stage,
            });
        }
        Ok(())
    }

    /// Queues `row`'s publish on the link without waiting for lapin to write it.
    ///
    /// lapin's `basic_publish` resolves only once its connection thread has written the
    /// frames, a round trip between threads for every message; awaited one by one, that
    /// wait, not the broker, set the relay's pace once the broker was fast (a third to a
    /// half of the relay's time a message). The frames are queued, and the delivery tag taken, at the
    /// future's first poll (lapin 4.12 awaits nothing before it), so polling each publish
    /// once here, in row order, keeps the rows' order on the wire; the write is awaited
    /// later, just before its confirm. A lapin that awaited first would reorder rows, which
    /// the test relaying a backlog through a small confirm window checks.
    async fn send(&self, link: &Link, row: &OutboxRow) -> Result<Stage> {
        let mut write: Write = Box::pin(publish(&link.publisher, &self.names.exchange, row));
        match futures::poll!(write.as_mut()) {
            std::task::Poll::Pending => Ok(Stage::Writing(write)),
            std::task::Poll::Ready(Ok(confirm)) => Ok(Stage::Confirming(confirm)),
            std::task::Poll::Ready(Err(e)) => Err(Error::Broker(format!(
                "publishing outbox row {}: {e}",
                row.id
            ))),
        }
    }

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
            Error::Broker(format!(
                "opening the {} consumer: {e}",
                self.names.ready_queue
            ))
        }))
    }
}

fn quorum() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    args
}

/// Why a relay round stopped early.
enum Stop {
    /// The broker did not ack a row: the link is in doubt.
    Link(Error),
    /// The ledger failed a read or a mark; the link is fine.
    Ledger(Error),
    /// The relay lease ended: the round publishes nothing more.
    Lapsed,
}

/// What woke the relay.
enum Next {
    Settled(Result<()>),
    Marked(Result<u64>),
    Woken,
    /// A read put off ([`crate::ledger::commits::READ_EVERY`]) is due.
    ReadDue,
    /// Acked rows waited [`MARK_GATHER`]: time to mark them.
    Gathered,
}

/// How long acked rows wait for others to join their mark. A mark is a write, and while
/// the outbox trickles, marking each confirm on its own made a mark of nearly every event;
/// gathering them more than halves those writes (docs/performance.md). A row published
/// twice after a crash is the only cost of waiting: consumers deduplicate by message id.
const MARK_GATHER: Duration = Duration::from_millis(20);

/// How an outbox row is published: `mandatory` (an unroutable `batch.ready` comes back
/// rather than vanishing), persistent, JSON, with the event id as message id (consumers
/// deduplicate by it) and the event type.
fn message(row: &OutboxRow) -> (BasicPublishOptions, BasicProperties) {
    let options = BasicPublishOptions {
        mandatory: true,
        ..Default::default()
    };
    let props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_message_id(row.event_id.as_str().into())
        .with_type(row.event_type.as_str().into());
    (options, props)
}

/// Publishes `row` to `exchange` as the relay does (`mandatory`, persistent, the event id
/// as message id). The future owns what it needs, so it can be kept and awaited later: its
/// first poll queues the frames.
pub fn publish(
    channel: &Channel,
    exchange: &str,
    row: &OutboxRow,
) -> impl Future<Output = lapin::Result<PublisherConfirm>> + Send + Sync + 'static {
    let (options, props) = message(row);
    let (channel, exchange) = (channel.clone(), exchange.to_owned());
    let (key, body) = (row.routing_key.clone(), row.body.clone());
    async move {
        channel
            .basic_publish(exchange.into(), key.into(), options, body.as_bytes(), props)
            .await
    }
}

/// A ledger task of the relay: it runs on while the relay publishes.
type LedgerTask<T> = tokio::task::JoinHandle<Result<T>>;

/// A ledger task's outcome; a task that panicked or was cancelled fails like the ledger.
fn joined<T>(outcome: std::result::Result<Result<T>, tokio::task::JoinError>) -> Result<T> {
    outcome.map_err(|e| Error::Io {
        context: "outbox relay ledger task".into(),
        source: std::io::Error::other(e),
    })?
}

/// How the relay reads the outbox: always from the oldest unpublished row, leaving out the
/// rows in hand. After a full page, the next one is read at once, in the background, leaving
/// out that page too.
///
/// Never a read past the page's last id: on PostgreSQL ids are taken when a row is written,
/// not when it commits, so a submit holding a low id open across a page commits below it,
/// and its batch's completion, committed next, lies past it; a read past the id would send
/// the completion first. A read of everything unpublished cannot: a batch's rows commit in
/// id order, each after the one before, so a read that sees one sees every earlier one still
/// unpublished, and sends it first (or it is in hand, sent already). This costs each read a
/// step over the ids in hand, rather than a scan for the gaps an id cursor leaves behind.
#[derive(Default)]
struct Reads {
    ahead: Option<LedgerTask<Vec<OutboxRow>>>,
}

impl Reads {
    fn reading_ahead(&self) -> bool {
        self.ahead.is_some()
    }

    async fn next(
        &mut self,
        db: &Db,
        limit: u32,
        in_hand: impl Fn() -> Vec<i64>,
    ) -> Result<Vec<OutboxRow>> {
        let rows = match self.ahead.take() {
            Some(task) => joined(task.await)?,
            None => db.unpublished_events(limit, &in_hand()).await?,
        };
        if rows.len() >= limit as usize {
            let mut except = in_hand();
            except.extend(rows.iter().map(|r| r.id));
            let db = db.clone();
            self.ahead = Some(tokio::spawn(async move {
                db.unpublished_events(limit, &except).await
            }));
        }
        Ok(rows)
    }
}

impl Drop for Reads {
    /// A page read ahead and not sent (the round stopped or ran late) is simply read again.
    fn drop(&mut self) {
        if let Some(task) = self.ahead.take() {
            task.abort();
        }
    }
}

/// Acked rows being marked published.
struct Marking {
    rows: Vec<OutboxRow>,
    done: LedgerTask<u64>,
}

impl Marking {
    fn start(db: &Db, rows: Vec<OutboxRow>) -> Marking {
        let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
        let db = db.clone();
        Marking {
            rows,
            done: tokio::spawn(async move { db.mark_published(&ids).await }),
        }
    }

    /// Waits for the mark, then hands the marked rows on.
    async fn end(
        self,
        confirmed: &(dyn Fn(&[OutboxRow]) + Sync),
        marked: &mut usize,
    ) -> Option<Stop> {
        let done = joined(self.done.await);
        Marking::finish(self.rows, done, confirmed, marked)
    }

    /// Hands the marked rows on; a failed mark stops the round (the rows are published
    /// again later: a duplicate, never a loss).
    fn finish(
        rows: Vec<OutboxRow>,
        done: Result<u64>,
        confirmed: &(dyn Fn(&[OutboxRow]) + Sync),
        marked: &mut usize,
    ) -> Option<Stop> {
        match done {
            Ok(_) => {
                confirmed(&rows);
                *marked += rows.len();
                None
            }
            Err(e) => Some(Stop::Ledger(e)),
        }
    }
}

/// `f`'s output, or never when there is no `f` (a disabled `select!` branch).
async fn or_pending<F: std::future::Future>(f: Option<F>) -> F::Output {
    match f {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

/// A publish whose frames lapin has queued but may not have written yet.
type Write = std::pin::Pin<Box<dyn Future<Output = lapin::Result<PublisherConfirm>> + Send + Sync>>;

/// Where a publish in flight is.
enum Stage {
    Writing(Write),
    Confirming(PublisherConfirm),
}

/// A publish awaiting its confirm.
struct InFlight {
    row: OutboxRow,
    sent: Instant,
    stage: Stage,
}

impl InFlight {
    /// The broker's answer: the write first, then the confirm. Cancel-safe: a write that
    /// finished is kept as its confirm.
    async fn confirmation(&mut self) -> lapin::Result<Confirmation> {
        loop {
            match &mut self.stage {
                Stage::Writing(write) => self.stage = Stage::Confirming(write.await?),
                Stage::Confirming(confirm) => return confirm.await,
            }
        }
    }
}

/// Waits for the oldest publish in flight; on success it joins `acked`. Cancel-safe: the
/// publish leaves `inflight` only once its confirm is in.
///
/// lapin hands a returned message to whichever confirm it resolves next, not necessarily
/// the returned publish's own, so a return is identified by its own routing key and message
/// id: a returned `batch.ready` fails the round at that row (it and what follows are
/// retried), while returns of other keys are only counted.
async fn settle_front(
    inflight: &mut VecDeque<InFlight>,
    acked: &mut Vec<OutboxRow>,
    timeout: Duration,
) -> Result<()> {
    let Some(front) = inflight.front_mut() else {
        return Ok(());
    };
    let outcome = tokio::time::timeout_at(front.sent + timeout, front.confirmation()).await;
    let Some(InFlight { row, .. }) = inflight.pop_front() else {
        return Ok(());
    };
    let what = |m: &str| Error::Broker(format!("outbox row {} ({}): {m}", row.id, row.routing_key));
    let returned = match outcome {
        Err(_) => return Err(what("no confirm within the timeout")),
        Ok(Err(e)) => return Err(what(&e.to_string())),
        Ok(Ok(Confirmation::Nack(_))) => return Err(what("nacked by the broker")),
        Ok(Ok(Confirmation::Ack(returned))) => returned,
        Ok(Ok(Confirmation::NotRequested)) => None,
    };
    if let Some(ret) = returned {
        let key = ret.delivery.routing_key.as_str();
        if key == READY_KEY {
            let id = ret
                .delivery
                .properties
                .message_id()
                .clone()
                .unwrap_or_default();
            if let Some(pos) = acked.iter().position(|r| r.event_id == id.as_str()) {
                acked.truncate(pos);
            }
            return Err(Error::Broker(format!(
                "{READY_KEY} event {id} returned unroutable: the ready queue is not bound"
            )));
        }
        unroutable(key);
    }
    acked.push(row);
    Ok(())
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

/// Logs the first failure and then one in twenty, so an absent broker does not flood logs.
fn log_connect_failure(failures: &mut u64, error: &str) {
    if failures.is_multiple_of(20) {
        tracing::warn!(
            error,
            attempts = *failures + 1,
            "RabbitMQ unreachable; polling SQL meanwhile"
        );
    }
    *failures += 1;
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

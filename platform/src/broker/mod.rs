//! The RabbitMQ transport (lapin 4): one supervised connection ([`Broker::run`]), the
//! [`topology`], publishing with confirms ([`publish`]) and the consumer of `batch.ready`
//! ([`consume`]). What is published, and when, is the outbox relay's business
//! ([`crate::events`]); this module only moves messages.
//!
//! Design notes:
//! - lapin's own auto-recovery is off. Its recovery does not resend an unconfirmed publish,
//!   and the outbox already is the retry buffer, so a lost link is simply dropped: the
//!   supervisor reconnects with backoff, declares the topology again and hands out the new
//!   link. Until then [`Mode`] says `polling` and workers poll SQL.
//! - Startup never waits for the broker: the process starts in `polling` mode and the
//!   supervisor connects in the background.
//! - A RabbitMQ cluster is reached through the nodes `amqp_url` lists: the supervisor tries
//!   them in turn, and after a lost link starts at once from the node after the one it
//!   lost, so a dead node is tried last. It backs off only after a round in which no node
//!   answered, or after a link that failed soon after it came up. Every queue is a quorum queue, replicated on the cluster's
//!   nodes, so the surviving majority keeps confirming publishes and delivering.
//! - A publish counts only when the broker acked it (see [`publish`]).

mod consume;
pub mod publish;
pub mod topology;

pub use publish::{Message, Pending, Returned, Sender, Unconfirmed, publish};
pub use topology::{Names, READY_KEY};

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::StreamExt;
use lapin::options::ConfirmSelectOptions;
use lapin::{Channel, Connection, ConnectionProperties};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use crate::config::{AmqpConfig, Secret};
use crate::events::Mode;

/// Connecting to one node, the handshake and declaring the topology must finish within this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A link up this long was healthy, and after its loss the next node is tried at once. One
/// lost sooner is flapping (a cluster refuses the consumer while it elects a queue's new
/// leader, say), and the backoff between rounds keeps growing.
const STABLE_LINK: Duration = Duration::from_secs(10);

/// The connection's event stream.
type Events = std::pin::Pin<Box<dyn futures::Stream<Item = lapin::Event> + Send>>;

/// A live connection and its confirm-mode publishing channel.
struct Link {
    conn: Connection,
    publisher: Channel,
    /// Which of the configured nodes this is: its index and `host:port`.
    node: (usize, String),
    /// A user of this link saw it fail before the connection noticed. Each link has its
    /// own, so a failure reported late about a lost link cannot end its successor.
    broken: Notify,
}

pub struct Broker {
    nodes: Vec<Secret>,
    /// The node the next connection attempt starts from.
    next: AtomicUsize,
    config: AmqpConfig,
    names: Names,
    link: watch::Sender<Option<Arc<Link>>>,
    mode: watch::Sender<Mode>,
}

impl Broker {
    /// A broker handle in `polling` mode for the RabbitMQ `nodes` (one server, or the
    /// nodes of a cluster, at least one); [`Broker::run`] connects it.
    pub fn new(nodes: Vec<Secret>, config: AmqpConfig, mode: watch::Sender<Mode>) -> Broker {
        assert!(!nodes.is_empty(), "a broker needs at least one node");
        mode.send_replace(Mode::Polling);
        Broker {
            nodes,
            next: AtomicUsize::new(0),
            names: Names::new(&config),
            config,
            link: watch::channel(None).0,
            mode,
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

    /// The node the link is up to, as `host:port` from `amqp_url`; `None` while down.
    pub fn node(&self) -> Option<String> {
        self.link.borrow().as_ref().map(|l| l.node.1.clone())
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
                c = self.connect_any() => c,
            };
            match connected {
                Ok((link, mut events)) => {
                    let up = tokio::time::Instant::now();
                    tracing::info!(
                        exchange = %self.names.exchange,
                        node = %link.node.1,
                        "RabbitMQ connected; events flow through the broker"
                    );
                    metrics::counter!("dataflow_amqp_links_total", "node" => link.node.1.clone())
                        .increment(1);
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
                    // The lost node is tried last: it may be the one that went away.
                    self.next
                        .store((link.node.0 + 1) % self.nodes.len(), Ordering::Relaxed);
                    tracing::warn!(
                        %reason,
                        node = %link.node.1,
                        "RabbitMQ link lost; workers poll SQL until it is back"
                    );
                    if up.elapsed() >= STABLE_LINK {
                        backoff = min;
                        failures = 0;
                        continue;
                    }
                }
                Err(errors) => log_connect_failure(&mut failures, &errors),
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

    /// Tries every node once, starting from `next`; the first that connects is kept (and
    /// tried first again next time). Fails with what each node said.
    async fn connect_any(&self) -> Result<(Arc<Link>, Events), String> {
        let start = self.next.load(Ordering::Relaxed);
        let mut errors = Vec::with_capacity(self.nodes.len());
        for i in 0..self.nodes.len() {
            let index = (start + i) % self.nodes.len();
            let node = (index, endpoint(self.nodes[index].expose()));
            match tokio::time::timeout(CONNECT_TIMEOUT, self.connect(&self.nodes[index])).await {
                Ok(Ok((conn, publisher, events))) => {
                    self.next.store(index, Ordering::Relaxed);
                    let link = Link {
                        conn,
                        publisher,
                        node,
                        broken: Notify::new(),
                    };
                    return Ok((Arc::new(link), events));
                }
                Ok(Err(e)) => errors.push(format!("{}: {e}", node.1)),
                Err(_) => errors.push(format!("{}: timed out", node.1)),
            }
        }
        Err(errors.join("; "))
    }

    async fn connect(&self, url: &Secret) -> lapin::Result<(Connection, Channel, Events)> {
        let props = ConnectionProperties::default().with_connection_name("dataflow".into());
        let conn = Connection::connect(url.expose(), props).await?;
        // Listen before anything can fail, so no error event is missed.
        let events = conn.events_listener();
        let publisher = conn.create_channel().await?;
        topology::declare(&publisher, &self.names, &self.config).await?;
        publisher
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok((conn, publisher, Box::pin(events)))
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
                _ = link.broken.notified() => return "a publish or consume failed".into(),
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
            link.broken.notify_one();
        }
    }
}

/// `host:port` of a node's URL, for logs and `/readyz` (never its credentials).
pub fn endpoint(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(u) => {
            let port = u
                .port()
                .unwrap_or(if u.scheme() == "amqps" { 5671 } else { 5672 });
            format!("{}:{port}", u.host_str().unwrap_or("localhost"))
        }
        Err(_) => "an unreadable URL".into(),
    }
}

/// Logs the first failed round (every node tried once) and then one in twenty, so an absent
/// broker does not flood logs.
fn log_connect_failure(failures: &mut u64, error: &str) {
    if failures.is_multiple_of(20) {
        tracing::warn!(
            error,
            rounds = *failures + 1,
            "RabbitMQ unreachable; polling SQL meanwhile"
        );
    }
    *failures += 1;
}

//! A TCP proxy in front of a service, which the test controls: cut (drop every connection
//! and refuse new ones), delay (hold every byte on its way to the service), mute (requests
//! still reach the service, its replies are dropped), heal.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinHandle};
use tokio::time::Instant;

pub struct Proxy {
    pub addr: SocketAddr,
    state: Arc<State>,
    accept: JoinHandle<()>,
}

#[derive(Default)]
struct State {
    cut: AtomicBool,
    delay_ms: AtomicU64,
    /// Reads held back by a delay, since the proxy started.
    delayed: AtomicU64,
    /// Connections passed on to the service, since the proxy started.
    accepted: AtomicU64,
    /// Requests containing this switch `muted` on.
    mute_after: Mutex<Option<&'static [u8]>>,
    /// The service's replies are dropped.
    muted: AtomicBool,
    conns: Mutex<Vec<AbortHandle>>,
}

impl State {
    /// A request on its way to the service: how long it waits first.
    fn request(&self, request: &[u8]) -> u64 {
        let after = *self.mute_after.lock().unwrap();
        if after.is_some_and(|a| request.windows(a.len()).any(|w| w == a)) {
            self.muted.store(true, Ordering::SeqCst);
        }
        let hold = self.delay_ms.load(Ordering::SeqCst);
        if hold > 0 {
            self.delayed.fetch_add(1, Ordering::SeqCst);
        }
        hold
    }

    /// A reply on its way from the service: whether it passes.
    fn reply(&self) -> bool {
        !self.muted.load(Ordering::SeqCst)
    }
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let state = Arc::new(State::default());
        let shared = state.clone();
        let accept = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                if shared.cut.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                shared.accepted.fetch_add(1, Ordering::SeqCst);
                let conn = shared.clone();
                let task = tokio::spawn(async move {
                    if let Ok(outbound) = TcpStream::connect(target).await {
                        relay(inbound, outbound, conn).await;
                    }
                });
                let mut conns = shared.conns.lock().unwrap();
                conns.retain(|c| !c.is_finished());
                conns.push(task.abort_handle());
            }
        });
        Proxy {
            addr,
            state,
            accept,
        }
    }

    /// Drops every connection and refuses new ones until [`Proxy::heal`].
    pub fn cut(&self) {
        self.state.cut.store(true, Ordering::SeqCst);
        for c in self.state.conns.lock().unwrap().drain(..) {
            c.abort();
        }
    }

    /// Holds every byte `delay` on its way to the service from now on, on open connections
    /// too: each round trip takes `delay` longer. Zero turns it off.
    pub fn delay(&self, delay: Duration) {
        let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        self.state.delay_ms.store(ms, Ordering::SeqCst);
    }

    /// Once a request containing `request` passes (it still reaches the service), the
    /// service's replies are dropped: that request and those after it run, and their
    /// clients time out (a reply lost after the request applied).
    pub fn mute_after(&self, request: &'static [u8]) {
        *self.state.mute_after.lock().unwrap() = Some(request);
    }

    /// Takes connections again, without delay, and passes replies on again.
    pub fn heal(&self) {
        self.delay(Duration::ZERO);
        *self.state.mute_after.lock().unwrap() = None;
        self.state.muted.store(false, Ordering::SeqCst);
        self.state.cut.store(false, Ordering::SeqCst);
    }

    /// Reads that a delay held back, since the proxy started.
    pub fn delayed(&self) -> u64 {
        self.state.delayed.load(Ordering::SeqCst)
    }

    /// Connections passed on to the service, since the proxy started.
    pub fn accepted(&self) -> u64 {
        self.state.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}

/// Copies both ways until either side closes: requests wait out the delay and may mute
/// the replies.
async fn relay(inbound: TcpStream, outbound: TcpStream, state: Arc<State>) {
    let (client_read, client_write) = inbound.into_split();
    let (service_read, service_write) = outbound.into_split();
    let replies = state.clone();
    tokio::join!(
        pipe(client_read, service_write, |request| Some(
            state.request(request)
        )),
        pipe(service_read, client_write, |_| replies.reply().then_some(0)),
    );
}

/// Copies `from` to `to` until `from` ends, then shuts `to` down. `hold` says of each read
/// how long it waits (ms) before it is written, or that it is dropped (`None`); reads are
/// written in order, so a delay adds latency without limiting throughput.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    hold: impl Fn(&[u8]) -> Option<u64>,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let read = async move {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n @ 1..) = from.read(&mut buf).await {
            let Some(ms) = hold(&buf[..n]) else { continue };
            let due = Instant::now() + Duration::from_millis(ms);
            if tx.send((due, buf[..n].to_vec())).is_err() {
                break;
            }
        }
    };
    let write = async move {
        while let Some((due, bytes)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&bytes).await.is_err() {
                break;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(read, write);
}

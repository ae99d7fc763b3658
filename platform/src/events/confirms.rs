//! The outbox relay's round through RabbitMQ: reads, publishes with a window of confirms,
//! and marks, each running on while the others wait (see [`relay`]).

use std::collections::VecDeque;
use std::time::Duration;

use futures::FutureExt;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::broker::{Broker, Message, Pending, READY_KEY, Sender};
use crate::ledger::{Db, OutboxRow};
use crate::{Error, Result};

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
pub(super) async fn relay(
    broker: &Broker,
    db: &Db,
    limit: u32,
    lease_end: Option<Instant>,
    wake: Option<&Notify>,
    confirmed: &(dyn Fn(&[OutboxRow]) + Sync),
) -> Result<usize> {
    let sender = broker.sender()?;
    let until = lease_end.map(|end| {
        end.checked_sub(sender.confirm_timeout())
            .unwrap_or_else(Instant::now)
    });
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
                    stop = send_rows(&sender, handed, &mut inflight, &mut acked, lease_end)
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
                        stop = send_rows(&sender, rows, &mut inflight, &mut acked, lease_end)
                            .await
                            .err();
                    }
                }
            }
        }
        // Take the confirms that are in already, so that a returned `batch.ready` is seen
        // before the row it belongs to could join a mark.
        while stop.is_none() && !inflight.is_empty() {
            match settle_front(&mut inflight, &mut acked).now_or_never() {
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
            settled = settle_front(&mut inflight, &mut acked), if !waiting => Next::Settled(settled),
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
            // A refused or unconfirmed publish leaves the channel in doubt.
            sender.broken();
            Err(e)
        }
    }
}

/// Publishes `rows` in order, keeping at most `confirm_window` confirms in flight, and
/// none once `lease_end` passed. Checked before each publish, however long the round
/// waited before it (a read, a full window, a stopped process): the successor's rounds
/// start from the oldest unpublished row, and a row sent beside them could overtake an
/// earlier event of its batch that they send.
async fn send_rows(
    sender: &Sender<'_>,
    rows: Vec<OutboxRow>,
    inflight: &mut VecDeque<InFlight>,
    acked: &mut Vec<OutboxRow>,
    lease_end: Option<Instant>,
) -> std::result::Result<(), Stop> {
    for row in rows {
        while inflight.len() >= sender.window() {
            settle_front(inflight, acked).await.map_err(Stop::Link)?;
        }
        if lease_end.is_some_and(|end| Instant::now() >= end) {
            return Err(Stop::Lapsed);
        }
        let pending = sender.send((&row).into()).await.map_err(Stop::Link)?;
        inflight.push_back(InFlight { row, pending });
    }
    Ok(())
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

/// A publish awaiting its confirm.
struct InFlight {
    row: OutboxRow,
    pending: Pending,
}

/// How an outbox row goes on the wire.
impl<'a> From<&'a OutboxRow> for Message<'a> {
    fn from(row: &'a OutboxRow) -> Message<'a> {
        Message {
            id: &row.event_id,
            kind: &row.event_type,
            routing_key: &row.routing_key,
            body: &row.body,
            traceparent: row.traceparent.as_deref(),
        }
    }
}

/// Waits for the oldest publish in flight; on success it joins `acked`. Cancel-safe: the
/// publish leaves `inflight` only once its confirm is in.
///
/// A returned `batch.ready` fails the round at that row: it and what follows are retried.
async fn settle_front(inflight: &mut VecDeque<InFlight>, acked: &mut Vec<OutboxRow>) -> Result<()> {
    let Some(front) = inflight.front_mut() else {
        return Ok(());
    };
    let outcome = front.pending.confirmed().await;
    let Some(InFlight { row, .. }) = inflight.pop_front() else {
        return Ok(());
    };
    let at_row = || format!("outbox row {} ({})", row.id, row.routing_key);
    match outcome {
        Err(e) => Err(Error::broker(at_row(), e)),
        Ok(Some(returned)) => {
            // The row returned and every row acked after it are sent again.
            if let Some(pos) = acked.iter().position(|r| r.event_id == returned.id) {
                acked.truncate(pos);
            }
            Err(Error::Broker {
                context: format!(
                    "{READY_KEY} event {} returned unroutable: the ready queue is not bound",
                    returned.id
                ),
                source: None,
            })
        }
        Ok(None) => {
            acked.push(row);
            Ok(())
        }
    }
}

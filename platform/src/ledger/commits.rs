//! What a commit tells this process: the ledger itself signals, right after a write
//! transaction commits, the tasks that wait on what it wrote. A transaction that wrote
//! outbox rows wakes the outbox relay; one that wrote job intents wakes the job workers of
//! those kinds, and only those. So no caller can forget a wake-up, and a kind with nothing
//! new is not asked: the email and webhook workers of a client without email or webhook
//! would otherwise look for work on every completion's wake and find none.
//!
//! A transaction that creates a batch also hands its outbox rows to this process's relay
//! ([`Fresh`]): the relay publishes them at once instead of reading them back first, which
//! takes a wake-up and a ledger round trip off the commit → worker start path.
//!
//! The job workers also wake on events this process relays (intents written by processes
//! that do not run them, an API process's), see [`kinds_for_event`]; with a broker only
//! the relay lease holder relays, so a worker process's own commits must wake it directly.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use dataflow_contracts::events::Event;
use dataflow_contracts::jobs::JobKind;
use tokio::sync::Notify;

use super::OutboxRow;

/// The job kinds a transaction wrote intents of.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Kinds(u8);

impl Kinds {
    pub fn all() -> Kinds {
        JobKind::ALL.into_iter().fold(Kinds::default(), Kinds::with)
    }

    pub fn with(self, kind: JobKind) -> Kinds {
        Kinds(self.0 | 1 << index(kind))
    }

    pub fn contains(self, kind: JobKind) -> bool {
        self.0 & 1 << index(kind) != 0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
}

fn index(kind: JobKind) -> usize {
    match kind {
        JobKind::Email => 0,
        JobKind::Report => 1,
        JobKind::Webhook => 2,
    }
}

/// The kinds of intent an event can come with under some policy (see
/// [`super::jobs::jobs_for_event`], which picks among them by the client's policy).
pub fn kinds_for_event(event: &Event) -> Kinds {
    let webhook = Kinds::default().with(JobKind::Webhook);
    match event {
        Event::BatchCompleted(_) => webhook.with(JobKind::Report).with(JobKind::Email),
        Event::BatchRejected(r) if r.for_errors() => {
            webhook.with(JobKind::Report).with(JobKind::Email)
        }
        Event::BatchRejected(_) | Event::BatchDead(_) => webhook.with(JobKind::Email),
        Event::BatchCreated(_) | Event::BatchReady(_) | Event::BatchFailed(_) => webhook,
    }
}

/// What one write transaction wrote that somebody waits on.
#[derive(Debug, Default)]
pub(crate) struct Wrote {
    /// Outbox rows.
    pub outbox: usize,
    pub jobs: Kinds,
    /// Rows handed to the relay ([`Fresh::expect`]), passed on at commit.
    pub fresh: Vec<OutboxRow>,
}

/// Rows the relay should not look for in SQL first, at most this many at once.
const FRESH_CAP: usize = 10_000;

/// While every row this process commits is handed over, the relay reads SQL (for rows of
/// other processes, which nothing here announces) at most this often.
pub const READ_EVERY: std::time::Duration = std::time::Duration::from_millis(20);

/// Outbox rows handed from the transactions that wrote them to this process's relay.
///
/// Only the first events of a batch (those of the transaction that creates it) are handed
/// over: no event of the batch can precede them, so publishing them ahead of the relay's
/// next read keeps each batch's events in commit order. Every row stays in SQL, which
/// remains what the relay answers to; a row handed over is only published sooner.
///
/// No row is published twice (outside the crash windows of the mark): a row is registered
/// before its transaction commits, so a relay read that finds it in SQL first takes it
/// over ([`Fresh::seen`]) and the hand-over at commit is then dropped; rows the relay
/// publishes from here are in its hands, which its reads leave out. Rows are registered
/// only while the relay takes them ([`Fresh::open`]: it holds the lease and the broker link
/// is up); closing drops them all, and SQL has them.
#[derive(Debug, Default)]
pub struct Fresh {
    inner: Mutex<FreshRows>,
}

#[derive(Debug, Default)]
struct FreshRows {
    open: bool,
    rows: BTreeMap<i64, Slot>,
    /// Since the relay's last read, this process committed rows it did not hand over.
    unhanded: bool,
    last_read: Option<std::time::Instant>,
}

#[derive(Debug)]
enum Slot {
    /// Written by a transaction that has not committed yet (as this process knows).
    Expected,
    /// Committed: the relay may publish it.
    Ready(OutboxRow),
    /// A relay read found it committed before its transaction handed it over.
    Taken,
}

impl Fresh {
    fn rows(&self) -> std::sync::MutexGuard<'_, FreshRows> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the relay takes rows from here; closing drops every row held.
    pub fn open(&self, open: bool) {
        let mut f = self.rows();
        if f.open != open {
            f.open = open;
            f.rows.clear();
        }
    }

    /// When the relay must read SQL next: now if this process committed rows it did not
    /// hand over since the last read (or there was none yet), else [`READ_EVERY`] after it.
    pub fn read_due(&self) -> std::time::Instant {
        let f = self.rows();
        let now = std::time::Instant::now();
        match f.last_read {
            Some(at) if !f.unhanded => (at + READ_EVERY).max(now),
            _ => now,
        }
    }

    /// The relay reads SQL now: what commits from here on hand over or not counts anew.
    pub fn reading(&self) {
        let mut f = self.rows();
        f.unhanded = false;
        f.last_read = Some(std::time::Instant::now());
    }

    /// Before commit: registers `ids`; whether they will be handed over.
    pub(crate) fn expect(&self, ids: impl Iterator<Item = i64> + Clone) -> bool {
        let mut f = self.rows();
        if !f.open || f.rows.len() >= FRESH_CAP {
            return false;
        }
        f.rows.extend(ids.map(|id| (id, Slot::Expected)));
        true
    }

    /// After commit: the rows become the relay's, unless a read took them over meanwhile;
    /// `unhanded` rows of the same commit are the next read's.
    fn committed(&self, rows: Vec<OutboxRow>, unhanded: bool) {
        let mut f = self.rows();
        f.unhanded |= unhanded;
        for row in rows {
            match f.rows.get(&row.id) {
                Some(Slot::Expected) => {
                    f.rows.insert(row.id, Slot::Ready(row));
                }
                Some(Slot::Taken) => {
                    f.rows.remove(&row.id);
                }
                Some(Slot::Ready(_)) | None => {}
            }
        }
    }

    /// A transaction that did not commit (or may not have): SQL alone knows.
    pub(crate) fn forget(&self, ids: impl Iterator<Item = i64>) {
        let mut f = self.rows();
        for id in ids {
            f.rows.remove(&id);
        }
    }

    /// The committed rows handed over, in id order, now in the caller's hands.
    pub fn take(&self) -> Vec<OutboxRow> {
        self.rows()
            .rows
            .extract_if(.., |_, s| matches!(s, Slot::Ready(_)))
            .filter_map(|(_, s)| match s {
                Slot::Ready(row) => Some(row),
                _ => None,
            })
            .collect()
    }

    /// A relay read returned these rows: it publishes them, so no hand-over may.
    pub fn seen(&self, ids: impl Iterator<Item = i64>) {
        let mut f = self.rows();
        if f.rows.is_empty() {
            return;
        }
        for id in ids {
            match f.rows.get(&id) {
                Some(Slot::Expected) => {
                    f.rows.insert(id, Slot::Taken);
                }
                Some(Slot::Ready(_)) => {
                    f.rows.remove(&id);
                }
                Some(Slot::Taken) | None => {}
            }
        }
    }
}

/// The wake-ups of one ledger handle (shared by its clones), one waiter each: the relay,
/// and per kind the SQL job pump or (with Redis) the intents relay.
#[derive(Debug, Default)]
pub struct CommitWake {
    outbox: Arc<Notify>,
    fresh: Fresh,
    jobs: [Arc<Notify>; JobKind::ALL.len()],
}

impl CommitWake {
    pub(crate) fn committed(&self, wrote: Wrote) {
        if wrote.outbox > 0 {
            let unhanded = wrote.outbox > wrote.fresh.len();
            self.fresh.committed(wrote.fresh, unhanded);
            self.outbox.notify_one();
        }
        self.wake_jobs(wrote.jobs);
    }

    /// Rows handed from committing transactions to the relay.
    pub fn fresh(&self) -> &Fresh {
        &self.fresh
    }

    /// Wakes the job workers of `kinds` (for intents this process did not write itself).
    pub fn wake_jobs(&self, kinds: Kinds) {
        for kind in JobKind::ALL {
            if kinds.contains(kind) {
                self.jobs[index(kind)].notify_one();
            }
        }
    }

    /// What the outbox relay waits on.
    pub fn outbox(&self) -> Arc<Notify> {
        self.outbox.clone()
    }

    /// What this process's worker of `kind` waits on.
    pub fn jobs(&self, kind: JobKind) -> Arc<Notify> {
        self.jobs[index(kind)].clone()
    }
}

#[cfg(test)]
mod tests {
    use dataflow_contracts::events::{
        BatchCompleted, BatchCreated, BatchDead, BatchFailed, BatchReady, BatchRejected, Envelope,
    };
    use dataflow_contracts::{BatchId, ClientId, ImportFormat, ImportId, Policy};

    use super::*;
    use crate::ledger::jobs::jobs_for_event;

    #[test]
    fn an_event_wakes_the_kinds_it_can_write_and_no_other() {
        let everything = Policy {
            webhook_url: Some("https://hooks.example.com/in".into()),
            notify_email: Some("ops@example.com".into()),
            ..Policy::default()
        };
        let import_id = ImportId::generate();
        let events = [
            Event::BatchCreated(BatchCreated {
                import_id: import_id.clone(),
                format: ImportFormat::Csv,
                records: 1,
                bytes: 1,
            }),
            Event::BatchReady(BatchReady { import_id }),
            Event::BatchCompleted(BatchCompleted {
                records_total: 1,
                records_written: 1,
                records_unchanged: 0,
                records_superseded: 0,
                records_failed: 0,
                duration_ms: 1,
                changes: None,
            }),
            Event::BatchFailed(BatchFailed {
                attempt: 1,
                error: "x".into(),
                retry_at: "2026-12-03T00:00:00Z".into(),
            }),
            Event::BatchRejected(BatchRejected {
                reason: "x".into(),
                code: Some(BatchRejected::TOO_MANY_ERRORS.into()),
            }),
            Event::BatchRejected(BatchRejected {
                reason: "x".into(),
                code: Some(BatchRejected::BY_OPERATOR.into()),
            }),
            Event::BatchDead(BatchDead {
                attempts: 1,
                error: "x".into(),
            }),
        ];
        for event in events {
            let env = Envelope::new(BatchId::generate(), ClientId::generate(), 0, event);
            // Exactly the kinds a client with every follow-up switched on gets: none
            // missed (a wake-up lost), none extra (a claim for nothing).
            let written = jobs_for_event(&env, &everything)
                .iter()
                .fold(Kinds::default(), |k, spec| k.with(spec.kind()));
            assert_eq!(kinds_for_event(&env.event), written, "{:?}", env.event);
        }
    }

    #[test]
    fn a_set_holds_what_was_added_and_nothing_else() {
        let k = Kinds::default().with(JobKind::Report);
        assert!(k.contains(JobKind::Report));
        assert!(!k.contains(JobKind::Email) && !k.contains(JobKind::Webhook));
        assert!(Kinds::default().is_empty() && !k.is_empty());
    }

    fn row(id: i64) -> OutboxRow {
        OutboxRow {
            id,
            event_id: format!("evt_{id}"),
            event_type: "BatchReady".into(),
            routing_key: "batch.ready".into(),
            body: "{}".into(),
            traceparent: None,
        }
    }

    fn ids(rows: Vec<OutboxRow>) -> Vec<i64> {
        rows.into_iter().map(|r| r.id).collect()
    }

    #[test]
    fn committed_rows_are_handed_over_once_in_id_order() {
        let fresh = Fresh::default();
        fresh.open(true);
        assert!(fresh.expect([7, 3].into_iter()));
        assert!(fresh.take().is_empty(), "nothing before the commit");
        fresh.committed(vec![row(7), row(3)], false);
        assert_eq!(ids(fresh.take()), [3, 7]);
        assert!(fresh.take().is_empty());
    }

    #[test]
    fn a_row_a_read_found_first_is_never_handed_over() {
        let fresh = Fresh::default();
        fresh.open(true);
        // The read ran between the commit and the hand-over…
        assert!(fresh.expect([1, 2].into_iter()));
        fresh.seen([1].into_iter());
        fresh.committed(vec![row(1), row(2)], false);
        assert_eq!(ids(fresh.take()), [2]);
        // …or after the hand-over, before the relay took it.
        assert!(fresh.expect([5].into_iter()));
        fresh.committed(vec![row(5)], false);
        fresh.seen([5].into_iter());
        assert!(fresh.take().is_empty());
        assert!(fresh.rows().rows.is_empty(), "nothing is left behind");
    }

    #[test]
    fn nothing_is_held_while_closed_or_for_a_transaction_that_did_not_commit() {
        let fresh = Fresh::default();
        assert!(!fresh.expect([1].into_iter()), "closed: SQL alone");
        fresh.open(true);
        assert!(fresh.expect([1, 2].into_iter()));
        fresh.forget([1, 2].into_iter());
        fresh.committed(vec![row(1)], false);
        assert!(fresh.take().is_empty());
        assert!(fresh.expect([3].into_iter()));
        fresh.committed(vec![row(3)], false);
        fresh.open(false);
        fresh.open(true);
        assert!(fresh.take().is_empty(), "closing drops what was held");
    }

    #[test]
    fn a_full_hand_over_leaves_the_rest_to_sql() {
        let fresh = Fresh::default();
        fresh.open(true);
        assert!(fresh.expect(0..FRESH_CAP as i64));
        assert!(!fresh.expect([FRESH_CAP as i64].into_iter()));
    }

    #[test]
    fn a_read_is_put_off_only_while_every_commit_hands_its_rows_over() {
        let fresh = Fresh::default();
        fresh.open(true);
        let now = std::time::Instant::now();
        assert!(
            fresh.read_due() <= now + READ_EVERY / 4,
            "no read yet: read now"
        );
        fresh.reading();
        assert!(fresh.expect([1].into_iter()));
        fresh.committed(vec![row(1)], false);
        assert!(
            fresh.read_due() > std::time::Instant::now(),
            "handed over: later"
        );
        // A commit with rows it did not hand over (a completion): read now.
        fresh.committed(Vec::new(), true);
        assert!(fresh.read_due() <= std::time::Instant::now());
        fresh.reading();
        assert!(fresh.read_due() > std::time::Instant::now());
    }
}

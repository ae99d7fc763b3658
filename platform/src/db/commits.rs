//! What a commit tells this process: the ledger itself signals, right after a write
//! transaction commits, the tasks that wait on what it wrote. A transaction that wrote
//! outbox rows wakes the outbox relay; one that wrote job intents wakes the job workers of
//! those kinds, and only those. So no caller can forget a wake-up, and a kind with nothing
//! new is not asked: at 200 batches/s the email and webhook workers of a client without
//! email or webhook used to claim nothing ~90 times a second on every completion's wake.
//!
//! The job workers also wake on events this process relays (intents written by processes
//! that do not run them, an API process's), see [`kinds_for_event`]; with a broker only
//! the relay lease holder relays, so a worker process's own commits must wake it directly.

use std::sync::Arc;

use dataflow_contracts::events::Event;
use dataflow_contracts::jobs::JobKind;
use tokio::sync::Notify;

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
        Event::BatchRejected(_) | Event::BatchDead(_) => webhook.with(JobKind::Email),
        Event::BatchCreated(_) | Event::BatchReady(_) | Event::BatchFailed(_) => webhook,
    }
}

/// What one write transaction wrote that somebody waits on.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Wrote {
    pub outbox: bool,
    pub jobs: Kinds,
}

/// The wake-ups of one ledger handle (shared by its clones), one waiter each: the relay,
/// and per kind the SQL job pump or (with Redis) the intents relay.
#[derive(Debug, Default)]
pub struct CommitWake {
    outbox: Arc<Notify>,
    jobs: [Arc<Notify>; JobKind::ALL.len()],
}

impl CommitWake {
    pub(crate) fn committed(&self, wrote: Wrote) {
        if wrote.outbox {
            self.outbox.notify_one();
        }
        self.wake_jobs(wrote.jobs);
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
    use crate::db::jobs::jobs_for_event;

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
                records_failed: 0,
                duration_ms: 1,
            }),
            Event::BatchFailed(BatchFailed {
                attempt: 1,
                error: "x".into(),
                retry_at: "2026-12-03T00:00:00Z".into(),
            }),
            Event::BatchRejected(BatchRejected { reason: "x".into() }),
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
}

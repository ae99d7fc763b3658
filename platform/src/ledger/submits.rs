//! The group commit of submits: concurrent plain imports share one transaction.
//!
//! A small import costs the ledger little in rows and much in transaction: a turn at
//! SQLite's one writer (or a PostgreSQL backend's round trips), a commit, a sync. So a
//! plain submit ([`super::imports`]: its file in the request, no `Idempotency-Key`, no
//! quota) is queued here, and a task commits the queue a group at a time: one transaction
//! writes a group's keys, batches, imports, files and events with a statement per table,
//! whatever the group's size, and each submit is answered only after that commit, with
//! its own outcome.
//!
//! A group is whatever queued while the groups before it were committing (at most
//! [`MAX_GROUP`]): no submit waits for a window to close, an idle ledger takes a group of
//! one at once, and a busy one makes larger groups as its commits take longer. SQLite
//! commits one group at a time (its writers take turns anyway); PostgreSQL a few at once.
//!
//! A group's failure fails nobody for another: when the transaction fails, each of its
//! submits is committed again alone, and a submit answers with its own outcome only. Two
//! submits of one client and one dedup key never share a group (the later one takes the
//! next): the later one is the duplicate of the earlier.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, OnceLock};

use dataflow_contracts::http::ImportView;
use dataflow_contracts::{BatchId, ClientId, ImportFormat, ImportId, Policy, Priority};
use tokio::sync::{Semaphore, mpsc, oneshot};

use super::imports::{Accepted, Claim};
use super::{Db, Dialect, NewImport, Payload, SubmitOutcome, Tx};
use crate::{Error, Result};

/// The most submits one transaction takes.
const MAX_GROUP: usize = 128;

/// Groups committing at once on PostgreSQL, where they overlap; SQLite commits one at a
/// time.
const POSTGRES_GROUPS: usize = 4;

/// This handle's queue of submits waiting for a group, and the task that commits them,
/// started with the first submit.
#[derive(Default)]
pub(crate) struct Groups {
    queue: OnceLock<mpsc::UnboundedSender<Member>>,
}

/// What a group did with one of its submits.
enum Grouped {
    Created(ImportView),
    /// Its file is a duplicate of this earlier import.
    DuplicateOf(ImportId),
}

/// A queued submit: its import, owned, and where its outcome goes.
struct Member {
    client_id: ClientId,
    format: ImportFormat,
    body: Vec<u8>,
    bytes: u64,
    records: u64,
    checksum: String,
    dedup_key: String,
    policy: Policy,
    schema_version: Option<u64>,
    priority: Priority,
    traceparent: Option<String>,
    answer: oneshot::Sender<Result<Grouped>>,
}

impl Member {
    fn new_import(&self) -> NewImport<'_> {
        NewImport {
            client_id: &self.client_id,
            format: self.format,
            payload: Payload::Inline(&self.body),
            bytes: self.bytes,
            records: self.records,
            checksum: &self.checksum,
            dedup_key: &self.dedup_key,
            policy: &self.policy,
            schema_version: self.schema_version,
            priority: self.priority,
            idempotency: None,
            traceparent: self.traceparent.as_deref(),
        }
    }
}

impl Db {
    /// Submits a plain import through the next group; answers after its commit.
    pub(super) async fn submit_grouped(
        &self,
        new: &NewImport<'_>,
        body: &[u8],
    ) -> Result<SubmitOutcome> {
        let (answer, answered) = oneshot::channel();
        let member = Member {
            client_id: new.client_id.clone(),
            format: new.format,
            body: body.to_vec(),
            bytes: new.bytes,
            records: new.records,
            checksum: new.checksum.to_owned(),
            dedup_key: new.dedup_key.to_owned(),
            policy: new.policy.clone(),
            schema_version: new.schema_version,
            priority: new.priority,
            traceparent: new.traceparent.map(str::to_owned),
            answer,
        };
        let queue = self.groups.queue.get_or_init(|| self.start_groups());
        queue.send(member).map_err(|_| stopped())?;
        match answered.await.map_err(|_| stopped())?? {
            Grouped::Created(view) => Ok(SubmitOutcome::Created(view)),
            Grouped::DuplicateOf(first) => self.duplicate_of(new.client_id, &first).await,
        }
    }

    fn start_groups(&self) -> mpsc::UnboundedSender<Member> {
        let (queue, queued) = mpsc::unbounded_channel();
        // A handle without this queue: the task ends once every handle that can submit
        // to it is gone.
        let db = Db {
            groups: Arc::default(),
            ..self.clone()
        };
        tokio::spawn(db.commit_groups(queued));
        queue
    }

    /// Takes a group from the queue whenever one may commit, until the queue closes.
    async fn commit_groups(self, mut queued: mpsc::UnboundedReceiver<Member>) {
        let at_once = match self.dialect {
            Dialect::Sqlite => 1,
            Dialect::Postgres => POSTGRES_GROUPS,
        };
        let turns = Arc::new(Semaphore::new(at_once));
        // Submits that could not join the last group (a key already in it).
        let mut held: VecDeque<Member> = VecDeque::new();
        loop {
            let Ok(turn) = turns.clone().acquire_owned().await else {
                return;
            };
            if held.is_empty() {
                match queued.recv().await {
                    Some(member) => held.push_back(member),
                    None => return,
                }
            }
            while held.len() < MAX_GROUP
                && let Ok(member) = queued.try_recv()
            {
                held.push_back(member);
            }
            let group = next_group(&mut held);
            let db = self.clone();
            tokio::spawn(async move {
                db.commit_group(group).await;
                drop(turn);
            });
        }
    }

    /// Commits `group` in one transaction and answers each member. When the database
    /// refused the transaction (one member's rows, a deadlock), each member is committed
    /// alone; when the ledger is out of reach, each is told so at once.
    async fn commit_group(&self, mut group: Vec<Member>) {
        // A submit whose request was given up stores nothing, as when its own transaction
        // was dropped before it committed.
        group.retain(|m| !m.answer.is_closed());
        if group.is_empty() {
            return;
        }
        metrics::histogram!("dataflow_submit_group_size").record(group.len() as f64);
        match self.store_group(&group).await {
            Ok(outcomes) => {
                for (member, outcome) in group.into_iter().zip(outcomes) {
                    let _ = member.answer.send(Ok(outcome));
                }
            }
            Err(Error::Db(sqlx::Error::Database(e))) if group.len() > 1 => {
                tracing::debug!(error = %e, members = group.len(), "a group commit failed; committing its submits one by one");
                for member in group {
                    if member.answer.is_closed() {
                        continue;
                    }
                    let outcome = self.store_group(std::slice::from_ref(&member)).await;
                    let _ = member.answer.send(outcome.map(|mut o| o.remove(0)));
                }
            }
            Err(e) => {
                for member in group {
                    let _ = member.answer.send(Err(each_members(&e)));
                }
            }
        }
    }

    /// One transaction for the group: its keys claimed, then the imports that claimed
    /// theirs stored. What became of each member, in order.
    async fn store_group(&self, group: &[Member]) -> Result<Vec<Grouped>> {
        let imports: Vec<NewImport<'_>> = group.iter().map(Member::new_import).collect();
        let ids: Vec<(&NewImport<'_>, ImportId)> = imports
            .iter()
            .map(|new| (new, ImportId::generate()))
            .collect();
        let mut tx = self.begin_write().await?;
        let work = self.store_group_in(&mut tx, ids).await;
        // Rolled back, on failure, before the write gate opens for the next writer.
        tx.end(work).await
    }

    async fn store_group_in(
        &self,
        tx: &mut Tx,
        ids: Vec<(&NewImport<'_>, ImportId)>,
    ) -> Result<Vec<Grouped>> {
        let claims = self.claim_keys(tx, &ids).await?;
        let mut duplicates: Vec<Option<ImportId>> = Vec::with_capacity(claims.len());
        let mut accepted = Vec::new();
        for ((new, import_id), claim) in ids.into_iter().zip(claims) {
            match claim {
                Claim::Claimed { now } => {
                    duplicates.push(None);
                    accepted.push(Accepted {
                        new,
                        import_id,
                        batch_id: BatchId::generate(),
                        now,
                    });
                }
                Claim::DuplicateOf(first) => duplicates.push(Some(first)),
            }
        }
        // One view per accepted import, in order.
        let mut views = self.store_accepted(tx, &accepted).await?.into_iter();
        duplicates
            .into_iter()
            .map(|duplicate| match duplicate {
                Some(first) => Ok(Grouped::DuplicateOf(first)),
                None => views
                    .next()
                    .map(Grouped::Created)
                    .ok_or_else(|| Error::Internal {
                        context: "an accepted import without its view".into(),
                        source: None,
                    }),
            })
            .collect()
    }
}

/// The next group from `held`, in order: at most [`MAX_GROUP`], and no two members of one
/// client and one dedup key (the later stays for a later group).
fn next_group(held: &mut VecDeque<Member>) -> Vec<Member> {
    let mut group = Vec::new();
    let mut keys = HashSet::new();
    let mut rest = VecDeque::new();
    while let Some(member) = held.pop_front() {
        if group.len() < MAX_GROUP
            && keys.insert((member.client_id.clone(), member.dedup_key.clone()))
        {
            group.push(member);
        } else {
            rest.push_back(member);
        }
    }
    *held = rest;
    group
}

fn stopped() -> Error {
    Error::Internal {
        context: "the submit's group commit ended without answering it".into(),
        source: None,
    }
}

/// What a group's failure tells each of its members: what it means (an outage stays one,
/// answered `503`), with its cause as text.
fn each_members(e: &Error) -> Error {
    if e.is_unavailable() {
        Error::Io {
            context: "the ledger is unavailable".into(),
            source: std::io::Error::new(std::io::ErrorKind::TimedOut, e.to_string()),
        }
    } else {
        Error::Internal {
            context: format!("the submit's group commit failed: {e}"),
            source: None,
        }
    }
}

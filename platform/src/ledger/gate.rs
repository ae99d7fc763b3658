//! SQLite's writers, queued instead of colliding.
//!
//! SQLite lets one connection write at a time, and a writer that finds the file locked
//! polls for it with growing sleeps (1, 2, 5, 10, 15, 20 … 100 ms, the busy handler behind
//! `busy_timeout`). Two writers that meet lose those milliseconds even when the lock was
//! held for a fraction of one: a claim that collides waits for a sum of that schedule
//! before its worker can start. So every write to a SQLite ledger first
//! passes this gate: writers of one process queue in it (claims, which a worker waits on
//! to start a batch, go ahead of the other writes; the writes made for one client —
//! its chunks, its completions, the parts of its files — take turns with every other
//! client's, so a client whose flood fills the queue delays another client's write by one
//! of its own, not by all of them; bookkeeping nobody waits on — relay marks, the job
//! ledger — goes after them),
//! and the process at the head of its queue takes an exclusive `flock` on a file
//! beside the database, which the kernel hands from process to process as soon as it is
//! released. When a writer reaches SQLite, the file lock is free. PostgreSQL has row locks
//! and needs none of this.
//!
//! Checkpoints are kept out of the gate too: SQLite's automatic checkpoint runs inside the
//! commit that crosses its threshold (every 1,000 pages), so that writer, and every writer
//! queued behind it, waited for the copy and its fsync. With it
//! off, every [`CHECKPOINT_EVERY`] writes a passive checkpoint runs on a connection of its
//! own beside the writers, which it does not block.

use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions, TryLockError};
use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, Weak};
use std::time::{Duration, Instant};

use sqlx::AnyConnection;
use sqlx::pool::PoolConnection;
use sqlx::{Any, AnyPool, Transaction};
use tokio::sync::oneshot;

use dataflow_contracts::jobs::JobKind;

use super::OutboxRow;
use super::commits::{CommitWake, Wrote};
use super::flush::Flusher;
use crate::domain::lanes::{Lane, Lanes};
use crate::{Error, Result};

/// How long a writer waits for the gate, like SQLite's `busy_timeout` before it.
pub(crate) const WAIT: Duration = Duration::from_secs(10);
/// How often a writer looks again while another process holds the file lock.
const RECHECK: Duration = Duration::from_micros(100);
/// Writes between two checkpoints (a write is a few pages: about SQLite's own 1,000 pages).
const CHECKPOINT_EVERY: u64 = 500;

/// How long a background writer yields to the others before it is served like them.
const BACKGROUND_AGE: Duration = Duration::from_millis(50);

/// Which queue a writer joins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Urgency {
    /// Someone waits on this write to start work (a claim): served first.
    Urgent,
    /// Served in turn with the writers of the other clients' [`Lane`]s.
    Normal(Lane),
    /// Nobody waits on this write (a relay mark, the job ledger): served when no other
    /// writer waits, or once it has waited [`BACKGROUND_AGE`], so that it is only delayed,
    /// never starved. Under load these are a large share of all writes, and batch steps
    /// would otherwise queue behind them.
    Background,
}

/// The gate of one database file, shared by every [`super::Db`] on it in this process.
pub(crate) struct Gate {
    /// The lock file, held (`flock`) by whoever has the turn.
    file: Arc<File>,
    turns: Mutex<Turns>,
    writes: AtomicU64,
    checkpointing: AtomicBool,
    flusher: Arc<Flusher>,
}

/// Whose turn it is in this process, and who waits for it, urgent writers first.
#[derive(Default)]
struct Turns {
    taken: bool,
    urgent: VecDeque<oneshot::Sender<()>>,
    normal: Lanes<oneshot::Sender<()>>,
    /// With the time each one started waiting.
    background: VecDeque<(Instant, oneshot::Sender<()>)>,
}

impl Turns {
    /// The writer to serve next, in [`Urgency`] order.
    fn next(&mut self) -> Option<oneshot::Sender<()>> {
        if let Some(urgent) = self.urgent.pop_front() {
            return Some(urgent);
        }
        let aged = self
            .background
            .front()
            .is_some_and(|(since, _)| since.elapsed() >= BACKGROUND_AGE);
        if aged || self.normal.is_empty() {
            return self.background.pop_front().map(|(_, tx)| tx);
        }
        self.normal.pop()
    }
}

/// One gate per file and process: two handles on one ledger (the API and the worker of one
/// process) queue together rather than meeting in the file lock.
static GATES: LazyLock<Mutex<HashMap<PathBuf, Weak<Gate>>>> = LazyLock::new(Mutex::default);

impl Gate {
    /// The gate of the database at `path` (created, with its lock file, when first asked).
    pub(crate) fn of(path: &Path) -> Result<Arc<Gate>> {
        let lock_path = PathBuf::from(format!("{}-writer.lock", path.display()));
        let key = std::fs::canonicalize(path.parent().unwrap_or(Path::new(".")))
            .map(|dir| dir.join(lock_path.file_name().unwrap_or_default()))
            .unwrap_or_else(|_| lock_path.clone());
        let mut gates = GATES.lock().unwrap_or_else(|e| e.into_inner());
        gates.retain(|_, g| g.strong_count() > 0);
        if let Some(gate) = gates.get(&key).and_then(Weak::upgrade) {
            return Ok(gate);
        }
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&key)
            .map_err(|source| Error::Io {
                context: format!("opening the ledger's write lock {}", key.display()),
                source,
            })?;
        let gate = Arc::new(Gate {
            file: Arc::new(file),
            turns: Mutex::default(),
            writes: AtomicU64::new(0),
            checkpointing: AtomicBool::new(false),
            flusher: Flusher::start(path)?,
        });
        gates.insert(key, Arc::downgrade(&gate));
        Ok(gate)
    }

    /// Waits (up to [`WAIT`]) until this writer may write; `pool` runs the checkpoint when
    /// one is due.
    pub(crate) async fn enter(self: &Arc<Self>, pool: &AnyPool, urgency: Urgency) -> Result<Pass> {
        if self.writes.fetch_add(1, Ordering::Relaxed) % CHECKPOINT_EVERY == CHECKPOINT_EVERY - 1 {
            self.checkpoint(pool);
        }
        let deadline = Instant::now() + WAIT;
        let turn = tokio::time::timeout(WAIT, self.turn(urgency))
            .await
            .map_err(|_| busy())??;
        if !try_flock(&self.file)? {
            // Another process writes: wait on a blocking thread, looking every 100 µs (an
            // async timer cannot sleep less than a millisecond).
            let wait = FlockWait::new(&self.file);
            let (file, state) = (self.file.clone(), wait.state.clone());
            tokio::task::spawn_blocking(move || {
                loop {
                    if *lock_state(&state) == Flock::Abandoned {
                        return Err(busy());
                    }
                    if try_flock(&file)? {
                        return FlockWait::taken(&file, &state);
                    }
                    if Instant::now() >= deadline {
                        return Err(busy());
                    }
                    std::thread::sleep(RECHECK);
                }
            })
            .await
            .map_err(|e| lock_failed(std::io::Error::other(e)))??;
            wait.done();
        }
        Ok(Pass {
            file: self.file.clone(),
            turn,
        })
    }

    /// Waits until every write this process finished so far is on disk ([`Flusher`]).
    pub(crate) async fn barrier(&self) -> Result<()> {
        self.flusher.barrier().await
    }

    /// This process's turn to write, once the writers ahead are done.
    async fn turn(self: &Arc<Self>, urgency: Urgency) -> Result<Turn> {
        let rx = {
            let mut turns = self.turns();
            if !turns.taken {
                turns.taken = true;
                return Ok(Turn(self.clone()));
            }
            let (tx, rx) = oneshot::channel();
            match urgency {
                Urgency::Urgent => turns.urgent.push_back(tx),
                Urgency::Normal(lane) => turns.normal.push(lane, tx),
                Urgency::Background => turns.background.push_back((Instant::now(), tx)),
            }
            rx
        };
        let mut waiting = Waiting {
            rx,
            gate: self.clone(),
        };
        match (&mut waiting.rx).await {
            Ok(()) => Ok(Turn(self.clone())),
            // The gate dropped its waiters: it is going away with its last ledger handle.
            Err(_) => Err(busy()),
        }
    }

    fn turns(&self) -> std::sync::MutexGuard<'_, Turns> {
        self.turns.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Gives the turn to the next writer waiting ([`Turns::next`]), or frees it.
    fn hand_on(&self) {
        let mut turns = self.turns();
        loop {
            let Some(next) = turns.next() else {
                turns.taken = false;
                return;
            };
            // A waiter that gave up (its timeout) is skipped.
            if next.send(()).is_ok() {
                return;
            }
        }
    }
}

/// This writer's turn in its process; handed on when dropped.
struct Turn(Arc<Gate>);

impl Drop for Turn {
    fn drop(&mut self) {
        self.0.hand_on();
    }
}

/// A writer waiting for its turn. Dropped while waiting (its timeout, or its caller gone),
/// it still hands on a turn given to it in the meantime, so no turn is ever lost.
struct Waiting {
    rx: oneshot::Receiver<()>,
    gate: Arc<Gate>,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.rx.close();
        if self.rx.try_recv().is_ok() {
            self.gate.hand_on();
        }
    }
}

impl Gate {
    /// A passive checkpoint in the background, unless one is under way.
    ///
    /// Twice: the first copies the bulk of the log beside the writers; the second, inside
    /// the gate, copies the few pages they appended meanwhile. Only a log copied to its end
    /// starts again from its beginning, so without the second the log of a busy ledger
    /// would grow for as long as writes never pause.
    fn checkpoint(self: &Arc<Self>, pool: &AnyPool) {
        if self.checkpointing.swap(true, Ordering::AcqRel) {
            return;
        }
        let (gate, pool) = (self.clone(), pool.clone());
        tokio::spawn(async move {
            let checkpoint = || sqlx::query("PRAGMA wal_checkpoint(PASSIVE)").execute(&pool);
            let done = match checkpoint().await {
                Ok(_) => match gate.enter(&pool, Urgency::Normal(Lane::SHARED)).await {
                    Ok(_pass) => checkpoint().await.map(|_| ()).map_err(Error::from),
                    Err(e) => Err(e),
                },
                Err(e) => Err(e.into()),
            };
            match done {
                Ok(()) | Err(Error::Db(sqlx::Error::PoolClosed)) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "SQLite checkpoint failed; the next one retries")
                }
            }
            gate.checkpointing.store(false, Ordering::Release);
        });
    }
}

/// Where a wait for another process's file lock stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flock {
    Waiting,
    /// The thread took the lock for a writer that is still there.
    Taken,
    /// The writer went away (its caller dropped it) before the lock was taken.
    Abandoned,
}

/// The writer's side of a wait on a blocking thread, which goes on when the writer's future
/// is dropped. Cancel-safe: whichever of the two comes second puts right what the first
/// left, so a writer dropped mid-wait (a client that disconnected) never leaves the lock
/// taken by a thread nobody waits for, which would stall every other process's writers.
struct FlockWait {
    file: Arc<File>,
    state: Arc<Mutex<Flock>>,
    /// Cleared once the lock is the writer's [`Pass`]'s to release.
    armed: bool,
}

impl FlockWait {
    fn new(file: &Arc<File>) -> FlockWait {
        FlockWait {
            file: file.clone(),
            state: Arc::new(Mutex::new(Flock::Waiting)),
            armed: true,
        }
    }

    /// On the thread, once it holds the lock: keeps it for a writer still waiting, lets it
    /// go if the writer left.
    fn taken(file: &File, state: &Mutex<Flock>) -> Result<()> {
        let mut state = lock_state(state);
        if *state == Flock::Abandoned {
            let _ = file.unlock();
            return Err(busy());
        }
        *state = Flock::Taken;
        Ok(())
    }

    /// The writer has the lock, and its pass will release it.
    fn done(mut self) {
        self.armed = false;
    }
}

impl Drop for FlockWait {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let mut state = lock_state(&self.state);
        if *state == Flock::Taken {
            let _ = self.file.unlock();
        }
        *state = Flock::Abandoned;
    }
}

fn lock_state(state: &Mutex<Flock>) -> std::sync::MutexGuard<'_, Flock> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

/// Takes the file lock if no other process holds it: whether it was taken.
fn try_flock(file: &File) -> Result<bool> {
    match file.try_lock() {
        Ok(()) => Ok(true),
        Err(TryLockError::WouldBlock) => Ok(false),
        Err(TryLockError::Error(e)) => Err(lock_failed(e)),
    }
}

fn busy() -> Error {
    Error::Io {
        context: "waiting for the ledger's write lock".into(),
        source: std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("another writer held it for {WAIT:?}"),
        ),
    }
}

fn lock_failed(source: std::io::Error) -> Error {
    Error::Io {
        context: "taking the ledger's write lock".into(),
        source,
    }
}

/// The right to write, until dropped.
pub(crate) struct Pass {
    file: Arc<File>,
    // Dropped after `drop` below: the file lock goes before the turn does.
    turn: Turn,
}

impl Drop for Pass {
    fn drop(&mut self) {
        self.turn.0.flusher.finished();
        // An unlock that fails leaves the lock to the next `try_lock` of this process,
        // which succeeds on a lock its own file already holds.
        let _ = self.file.unlock();
    }
}

/// A connection (or a transaction on one) that holds the right to write; derefs to the
/// connection.
pub struct Held<C> {
    // Field order is drop order: the transaction ends before the gate opens.
    conn: C,
    _pass: Option<Pass>,
}

/// A connection for one statement that writes outside a transaction.
pub type Writer = Held<PoolConnection<Any>>;

impl<C> Held<C> {
    pub(crate) fn new(conn: C, pass: Option<Pass>) -> Held<C> {
        Held { conn, _pass: pass }
    }
}

/// A write transaction. Rolled back when dropped uncommitted; its commit wakes the tasks
/// of this process that wait on what it wrote ([`super::commits`]).
pub struct Tx {
    held: Held<Transaction<'static, Any>>,
    wrote: Wrote,
    handed: HandedOver,
}

/// Where the commit is announced, and the rows registered with the relay
/// ([`super::commits::Fresh`]): forgotten again unless the transaction commits.
struct HandedOver {
    wake: Arc<CommitWake>,
    rows: Vec<OutboxRow>,
}

impl Drop for HandedOver {
    fn drop(&mut self) {
        if !self.rows.is_empty() {
            self.wake.fresh().forget(self.rows.iter().map(|r| r.id));
        }
    }
}

impl Tx {
    pub(crate) fn new(held: Held<Transaction<'static, Any>>, wake: Arc<CommitWake>) -> Tx {
        Tx {
            held,
            wrote: Wrote::default(),
            handed: HandedOver {
                wake,
                rows: Vec::new(),
            },
        }
    }

    /// These outbox rows are the first events of a batch this transaction creates: hand
    /// them to the relay at commit, if it takes them.
    pub(crate) fn hand_over(&mut self, rows: Vec<OutboxRow>) {
        if self.handed.wake.fresh().expect(rows.iter().map(|r| r.id)) {
            self.handed.rows.extend(rows);
        }
    }

    /// `rows` outbox rows are in this transaction: its commit wakes the relay.
    pub(crate) fn wrote_outbox(&mut self, rows: usize) {
        self.wrote.outbox += rows;
    }

    /// A job intent of `kind` is in this transaction: its commit wakes that kind's worker.
    pub(crate) fn wrote_job(&mut self, kind: JobKind) {
        self.wrote.jobs = self.wrote.jobs.with(kind);
    }

    pub async fn commit(self) -> Result<()> {
        let Tx {
            held: Held { conn, _pass: pass },
            mut wrote,
            mut handed,
        } = self;
        // A commit that fails drops `handed`, which forgets its rows.
        conn.commit().await?;
        // The gate opens before anyone wakes to write.
        drop(pass);
        wrote.fresh = std::mem::take(&mut handed.rows);
        handed.wake.committed(wrote);
        Ok(())
    }

    pub async fn rollback(self) -> Result<()> {
        self.held.conn.rollback().await?;
        Ok(())
    }

    /// Commits when the work in it succeeded, rolls back (before the gate opens) when not.
    pub async fn end<T>(self, work: Result<T>) -> Result<T> {
        match work {
            Ok(v) => self.commit().await.map(|()| v),
            Err(e) => {
                if let Err(rollback) = self.rollback().await {
                    tracing::warn!(error = %rollback, "rolling back a failed write failed");
                }
                Err(e)
            }
        }
    }
}

impl Deref for Tx {
    type Target = AnyConnection;
    fn deref(&self) -> &AnyConnection {
        &self.held
    }
}

impl DerefMut for Tx {
    fn deref_mut(&mut self) -> &mut AnyConnection {
        &mut self.held
    }
}

impl<C: Deref<Target = AnyConnection>> Deref for Held<C> {
    type Target = AnyConnection;
    fn deref(&self) -> &AnyConnection {
        &self.conn
    }
}

impl<C: DerefMut<Target = AnyConnection>> DerefMut for Held<C> {
    fn deref_mut(&mut self) -> &mut AnyConnection {
        &mut self.conn
    }
}

#[cfg(test)]
mod tests {
    use dataflow_contracts::ClientId;

    use super::*;
    use crate::ledger::Db;

    /// A fresh SQLite ledger in its own folder (with a table to write to).
    async fn ledger() -> (Db, PathBuf) {
        let dir = std::env::temp_dir().join(format!("dataflow-gate-{}", ulid::Ulid::new()));
        let file = dir.join("ledger.db");
        let db = Db::connect(&format!("sqlite://{}", file.display()), 8)
            .await
            .unwrap();
        sqlx::query("CREATE TABLE t (n INTEGER NOT NULL, pad TEXT NOT NULL)")
            .execute(db.pool())
            .await
            .unwrap();
        (db, dir)
    }

    async fn insert(db: &Db, n: i64) -> Result<()> {
        let mut tx = db.begin_write().await?;
        sqlx::query("INSERT INTO t (n, pad) VALUES ($1, $2)")
            .bind(n)
            .bind("x".repeat(2_000))
            .execute(&mut *tx)
            .await?;
        tx.commit().await
    }

    #[tokio::test]
    async fn handles_on_one_file_share_its_gate_and_never_meet_in_sqlite() {
        let (a, dir) = ledger().await;
        let url = format!("sqlite://{}", dir.join("ledger.db").display());
        let b = Db::connect(&url, 8).await.unwrap();
        let (ga, gb) = (a.gate.clone().unwrap(), b.gate.clone().unwrap());
        assert!(Arc::ptr_eq(&ga, &gb));
        let mut writers = tokio::task::JoinSet::new();
        for n in 0..200 {
            let db = if n % 2 == 0 { a.clone() } else { b.clone() };
            writers.spawn(async move { insert(&db, n).await });
        }
        while let Some(done) = writers.join_next().await {
            done.unwrap().unwrap();
        }
        let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM t")
            .fetch_one(a.pool())
            .await
            .unwrap();
        assert_eq!(rows, 200);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn a_writer_waits_while_another_process_holds_the_lock() {
        let (db, dir) = ledger().await;
        // Another open file description on the lock file conflicts like another process.
        let other = File::options()
            .write(true)
            .open(dir.join("ledger.db-writer.lock"))
            .unwrap();
        other.lock().unwrap();
        let writer = tokio::spawn({
            let db = db.clone();
            async move { insert(&db, 1).await }
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!writer.is_finished(), "wrote while another held the lock");
        other.unlock().unwrap();
        tokio::time::timeout(Duration::from_secs(2), writer)
            .await
            .expect("the writer went on once the lock was free")
            .unwrap()
            .unwrap();
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A barrier returns once a sync that began after it has finished: whatever was
    /// committed before it, by this process or another, is on disk by then.
    #[tokio::test]
    async fn a_barrier_waits_for_a_sync_that_covers_what_came_before() {
        let (db, dir) = ledger().await;
        let flusher = db.gate.clone().unwrap().flusher.clone();
        for n in 0..3 {
            insert(&db, n).await.unwrap();
            let before = flusher.flushes();
            db.durable().await.unwrap();
            assert!(
                flusher.flushes() > before,
                "answered before the log was synced"
            );
        }
        // Turned off, it does not wait.
        let fast = db.clone().with_durable_commits(false);
        insert(&fast, 9).await.unwrap();
        let before = flusher.flushes();
        fast.durable().await.unwrap();
        assert_eq!(flusher.flushes(), before);
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A writer dropped while it waits for another process's lock (a client that went
    /// away mid-request) leaves nothing behind: once the other process lets go, the lock is
    /// free for every process, not taken by a waiter nobody is waiting on any more.
    #[tokio::test]
    async fn a_writer_dropped_while_it_waits_for_the_lock_leaves_it_free() {
        let (db, dir) = ledger().await;
        let lock = dir.join("ledger.db-writer.lock");
        let other = File::options().write(true).open(&lock).unwrap();
        other.lock().unwrap();
        let writer = tokio::spawn({
            let db = db.clone();
            async move { insert(&db, 1).await }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        writer.abort();
        assert!(writer.await.unwrap_err().is_cancelled());
        other.unlock().unwrap();
        // A third process finds the lock free (give an orphaned wait time to take it).
        tokio::time::sleep(Duration::from_millis(100)).await;
        let third = File::options().write(true).open(&lock).unwrap();
        assert!(
            third.try_lock().is_ok(),
            "the dropped writer's wait took the lock and kept it"
        );
        third.unlock().unwrap();
        insert(&db, 2).await.unwrap();
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn writes_are_synced_soon_after_and_an_idle_ledger_is_left_alone() {
        let (db, dir) = ledger().await;
        let flusher = db.gate.clone().unwrap().flusher.clone();
        insert(&db, 1).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while flusher.flushes() == 0 {
            assert!(
                Instant::now() < deadline,
                "a write was not synced within 5 s"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // A round may have begun with the write's count and still be syncing.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let idle = flusher.flushes();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(flusher.flushes(), idle, "synced with no write to sync");
        insert(&db, 2).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while flusher.flushes() == idle {
            assert!(
                Instant::now() < deadline,
                "a later write was not synced within 5 s"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// Writes `n` into `t` as a writer of `urgency`, in a task of its own.
    fn write(db: &Db, n: i64, urgency: Urgency) -> tokio::task::JoinHandle<Result<()>> {
        let db = db.clone();
        tokio::spawn(async move {
            let mut w: Writer = db.writer_as(urgency).await?;
            sqlx::query("INSERT INTO t (n, pad) VALUES ($1, '')")
                .bind(n)
                .execute(&mut *w)
                .await?;
            Ok(())
        })
    }

    /// Waits for `writers`, then the order in which they wrote.
    async fn written(db: &Db, writers: Vec<tokio::task::JoinHandle<Result<()>>>) -> Vec<i64> {
        for w in writers {
            tokio::time::timeout(Duration::from_secs(2), w)
                .await
                .expect("every queued writer wrote")
                .unwrap()
                .unwrap();
        }
        sqlx::query_scalar("SELECT n FROM t ORDER BY rowid")
            .fetch_all(db.pool())
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn an_urgent_writer_goes_ahead_of_the_queue_and_a_writer_that_gave_up_is_skipped() {
        let (db, dir) = ledger().await;
        let held = db.writer().await.unwrap();
        let write = |n, urgency| write(&db, n, urgency);
        let mut writers = vec![write(1, SHARED)];
        tokio::time::sleep(Duration::from_millis(20)).await;
        // One that gives up while waiting: its place in the queue must not stall the rest.
        let quitter = tokio::spawn({
            let db = db.clone();
            async move { db.writer().await.map(|_| ()) }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        quitter.abort();
        writers.push(write(2, SHARED));
        tokio::time::sleep(Duration::from_millis(20)).await;
        writers.push(write(3, Urgency::Urgent));
        tokio::time::sleep(Duration::from_millis(5)).await;
        // Bookkeeping queued before the last normal writer still goes after it.
        writers.push(write(4, Urgency::Background));
        tokio::time::sleep(Duration::from_millis(5)).await;
        writers.push(write(5, SHARED));
        tokio::time::sleep(Duration::from_millis(5)).await;
        drop(held);
        assert_eq!(written(&db, writers).await, [3, 1, 2, 5, 4]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    const SHARED: Urgency = Urgency::Normal(Lane::SHARED);

    #[tokio::test]
    async fn clients_take_turns_however_many_writes_one_has_queued() {
        let (db, dir) = ledger().await;
        let (flood, steady) = (ClientId::generate(), ClientId::generate());
        let for_client = |c: &ClientId| Urgency::Normal(Lane::of(c));
        let held = db.writer().await.unwrap();
        let mut writers = Vec::new();
        for n in 1..=4 {
            writers.push(write(&db, n, for_client(&flood)));
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        writers.push(write(&db, 10, for_client(&steady)));
        tokio::time::sleep(Duration::from_millis(5)).await;
        writers.push(write(&db, 20, SHARED));
        tokio::time::sleep(Duration::from_millis(5)).await;
        writers.push(write(&db, 11, for_client(&steady)));
        tokio::time::sleep(Duration::from_millis(5)).await;
        drop(held);
        // The flood's first write, then one of each lane in the order they came, until only
        // the flood's are left.
        assert_eq!(written(&db, writers).await, [1, 10, 20, 2, 11, 3, 4]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn a_background_writer_that_waited_long_enough_goes_before_normal_ones() {
        let (db, dir) = ledger().await;
        let held = db.writer().await.unwrap();
        let mut writers = vec![write(&db, 1, Urgency::Background)];
        tokio::time::sleep(BACKGROUND_AGE + Duration::from_millis(20)).await;
        writers.push(write(&db, 2, SHARED));
        writers.push(write(&db, 3, Urgency::Urgent));
        tokio::time::sleep(Duration::from_millis(10)).await;
        drop(held);
        assert_eq!(written(&db, writers).await, [3, 1, 2]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_log_starts_over_under_steady_writes() {
        let (db, dir) = ledger().await;
        // 4,000 writes of a 2 kB row: about 32 MB of log if it never started over. Half of
        // that leaves room for checkpoints that lag behind the writers on a starved machine.
        let mut writers = tokio::task::JoinSet::new();
        for w in 0..4 {
            let db = db.clone();
            writers.spawn(async move {
                for n in 0..1_000 {
                    insert(&db, w * 1_000 + n).await.unwrap();
                }
            });
        }
        while writers.join_next().await.is_some() {}
        let log = std::fs::metadata(dir.join("ledger.db-wal")).unwrap().len();
        assert!(log < 16 << 20, "the log grew to {log} bytes");
        std::fs::remove_dir_all(dir).unwrap();
    }
}

//! A SQLite ledger's writes put on disk little and often, not in bursts.
//!
//! With `synchronous = NORMAL` SQLite syncs nothing at commit: the kernel keeps the log it
//! appends in memory (for up to 30 s) until a checkpoint syncs it, and then writes all of it
//! at once. Under load those bursts are megabytes, and anything else on the same disk (a
//! broker's own fsync) waits behind each one, which shows in the commit → worker start
//! tail. So a thread beside each ledger file syncs the log every [`EVERY`] while writes go
//! on: the same bytes reach the disk in small steps (the figures are in
//! docs/performance.md). A commit is also on disk within about [`EVERY`] of itself, so a
//! power cut loses at most that much, not everything since the last checkpoint.
//!
//! Only the log, never the database file: a commit is durable once its log frames are,
//! and SQLite syncs the database file itself after each checkpoint, before it reuses the
//! log. And opening the database file here would be a hazard: POSIX record locks belong to
//! the process, and closing *any* descriptor of a file drops all of them, so the close
//! after the sync would silently drop the shared lock SQLite's connections hold on the
//! ledger. Another process closing its last connection would then find the file free,
//! checkpoint, and delete the log this process is still writing (SQLite's "how to corrupt"
//! §2.2). The log itself carries no locks, so its descriptor may come and go.
//!
//! Like PostgreSQL's WAL writer, it only syncs after writes: an idle ledger costs nothing.
//!
//! It is also the ledger's group commit. What DataFlow answers must be on disk first (a
//! `202` for an import, an operator's change, an event it publishes), so those paths ask
//! for a barrier ([`Flusher::barrier`]): it wakes the thread at once and waits until a
//! sync that began after it finished. Barriers that meet share one sync, and the writes
//! nobody was promised (chunk progress, bookkeeping) never wait for the disk.

use std::fs::File;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use tokio::sync::watch;

use crate::{Error, Result};

/// How often the files are synced while writes go on.
const EVERY: Duration = Duration::from_millis(10);

/// How long a barrier waits for a sync before it reports the ledger's disk as failing.
const BARRIER_WAIT: Duration = Duration::from_secs(10);

/// The write count of one ledger file, and the thread that follows it.
pub(crate) struct Flusher {
    /// Writes finished (committed or rolled back) in this process.
    finished: AtomicU64,
    /// Rounds in which the files were synced.
    flushes: AtomicU64,
    /// Barriers asked for so far (each one's number is its ticket).
    wanted: AtomicU64,
    /// The last barrier ticket a successful sync covered.
    served: watch::Sender<u64>,
    /// The thread, to wake at once for a barrier.
    thread: OnceLock<std::thread::Thread>,
}

impl Flusher {
    /// Starts the thread for the database at `db`; it ends when the returned handle goes.
    pub(crate) fn start(db: &Path) -> Result<Arc<Flusher>> {
        let flusher = Arc::new(Flusher {
            finished: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            wanted: AtomicU64::new(0),
            served: watch::Sender::new(0),
            thread: OnceLock::new(),
        });
        let log = PathBuf::from(format!("{}-wal", db.display()));
        let weak = Arc::downgrade(&flusher);
        let thread = std::thread::Builder::new()
            .name("dataflow-ledger-flush".into())
            .spawn(move || run(&weak, &log))
            .map_err(|source| Error::Io {
                context: format!("starting the flush thread of {}", db.display()),
                source,
            })?;
        let _ = flusher.thread.set(thread.thread().clone());
        Ok(flusher)
    }

    /// Counts one finished write. Counted after its commit, so a round that read the count
    /// before it sees a new count next time, and syncs what it wrote.
    pub(crate) fn finished(&self) {
        self.finished.fetch_add(1, Ordering::Release);
    }

    /// Waits until every write to the ledger finished before the call is on disk: this
    /// process's and other processes' (a sync covers the file, whoever wrote to it).
    pub(crate) async fn barrier(&self) -> Result<()> {
        let ticket = self.wanted.fetch_add(1, Ordering::AcqRel) + 1;
        let mut served = self.served.subscribe();
        if let Some(thread) = self.thread.get() {
            thread.unpark();
        }
        match tokio::time::timeout(BARRIER_WAIT, served.wait_for(|s| *s >= ticket)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) | Err(_) => Err(Error::Io {
                context: "making the ledger's last writes durable".into(),
                source: std::io::Error::new(
                    ErrorKind::TimedOut,
                    format!("the ledger's files were not synced within {BARRIER_WAIT:?}"),
                ),
            }),
        }
    }

    #[cfg(test)]
    pub(crate) fn flushes(&self) -> u64 {
        self.flushes.load(Ordering::Acquire)
    }
}

fn run(flusher: &Weak<Flusher>, log: &Path) {
    let (mut synced, mut served) = (0, 0);
    let mut failing = false;
    loop {
        // Woken early by a barrier.
        std::thread::park_timeout(EVERY);
        let Some(flusher) = flusher.upgrade() else {
            return;
        };
        // Read before the sync: the barriers and writes counted so far are covered by it.
        let wanted = flusher.wanted.load(Ordering::Acquire);
        let finished = flusher.finished.load(Ordering::Acquire);
        if finished == synced && wanted == served {
            continue;
        }
        synced = finished;
        // Opened each round: SQLite deletes the log when the last connection of every
        // process closes and makes a new one with the next.
        let outcome = match File::open(log) {
            Ok(file) => file.sync_data(),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        };
        match outcome {
            Ok(()) => {
                failing = false;
                flusher.flushes.fetch_add(1, Ordering::Release);
                served = wanted;
                flusher.served.send_replace(wanted);
            }
            // SQLite's own checkpoint syncs the same file and fails the writes that need
            // it; this thread only says so, once per spell of failures.
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(error = %e, file = %log.display(), "syncing the ledger failed");
            }
            Err(_) => {}
        }
    }
}

//! A SQLite ledger's writes put on disk little and often, not in bursts.
//!
//! With `synchronous = NORMAL` SQLite syncs nothing at commit: the kernel keeps the log it
//! appends in memory (for up to 30 s) until a checkpoint syncs it, and then writes all of it
//! at once. At 200 batches/s that is about 10 MB every quarter of a second, and a broker on
//! the same disk waited behind each burst for its own fsync: commit → worker start p99 was
//! 12–13 ms, against 5–6 ms with the ledger on tmpfs. So a thread beside each ledger file
//! syncs the log and the database file every [`EVERY`] while writes go on. The same bytes
//! reach the disk in small steps, and in alternating runs p99 fell to 4–5 ms (periods from
//! 5 to 50 ms measured alike). A commit is also on disk within about [`EVERY`] of itself,
//! so a power cut loses at most that much, not everything since the last checkpoint.
//!
//! Like PostgreSQL's WAL writer, it only syncs after writes: an idle ledger costs nothing.

use std::fs::File;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use crate::{Error, Result};

/// How often the files are synced while writes go on.
const EVERY: Duration = Duration::from_millis(10);

/// The write count of one ledger file, and the thread that follows it.
pub(crate) struct Flusher {
    /// Writes finished (committed or rolled back) in this process.
    finished: AtomicU64,
    /// Rounds in which the files were synced.
    flushes: AtomicU64,
}

impl Flusher {
    /// Starts the thread for the database at `db`; it ends when the returned handle goes.
    pub(crate) fn start(db: &Path) -> Result<Arc<Flusher>> {
        let flusher = Arc::new(Flusher {
            finished: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
        });
        let files = [PathBuf::from(format!("{}-wal", db.display())), db.into()];
        let weak = Arc::downgrade(&flusher);
        std::thread::Builder::new()
            .name("dataflow-ledger-flush".into())
            .spawn(move || run(&weak, &files))
            .map_err(|source| Error::Io {
                context: format!("starting the flush thread of {}", db.display()),
                source,
            })?;
        Ok(flusher)
    }

    /// Counts one finished write. Counted after its commit, so a round that read the count
    /// before it sees a new count next time, and syncs what it wrote.
    pub(crate) fn finished(&self) {
        self.finished.fetch_add(1, Ordering::Release);
    }

    #[cfg(test)]
    pub(crate) fn flushes(&self) -> u64 {
        self.flushes.load(Ordering::Acquire)
    }
}

fn run(flusher: &Weak<Flusher>, files: &[PathBuf]) {
    let mut synced = 0;
    let mut failing = false;
    loop {
        std::thread::sleep(EVERY);
        let Some(flusher) = flusher.upgrade() else {
            return;
        };
        let finished = flusher.finished.load(Ordering::Acquire);
        if finished == synced {
            continue;
        }
        synced = finished;
        // Opened each round: SQLite deletes the log when its last connection closes and
        // makes a new one with the next.
        let outcome = files.iter().try_for_each(|path| match File::open(path) {
            Ok(file) => file.sync_data(),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        });
        match outcome {
            Ok(()) => {
                failing = false;
                flusher.flushes.fetch_add(1, Ordering::Release);
            }
            // SQLite's own checkpoint syncs the same files and fails the writes that need
            // them; this thread only says so, once per spell of failures.
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(error = %e, file = %files[1].display(), "syncing the ledger failed");
            }
            Err(_) => {}
        }
    }
}

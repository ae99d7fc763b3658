//! A claimed batch's file read back from the ledger and prepared a chunk at a time on a
//! blocking thread, handed over a channel of one. Each chunk waits for its room in the
//! worker's [`Budget`] before it is read and keeps it until it is committed, so what a
//! worker holds does not grow with the size of its files or their number.
//!
//! When the rules set an error threshold and nothing was committed yet, the file is read
//! twice: once to count the refused records (and keep their errors, for the report of a
//! refusal), then, if the batch is not refused, for its chunks. The threshold is decided
//! before the first chunk, the same way on every attempt.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use dataflow_contracts::{ImportFormat, Policy};
use dataflow_platform::domain::prepare::{Chunk, Preparer, RowError, Rules};
use dataflow_platform::domain::records::{Limits, Record, Scanner};
use dataflow_platform::domain::schema::Schema;
use dataflow_platform::ledger::{Db, PartsReader};
use dataflow_platform::{Error, Result};
use tokio::sync::mpsc;

use crate::budget::{Budget, Room};

/// What the preparing thread hands over.
pub(crate) enum Handed {
    Chunk {
        chunk: Chunk,
        /// The file has no record after this chunk's (and it parsed to its end).
        last: bool,
        /// Its records' room in the budget, until it is committed.
        room: Room,
    },
    /// More records were refused than the threshold allows: the batch writes none.
    Refused {
        reason: String,
        failed: u64,
        errors: Vec<RowError>,
    },
}

/// The file to prepare and how.
pub(crate) struct Source {
    pub db: Db,
    pub payload_id: String,
    pub bytes: u64,
    pub format: ImportFormat,
    pub schema: Option<Arc<Schema>>,
    pub policy: Policy,
    pub chunk_size: usize,
    /// Records committed before: read for the file-wide checks, not prepared again.
    pub checkpoint: u64,
    /// The records the file holds, as counted when it arrived: the room a chunk waits for.
    pub records: u64,
    pub budget: Budget,
}

/// The chunks of a file, in order; the end of the channel is the end of the file.
pub(crate) struct Chunks {
    rx: mpsc::Receiver<Result<Handed>>,
}

impl Chunks {
    pub fn start(source: Source) -> Chunks {
        Chunks::spawn(move |tx| source.produce(tx))
    }

    /// Runs `produce` on a blocking thread. Its error, or its panic, is handed over as the
    /// last item: the end of the channel must mean the end of the file, or a panic halfway
    /// would complete the batch with the records before it.
    fn spawn(
        produce: impl FnOnce(&mpsc::Sender<Result<Handed>>) -> Result<()> + Send + 'static,
    ) -> Chunks {
        let (tx, rx) = mpsc::channel(1);
        tokio::task::spawn_blocking(move || {
            let failed = match std::panic::catch_unwind(AssertUnwindSafe(|| produce(&tx))) {
                Ok(Ok(())) => return,
                Ok(Err(e)) => e,
                Err(panic) => Error::internal(
                    "record preparation panicked",
                    crate::panic_text(panic.as_ref()),
                ),
            };
            let _ = tx.blocking_send(Err(failed));
        });
        Chunks { rx }
    }

    /// The next chunk (or the refusal); `None` after the last.
    pub async fn next(&mut self) -> Result<Option<Handed>> {
        self.rx.recv().await.transpose()
    }
}

impl Source {
    fn produce(&self, tx: &mpsc::Sender<Result<Handed>>) -> Result<()> {
        let rules = Rules::of(
            self.schema.as_deref(),
            &self.policy,
            // The API checked a CSV header against this schema version.
            self.format == ImportFormat::Csv,
        );
        if self.checkpoint == 0 && rules.max_error_ratio(&self.policy).is_some() {
            let mut preparer = Preparer::new(rules);
            let mut errors = Vec::new();
            self.each_chunk(tx, |records, done, _, _room, _slot| {
                errors.extend(preparer.chunk(records, done).errors);
            })?;
            if let Some(reason) = preparer.refusal(&self.policy) {
                let _ = tx.blocking_send(Ok(Handed::Refused {
                    reason,
                    failed: preparer.failed,
                    errors,
                }));
                return Ok(());
            }
        }
        let mut preparer = Preparer::new(rules);
        self.each_chunk(tx, |records, done, last, room, slot| {
            if done <= self.checkpoint {
                preparer.skip(records);
                return;
            }
            // A chunk that straddles the checkpoint: what precedes it was committed.
            let committed =
                usize::try_from(self.checkpoint.saturating_sub(done - records.len() as u64))
                    .unwrap_or(usize::MAX)
                    .min(records.len());
            preparer.skip(&records[..committed]);
            let chunk = preparer.chunk(&records[committed..], done);
            slot.send(Ok(Handed::Chunk { chunk, last, room }));
        })
    }

    /// Reads the file from the ledger and calls `each` with every `chunk_size` records, the
    /// count read so far, whether they are the file's last, their room in the budget and
    /// their place in `tx`'s channel, both taken before they were read; until the file ends,
    /// or the run is given up (released, or its lease lost: the channel closed).
    fn each_chunk<'t>(
        &self,
        tx: &'t mpsc::Sender<Result<Handed>>,
        mut each: impl FnMut(&[Record], u64, bool, Room, mpsc::Permit<'t, Result<Handed>>),
    ) -> Result<()> {
        // The file is opened once the first chunk has its room: a batch that waits for
        // room holds none of its file.
        let mut opened = None;
        let size = self.chunk_size.max(1);
        // No more room than the file can fill: every record takes at least two bytes (a
        // character and a line end), and a bundle holds many small files' chunks at once.
        let most = usize::try_from(self.bytes / 2).unwrap_or(usize::MAX).max(1);
        let mut buffer = Vec::with_capacity(size.min(most));
        let mut done = 0u64;
        // The record after a full chunk, read to know whether that chunk is the last.
        let mut after = None;
        loop {
            // The place in the channel first: a run holds room for at most the chunk being
            // committed and the next, and a run given up stops here without taking room.
            let Ok(slot) = futures::executor::block_on(tx.reserve()) else {
                return Ok(());
            };
            let room = self
                .budget
                .room_blocking((size as u64).min(self.records.saturating_sub(done)));
            let mut scan = match opened.take() {
                Some(scan) => scan,
                None => self.open()?,
            };
            buffer.extend(after.take());
            while buffer.len() < size {
                match scan.next_record().map_err(unreadable)? {
                    Some(record) => buffer.push(record),
                    None => break,
                }
            }
            if buffer.len() == size {
                after = scan.next_record().map_err(unreadable)?;
            }
            if after.is_none() {
                // What follows the last record must parse too, before the last commit.
                scan.finish().map_err(unreadable)?;
                if !buffer.is_empty() {
                    each(&buffer, done + buffer.len() as u64, true, room, slot);
                }
                return Ok(());
            }
            opened = Some(scan);
            done += buffer.len() as u64;
            each(&buffer, done, false, room, slot);
            buffer.clear();
        }
    }

    fn open(&self) -> Result<Scanner<PartsReader>> {
        let reader = self.db.read_payload(self.payload_id.clone(), self.bytes);
        // The API checked the limits when the file arrived.
        let limits = Limits {
            max_records: u64::MAX,
            max_field_bytes: usize::MAX,
        };
        Scanner::new(self.format, reader, limits).map_err(unreadable)
    }
}

/// A stored file that no longer parses will not parse on the next attempt either: say so
/// as a conflict, which the worker takes as a permanent failure. Outages reading it stay
/// what they are.
fn unreadable(e: Error) -> Error {
    match e {
        Error::Parse(p) => Error::Conflict(format!("stored payload is unreadable: {p}")),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panic_while_preparing_is_an_error_not_the_end_of_the_file() {
        let mut chunks = Chunks::spawn(|tx| {
            let refused = Handed::Refused {
                reason: "first".into(),
                failed: 0,
                errors: Vec::new(),
            };
            let _ = tx.blocking_send(Ok(refused));
            panic!("a defect halfway through the file");
        });
        assert!(matches!(
            chunks.next().await,
            Ok(Some(Handed::Refused { .. }))
        ));
        let Err(e) = chunks.next().await else {
            panic!("the end of the channel read as the end of the file");
        };
        assert!(
            e.to_string().starts_with("record preparation panicked"),
            "{e}"
        );
    }
}

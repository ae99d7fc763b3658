//! `POST /v1/imports?dry_run=true`: what an import would do to the client's records as
//! they are now — inserts, updates with the fields they change, what stays, the row errors,
//! and whether the error threshold would refuse it — with nothing stored, no quota spent
//! and no event sent.
//!
//! The body is checked as an import's is ([`super::imports::admit`]), then read again as a
//! stream: a blocking task parses and prepares one chunk at a time (the workers' chunk size,
//! so a key the file repeats is counted as the import will count it) and hands it over a
//! channel of two, and this task compares each chunk with the ledger. Memory holds a part
//! of the body, two chunks, and a hash per key of the file.

use std::collections::HashMap;

use dataflow_contracts::ImportFormat;
use dataflow_contracts::http::{
    ChangeKind, ChangeView, DryRunView, FieldChangeView, RawJson, RecordErrorView,
};
use dataflow_platform::domain::diff::{Change, Simulation, field_changes};
use dataflow_platform::domain::prepare::{Chunk, Preparer, RowError, Rules};
use dataflow_platform::domain::records::{Limits, Record, Scanner};
use tokio::sync::mpsc;

use super::imports::{Received, admit};
use crate::auth::Principal;
use crate::error::ApiResult;
use crate::state::AppState;

/// Row errors and changes shown; the counts cover the whole file.
const SHOWN: usize = 20;

/// What the preparing task hands over.
enum Handed {
    Chunk(Chunk),
    /// Every record was read: why the import would be refused whole, if it would.
    Done {
        refusal: Option<String>,
    },
    /// The body did not parse the second time (it did the first).
    Failed(String),
}

pub(super) async fn preview(
    state: &AppState,
    p: &Principal,
    file: &Received,
    dedup_key: &str,
) -> ApiResult<DryRunView> {
    let format = file.format;
    let db = &state.backends.db;
    let client = &p.client.id;
    let schema_version = p.client.schema.as_ref().map(|s| s.version);
    let mut view = DryRunView {
        format,
        records: 0,
        valid: 0,
        rejected: 0,
        would_insert: 0,
        would_update: 0,
        unchanged: 0,
        schema_version,
        refusal: None,
        duplicate_of: None,
        errors: Vec::new(),
        changes: Vec::new(),
    };
    if let Some(first) = db.find_duplicate(client, dedup_key).await? {
        view.records = first.records;
        view.duplicate_of = Some(first.id);
        return Ok(view);
    }
    let schema = admit(state, p, &file.summary)?;

    let (tx, mut rx) = mpsc::channel::<Handed>(2);
    let (body, policy, chunk_size) = (file.reader(db), p.client.policy.clone(), state.chunk_size);
    let max_field_bytes = state.config.max_field_bytes;
    let reader = tokio::task::spawn_blocking(move || {
        let rules = Rules::of(schema.as_deref(), &policy, format == ImportFormat::Csv);
        let mut preparer = Preparer::new(rules);
        let mut buffer: Vec<Record> = Vec::with_capacity(chunk_size);
        let mut done = 0u64;
        let limits = Limits {
            max_records: u64::MAX,
            max_field_bytes,
        };
        // The body was checked as it arrived: this is its second reading.
        let read = Scanner::new(format, body, limits).and_then(|mut scan| {
            while let Some(record) = scan.next_record()? {
                buffer.push(record);
                if buffer.len() == chunk_size {
                    done += buffer.len() as u64;
                    let chunk = preparer.chunk(&buffer, done);
                    buffer.clear();
                    // The request went away: stop reading.
                    if tx.blocking_send(Handed::Chunk(chunk)).is_err() {
                        return Ok(false);
                    }
                }
            }
            scan.finish().map(|_| true)
        });
        match read {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                let _ = tx.blocking_send(Handed::Failed(e.to_string()));
                return;
            }
        }
        if !buffer.is_empty() {
            done += buffer.len() as u64;
            let chunk = preparer.chunk(&buffer, done);
            if tx.blocking_send(Handed::Chunk(chunk)).is_err() {
                return;
            }
        }
        let _ = tx.blocking_send(Handed::Done {
            refusal: preparer.refusal(&policy),
        });
    });

    let mut sim = Simulation::default();
    while let Some(prepared) = rx.recv().await {
        let chunk = match prepared {
            Handed::Chunk(chunk) => chunk,
            Handed::Done { refusal } => {
                view.refusal = refusal;
                break;
            }
            Handed::Failed(e) => {
                return Err(dataflow_platform::Error::internal(
                    "the dry run could not read a body that parsed before",
                    std::io::Error::other(e),
                )
                .into());
            }
        };
        view.records += chunk.records.len() as u64 + chunk.replaced + chunk.failed;
        view.rejected += chunk.failed;
        let room = SHOWN.saturating_sub(view.errors.len());
        view.errors
            .extend(chunk.errors.iter().take(room).map(error_view));
        let keys: Vec<&str> = chunk.records.iter().map(|r| r.key.as_str()).collect();
        let stored = db.stored_checksums(client, &keys).await?;
        // Whether each record's stored version is what it would replace (the file did not
        // write its key before), asked before the chunk counts as written.
        let first_time: Vec<bool> = if view.changes.len() < SHOWN {
            chunk.records.iter().map(|r| !sim.rewrites(r)).collect()
        } else {
            Vec::new()
        };
        let changes = sim.apply(&chunk, &stored);
        if view.changes.len() < SHOWN {
            sample(state, p, &chunk, &changes, &first_time, &mut view.changes).await?;
        }
    }
    reader
        .await
        .map_err(|e| dataflow_platform::Error::internal("the dry run's reader panicked", e))?;
    view.valid = view.records - view.rejected;
    if view.refusal.is_some() {
        view.changes.clear();
    } else {
        view.would_insert = sim.tally.would_insert;
        view.would_update = sim.tally.would_update;
        view.unchanged = sim.tally.unchanged;
    }
    Ok(view)
}

/// Adds the chunk's first inserts and updates to `out`, up to [`SHOWN`]; an update with the
/// fields it changes, read from the ledger for those records only.
async fn sample(
    state: &AppState,
    p: &Principal,
    chunk: &Chunk,
    changes: &[Change],
    first_time: &[bool],
    out: &mut Vec<ChangeView>,
) -> ApiResult<()> {
    let picked: Vec<usize> = (0..chunk.records.len())
        .filter(|&i| match changes[i] {
            Change::Insert => true,
            Change::Update => first_time[i],
            Change::Unchanged => false,
        })
        .take(SHOWN - out.len())
        .collect();
    let updated: Vec<&str> = picked
        .iter()
        .filter(|&&i| changes[i] == Change::Update)
        .map(|&i| chunk.records[i].key.as_str())
        .collect();
    let before: HashMap<String, String> = state
        .backends
        .db
        .stored_values(&p.client.id, &updated)
        .await?;
    for i in picked {
        let row = &chunk.records[i];
        let (change, fields) = match changes[i] {
            Change::Update => {
                let old = before.get(&row.key).map_or("{}", String::as_str);
                let fields = field_changes(old, row.data.get())
                    .into_iter()
                    .map(|c| FieldChangeView {
                        field: c.field,
                        old: c.old.and_then(raw),
                        new: c.new.and_then(raw),
                    })
                    .collect();
                (ChangeKind::Update, fields)
            }
            _ => (ChangeKind::Insert, Vec::new()),
        };
        out.push(ChangeView {
            key: row.key.clone(),
            change,
            fields,
        });
    }
    Ok(())
}

fn raw(text: String) -> Option<RawJson> {
    serde_json::value::RawValue::from_string(text)
        .ok()
        .map(RawJson)
}

fn error_view(e: &RowError) -> RecordErrorView {
    RecordErrorView {
        line: e.line,
        field: e.field.clone(),
        code: e.code.clone(),
        detail: e.detail.clone(),
        value: e.value.clone(),
    }
}

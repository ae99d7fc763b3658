//! Turning parsed records into what a batch commits: checked (against the client's schema,
//! or without one the policy's key and required fields), keyed, canonical JSON with a
//! checksum, in chunks of distinct keys in sorted order; and row errors, one per refused
//! cell, for the records that fail.

use std::collections::{BTreeMap, VecDeque};

use crate::domain::records::Record;
use crate::domain::schema::{Cell, Schema, Seen};
use dataflow_contracts::Policy;
use serde::Serialize;
use serde_json::Value;
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

use dataflow_contracts::MAX_RECORD_KEY_BYTES as MAX_KEY_BYTES;

/// How records become rows.
#[derive(Debug, Clone, Copy)]
pub enum Rules<'a> {
    /// No schema: a record is stored as it came, once it has the policy's key field and
    /// required fields.
    Policy(&'a Policy),
    /// The client's schema: cells typed, normalised and checked; the key from its
    /// `primaryKey`, or from the policy's key field when it has none.
    Schema {
        schema: &'a Schema,
        key_field: &'a str,
        /// The file's header was checked once for all its records (CSV): a record's own
        /// columns are not checked again.
        header_checked: bool,
    },
}

impl<'a> Rules<'a> {
    /// A client's rules: its schema when it has one, else its policy.
    pub fn of(schema: Option<&'a Schema>, policy: &'a Policy, header_checked: bool) -> Self {
        match schema {
            Some(schema) => Rules::Schema {
                schema,
                key_field: &policy.key_field,
                header_checked,
            },
            None => Rules::Policy(policy),
        }
    }

    /// The share of refused records above which a batch writes nothing: the schema's, or
    /// the policy's without one.
    pub fn max_error_ratio(&self, policy: &Policy) -> Option<f64> {
        match self {
            Rules::Schema { schema, .. } => schema.max_error_ratio.or(policy.max_error_ratio),
            Rules::Policy(p) => p.max_error_ratio,
        }
    }
}

/// What is wrong with a CSV header under `rules`, as errors of line 1: a column the
/// policy or the schema requires is missing, or (schema, `unknownFields: reject`) a column
/// no field names. Any of them refuses the whole file, before anything is stored.
pub fn header_errors(rules: Rules<'_>, columns: &[String]) -> Vec<RowError> {
    let line_one = |(position, field, code, detail): (u32, String, &str, String)| RowError {
        line: 1,
        position,
        field: Some(field),
        code: code.to_owned(),
        detail,
        value: None,
    };
    match rules {
        Rules::Policy(policy) => std::iter::once(&policy.key_field)
            .chain(&policy.required_fields)
            .find(|f| !columns.contains(f))
            .map(|field| {
                line_one((
                    0,
                    field.clone(),
                    "missing_column",
                    format!(
                        "the header has no column `{field}`, which this client's policy requires"
                    ),
                ))
            })
            .into_iter()
            .collect(),
        Rules::Schema {
            schema, key_field, ..
        } => {
            let mut errors = schema.check_columns(columns.iter().map(String::as_str));
            // Without a primary key the policy's key field names records: some column must
            // hold it (the schema's field of that name, by name or alias, or a column kept
            // as it came), required by the schema or not.
            let key_column = match schema.field_for(key_field) {
                Some(field) => columns.iter().any(|c| field.names(c)),
                None => columns.iter().any(|c| c == key_field),
            };
            let reported = errors
                .iter()
                .any(|e| e.code == "missing_field" && e.field == key_field);
            if schema.primary_key.is_empty() && !key_column && !reported {
                errors.push(crate::domain::schema::FieldError {
                    field: key_field.to_owned(),
                    code: "missing_field",
                    detail: format!(
                        "no column for `{key_field}`, the key field (the schema has no primaryKey)"
                    ),
                    value: None,
                });
            }
            errors
                .into_iter()
                .zip(0..)
                .map(|(e, position)| line_one((position, e.field, e.code, e.detail)))
                .collect()
        }
    }
}

/// One record ready to store.
#[derive(Debug, Clone, Serialize)]
pub struct RecordRow {
    #[serde(rename = "k")]
    pub key: String,
    /// The record as a JSON object (embedded as JSON, not as a string).
    #[serde(rename = "d")]
    pub data: Box<serde_json::value::RawValue>,
    #[serde(rename = "c")]
    pub checksum: String,
}

/// One refused cell (or record) of a record that could not be stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RowError {
    pub line: u64,
    /// The order of this error among its record's.
    pub position: u32,
    pub field: Option<String>,
    pub code: String,
    pub detail: String,
    /// The offending value as it came, shortened.
    pub value: Option<String>,
}

/// What one chunk commits.
pub struct Chunk {
    /// Distinct keys, sorted (a stable lock order keeps concurrent batches deadlock-free).
    pub records: Vec<RecordRow>,
    pub errors: Vec<RowError>,
    /// Records refused (a record may have several errors).
    pub failed: u64,
    /// Records replaced by a later record with the same key in this chunk: counted as
    /// unchanged, so written + unchanged + superseded + failed adds up to the records
    /// handled.
    pub replaced: u64,
    /// Records of the file covered once this chunk commits.
    pub checkpoint: u64,
}

/// A batch's file prepared: the chunks still to commit, and what all its records came to.
pub struct Prepared {
    /// The chunks after the checkpoint, in file order.
    pub chunks: VecDeque<Chunk>,
    /// Records of the file after the checkpoint (the whole file when it is 0).
    pub records: u64,
    /// Of those, refused: the same on every attempt, as the file and the rules are.
    pub failed: u64,
}

impl Prepared {
    /// Why the batch must write nothing, when more than `max_ratio` of its records were
    /// refused.
    pub fn refusal(&self, max_ratio: Option<f64>) -> Option<String> {
        refusal(self.records, self.failed, max_ratio)
    }

    /// Every row error of the file, in order (the whole file is in the chunks when the
    /// checkpoint was 0).
    pub fn errors(&self) -> impl Iterator<Item = &RowError> {
        self.chunks.iter().flat_map(|c| c.errors.iter())
    }
}

fn refusal(records: u64, failed: u64, max_ratio: Option<f64>) -> Option<String> {
    let limit = max_ratio?;
    // The share against the limit as written (0.29 × 100 is 28.999… in floating point: 29 of
    // 100 must pass a limit of 0.29).
    let share = failed as f64 / records.max(1) as f64;
    if share <= limit {
        return None;
    }
    Some(format!(
        "{failed} of {records} records were refused ({:.1} %), more than the share of {limit} \
         the error threshold allows, so the batch writes none of them. Fix the rows the error \
         report lists and import the file again.",
        100.0 * share,
    ))
}

/// Prepares a batch's file: the records after `checkpoint` are checked and cut into chunks
/// of `chunk_size` (those before are read for their `unique` values, which hold across the
/// whole file).
pub fn prepare(
    records: &[Record],
    rules: Rules<'_>,
    chunk_size: usize,
    checkpoint: u64,
) -> Prepared {
    let mut preparer = Preparer::new(rules);
    let skip = usize::try_from(checkpoint)
        .unwrap_or(usize::MAX)
        .min(records.len());
    preparer.skip(&records[..skip]);
    let mut chunks = VecDeque::new();
    let mut done = skip as u64;
    for slice in records[skip..].chunks(chunk_size.max(1)) {
        done += slice.len() as u64;
        chunks.push_back(preparer.chunk(slice, done));
    }
    Prepared {
        chunks,
        records: preparer.records,
        failed: preparer.failed,
    }
}

/// Prepares a file chunk by chunk, in file order, holding what a file-wide check needs
/// (the `unique` values seen) and the counts, and nothing else: a caller that reads a file
/// as a stream holds one chunk at a time.
pub struct Preparer<'a> {
    rules: Rules<'a>,
    seen: Seen,
    /// Records checked so far.
    pub records: u64,
    /// Of those, refused.
    pub failed: u64,
}

impl<'a> Preparer<'a> {
    pub fn new(rules: Rules<'a>) -> Self {
        Preparer {
            rules,
            seen: Seen::default(),
            records: 0,
            failed: 0,
        }
    }

    /// Reads records a resumed batch committed before, for what the records after them
    /// are checked against: the `unique` values they hold. They are not counted: the
    /// refusal was decided before the first chunk.
    pub fn skip(&mut self, records: &[Record]) {
        if let Rules::Schema { schema, .. } = self.rules
            && schema.fields.iter().any(|f| f.unique)
        {
            for record in records {
                let mut row = schema.check_row(&record.fields);
                schema.check_unique(&mut row, &mut self.seen);
            }
        }
    }

    /// The next chunk: `records`, the file's records up to record `checkpoint`.
    pub fn chunk(&mut self, records: &[Record], checkpoint: u64) -> Chunk {
        // Last occurrence wins, as if the records were applied one by one in file order.
        let mut by_key: BTreeMap<String, RecordRow> = BTreeMap::new();
        let mut errors = Vec::new();
        let (mut replaced, mut failed) = (0, 0);
        for record in records {
            match prepare_record(record, self.rules, &mut self.seen) {
                Ok(row) => {
                    if by_key.insert(row.key.clone(), row).is_some() {
                        replaced += 1;
                    }
                }
                Err(e) => {
                    failed += 1;
                    errors.extend(e);
                }
            }
        }
        self.records += records.len() as u64;
        self.failed += failed;
        Chunk {
            records: by_key.into_values().collect(),
            errors,
            failed,
            replaced,
            checkpoint,
        }
    }

    /// Why the file must write nothing, once every record was checked: see
    /// [`Prepared::refusal`].
    pub fn refusal(&self, policy: &Policy) -> Option<String> {
        refusal(
            self.records,
            self.failed,
            self.rules.max_error_ratio(policy),
        )
    }
}

fn prepare_record(
    record: &Record,
    rules: Rules<'_>,
    seen: &mut Seen,
) -> Result<RecordRow, Vec<RowError>> {
    match rules {
        Rules::Policy(policy) => untyped(record, policy).map_err(|e| vec![e]),
        Rules::Schema {
            schema,
            key_field,
            header_checked,
        } => typed(record, schema, key_field, header_checked, seen),
    }
}

fn typed(
    record: &Record,
    schema: &Schema,
    key_field: &str,
    header_checked: bool,
    seen: &mut Seen,
) -> Result<RecordRow, Vec<RowError>> {
    let row = schema.check_record(&record.fields, header_checked, seen);
    if !row.errors.is_empty() {
        return Err(row
            .errors
            .into_iter()
            .zip(0..)
            .map(|(e, position)| RowError {
                line: record.line,
                position,
                field: Some(e.field),
                code: e.code.to_owned(),
                detail: e.detail,
                value: e.value,
            })
            .collect());
    }
    let key = typed_key(schema, key_field, &row.cells)
        .map_err(|(field, code, detail)| vec![row_error(record.line, field, code, detail)])?;
    stored(record.line, key_field, key, row.to_json()).map_err(|e| vec![e])
}

/// The key of a typed record: its `primaryKey` cell as text (a number as normalised, so `07`
/// and `7` are one key), or for a key of several fields their cells as a JSON array.
fn typed_key<'a>(
    schema: &'a Schema,
    key_field: &'a str,
    cells: &[(String, Cell)],
) -> Result<String, (&'a str, &'static str, String)> {
    let names: Vec<&str> = if schema.primary_key.is_empty() {
        vec![key_field]
    } else {
        schema.primary_key.iter().map(String::as_str).collect()
    };
    let mut parts = Vec::with_capacity(names.len());
    for name in &names {
        match cells.iter().find(|(n, _)| n == name).map(|(_, c)| c) {
            None | Some(Cell::Null) => {
                return Err((
                    name,
                    "missing_key",
                    format!("key field `{name}` is missing or empty"),
                ));
            }
            Some(Cell::Text(s)) if s.trim().is_empty() => {
                return Err((
                    name,
                    "missing_key",
                    format!("key field `{name}` is missing or empty"),
                ));
            }
            Some(cell) => parts.push(cell),
        }
    }
    let key = match parts.as_slice() {
        [Cell::Text(s)] => s.clone(),
        [Cell::Number(n)] => n.clone(),
        [one] => one.to_json(),
        many => format!(
            "[{}]",
            many.iter()
                .map(|c| c.to_json())
                .collect::<Vec<_>>()
                .join(",")
        ),
    };
    if key.len() > MAX_KEY_BYTES {
        return Err((
            names[0],
            "key_too_long",
            format!("key longer than {MAX_KEY_BYTES} bytes"),
        ));
    }
    Ok(key)
}

fn row_error(line: u64, field: &str, code: &str, detail: String) -> RowError {
    RowError {
        line,
        position: 0,
        field: Some(field.to_owned()),
        code: code.to_owned(),
        detail,
        value: None,
    }
}

/// A record's canonical JSON with its checksum: equal records, equal bytes.
fn stored(line: u64, key_field: &str, key: String, data: String) -> Result<RecordRow, RowError> {
    let checksum = hex::encode(Sha256::digest(data.as_bytes()));
    let data = RawValue::from_string(data)
        .map_err(|e| row_error(line, key_field, "invalid_record", e.to_string()))?;
    Ok(RecordRow {
        key,
        data,
        checksum,
    })
}

fn untyped(record: &Record, policy: &Policy) -> Result<RecordRow, RowError> {
    let err = |field: &str, code: &str, detail: String| row_error(record.line, field, code, detail);
    for field in &policy.required_fields {
        if is_blank(record.fields.get(field)) {
            return Err(err(
                field,
                "missing_field",
                format!("required field `{field}` is missing or empty"),
            ));
        }
    }
    let key_field = &policy.key_field;
    let key = match record.fields.get(key_field) {
        Some(Value::String(s)) if !s.trim().is_empty() => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        Some(Value::String(_)) | Some(Value::Null) | None => {
            return Err(err(
                key_field,
                "missing_key",
                format!("key field `{key_field}` is missing or empty"),
            ));
        }
        Some(_) => {
            return Err(err(
                key_field,
                "invalid_key",
                format!("key field `{key_field}` must be a string or a number"),
            ));
        }
    };
    if key.len() > MAX_KEY_BYTES {
        return Err(err(
            key_field,
            "key_too_long",
            format!("key longer than {MAX_KEY_BYTES} bytes"),
        ));
    }
    // serde_json's map is ordered by key, so equal records serialise to equal bytes.
    let data = serde_json::to_string(&record.fields).unwrap_or_default();
    stored(record.line, key_field, key, data)
}

fn is_blank(v: Option<&Value>) -> bool {
    match v {
        None | Some(Value::Null) => true,
        Some(Value::String(s)) => s.trim().is_empty(),
        Some(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rec(line: u64, v: Value) -> Record {
        let Value::Object(fields) = v else {
            panic!("test records are objects")
        };
        Record { line, fields }
    }

    fn one_chunk(records: &[Record], rules: Rules<'_>) -> Chunk {
        let mut prepared = prepare(records, rules, 1_000, 0);
        assert_eq!(prepared.chunks.len(), 1);
        prepared.chunks.pop_front().unwrap()
    }

    fn codes(chunk: &Chunk) -> Vec<(u64, u32, &str)> {
        chunk
            .errors
            .iter()
            .map(|e| (e.line, e.position, e.code.as_str()))
            .collect()
    }

    #[test]
    fn validates_keys_required_fields_and_dedups_last_wins() {
        let policy = Policy {
            required_fields: vec!["email".into()],
            ..Policy::default()
        };
        let records = [
            rec(2, json!({"id": "b", "email": "1@x"})),
            rec(3, json!({"id": "a", "email": "2@x"})),
            rec(4, json!({"id": "b", "email": "3@x"})),
            rec(5, json!({"id": "", "email": "4@x"})),
            rec(6, json!({"id": "c", "email": " "})),
            rec(7, json!({"id": 7, "email": "5@x"})),
            rec(8, json!({"id": [1], "email": "6@x"})),
        ];
        let chunk = one_chunk(&records, Rules::Policy(&policy));
        let keys: Vec<&str> = chunk.records.iter().map(|r| r.key.as_str()).collect();
        assert_eq!(keys, ["7", "a", "b"]);
        assert!(chunk.records[2].data.get().contains("3@x"));
        assert_eq!(
            codes(&chunk),
            [
                (5, 0, "missing_key"),
                (6, 0, "missing_field"),
                (8, 0, "invalid_key")
            ]
        );
        assert_eq!((chunk.checkpoint, chunk.replaced, chunk.failed), (7, 1, 3));
    }

    #[test]
    fn checksum_ignores_field_order() {
        let p = Policy::default();
        let a = one_chunk(
            &[rec(1, json!({"id": "1", "x": 1, "y": 2}))],
            Rules::Policy(&p),
        );
        let b = one_chunk(
            &[rec(1, json!({"y": 2, "x": 1, "id": "1"}))],
            Rules::Policy(&p),
        );
        assert_eq!(a.records[0].checksum, b.records[0].checksum);
    }

    fn schema(doc: Value) -> Schema {
        Schema::parse(&doc.to_string()).unwrap()
    }

    fn typed<'a>(schema: &'a Schema) -> Rules<'a> {
        Rules::Schema {
            schema,
            key_field: "id",
            header_checked: false,
        }
    }

    #[test]
    fn a_typed_record_is_stored_normalised_and_keyed_by_its_primary_key() {
        let s = schema(json!({
            "fields": [
                {"name": "sku", "type": "integer", "aliases": ["SKU Code"]},
                {"name": "price", "type": "number"},
                {"name": "day", "type": "date"}
            ],
            "primaryKey": "sku"
        }));
        let a = one_chunk(
            &[rec(
                2,
                json!({"SKU Code": "07", "price": "1.50", "day": "2026-12-06"}),
            )],
            typed(&s),
        );
        let b = one_chunk(
            &[rec(
                2,
                json!({"sku": 7, "price": "1.50", "day": "2026-12-06"}),
            )],
            typed(&s),
        );
        assert_eq!(a.records[0].key, "7");
        assert_eq!(
            a.records[0].data.get(),
            r#"{"sku":7,"price":1.50,"day":"2026-12-06"}"#
        );
        // `07` and `7` are one integer: the same record, unchanged.
        assert_eq!(a.records[0].checksum, b.records[0].checksum);
    }

    #[test]
    fn a_key_of_several_fields_is_their_cells_as_a_json_array() {
        let s = schema(json!({
            "fields": [{"name": "shop"}, {"name": "n", "type": "integer"}],
            "primaryKey": ["shop", "n"]
        }));
        let chunk = one_chunk(
            &[
                rec(2, json!({"shop": "north", "n": "3"})),
                rec(3, json!({"shop": "north"})),
            ],
            typed(&s),
        );
        assert_eq!(chunk.records[0].key, r#"["north",3]"#);
        assert_eq!(codes(&chunk), [(3, 0, "missing_field")]);
    }

    #[test]
    fn every_refused_cell_is_an_error_and_the_record_one_failure() {
        let s = schema(json!({
            "fields": [
                {"name": "id", "type": "integer"},
                {"name": "qty", "type": "integer", "constraints": {"minimum": 1}},
                {"name": "mail", "type": "string", "format": "email", "constraints": {"unique": true}}
            ]
        }));
        let records = [
            rec(2, json!({"id": "1", "qty": "0", "mail": "nope"})),
            rec(
                3,
                json!({"id": "2", "qty": "1", "mail": "a@x.io", "extra": "?"}),
            ),
            rec(4, json!({"id": "3", "qty": "2", "mail": "b@x.io"})),
        ];
        // Chunks of one record: `unique` still holds across the file.
        let prepared = prepare(&records, typed(&s), 1, 0);
        let errors: Vec<(u64, u32, &str, Option<&str>)> = prepared
            .errors()
            .map(|e| (e.line, e.position, e.code.as_str(), e.value.as_deref()))
            .collect();
        assert_eq!(
            errors,
            [
                (2, 0, "constraint.minimum", Some("0")),
                (2, 1, "type", Some("nope")),
                (3, 0, "unknown_field", None)
            ]
        );
        assert_eq!((prepared.records, prepared.failed), (3, 2));
        let dup = [
            rec(2, json!({"id": "1", "qty": "1", "mail": "a@x.io"})),
            rec(3, json!({"id": "2", "qty": "1", "mail": "a@x.io"})),
        ];
        let prepared = prepare(&dup, typed(&s), 1, 0);
        assert_eq!(
            prepared
                .errors()
                .map(|e| e.code.as_str())
                .collect::<Vec<_>>(),
            ["constraint.unique"]
        );
        // Resumed past the first record: it is checked again (its value is seen), not
        // written again.
        let resumed = prepare(&dup, typed(&s), 1, 1);
        assert_eq!(resumed.chunks.len(), 1);
        assert_eq!(resumed.failed, 1);
    }

    #[test]
    fn a_header_without_the_key_column_is_refused_whatever_the_field_requires() {
        let s = schema(json!({"fields": [{"name": "id", "aliases": ["Ref"]}, {"name": "x"}]}));
        let cols = |c: &[&str]| c.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let codes = |c: &[&str]| -> Vec<(String, String)> {
            header_errors(typed(&s), &cols(c))
                .into_iter()
                .map(|e| (e.field.unwrap(), e.code))
                .collect()
        };
        assert_eq!(
            codes(&["x"]),
            [("id".to_owned(), "missing_field".to_owned())]
        );
        assert!(codes(&["REF", "x"]).is_empty(), "an alias holds it");
        let keyed =
            schema(json!({"fields": [{"name": "sku"}, {"name": "id"}], "primaryKey": "sku"}));
        assert!(header_errors(typed(&keyed), &cols(&["sku"])).is_empty());
    }

    #[test]
    fn a_file_is_refused_only_above_its_threshold() {
        let p = Policy::default();
        let records: Vec<Record> = (0..10)
            .map(|i| {
                rec(
                    i + 2,
                    if i < 3 {
                        json!({"x": 1})
                    } else {
                        json!({"id": i})
                    },
                )
            })
            .collect();
        let prepared = prepare(&records, Rules::Policy(&p), 4, 0);
        assert_eq!((prepared.records, prepared.failed), (10, 3));
        assert_eq!(prepared.refusal(None), None);
        assert_eq!(
            prepared.refusal(Some(0.3)),
            None,
            "exactly at the threshold"
        );
        let at = |failed, records, limit| refusal(records, failed, Some(limit)).is_none();
        assert!(at(29, 100, 0.29) && at(1, 3, 1.0 / 3.0) && at(0, 0, 0.0));
        assert!(!at(30, 100, 0.29));
        let why = prepared.refusal(Some(0.25)).unwrap();
        assert!(
            why.starts_with("3 of 10 records were refused (30.0 %)"),
            "{why}"
        );
        assert_eq!(prepared.errors().count(), 3);
    }
}

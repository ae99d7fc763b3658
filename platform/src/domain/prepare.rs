//! Turning parsed records into what a chunk commits: validated, keyed, canonical JSON with
//! a checksum, distinct keys in sorted order; and row errors for records that fail.

use std::collections::BTreeMap;

use crate::domain::records::Record;
use dataflow_contracts::Policy;
use serde::Serialize;
use serde_json::Value;
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

use dataflow_contracts::MAX_RECORD_KEY_BYTES as MAX_KEY_BYTES;

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

/// One record that could not be stored.
#[derive(Debug, Clone, Serialize)]
pub struct RowError {
    pub line: u64,
    pub field: Option<String>,
    pub code: String,
    pub detail: String,
}

/// What one chunk commits.
pub struct Chunk {
    /// Distinct keys, sorted (a stable lock order keeps concurrent batches deadlock-free).
    pub records: Vec<RecordRow>,
    pub errors: Vec<RowError>,
    /// Records replaced by a later record with the same key in this chunk: counted as
    /// unchanged, so written + unchanged + superseded + failed adds up to the records
    /// handled.
    pub replaced: u64,
    /// Records of the file covered once this chunk commits.
    pub checkpoint: u64,
}

/// Prepares `records` (a slice of the file ending at record `checkpoint`).
pub fn prepare_chunk(records: &[Record], policy: &Policy, checkpoint: u64) -> Chunk {
    // Last occurrence wins, as if the records were applied one by one in file order.
    let mut by_key: BTreeMap<String, RecordRow> = BTreeMap::new();
    let mut errors = Vec::new();
    let mut replaced = 0;
    for record in records {
        match prepare_record(record, policy) {
            Ok(row) => {
                if by_key.insert(row.key.clone(), row).is_some() {
                    replaced += 1;
                }
            }
            Err(e) => errors.push(e),
        }
    }
    Chunk {
        records: by_key.into_values().collect(),
        errors,
        replaced,
        checkpoint,
    }
}

fn prepare_record(record: &Record, policy: &Policy) -> Result<RecordRow, RowError> {
    let err = |field: &str, code: &str, detail: String| RowError {
        line: record.line,
        field: Some(field.to_owned()),
        code: code.to_owned(),
        detail,
    };
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
    let checksum = hex::encode(Sha256::digest(data.as_bytes()));
    let data =
        RawValue::from_string(data).map_err(|e| err(key_field, "invalid_record", e.to_string()))?;
    Ok(RecordRow {
        key,
        data,
        checksum,
    })
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
        let chunk = prepare_chunk(&records, &policy, 7);
        let keys: Vec<&str> = chunk.records.iter().map(|r| r.key.as_str()).collect();
        assert_eq!(keys, ["7", "a", "b"]);
        assert!(chunk.records[2].data.get().contains("3@x"));
        let codes: Vec<(u64, &str)> = chunk
            .errors
            .iter()
            .map(|e| (e.line, e.code.as_str()))
            .collect();
        assert_eq!(
            codes,
            [(5, "missing_key"), (6, "missing_field"), (8, "invalid_key")]
        );
        assert_eq!((chunk.checkpoint, chunk.replaced), (7, 1));
    }

    #[test]
    fn checksum_ignores_field_order() {
        let p = Policy::default();
        let a = prepare_chunk(&[rec(1, json!({"id": "1", "x": 1, "y": 2}))], &p, 1);
        let b = prepare_chunk(&[rec(1, json!({"y": 2, "x": 1, "id": "1"}))], &p, 1);
        assert_eq!(a.records[0].checksum, b.records[0].checksum);
    }
}

//! What an import would change, worked out without writing: each prepared record against
//! what the ledger holds for its key, chunk by chunk, exactly as the worker's upserts would
//! go (a dry run must agree with the import that follows it).
//!
//! A record whose key the file wrote already in an earlier chunk is judged against that
//! earlier version, as the worker's later chunk would meet it. Keys and checksums of the
//! file are held as 64-bit hashes, so a file of a million keys costs a few tens of MB, not
//! its keys' text.

use std::collections::HashMap;
use std::hash::BuildHasher;

use serde_json::Value;
use serde_json::value::RawValue;

use super::prepare::{Chunk, RecordRow};

/// What one prepared record would do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Insert,
    Update,
    Unchanged,
}

/// The counts of a dry run so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    pub would_insert: u64,
    pub would_update: u64,
    /// Records the import would leave as they are, including a record a later one of the
    /// same chunk replaces (as the worker counts them).
    pub unchanged: u64,
}

/// The running comparison of one file.
#[derive(Debug, Default)]
pub struct Simulation {
    /// Key hash → checksum hash of every record the file would have written so far.
    written: HashMap<u64, u64>,
    hasher: std::hash::RandomState,
    pub tally: Tally,
}

impl Simulation {
    fn hash(&self, text: &str) -> u64 {
        self.hasher.hash_one(text)
    }

    /// The changes of `chunk`'s records (in its order), given the checksums the ledger
    /// holds now for its keys (`stored`, by key; a key absent there is absent from the
    /// ledger).
    pub fn apply(&mut self, chunk: &Chunk, stored: &HashMap<String, String>) -> Vec<Change> {
        self.tally.unchanged += chunk.replaced;
        chunk
            .records
            .iter()
            .map(|row| {
                let (key, sum) = (self.hash(&row.key), self.hash(&row.checksum));
                let before = match self.written.get(&key) {
                    Some(earlier) => Some(*earlier == sum),
                    None => stored.get(&row.key).map(|s| *s == row.checksum),
                };
                let change = match before {
                    None => Change::Insert,
                    Some(true) => Change::Unchanged,
                    Some(false) => Change::Update,
                };
                match change {
                    Change::Insert => self.tally.would_insert += 1,
                    Change::Update => self.tally.would_update += 1,
                    Change::Unchanged => self.tally.unchanged += 1,
                }
                self.written.insert(key, sum);
                change
            })
            .collect()
    }

    /// Whether the file wrote `row`'s key in an earlier chunk (its stored version is then
    /// not what the record would replace).
    pub fn rewrites(&self, row: &RecordRow) -> bool {
        self.written.contains_key(&self.hash(&row.key))
    }
}

/// One field that an update would change: its value before and after, as JSON text
/// (`None`: the field is absent on that side).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldChange {
    pub field: String,
    pub old: Option<String>,
    pub new: Option<String>,
}

/// The fields of the stored record `old` that `new` would change, in `new`'s field order
/// (then the fields only `old` has). Values are compared as JSON, and numbers also by
/// their digits (`1.50` replacing `1.5` is a change: the checksum sees one).
pub fn field_changes(old: &str, new: &str) -> Vec<FieldChange> {
    // Both sides are JSON objects (the ledger holds nothing else); a side that is not reads
    // as empty and every field shows as added or removed.
    let fields = |text: &str| object_fields(text).unwrap_or_default();
    let (old, new) = (fields(old), fields(new));
    let mut changes = Vec::new();
    for (name, value) in &new {
        let before = old.iter().find(|(n, _)| n == name).map(|(_, v)| v);
        if before.is_none_or(|b| !same(b, value)) {
            changes.push(FieldChange {
                field: name.clone(),
                old: before.map(|b| b.get().to_owned()),
                new: Some(value.get().to_owned()),
            });
        }
    }
    for (name, value) in &old {
        if !new.iter().any(|(n, _)| n == name) {
            changes.push(FieldChange {
                field: name.clone(),
                old: Some(value.get().to_owned()),
                new: None,
            });
        }
    }
    changes
}

/// A JSON object's fields in their order, each value as its JSON text (`serde_json`'s own
/// map would sort them and read numbers into floats); `None` when `text` is not an object.
pub fn object_fields(text: &str) -> Option<Vec<(String, Box<RawValue>)>> {
    serde_json::from_str::<ordered::Fields>(text)
        .ok()
        .map(|f| f.0)
}

/// Equal as JSON, and as written where either is a number.
fn same(a: &RawValue, b: &RawValue) -> bool {
    if a.get() == b.get() {
        return true;
    }
    match (
        serde_json::from_str::<Value>(a.get()),
        serde_json::from_str::<Value>(b.get()),
    ) {
        (Ok(Value::Number(_)), _) | (_, Ok(Value::Number(_))) => a.get().trim() == b.get().trim(),
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

/// An object's fields in their order, each value as its JSON text.
mod ordered {
    use serde::de::{Deserializer, MapAccess, Visitor};
    use serde_json::value::RawValue;

    pub struct Fields(pub Vec<(String, Box<RawValue>)>);

    impl<'de> serde::Deserialize<'de> for Fields {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct Ordered;
            impl<'de> Visitor<'de> for Ordered {
                type Value = Fields;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("a JSON object")
                }
                fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Fields, M::Error> {
                    let mut fields = Vec::new();
                    while let Some(entry) = map.next_entry::<String, Box<RawValue>>()? {
                        fields.push(entry);
                    }
                    Ok(Fields(fields))
                }
            }
            d.deserialize_map(Ordered)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::prepare::{Preparer, Rules};
    use crate::domain::records::Record;
    use dataflow_contracts::Policy;
    use serde_json::json;

    fn chunk(p: &mut Preparer<'_>, rows: &[Value]) -> Chunk {
        let records: Vec<Record> = rows
            .iter()
            .zip(2..)
            .map(|(v, line)| Record {
                line,
                fields: v.as_object().unwrap().clone(),
            })
            .collect();
        p.chunk(&records, 0)
    }

    #[test]
    fn each_record_is_judged_against_the_ledger_then_against_the_file_itself() {
        let policy = Policy::default();
        let mut p = Preparer::new(Rules::Policy(&policy));
        let mut sim = Simulation::default();
        let first = chunk(
            &mut p,
            &[
                json!({"id": "a", "v": 1}),
                json!({"id": "b", "v": 1}),
                json!({"id": "c", "v": 1}),
                json!({"id": "c", "v": 2}),
            ],
        );
        let stored: HashMap<String, String> = [
            ("a".to_owned(), first.records[0].checksum.clone()),
            ("b".to_owned(), "another".to_owned()),
        ]
        .into();
        assert_eq!(
            sim.apply(&first, &stored),
            [Change::Unchanged, Change::Update, Change::Insert]
        );
        // A later chunk meets what the earlier one wrote, not what the ledger held.
        let second = chunk(
            &mut p,
            &[json!({"id": "b", "v": 1}), json!({"id": "c", "v": 3})],
        );
        assert!(sim.rewrites(&second.records[0]));
        assert_eq!(
            sim.apply(&second, &stored),
            [Change::Unchanged, Change::Update]
        );
        assert_eq!(
            sim.tally,
            Tally {
                would_insert: 1,
                would_update: 2,
                unchanged: 3
            }
        );
    }

    #[test]
    fn a_field_change_keeps_the_digits_and_names_added_and_removed_fields() {
        let changes = field_changes(
            r#"{"sku": 7, "price": 1.5, "gone": "x", "tags": ["a", "b"]}"#,
            r#"{"sku":7,"price":1.50,"tags":["a","b"],"new":true}"#,
        );
        let shown: Vec<(&str, Option<&str>, Option<&str>)> = changes
            .iter()
            .map(|c| (c.field.as_str(), c.old.as_deref(), c.new.as_deref()))
            .collect();
        assert_eq!(
            shown,
            [
                ("price", Some("1.5"), Some("1.50")),
                ("new", None, Some("true")),
                ("gone", Some("\"x\""), None),
            ]
        );
    }
}

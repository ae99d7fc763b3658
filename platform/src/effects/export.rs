//! A client's records written out: one JSON object per line (NDJSON), or CSV whose columns
//! are fixed before the first row (an export is a stream, so it cannot look ahead): the
//! key, then the schema's fields, or without a schema the fields of the first records read;
//! a field outside those goes, with the others like it, into a last `_extra` column as a
//! JSON object, so nothing is lost. CSV cells are defused for spreadsheets
//! ([`super::report::safe_cell`]; numbers stay numbers).

use dataflow_contracts::http::RecordView;
use serde_json::value::RawValue;

use super::report::safe_cell;
use crate::domain::diff::object_fields;

/// One record as an NDJSON line: `{"key": …, "data": {…}, "batch_id": …, "updated_at": …}`.
pub fn ndjson_line(record: &RecordView) -> String {
    let mut line = serde_json::to_string(record).unwrap_or_default();
    line.push('\n');
    line
}

/// The columns of a CSV export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CsvColumns {
    fields: Vec<String>,
    /// Whether a record can have fields outside `fields` (they go to `_extra`).
    extra: bool,
}

impl CsvColumns {
    /// The schema's fields. Records may still hold others (kept as they came, or written
    /// under an earlier version or before the schema): they go to `_extra`.
    pub fn of_schema(fields: Vec<String>) -> Self {
        CsvColumns {
            fields,
            extra: true,
        }
    }

    /// Without a schema: the fields of `sample`, in the order they first appear.
    pub fn of_records(sample: &[RecordView]) -> Self {
        let mut fields: Vec<String> = Vec::new();
        for record in sample {
            for (name, _) in object_fields(record.data.0.get()).unwrap_or_default() {
                if !fields.contains(&name) {
                    fields.push(name);
                }
            }
        }
        CsvColumns {
            fields,
            extra: true,
        }
    }

    pub fn header(&self) -> Vec<u8> {
        let mut names = vec!["key"];
        names.extend(self.fields.iter().map(String::as_str));
        if self.extra {
            names.push("_extra");
        }
        write_row(names.into_iter().map(|n| safe_cell(n).into_owned()))
    }

    pub fn row(&self, record: &RecordView) -> Vec<u8> {
        let mut cells: Vec<Option<&RawValue>> = vec![None; self.fields.len()];
        let all = object_fields(record.data.0.get()).unwrap_or_default();
        let mut extra: Vec<(&str, &RawValue)> = Vec::new();
        for (name, value) in &all {
            match self.fields.iter().position(|f| f == name) {
                Some(i) => cells[i] = Some(value),
                None => extra.push((name, value)),
            }
        }
        let mut row = vec![record.key.clone()];
        row.extend(cells.into_iter().map(|v| v.map(cell).unwrap_or_default()));
        if self.extra && !extra.is_empty() {
            let object = extra
                .iter()
                .map(|(n, v)| format!("{}:{}", serde_json::Value::from(*n), v.get()))
                .collect::<Vec<_>>()
                .join(",");
            row.push(format!("{{{object}}}"));
        } else if self.extra {
            row.push(String::new());
        }
        write_row(row.into_iter().map(|c| safe_cell(&c).into_owned()))
    }
}

/// A value as a CSV cell: text as itself, `null` as empty, anything else as its JSON.
fn cell(value: &RawValue) -> String {
    let text = value.get();
    if text == "null" {
        return String::new();
    }
    serde_json::from_str::<String>(text).unwrap_or_else(|_| text.to_owned())
}

fn write_row(cells: impl Iterator<Item = String>) -> Vec<u8> {
    let mut w = csv::Writer::from_writer(Vec::new());
    // Writing into a Vec cannot fail.
    let _ = w.write_record(cells);
    w.into_inner().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use dataflow_contracts::BatchId;
    use dataflow_contracts::http::RawJson;

    fn record(key: &str, data: &str) -> RecordView {
        RecordView {
            key: key.into(),
            data: RawJson(RawValue::from_string(data.into()).unwrap()),
            checksum: "c".into(),
            batch_id: BatchId::generate(),
            updated_at: "2026-12-06T00:00:00.000Z".into(),
        }
    }

    #[test]
    fn a_csv_export_keeps_digits_defuses_formulas_and_loses_no_field() {
        let first = record(
            "1",
            r#"{"name": "Ann, \"A\"", "price": 1.50, "tags": ["x"]}"#,
        );
        let later = record("2", r#"{"name": "=cmd", "price": null, "colour": "red"}"#);
        let cols = CsvColumns::of_records(std::slice::from_ref(&first));
        let text = String::from_utf8([cols.header(), cols.row(&first), cols.row(&later)].concat())
            .unwrap();
        assert_eq!(
            text,
            "key,name,price,tags,_extra\n\
             1,\"Ann, \"\"A\"\"\",1.50,\"[\"\"x\"\"]\",\n\
             2,'=cmd,,,\"{\"\"colour\"\":\"\"red\"\"}\"\n"
        );
        let typed = CsvColumns::of_schema(vec!["price".into()]);
        assert_eq!(typed.header(), b"key,price,_extra\n");
        let negative = record("-2", r#"{"price": -1.50}"#);
        assert_eq!(
            typed.row(&negative),
            b"-2,-1.50,\n",
            "a number is not defused"
        );
        assert_eq!(
            String::from_utf8(typed.row(&first)).unwrap(),
            "1,1.50,\"{\"\"name\"\":\"\"Ann, \\\"\"A\\\"\"\"\",\"\"tags\"\":[\"\"x\"\"]}\"\n"
        );
    }

    #[test]
    fn an_ndjson_line_is_the_record_as_the_api_shows_it() {
        let line = ndjson_line(&record("k", r#"{"price":1.50}"#));
        assert!(
            line.starts_with(r#"{"key":"k","data":{"price":1.50},"checksum":"c""#),
            "{line}"
        );
        assert!(line.ends_with("}\n"));
    }
}

//! Parsing of submitted record files (CSV with a header row, or NDJSON) under limits.
//!
//! The API parses every body once to refuse malformed input before anything is stored; the
//! worker parses the stored payload again to process it. Both go through [`parse`], so a
//! payload the API accepted is one the worker can read.

use std::collections::HashSet;
use std::fmt;

use dataflow_contracts::ImportFormat;
use serde_json::{Map, Value};

/// Integers above this lose digits in an `f64`; such numbers must be sent as strings.
const MAX_EXACT_FLOAT: f64 = 9_007_199_254_740_992.0; // 2^53
/// More columns than this is not a record file anyone means to send.
const MAX_COLUMNS: usize = 1_000;
const BOM: &[u8] = b"\xEF\xBB\xBF";

/// A malformed body, located precisely enough for the sender to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    /// 1-based line of the file (CSV: the header is line 1).
    pub line: u64,
    pub field: Option<String>,
    pub code: &'static str,
    pub detail: String,
}

impl ParseError {
    fn new(line: u64, code: &'static str, detail: impl Into<String>) -> Self {
        Self {
            line,
            field: None,
            code,
            detail: detail.into(),
        }
    }

    fn with_field(mut self, field: &str) -> Self {
        self.field = Some(field.to_owned());
        self
    }
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}", self.line)?;
        if let Some(field) = &self.field {
            write!(f, ", field `{field}`")?;
        }
        write!(f, ": {}", self.detail)
    }
}

impl std::error::Error for ParseError {}

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_records: u64,
    pub max_field_bytes: usize,
}

/// One record and the line it started on.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub line: u64,
    pub fields: Map<String, Value>,
}

/// What a successful parse saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub records: u64,
    /// CSV only: the header row.
    pub columns: Option<Vec<String>>,
}

/// Parses `body` and hands each record to `sink` in order. Stops at the first error.
pub fn parse(
    format: ImportFormat,
    body: &[u8],
    limits: Limits,
    mut sink: impl FnMut(Record),
) -> Result<Summary, ParseError> {
    parse_into(format, body, limits, Some(&mut sink))
}

/// The same checks as [`parse`] without building the records: the API's admission test.
pub fn validate(format: ImportFormat, body: &[u8], limits: Limits) -> Result<Summary, ParseError> {
    parse_into(format, body, limits, None)
}

type Sink<'a> = Option<&'a mut dyn FnMut(Record)>;

fn parse_into(
    format: ImportFormat,
    body: &[u8],
    limits: Limits,
    mut sink: Sink<'_>,
) -> Result<Summary, ParseError> {
    let body = body.strip_prefix(BOM).unwrap_or(body);
    let text = check_text(body)?;
    let summary = match format {
        ImportFormat::Csv => parse_csv(text, limits, &mut sink)?,
        ImportFormat::Ndjson => parse_ndjson(text, limits, &mut sink)?,
    };
    if summary.records == 0 {
        return Err(ParseError::new(
            1,
            "empty_import",
            "the body contains no records",
        ));
    }
    Ok(summary)
}

/// Valid UTF-8 without NUL bytes, or an error on the line of the first bad byte.
fn check_text(body: &[u8]) -> Result<&str, ParseError> {
    let line_of = |pos: usize| 1 + body[..pos].iter().filter(|&&b| b == b'\n').count() as u64;
    let text = std::str::from_utf8(body).map_err(|e| {
        ParseError::new(
            line_of(e.valid_up_to()),
            "invalid_utf8",
            "the body is not valid UTF-8",
        )
    })?;
    if let Some(pos) = body.iter().position(|&b| b == 0) {
        return Err(ParseError::new(
            line_of(pos),
            "nul_byte",
            "the body contains a NUL byte",
        ));
    }
    Ok(text)
}

fn parse_csv(text: &str, limits: Limits, sink: &mut Sink<'_>) -> Result<Summary, ParseError> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(false)
        .from_reader(text.as_bytes());
    let headers = reader.headers().map_err(|e| csv_error(&e, 1))?.clone();
    let columns: Vec<String> = headers.iter().map(str::to_owned).collect();
    if columns.is_empty() || (columns.len() == 1 && columns[0].is_empty()) {
        return Err(ParseError::new(
            1,
            "no_header",
            "the first line must be a header row",
        ));
    }
    if columns.len() > MAX_COLUMNS {
        return Err(ParseError::new(
            1,
            "too_many_columns",
            format!("more than {MAX_COLUMNS} columns"),
        ));
    }
    let mut seen = HashSet::new();
    for (i, name) in columns.iter().enumerate() {
        if name.trim().is_empty() {
            return Err(ParseError::new(
                1,
                "empty_header",
                format!("column {} has no name", i + 1),
            ));
        }
        if !seen.insert(name.as_str()) {
            return Err(ParseError::new(
                1,
                "duplicate_header",
                format!("column `{name}` appears twice"),
            )
            .with_field(name));
        }
    }

    let mut records = 0u64;
    let mut last_start = 0usize;
    let mut line = 1u64;
    let mut row = csv::StringRecord::new();
    loop {
        match reader.read_record(&mut row) {
            Ok(false) => break,
            Ok(true) => {}
            Err(e) => return Err(csv_error(&e, 0)),
        }
        // Lines are counted from the record's byte offset: the reader's own line counter
        // is off by one after a CRLF.
        let mut start = row.position().map_or(last_start, |p| p.byte() as usize);
        // After a CRLF the reported offset points at the LF; records never start with one.
        while matches!(text.as_bytes().get(start), Some(b'\r' | b'\n')) {
            start += 1;
        }
        line += text.as_bytes()[last_start..start]
            .iter()
            .filter(|&&b| b == b'\n')
            .count() as u64;
        last_start = start;
        let pos = (line, start);
        records += 1;
        if records > limits.max_records {
            return Err(too_many(pos.0, limits.max_records));
        }
        for (name, value) in columns.iter().zip(row.iter()) {
            if value.len() > limits.max_field_bytes {
                return Err(field_too_long(pos.0, name, limits.max_field_bytes));
            }
        }
        if let Some(sink) = sink {
            let fields = columns
                .iter()
                .zip(row.iter())
                .map(|(n, v)| (n.clone(), Value::String(v.to_owned())));
            sink(Record {
                line: pos.0,
                fields: fields.collect(),
            });
        }
    }
    // The csv reader treats an opening quote that is never closed as running to the end of
    // input. Every well-formed record has an even number of quote characters, so an odd
    // count in the last one means its quote was never closed.
    if records > 0
        && text.as_bytes()[last_start..]
            .iter()
            .filter(|&&b| b == b'"')
            .count()
            % 2
            == 1
    {
        return Err(ParseError::new(
            line,
            "unterminated_quote",
            "a quoted field is never closed",
        ));
    }
    Ok(Summary {
        records,
        columns: Some(columns),
    })
}

fn csv_error(e: &csv::Error, fallback_line: u64) -> ParseError {
    let line = e.position().map_or(fallback_line, csv::Position::line);
    match e.kind() {
        csv::ErrorKind::UnequalLengths {
            expected_len, len, ..
        } => ParseError::new(
            line,
            "ragged_row",
            format!("expected {expected_len} fields like the header, found {len}"),
        ),
        csv::ErrorKind::Utf8 { .. } => {
            ParseError::new(line, "invalid_utf8", "the body is not valid UTF-8")
        }
        other => ParseError::new(line, "csv_syntax", format!("{other:?}")),
    }
}

fn parse_ndjson(text: &str, limits: Limits, sink: &mut Sink<'_>) -> Result<Summary, ParseError> {
    let mut records = 0u64;
    for (i, raw) in text.split('\n').enumerate() {
        let line = i as u64 + 1;
        let raw = raw.strip_suffix('\r').unwrap_or(raw);
        if raw.trim().is_empty() {
            continue;
        }
        records += 1;
        if records > limits.max_records {
            return Err(too_many(line, limits.max_records));
        }
        let value: Value = serde_json::from_str(raw).map_err(|e| {
            ParseError::new(line, "invalid_json", format!("column {}: {e}", e.column()))
        })?;
        let Value::Object(fields) = value else {
            return Err(ParseError::new(
                line,
                "not_an_object",
                "each line must be one JSON object",
            ));
        };
        for (name, v) in &fields {
            if name.contains('\0') {
                let (code, detail) = nul_escape();
                return Err(ParseError::new(line, code, detail));
            }
            check_json_value(v, limits.max_field_bytes)
                .map_err(|(code, detail)| ParseError::new(line, code, detail).with_field(name))?;
        }
        if let Some(sink) = sink {
            sink(Record { line, fields });
        }
    }
    Ok(Summary {
        records,
        columns: None,
    })
}

/// Strings within the field limit; numbers that survive the trip through `f64` unchanged.
fn check_json_value(v: &Value, max_field_bytes: usize) -> Result<(), (&'static str, String)> {
    match v {
        Value::String(s) if s.len() > max_field_bytes => Err((
            "field_too_long",
            format!("value longer than {max_field_bytes} bytes"),
        )),
        // `\u0000` is valid JSON but no SQL text column can hold it.
        Value::String(s) if s.contains('\0') => Err(nul_escape()),
        Value::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() && f.fract() == 0.0 && f.abs() >= MAX_EXACT_FLOAT => Err((
                "number_out_of_range",
                "number too large to keep exactly; send it as a string".to_owned(),
            )),
            _ => Ok(()),
        },
        Value::Array(items) => items
            .iter()
            .try_for_each(|i| check_json_value(i, max_field_bytes)),
        Value::Object(map) if map.keys().any(|k| k.contains('\0')) => Err(nul_escape()),
        Value::Object(map) => map
            .values()
            .try_for_each(|i| check_json_value(i, max_field_bytes)),
        _ => Ok(()),
    }
}

fn nul_escape() -> (&'static str, String) {
    (
        "nul_character",
        "strings must not contain the NUL character (\\u0000)".to_owned(),
    )
}

fn too_many(line: u64, max: u64) -> ParseError {
    ParseError::new(line, "too_many_records", format!("more than {max} records"))
}

fn field_too_long(line: u64, field: &str, max: usize) -> ParseError {
    ParseError::new(
        line,
        "field_too_long",
        format!("value longer than {max} bytes"),
    )
    .with_field(field)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_records: 100,
        max_field_bytes: 64,
    };

    fn collect(format: ImportFormat, body: &str) -> Result<Vec<Record>, ParseError> {
        let mut out = Vec::new();
        parse(format, body.as_bytes(), LIMITS, |r| out.push(r))?;
        Ok(out)
    }

    fn err(format: ImportFormat, body: &[u8]) -> ParseError {
        parse(format, body, LIMITS, |_| {}).unwrap_err()
    }

    #[test]
    fn csv_with_bom_quotes_and_mixed_line_endings() {
        let recs = collect(
            ImportFormat::Csv,
            "\u{feff}id,name\r\n1,\"a, b\"\n2,\"multi\nline\"\r\n3,c",
        )
        .unwrap();
        assert_eq!(recs.len(), 3);
        assert_eq!(recs[0].line, 2);
        assert_eq!(recs[0].fields["name"], "a, b");
        assert_eq!(recs[1].fields["name"], "multi\nline");
        assert_eq!(recs[2].line, 5);
        assert!(
            recs[0].fields.contains_key("id"),
            "the BOM must not stick to the first header"
        );
    }

    #[test]
    fn csv_errors_name_the_line() {
        let e = err(ImportFormat::Csv, b"id,name\n1,a\n2\n");
        assert_eq!((e.code, e.line), ("ragged_row", 3));
        let e = err(ImportFormat::Csv, b"id,name\n1,a\n2,\"open\n3,c\n");
        assert_eq!((e.code, e.line), ("unterminated_quote", 3));
        assert_eq!(
            err(ImportFormat::Csv, b"id,id\n1,2\n").code,
            "duplicate_header"
        );
        assert_eq!(err(ImportFormat::Csv, b"id,\n1,2\n").code, "empty_header");
        assert_eq!(err(ImportFormat::Csv, b"id\n").code, "empty_import");
        assert_eq!(err(ImportFormat::Csv, b"").code, "no_header");
        let e = err(ImportFormat::Csv, b"id\n1\n\xff\n");
        assert_eq!((e.code, e.line), ("invalid_utf8", 3));
        let e = err(ImportFormat::Csv, b"id\n1\n2\0\n");
        assert_eq!((e.code, e.line), ("nul_byte", 3));
        let long = format!("id\n{}\n", "x".repeat(65));
        let e = err(ImportFormat::Csv, long.as_bytes());
        assert_eq!((e.code, e.field.as_deref()), ("field_too_long", Some("id")));
    }

    #[test]
    fn record_limit() {
        let body: String = std::iter::once("id\n".to_owned())
            .chain((0..101).map(|i| format!("{i}\n")))
            .collect();
        let e = err(ImportFormat::Csv, body.as_bytes());
        assert_eq!((e.code, e.line), ("too_many_records", 102));
    }

    #[test]
    fn ndjson_records_and_errors() {
        let recs = collect(
            ImportFormat::Ndjson,
            "{\"id\":1}\r\n\n{\"id\":\"b\",\"n\":{\"x\":[1,2]}}\n",
        )
        .unwrap();
        assert_eq!(recs.len(), 2);
        assert_eq!(recs[1].line, 3);
        let e = err(ImportFormat::Ndjson, b"{\"id\":1}\n[1]\n");
        assert_eq!((e.code, e.line), ("not_an_object", 2));
        let e = err(ImportFormat::Ndjson, b"{\"id\":1}\n{\"id\":\n");
        assert_eq!((e.code, e.line), ("invalid_json", 2));
        let e = err(
            ImportFormat::Ndjson,
            b"{\"n\":123456789012345678901234567890}",
        );
        assert_eq!(
            (e.code, e.field.as_deref()),
            ("number_out_of_range", Some("n"))
        );
        assert_eq!(
            err(ImportFormat::Ndjson, b"{\"n\":1e999}").code,
            "invalid_json"
        );
        assert_eq!(err(ImportFormat::Ndjson, b"\n \n").code, "empty_import");
        assert_eq!(
            err(ImportFormat::Ndjson, br#"{"id":"a\u0000"}"#).code,
            "nul_character"
        );
        assert_eq!(
            err(ImportFormat::Ndjson, br#"{"a\u0000":1}"#).code,
            "nul_character"
        );
        assert_eq!(
            err(ImportFormat::Ndjson, br#"{"a":{"b":["\u0000"]}}"#).code,
            "nul_character"
        );
    }

    #[test]
    fn ndjson_depth_bomb_is_an_error_not_a_crash() {
        let bomb = format!("{{\"a\":{}{}}}", "[".repeat(100_000), "]".repeat(100_000));
        assert_eq!(
            err(ImportFormat::Ndjson, bomb.as_bytes()).code,
            "invalid_json"
        );
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn field() -> impl Strategy<Value = String> {
            // Commas, quotes, CR/LF and non-ASCII: everything CSV quoting has to carry.
            proptest::string::string_regex("[a-z0-9 ,\"\r\né€]{0,12}").expect("valid regex")
        }

        proptest! {
            #[test]
            fn csv_written_by_a_csv_writer_reads_back_exactly(
                rows in proptest::collection::vec(proptest::collection::vec(field(), 3), 1..20)
            ) {
                let mut w = csv::Writer::from_writer(Vec::new());
                w.write_record(["a", "b", "c"]).unwrap();
                for r in &rows {
                    w.write_record(r).unwrap();
                }
                let body = w.into_inner().unwrap();
                let limits = Limits { max_records: 1000, max_field_bytes: 1000 };
                let mut got = Vec::new();
                parse(ImportFormat::Csv, &body, limits, |r| got.push(r)).unwrap();
                prop_assert_eq!(got.len(), rows.len());
                for (rec, row) in got.iter().zip(&rows) {
                    for (name, value) in ["a", "b", "c"].iter().zip(row) {
                        prop_assert_eq!(rec.fields[*name].as_str(), Some(value.as_str()));
                    }
                }
            }

            #[test]
            fn arbitrary_bytes_never_panic(body in proptest::collection::vec(any::<u8>(), 0..400)) {
                let limits = Limits { max_records: 50, max_field_bytes: 64 };
                for format in [ImportFormat::Csv, ImportFormat::Ndjson] {
                    let parsed = parse(format, &body, limits, |_| {});
                    let validated = validate(format, &body, limits);
                    prop_assert_eq!(parsed.is_ok(), validated.is_ok());
                }
            }
        }
    }
}

//! Parsing of submitted record files (CSV with a header row, or NDJSON) under limits.
//!
//! A file is read as a stream, a record at a time ([`Scanner`] over any `Read`), so that a
//! file of any size is checked and processed in bounded memory. The API scans every body
//! once to refuse malformed input before it is kept; the worker scans the stored payload
//! again to process it. Both go through the same scanner, so a payload the API accepted is
//! one the worker can read.

use std::collections::{HashSet, VecDeque};
use std::fmt;
use std::io::{self, BufRead, BufReader, Read};

use dataflow_contracts::ImportFormat;
use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// Integers above this lose digits in an `f64`; such numbers must be sent as strings.
const MAX_EXACT_FLOAT: f64 = 9_007_199_254_740_992.0; // 2^53
/// More columns than this is not a record file anyone means to send.
const MAX_COLUMNS: usize = 1_000;
const BOM: &[u8] = b"\xEF\xBB\xBF";
/// What the parsers read ahead of the record they are on.
const READ_AHEAD: usize = 64 * 1024;

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
) -> Result<Summary> {
    let mut scan = Scanner::new(format, body, limits)?;
    while let Some(record) = scan.next_record()? {
        sink(record);
    }
    scan.finish()
}

/// The same checks as [`parse`] without building the records: the API's admission test.
pub fn validate(format: ImportFormat, body: impl Read, limits: Limits) -> Result<Summary> {
    let mut scan = Scanner::new(format, body, limits)?;
    while scan.advance(false)?.is_some() {}
    scan.finish()
}

/// Reads records one at a time from a file of any size. Memory is bounded by the longest
/// record (itself bounded by the field limit) and the read-ahead.
pub struct Scanner<R: Read> {
    limits: Limits,
    records: u64,
    format: Format<R>,
}

enum Format<R: Read> {
    Csv {
        reader: csv::Reader<Text<R>>,
        columns: Vec<String>,
        row: csv::StringRecord,
        /// Where the last record began: an unterminated quote is found in the last one.
        last_start: u64,
        line: u64,
    },
    Ndjson {
        reader: BufReader<Text<R>>,
        buf: Vec<u8>,
        line: u64,
        offset: u64,
    },
}

impl<R: Read> Scanner<R> {
    /// Starts reading `input`; a CSV header is read and checked here.
    pub fn new(format: ImportFormat, input: R, limits: Limits) -> Result<Self> {
        let track = format == ImportFormat::Csv;
        // Before the header is read the column count is unknown: allow the widest.
        let text = Text::new(input, record_bound(limits, MAX_COLUMNS), track);
        let format = match format {
            ImportFormat::Csv => {
                let mut reader = csv::ReaderBuilder::new()
                    .has_headers(true)
                    .flexible(false)
                    .buffer_capacity(READ_AHEAD)
                    .from_reader(text);
                let columns = read_header(&mut reader)?;
                reader.get_mut().max_record = record_bound(limits, columns.len());
                let last_start = reader.position().byte();
                Format::Csv {
                    reader,
                    columns,
                    row: csv::StringRecord::new(),
                    last_start,
                    line: 1,
                }
            }
            ImportFormat::Ndjson => Format::Ndjson {
                reader: BufReader::with_capacity(READ_AHEAD, text),
                buf: Vec::new(),
                line: 0,
                offset: 0,
            },
        };
        Ok(Self {
            limits,
            records: 0,
            format,
        })
    }

    /// The CSV header row.
    pub fn columns(&self) -> Option<&[String]> {
        match &self.format {
            Format::Csv { columns, .. } => Some(columns),
            Format::Ndjson { .. } => None,
        }
    }

    /// The next record, or `None` at the end of the file.
    pub fn next_record(&mut self) -> Result<Option<Record>> {
        Ok(self.advance(true)?.flatten())
    }

    /// Reads and checks the next record; builds it only when asked. `None` at the end.
    fn advance(&mut self, build: bool) -> Result<Option<Option<Record>>> {
        let limits = self.limits;
        let next = match &mut self.format {
            Format::Csv {
                reader,
                columns,
                row,
                last_start,
                line,
            } => next_csv(reader, columns, row, last_start, line, limits, build)?,
            Format::Ndjson {
                reader,
                buf,
                line,
                offset,
            } => next_ndjson(reader, buf, line, offset, limits, build)?,
        };
        let Some((line, record)) = next else {
            return Ok(None);
        };
        self.records += 1;
        if self.records > limits.max_records {
            return Err(too_many(line, limits.max_records).into());
        }
        Ok(Some(record))
    }

    /// Ends the scan: checks what only the end of the file tells (a quote never closed, a
    /// file without records) and says what was read. Call after the last record.
    pub fn finish(self) -> Result<Summary> {
        let columns = match self.format {
            Format::Csv {
                mut reader,
                columns,
                last_start,
                line,
                ..
            } => {
                // The csv reader treats an opening quote that is never closed as running to
                // the end of input. Every well-formed record has an even number of quote
                // characters, so an odd count in the last one means its quote was never
                // closed.
                if self.records > 0 && reader.get_mut().quotes_from(last_start) % 2 == 1 {
                    return Err(ParseError::new(
                        line,
                        "unterminated_quote",
                        "a quoted field is never closed",
                    )
                    .into());
                }
                Some(columns)
            }
            Format::Ndjson { .. } => None,
        };
        if self.records == 0 {
            return Err(ParseError::new(1, "empty_import", "the body contains no records").into());
        }
        Ok(Summary {
            records: self.records,
            columns,
        })
    }
}

/// The longest record a file with `columns` columns may hold: every field at the limit and
/// quoted, with its quotes doubled, plus the parser's read-ahead.
fn record_bound(limits: Limits, columns: usize) -> u64 {
    let field = (limits.max_field_bytes as u64)
        .saturating_mul(2)
        .saturating_add(3);
    field
        .saturating_mul(columns as u64)
        .saturating_add(2 * READ_AHEAD as u64)
}

fn read_header<R: Read>(reader: &mut csv::Reader<Text<R>>) -> Result<Vec<String>> {
    let headers = match reader.headers() {
        Ok(h) => h.clone(),
        Err(e) => return Err(csv_error(e, reader.get_mut(), 1)),
    };
    let columns: Vec<String> = headers.iter().map(str::to_owned).collect();
    if columns.is_empty() || (columns.len() == 1 && columns[0].is_empty()) {
        return Err(ParseError::new(1, "no_header", "the first line must be a header row").into());
    }
    if columns.len() > MAX_COLUMNS {
        return Err(ParseError::new(
            1,
            "too_many_columns",
            format!("more than {MAX_COLUMNS} columns"),
        )
        .into());
    }
    if columns.iter().any(|c| c.contains('\0')) {
        return Err(ParseError::new(1, "nul_byte", "the body contains a NUL byte").into());
    }
    let mut seen = HashSet::new();
    for (i, name) in columns.iter().enumerate() {
        if name.trim().is_empty() {
            return Err(ParseError::new(
                1,
                "empty_header",
                format!("column {} has no name", i + 1),
            )
            .into());
        }
        if !seen.insert(name.as_str()) {
            return Err(ParseError::new(
                1,
                "duplicate_header",
                format!("column `{name}` appears twice"),
            )
            .with_field(name)
            .into());
        }
    }
    Ok(columns)
}

/// One CSV record and its line; `None` at the end.
fn next_csv<R: Read>(
    reader: &mut csv::Reader<Text<R>>,
    columns: &[String],
    row: &mut csv::StringRecord,
    last_start: &mut u64,
    line: &mut u64,
    limits: Limits,
    build: bool,
) -> Result<Option<(u64, Option<Record>)>> {
    let next = reader.position().byte();
    reader.get_mut().record_start = next;
    match reader.read_record(row) {
        Ok(false) => return Ok(None),
        Ok(true) => {}
        Err(e) => {
            let at = reader.get_mut().line_of(next);
            return Err(csv_error(e, reader.get_mut(), at));
        }
    }
    let start = row.position().map_or(next, csv::Position::byte);
    *line = reader.get_mut().line_of(start);
    *last_start = start;
    for (name, value) in columns.iter().zip(row.iter()) {
        if value.len() > limits.max_field_bytes {
            return Err(field_too_long(*line, name, limits.max_field_bytes).into());
        }
        if value.contains('\0') {
            return Err(ParseError::new(*line, "nul_byte", "the body contains a NUL byte").into());
        }
    }
    let record = build.then(|| Record {
        line: *line,
        fields: columns
            .iter()
            .zip(row.iter())
            .map(|(n, v)| (n.clone(), Value::String(v.to_owned())))
            .collect(),
    });
    Ok(Some((*line, record)))
}

fn csv_error<R: Read>(e: csv::Error, text: &mut Text<R>, line: u64) -> Error {
    let line = match e.position() {
        Some(p) if line > 1 => text.line_of(p.byte()),
        _ => line,
    };
    let parse = match e.into_kind() {
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
        csv::ErrorKind::Io(io) => return input_error(io, line),
        other => ParseError::new(line, "csv_syntax", format!("{other:?}")),
    };
    parse.into()
}

/// One NDJSON record and its line; `None` at the end. Blank lines are skipped.
fn next_ndjson<R: Read>(
    reader: &mut BufReader<Text<R>>,
    buf: &mut Vec<u8>,
    line: &mut u64,
    offset: &mut u64,
    limits: Limits,
    build: bool,
) -> Result<Option<(u64, Option<Record>)>> {
    loop {
        buf.clear();
        reader.get_mut().record_start = *offset;
        let n = match reader.read_until(b'\n', buf) {
            Ok(n) => n,
            Err(e) => return Err(input_error(e, *line + 1)),
        };
        if n == 0 {
            return Ok(None);
        }
        *line += 1;
        *offset += n as u64;
        let raw = buf.strip_suffix(b"\n").unwrap_or(buf);
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        if raw.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let line = *line;
        if raw.contains(&0) {
            return Err(ParseError::new(line, "nul_byte", "the body contains a NUL byte").into());
        }
        let raw = std::str::from_utf8(raw)
            .map_err(|_| ParseError::new(line, "invalid_utf8", "the body is not valid UTF-8"))?;
        let value: Value = serde_json::from_str(raw).map_err(|e| {
            ParseError::new(line, "invalid_json", format!("column {}: {e}", e.column()))
        })?;
        let Value::Object(fields) = value else {
            return Err(ParseError::new(
                line,
                "not_an_object",
                "each line must be one JSON object",
            )
            .into());
        };
        for (name, v) in &fields {
            if name.contains('\0') {
                let (code, detail) = nul_escape();
                return Err(ParseError::new(line, code, detail).into());
            }
            check_json_value(v, limits.max_field_bytes)
                .map_err(|(code, detail)| ParseError::new(line, code, detail).with_field(name))?;
        }
        return Ok(Some((line, build.then_some(Record { line, fields }))));
    }
}

/// A failure to read the input: a record over its bound is the sender's, whatever else
/// the input says went wrong is passed on with its meaning (a ledger outage stays one).
fn input_error(e: io::Error, line: u64) -> Error {
    if e.get_ref().is_some_and(|inner| inner.is::<Overlong>()) {
        return ParseError::new(
            line,
            "record_too_long",
            "the record runs on past what its fields may hold; is a quote never closed?",
        )
        .into();
    }
    match e.downcast::<Error>() {
        Ok(inner) => inner,
        Err(e) => Error::Io {
            context: "reading the records".to_owned(),
            source: e,
        },
    }
}

/// A record longer than [`record_bound`].
#[derive(Debug)]
struct Overlong;

impl fmt::Display for Overlong {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a record runs on past its bound")
    }
}

impl std::error::Error for Overlong {}

/// The input as the parsers see it: the BOM dropped, the offsets of line breaks and quotes
/// noted (for line numbers and the unterminated-quote check) until the parser moves past
/// them, and a bound on how far one record may run, so that a quote never closed cannot
/// make the parser buffer the rest of the file.
struct Text<R> {
    inner: R,
    /// Bytes read before the BOM check settled, to be handed out first.
    pending: Option<Vec<u8>>,
    /// Bytes handed to the parser so far.
    handed: u64,
    /// Whether to note breaks and quotes (CSV only).
    track: bool,
    /// Offsets of `\n`, `\r` and `"` not yet passed, in order.
    marks: VecDeque<(u64, u8)>,
    /// The line at the first offset not yet passed.
    line: u64,
    record_start: u64,
    max_record: u64,
}

impl<R: Read> Text<R> {
    fn new(inner: R, max_record: u64, track: bool) -> Self {
        Self {
            inner,
            pending: None,
            handed: 0,
            track,
            marks: VecDeque::new(),
            line: 1,
            record_start: 0,
            max_record,
        }
    }

    /// The line a record starting at `offset` begins on. Offsets must not go backwards.
    /// After a CRLF the parser reports the offset of the LF; a record never starts with a
    /// line break, so breaks at its start are skipped.
    fn line_of(&mut self, mut offset: u64) -> u64 {
        loop {
            while let Some(&(at, byte)) = self.marks.front() {
                if at >= offset {
                    break;
                }
                self.marks.pop_front();
                if byte == b'\n' {
                    self.line += 1;
                }
            }
            match self.marks.front() {
                Some(&(at, b'\r' | b'\n')) if at == offset => offset += 1,
                _ => return self.line,
            }
        }
    }

    /// Quote characters from `offset` to what was handed out.
    fn quotes_from(&mut self, offset: u64) -> usize {
        self.line_of(offset);
        self.marks.iter().filter(|(_, b)| *b == b'"').count()
    }

    /// Reads the first bytes and drops a BOM among them.
    fn start(&mut self) -> io::Result<Vec<u8>> {
        let mut head = Vec::with_capacity(BOM.len());
        let mut byte = [0u8; 1];
        while head.len() < BOM.len() && head == BOM[..head.len()] {
            match self.inner.read(&mut byte)? {
                0 => break,
                _ => head.push(byte[0]),
            }
        }
        if head == BOM {
            head.clear();
        }
        Ok(head)
    }
}

impl<R: Read> Read for Text<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pending.is_none() {
            self.pending = Some(self.start()?);
        }
        let n = match self.pending.as_mut() {
            Some(head) if !head.is_empty() => {
                let n = head.len().min(buf.len());
                buf[..n].copy_from_slice(&head[..n]);
                head.drain(..n);
                n
            }
            _ => self.inner.read(buf)?,
        };
        if self.track {
            let at = self.handed;
            for (i, &b) in buf[..n].iter().enumerate() {
                if matches!(b, b'\n' | b'\r' | b'"') {
                    self.marks.push_back((at + i as u64, b));
                }
            }
        }
        self.handed += n as u64;
        if self.handed.saturating_sub(self.record_start) > self.max_record {
            return Err(io::Error::other(Overlong));
        }
        Ok(n)
    }
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

    fn collect(format: ImportFormat, body: &str) -> Result<Vec<Record>> {
        let mut out = Vec::new();
        parse(format, body.as_bytes(), LIMITS, |r| out.push(r))?;
        Ok(out)
    }

    fn err(format: ImportFormat, body: &[u8]) -> ParseError {
        match parse(format, body, LIMITS, |_| {}) {
            Err(Error::Parse(e)) => e,
            other => panic!("expected a parse error, got {other:?}"),
        }
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

    /// Hands out one byte per read: a stream split at every place it can be.
    struct Trickle<'a>(&'a [u8]);

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            match (self.0.split_first(), buf.first_mut()) {
                (Some((&b, rest)), Some(slot)) => {
                    *slot = b;
                    self.0 = rest;
                    Ok(1)
                }
                _ => Ok(0),
            }
        }
    }

    #[test]
    fn a_stream_split_anywhere_reads_like_the_whole() {
        let csv = "\u{feff}id,name\r\n1,\"a, b\"\n\n2,\"multi\r\nline\"\r\n3,\"q\"\"\"\r4,c";
        let ndjson = "\u{feff}{\"id\":1}\r\n\n{\"id\":\"é\"}\n{\"id\":3}";
        for (format, body) in [(ImportFormat::Csv, csv), (ImportFormat::Ndjson, ndjson)] {
            let whole = collect(format, body).unwrap();
            let mut scan = Scanner::new(format, Trickle(body.as_bytes()), LIMITS).unwrap();
            let mut streamed = Vec::new();
            while let Some(r) = scan.next_record().unwrap() {
                streamed.push(r);
            }
            assert_eq!(scan.finish().unwrap().records, whole.len() as u64);
            assert_eq!(streamed, whole, "{format:?}");
        }
        let e = match validate(
            ImportFormat::Csv,
            Trickle(b"id,name\n1,a\n2,\"open\n3,c\n"),
            LIMITS,
        ) {
            Err(Error::Parse(e)) => e,
            other => panic!("{other:?}"),
        };
        assert_eq!((e.code, e.line), ("unterminated_quote", 3));
    }

    #[test]
    fn a_quote_never_closed_in_an_endless_stream_is_refused_without_buffering_it() {
        let endless = b"id,name\n1,a\n2,\"open".chain(io::repeat(b'x'));
        let e = match validate(ImportFormat::Csv, endless, LIMITS) {
            Err(Error::Parse(e)) => e,
            other => panic!("{other:?}"),
        };
        assert_eq!((e.code, e.line), ("record_too_long", 3));
        let endless = b"{\"id\":\"".chain(io::repeat(b'x'));
        let e = match validate(ImportFormat::Ndjson, endless, LIMITS) {
            Err(Error::Parse(e)) => e,
            other => panic!("{other:?}"),
        };
        assert_eq!((e.code, e.line), ("record_too_long", 1));
    }

    #[test]
    fn a_failing_input_keeps_its_meaning() {
        struct Outage;
        impl Read for Outage {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::Error::other(Error::Conflict(
                    "the ledger went away".into(),
                )))
            }
        }
        let input = b"id\n1\n".chain(Outage);
        assert!(matches!(
            validate(ImportFormat::Csv, input, LIMITS),
            Err(Error::Conflict(_))
        ));
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
                    let validated = validate(format, &body[..], limits);
                    prop_assert_eq!(parsed.is_ok(), validated.is_ok());
                }
            }
        }
    }
}

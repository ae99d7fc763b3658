//! Client schemas: a [Frictionless Table Schema](https://specs.frictionlessdata.io/table-schema/)
//! document, so producers can reuse the schemas and tools they have, plus DataFlow's own
//! properties where the spec has none (all optional):
//!
//! - per field, `aliases`: other header names for the column, matched like the name is,
//!   ignoring case and spaces; and `transforms`: `trim`, `lower`, `upper`,
//!   `collapse_spaces`, applied in order to a text cell before anything else;
//! - per schema, `unknownFields`: what to do with a column no field names (`reject`, the
//!   default, as Frictionless reports an extra label; `drop`; `keep` as text), and
//!   `maxErrorRatio`: the share of rejected rows above which a batch writes nothing.
//!
//! A cell goes through: transforms, then `missingValues` (a missing cell is null), then its
//! type (the value comes out normalised), then the constraints. Numbers keep every digit as
//! written: they are checked and normalised as text and never pass through a float.
//! Patterns are compiled by the `regex` crate, whose matching is linear in the input, so
//! no pattern can make validation slow; one it cannot compile (a look-around, a
//! back-reference) is refused with the schema.

use std::cmp::Ordering;

use chrono::{DateTime, NaiveDate, NaiveDateTime, NaiveTime, SecondsFormat, Utc};
use regex::Regex;
use serde::Deserialize;
use serde_json::Value;

/// Why a schema document was refused: where (`fields[2].constraints.pattern`) and what.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct SchemaError {
    pub path: String,
    pub message: String,
}

/// Why a cell was refused: a code from the documented catalogue, and what it says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CellError {
    /// `type`, `constraint.required`, `constraint.minimum`, `constraint.maximum`,
    /// `constraint.minLength`, `constraint.maxLength`, `constraint.pattern`,
    /// `constraint.enum`.
    pub code: &'static str,
    pub detail: String,
}

/// Why a record (or the header) was refused, by field: a [`CellError`] where it happened,
/// `missing_field` (a required field has no column) or `unknown_field` (a column no field
/// names, under `unknownFields: reject`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub code: &'static str,
    pub detail: String,
    /// The offending value as it came (shortened), when a cell was refused.
    pub value: Option<String>,
}

/// A record once checked: its typed cells in the schema's order (then the columns kept
/// under `unknownFields: keep`), and what was wrong with it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RowCheck {
    pub cells: Vec<(String, Cell)>,
    pub errors: Vec<FieldError>,
}

impl RowCheck {
    /// The typed record as a JSON object.
    pub fn to_json(&self) -> String {
        let mut out = String::from("{");
        for (i, (name, cell)) in self.cells.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(&Value::String(name.clone()).to_string());
            out.push(':');
            out.push_str(&cell.to_json());
        }
        out.push('}');
        out
    }
}

/// The values seen so far of each `unique` field: the constraint holds across a whole file
/// ([`Schema::check_unique`]).
#[derive(Debug, Default)]
pub struct Seen(std::collections::HashMap<String, std::collections::HashSet<String>>);

/// A cell's value once typed and normalised.
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    Null,
    Text(String),
    /// A JSON number, as normalised text (`7`, `-0.50`, `1.5e3`).
    Number(String),
    Bool(bool),
    /// An `object`, `array` or `any` value.
    Json(Value),
}

impl Cell {
    /// The cell as JSON text.
    pub fn to_json(&self) -> String {
        match self {
            Cell::Null => "null".into(),
            Cell::Text(s) => serde_json::to_string(s).unwrap_or_default(),
            Cell::Number(n) => n.clone(),
            Cell::Bool(b) => b.to_string(),
            Cell::Json(v) => v.to_string(),
        }
    }
}

/// What to do with a column that no field names.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnknownFields {
    #[default]
    Reject,
    Drop,
    Keep,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transform {
    Trim,
    Lower,
    Upper,
    CollapseSpaces,
}

/// A validated schema, ready to check cells.
#[derive(Debug, Clone)]
pub struct Schema {
    pub fields: Vec<Field>,
    pub missing_values: Vec<String>,
    /// The record key: one field or several.
    pub primary_key: Vec<String>,
    pub unknown_fields: UnknownFields,
    pub max_error_ratio: Option<f64>,
}

#[derive(Debug, Clone)]
pub struct Field {
    pub name: String,
    pub aliases: Vec<String>,
    /// The name and aliases as headers are compared ([`header_key`]).
    keys: Vec<String>,
    pub transforms: Vec<Transform>,
    kind: Kind,
    required: bool,
    pub unique: bool,
    minimum: Option<Cell>,
    maximum: Option<Cell>,
    min_length: Option<usize>,
    max_length: Option<usize>,
    pattern: Option<Regex>,
    enumeration: Option<Vec<Cell>>,
}

#[derive(Debug, Clone)]
enum Kind {
    String(TextFormat),
    Integer,
    Number,
    Boolean {
        truthy: Vec<String>,
        falsy: Vec<String>,
    },
    Date(Option<String>),
    Datetime(Option<String>),
    Time(Option<String>),
    Year,
    Object,
    Array,
    Any,
}

#[derive(Debug, Clone, Copy)]
enum TextFormat {
    Plain,
    Email,
    Uri,
    Uuid,
}

/// The document as written. Properties the spec allows and DataFlow does not use
/// (`title`, `description`, `foreignKeys`, custom ones) are accepted and ignored.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SchemaDoc {
    fields: Vec<FieldDoc>,
    #[serde(default = "default_missing_values")]
    missing_values: Vec<String>,
    #[serde(default)]
    primary_key: Option<OneOrMany>,
    #[serde(default)]
    unknown_fields: UnknownFields,
    #[serde(default)]
    max_error_ratio: Option<f64>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct FieldDoc {
    name: String,
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    format: Option<String>,
    #[serde(default)]
    constraints: ConstraintsDoc,
    #[serde(default)]
    true_values: Option<Vec<String>>,
    #[serde(default)]
    false_values: Option<Vec<String>>,
    #[serde(default)]
    aliases: Vec<String>,
    #[serde(default)]
    transforms: Vec<Transform>,
}

/// The spec's constraints: one it does not define is more likely a typo than intended, so
/// it is refused rather than silently not checked.
#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ConstraintsDoc {
    #[serde(default)]
    required: bool,
    #[serde(default)]
    unique: bool,
    minimum: Option<Value>,
    maximum: Option<Value>,
    min_length: Option<usize>,
    max_length: Option<usize>,
    pattern: Option<String>,
    #[serde(rename = "enum")]
    enumeration: Option<Vec<Value>>,
}

fn default_missing_values() -> Vec<String> {
    vec![String::new()]
}

const TRUE_VALUES: [&str; 4] = ["true", "True", "TRUE", "1"];
const FALSE_VALUES: [&str; 4] = ["false", "False", "FALSE", "0"];

fn refused(path: String, message: impl Into<String>) -> SchemaError {
    SchemaError {
        path,
        message: message.into(),
    }
}

impl Schema {
    /// Reads and checks a schema document.
    pub fn parse(json: &str) -> Result<Schema, SchemaError> {
        let doc: SchemaDoc =
            serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_str(json))
                .map_err(|e| {
                    let path = match e.path().to_string() {
                        p if p == "." => "schema".to_owned(),
                        p => p,
                    };
                    refused(path, e.inner().to_string())
                })?;
        if doc.fields.is_empty() {
            return Err(refused(
                "fields".into(),
                "a schema needs at least one field",
            ));
        }
        if let Some(r) = doc.max_error_ratio
            && !(0.0..=1.0).contains(&r)
        {
            return Err(refused("maxErrorRatio".into(), "must be between 0 and 1"));
        }
        let mut fields = Vec::with_capacity(doc.fields.len());
        let mut seen = std::collections::HashSet::new();
        for (i, f) in doc.fields.into_iter().enumerate() {
            let field = Field::from_doc(f, &format!("fields[{i}]"))?;
            for label in std::iter::once(&field.name).chain(&field.aliases) {
                if !seen.insert(header_key(label)) {
                    return Err(refused(
                        format!("fields[{i}]"),
                        format!(
                            "`{label}` names two columns (names and aliases are matched ignoring case and spaces)"
                        ),
                    ));
                }
            }
            fields.push(field);
        }
        let primary_key = match doc.primary_key {
            None => Vec::new(),
            Some(OneOrMany::One(k)) => vec![k],
            Some(OneOrMany::Many(ks)) => ks,
        };
        for k in &primary_key {
            if !fields.iter().any(|f| &f.name == k) {
                return Err(refused(
                    "primaryKey".into(),
                    format!("no field is named `{k}`"),
                ));
            }
        }
        Ok(Schema {
            fields,
            missing_values: doc.missing_values,
            primary_key,
            unknown_fields: doc.unknown_fields,
            max_error_ratio: doc.max_error_ratio,
        })
    }

    /// A header row (or an NDJSON record's keys) against the fields: each required field
    /// without a column, and each column no field names when unknown columns are refused.
    pub fn check_columns<'a>(&self, labels: impl IntoIterator<Item = &'a str>) -> Vec<FieldError> {
        let labels: Vec<&str> = labels.into_iter().collect();
        let mut errors = Vec::new();
        for field in &self.fields {
            let present = labels.iter().any(|l| field.names(l));
            if !present && (field.required || self.primary_key.contains(&field.name)) {
                errors.push(FieldError {
                    field: field.name.clone(),
                    code: "missing_field",
                    detail: format!("no column for the required field `{}`", field.name),
                    value: None,
                });
            }
        }
        if self.unknown_fields == UnknownFields::Reject {
            for label in labels.iter().filter(|l| self.field_for(l).is_none()) {
                errors.push(FieldError {
                    field: (*label).to_owned(),
                    code: "unknown_field",
                    detail: format!("no field of the schema is named `{}`", truncated(label)),
                    value: None,
                });
            }
        }
        errors
    }

    /// Types and checks every cell of a record. Columns are matched to fields as
    /// [`Schema::field_for`] does; a field without a column is missing (null). Unknown
    /// columns are not reported here ([`Schema::check_columns`] does that once per header);
    /// under `unknownFields: keep` they are kept as they came.
    pub fn check_row(&self, record: &serde_json::Map<String, Value>) -> RowCheck {
        let mut check = RowCheck::default();
        // Each label normalised once per record, not once per field.
        let labels: Vec<(String, &Value)> =
            record.iter().map(|(l, v)| (header_key(l), v)).collect();
        for field in &self.fields {
            let raw = labels
                .iter()
                .find(|(key, _)| field.keys.contains(key))
                .map_or(&Value::Null, |(_, v)| *v);
            match self.cell(field, raw) {
                Ok(cell) => check.cells.push((field.name.clone(), cell)),
                Err(e) => check.errors.push(FieldError {
                    field: field.name.clone(),
                    code: e.code,
                    detail: e.detail,
                    value: Some(match raw {
                        Value::String(s) => truncated(s),
                        other => truncated(&other.to_string()),
                    }),
                }),
            }
        }
        if self.unknown_fields == UnknownFields::Keep {
            for (label, value) in record {
                if self.field_for(label).is_none() {
                    let cell = match value {
                        Value::String(s) => Cell::Text(s.clone()),
                        Value::Null => Cell::Null,
                        other => Cell::Json(other.clone()),
                    };
                    check.cells.push((label.clone(), cell));
                }
            }
        }
        check
    }

    /// Everything the server checks of one record: its cells ([`Schema::check_row`]), its
    /// `unique` values against the records before it, and, unless the file's header was
    /// checked once for all its records (CSV), its own keys as columns (NDJSON, where each
    /// record names its fields). A required field reported missing as a column is not
    /// reported again as an empty cell.
    pub fn check_record(
        &self,
        record: &serde_json::Map<String, Value>,
        header_checked: bool,
        seen: &mut Seen,
    ) -> RowCheck {
        let mut row = self.check_row(record);
        self.check_unique(&mut row, seen);
        if !header_checked {
            let columns = self.check_columns(record.keys().map(String::as_str));
            row.errors.retain(|e| {
                e.code != "constraint.required"
                    || !columns
                        .iter()
                        .any(|c| c.code == "missing_field" && c.field == e.field)
            });
            row.errors.extend(columns);
        }
        row
    }

    /// Checks the `unique` fields of a checked row against the rows before it: a value seen
    /// already is `constraint.unique` (a missing value never is).
    pub fn check_unique(&self, row: &mut RowCheck, seen: &mut Seen) {
        for field in self.fields.iter().filter(|f| f.unique) {
            let value = row
                .cells
                .iter()
                .find(|(name, cell)| name == &field.name && *cell != Cell::Null)
                .map(|(_, cell)| cell.to_json());
            if let Some(value) = value
                && !seen
                    .0
                    .entry(field.name.clone())
                    .or_default()
                    .insert(value.clone())
            {
                row.errors.push(FieldError {
                    field: field.name.clone(),
                    code: "constraint.unique",
                    detail: "an earlier record has the same value".into(),
                    value: Some(truncated(&value)),
                });
            }
        }
    }

    /// The field a header names (by name or alias, ignoring case and spaces).
    pub fn field_for(&self, header: &str) -> Option<&Field> {
        self.fields.iter().find(|f| f.names(header))
    }

    /// Types and checks one cell of `field`. A JSON value (from NDJSON) is taken as it is
    /// when it already has the field's type, and read as text otherwise.
    pub fn cell(&self, field: &Field, raw: &Value) -> Result<Cell, CellError> {
        let value = match raw {
            Value::String(s) => {
                let text = field.transform(s);
                if self.missing_values.contains(&text) {
                    Value::Null
                } else {
                    Value::String(text)
                }
            }
            other => other.clone(),
        };
        if value.is_null() {
            return if field.required {
                Err(error("constraint.required", "a value is required"))
            } else {
                Ok(Cell::Null)
            };
        }
        let cell = field.kind.cast(&value)?;
        storable(&cell)?;
        field.check(&cell)?;
        Ok(cell)
    }
}

/// How headers are compared: case- and space-insensitively.
fn header_key(label: &str) -> String {
    label
        .chars()
        .filter(|c| !c.is_whitespace())
        .flat_map(char::to_lowercase)
        .collect()
}

/// Most digits, and the largest exponent either way, of a number DataFlow stores: far past
/// any measured quantity, and inside what PostgreSQL's `numeric` (which `jsonb` uses) can
/// hold, so a value typed here is one the ledger accepts, on either database.
const MAX_DIGITS: usize = 1_000;
const MAX_EXPONENT: i64 = 1_000;

/// Refuses a typed value the ledger could not store: a number past [`MAX_DIGITS`] or
/// [`MAX_EXPONENT`], or JSON holding a NUL character (PostgreSQL's `jsonb` refuses
/// `\u0000`; a text cell cannot hold one, the parser refuses it).
fn storable(cell: &Cell) -> Result<(), CellError> {
    match cell {
        Cell::Number(n) => {
            let (mantissa, exponent) = n.split_once('e').unwrap_or((n, "0"));
            let digits = mantissa.bytes().filter(u8::is_ascii_digit).count();
            let exponent: i64 = exponent.parse().unwrap_or(i64::MAX);
            if digits > MAX_DIGITS || exponent.unsigned_abs() > MAX_EXPONENT.unsigned_abs() {
                return Err(error(
                    "type",
                    format!(
                        "`{}` is out of range: at most {MAX_DIGITS} digits and an exponent \
                         of at most {MAX_EXPONENT} either way",
                        truncated(n)
                    ),
                ));
            }
        }
        Cell::Json(v) if v.to_string().contains("\\u0000") => {
            return Err(error("type", "contains a NUL character (\\u0000)"));
        }
        _ => {}
    }
    Ok(())
}

fn error(code: &'static str, detail: impl Into<String>) -> CellError {
    CellError {
        code,
        detail: detail.into(),
    }
}

impl Field {
    /// Whether `label` names this field (its name or an alias, ignoring case and spaces).
    pub fn names(&self, label: &str) -> bool {
        self.keys.contains(&header_key(label))
    }

    fn from_doc(f: FieldDoc, path: &str) -> Result<Field, SchemaError> {
        if f.name.trim().is_empty() {
            return Err(refused(format!("{path}.name"), "a field needs a name"));
        }
        let format = f.format.filter(|s| s != "default");
        let kind_name = f.kind.as_deref().unwrap_or("string");
        let at = |p: &str| format!("{path}.{p}");
        let kind = match kind_name {
            "string" => Kind::String(match format.as_deref() {
                None => TextFormat::Plain,
                Some("email") => TextFormat::Email,
                Some("uri") => TextFormat::Uri,
                Some("uuid") => TextFormat::Uuid,
                Some(other) => {
                    return Err(refused(
                        at("format"),
                        format!(
                            "`{other}` is not a string format DataFlow knows (email, uri, uuid)"
                        ),
                    ));
                }
            }),
            "integer" => Kind::Integer,
            "number" => Kind::Number,
            "boolean" => Kind::Boolean {
                truthy: f
                    .true_values
                    .unwrap_or_else(|| TRUE_VALUES.map(String::from).to_vec()),
                falsy: f
                    .false_values
                    .unwrap_or_else(|| FALSE_VALUES.map(String::from).to_vec()),
            },
            "date" => Kind::Date(time_format(format, &at("format"))?),
            "datetime" => Kind::Datetime(time_format(format, &at("format"))?),
            "time" => Kind::Time(time_format(format, &at("format"))?),
            "year" => Kind::Year,
            "object" => Kind::Object,
            "array" => Kind::Array,
            "any" => Kind::Any,
            other => {
                return Err(refused(
                    at("type"),
                    format!("`{other}` is not a type DataFlow knows"),
                ));
            }
        };
        let c = f.constraints;
        let bound = |v: Option<Value>, name: &str| -> Result<Option<Cell>, SchemaError> {
            let Some(v) = v else { return Ok(None) };
            if !matches!(
                kind,
                Kind::Integer
                    | Kind::Number
                    | Kind::Date(_)
                    | Kind::Datetime(_)
                    | Kind::Time(_)
                    | Kind::Year
            ) {
                return Err(refused(
                    at(&format!("constraints.{name}")),
                    format!("`{name}` applies to numbers, dates and times, not to {kind_name}"),
                ));
            }
            kind.cast(&v)
                .map(Some)
                .map_err(|e| refused(at(&format!("constraints.{name}")), e.detail))
        };
        let minimum = bound(c.minimum, "minimum")?;
        let maximum = bound(c.maximum, "maximum")?;
        let pattern = match c.pattern {
            None => None,
            Some(p) => Some(Regex::new(&format!("^(?:{p})$")).map_err(|e| {
                refused(
                    at("constraints.pattern"),
                    format!("not a pattern DataFlow can match in linear time: {e}"),
                )
            })?),
        };
        let enumeration = match c.enumeration {
            None => None,
            Some(values) => Some(
                values
                    .iter()
                    .map(|v| kind.cast(v))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| refused(at("constraints.enum"), e.detail))?,
            ),
        };
        Ok(Field {
            keys: std::iter::once(&f.name)
                .chain(&f.aliases)
                .map(|l| header_key(l))
                .collect(),
            name: f.name,
            aliases: f.aliases,
            transforms: f.transforms,
            kind,
            required: c.required,
            unique: c.unique,
            minimum,
            maximum,
            min_length: c.min_length,
            max_length: c.max_length,
            pattern,
            enumeration,
        })
    }

    fn transform(&self, text: &str) -> String {
        let mut s = text.to_owned();
        for t in &self.transforms {
            s = match t {
                Transform::Trim => s.trim().to_owned(),
                Transform::Lower => s.to_lowercase(),
                Transform::Upper => s.to_uppercase(),
                Transform::CollapseSpaces => s.split_whitespace().collect::<Vec<_>>().join(" "),
            };
        }
        s
    }

    fn check(&self, cell: &Cell) -> Result<(), CellError> {
        if let Some(min) = &self.minimum
            && compare(cell, min) == Some(Ordering::Less)
        {
            return Err(error(
                "constraint.minimum",
                format!("below the minimum {}", min.to_json()),
            ));
        }
        if let Some(max) = &self.maximum
            && compare(cell, max) == Some(Ordering::Greater)
        {
            return Err(error(
                "constraint.maximum",
                format!("above the maximum {}", max.to_json()),
            ));
        }
        let length = match cell {
            Cell::Text(s) => Some(s.chars().count()),
            Cell::Json(Value::Array(a)) => Some(a.len()),
            Cell::Json(Value::Object(o)) => Some(o.len()),
            _ => None,
        };
        if let (Some(n), Some(min)) = (length, self.min_length)
            && n < min
        {
            return Err(error("constraint.minLength", format!("shorter than {min}")));
        }
        if let (Some(n), Some(max)) = (length, self.max_length)
            && n > max
        {
            return Err(error("constraint.maxLength", format!("longer than {max}")));
        }
        if let (Some(p), Cell::Text(s)) = (&self.pattern, cell)
            && !p.is_match(s)
        {
            return Err(error(
                "constraint.pattern",
                format!("does not match {}", p.as_str()),
            ));
        }
        if let Some(values) = &self.enumeration
            && !values
                .iter()
                .any(|v| compare(cell, v) == Some(Ordering::Equal) || v == cell)
        {
            return Err(error("constraint.enum", "not one of the allowed values"));
        }
        Ok(())
    }
}

/// `None` for the ISO default, the pattern otherwise (`any` is the default here: DataFlow
/// reads ISO 8601 only unless a pattern says otherwise).
fn time_format(format: Option<String>, path: &str) -> Result<Option<String>, SchemaError> {
    match format {
        None => Ok(None),
        Some(f) if f == "any" => Ok(None),
        Some(f) if f.contains('%') => Ok(Some(f)),
        Some(f) => Err(refused(
            path.into(),
            format!("`{f}` is not a date pattern (use strftime directives such as %d/%m/%Y)"),
        )),
    }
}

impl Kind {
    fn cast(&self, value: &Value) -> Result<Cell, CellError> {
        let text = match value {
            Value::String(s) => s.as_str(),
            Value::Number(n) => {
                return match self {
                    Kind::Integer | Kind::Year if n.is_i64() || n.is_u64() => {
                        self.cast(&Value::String(n.to_string()))
                    }
                    Kind::Number => Ok(Cell::Number(n.to_string())),
                    Kind::Any => Ok(Cell::Json(value.clone())),
                    _ => Err(self.refuse(&n.to_string())),
                };
            }
            Value::Bool(b) => {
                return match self {
                    Kind::Boolean { .. } => Ok(Cell::Bool(*b)),
                    Kind::Any => Ok(Cell::Json(value.clone())),
                    _ => Err(self.refuse(&b.to_string())),
                };
            }
            Value::Array(_) | Value::Object(_) => {
                return match (self, value) {
                    (Kind::Array, Value::Array(_))
                    | (Kind::Object, Value::Object(_))
                    | (Kind::Any, _) => Ok(Cell::Json(value.clone())),
                    _ => Err(self.refuse("a JSON value")),
                };
            }
            Value::Null => return Ok(Cell::Null),
        };
        let cell = match self {
            Kind::String(format) => text_format(*format, text).map(Cell::Text),
            // Surrounding spaces are not part of a number (as the reference reads it too).
            Kind::Integer => integer(text.trim_ascii()).map(Cell::Number),
            Kind::Number => number(text.trim_ascii()).map(Cell::Number),
            Kind::Boolean { truthy, falsy } => {
                if truthy.iter().any(|t| t == text) {
                    Some(Cell::Bool(true))
                } else if falsy.iter().any(|f| f == text) {
                    Some(Cell::Bool(false))
                } else {
                    None
                }
            }
            // chrono skips spaces around a date; a date with them is not one.
            Kind::Date(_) | Kind::Datetime(_) | Kind::Time(_) if text.trim() != text => None,
            Kind::Date(format) => date(text, format.as_deref()).map(Cell::Text),
            Kind::Datetime(format) => datetime(text, format.as_deref()).map(Cell::Text),
            Kind::Time(format) => time(text, format.as_deref()).map(Cell::Text),
            Kind::Year => (text.len() == 4 && text.bytes().all(|b| b.is_ascii_digit()))
                .then(|| integer(text))
                .flatten()
                .map(Cell::Number),
            Kind::Object => serde_json::from_str::<Value>(text)
                .ok()
                .filter(Value::is_object)
                .map(Cell::Json),
            Kind::Array => serde_json::from_str::<Value>(text)
                .ok()
                .filter(Value::is_array)
                .map(Cell::Json),
            Kind::Any => Some(Cell::Text(text.to_owned())),
        };
        cell.ok_or_else(|| self.refuse(text))
    }

    fn refuse(&self, text: &str) -> CellError {
        let what = match self {
            Kind::String(TextFormat::Email) => "an email address",
            Kind::String(TextFormat::Uri) => "a URI",
            Kind::String(TextFormat::Uuid) => "a UUID",
            Kind::String(TextFormat::Plain) | Kind::Any => "text",
            Kind::Integer => "an integer",
            Kind::Number => "a number",
            Kind::Boolean { .. } => "a boolean",
            Kind::Date(_) => "a date",
            Kind::Datetime(_) => "a date and time",
            Kind::Time(_) => "a time",
            Kind::Year => "a year",
            Kind::Object => "a JSON object",
            Kind::Array => "a JSON array",
        };
        error("type", format!("`{}` is not {what}", truncated(text)))
    }
}

/// An offending value as quoted back: at most 64 characters.
fn truncated(text: &str) -> String {
    match text.char_indices().nth(64) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_owned(),
    }
}

fn text_format(format: TextFormat, text: &str) -> Option<String> {
    let ok = match format {
        TextFormat::Plain => true,
        TextFormat::Email => text.split_once('@').is_some_and(|(local, domain)| {
            !local.is_empty()
                && !domain.contains('@')
                && domain.contains('.')
                && !domain.starts_with('.')
                && !domain.ends_with('.')
                && !text.chars().any(char::is_whitespace)
        }),
        TextFormat::Uri => url::Url::parse(text).is_ok(),
        TextFormat::Uuid => return uuid(text),
    };
    ok.then(|| text.to_owned())
}

/// A UUID in its canonical form (lower-case, hyphenated), from that form, the 32 digits
/// alone, braces around either, or a `urn:uuid:` prefix.
fn uuid(text: &str) -> Option<String> {
    let bare = text
        .strip_prefix("urn:uuid:")
        .or_else(|| text.strip_prefix('{').and_then(|t| t.strip_suffix('}')))
        .unwrap_or(text);
    let groups: Vec<usize> = bare.split('-').map(str::len).collect();
    let hex: String = bare.chars().filter(|c| *c != '-').collect();
    let ok = hex.len() == 32
        && hex.chars().all(|c| c.is_ascii_hexdigit())
        && (groups == [32] || groups == [8, 4, 4, 4, 12]);
    ok.then(|| {
        let h = hex.to_ascii_lowercase();
        format!(
            "{}-{}-{}-{}-{}",
            &h[..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..]
        )
    })
}

/// An integer as normalised text: no `+`, no leading zeros (`07` is `7`).
fn integer(text: &str) -> Option<String> {
    let (sign, digits) = split_sign(text);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let digits = digits.trim_start_matches('0');
    Some(match (sign, digits) {
        (_, "") => "0".into(),
        ("-", d) => format!("-{d}"),
        (_, d) => d.to_owned(),
    })
}

/// A decimal number as normalised JSON text, every digit of the fraction kept: no `+`, no
/// leading zeros, a lower-case exponent (`+007.50E2` is `7.50e2`). JSON has no NaN or
/// infinity, so neither is a number here.
fn number(text: &str) -> Option<String> {
    let (mantissa, exponent) = match text.find(['e', 'E']) {
        Some(at) => (&text[..at], Some(&text[at + 1..])),
        None => (text, None),
    };
    let (sign, body) = split_sign(mantissa);
    let (whole, fraction) = match body.split_once('.') {
        Some((w, f)) => (w, Some(f)),
        None => (body, None),
    };
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if !digits(whole) || !fraction.is_none_or(digits) {
        return None;
    }
    if whole.is_empty() && fraction.is_none_or(str::is_empty) {
        return None;
    }
    let mut out = String::new();
    if sign == "-" {
        out.push('-');
    }
    let whole = whole.trim_start_matches('0');
    out.push_str(if whole.is_empty() { "0" } else { whole });
    if let Some(f) = fraction.filter(|f| !f.is_empty()) {
        out.push('.');
        out.push_str(f);
    }
    if let Some(e) = exponent {
        let e = integer(e)?;
        out.push('e');
        out.push_str(&e);
    }
    Some(out)
}

fn split_sign(text: &str) -> (&str, &str) {
    match text.as_bytes().first() {
        Some(b'-') => ("-", &text[1..]),
        Some(b'+') => ("+", &text[1..]),
        _ => ("", text),
    }
}

fn date(text: &str, format: Option<&str>) -> Option<String> {
    let d = NaiveDate::parse_from_str(text, format.unwrap_or("%Y-%m-%d")).ok()?;
    Some(d.format("%Y-%m-%d").to_string())
}

/// A date and time in UTC: with an offset it is converted, without one it is taken as UTC.
fn datetime(text: &str, format: Option<&str>) -> Option<String> {
    let utc: DateTime<Utc> = match format {
        Some(f) => match DateTime::parse_from_str(text, f) {
            Ok(t) => t.with_timezone(&Utc),
            Err(_) => NaiveDateTime::parse_from_str(text, f).ok()?.and_utc(),
        },
        // ISO 8601 with `T` or a space between date and time, as the reference reads it.
        None => match DateTime::parse_from_rfc3339(text) {
            Ok(t) => t.with_timezone(&Utc),
            Err(_) => NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S%.f")
                .or_else(|_| NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f"))
                .ok()?
                .and_utc(),
        },
    };
    Some(utc.to_rfc3339_opts(SecondsFormat::AutoSi, true))
}

/// A time of day; by default ISO 8601, where a `Z` (UTC) after it is allowed.
fn time(text: &str, format: Option<&str>) -> Option<String> {
    let t = match format {
        Some(f) => NaiveTime::parse_from_str(text, f).ok()?,
        None => {
            NaiveTime::parse_from_str(text.strip_suffix('Z').unwrap_or(text), "%H:%M:%S%.f").ok()?
        }
    };
    Some(t.format("%H:%M:%S%.f").to_string())
}

/// Orders two cells of one type: numbers exactly, by their digits; dates, datetimes and
/// times as their normalised ISO text, which sorts as they do.
fn compare(a: &Cell, b: &Cell) -> Option<Ordering> {
    match (a, b) {
        (Cell::Number(x), Cell::Number(y)) => Some(compare_decimal(x, y)),
        (Cell::Text(x), Cell::Text(y)) => Some(x.cmp(y)),
        (Cell::Bool(x), Cell::Bool(y)) => Some(x.cmp(y)),
        _ => None,
    }
}

/// Compares normalised decimal texts (`number`'s output) exactly.
fn compare_decimal(a: &str, b: &str) -> Ordering {
    let (na, nb) = (Decimal::of(a), Decimal::of(b));
    match (na.negative, nb.negative) {
        (false, true) => return Ordering::Greater,
        (true, false) => return Ordering::Less,
        _ => {}
    }
    let magnitude = na.cmp_magnitude(&nb);
    if na.negative {
        magnitude.reverse()
    } else {
        magnitude
    }
}

/// A decimal as `0.digits × 10^exponent`, digits without leading or trailing zeros.
struct Decimal {
    negative: bool,
    digits: String,
    exponent: i64,
}

impl Decimal {
    fn of(text: &str) -> Decimal {
        let (mantissa, exp) = match text.split_once('e') {
            Some((m, e)) => (m, e.parse::<i64>().unwrap_or(0)),
            None => (text, 0),
        };
        let negative = mantissa.starts_with('-');
        let mantissa = mantissa.trim_start_matches('-');
        let (whole, fraction) = mantissa.split_once('.').unwrap_or((mantissa, ""));
        let all = format!("{whole}{fraction}");
        let leading = all.len() - all.trim_start_matches('0').len();
        let digits = all.trim_matches('0').to_owned();
        let exponent = whole.len() as i64 - leading as i64 + exp;
        Decimal {
            negative: negative && !digits.is_empty(),
            digits,
            exponent,
        }
    }

    fn cmp_magnitude(&self, other: &Decimal) -> Ordering {
        match (self.digits.is_empty(), other.digits.is_empty()) {
            (true, true) => return Ordering::Equal,
            (true, false) => return Ordering::Less,
            (false, true) => return Ordering::Greater,
            _ => {}
        }
        self.exponent
            .cmp(&other.exponent)
            .then_with(|| self.digits.as_str().cmp(other.digits.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema(fields: Value) -> Schema {
        Schema::parse(&json!({ "fields": fields }).to_string()).unwrap()
    }

    fn cell(s: &Schema, name: &str, raw: Value) -> Result<Cell, CellError> {
        let field = s.field_for(name).unwrap();
        s.cell(field, &raw)
    }

    #[test]
    fn numbers_are_normalised_as_text_never_through_a_float() {
        let s = schema(json!([{"name": "n", "type": "number"}, {"name": "i", "type": "integer"}]));
        let n = |v: &str| cell(&s, "n", json!(v)).map(|c| c.to_json());
        assert_eq!(n("7").unwrap(), "7");
        assert_eq!(n("+007.50").unwrap(), "7.50");
        assert_eq!(
            n("0.1000000000000000055511151231257827").unwrap(),
            "0.1000000000000000055511151231257827"
        );
        assert_eq!(n("-1.5E3").unwrap(), "-1.5e3");
        assert_eq!(n(".5").unwrap(), "0.5");
        for bad in ["NaN", "INF", "1,5", "", "1e", "e3", "--1", "1.2.3"] {
            if bad.is_empty() {
                assert_eq!(cell(&s, "n", json!(bad)), Ok(Cell::Null));
            } else {
                assert_eq!(n(bad).unwrap_err().code, "type", "{bad}");
            }
        }
        let i = |v: &str| cell(&s, "i", json!(v)).map(|c| c.to_json());
        assert_eq!(i("07").unwrap(), "7");
        assert_eq!(i("-0").unwrap(), "0");
        assert_eq!(
            i("123456789012345678901234567890").unwrap(),
            "123456789012345678901234567890"
        );
        assert_eq!(i("1e3").unwrap_err().code, "type");
        assert_eq!(i("1.0").unwrap_err().code, "type");
        assert_eq!(cell(&s, "i", json!(7)).unwrap().to_json(), "7");
        assert_eq!(cell(&s, "i", json!(7.5)).unwrap_err().code, "type");
    }

    #[test]
    fn dates_and_times_come_out_in_iso_8601_and_utc() {
        let s = schema(json!([
            {"name": "d", "type": "date"},
            {"name": "dmy", "type": "date", "format": "%d/%m/%Y"},
            {"name": "t", "type": "datetime"},
            {"name": "h", "type": "time"},
            {"name": "y", "type": "year"}
        ]));
        assert_eq!(
            cell(&s, "d", json!("2026-02-28")).unwrap(),
            Cell::Text("2026-02-28".into())
        );
        assert_eq!(cell(&s, "d", json!("2026-02-30")).unwrap_err().code, "type");
        assert_eq!(
            cell(&s, "dmy", json!("05/12/2026")).unwrap(),
            Cell::Text("2026-12-05".into())
        );
        assert_eq!(
            cell(&s, "t", json!("2026-12-05T10:00:00+02:00")).unwrap(),
            Cell::Text("2026-12-05T08:00:00Z".into())
        );
        assert_eq!(
            cell(&s, "t", json!("2026-12-05T10:00:00")).unwrap(),
            Cell::Text("2026-12-05T10:00:00Z".into())
        );
        assert_eq!(
            cell(&s, "h", json!("23:59:01")).unwrap(),
            Cell::Text("23:59:01".into())
        );
        assert_eq!(cell(&s, "h", json!("24:00:01")).unwrap_err().code, "type");
        assert_eq!(cell(&s, "y", json!("2026")).unwrap().to_json(), "2026");
        assert_eq!(cell(&s, "y", json!("26")).unwrap_err().code, "type");
    }

    #[test]
    fn constraints_are_checked_on_the_typed_value() {
        let s = schema(json!([
            {"name": "qty", "type": "integer", "constraints": {"required": true, "minimum": 1, "maximum": "1000000000000000000000"}},
            {"name": "price", "type": "number", "constraints": {"minimum": "0.01"}},
            {"name": "code", "constraints": {"pattern": "[A-Z]{3}", "minLength": 3}},
            {"name": "size", "constraints": {"enum": ["S", "M", "L"]}},
            {"name": "when", "type": "date", "constraints": {"maximum": "2026-12-31"}}
        ]));
        assert_eq!(
            cell(&s, "qty", json!("")).unwrap_err().code,
            "constraint.required"
        );
        assert_eq!(
            cell(&s, "qty", json!("0")).unwrap_err().code,
            "constraint.minimum"
        );
        assert_eq!(cell(&s, "qty", json!("0001")).unwrap().to_json(), "1");
        assert_eq!(
            cell(&s, "qty", json!("1000000000000000000001"))
                .unwrap_err()
                .code,
            "constraint.maximum"
        );
        assert_eq!(
            cell(&s, "price", json!("0.009")).unwrap_err().code,
            "constraint.minimum"
        );
        assert_eq!(cell(&s, "price", json!("1e-2")).unwrap().to_json(), "1e-2");
        assert_eq!(
            cell(&s, "price", json!("-5")).unwrap_err().code,
            "constraint.minimum"
        );
        assert_eq!(
            cell(&s, "code", json!("ABCD")).unwrap_err().code,
            "constraint.pattern"
        );
        assert_eq!(
            cell(&s, "code", json!("ABC")).unwrap(),
            Cell::Text("ABC".into())
        );
        assert_eq!(
            cell(&s, "size", json!("XL")).unwrap_err().code,
            "constraint.enum"
        );
        assert_eq!(
            cell(&s, "when", json!("2027-01-01")).unwrap_err().code,
            "constraint.maximum"
        );
    }

    /// What PostgreSQL's `jsonb` would refuse is a cell error, not a failed batch.
    #[test]
    fn a_value_the_ledger_cannot_store_is_refused() {
        let s = Schema::parse(
            &json!({"fields": [
                {"name": "n", "type": "number"}, {"name": "i", "type": "integer"},
                {"name": "o", "type": "object"}, {"name": "a", "type": "any"}
            ]})
            .to_string(),
        )
        .unwrap();
        let code = |f: &str, v: Value| cell(&s, f, v).err().map(|e| e.code);
        assert_eq!(code("n", json!("1e1000")), None);
        assert_eq!(code("n", json!("-1.5E-1000")), None);
        assert_eq!(code("n", json!("1e1001")), Some("type"));
        assert_eq!(code("n", json!("1e-9223372036854775808")), Some("type"));
        assert_eq!(code("i", json!("9".repeat(1_001))), Some("type"));
        assert_eq!(code("o", json!(r#"{"a": "\u0000"}"#)), Some("type"));
        assert_eq!(code("a", json!({"a": "\u{0}"})), Some("type"));
        assert_eq!(code("o", json!(r#"{"a": "\u0001"}"#)), None);
    }

    #[test]
    fn decimals_compare_exactly() {
        let cmp = |a: &str, b: &str| compare_decimal(&number(a).unwrap(), &number(b).unwrap());
        assert_eq!(cmp("1", "1.000"), Ordering::Equal);
        assert_eq!(cmp("1.5e3", "1500"), Ordering::Equal);
        assert_eq!(cmp("0.1", "0.09"), Ordering::Greater);
        assert_eq!(cmp("-0.1", "-0.09"), Ordering::Less);
        assert_eq!(cmp("0", "-0"), Ordering::Equal);
        assert_eq!(
            cmp("12345678901234567890.1", "12345678901234567890.01"),
            Ordering::Greater
        );
        assert_eq!(cmp("1e-5", "0"), Ordering::Greater);
    }

    #[test]
    fn headers_match_names_and_aliases_ignoring_case_and_spaces() {
        let s = schema(json!([
            {"name": "email", "type": "string", "format": "email", "aliases": ["E-mail Address"], "transforms": ["trim", "lower"]},
            {"name": "id", "type": "string", "format": "uuid"}
        ]));
        assert_eq!(s.field_for(" e-mail address ").unwrap().name, "email");
        assert_eq!(s.field_for("EMAIL").unwrap().name, "email");
        assert!(s.field_for("mail").is_none());
        assert_eq!(
            cell(&s, "email", json!("  Ann@Example.COM ")).unwrap(),
            Cell::Text("ann@example.com".into())
        );
        assert_eq!(cell(&s, "email", json!("ann@")).unwrap_err().code, "type");
        assert_eq!(
            cell(&s, "id", json!("0F8FAD5B-D9CB-469F-A165-70867728950E")).unwrap(),
            Cell::Text("0f8fad5b-d9cb-469f-a165-70867728950e".into())
        );
        assert_eq!(
            cell(&s, "id", json!("0F8FAD5B-D9CB-469F-A165"))
                .unwrap_err()
                .code,
            "type"
        );
        for form in [
            "0f8fad5bd9cb469fa16570867728950e",
            "{0F8FAD5B-D9CB-469F-A165-70867728950E}",
            "urn:uuid:0f8fad5b-d9cb-469f-a165-70867728950e",
        ] {
            assert_eq!(
                cell(&s, "id", json!(form)).unwrap(),
                Cell::Text("0f8fad5b-d9cb-469f-a165-70867728950e".into()),
                "{form}"
            );
        }
    }

    #[test]
    fn a_schema_that_cannot_work_is_refused_naming_the_field() {
        let refused = |doc: Value| Schema::parse(&doc.to_string()).unwrap_err();
        let e = refused(
            json!({"fields": [{"name": "a"}, {"name": "b", "constraints": {"pattern": "(a)\\1"}}]}),
        );
        assert_eq!(e.path, "fields[1].constraints.pattern");
        let e = refused(json!({"fields": [{"name": "a", "type": "money"}]}));
        assert_eq!(e.path, "fields[0].type");
        let e = refused(
            json!({"fields": [{"name": "a", "type": "integer", "constraints": {"minimum": "x"}}]}),
        );
        assert_eq!(e.path, "fields[0].constraints.minimum");
        let e = refused(json!({"fields": [{"name": "A b"}, {"name": "ab"}]}));
        assert_eq!(e.path, "fields[1]");
        let e = refused(json!({"fields": [{"name": "a"}], "primaryKey": "b"}));
        assert_eq!(e.path, "primaryKey");
        let e = refused(json!({"fields": [{"name": "a"}], "maxErrorRatio": 2}));
        assert_eq!(e.path, "maxErrorRatio");
        let e = refused(json!({"fields": [{"name": "a", "constraints": {"minimum": 1}}]}));
        assert_eq!(e.path, "fields[0].constraints.minimum");
        let ok = Schema::parse(&json!({"fields": [{"name": "a"}, {"name": "b"}], "primaryKey": ["a", "b"], "missingValues": ["", "NA"], "unknownFields": "drop"}).to_string()).unwrap();
        assert_eq!(ok.primary_key, ["a", "b"]);
        assert_eq!(ok.unknown_fields, UnknownFields::Drop);
        assert_eq!(cell(&ok, "a", json!("NA")).unwrap(), Cell::Null);
    }

    #[test]
    fn a_record_is_checked_whole_and_comes_out_typed() {
        let doc = json!({
            "fields": [
                {"name": "id", "type": "integer"},
                {"name": "email", "format": "email", "aliases": ["Mail"], "constraints": {"required": true}},
                {"name": "qty", "type": "integer", "constraints": {"minimum": 0}}
            ],
            "primaryKey": "id"
        });
        let s = Schema::parse(&doc.to_string()).unwrap();
        let header = s.check_columns(["ID", "mail", "colour"]);
        assert_eq!(
            header
                .iter()
                .map(|e| (e.field.as_str(), e.code))
                .collect::<Vec<_>>(),
            [("colour", "unknown_field")]
        );
        let missing = s.check_columns(["qty"]);
        assert_eq!(
            missing
                .iter()
                .map(|e| (e.field.as_str(), e.code))
                .collect::<Vec<_>>(),
            [("id", "missing_field"), ("email", "missing_field")]
        );
        let row = |v: Value| s.check_row(v.as_object().unwrap());
        let good = row(json!({"ID": "007", "mail": "a@b.co", "qty": "3", "colour": "red"}));
        assert!(good.errors.is_empty(), "{good:?}");
        assert_eq!(good.to_json(), r#"{"id":7,"email":"a@b.co","qty":3}"#);
        let bad = row(json!({"ID": "x", "qty": "-1"}));
        assert_eq!(
            bad.errors
                .iter()
                .map(|e| (e.field.as_str(), e.code))
                .collect::<Vec<_>>(),
            [
                ("id", "type"),
                ("email", "constraint.required"),
                ("qty", "constraint.minimum")
            ]
        );
        let keep =
            Schema::parse(&json!({"fields": [{"name": "a"}], "unknownFields": "keep"}).to_string())
                .unwrap();
        let kept = keep.check_row(json!({"a": "1", "b": 2}).as_object().unwrap());
        assert_eq!(kept.to_json(), r#"{"a":"1","b":2}"#);
        assert!(keep.check_columns(["a", "b"]).is_empty());
    }

    #[test]
    fn unique_holds_across_the_rows_of_a_file() {
        let s = schema(json!([{"name": "n", "type": "integer", "constraints": {"unique": true}}]));
        let mut seen = Seen::default();
        let mut codes = Vec::new();
        for v in ["1", "2", "01", "", ""] {
            let mut row = s.check_row(json!({"n": v}).as_object().unwrap());
            s.check_unique(&mut row, &mut seen);
            codes.push(row.errors.first().map(|e| e.code));
        }
        assert_eq!(codes, [None, None, Some("constraint.unique"), None, None]);
    }

    #[test]
    fn booleans_follow_true_and_false_values() {
        let s = schema(json!([
            {"name": "b", "type": "boolean"},
            {"name": "yn", "type": "boolean", "trueValues": ["yes"], "falseValues": ["no"]}
        ]));
        assert_eq!(cell(&s, "b", json!("TRUE")).unwrap(), Cell::Bool(true));
        assert_eq!(cell(&s, "b", json!("0")).unwrap(), Cell::Bool(false));
        assert_eq!(cell(&s, "b", json!(true)).unwrap(), Cell::Bool(true));
        assert_eq!(cell(&s, "b", json!("yes")).unwrap_err().code, "type");
        assert_eq!(cell(&s, "yn", json!("yes")).unwrap(), Cell::Bool(true));
        assert_eq!(cell(&s, "yn", json!("true")).unwrap_err().code, "type");
    }
}

//! DataFlow's schemas against the reference implementation of Frictionless Table Schema:
//! tables of edge cases (leading zeros, exponents, signs, month ends of leap and common
//! years, Unicode, empty cells, every type and constraint) are written as CSV with their
//! schema, validated by the `frictionless` command (Python, PyPI) and by DataFlow, and the
//! two must refuse the same cells for the same reason (a type or a constraint). The cases
//! where DataFlow differs on purpose are named below, with why; docs/schemas.md says so too.

use crate::common::harness::register;
use std::path::Path;
use std::process::Command;

use dataflow_contracts::ImportFormat;
use dataflow_platform::domain::records::{self, Limits};
use dataflow_platform::domain::schema::{Schema, Seen};
use serde_json::{Value, json};

/// Cells DataFlow reads differently from the reference, on purpose.
const DIFFERENT: &[(&str, &str, &str)] = &[
    (
        "integer",
        "1_000",
        "Python's int() takes digit-group underscores; DataFlow takes digits",
    ),
    (
        "integer",
        "٣",
        "Python's int() takes any Unicode digit; DataFlow takes ASCII digits",
    ),
    (
        "number",
        "1_000.5",
        "Python's Decimal takes digit-group underscores; DataFlow takes digits",
    ),
    (
        "number",
        "NaN",
        "JSON has no NaN, so DataFlow cannot store it as a number",
    ),
    ("number", "INF", "JSON has no infinity"),
    ("number", "-INF", "JSON has no infinity"),
    (
        "time",
        "24:00:00",
        "the end of the day is not a time of day DataFlow stores",
    ),
    (
        "uri",
        "http://",
        "a URL with a special scheme needs a host (WHATWG URL parsing)",
    ),
];

struct Case {
    name: &'static str,
    field: Value,
    values: Vec<String>,
}

fn case(name: &'static str, field: Value, values: &[&str]) -> Case {
    Case {
        name,
        field,
        values: values.iter().map(|v| (*v).to_owned()).collect(),
    }
}

fn cases() -> Vec<Case> {
    // Every combination of sign, whole part, fraction and exponent.
    let mut numbers = Vec::new();
    for sign in ["", "+", "-"] {
        for whole in ["", "0", "007", "12"] {
            for fraction in ["", ".", ".5", ".50"] {
                for exponent in ["", "e3", "E-2", "e"] {
                    numbers.push(format!("{sign}{whole}{fraction}{exponent}"));
                }
            }
        }
    }
    numbers.retain(|n| !n.is_empty());
    // The last days of every month of a leap year and of a common one.
    let mut dates = Vec::new();
    for year in [2024, 2026] {
        for month in 1..=12 {
            for day in 28..=31 {
                dates.push(format!("{year}-{month:02}-{day:02}"));
            }
        }
    }
    vec![
        case(
            "integer",
            json!({"type": "integer"}),
            &[
                "07",
                " 7",
                "+7",
                "1_000",
                "1e3",
                "1.0",
                "٣",
                "-0",
                "",
                "x",
                "99999999999999999999999",
            ],
        ),
        Case {
            name: "number",
            field: json!({"type": "number"}),
            values: numbers,
        },
        case(
            "number_named",
            json!({"type": "number"}),
            &["NaN", "INF", "-INF", "1_000.5", "1,5", "0x10", " 1.5"],
        ),
        Case {
            name: "month_ends",
            field: json!({"type": "date"}),
            values: dates,
        },
        case(
            "date",
            json!({"type": "date"}),
            &["2026-2-5", "20260205", " 2026-02-28", "2026-02-28T00:00:00"],
        ),
        case(
            "date_pattern",
            json!({"type": "date", "format": "%d/%m/%Y"}),
            &["05/12/2026", "5/12/2026", "2026-12-05", "31/02/2026"],
        ),
        case(
            "datetime",
            json!({"type": "datetime"}),
            &[
                "2026-12-05T10:00:00Z",
                "2026-12-05T10:00:00",
                "2026-12-05T10:00:00+02:00",
                "2026-12-05 10:00:00",
                "2026-12-05T10:00:00.123Z",
                "2026-12-05",
            ],
        ),
        case(
            "time",
            json!({"type": "time"}),
            &["23:59:01", "24:00:00", "23:59", "23:59:01.5", "23:59:01Z"],
        ),
        case(
            "year",
            json!({"type": "year"}),
            &["2026", "26", "02026", "-202", " 2026"],
        ),
        case(
            "boolean",
            json!({"type": "boolean"}),
            &["true", "TRUE", "True", "yes", "1", "0", "t", "false"],
        ),
        case(
            "email",
            json!({"type": "string", "format": "email"}),
            &[
                "a@b.co",
                "ann@",
                "a b@c.de",
                "a@b",
                "a@@b.co",
                "zoë@exämple.org",
            ],
        ),
        case(
            "uuid",
            json!({"type": "string", "format": "uuid"}),
            &[
                "0F8FAD5B-D9CB-469F-A165-70867728950E",
                "0f8fad5bd9cb469fa16570867728950e",
                "0f8fad5b-d9cb-469f-a165",
                "{0f8fad5b-d9cb-469f-a165-70867728950e}",
            ],
        ),
        case(
            "uri",
            json!({"type": "string", "format": "uri"}),
            &["http://x.org", "x", "mailto:a@b.co", "http://"],
        ),
        case(
            "object",
            json!({"type": "object"}),
            &[r#"{"a":1}"#, "[1]", "x", "{}"],
        ),
        case(
            "array",
            json!({"type": "array"}),
            &["[1]", r#"{"a":1}"#, "x", "[]"],
        ),
        case(
            "minimum_maximum",
            json!({"type": "integer", "constraints": {"minimum": 1, "maximum": 10}}),
            &["0", "1", "10", "11", "010"],
        ),
        case(
            "number_bounds",
            json!({"type": "number", "constraints": {"minimum": 0.5, "maximum": 1e3}}),
            &["0.49", "0.5", "1000", "1000.01", "1e3", "1.0001e3"],
        ),
        case(
            "date_bounds",
            json!({"type": "date", "constraints": {"minimum": "2026-01-01"}}),
            &["2025-12-31", "2026-01-01"],
        ),
        case(
            "pattern",
            json!({"type": "string", "constraints": {"pattern": "[A-Z]{3}"}}),
            &["ABC", "ABCD", "abc", "ÄBC"],
        ),
        case(
            "enum",
            json!({"type": "string", "constraints": {"enum": ["S", "M"]}}),
            &["S", "L", "s"],
        ),
        case(
            "integer_enum",
            json!({"type": "integer", "constraints": {"enum": [1, 2]}}),
            &["1", "01", "3"],
        ),
        case(
            "length",
            json!({"type": "string", "constraints": {"minLength": 2, "maxLength": 3}}),
            &["a", "ab", "abcd", "ééé", "日本語"],
        ),
        case(
            "required",
            json!({"type": "string", "constraints": {"required": true}}),
            &["", "x"],
        ),
        case(
            "unique",
            json!({"type": "integer", "constraints": {"unique": true}}),
            &["1", "2", "01", "", "", "3"],
        ),
        case(
            "missing_values",
            json!({"type": "integer"}),
            &["NA", "-", "1"],
        ),
    ]
}

/// A refusal's kind, as both sides can name it.
fn kind(code: &str) -> &'static str {
    match code {
        "type" | "type-error" => "type",
        "unique-error" => "constraint",
        c if c.starts_with("constraint") => "constraint",
        _ => "other",
    }
}

fn write_case(dir: &Path, c: &Case) -> (std::path::PathBuf, std::path::PathBuf, String) {
    let mut field = c.field.clone();
    field["name"] = json!("v");
    let mut schema = json!({"fields": [{"name": "id", "type": "integer"}, field]});
    if c.name == "missing_values" {
        schema["missingValues"] = json!(["", "NA", "-"]);
    }
    let schema_path = dir.join(format!("{}.schema.json", c.name));
    std::fs::write(&schema_path, schema.to_string()).unwrap();
    let mut writer = csv::Writer::from_writer(Vec::new());
    writer.write_record(["id", "v"]).unwrap();
    for (i, v) in c.values.iter().enumerate() {
        writer
            .write_record([(i + 1).to_string().as_str(), v])
            .unwrap();
    }
    let table = writer.into_inner().unwrap();
    let table_path = dir.join(format!("{}.csv", c.name));
    std::fs::write(&table_path, &table).unwrap();
    (schema_path, table_path, schema.to_string())
}

/// The reference's verdict on each row: `None` when valid, else the kind of refusal.
fn reference(output: &std::process::Output, rows: usize) -> Vec<Option<&'static str>> {
    let report: Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("frictionless output is not JSON ({e}): {output:?}"));
    let mut verdicts = vec![None; rows];
    for e in report["tasks"][0]["errors"].as_array().unwrap() {
        let row = e["rowNumber"]
            .as_u64()
            .unwrap_or_else(|| panic!("not an error of a row: {e}")) as usize;
        verdicts[row - 2] = Some(kind(e["type"].as_str().unwrap()));
    }
    verdicts
}

/// DataFlow's verdict on each row, through the same parser and schema the server uses.
fn dataflow(schema: &str, table: &[u8], rows: usize) -> Vec<Option<&'static str>> {
    let schema = Schema::parse(schema).unwrap();
    let limits = Limits {
        max_records: u64::MAX,
        max_field_bytes: 1 << 20,
    };
    let mut verdicts = vec![None; rows];
    let mut seen = Seen::default();
    records::parse(ImportFormat::Csv, table, limits, |record| {
        // A CSV's header is checked once, before its records (as the API does).
        let check = schema.check_record(&record.fields, true, &mut seen);
        if let Some(e) = check.errors.first() {
            verdicts[record.line as usize - 2] = Some(kind(e.code));
        }
    })
    .unwrap();
    verdicts
}

fn schemas_agree_with_the_frictionless_reference() {
    let installed = Command::new("frictionless").arg("--version").output();
    if !installed.is_ok_and(|o| o.status.success()) {
        let _: Option<()> = crate::common::services::unreachable(
            "frictionless",
            "the reference validator is not installed: pip install frictionless",
        );
        return;
    }
    let dir = std::env::temp_dir().join(format!("dataflow-frictionless-{}", ulid::Ulid::new()));
    std::fs::create_dir_all(&dir).unwrap();
    let cases = cases();
    // One reference process per case, all at once: each takes most of a second to start.
    let runs: Vec<_> = cases
        .iter()
        .map(|c| {
            let (schema_path, table_path, schema) = write_case(&dir, c);
            // Relative paths: the reference refuses absolute ones as unsafe.
            let child = Command::new("frictionless")
                .current_dir(&dir)
                .args(["validate", "--json", "--schema"])
                .arg(schema_path.file_name().unwrap())
                .arg(table_path.file_name().unwrap())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            (c, table_path, schema, child)
        })
        .collect();
    let mut disagreements = Vec::new();
    let mut expected = Vec::new();
    for (c, table_path, schema, child) in runs {
        let output = child.wait_with_output().unwrap();
        let theirs = reference(&output, c.values.len());
        let ours = dataflow(
            &schema,
            &std::fs::read(&table_path).unwrap(),
            c.values.len(),
        );
        for ((value, theirs), ours) in c.values.iter().zip(theirs).zip(ours) {
            let named = DIFFERENT
                .iter()
                .find(|(case, v, _)| c.name.starts_with(case) && v == value);
            match (named, theirs == ours) {
                (None, true) => {}
                (Some(_), false) => expected.push((c.name, value.clone())),
                (None, false) => disagreements.push(format!(
                    "{}: {value:?}: frictionless {theirs:?}, DataFlow {ours:?}",
                    c.name
                )),
                (Some((_, _, why)), true) => disagreements.push(format!(
                    "{}: {value:?} is named as a difference ({why}) but both read it alike",
                    c.name
                )),
            }
        }
    }
    assert!(
        disagreements.is_empty(),
        "DataFlow and frictionless disagree:\n{}",
        disagreements.join("\n")
    );
    assert_eq!(
        expected.len(),
        DIFFERENT.len(),
        "every named difference was seen: {expected:?}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
register!(sync schemas_agree_with_the_frictionless_reference);

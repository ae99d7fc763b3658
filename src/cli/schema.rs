//! `dataflow schema validate FILE --schema S.json`: checks a file against a client schema
//! (Frictionless Table Schema) offline, with no server and no ledger, and prints each
//! refused cell as the server reports it: line, field, code and what is wrong.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use dataflow_platform::Config;
use dataflow_platform::domain::records::{self, Limits};
use dataflow_platform::domain::schema::{FieldError, Schema, Seen};

use super::import::file_format;

#[derive(Subcommand, Debug)]
pub enum SchemaCmd {
    /// Checks a file against a schema offline; exits 1 when any record is refused.
    Validate(ValidateArgs),
}

#[derive(Args, Debug)]
pub struct ValidateArgs {
    /// A CSV file with a header row, or JSON lines (`.ndjson`, `.jsonl`).
    pub file: PathBuf,
    /// The schema: a Frictionless Table Schema JSON document.
    #[arg(long)]
    pub schema: PathBuf,
    /// `csv` or `ndjson`; default: from the file's extension.
    #[arg(long)]
    pub format: Option<String>,
}

/// How many refused cells are printed; the count says how many there were.
const SHOWN: usize = 100;

pub fn run(config: &Config, cmd: SchemaCmd) -> anyhow::Result<()> {
    let SchemaCmd::Validate(args) = cmd;
    let doc = std::fs::read_to_string(&args.schema)
        .with_context(|| format!("reading {}", args.schema.display()))?;
    let schema = Schema::parse(&doc)
        .with_context(|| format!("{} is not a schema DataFlow can use", args.schema.display()))?;
    let format = file_format(&args.file, args.format.as_deref())?;
    let body =
        std::fs::read(&args.file).with_context(|| format!("reading {}", args.file.display()))?;
    let limits = Limits {
        max_records: u64::MAX,
        max_field_bytes: config.api.max_field_bytes,
    };
    let mut problems: Vec<(u64, FieldError)> = Vec::new();
    let (mut valid, mut refused) = (0u64, 0u64);
    let by_header = format == dataflow_contracts::ImportFormat::Csv;
    let mut seen = Seen::default();
    let summary = records::parse(format, &body, limits, |record| {
        let mut row = schema.check_row(&record.fields);
        schema.check_unique(&mut row, &mut seen);
        let mut errors = row.errors;
        if !by_header {
            errors.extend(schema.check_columns(record.fields.keys().map(String::as_str)));
        }
        if errors.is_empty() {
            valid += 1;
        } else {
            refused += 1;
            problems.extend(errors.into_iter().map(|e| (record.line, e)));
        }
    })
    .map_err(|e| anyhow::anyhow!("{}: {e}", args.file.display()))?;
    // A CSV header is checked once, as line 1; its problems refuse every record.
    let header = summary
        .columns
        .as_ref()
        .map(|columns| schema.check_columns(columns.iter().map(String::as_str)))
        .unwrap_or_default();
    if !header.is_empty() {
        refused = summary.records;
        valid = 0;
    }
    let all: Vec<(u64, FieldError)> = header.into_iter().map(|e| (1, e)).chain(problems).collect();
    for (line, e) in all.iter().take(SHOWN) {
        println!("line {line}, field `{}`: {}: {}", e.field, e.code, e.detail);
    }
    if all.len() > SHOWN {
        println!("… and {} more", all.len() - SHOWN);
    }
    println!(
        "{} records: {valid} valid, {refused} refused",
        summary.records
    );
    if refused > 0 {
        bail!(
            "{refused} of {} records do not fit the schema",
            summary.records
        );
    }
    Ok(())
}

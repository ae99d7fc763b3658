//! `dataflow schema`: a client's schema (a Frictionless Table Schema) in the ledger —
//! `show`, `set` (a new version), `remove` — and `validate`, which checks a file offline,
//! with no server and no ledger, through the same preparation the worker runs, so it prints
//! the errors the server would: the header's (which refuse the whole file with a 422),
//! then each refused cell with its line, field, code and value.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use dataflow_contracts::{ImportFormat, Policy};
use dataflow_platform::Config;
use dataflow_platform::domain::prepare::{RowError, Rules, header_errors, prepare};
use dataflow_platform::domain::records::{self, Limits};
use dataflow_platform::domain::schema::Schema;

use super::import::file_format;
use super::{announce, client_id, ledger, print_json};

#[derive(Subcommand, Debug)]
pub enum SchemaCmd {
    /// Checks a file against a schema offline; exits 1 when any record is refused.
    Validate(ValidateArgs),
    /// Prints a client's schema: the current version, or `--version N`.
    Show {
        client_id: String,
        #[arg(long)]
        version: Option<u64>,
    },
    /// Sets a client's schema from a JSON file, as its next version.
    Set { client_id: String, file: PathBuf },
    /// New imports of the client are no longer checked by a schema (versions are kept).
    Remove { client_id: String },
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
    /// The record key when the schema has no `primaryKey` (the policy's `key_field`).
    #[arg(long, default_value = "id")]
    pub key_field: String,
}

/// How many refused cells are printed; the count says how many there were.
const SHOWN: usize = 100;

pub async fn run(config: &Config, cmd: SchemaCmd) -> anyhow::Result<()> {
    match cmd {
        SchemaCmd::Validate(args) => validate(config, args),
        SchemaCmd::Show {
            client_id: id,
            version,
        } => {
            let ledger = ledger(config).await?;
            match ledger.db.get_schema(&client_id(&id)?, version).await? {
                Some(view) => print_json(&view),
                None => match version {
                    Some(v) => bail!("client {id} has no schema version {v}"),
                    None => bail!("client {id} has no schema: its records are stored as they come"),
                },
            }
        }
        SchemaCmd::Set {
            client_id: id,
            file,
        } => {
            let document = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            // Stored compact, as the API stores what it is sent.
            let value: serde_json::Value = serde_json::from_str(&document)
                .with_context(|| format!("{} is not JSON", file.display()))?;
            let ledger = ledger(config).await?;
            let id = client_id(&id)?;
            let view = ledger.db.set_schema(&id, &value.to_string()).await?;
            announce(&ledger.clients, id.as_str()).await;
            eprintln!("schema version {} of {id} is now current", view.version);
            Ok(())
        }
        SchemaCmd::Remove { client_id: id } => {
            let ledger = ledger(config).await?;
            let id = client_id(&id)?;
            let client = ledger.db.remove_schema(&id).await?;
            announce(&ledger.clients, id.as_str()).await;
            print_json(&client.view())
        }
    }
}

fn validate(config: &Config, args: ValidateArgs) -> anyhow::Result<()> {
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
    let mut parsed = Vec::new();
    let summary = records::parse(format, &body, limits, |record| parsed.push(record))
        .map_err(|e| anyhow::anyhow!("{}: {e}", args.file.display()))?;
    let policy = Policy {
        key_field: args.key_field,
        ..Policy::default()
    };
    let rules = Rules::Schema {
        schema: &schema,
        key_field: &policy.key_field,
        header_checked: format == ImportFormat::Csv,
    };
    let header = summary
        .columns
        .as_deref()
        .map(|columns| header_errors(rules, columns))
        .unwrap_or_default();
    if !header.is_empty() {
        print_errors(header.iter(), header.len());
        bail!(
            "the header does not fit the schema: the server refuses the file (422) and stores none of its {} records",
            summary.records
        );
    }
    let prepared = prepare(&parsed, rules, usize::MAX, 0);
    print_errors(prepared.errors(), prepared.errors().count());
    let refused = prepared.failed;
    println!(
        "{} records: {} valid, {refused} refused",
        prepared.records,
        prepared.records - refused
    );
    if let Some(why) = prepared.refusal(rules.max_error_ratio(&policy)) {
        println!("the server would write none of them: {why}");
    }
    if refused > 0 {
        bail!(
            "{refused} of {} records do not fit the schema",
            prepared.records
        );
    }
    Ok(())
}

fn print_errors<'a>(errors: impl Iterator<Item = &'a RowError>, total: usize) {
    for e in errors.take(SHOWN) {
        let field = e.field.as_deref().unwrap_or("");
        match &e.value {
            Some(value) => println!(
                "line {}, field `{field}`: {}: {} (value: {value:?})",
                e.line, e.code, e.detail
            ),
            None => println!("line {}, field `{field}`: {}: {}", e.line, e.code, e.detail),
        }
    }
    if total > SHOWN {
        println!("… and {} more", total - SHOWN);
    }
}

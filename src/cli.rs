//! The `dataflow` command line: process roles and operator commands.
//!
//! Operator commands work on the ledger directly, so they need no running server. With Redis
//! configured they also broadcast the cache invalidation, so running API processes enforce
//! the change at once; without Redis, API processes see it within their cache TTL
//! (`api.cache_ttl_ms`), while the same change through `/admin` applies on the next request.

pub mod healthcheck;
pub mod import;
pub mod ops;
pub mod schema;
pub mod upload;

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use dataflow_contracts::policy::PolicyPatch;
use dataflow_contracts::{ClientId, Policy};
use dataflow_platform::backends::Operator;
use dataflow_platform::domain::keys::KeyHasher;
use dataflow_platform::ledger::Db;
use dataflow_platform::traces::{Exporter, WithTraceIds};
use dataflow_platform::{Backends, Config};

#[derive(Parser, Debug)]
#[command(
    name = "dataflow",
    version,
    about = "Durable imports, batch processing and jobs in one binary"
)]
pub struct Cli {
    /// TOML configuration file (default: ./dataflow.toml when present).
    #[arg(long, global = true, env = "DATAFLOW_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// API, worker and outbox relay in one process (the default).
    All,
    /// The HTTP API (and the outbox relay).
    Serve,
    /// A batch worker (and the outbox relay).
    Worker,
    /// Applies the ledger migrations and exits.
    Migrate,
    /// Exits 0 when this host's process answers `/healthz` (or the ledger, for workers).
    Healthcheck(healthcheck::HealthcheckArgs),
    /// Manage clients (tenants).
    #[command(subcommand)]
    Clients(ClientsCmd),
    /// Manage API keys.
    #[command(subcommand)]
    Keys(KeysCmd),
    /// Show or change a client's policy.
    #[command(subcommand)]
    Policy(PolicyCmd),
    /// Queues, their oldest items, and whether Redis answers: a table.
    Status,
    /// Batches across clients: list, show, retry.
    #[command(subcommand)]
    Batches(ops::BatchesCmd),
    /// The dead-letter queue (dead batches and dead jobs): list, retry, discard.
    #[command(subcommand)]
    Dlq(ops::DlqCmd),
    /// The worker fleet: list, drain.
    #[command(subcommand)]
    Workers(ops::WorkersCmd),
    /// Uploads a file as a producer over the HTTP API; `--wait` follows it to the end.
    Import(import::ImportArgs),
    /// Client schemas (Frictionless Table Schema): show, set, remove; `validate` checks a
    /// file offline.
    #[command(subcommand)]
    Schema(schema::SchemaCmd),
}

#[derive(Subcommand, Debug)]
pub enum ClientsCmd {
    /// Creates a client with the default policy (or `--policy` JSON on top of it).
    Create {
        name: String,
        #[arg(long)]
        policy: Option<String>,
    },
    List,
    Deactivate {
        client_id: String,
    },
    Activate {
        client_id: String,
    },
    /// Removes the client's data from the ledger (records, changes, stored files, row
    /// errors, reports); written to the action log. Asks for `--yes`.
    Purge {
        client_id: String,
        /// The purge cannot be undone: say so.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum KeysCmd {
    /// Mints a key; the secret is printed once and never stored.
    Create {
        client_id: String,
        #[arg(long)]
        label: Option<String>,
    },
    List {
        client_id: String,
    },
    Revoke {
        key_id: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum PolicyCmd {
    Show {
        client_id: String,
    },
    /// Applies a JSON patch, e.g. `'{"rate_per_minute": 120, "notify_email": null}'`.
    Set {
        client_id: String,
        patch: String,
    },
}

/// The whole start-up, for the operator commands that look at the fleet and its queues
/// (`status`, `workers`).
pub(crate) async fn backends(config: &Config) -> anyhow::Result<std::sync::Arc<Backends>> {
    Backends::build(config)
        .await
        .context("opening the backends")
}

/// The ledger alone (and the caches, to announce a change), for the operator commands
/// that only read or change it.
pub(crate) async fn ledger(config: &Config) -> anyhow::Result<Operator> {
    Operator::open(config).await.context("opening the ledger")
}

fn client_id(raw: &str) -> anyhow::Result<ClientId> {
    raw.parse()
        .with_context(|| format!("`{raw}` is not a client id"))
}

pub(crate) fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// Tells running processes (through Redis, when configured) that `key` changed.
async fn announce<V>(cache: &dataflow_platform::guards::cache::Cache<V>, key: &str)
where
    V: Clone + serde::Serialize + serde::de::DeserializeOwned + Send + Sync + 'static,
{
    if let Err(e) = cache.invalidate(key).await {
        eprintln!(
            "warning: saved, but the change could not be announced ({e}); running processes apply it within their cache TTL"
        );
    }
}

pub async fn clients(config: &Config, cmd: ClientsCmd) -> anyhow::Result<()> {
    let ledger = ledger(config).await?;
    let db = &ledger.db;
    match cmd {
        ClientsCmd::Create { name, policy } => {
            let policy = match policy {
                Some(json) => {
                    let patch: PolicyPatch = serde_json::from_str(&json)
                        .context("--policy is not a valid policy patch")?;
                    Policy::default()
                        .patched(&patch)
                        .map_err(anyhow::Error::msg)?
                }
                None => Policy::default(),
            };
            print_json(&db.create_client(&name, &policy).await?.view())
        }
        ClientsCmd::List => {
            for c in db.list_clients().await? {
                let state = if c.active { "active" } else { "inactive" };
                println!("{}  {:<8}  {}", c.id, state, c.name);
            }
            Ok(())
        }
        ClientsCmd::Deactivate { client_id: id } => {
            let client = db.set_client_active(&client_id(&id)?, false).await?;
            announce(&ledger.clients, client.id.as_str()).await;
            print_json(&client.view())
        }
        ClientsCmd::Activate { client_id: id } => {
            let client = db.set_client_active(&client_id(&id)?, true).await?;
            announce(&ledger.clients, client.id.as_str()).await;
            print_json(&client.view())
        }
        ClientsCmd::Purge { client_id: id, yes } => {
            if !yes {
                bail!("a purge removes client {id}'s records and files for good: add --yes");
            }
            let operator = std::env::var("USER").unwrap_or_else(|_| "cli".into());
            let purged = db
                .purge_client_logged(&client_id(&id)?, &operator, "cli")
                .await?;
            print_json(&purged)
        }
    }
}

pub async fn keys(config: &Config, cmd: KeysCmd) -> anyhow::Result<()> {
    let ledger = ledger(config).await?;
    let db: &Db = &ledger.db;
    match cmd {
        KeysCmd::Create {
            client_id: id,
            label,
        } => {
            let id = client_id(&id)?;
            let hasher: KeyHasher = Operator::key_hasher(config)?;
            let key = hasher.generate();
            db.create_key(&id, &key.key_id, &key.hmac, label.as_deref())
                .await?;
            eprintln!("This key is shown once; store it now.");
            println!("{}", key.token);
            Ok(())
        }
        KeysCmd::List { client_id: id } => print_json(&db.list_keys(&client_id(&id)?).await?),
        KeysCmd::Revoke { key_id } => {
            let client = db.revoke_key(&key_id).await?;
            announce(&ledger.keys, &key_id).await;
            println!("revoked {key_id} of {client}");
            Ok(())
        }
    }
}

pub async fn policy(config: &Config, cmd: PolicyCmd) -> anyhow::Result<()> {
    let ledger = ledger(config).await?;
    let db = &ledger.db;
    match cmd {
        PolicyCmd::Show { client_id: id } => {
            let Some(client) = db.get_client(&client_id(&id)?).await? else {
                bail!("no client {id}")
            };
            print_json(&client.policy)
        }
        PolicyCmd::Set {
            client_id: id,
            patch,
        } => {
            let id = client_id(&id)?;
            let patch: PolicyPatch =
                serde_json::from_str(&patch).context("the patch is not a valid policy patch")?;
            let Some(client) = db.get_client(&id).await? else {
                bail!("no client {id}")
            };
            let policy = client.policy.patched(&patch).map_err(anyhow::Error::msg)?;
            let updated = db.set_policy(&id, &policy).await?;
            announce(&ledger.clients, id.as_str()).await;
            print_json(&updated.policy)
        }
    }
}

/// The URL without its password, for printing.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            let user = creds.split(':').next().unwrap_or("");
            format!("{}{user}:****{}", &url[..s + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

/// Shared by the process roles: the config with its source named in errors.
pub fn load_config(cli: &Cli) -> anyhow::Result<Config> {
    Config::load(cli.config.as_deref()).context("loading configuration")
}

/// The log filter: `DATAFLOW_LOG` (`EnvFilter` syntax) or `info` with sqlx's statements off.
///
/// What every `dataflow` process (and the benchmarks) sets up before anything else: the
/// one TLS crypto provider, and logs to stderr filtered by `DATAFLOW_LOG`, else `RUST_LOG`,
/// else `info`. With an OTLP endpoint set (`OTEL_EXPORTER_OTLP_ENDPOINT`), DataFlow's spans
/// are exported as traces too and each log line inside one names its trace and span; the
/// exporter returned is shut down at the end of the process, to send what it still holds.
pub fn init_process() -> Option<Exporter> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::{Layer, fmt};

    dataflow_platform::memory::return_freed_memory_promptly();
    dataflow_platform::install_crypto_provider();
    let spec = std::env::var("DATAFLOW_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .ok();
    let filter = log_filter(spec.as_deref());
    let exporter = match Exporter::start() {
        Ok(exporter) => exporter,
        Err(e) => {
            eprintln!("traces are not exported: {}", one_line(&e.into()));
            None
        }
    };
    let Some(exporter) = exporter else {
        // No exporter, no layer: the subscriber is the one a process without traces had.
        fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init();
        return None;
    };
    // Each layer filters for itself: the log level does not thin out the traces, which
    // take DataFlow's own spans (from its crates, all named `dataflow…`) and no library's.
    let spans =
        tracing_subscriber::filter::Targets::new().with_target("dataflow", tracing::Level::INFO);
    tracing_subscriber::registry()
        .with(
            fmt::layer()
                .event_format(WithTraceIds(fmt::format()))
                .with_writer(std::io::stderr)
                .with_filter(filter),
        )
        .with(exporter.layer().with_filter(spans))
        .init();
    Some(exporter)
}

/// lapin warns with the whole message of every event the broker returns unroutable, and a
/// routing key nobody binds returns every one; the relay counts those and logs each key
/// once a minute instead, so lapin's line is off whatever `DATAFLOW_LOG` says, unless it
/// names `lapin::returned_messages` itself.
pub fn log_filter(env: Option<&str>) -> tracing_subscriber::EnvFilter {
    const RETURNS: &str = "lapin::returned_messages";
    let spec = env.unwrap_or("info,sqlx=warn");
    let filter = tracing_subscriber::EnvFilter::try_new(spec)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn"));
    if spec.contains(RETURNS) {
        return filter;
    }
    match format!("{RETURNS}=error").parse() {
        Ok(directive) => filter.add_directive(directive),
        Err(_) => filter,
    }
}

/// An error and its causes on one line, for the person at the terminal. Many errors print
/// their cause in their own message already (sqlx's, lapin's, DataFlow's own), so a cause
/// the line says already is left out rather than repeated.
pub fn one_line(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_line_says_each_cause_once() {
        let io = std::io::Error::other("connection refused");
        let ledger = dataflow_platform::Error::Io {
            context: "opening the ledger".into(),
            source: io,
        };
        let e = anyhow::Error::new(ledger).context("starting DataFlow");
        assert_eq!(
            one_line(&e),
            "starting DataFlow: opening the ledger: connection refused"
        );
    }

    #[test]
    fn lapins_unroutable_warnings_stay_off_whatever_the_level() {
        for env in [
            None,
            Some("info"),
            Some("debug"),
            Some("warn,dataflow=debug"),
        ] {
            let filter = log_filter(env).to_string();
            assert!(
                filter.contains("lapin::returned_messages=error"),
                "{env:?}: {filter}"
            );
        }
        let asked = log_filter(Some("info,lapin::returned_messages=warn")).to_string();
        assert!(!asked.contains("lapin::returned_messages=error"), "{asked}");
    }
}

//! The `dataflow` binary: parse the command line, load config, set up tracing, run.

use std::process::ExitCode;

use clap::Parser;
use dataflow::cli::{self, Cli, Command};
use dataflow::{App, Roles};

// Record processing allocates many small strings; mimalloc serves them faster than glibc.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let traces = cli::init_process();
    let ran = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|runtime| runtime.block_on(run(cli)));
    if let Some(traces) = traces {
        traces.shutdown();
    }
    match ran {
        Ok(()) => ExitCode::SUCCESS,
        // The message and its causes on one line, for the person at the terminal; no
        // backtrace (logs and `RUST_BACKTRACE` are for the ones that debug DataFlow).
        Err(e) => {
            eprintln!("Error: {}", cli::one_line(&e));
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let config = cli::load_config(&cli)?;
    let roles = match cli.command.unwrap_or(Command::All) {
        Command::All => Roles::ALL,
        Command::Serve => Roles::API,
        Command::Worker => Roles::WORKER,
        Command::Migrate => {
            let db = dataflow_platform::backends::open_ledger(&config).await?;
            db.migrate().await?;
            db.close().await;
            println!(
                "migrations applied to {}",
                cli::redact(&config.database_url())
            );
            return Ok(());
        }
        Command::Healthcheck(args) => return cli::healthcheck::run(&config, args).await,
        Command::Clients(cmd) => return cli::clients(&config, cmd).await,
        Command::Keys(cmd) => return cli::keys(&config, cmd).await,
        Command::Policy(cmd) => return cli::policy(&config, cmd).await,
        Command::Status => return cli::ops::status(&config).await,
        Command::Batches(cmd) => return cli::ops::batches(&config, cmd).await,
        Command::Dlq(cmd) => return cli::ops::dlq(&config, cmd).await,
        Command::Workers(cmd) => return cli::ops::workers(&config, cmd).await,
        Command::Import(args) => return cli::import::run(args).await,
        Command::Schema(cmd) => return cli::schema::run(&config, cmd).await,
    };
    let app = App::start(config.clone(), roles, None).await?;
    if roles.api {
        if config.admin_token.is_none() {
            eprintln!(
                "Operator token for /admin: {} (set DATAFLOW_ADMIN_TOKEN to choose one)",
                config.data_dir.join("admin-token").display()
            );
        }
        if let Some(addr) = app.addr {
            eprintln!(
                "DataFlow is listening on http://{addr} (ledger: {})",
                cli::redact(&config.database_url())
            );
        }
    }
    let token = app.shutdown_token();
    tokio::spawn(async move {
        dataflow::shutdown_signal().await;
        token.cancel();
    });
    app.wait().await;
    Ok(())
}

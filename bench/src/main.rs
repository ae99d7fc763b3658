//! `dataflow-bench`: DataFlow's benchmarks, outside the shipped binary. Run them with
//! `cargo run --release -p dataflow-bench -- <bench> [options]`.

use clap::{Parser, Subcommand};

// The same allocator as the `dataflow` binary, so the figures are the shipped binary's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(name = "dataflow-bench", version, about = "DataFlow's benchmarks")]
struct Cli {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Subcommand, Debug)]
enum Bench {
    /// Submits imports over HTTP and measures submit rate and end-to-end records/s.
    Ingest(dataflow_bench::IngestArgs),
    /// Redis rate-limiter decisions/s and its added latency on `POST /v1/imports`.
    Limiter(dataflow_bench::LimiterArgs),
    /// Job queue throughput (no-op jobs through SQL and Redis) and idle pickup latency.
    Jobs(dataflow_bench::jobs::JobsArgs),
    /// RabbitMQ: commit → worker start (broker vs polling) and relay events/s vs raw lapin.
    Amqp(dataflow_bench::amqp::AmqpArgs),
    /// A dry run against a full table and an export of every record: rows/s, peak memory.
    Records(dataflow_bench::records::RecordsArgs),
    /// One client's flood against another's steady imports: the steady client's latency
    /// alone and under the flood, with DataFlow as real processes.
    Neighbours(dataflow_bench::neighbours::NeighboursArgs),
    /// Small imports from many connections at once: accepted imports/s, the answer's
    /// latency and completed batches/s, beside the HTTP ceiling of the same sitting.
    Submit(dataflow_bench::submit::SubmitArgs),
    /// 1, 2, 4 worker processes draining a backlog of big or small batches: records/s,
    /// batches/s, and what each batch costs PostgreSQL (WAL, transactions, rows, CPU).
    Scale(dataflow_bench::scale::ScaleArgs),
    /// A ledger grown to 10 million records and 100,000 batches: how each read and prune
    /// the system runs holds up, timed at each size on the way.
    Growth(dataflow_bench::growth::GrowthArgs),
    /// The HTTP ceiling's server, which `submit` starts as a process of its own.
    #[command(hide = true)]
    Hello {
        #[arg(long)]
        listen: std::net::SocketAddr,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Traces as a `dataflow` process exports them, so `bench ingest` and `bench jobs` run
    // with an OTLP endpoint set show what exporting costs (and without one, that it costs
    // nothing).
    let traces = dataflow::cli::init_process();
    let ran = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(async {
            match cli.bench {
                Bench::Ingest(args) => dataflow_bench::ingest(args).await,
                Bench::Limiter(args) => dataflow_bench::limiter(args).await,
                Bench::Jobs(args) => dataflow_bench::jobs::run(args).await,
                Bench::Amqp(args) => dataflow_bench::amqp::run(args).await,
                Bench::Records(args) => dataflow_bench::records::run(args).await,
                Bench::Neighbours(args) => dataflow_bench::neighbours::run(args).await,
                Bench::Submit(args) => dataflow_bench::submit::run(args).await,
                Bench::Scale(args) => dataflow_bench::scale::run(args).await,
                Bench::Growth(args) => dataflow_bench::growth::run(args).await,
                Bench::Hello { listen } => dataflow_bench::submit::hello(listen).await,
            }
        });
    if let Some(traces) = traces {
        traces.shutdown();
    }
    ran
}

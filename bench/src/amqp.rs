//! `dataflow-bench amqp`: the RabbitMQ tier.
//!
//! - Commit → worker start: an API process and a separate worker process share one ledger;
//!   one-record imports are submitted at `--rate`/s and each batch's `started_at` minus the
//!   `created_at` of its `BatchReady` outbox row (database clock, millisecond resolution; the
//!   row is the submit transaction's last insert, so this overstates commit → start by the
//!   commit itself) is measured, after a second at the rate that is not. Before it, raw
//!   lapin publishes as many messages at the same rate to a quorum queue of their own show
//!   what the broker alone costs. Once with the broker (outbox relay → exchange → quorum
//!   queue → consumer → fenced claim) and once with SQL polling only (no broker,
//!   `worker.poll_interval_ms` at its default).
//! - Relay throughput: `--events` outbox rows are relayed to the `batch.ready` quorum queue
//!   by the outbox relay (SQL read, pipelined confirms, exact-id mark), and the same messages
//!   (bodies, properties, `mandatory`) are published by raw lapin with the same confirm
//!   window to the same queue, twice: awaiting each `basic_publish` (lapin's documented
//!   way) and queuing each one without awaiting its write, as the relay does. `--rounds`
//!   rounds rotate which of the three goes first; the ratios of the medians are printed.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use clap::Args;
use dataflow_contracts::events::{BatchReady, Envelope, Event};
use dataflow_contracts::{BatchId, ClientId, ImportId, Policy};
use dataflow_platform::Config;
use dataflow_platform::broker::{self, Broker, Names, READY_KEY};
use dataflow_platform::config::{Secret, WorkerConfig};
use dataflow_platform::events::{self, Mode, Publisher};
use dataflow_platform::ledger::leases::OUTBOX_RELAY;
use dataflow_platform::ledger::{Db, OutboxRow};
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions,
    ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions, QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{ScratchLedger, percentile, start_with_client};
use dataflow::{App, Roles};

#[derive(Args, Debug, Clone)]
pub struct AmqpArgs {
    /// The broker; for a cluster, its nodes' URLs separated by commas, as `amqp_url` takes them.
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    pub amqp_url: String,
    /// `postgres://…` for the ledger; default: SQLite in a temporary folder.
    #[arg(long)]
    pub database_url: Option<String>,
    /// Batches submitted in each latency run (broker, then polling only); 0 skips them.
    #[arg(long, default_value_t = 2_000)]
    pub batches: usize,
    /// Submits per second in the latency runs.
    #[arg(long, default_value_t = 200)]
    pub rate: u64,
    /// Batches the worker process runs at once (both latency runs).
    #[arg(long, default_value_t = WorkerConfig::default().concurrency)]
    pub concurrency: usize,
    /// Ledger connections per process in the latency runs (`db_max_connections`).
    #[arg(long, default_value_t = Config::default().db_max_connections)]
    pub db_connections: u32,
    /// Write each latency sample (`mode,created_at_ms,relay_ms,start_ms`) to this CSV file.
    #[arg(long)]
    pub samples: Option<std::path::PathBuf>,
    /// Latency runs: `broker`, `polling` or `both`.
    #[arg(long, value_enum, default_value_t = Runs::Both)]
    pub runs: Runs,
    /// Events in the relay throughput run (and in each raw lapin run beside it); 0 skips it.
    #[arg(long, default_value_t = 100_000)]
    pub events: usize,
    /// Publishes awaiting their confirm at once, for the relay and raw lapin alike.
    #[arg(long, default_value_t = 1_000)]
    pub confirm_window: usize,
    /// Outbox rows per relay round.
    #[arg(long, default_value_t = 5_000)]
    pub relay_batch: u32,
    /// Rounds of the relay and both raw lapin runs, rotating which goes first; medians decide.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub rounds: u32,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runs {
    Broker,
    Polling,
    Both,
}

pub async fn run(args: AmqpArgs) -> anyhow::Result<()> {
    let run = ulid::Ulid::new().to_string().to_lowercase();
    let prefix = format!("dataflow-bench-{run}.");
    let result = measure(&args, &run, &prefix).await;
    delete_topology(&args.amqp_url, &amqp_config(&args, &prefix, 1).amqp).await?;
    result
}

/// Deletes the queues and exchanges a DataFlow on `config` declares.
pub(crate) async fn delete_topology(
    amqp_url: &str,
    config: &dataflow_platform::config::AmqpConfig,
) -> anyhow::Result<()> {
    let names = Names::new(config);
    let (_conn, ch) = raw_channel(amqp_url).await?;
    for q in [&names.ready_queue, &names.dead_letter_queue] {
        ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await?;
    }
    for x in [&names.exchange, &names.dead_letter_exchange] {
        ch.exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default())
            .await?;
    }
    Ok(())
}

async fn measure(args: &AmqpArgs, run: &str, prefix: &str) -> anyhow::Result<()> {
    if args.batches > 0 {
        latency_runs(args, run, prefix).await?;
    }
    if args.events > 0 {
        relay_throughput(args, run, prefix).await?;
    }
    Ok(())
}

/// The raw broker floor, then commit → worker start with the broker and with polling only.
async fn latency_runs(args: &AmqpArgs, run: &str, prefix: &str) -> anyhow::Result<()> {
    if args.runs != Runs::Polling {
        let (confirm, deliver) = raw_floor(args, prefix).await?;
        println!(
            "name=amqp-floor queue=quorum messages={} rate_per_s={} confirm_p50_ms={:.2} \
             confirm_p99_ms={:.2} deliver_p50_ms={:.2} deliver_p99_ms={:.2} deliver_max_ms={:.2}",
            args.batches,
            args.rate,
            confirm.p50,
            confirm.p99,
            deliver.p50,
            deliver.p99,
            deliver.max,
        );
    }
    for with_broker in [true, false] {
        if args.runs
            == if with_broker {
                Runs::Polling
            } else {
                Runs::Broker
            }
        {
            continue;
        }
        let ledger = ScratchLedger::create(args.database_url.as_deref(), run).await?;
        let mut config = ledger.config.clone();
        if with_broker {
            config.amqp_url = Some(Secret::new(args.amqp_url.clone()));
            config.amqp.prefix = prefix.to_owned();
        }
        config.api.max_concurrent_imports_per_client = 256;
        config.worker.concurrency = args.concurrency;
        config.db_max_connections = args.db_connections;
        config.validate()?;
        let measured = latency(args, config.clone()).await;
        let backend = ledger.backend;
        ledger.remove().await?;
        let samples = measured?;
        let mode = if with_broker { "broker" } else { "polling" };
        if let Some(path) = &args.samples {
            samples.append_csv(path, mode)?;
        }
        let (total, relay) = (samples.start(), samples.relay());
        println!(
            "name=amqp-latency mode={mode} backend={} batches={} rate_per_s={} concurrency={} \
             poll_interval_ms={} p50_ms={:.1} p99_ms={:.1} max_ms={:.1} relay_p50_ms={:.1} \
             relay_p99_ms={:.1}",
            backend,
            args.batches,
            args.rate,
            args.concurrency,
            config.worker.poll_interval_ms,
            total.p50,
            total.p99,
            total.max,
            relay.p50,
            relay.p99,
        );
    }
    Ok(())
}

fn amqp_config(args: &AmqpArgs, prefix: &str, batch: u32) -> Config {
    let mut config = Config::default();
    config.amqp.prefix = prefix.to_owned();
    config.amqp.confirm_window = args.confirm_window;
    config.outbox.batch_size = batch;
    config
}

/// One batch of a latency run, in database milliseconds from its `BatchReady` row's
/// `created_at`.
struct Sample {
    created_at: i64,
    /// To the relay's mark: after the broker's confirm, or with polling only after the
    /// in-process hand-off (which wakes no worker: it runs in another process).
    relay: Option<i64>,
    /// To the worker's claim.
    start: i64,
}

struct Samples(Vec<Sample>);

impl Samples {
    fn start(&self) -> Spread {
        Spread::of(self.0.iter().map(|s| s.start))
    }

    fn relay(&self) -> Spread {
        Spread::of(self.0.iter().filter_map(|s| s.relay))
    }

    fn append_csv(&self, path: &std::path::Path, mode: &str) -> anyhow::Result<()> {
        use std::io::Write;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        let mut out = std::io::BufWriter::new(file);
        for s in &self.0 {
            let relay = s.relay.map(|r| r.to_string()).unwrap_or_default();
            writeln!(out, "{mode},{},{relay},{}", s.created_at, s.start)?;
        }
        out.flush()?;
        Ok(())
    }
}

/// Commit → worker start (ms) with an API process and a worker process.
async fn latency(args: &AmqpArgs, config: Config) -> anyhow::Result<Samples> {
    let policy = Policy {
        rate_per_minute: 6_000_000,
        rate_burst: 1_000_000,
        dedup_window_secs: 0,
        ..Policy::default()
    };
    let (api, addr, token) = start_with_client(config.clone(), Roles::API, &policy).await?;
    // The API process connects first and so holds the relay lease: BatchReady reaches the
    // worker process through the broker, not through an in-process wake-up.
    wait_mode(&api, config.amqp_url.is_some()).await?;
    let deadline = Instant::now() + Duration::from_secs(15);
    while config.amqp_url.is_some() && api.backends.db.lease_owner(OUTBOX_RELAY).await?.is_none() {
        ensure!(
            Instant::now() < deadline,
            "the API process did not take the relay lease"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let worker = App::start(config, Roles::WORKER, None).await?;
    wait_mode(&worker, api.backends.broker.is_some()).await?;
    let db = api.backends.db.clone();
    let http = reqwest::Client::new();
    let submit = |i: usize| {
        let (http, token) = (http.clone(), token.clone());
        async move {
            let resp = http
                .post(format!("http://{addr}/v1/imports"))
                .bearer_auth(&token)
                .header("content-type", "text/csv")
                .body(format!("id,n\nb{i},{i}\n"))
                .send()
                .await?;
            ensure!(resp.status() == 202, "submit answered {}", resp.status());
            anyhow::Ok(())
        }
    };
    // Warm-up, not measured: one second at the rate, so that connection pools have grown to
    // their working size (a new PostgreSQL connection forks a backend and prepares each
    // statement again; when that happened inside the measured run, its first 0.3 s held
    // most of the worst 1 %), and caches and the consumer are warm.
    let paced = |first: usize, n: usize| {
        let submit = &submit;
        async move {
            let mut tick =
                tokio::time::interval(Duration::from_micros(1_000_000 / args.rate.max(1)));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut submits = tokio::task::JoinSet::new();
            for i in first..first + n {
                tick.tick().await;
                submits.spawn(submit(i));
            }
            while let Some(done) = submits.join_next().await {
                done??;
            }
            anyhow::Ok(())
        }
    };
    let warm_up = usize::try_from(args.rate).unwrap_or(usize::MAX).max(20);
    paced(0, warm_up).await?;
    wait_started(&db, warm_up).await?;
    let warm: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(created_at), 0) FROM batches")
        .fetch_one(db.pool())
        .await?;
    paced(warm_up, args.batches).await?;
    wait_started(&db, warm_up + args.batches).await?;
    // Every row marked published, so each sample has its relay time.
    let deadline = Instant::now() + Duration::from_secs(15);
    while db.outbox_backlog().await? > 0 {
        ensure!(Instant::now() < deadline, "the outbox did not drain");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // From the BatchReady row's `created_at`, the submit transaction's last write before its
    // commit (the batch's own `created_at` is taken at the transaction's start).
    let rows: Vec<(i64, Option<i64>, i64)> = sqlx::query_as(
        "SELECT o.created_at, o.published_at - o.created_at, b.started_at - o.created_at \
         FROM batches b JOIN outbox o ON o.batch_id = b.id AND o.event_type = 'BatchReady' \
         WHERE b.created_at > $1 AND b.started_at IS NOT NULL ORDER BY o.id",
    )
    .bind(warm)
    .fetch_all(db.pool())
    .await?;
    worker.stop().await;
    api.stop().await;
    ensure!(!rows.is_empty(), "no batch was measured");
    Ok(Samples(
        rows.into_iter()
            .map(|(created_at, relay, start)| Sample {
                created_at,
                relay,
                start,
            })
            .collect(),
    ))
}

/// What the broker alone costs at the same rate and length: raw lapin publishes
/// (persistent, one at a time at `--rate`/s) to a quorum queue of their own, timed to their
/// confirm and to their delivery at a consumer with manual acks.
async fn raw_floor(args: &AmqpArgs, prefix: &str) -> anyhow::Result<(Spread, Spread)> {
    // As many as the measured run, at its rate: a stall of the broker's shows here too.
    let n = args.batches;
    let queue = format!("{prefix}floor");
    let (conn, ch) = raw_channel(&args.amqp_url).await?;
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    let mut quorum = FieldTable::default();
    quorum.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    ch.queue_declare(queue.as_str().into(), durable, quorum)
        .await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let consumer_ch = conn.create_channel().await?;
    let mut deliveries = consumer_ch
        .basic_consume(
            queue.as_str().into(),
            "floor".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let base = Instant::now();
    let consume = tokio::spawn(async move {
        let mut ms = Vec::with_capacity(n);
        while ms.len() < n {
            let Some(delivery) = deliveries.next().await else {
                break;
            };
            let delivery = delivery?;
            let sent: [u8; 8] = delivery.data.as_slice().try_into()?;
            let now = base.elapsed().as_micros() as u64;
            ms.push(now.saturating_sub(u64::from_le_bytes(sent)) as i64);
            delivery.acker.ack(BasicAckOptions::default()).await?;
        }
        anyhow::Ok(ms)
    });
    let props = BasicProperties::default().with_delivery_mode(2);
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / args.rate.max(1)));
    let mut confirms = tokio::task::JoinSet::new();
    for _ in 0..n {
        tick.tick().await;
        let sent = base.elapsed().as_micros() as u64;
        let confirm = ch
            .basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions::default(),
                &sent.to_le_bytes(),
                props.clone(),
            )
            .await?;
        confirms.spawn(async move {
            let c = confirm.await?;
            ensure!(c.is_ack(), "floor publish was nacked");
            anyhow::Ok((base.elapsed().as_micros() as u64).saturating_sub(sent) as i64)
        });
    }
    let mut confirmed = Vec::with_capacity(n);
    while let Some(done) = confirms.join_next().await {
        confirmed.push(done??);
    }
    let delivered = tokio::time::timeout(Duration::from_secs(30), consume)
        .await
        .context("the floor queue did not deliver every message within 30 s")???;
    // The consumer goes first: deleting a queue under it makes the broker cancel it, which
    // lapin takes for a protocol error.
    consumer_ch.close(200, "floor measured".into()).await?;
    ch.queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await?;
    // Microseconds in, milliseconds out.
    let ms = |us: Vec<i64>| {
        let mut s = Spread::of(us.into_iter());
        for v in [&mut s.p50, &mut s.p99, &mut s.max] {
            *v /= 1000.0;
        }
        s
    };
    Ok((ms(confirmed), ms(delivered)))
}

/// p50, p99 and max of some milliseconds.
#[derive(Clone, Copy)]
struct Spread {
    p50: f64,
    p99: f64,
    max: f64,
}

impl Spread {
    fn of(ms: impl Iterator<Item = i64>) -> Spread {
        let mut ms: Vec<f64> = ms.map(|m| m as f64).collect();
        ms.sort_by(f64::total_cmp);
        if ms.is_empty() {
            return Spread {
                p50: f64::NAN,
                p99: f64::NAN,
                max: f64::NAN,
            };
        }
        Spread {
            p50: percentile(&ms, 0.50),
            p99: percentile(&ms, 0.99),
            max: ms[ms.len() - 1],
        }
    }
}

async fn wait_mode(app: &App, broker: bool) -> anyhow::Result<()> {
    let want = if broker { Mode::Broker } else { Mode::Embedded };
    let mut mode = app.backends.mode.subscribe();
    tokio::time::timeout(Duration::from_secs(15), mode.wait_for(|m| *m == want))
        .await
        .context("the broker did not connect within 15 s")??;
    Ok(())
}

async fn wait_started(db: &Db, n: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let started: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM batches WHERE started_at IS NOT NULL")
                .fetch_one(db.pool())
                .await?;
        if started as usize >= n {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("only {started} of {n} batches started within 2 minutes");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Outbox relay events/s against raw lapin publishing the same messages to the same quorum
/// queue, in `--rounds` rounds that alternate which of the two goes first; medians decide.
async fn relay_throughput(args: &AmqpArgs, run: &str, prefix: &str) -> anyhow::Result<()> {
    let ledger = ScratchLedger::create(args.database_url.as_deref(), run).await?;
    let db = Db::connect(&ledger.config.database_url(), 4).await?;
    db.migrate().await?;

    let mut config = amqp_config(args, prefix, args.relay_batch);
    config.amqp_url = Some(Secret::new(args.amqp_url.clone()));
    let broker = Arc::new(Broker::new(
        config.amqp_nodes(),
        config.amqp.clone(),
        watch::channel(Mode::Polling).0,
    ));
    let stop = CancellationToken::new();
    let link = tokio::spawn(broker.clone().run(stop.clone()));
    tokio::time::timeout(Duration::from_secs(15), broker.connected())
        .await
        .context("the broker did not connect")?;
    let publisher = Publisher::broker(broker.clone());
    let (_conn, ch) = raw_channel(&args.amqp_url).await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let queue = broker.names().ready_queue.clone();

    // Events/s of the relay, of raw lapin awaiting each publish, and of raw lapin queuing.
    let mut rates: [Vec<f64>; 3] = Default::default();
    let mut body_bytes = 0;
    for round in 1..=args.rounds {
        let rows = fill_outbox(&db, args.events).await?;
        body_bytes = rows.first().map_or(0, |r| r.body.len());
        // Rotating the order keeps a warmer broker, or a queue that has just been purged
        // of a whole round, from favouring any one of them.
        for k in 0..3 {
            let who = (k + round as usize) % 3;
            let started = Instant::now();
            match who {
                0 => {
                    let mut relayed = 0;
                    while relayed < args.events {
                        relayed += events::relay_once(&db, &publisher, args.relay_batch).await?;
                    }
                }
                _ => raw_publish(&ch, broker.names(), &rows, args.confirm_window, who == 2).await?,
            }
            rates[who].push(args.events as f64 / started.elapsed().as_secs_f64());
            if who == 0 {
                ensure!(db.outbox_backlog().await? == 0, "the outbox did not drain");
            }
            ch.queue_purge(queue.as_str().into(), QueuePurgeOptions::default())
                .await?;
        }
        db.prune_published(0).await?;
        let last = |who: usize| rates[who][rates[who].len() - 1];
        println!(
            "name=amqp-relay-round round={round} relay_events_per_s={:.0} raw_lapin_per_s={:.0} \
             raw_lapin_queued_per_s={:.0}",
            last(0),
            last(1),
            last(2),
        );
    }
    stop.cancel();
    link.await?;
    db.close().await;
    let backend = ledger.backend;
    ledger.remove().await?;
    let [ours, raw, queued] = rates.map(|mut r| median(&mut r));
    println!(
        "name=amqp-relay backend={} events={} rounds={} body_bytes={} confirm_window={} \
         relay_batch={} relay_events_per_s={ours:.0} raw_lapin_per_s={raw:.0} ratio={:.2} \
         raw_lapin_queued_per_s={queued:.0} ratio_queued={:.2}",
        backend,
        args.events,
        args.rounds,
        body_bytes,
        args.confirm_window,
        args.relay_batch,
        ours / raw,
        ours / queued,
    );
    Ok(())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    percentile(v, 0.5)
}

/// A `BatchReady` envelope, as an outbox row would carry it.
fn ready_row() -> anyhow::Result<OutboxRow> {
    let env = Envelope::new(
        BatchId::generate(),
        ClientId::generate(),
        0,
        Event::BatchReady(BatchReady {
            import_id: ImportId::generate(),
        }),
    );
    Ok(OutboxRow {
        id: 0,
        event_id: env.id.as_str().to_owned(),
        event_type: env.event.kind().to_owned(),
        routing_key: READY_KEY.to_owned(),
        body: serde_json::to_string(&env)?,
        traceparent: None,
    })
}

/// Writes `n` unpublished `BatchReady` rows, 100 to a statement; returns them (for the raw
/// run, which publishes the same messages).
///
/// Not more to a statement: sqlx binds SQLite parameters by looking each one's name up, and
/// SQLite finds a name by walking the statement's list of them, so binding is quadratic in
/// the parameters. At 500 rows (2,500 parameters) to a statement that lookup was 15 % of the
/// process's CPU samples in a SQLite relay run, filling included; at 100 rows, 4.7 %.
async fn fill_outbox(db: &Db, n: usize) -> anyhow::Result<Vec<OutboxRow>> {
    let rows = (0..n)
        .map(|_| ready_row())
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut tx = db.pool().begin().await?;
    for chunk in rows.chunks(100) {
        // Placeholders only (no values in the text); `$n` reads the same on both ledgers.
        let values: Vec<String> = (0..chunk.len())
            .map(|i| {
                let p = |k: usize| format!("${}", i * 5 + k);
                format!("({}, {}, {}, {}, {}, 0)", p(1), p(2), p(3), p(4), p(5))
            })
            .collect();
        let sql = format!(
            "INSERT INTO outbox (event_id, batch_id, event_type, routing_key, body, created_at) \
             VALUES {}",
            values.join(", ")
        );
        let mut insert = sqlx::query(sqlx::AssertSqlSafe(sql));
        for row in chunk {
            insert = insert
                .bind(&row.event_id)
                .bind(BatchId::generate().as_str().to_owned())
                .bind(&row.event_type)
                .bind(&row.routing_key)
                .bind(&row.body);
        }
        insert.execute(&mut *tx).await?;
    }
    tx.commit().await?;
    Ok(rows)
}

/// A channel of the bench's own; on a cluster (`--amqp-url` listing its nodes), on the
/// first node, where DataFlow's link starts too.
async fn raw_channel(urls: &str) -> anyhow::Result<(Connection, Channel)> {
    let first = urls.split(',').next().unwrap_or(urls).trim();
    let conn = Connection::connect(first, ConnectionProperties::default())
        .await
        .context("connecting to RabbitMQ")?;
    let ch = conn.create_channel().await?;
    Ok((conn, ch))
}

/// Raw lapin: the relay's messages (same properties, `mandatory`), with up to `window`
/// confirms in flight. Each `basic_publish` is awaited (it resolves once lapin's connection
/// thread wrote the frames) unless `queue_writes`: then it is polled once, which queues the
/// frames in order, and its write is awaited with its confirm, as the relay does.
async fn raw_publish(
    ch: &Channel,
    names: &Names,
    rows: &[OutboxRow],
    window: usize,
    queue_writes: bool,
) -> anyhow::Result<()> {
    type Pending = std::pin::Pin<Box<dyn Future<Output = lapin::Result<Confirmation>> + Send>>;
    let mut inflight: VecDeque<Pending> = VecDeque::with_capacity(window);
    for row in rows {
        if inflight.len() >= window
            && let Some(confirm) = inflight.pop_front()
        {
            ensure!(confirm.await?.is_ack(), "raw publish was nacked");
        }
        let publish = broker::publish(ch, &names.exchange, row.into());
        let pending: Pending = if queue_writes {
            let mut queued: Pending = Box::pin(async move { publish.await?.await });
            // A publish confirmed at its first poll is done: awaiting it again would resume
            // a finished future.
            match futures::poll!(queued.as_mut()) {
                std::task::Poll::Ready(done) => Box::pin(std::future::ready(done)),
                std::task::Poll::Pending => queued,
            }
        } else {
            Box::pin(publish.await?)
        };
        inflight.push_back(pending);
    }
    while let Some(confirm) = inflight.pop_front() {
        ensure!(confirm.await?.is_ack(), "raw publish was nacked");
    }
    Ok(())
}

//! DataFlow: the wiring of one process. [`App::start`] is the whole system on one page:
//! it builds the backends, then starts the roles this process plays (HTTP API, worker,
//! outbox relay, and with `AMQP_URL` the RabbitMQ link and the `batch.ready` consumer) and
//! stops them together.
//!
//! Layout of the repository (each concern in its own crate):
//! - `contracts/`: wire types (ids, events, policy, HTTP bodies);
//! - `platform/`: config, the SQL ledger, limiter, cache, keys, record parsing, outbox relay;
//! - `api/`: the axum application;
//! - `worker/`: batch processing under a fenced lease;
//! - `src/`: this wiring and the CLI (`main.rs`, [`cli`]);
//! - `bench/`: the benchmarks, a workspace member of their own (`dataflow-bench`).

pub mod cli;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::serve::ListenerExt;
use dataflow_api::AppState;
use dataflow_api::listener::BoundedListener;
use dataflow_contracts::jobs::JobKind;
use dataflow_platform::events::{self, OutboxRelaySettings};
use dataflow_platform::{Backends, Config};
use dataflow_worker::jobs::handlers::{Handlers, WebhookSlots};
use dataflow_worker::jobs::{self, JobsSetup};
use dataflow_worker::{WakeUps, Worker, leader, summaries};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Which parts run in this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Roles {
    pub api: bool,
    pub worker: bool,
}

impl Roles {
    pub const ALL: Roles = Roles {
        api: true,
        worker: true,
    };
    pub const API: Roles = Roles {
        api: true,
        worker: false,
    };
    pub const WORKER: Roles = Roles {
        api: false,
        worker: true,
    };
}

/// A running DataFlow process.
pub struct App {
    pub backends: Arc<Backends>,
    /// The API's bound address, when this process serves it.
    pub addr: Option<SocketAddr>,
    /// The operations listener's bound address (`ops_listen`), when configured.
    pub ops_addr: Option<SocketAddr>,
    /// The batch worker, when this process runs one.
    pub worker: Option<Worker>,
    shutdown: CancellationToken,
    tasks: JoinSet<()>,
    /// The live-update bus, stopped after every other task.
    live_stop: CancellationToken,
    live_task: tokio::task::JoinHandle<()>,
}

impl App {
    /// Builds the backends and starts the roles. The caller binds the listener (port 0 in
    /// tests); without one the configured address is bound.
    pub async fn start(
        config: Config,
        roles: Roles,
        listener: Option<TcpListener>,
    ) -> anyhow::Result<App> {
        let backends = Backends::build(&config)
            .await
            .context("starting the backends")?;
        let shutdown = CancellationToken::new();
        let mut tasks = JoinSet::new();

        // The outbox relay runs wherever outbox rows are written: in every role.
        let relay = OutboxRelaySettings {
            poll_interval: Duration::from_millis(config.outbox.poll_interval_ms),
            retention: Duration::from_secs(config.outbox.retention_secs),
            batch_size: config.outbox.batch_size,
            lease: Duration::from_millis(config.amqp.relay_lease_ms),
        };
        // The link outlives the relay, so the relay's last round after shutdown can still
        // publish what was committed just before it.
        let link_stop = CancellationToken::new();
        let relayed = events::run_relay(
            backends.db.clone(),
            backends.publisher.clone(),
            backends.db.commits().outbox(),
            relay,
            shutdown.clone(),
        );
        let relay_done = link_stop.clone();
        tasks.spawn(async move {
            relayed.await;
            relay_done.cancel();
        });
        // The broker link (reconnecting with backoff) is shared by the relay and the consumer.
        if let Some(broker) = &backends.broker {
            tasks.spawn(broker.clone().run(link_stop));
        }

        // Cache invalidations from other processes (only with Redis).
        tasks.spawn(backends.clone().run_invalidation_listener(shutdown.clone()));
        // Live updates for dashboards, to and from other processes (only with Redis). The
        // bus outlives the other roles, so what they announce while stopping (the last
        // outcomes, a worker leaving) still goes out.
        let live = backends.live.clone();
        let live_stop = CancellationToken::new();
        let (opened, closed) = (shutdown.clone(), live_stop.clone());
        let live_task = tokio::spawn(async move { live.run(opened, closed).await });

        let worker = roles.worker.then(|| {
            Worker::new(
                backends.db.clone(),
                config.worker.clone(),
                backends.mutex.clone(),
                backends.live.clone(),
            )
        });
        if let Some(worker) = &worker {
            // One worker of the fleet leads: the singleton duties run there.
            let (lead, leading) = watch::channel(leader::Term::default());
            tasks.spawn(leader::campaign(
                backends.db.clone(),
                worker.id().to_owned(),
                Duration::from_millis(config.worker.leader_lease_ms),
                lead,
                shutdown.clone(),
            ));
            if let Some(schedule) = config.worker.summary_schedule()? {
                let db = backends.db.clone();
                tasks.spawn(leader::while_leading(
                    leading.clone(),
                    shutdown.clone(),
                    // A summary is written once, whoever writes it: no act to hold back.
                    move |token, _| summaries::run(db.clone(), schedule.clone(), token),
                ));
            }
            // The leader samples each minute for the dashboard's charts.
            let db = backends.db.clone();
            tasks.spawn(leader::while_leading(
                leading.clone(),
                shutdown.clone(),
                move |token, mandate| dataflow_worker::charts::run(db.clone(), token, mandate),
            ));
            // The leader takes back the batches of workers the registry says are gone.
            let (db, fleet, me) = (backends.db.clone(), backends.fleet.clone(), worker.clone());
            tasks.spawn(leader::while_leading(
                leading.clone(),
                shutdown.clone(),
                move |token, mandate| {
                    let (db, fleet, me) = (db.clone(), fleet.clone(), me.clone());
                    dataflow_worker::reclaim::run(db, fleet, me, token, mandate)
                },
            ));
            // In the fleet registry while it runs; a drain request stops this process.
            tasks.spawn(dataflow_worker::membership::run(
                backends.fleet.clone(),
                worker.clone(),
                leading.clone(),
                backends.live.clone(),
                shutdown.clone(),
            ));
            // Subscribe before anything can publish, so no wake-up is missed.
            let wake = WakeUps {
                events: backends.publisher.subscribe(),
                mode: backends.mode.subscribe(),
                safety_sweep: Duration::from_millis(config.amqp.safety_sweep_ms),
            };
            tasks.spawn(worker.clone().run(wake, shutdown.clone()));
            if let Some(broker) = &backends.broker {
                tasks.spawn(dataflow_worker::consumer::run(
                    worker.clone(),
                    broker.clone(),
                    shutdown.clone(),
                ));
            }
            // Follow-up jobs (email, report, webhook) run beside the batch worker.
            let setup = JobsSetup {
                db: backends.db.clone(),
                queue: backends.job_queue.clone(),
                config: config.jobs.clone(),
                handler: Arc::new(Handlers {
                    db: backends.db.clone(),
                    hasher: backends.hasher.clone(),
                    mailer: backends.mailer.clone(),
                    webhooks: backends.webhooks.clone(),
                    webhook_slots: WebhookSlots::new(
                        config.jobs.webhook_max_per_host,
                        config.jobs.webhook_max_per_client,
                    ),
                }),
                kinds: JobKind::ALL.to_vec(),
                worker_id: worker.id().to_owned(),
                events: backends.publisher.subscribe(),
                commits: backends.db.commits().clone(),
                live: backends.live.clone(),
                leading,
            };
            tasks.spawn(jobs::run(setup, shutdown.clone()));
        }

        let (mut addr, mut ops_addr) = (None, None);
        if roles.api {
            let listener = match listener {
                Some(l) => l,
                None => bind(config.listen).await?,
            };
            addr = Some(listener.local_addr()?);
            let app = dataflow_api::router(AppState::new(
                backends.clone(),
                config.api.clone(),
                config.worker.chunk_size,
            ));
            let listener = BoundedListener::new(listener, config.api.max_connections);
            tasks.spawn(serve(listener, app, shutdown.clone()));
            tracing::info!(addr = %addr.map(|a| a.to_string()).unwrap_or_default(), "API listening");
        }
        if let Some(ops) = config.ops_listen {
            // Health checks and scrapes, apart from the public API.
            let listener = bind(ops).await?;
            ops_addr = Some(listener.local_addr()?);
            let app = dataflow_api::ops_router(AppState::new(
                backends.clone(),
                config.api.clone(),
                config.worker.chunk_size,
            ));
            let listener = BoundedListener::new(listener, config.api.max_connections);
            tasks.spawn(serve(listener, app, shutdown.clone()));
            tracing::info!(addr = %ops_addr.map(|a| a.to_string()).unwrap_or_default(), "health and metrics listening");
        }
        Ok(App {
            backends,
            addr,
            ops_addr,
            worker,
            shutdown,
            tasks,
            live_stop,
            live_task,
        })
    }

    /// A token that stops this process when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Waits until every role has stopped (after the shutdown token is cancelled).
    pub async fn wait(mut self) {
        while self.tasks.join_next().await.is_some() {}
        self.live_stop.cancel();
        let _ = self.live_task.await;
        self.backends.db.close().await;
    }

    /// Stops every role gracefully and waits for them.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.wait().await;
    }
}

async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))
}

/// Serves `app` on `listener` until `stop`, then lets requests in flight finish.
async fn serve(listener: BoundedListener, app: axum::Router, stop: CancellationToken) {
    // Responses go out as written, not held back for Nagle's algorithm.
    let listener = listener.tap_io(|conn| {
        if let Err(e) = conn.stream().set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY");
        }
    });
    let service = app.into_make_service_with_connect_info::<SocketAddr>();
    let served = axum::serve(listener, service)
        .with_graceful_shutdown(stop.cancelled_owned())
        .await;
    if let Err(e) = served {
        tracing::error!(error = %e, "HTTP server failed");
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
    tracing::info!("shutdown requested; finishing in-flight work");
}

//! One scenario: a fresh client, the recorded load, a fault held then healed, the drain,
//! and the checks: the invariants from SQL and Redis, the answers the clients got, what
//! must hold for this fault in RELIABILITY.md's table, and the evidence that its fault path
//! fired (without it the scenario proves nothing).

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::time::Instant;

use crate::cluster::{Cluster, Held, LEASE};
use crate::ledger::{self, Tally};
use crate::load::{Load, Outcome, Sent};

/// Load before the fault, and after the heal before the load stops.
const WARMUP: Duration = Duration::from_secs(3);
const AFTER_HEAL: Duration = Duration::from_secs(3);
/// P1: everything accepted has finished this long after the heal.
const DRAIN_LIMIT: Duration = Duration::from_secs(60);
/// How long every process has to be ready again (ledger, Redis, broker) after a scenario.
const RECOVERY_LIMIT: Duration = Duration::from_secs(30);
/// The delay of the delay scenario, added to each round trip to every service.
const DELAY: Duration = Duration::from_millis(200);
/// The API process killed in the API scenario.
const KILLED_API: usize = 1;
/// Tries at stopping a worker inside a chunk's transaction, before settling for a stop
/// between two.
const STOP_TRIES: usize = 40;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    CutPostgres,
    CutRedis,
    CutRabbitMq,
    CutAll,
    Delay,
    KillWorker,
    KillApi,
    StopWorker,
}

impl Fault {
    pub const ALL: [Fault; 8] = [
        Fault::CutPostgres,
        Fault::CutRedis,
        Fault::CutRabbitMq,
        Fault::CutAll,
        Fault::Delay,
        Fault::KillWorker,
        Fault::KillApi,
        Fault::StopWorker,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Fault::CutPostgres => "cut-postgres",
            Fault::CutRedis => "cut-redis",
            Fault::CutRabbitMq => "cut-rabbitmq",
            Fault::CutAll => "cut-all",
            Fault::Delay => "delay-200ms",
            Fault::KillWorker => "kill-9-worker",
            Fault::KillApi => "kill-9-api",
            Fault::StopWorker => "sigstop-worker",
        }
    }

    /// The ledger is unreachable: `503` (with `Retry-After`) is the honest answer.
    fn cuts_ledger(self) -> bool {
        matches!(self, Fault::CutPostgres | Fault::CutAll)
    }

    /// How long the fault is held: a killed worker stays down, and a stopped one stopped,
    /// past its lease, so a successor has had the time to take its batch over and finish it.
    fn hold(self, hold: Duration) -> Duration {
        match self {
            Fault::KillWorker | Fault::StopWorker => hold.max(LEASE + Duration::from_secs(4)),
            _ => hold,
        }
    }
}

/// One printed row.
pub struct Row {
    pub fault: &'static str,
    pub held: Duration,
    pub requests: [usize; 3],
    pub sent: usize,
    pub acked: usize,
    /// How long an acknowledged request took (the median), before the fault and in it.
    pub median_2xx: [Option<Duration>; 2],
    pub tally: Tally,
    pub drained: Option<Duration>,
    pub evidence: String,
    pub violations: Vec<String>,
}

/// What the test did to the cluster, for the heal and the evidence.
enum Injected {
    Cut,
    Delayed {
        before: [u64; 3],
    },
    /// A worker killed in the middle of a batch (`None`: none was found in one).
    Killed(Option<(usize, Held)>),
    /// A worker stopped in the middle of a batch (`None`: none was found in one).
    Stopped(Option<Stopped>),
    Api,
}

struct Stopped {
    worker: usize,
    held: Held,
    /// Inside a transaction that wrote rows, whose locks it holds while stopped.
    in_transaction: bool,
    /// The fleet's leader when it was stopped.
    leader: String,
}

/// What the processes reported (`/readyz`) and the stopped worker's batch did, during the
/// fault.
#[derive(Default)]
struct Seen {
    ledger_down: bool,
    redis_down: bool,
    polling: bool,
    limiter_fallbacks: u64,
    /// The killed or stopped worker's batch: when another worker took it over, and when it
    /// finished.
    taken_over: Option<(Duration, String)>,
    finished: Option<Duration>,
}

pub async fn run(cluster: &mut Cluster, fault: Fault, hold: Duration) -> Row {
    let hold = fault.hold(hold);
    let mut violations = Vec::new();
    if let Err(why) = cluster.wait_ready(RECOVERY_LIMIT).await {
        violations.push(format!("not ready before the fault: {why}"));
    }
    let (client, key) = cluster.new_client(fault.name()).await;
    let loaded_at = Instant::now();
    let load = Load::start(cluster.api_urls(), key, fault.name().to_owned());
    tokio::time::sleep(WARMUP).await;

    let injected_at = Instant::now();
    let injected = inject(cluster, fault).await;
    let mut seen = Seen::default();
    watch(
        cluster,
        &injected,
        injected_at + hold,
        injected_at,
        &mut seen,
    )
    .await;
    let healed_at = Instant::now();
    let resumed = heal(cluster, &injected).await;
    tokio::time::sleep(AFTER_HEAL).await;
    let sent = load.finish().await;

    let drain = ledger::wait_drained(&cluster.sql, &client, healed_at + DRAIN_LIMIT).await;
    let drained = drain.as_ref().ok().map(|()| healed_at.elapsed());
    violations.extend(drain.err());
    let (tally, found) = ledger::check(&cluster.sql, &client, &sent).await;
    violations.extend(found);
    violations.extend(ledger::immortal_keys(&cluster.redis_direct).await);
    let window = (injected_at, healed_at);
    violations.extend(answers(fault, &sent, window));
    let (evidence, fired, must_hold) =
        evidence(cluster, fault, &injected, &seen, resumed, &sent, window).await;
    violations.extend(must_hold);
    if !fired {
        violations.push(format!("the fault path was not shown to fire: {evidence}"));
    }
    if let Err(why) = cluster.wait_ready(RECOVERY_LIMIT).await {
        violations.push(format!("not recovered after the heal: {why}"));
    }

    let count = |o: Outcome| {
        sent.iter()
            .flat_map(|s| &s.attempts)
            .filter(|a| a.outcome == o)
            .count()
    };
    Row {
        fault: fault.name(),
        held: hold,
        requests: [
            count(Outcome::Ok),
            count(Outcome::Failed),
            count(Outcome::Unknown),
        ],
        sent: sent.len(),
        acked: sent.iter().filter(|s| s.acked.is_some()).count(),
        median_2xx: [
            median_2xx(&sent, (loaded_at, injected_at)),
            median_2xx(&sent, window),
        ],
        tally,
        drained,
        evidence,
        violations,
    }
}

async fn inject(cluster: &mut Cluster, fault: Fault) -> Injected {
    match fault {
        Fault::CutPostgres => cluster.pg.cut(),
        Fault::CutRedis => cluster.redis.cut(),
        Fault::CutRabbitMq => cluster.amqp.cut(),
        Fault::CutAll => {
            cluster.pg.cut();
            cluster.redis.cut();
            cluster.amqp.cut();
        }
        Fault::Delay => {
            let before = [&cluster.pg, &cluster.redis, &cluster.amqp].map(|p| p.delayed());
            for p in [&cluster.pg, &cluster.redis, &cluster.amqp] {
                p.delay(DELAY);
            }
            return Injected::Delayed { before };
        }
        Fault::KillWorker => {
            let Some((i, held)) = cluster.worker_in_a_batch(Duration::from_secs(10)).await else {
                return Injected::Killed(None);
            };
            cluster.kill(i);
            let now = cluster.batch(&held.id).await;
            let still = now.lease_epoch == held.lease_epoch && now.status == "processing";
            return Injected::Killed(still.then_some((i, held)));
        }
        Fault::KillApi => {
            cluster.kill(KILLED_API);
            return Injected::Api;
        }
        Fault::StopWorker => return Injected::Stopped(stop_a_worker(cluster).await),
    }
    Injected::Cut
}

/// Stops a worker in the middle of a batch, inside a chunk's transaction when one of
/// [`STOP_TRIES`] catches it there, else between two; a worker that finished its batch
/// meanwhile, or was not where wanted, is resumed and another moment chosen.
async fn stop_a_worker(cluster: &mut Cluster) -> Option<Stopped> {
    for want_transaction in [true, false] {
        for _ in 0..STOP_TRIES {
            let (i, held) = cluster.worker_in_a_batch(Duration::from_secs(10)).await?;
            cluster.signal(i, "STOP");
            // Long enough for a statement it had sent to finish.
            tokio::time::sleep(Duration::from_millis(100)).await;
            let now = cluster.batch(&held.id).await;
            let holds = now.lease_epoch == held.lease_epoch && now.status == "processing";
            let in_transaction = holds && cluster.in_a_writing_transaction(i).await;
            if holds && (in_transaction || !want_transaction) {
                return Some(Stopped {
                    worker: i,
                    held,
                    in_transaction,
                    leader: cluster.leader().await,
                });
            }
            cluster.signal(i, "CONT");
        }
    }
    None
}

/// Holds the fault until `until`, watching what the processes report and, for a killed or
/// stopped worker, what becomes of its batch.
async fn watch(
    cluster: &Cluster,
    injected: &Injected,
    until: Instant,
    since: Instant,
    seen: &mut Seen,
) {
    let stopped = match injected {
        Injected::Killed(Some((_, held))) => Some(held),
        Injected::Stopped(Some(stopped)) => Some(&stopped.held),
        _ => None,
    };
    while Instant::now() < until {
        for i in 0..cluster.procs.len() {
            let Some(r) = cluster.readyz(i).await else {
                continue;
            };
            seen.ledger_down |= r["ledger"] == "down";
            seen.redis_down |= r["redis"] == "down";
            seen.polling |= r["events"]["mode"] == "polling";
            let fallbacks = r["fallbacks"]["limiter"].as_u64().unwrap_or(0);
            seen.limiter_fallbacks = seen.limiter_fallbacks.max(fallbacks);
        }
        if let Some(held) = stopped {
            let now = cluster.batch(&held.id).await;
            if seen.taken_over.is_none()
                && (now.lease_epoch > held.lease_epoch || now.lease_owner != held.lease_owner)
            {
                seen.taken_over = Some((since.elapsed(), cluster.name_of(&now.lease_owner)));
            }
            if seen.finished.is_none() && matches!(now.status.as_str(), "completed" | "dead") {
                seen.finished = Some(since.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A stopped worker once resumed.
#[derive(Default)]
struct Resumed {
    /// It still had its transaction (and its locks) when it was resumed, past its lease.
    locks_outlived_lease: bool,
    /// Writes the fence refused it, and leases it found lost.
    fenced: u64,
    lost: u64,
}

/// Heals the fault; for a stopped worker, what it held and met once resumed.
async fn heal(cluster: &mut Cluster, injected: &Injected) -> Option<Resumed> {
    cluster.pg.heal();
    cluster.redis.heal();
    cluster.amqp.heal();
    match injected {
        Injected::Api => cluster.restart(KILLED_API).await,
        Injected::Killed(_) => {
            if let Some(i) = cluster
                .workers()
                .find(|&i| cluster.procs[i].pid().is_none())
            {
                cluster.restart(i).await;
            }
        }
        Injected::Stopped(Some(Stopped { worker, .. })) => {
            let locks_outlived_lease = cluster.in_a_writing_transaction(*worker).await;
            cluster.signal(*worker, "CONT");
            // Its next write meets the fence; give it the time to try.
            tokio::time::sleep(Duration::from_secs(3)).await;
            let text = cluster.metrics(*worker).await.unwrap_or_default();
            return Some(Resumed {
                locks_outlived_lease,
                fenced: metric(&text, "dataflow_fence_rejections_total", None),
                lost: metric(
                    &text,
                    "dataflow_batches_total",
                    Some("outcome=\"lease_lost\""),
                ),
            });
        }
        Injected::Stopped(None) | Injected::Cut | Injected::Delayed { .. } => {}
    }
    None
}

/// The answers the clients got: only `2xx`, `409` (a request with the same key still in
/// progress) and, while the ledger is cut, `503` with `Retry-After`; no `2xx` for a request
/// made entirely while the ledger was cut.
fn answers(fault: Fault, sent: &[Sent], (from, to): (Instant, Instant)) -> Vec<String> {
    let mut unexpected: BTreeMap<String, usize> = BTreeMap::new();
    let mut v = Vec::new();
    let mut without_retry_after = 0;
    let mut ok_while_cut = 0;
    for a in sent.iter().flat_map(|s| &s.attempts) {
        match a.status {
            Some(200 | 202 | 409) | None => {}
            Some(503) if fault.cuts_ledger() => without_retry_after += usize::from(!a.retry_after),
            Some(status) => {
                *unexpected
                    .entry(format!("{status} {}", a.detail))
                    .or_default() += 1
            }
        }
        let inside = a.started > from + Duration::from_secs(1) && a.ended < to;
        if fault.cuts_ledger() && inside && a.outcome == Outcome::Ok {
            ok_while_cut += 1;
        }
    }
    for (answer, n) in unexpected {
        v.push(format!("unexpected answer {answer} ×{n}"));
    }
    if without_retry_after > 0 {
        v.push(format!("503 without Retry-After ×{without_retry_after}"));
    }
    if ok_while_cut > 0 {
        v.push(format!("2xx while the ledger was cut ×{ok_while_cut}"));
    }
    v
}

/// The evidence that the fault path fired, whether it did, and the violations of what must
/// hold for this fault beyond the invariants.
async fn evidence(
    cluster: &Cluster,
    fault: Fault,
    injected: &Injected,
    seen: &Seen,
    resumed: Option<Resumed>,
    sent: &[Sent],
    (from, to): (Instant, Instant),
) -> (String, bool, Vec<String>) {
    let during = || {
        sent.iter()
            .flat_map(|s| &s.attempts)
            .filter(move |a| a.started >= from && a.started < to)
    };
    let unavailable = during().filter(|a| a.status == Some(503)).count();
    let flag = |b: bool| if b { "yes" } else { "no" };
    let at =
        |d: Option<Duration>| d.map_or("never".to_owned(), |d| format!("{:.1} s", d.as_secs_f64()));
    let taken_over = match &seen.taken_over {
        Some((after, by)) => format!("taken over by {by} after {}", at(Some(*after))),
        None => "never taken over".to_owned(),
    };
    let mut must = Vec::new();
    let (text, fired) = match (fault, injected) {
        (Fault::CutPostgres, _) => (
            format!(
                "503×{unavailable}; /readyz ledger down: {}",
                flag(seen.ledger_down)
            ),
            unavailable > 0 && seen.ledger_down,
        ),
        (Fault::CutRedis, _) => (
            format!(
                "/readyz redis down: {}; limiter fallbacks {}",
                flag(seen.redis_down),
                seen.limiter_fallbacks
            ),
            seen.redis_down,
        ),
        (Fault::CutRabbitMq, _) => (
            format!("/readyz events polling: {}", flag(seen.polling)),
            seen.polling,
        ),
        (Fault::CutAll, _) => (
            format!(
                "503×{unavailable}; /readyz ledger down: {}, redis down: {}, polling: {}",
                flag(seen.ledger_down),
                flag(seen.redis_down),
                flag(seen.polling)
            ),
            unavailable > 0 && seen.ledger_down && seen.redis_down && seen.polling,
        ),
        (Fault::Delay, Injected::Delayed { before }) => {
            let proxies = [&cluster.pg, &cluster.redis, &cluster.amqp];
            let held: Vec<u64> = proxies
                .iter()
                .zip(before)
                .map(|(p, b)| p.delayed() - b)
                .collect();
            let median = median_2xx(sent, (from, to)).unwrap_or_default();
            (
                format!(
                    "reads delayed pg/redis/amqp {}/{}/{}",
                    held[0], held[1], held[2],
                ),
                held.iter().all(|&n| n > 0) && median >= DELAY,
            )
        }
        (Fault::KillWorker, Injected::Killed(Some((_, held)))) => {
            let after = cluster.batch(&held.id).await;
            must.extend(budget_spent(held, &after));
            if seen.taken_over.is_none() {
                must.push(format!(
                    "the killed worker's batch was not taken over while it was down ({} after \
                     its restart)",
                    after.status
                ));
            }
            let resumed = after.status == "completed"
                && after.lease_owner != held.lease_owner
                && after.lease_epoch > held.lease_epoch;
            (
                format!(
                    "its batch {taken_over}, {} after {} (epoch {} → {}, takeovers {} → {}, \
                     attempts {} → {})",
                    after.status,
                    at(seen.finished),
                    held.lease_epoch,
                    after.lease_epoch,
                    held.takeovers,
                    after.takeovers,
                    held.attempts,
                    after.attempts,
                ),
                resumed,
            )
        }
        (Fault::KillApi, _) => {
            let cut_off: Vec<&Sent> = sent
                .iter()
                .filter(|s| {
                    s.attempts.iter().any(|a| {
                        a.api == KILLED_API && a.outcome == Outcome::Unknown && a.started >= from
                    })
                })
                .collect();
            let settled = cut_off.iter().filter(|s| s.acked.is_some()).count();
            let replayed = cut_off
                .iter()
                .filter(|s| s.attempts.iter().any(|a| a.replayed))
                .count();
            // A request killed after claiming its key and before committing holds the key
            // until its deadline: the retries meanwhile are told it is in progress.
            let in_progress = cut_off
                .iter()
                .flat_map(|s| &s.attempts)
                .filter(|a| a.status == Some(409))
                .count();
            (
                format!(
                    "{} imports unknown at the killed API, retried: {settled} acknowledged \
                     ({replayed} replayed, 409 in progress ×{in_progress})",
                    cut_off.len()
                ),
                !cut_off.is_empty() && cut_off.iter().all(|s| s.attempts.len() > 1),
            )
        }
        (Fault::StopWorker, Injected::Stopped(Some(stopped))) => {
            let held = &stopped.held;
            let Resumed {
                locks_outlived_lease,
                fenced,
                lost,
            } = resumed.unwrap_or_default();
            if locks_outlived_lease {
                must.push(
                    "the stopped worker's transaction, and its locks, outlived its lease".into(),
                );
            }
            let after = cluster.batch(&held.id).await;
            if seen.finished.is_none() {
                must.push(format!(
                    "the stopped worker's batch did not finish while it was stopped ({taken_over} \
                     while it was; {} after the resume)",
                    after.status
                ));
            }
            must.extend(budget_spent(held, &after));
            (
                format!(
                    "{} stopped inside a writing transaction: {}, still in it at the resume: \
                     {} (leader {}); {taken_over}, finished after {}; once resumed: fence \
                     rejections {fenced}, leases lost {lost}; takeovers {} → {}, attempts {} → {}",
                    cluster.procs[stopped.worker].name,
                    flag(stopped.in_transaction),
                    flag(locks_outlived_lease),
                    stopped.leader,
                    at(seen.finished),
                    held.takeovers,
                    after.takeovers,
                    held.attempts,
                    after.attempts
                ),
                stopped.in_transaction && seen.taken_over.is_some() && fenced + lost >= 1,
            )
        }
        (_, _) => (
            "no worker was found in the middle of a batch".to_owned(),
            false,
        ),
    };
    (text, fired, must)
}

/// The median time of the requests started between `from` and `to` that were acknowledged.
fn median_2xx(sent: &[Sent], (from, to): (Instant, Instant)) -> Option<Duration> {
    let mut took: Vec<Duration> = sent
        .iter()
        .flat_map(|s| &s.attempts)
        .filter(|a| a.outcome == Outcome::Ok && a.started >= from && a.started < to)
        .map(|a| a.ended - a.started)
        .collect();
    took.sort();
    took.get(took.len() / 2).copied()
}

/// A lease that lapsed because its holder died or froze is no failure of the batch: it must
/// not spend the batch's failure attempts.
fn budget_spent(held: &Held, after: &Held) -> Option<String> {
    (after.attempts > held.attempts).then(|| {
        format!(
            "a lapsed lease spent failure attempts: {} → {} of the batch's budget",
            held.attempts, after.attempts
        )
    })
}

/// The sum of a Prometheus counter's samples whose labels contain `label`.
fn metric(text: &str, name: &str, label: Option<&str>) -> u64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let metric_name = series.split('{').next()?;
            let wanted = metric_name == name && label.is_none_or(|f| series.contains(f));
            // Counters are whole numbers, written as floats.
            wanted
                .then(|| value.parse::<f64>().ok().map(|v| v as u64))
                .flatten()
        })
        .sum()
}

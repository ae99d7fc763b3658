//! The chaos suite: DataFlow's real binary family — two `dataflow serve` and three
//! `dataflow worker` processes — on PostgreSQL, Redis and RabbitMQ, each service reached
//! through a proxy the test controls. For each fault of the design's fault table
//! (RELIABILITY.md) that fits here (each service cut, all three cut, a 200 ms delay, `kill -9` of a worker and of an
//! API, `SIGSTOP` of a worker past its lease) it drives a recorded load, injects the fault,
//! heals it, lets the system drain, then checks the invariants against SQL and Redis and
//! that the fault path fired. One row per scenario is printed; any violation fails the test.
//!
//! Short by default (each fault held 10 s, a few minutes in all), as CI runs it.
//! `DATAFLOW_CHAOS_HOLD_SECS=60` holds each fault longer; `DATAFLOW_CHAOS_SCENARIOS=cut-redis,
//! sigstop-worker` runs some scenarios only. Every process's output is kept in the folder
//! the table names when a scenario fails.

// Tests fail loudly on the first unexpected value; that is what unwrap is for here.
#![allow(clippy::unwrap_used)]

// Each target uses its own part of the helpers the test targets share.
#[allow(dead_code)]
#[path = "../common/mod.rs"]
mod common;

mod cluster;
mod ledger;
mod load;
mod scenario;

use crate::common::harness::register;
use std::time::Duration;

use scenario::{Fault, Row};

/// Each fault's hold when `DATAFLOW_CHAOS_HOLD_SECS` is unset.
const SHORT_HOLD: Duration = Duration::from_secs(10);

async fn the_ledger_holds_through_every_fault() {
    let hold = std::env::var("DATAFLOW_CHAOS_HOLD_SECS")
        .ok()
        .map(|s| Duration::from_secs(s.parse().expect("DATAFLOW_CHAOS_HOLD_SECS: seconds")))
        .unwrap_or(SHORT_HOLD);
    let faults = selected();
    let Some(mut cluster) = cluster::Cluster::start().await else {
        return;
    };
    let mut rows = Vec::new();
    for fault in faults {
        let row = scenario::run(&mut cluster, fault, hold).await;
        eprintln!("{}", line(&row));
        rows.push(row);
    }
    let failed = rows.iter().any(|r| !r.violations.is_empty());
    println!("\n{}", table(&rows));
    if failed {
        println!("process logs: {}", cluster.logs.display());
    } else {
        let _ = std::fs::remove_dir_all(&cluster.logs);
    }
    assert!(!failed, "violations (see the table above)");
}
register!(the_ledger_holds_through_every_fault);

/// The scenarios `DATAFLOW_CHAOS_SCENARIOS` names (all when unset), in the suite's order.
fn selected() -> Vec<Fault> {
    let Ok(names) = std::env::var("DATAFLOW_CHAOS_SCENARIOS") else {
        return Fault::ALL.to_vec();
    };
    let names: Vec<&str> = names.split(',').map(str::trim).collect();
    for name in &names {
        assert!(
            Fault::ALL.iter().any(|f| f.name() == *name),
            "DATAFLOW_CHAOS_SCENARIOS: no scenario {name}; the scenarios are {:?}",
            Fault::ALL.map(Fault::name)
        );
    }
    Fault::ALL
        .into_iter()
        .filter(|f| names.contains(&f.name()))
        .collect()
}

const HEADER: [&str; 8] = [
    "fault",
    "held",
    "requests ok/failed/unknown",
    "2xx median before/in",
    "imports sent/acked/stored/completed/dead",
    "drained after heal",
    "fault path",
    "violations",
];

fn cells(r: &Row) -> [String; 8] {
    let [ok, failed, unknown] = r.requests;
    let t = &r.tally;
    let ms = |d: Option<Duration>| d.map_or("-".to_owned(), |d| format!("{} ms", d.as_millis()));
    [
        r.fault.to_owned(),
        format!("{} s", r.held.as_secs()),
        format!("{ok}/{failed}/{unknown}"),
        format!("{}/{}", ms(r.median_2xx[0]), ms(r.median_2xx[1])),
        format!(
            "{}/{}/{}/{}/{}",
            r.sent, r.acked, t.stored, t.completed, t.dead
        ),
        r.drained
            .map_or("no".to_owned(), |d| format!("{:.1} s", d.as_secs_f64())),
        r.evidence.clone(),
        if r.violations.is_empty() {
            "none".to_owned()
        } else {
            r.violations.join("; ")
        },
    ]
}

/// One scenario's row, as it finishes.
fn line(r: &Row) -> String {
    HEADER
        .iter()
        .zip(cells(r))
        .map(|(h, c)| format!("{h}: {c}"))
        .collect::<Vec<_>>()
        .join(" | ")
}

/// Every row, in a table whose columns fit their widest cell.
fn table(rows: &[Row]) -> String {
    let body: Vec<[String; 8]> = rows.iter().map(cells).collect();
    let mut widths = HEADER.map(str::len);
    for row in &body {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let render = |cells: &[String]| {
        cells
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join(" | ")
            .trim_end()
            .to_owned()
    };
    let mut out = vec![render(&HEADER.map(str::to_owned))];
    out.push(widths.map(|w| "-".repeat(w)).join("-|-"));
    out.extend(body.iter().map(|r| render(r)));
    out.join("\n")
}

fn main() -> std::process::ExitCode {
    common::harness::main()
}

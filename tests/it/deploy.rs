//! The deployment files, checked against the code they describe (no Docker engine needed):
//! the Grafana dashboard queries only metrics a real process exports, with labels they
//! carry; `docker-compose.yml` and the Dockerfile set only configuration DataFlow accepts
//! and run only commands the binary parses; and `dataflow healthcheck` answers for a
//! serving process, a refused port, an unhealthy answer and the ledger.

use crate::common::harness::register;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use clap::Parser;
use dataflow::Roles;
use dataflow::cli::Cli;
use dataflow_contracts::BatchStatus;
use dataflow_platform::Config;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::helpers::{Backend, TestApp, backend_tests, csv};

fn repo_file(path: &str) -> String {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{}: {e}", full.display()))
}

/// Series name → every label name seen on it, from Prometheus text.
fn scraped_series(body: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut series: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let labels = series.entry(line[..name_end].to_owned()).or_default();
        let Some(mut rest) = line[name_end..].strip_prefix('{') else {
            continue;
        };
        // name="value",… where a value may hold braces and commas (`/v1/batches/{id}`).
        while let Some(eq) = rest.find("=\"") {
            labels.insert(rest[..eq].trim_start_matches(',').to_owned());
            let mut chars = rest[eq + 2..].char_indices();
            let mut close = None;
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        chars.next();
                    }
                    '"' => {
                        close = Some(eq + 2 + i + 1);
                        break;
                    }
                    _ => {}
                }
            }
            rest = &rest[close.expect("a closed label value")..];
            if rest.starts_with('}') {
                break;
            }
        }
    }
    series
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// The `dataflow_*` names in a PromQL expression.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = expr;
    while let Some(at) = rest.find("dataflow_") {
        let end = rest[at..]
            .find(|c| !is_ident(c))
            .map_or(rest.len(), |e| at + e);
        names.insert(rest[at..end].to_owned());
        rest = &rest[end..];
    }
    names
}

/// Label names an expression groups by (`by (…)`) or matches on (`{name="…"}`).
fn label_names(expr: &str) -> BTreeSet<String> {
    let mut labels = BTreeSet::new();
    let mut rest = expr;
    while let Some(at) = rest.find("by (") {
        let inner = &rest[at + 4..];
        let close = inner.find(')').expect("by (…) closes");
        labels.extend(inner[..close].split(',').map(|l| l.trim().to_owned()));
        rest = &inner[close..];
    }
    let mut rest = expr;
    while let Some(at) = rest.find('{') {
        let inner = &rest[at + 1..];
        let close = inner.find('}').expect("a selector closes");
        for matcher in inner[..close].split(',') {
            let name: String = matcher
                .trim()
                .chars()
                .take_while(|&c| is_ident(c))
                .collect();
            labels.insert(name);
        }
        rest = &inner[close..];
    }
    labels
}

/// Metric names in the operations guide's Metrics table (`dataflow_amqp_*` as a prefix).
fn documented_metrics(guide: &str) -> Vec<String> {
    let table = guide
        .split("## Metrics")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .expect("docs/operations.md has a Metrics section");
    let mut names = Vec::new();
    for row in table.lines().filter(|l| l.starts_with("| `dataflow_")) {
        let first_cell = row.split('|').nth(1).unwrap_or("");
        for quoted in first_cell.split('`').skip(1).step_by(2) {
            names.push(quoted.to_owned());
        }
    }
    names
}

fn documented(name: &str, docs: &[String]) -> bool {
    docs.iter().any(|d| match d.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => {
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(name);
            d == name || d == base
        }
    })
}

/// Every PromQL expression in the dashboard, with the datasource uid of its panel and target.
fn dashboard_queries(dashboard: &Value) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        if panel["type"] == "row" {
            continue;
        }
        for target in panel["targets"].as_array().expect("targets") {
            let uids = [&panel["datasource"]["uid"], &target["datasource"]["uid"]]
                .iter()
                .map(|u| u.as_str().unwrap_or("<none>").to_owned())
                .collect();
            out.push((target["expr"].as_str().expect("expr").to_owned(), uids));
        }
    }
    out
}

async fn dashboard_queries_metrics_and_labels_a_process_exports() {
    let dashboard: Value =
        serde_json::from_str(&repo_file("deploy/grafana/dashboards/dataflow.json")).unwrap();
    let queries = dashboard_queries(&dashboard);
    assert!(queries.len() >= 20, "the dashboard lost its queries");

    // The provisioned datasource is the one every panel names.
    let datasource = repo_file("deploy/grafana/provisioning/datasources/prometheus.yml");
    let uid = datasource
        .lines()
        .find_map(|l| l.trim().strip_prefix("uid: "))
        .expect("the datasource has a uid");
    for (expr, uids) in &queries {
        assert!(uids.iter().all(|u| u == uid), "{expr}: datasource {uids:?}");
    }

    // A process that did what the panels chart: an import processed to its report job,
    // the same payload again (a dedup hit), all with Redis on.
    let Some(t) = TestApp::spawn_redis(Backend::Sqlite, Roles::ALL, None, |_| {}).await else {
        return;
    };
    let (_, key) = t.client(json!({})).await;
    let imported = t.import(&key, "text/csv", csv("deploy", 20)).await;
    t.wait_for(&key, &imported.batch_id, BatchStatus::Completed)
        .await;
    let again = t.submit(&key, "text/csv", csv("deploy", 20)).send().await;
    assert_eq!(again.unwrap().status(), 200, "the repeat is a duplicate");
    let deadline = Instant::now() + Duration::from_secs(10);
    let series = loop {
        let body = t.http.get(t.ops_url("/metrics")).send().await.unwrap();
        let series = scraped_series(&body.text().await.unwrap());
        if series.contains_key("dataflow_jobs_total") {
            break series;
        }
        assert!(Instant::now() < deadline, "no job settled: {series:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    t.stop().await;

    // Counters appear only once they counted: one the run cannot show must be documented.
    let docs = documented_metrics(&repo_file("docs/operations.md"));
    assert!(docs.len() >= 20, "metrics table not found: {docs:?}");
    let mut unscraped = BTreeSet::new();
    for (expr, _) in &queries {
        let names = metric_names(expr);
        assert!(!names.is_empty(), "{expr}: no dataflow_ metric");
        for name in &names {
            if !series.contains_key(name) {
                assert!(
                    documented(name, &docs),
                    "{expr}: {name} is neither exported nor documented"
                );
                unscraped.insert(name.clone());
            }
        }
        if names.iter().all(|n| series.contains_key(n)) {
            let carried: BTreeSet<&String> = names.iter().flat_map(|n| &series[n]).collect();
            for label in label_names(expr) {
                assert!(
                    carried.contains(&label),
                    "{expr}: no series of {names:?} carries label {label:?}"
                );
            }
        }
    }
    // A clean run refuses no fenced write; every other metric must be really exported.
    let rare = BTreeSet::from(["dataflow_fence_rejections_total".to_owned()]);
    assert!(
        unscraped.is_subset(&rare),
        "dashboard metrics the scraped process did not export: {unscraped:?}"
    );
}
register!(dashboard_queries_metrics_and_labels_a_process_exports);

/// `NAME=value` lines of `.env.example`.
fn env_example() -> BTreeMap<String, String> {
    repo_file(".env.example")
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

/// Replaces compose's `${NAME}`, `${NAME:-default}` and `${NAME:?message}` with the value
/// from `.env.example`; a name it does not define is an error.
fn interpolate(text: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find("${") {
        out.push_str(&rest[..at]);
        let close = rest[at..].find('}').expect("${ closes") + at;
        let inner = &rest[at + 2..close];
        let name = inner.split([':', '-', '?']).next().unwrap_or(inner);
        let value = env
            .get(name)
            .unwrap_or_else(|| panic!("docker-compose.yml uses {name}, .env.example lacks it"));
        out.push_str(value);
        rest = &rest[close + 1..];
    }
    out.push_str(rest);
    out
}

fn compose_and_dockerfile_set_only_config_dataflow_accepts() {
    let env = env_example();
    let compose = interpolate(&repo_file("docker-compose.yml"), &env);
    let mut vars: BTreeMap<String, String> = compose
        .lines()
        .filter_map(|l| l.trim().split_once(": "))
        .filter(|(k, _)| dataflow_platform::config::read_by_dataflow(k))
        .map(|(k, v)| (k.to_owned(), v.trim_matches('"').to_owned()))
        .collect();
    // The image's own defaults (`ENV A=1 \ B=2`) come first; compose overrides them.
    let dockerfile = repo_file("Dockerfile");
    let image_vars: Vec<(String, String)> = dockerfile
        .split_whitespace()
        .filter_map(|w| w.split_once('='))
        .filter(|(k, _)| dataflow_platform::config::read_by_dataflow(k))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    assert!(image_vars.len() >= 2, "Dockerfile ENV not found");
    for (k, v) in image_vars {
        vars.entry(k).or_insert(v);
    }
    for wanted in [
        "DATABASE_URL",
        "REDIS_URL",
        "AMQP_URL",
        "SMTP_URL",
        "DATAFLOW_ADMIN_TOKEN",
        "DATAFLOW_SECRET",
        "DATAFLOW_LISTEN",
    ] {
        assert!(vars.contains_key(wanted), "compose does not set {wanted}");
    }
    // Unknown keys are errors in from_sources, so a misspelt variable fails here.
    let config = Config::from_sources(None, vars.clone())
        .unwrap_or_else(|e| panic!("compose environment {vars:?} is not a valid config: {e}"));
    assert_eq!(config.listen.to_string(), "0.0.0.0:8080");
    assert!(config.database_url().starts_with("postgres://dataflow:"));
    assert!(config.redis_url.is_some() && config.amqp_url.is_some());
    assert!(config.jobs.smtp_url.is_some());
    assert_eq!(
        config.admin_token.unwrap().expose(),
        env["DATAFLOW_ADMIN_TOKEN"]
    );
    assert_eq!(config.secret.unwrap().expose(), env["DATAFLOW_SECRET"]);
    // The API's published port is the one it listens on.
    assert!(compose.contains("\"127.0.0.1:8080:8080\""));
}
register!(sync compose_and_dockerfile_set_only_config_dataflow_accepts);

fn compose_and_dockerfile_run_commands_the_binary_parses() {
    let compose = repo_file("docker-compose.yml");
    let dockerfile = repo_file("Dockerfile");
    let mut commands: Vec<Vec<String>> = Vec::new();
    for line in compose.lines().chain(dockerfile.lines()) {
        let line = line.trim();
        let Some(list) = ["command: ", "test: ", "CMD "]
            .iter()
            .find_map(|p| line.strip_prefix(p))
            .filter(|l| l.starts_with('['))
        else {
            continue;
        };
        let words: Vec<String> = serde_json::from_str(list).unwrap();
        let exec = words.first().is_some_and(|w| w == "CMD");
        match &words[usize::from(exec)..] {
            // A health check (`["CMD", "dataflow", …]`, `CMD ["dataflow", …]`) names the binary.
            [binary, ..] if binary == "dataflow" => {
                commands.push(words[usize::from(exec)..].to_vec())
            }
            // Another program's health check.
            _ if exec || line.starts_with("test: ") => {}
            // `command:` of a DataFlow service, the image's `CMD`: arguments to its entry point.
            _ => commands.push(
                std::iter::once("dataflow".to_owned())
                    .chain(words)
                    .collect(),
            ),
        }
    }
    // migrate, serve, worker, both compose health checks, the image's own and its CMD.
    assert!(commands.len() >= 7, "commands not found: {commands:?}");
    for words in commands {
        if let Err(e) = Cli::try_parse_from(&words) {
            panic!("{words:?} does not parse: {e}");
        }
    }
}
register!(sync compose_and_dockerfile_run_commands_the_binary_parses);

/// `dataflow healthcheck ARGS` with only `env` set, outside any config folder.
fn healthcheck(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dataflow"))
        .arg("healthcheck")
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .env("DATAFLOW_LOG", "error")
        .current_dir(std::env::temp_dir())
        .output()
        .unwrap()
}

/// Healthy exits 0 silently; unhealthy exits non-zero with one line on stderr.
fn assert_unhealthy(out: &Output, reason: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected a failure: {stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    assert!(
        stderr.contains("unhealthy") && stderr.contains(reason),
        "{stderr}"
    );
}

fn assert_healthy(out: &Output) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "expected healthy: {stderr}");
}

async fn healthcheck_probes_http() {
    let Some(t) = TestApp::spawn_with(Backend::Sqlite, Roles::API, |_| {}).await else {
        return;
    };
    let url = t.url("");
    assert_healthy(&healthcheck(&["--url", &url], &[]));
    assert_healthy(&healthcheck(&["--url", &url, "--ready"], &[]));
    // Without --url it probes the configured listen address, all interfaces → loopback.
    let listen = format!("0.0.0.0:{}", t.addr.port());
    assert_healthy(&healthcheck(&[], &[("DATAFLOW_LISTEN", &listen)]));
    t.stop().await;

    // A port nobody listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let refused = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    assert_unhealthy(&healthcheck(&["--url", &refused], &[]), &refused);

    // A process that answers, but not 200.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sick = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let mut buf = [0u8; 1024];
            let _ = conn.read(&mut buf).await;
            let answer = "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n";
            let _ = conn.write_all(answer.as_bytes()).await;
        }
    });
    let out = tokio::task::spawn_blocking(move || healthcheck(&["--url", &sick, "--ready"], &[]))
        .await
        .unwrap();
    assert_unhealthy(&out, "503");
}
register!(healthcheck_probes_http);

backend_tests!(healthcheck_checks_the_ledger);

async fn healthcheck_checks_the_ledger(backend: Backend) {
    let Some(t) = TestApp::spawn_with(backend, Roles::WORKER, |_| {}).await else {
        return;
    };
    let url = t.config.database_url();
    assert_healthy(&healthcheck(&["--ledger"], &[("DATABASE_URL", &url)]));
    t.stop().await;

    // A database without DataFlow's schema is no ledger a worker can use.
    let empty_dir = std::env::temp_dir().join(format!("dataflow-hc-{}", ulid::Ulid::new()));
    let empty = format!("sqlite://{}", empty_dir.join("empty.db").display());
    let out = healthcheck(&["--ledger"], &[("DATABASE_URL", &empty)]);
    let _ = std::fs::remove_dir_all(&empty_dir);
    assert_unhealthy(&out, "no DataFlow schema");

    // A ledger that does not answer.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let down = format!("postgres://dataflow@127.0.0.1:{port}/dataflow");
    assert_unhealthy(
        &healthcheck(&["--ledger"], &[("DATABASE_URL", &down)]),
        "ledger",
    );
}

backend_tests!(with_auto_migrate_off_a_process_starts_only_on_its_own_schema);

/// A fleet runs `dataflow migrate` once and starts its processes with `auto_migrate` off:
/// on a ledger that lacks a migration, or has one this binary does not know (a newer
/// version migrated it), a process refuses to start and says what to run; after the
/// migration it starts.
async fn with_auto_migrate_off_a_process_starts_only_on_its_own_schema(backend: Backend) {
    let Some(test_db) = crate::helpers::TestDb::create(backend).await else {
        return;
    };
    let mut config = crate::helpers::test_config(&test_db);
    config.auto_migrate = false;
    let refused = dataflow_platform::Backends::build(&config).await.err();
    let said = refused.map(|e| e.to_string()).unwrap_or_default();
    assert!(said.contains("run `dataflow migrate`"), "{said}");

    let migrate = crate::common::process::dataflow_command(&config, "migrate", "migrate", None)
        .status()
        .unwrap();
    assert!(migrate.success());
    let backends = dataflow_platform::Backends::build(&config).await.unwrap();

    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
         SELECT 99999, 'from the future', success, checksum, execution_time \
         FROM _sqlx_migrations WHERE version = 1",
    )
    .execute(backends.db.pool())
    .await
    .unwrap();
    let refused = dataflow_platform::Backends::build(&config).await.err();
    let said = refused.map(|e| e.to_string()).unwrap_or_default();
    assert!(said.contains("99999") && said.contains("newer"), "{said}");

    // A migration of the same number but another text (another build migrated it).
    sqlx::query("DELETE FROM _sqlx_migrations WHERE version = 99999")
        .execute(backends.db.pool())
        .await
        .unwrap();
    sqlx::query(
        "UPDATE _sqlx_migrations SET checksum = (SELECT checksum FROM _sqlx_migrations \
         WHERE version = 2) WHERE version = 1",
    )
    .execute(backends.db.pool())
    .await
    .unwrap();
    let refused = dataflow_platform::Backends::build(&config).await.err();
    let said = refused.map(|e| e.to_string()).unwrap_or_default();
    assert!(
        said.contains("migration 1 ") && said.contains("differs"),
        "{said}"
    );
    backends.db.close().await;
}

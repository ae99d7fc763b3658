//! `dataflow healthcheck`: the container health check, so images need no curl.
//!
//! A process that serves HTTP is healthy when `GET /healthz` (or `/readyz` with `--ready`)
//! answers 200. A worker-only process serves no HTTP; `--ledger` checks instead what a
//! worker needs to make progress: that its ledger answers and holds the schema (it reads
//! the queue depths, so an empty, unmigrated database fails too). Either way the answer
//! comes within two seconds, and a failure is one line naming the reason.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use clap::Args;
use dataflow_platform::Config;
use dataflow_platform::ledger::Db;

/// Longer than a healthy answer ever takes, well inside Docker's default 30 s timeout.
const TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Args, Debug)]
pub struct HealthcheckArgs {
    /// Base URL of the process (default: the configured `listen` address, on loopback when
    /// it listens on all interfaces).
    #[arg(long, conflicts_with = "ledger")]
    pub url: Option<String>,
    /// Ask `/readyz` (the ledger answers) instead of `/healthz` (the process answers).
    #[arg(long, conflicts_with = "ledger")]
    pub ready: bool,
    /// Check the configured ledger instead of HTTP: for worker-only processes.
    #[arg(long)]
    pub ledger: bool,
}

/// Exits non-zero with the reason on one line (anyhow prints a flattened error as one).
pub async fn run(config: &Config, args: HealthcheckArgs) -> anyhow::Result<()> {
    check(config, &args)
        .await
        .map_err(|e| anyhow!("unhealthy: {e:#}"))
}

async fn check(config: &Config, args: &HealthcheckArgs) -> anyhow::Result<()> {
    if args.ledger {
        let url = config.database_url();
        return within(&format!("ledger {}", super::redact(&url)), ledger(&url)).await;
    }
    let base = args
        .url
        .clone()
        .unwrap_or_else(|| format!("http://{}", local(config.listen)));
    let url = format!(
        "{}/{}",
        base.trim_end_matches('/'),
        if args.ready { "readyz" } else { "healthz" }
    );
    within(&url, http(&url)).await
}

/// `probe`'s answer, named after `target`; a connection the driver keeps retrying (sqlx
/// does for a refused port) ends at the deadline.
async fn within(
    target: &str,
    probe: impl Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<()> {
    match tokio::time::timeout(TIMEOUT, probe).await {
        Ok(answer) => answer.with_context(|| target.to_owned()),
        Err(_) => bail!("{target}: no answer within {TIMEOUT:?}"),
    }
}

async fn ledger(url: &str) -> anyhow::Result<()> {
    let db = Db::connect(url, 1).await?;
    let read = db.queue_depths().await;
    db.close().await;
    read.context("no DataFlow schema")?;
    Ok(())
}

async fn http(url: &str) -> anyhow::Result<()> {
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(TIMEOUT)
        .build()
        .context("building the HTTP client")?;
    let status = client.get(url).send().await?.status();
    if status != reqwest::StatusCode::OK {
        bail!("answered {status}");
    }
    Ok(())
}

/// The address to reach a listener bound to `addr` from the same host.
fn local(addr: SocketAddr) -> SocketAddr {
    let ip = match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, addr.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_interfaces_are_reached_on_loopback() {
        let l = |s: &str| local(s.parse().unwrap()).to_string();
        assert_eq!(l("0.0.0.0:8080"), "127.0.0.1:8080");
        assert_eq!(l("[::]:9000"), "[::1]:9000");
        assert_eq!(l("10.1.2.3:8080"), "10.1.2.3:8080");
    }
}

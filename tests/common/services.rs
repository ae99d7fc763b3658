//! The services the tests talk to (PostgreSQL, Redis, RabbitMQ): where they are, whether they
//! answer, and the rule that a test skips with a message when one is down unless
//! `DATAFLOW_TEST_REQUIRE_SERVICES=1`.

use std::future::Future;
use std::time::Duration;

use dataflow_platform::broker::Names;
use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};

pub fn services_required() -> bool {
    std::env::var("DATAFLOW_TEST_REQUIRE_SERVICES").is_ok_and(|v| v == "1")
}

/// Says that a service is down: `None`, the test skipped with the reason, or a panic when
/// services are required.
pub fn unreachable<T>(service: &str, detail: &str) -> Option<T> {
    if services_required() {
        panic!("{service} is required but unreachable: {detail}");
    }
    super::harness::skip(format!("{service} unreachable ({detail})"));
    None
}

/// The PostgreSQL URL tests create their databases from.
pub fn test_pg_admin_url() -> String {
    std::env::var("DATAFLOW_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// The test Redis URL, or `None` (with a message) when it is unreachable and not required.
pub async fn test_redis_url() -> Option<String> {
    let url = std::env::var("DATAFLOW_TEST_REDIS_URL")
        .unwrap_or_else(|_| "redis://127.0.0.1:6379/".into());
    let reachable = async {
        let client = redis::Client::open(url.as_str()).ok()?;
        let mut conn = client.get_multiplexed_async_connection().await.ok()?;
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .ok()
    };
    match tokio::time::timeout(Duration::from_secs(2), reachable).await {
        Ok(Some(_)) => Some(url),
        _ => unreachable("Redis", &format!("at {url}")),
    }
}

/// The test RabbitMQ URL, or `None` (with a message) when it is unreachable and not required.
pub async fn test_amqp_url() -> Option<String> {
    let url = std::env::var("DATAFLOW_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let props = lapin::ConnectionProperties::default();
    let reachable = lapin::Connection::connect(&url, props);
    match tokio::time::timeout(Duration::from_secs(3), reachable).await {
        Ok(Ok(conn)) => {
            let _ = conn.close(200, "probe".into()).await;
            Some(url)
        }
        _ => unreachable("RabbitMQ", &format!("at {url}")),
    }
}

/// The address of the service a URL such as `redis://host:port/0` or
/// `postgres://user@host:port/db` names (`default_port` when it names none).
pub fn service_addr(url: &str, default_port: u16) -> std::net::SocketAddr {
    host_port(url, default_port)
        .replace("localhost", "127.0.0.1")
        .parse()
        .unwrap()
}

/// `url` with the service's `host[:port]` replaced by `addr` (credentials, path and query
/// kept): the same service reached through a proxy.
pub fn url_via(url: &str, addr: std::net::SocketAddr) -> String {
    let (scheme, rest) = url.split_once("://").unwrap();
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let userinfo = authority.rsplit_once('@').map(|(u, _)| format!("{u}@"));
    format!("{scheme}://{}{addr}{path}", userinfo.unwrap_or_default())
}

fn host_port(url: &str, default_port: u16) -> String {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split('/').next().unwrap();
    let host_port = authority.rsplit('@').next().unwrap();
    if host_port.contains(':') {
        host_port.to_owned()
    } else {
        format!("{host_port}:{default_port}")
    }
}

/// Deletes the exchanges and queues of one test's AMQP prefix (`names`), and `extra_queues`.
pub async fn delete_amqp_topology(ch: &lapin::Channel, names: &Names, extra_queues: &[String]) {
    for q in extra_queues
        .iter()
        .chain([&names.ready_queue, &names.dead_letter_queue])
    {
        let _ = ch
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    for x in [&names.exchange, &names.dead_letter_exchange] {
        let _ = ch
            .exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default())
            .await;
    }
}

/// Runs `work` to its end on a private runtime on a thread of its own: for clean-up in
/// `Drop`, which may run outside any runtime or inside one that must not be blocked.
pub fn on_private_runtime<F>(work: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    let _ = std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(work);
    })
    .join();
}

/// The URL of a RabbitMQ node that is down: a loopback port nobody listens on now.
pub fn down_amqp_url() -> String {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    format!("amqp://guest:guest@127.0.0.1:{port}/%2f")
}

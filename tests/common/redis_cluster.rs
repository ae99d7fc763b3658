//! A Redis Cluster of the test's own: masters (and replicas, if asked) from the machine's
//! `redis-server` on loopback ports, joined with `redis-cli --cluster create`, all of them
//! killed when the cluster is dropped. Nothing is kept on disk but the nodes' files, in a
//! folder of the test's own.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::ports::free_ports;
use super::process::Spawned;
use super::services::unreachable;

pub struct RedisCluster {
    /// `(port, process)` of every node, masters first.
    nodes: Vec<(u16, Spawned)>,
    masters: usize,
    dir: PathBuf,
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        // The nodes first (their `Spawned` kills them), then their files.
        self.nodes.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl RedisCluster {
    /// A cluster of `masters` masters with `replicas` replicas each, `cluster_state:ok` on
    /// every node; `None` (the test skipped, or failed when services are required) when the
    /// machine has no `redis-server` or `redis-cli`.
    pub async fn start(masters: usize, replicas: usize) -> Option<RedisCluster> {
        Self::start_on(free_ports(masters * (1 + replicas)), masters).await
    }

    /// [`RedisCluster::start`] on `ports` (as many as the nodes; `masters` of them masters,
    /// the rest their replicas, spread evenly), for a test that configured a process on
    /// them before the cluster was there.
    pub async fn start_on(ports: Vec<u16>, masters: usize) -> Option<RedisCluster> {
        let replicas = ports.len() / masters - 1;
        for tool in ["redis-server", "redis-cli"] {
            let found = Command::new(tool)
                .arg("--version")
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !found {
                return unreachable("Redis Cluster", &format!("no {tool} on this machine"));
            }
        }
        let tag = ulid::Ulid::new().to_string().to_lowercase();
        let dir = std::env::temp_dir().join(format!("dataflow-redis-cluster-{tag}"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut nodes = Vec::with_capacity(ports.len());
        for &port in &ports {
            let child = Command::new("redis-server")
                .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
                .args(["--cluster-enabled", "yes"])
                .args(["--cluster-config-file", &format!("nodes-{port}.conf")])
                .args(["--cluster-node-timeout", "2000"])
                .args(["--save", "", "--appendonly", "no"])
                .args(["--maxmemory-policy", "noeviction"])
                .args(["--logfile", &format!("node-{port}.log")])
                .arg("--dir")
                .arg(&dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            nodes.push((port, Spawned(child)));
        }
        let cluster = RedisCluster {
            nodes,
            masters,
            dir,
        };
        for &port in &ports {
            cluster.wait_for(port, "PING", "PONG").await;
        }
        let created = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(ports.iter().map(|p| format!("127.0.0.1:{p}")))
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        assert!(
            created.status.success(),
            "redis-cli --cluster create: {}",
            String::from_utf8_lossy(&created.stderr)
        );
        for &port in &ports {
            cluster
                .wait_for(port, "CLUSTER INFO", "cluster_state:ok")
                .await;
        }
        Some(cluster)
    }

    /// The seed URLs for `redis_cluster_urls`: every node.
    pub fn urls(&self) -> Vec<String> {
        urls(&self.nodes.iter().map(|(port, _)| *port).collect::<Vec<_>>())
    }

    /// A direct connection to each master as the cluster was created (not following a
    /// failover), for looking at what one node holds.
    pub async fn master_connections(&self) -> Vec<redis::aio::MultiplexedConnection> {
        let mut out = Vec::with_capacity(self.masters);
        for (port, _) in &self.nodes[..self.masters] {
            let client = redis::Client::open(format!("redis://127.0.0.1:{port}/")).unwrap();
            out.push(client.get_multiplexed_async_connection().await.unwrap());
        }
        out
    }

    /// The ports of the replicas.
    pub fn replica_ports(&self) -> Vec<u16> {
        self.nodes[self.masters..].iter().map(|(p, _)| *p).collect()
    }

    /// Runs `redis-cli -p port <args>` and returns what it printed.
    fn cli(&self, port: u16, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &port.to_string()])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Makes the replica on `port` take over its master (`CLUSTER FAILOVER`) and waits
    /// until it is one. Redis aborts a manual failover that does not finish within its
    /// own few seconds (a replica still catching up, an election slowed by a busy
    /// machine) and says nothing of it, so the replica is first let catch up and the
    /// failover asked again while the replica is not a master.
    pub async fn fail_over(&self, port: u16) {
        self.wait_for(port, "INFO replication", "master_link_status:up")
            .await;
        for _ in 0..5 {
            // A failover that finished late has made it a master already, and a master
            // refuses `CLUSTER FAILOVER`.
            if self.cli(port, &["ROLE"]).contains("master") {
                return;
            }
            let answer = self.cli(port, &["CLUSTER", "FAILOVER"]);
            assert!(
                answer.contains("OK"),
                "replica {port} refused to take over: {answer}"
            );
            if self
                .poll(port, "ROLE", "master", Duration::from_secs(10))
                .await
            {
                return;
            }
        }
        panic!(
            "replica {port} never became a master; its log ends:\n{}",
            self.log_tail(port)
        );
    }

    /// Waits until `command` on `port` prints something containing `expected`.
    pub async fn wait_for(&self, port: u16, command: &str, expected: &str) {
        if !self
            .poll(port, command, expected, Duration::from_secs(30))
            .await
        {
            panic!(
                "node {port} never answered {command} with {expected}; its log ends:\n{}",
                self.log_tail(port)
            );
        }
    }

    /// Whether `command` on `port` printed something containing `expected` within `limit`.
    async fn poll(&self, port: u16, command: &str, expected: &str, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        let args: Vec<&str> = command.split(' ').collect();
        loop {
            if self.cli(port, &args).contains(expected) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The last lines the node on `port` logged.
    fn log_tail(&self, port: u16) -> String {
        let log =
            std::fs::read_to_string(self.dir.join(format!("node-{port}.log"))).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

/// The URLs of nodes on `ports` of loopback.
pub fn urls(ports: &[u16]) -> Vec<String> {
    ports
        .iter()
        .map(|port| format!("redis://127.0.0.1:{port}/"))
        .collect()
}

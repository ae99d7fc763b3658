//! A RabbitMQ cluster of the test's own: nodes from the machine's `rabbitmq-server` on
//! loopback ports, each with its own node name, data folder and configuration, sharing the
//! machine's Erlang cookie, joined with `rabbitmqctl join_cluster`. Every node is killed and
//! its folder removed when the cluster is dropped.
//!
//! The machine's scripts run the broker as the `rabbitmq` user (they switch to it when run
//! as root), so the folder is handed to that user.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::ports::free_ports;
use super::services::unreachable;

/// How long one node may take to boot (three boot at once on two cores).
const BOOT: Duration = Duration::from_secs(120);

pub struct RabbitCluster {
    nodes: Vec<Node>,
    dir: PathBuf,
}

struct Node {
    /// `name@localhost`, as `rabbitmqctl -n` takes it.
    name: String,
    /// The AMQP listener's port.
    port: u16,
    dir: PathBuf,
}

impl Drop for RabbitCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl RabbitCluster {
    /// A cluster of `size` running nodes, every one a member; `None` (the test skipped, or
    /// failed when services are required) when the machine has no `rabbitmq-server`.
    pub async fn start(size: usize) -> Option<RabbitCluster> {
        let found = Command::new("sh")
            .args(["-c", "command -v rabbitmq-server && command -v rabbitmqctl"])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            return unreachable("RabbitMQ cluster", "no rabbitmq-server on this machine");
        }
        let tag = ulid::Ulid::new().to_string().to_lowercase();
        let dir = std::env::temp_dir().join(format!("dataflow-rabbitmq-cluster-{tag}"));
        let ports = free_ports(size * 2);
        let nodes: Vec<Node> = (0..size)
            .map(|i| Node {
                // The random end of the ULID: unique beside other tests' nodes in epmd.
                name: format!("dftest-{}-{i}@localhost", &tag[tag.len() - 8..]),
                port: ports[2 * i],
                dir: dir.join(format!("node{i}")),
            })
            .collect();
        for node in &nodes {
            std::fs::create_dir_all(&node.dir).unwrap();
            std::fs::write(
                node.dir.join("rabbitmq.conf"),
                format!("listeners.tcp.local = 127.0.0.1:{}\n", node.port),
            )
            .unwrap();
            // No plugins: the machine's broker may enable some whose ports would clash.
            std::fs::write(node.dir.join("enabled_plugins"), "[].\n").unwrap();
        }
        let owned = Command::new("chown")
            .args(["-R", "rabbitmq:rabbitmq"])
            .arg(&dir)
            .status()
            .is_ok_and(|s| s.success());
        assert!(owned, "cannot hand {} to the rabbitmq user", dir.display());
        let cluster = RabbitCluster { nodes, dir };
        for (i, node) in cluster.nodes.iter().enumerate() {
            let d = &node.dir;
            let started = Command::new("rabbitmq-server")
                .arg("-detached")
                .env("RABBITMQ_NODENAME", &node.name)
                .env("RABBITMQ_NODE_PORT", node.port.to_string())
                .env("RABBITMQ_DIST_PORT", ports[2 * i + 1].to_string())
                .env("RABBITMQ_CONFIG_FILE", d.join("rabbitmq.conf"))
                .env("RABBITMQ_ENABLED_PLUGINS_FILE", d.join("enabled_plugins"))
                .env("RABBITMQ_MNESIA_BASE", d.join("mnesia"))
                .env("RABBITMQ_LOG_BASE", d.join("log"))
                .env("RABBITMQ_PID_FILE", d.join("pid"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .unwrap();
            assert!(
                started.success(),
                "rabbitmq-server -detached for {}",
                node.name
            );
            // The pid file is how the drop kills the node: wait for it before going on, so
            // a failure past this point leaves no node running.
            let deadline = Instant::now() + BOOT;
            while !d.join("pid").exists() {
                assert!(Instant::now() < deadline, "{} wrote no pid file", node.name);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        for i in 0..cluster.nodes.len() {
            cluster.wait_booted(i).await;
        }
        let first = cluster.nodes[0].name.clone();
        for node in &cluster.nodes[1..] {
            for args in [
                vec!["stop_app"],
                vec!["reset"],
                vec!["join_cluster", &first],
                vec!["start_app"],
            ] {
                cluster.ctl(&node.name, &args);
            }
        }
        Some(cluster)
    }

    /// `amqp_url` listing every node, the first node first.
    pub fn amqp_url(&self) -> String {
        let urls: Vec<String> = (0..self.nodes.len()).map(|i| self.url(i)).collect();
        urls.join(",")
    }

    /// The URL of node `i` alone.
    pub fn url(&self, i: usize) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.nodes[i].port)
    }

    /// `host:port` of node `i`, as `/readyz` names it.
    pub fn endpoint(&self, i: usize) -> String {
        format!("127.0.0.1:{}", self.nodes[i].port)
    }

    /// The index of the node `/readyz` names `endpoint`.
    pub fn index_of(&self, endpoint: &str) -> usize {
        (0..self.nodes.len())
            .find(|&i| self.endpoint(i) == endpoint)
            .unwrap_or_else(|| panic!("{endpoint} is no node of this cluster"))
    }

    /// Kills node `i` at once (`kill -9` of its Erlang VM), as a crash would.
    pub fn kill(&self, i: usize) {
        let pid_file = self.nodes[i].dir.join("pid");
        if let Ok(pid) = std::fs::read_to_string(&pid_file) {
            let _ = Command::new("kill").args(["-9", pid.trim()]).status();
            let _ = std::fs::remove_file(pid_file);
        }
    }

    /// Runs `rabbitmqctl -n <node> <args>` and returns what it printed; panics on failure.
    fn ctl(&self, node: &str, args: &[&str]) -> String {
        let out = Command::new("rabbitmqctl")
            .args(["-q", "-n", node])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "rabbitmqctl -n {node} {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Waits until node `i` has booted: its listener answers and `await_startup` returns.
    async fn wait_booted(&self, i: usize) {
        let node = &self.nodes[i];
        let deadline = Instant::now() + BOOT;
        while tokio::net::TcpStream::connect(("127.0.0.1", node.port))
            .await
            .is_err()
        {
            assert!(
                Instant::now() < deadline,
                "node {} never listened on {} (its log: {})",
                node.name,
                node.port,
                node.dir.join("log").display()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        self.ctl(&node.name, &["await_startup"]);
    }
}

//! A RabbitMQ cluster of the suite's own, on ports other than 5672, never touching the shared
//! broker.
//!
//! Each node is started with `RABBITMQ_NODENAME=<name>@localhost`, its own
//! `RABBITMQ_DIST_PORT`, a config file of its own (`listeners.tcp.default = 127.0.0.1:<port>`:
//! the machine's config pins 5672, so `RABBITMQ_NODE_PORT` alone would not move it), no plugins
//! (no second management listener), and its Mnesia, log and pid file in a folder owned by the
//! `rabbitmq` user. Nodes 2 and 3 then `join_cluster` node 1. Dropping the cluster stops every
//! node (SIGKILL of the node's process from its pid file) and removes the folder.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::procs::free_port;

/// One node of the cluster.
#[derive(Debug)]
pub struct Node {
    pub name: String,
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl Node {
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    fn pid_file(&self) -> PathBuf {
        self.dir.join("node.pid")
    }

    /// The Erlang VM's pid, from the pid file.
    pub fn os_pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.pid_file())
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// SIGKILL of the node's VM: it dies as a machine would.
    pub fn kill(&mut self) {
        if let Some(pid) = self.os_pid() {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Three (or `n`) nodes, clustered.
#[derive(Debug)]
pub struct Cluster {
    pub nodes: Vec<Node>,
    base: PathBuf,
}

fn ctl(node: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("rabbitmqctl")
        .args(["-n", node])
        .args(args)
        .output()
        .context("running rabbitmqctl")?;
    if !out.status.success() {
        bail!(
            "rabbitmqctl -n {node} {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn chown_rabbitmq(path: &Path) -> anyhow::Result<()> {
    let status = Command::new("chown")
        .args(["-R", "rabbitmq:rabbitmq"])
        .arg(path)
        .status()
        .context("running chown")?;
    if !status.success() {
        bail!("chown rabbitmq {path:?} failed (is RabbitMQ's server installed?)");
    }
    Ok(())
}

impl Cluster {
    /// Starts `n` nodes and joins them into one cluster.
    ///
    /// # Errors
    /// When a node does not start within 60 s or cannot join.
    pub async fn start(n: usize) -> anyhow::Result<Self> {
        let tag = &uuid::Uuid::new_v4().simple().to_string()[..8];
        let base = std::env::temp_dir().join(format!("luna-faults-cluster-{tag}"));
        std::fs::create_dir_all(&base)?;
        let mut cluster = Self {
            nodes: Vec::new(),
            base: base.clone(),
        };
        for i in 1..=n {
            let dir = base.join(format!("n{i}"));
            std::fs::create_dir_all(dir.join("mnesia"))?;
            std::fs::create_dir_all(dir.join("log"))?;
            let port = free_port()?;
            let dist = free_port()?;
            std::fs::write(
                dir.join("rabbitmq.conf"),
                format!("listeners.tcp.default = 127.0.0.1:{port}\nloopback_users = none\n"),
            )?;
            std::fs::write(dir.join("enabled_plugins"), "[].\n")?;
            chown_rabbitmq(&base)?;
            let name = format!("lunaf{i}x{tag}@localhost");
            let child = Command::new("rabbitmq-server")
                .env("RABBITMQ_NODENAME", &name)
                .env("RABBITMQ_NODE_PORT", port.to_string())
                .env("RABBITMQ_DIST_PORT", dist.to_string())
                .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq.conf"))
                .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
                .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
                .env("RABBITMQ_LOG_BASE", dir.join("log"))
                .env("RABBITMQ_PID_FILE", dir.join("node.pid"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("starting rabbitmq-server")?;
            cluster.nodes.push(Node {
                name,
                port,
                dir,
                child: Some(child),
            });
        }
        for node in &cluster.nodes {
            wait_node(&node.name, Duration::from_secs(90)).await?;
        }
        let first = cluster.nodes[0].name.clone();
        for node in &cluster.nodes[1..] {
            ctl(&node.name, &["stop_app"])?;
            ctl(&node.name, &["join_cluster", &first])?;
            ctl(&node.name, &["start_app"])?;
        }
        for node in &cluster.nodes {
            wait_node(&node.name, Duration::from_secs(60)).await?;
        }
        Ok(cluster)
    }

    /// `--amqp-url` for a process that may use every node.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(Node::url).collect()
    }
}

async fn wait_node(name: &str, limit: Duration) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        let node = name.to_owned();
        let ok = tokio::task::spawn_blocking(move || {
            ctl(&node, &["-q", "await_startup", "--timeout", "5"]).is_ok()
        })
        .await
        .unwrap_or(false);
        if ok {
            return Ok(());
        }
        if start.elapsed() > limit {
            bail!("RabbitMQ node {name} did not start within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.kill();
        }
        let _ = std::fs::remove_dir_all(&self.base);
    }
}

//! A three-node RabbitMQ cluster that this test starts itself, on ports of its own (never the
//! broker on 5672). A process given the three nodes' URLs publishes and consumes under load;
//! the node it is connected to is killed (SIGKILL) mid-load; publishing and consuming continue
//! on the other nodes, and every task published is consumed (0 lost). Prints the recovery time.
//!
//! Skipped, with the reason printed, only when the RabbitMQ server is not installed. The nodes
//! and their folders are removed however the test ends (the cluster's `Drop`).

mod support;

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use luna_job::JobId;
use luna_queue::{AmqpConfig, Broker};
use support::*;
use tokio::time::Instant;

const SERVER: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";
const LOAD: Duration = Duration::from_secs(12);

struct Node {
    name: String,
    port: u16,
    child: Child,
}

/// The nodes of the test's cluster; killed and their folder removed on drop.
struct Cluster {
    root: PathBuf,
    nodes: Vec<Node>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            kill_group(&mut node.child);
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// SIGKILL to the node's whole process group: the shell, the Erlang VM and its helpers.
fn kill_group(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{}", child.id())])
        .stderr(Stdio::null())
        .status();
    let _ = child.wait();
}

fn free_port_block(n: u16) -> u16 {
    for _ in 0..50 {
        let base = 20000 + (uuid::Uuid::new_v4().as_u128() % 20000) as u16;
        let free = (0..n).all(|i| {
            let port = base + i;
            std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
                && std::net::TcpListener::bind(("127.0.0.1", port + 10000)).is_ok()
        });
        if free {
            return base;
        }
    }
    panic!("no free block of {n} ports");
}

fn ctl(node: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new("rabbitmqctl")
        .args(["-n", node])
        .args(args)
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "rabbitmqctl -n {node} {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn start_node(root: &Path, tag: &str, i: u16, port: u16) -> Node {
    let name = format!("{tag}n{i}@localhost");
    let dir = root.join(format!("n{i}"));
    std::fs::create_dir_all(dir.join("log")).expect("node folder");
    let config = dir.join("node.conf");
    std::fs::write(
        &config,
        format!(
            "listeners.tcp.default = 127.0.0.1:{port}\nvm_memory_high_watermark.relative = 0.1\ndisk_free_limit.absolute = 50MB\n"
        ),
    )
    .expect("node config");
    std::fs::write(dir.join("enabled_plugins"), "[].\n").expect("plugins file");
    let status = Command::new("chown")
        .args(["-R", "rabbitmq:rabbitmq"])
        .arg(root)
        .status()
        .expect("chown");
    assert!(status.success(), "chown the cluster folder to rabbitmq");
    let mut cmd = Command::new("runuser");
    cmd.args(["-u", "rabbitmq", "--", "env"])
        .arg(format!("RABBITMQ_NODENAME={name}"))
        .arg(format!("RABBITMQ_NODE_PORT={port}"))
        .arg(format!("RABBITMQ_DIST_PORT={}", port + 10000))
        .arg(format!("RABBITMQ_CONFIG_FILE={}", config.display()))
        .arg(format!(
            "RABBITMQ_ENABLED_PLUGINS_FILE={}",
            dir.join("enabled_plugins").display()
        ))
        .arg(format!(
            "RABBITMQ_MNESIA_BASE={}",
            dir.join("mnesia").display()
        ))
        .arg(format!("RABBITMQ_LOG_BASE={}", dir.join("log").display()))
        .arg(format!("RABBITMQ_PID_FILE={}", dir.join("pid").display()))
        .arg("HOME=/var/lib/rabbitmq")
        .arg(SERVER)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let child = cmd.spawn().expect("start a RabbitMQ node");
    Node { name, port, child }
}

fn await_node(node: &Node) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        if ctl(&node.name, &["await_startup", "--timeout", "5"]).is_ok() {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "node {} did not start within 60 s",
            node.name
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn start_cluster() -> Cluster {
    let tag = format!("lh{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let root = std::env::temp_dir().join(format!("luna-cluster-{tag}"));
    std::fs::create_dir_all(&root).expect("cluster folder");
    let base = free_port_block(3);
    let mut cluster = Cluster {
        root: root.clone(),
        nodes: Vec::new(),
    };
    for i in 0..3 {
        cluster.nodes.push(start_node(&root, &tag, i + 1, base + i));
    }
    std::thread::scope(|s| {
        for node in &cluster.nodes {
            s.spawn(move || await_node(node));
        }
    });
    let first = cluster.nodes[0].name.clone();
    for node in &cluster.nodes[1..] {
        for step in [
            vec!["stop_app"],
            vec!["reset"],
            vec!["join_cluster", first.as_str()],
            vec!["start_app"],
        ] {
            ctl(&node.name, &step).expect("join the cluster");
        }
    }
    let status = ctl(&first, &["cluster_status", "--formatter", "json"]).expect("cluster status");
    for node in &cluster.nodes {
        assert!(
            status.contains(&node.name),
            "{} is in the cluster: {status}",
            node.name
        );
    }
    cluster
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_cluster_node_is_left_for_another() {
    if !Path::new(SERVER).exists() {
        println!("skipped: the RabbitMQ server is not installed ({SERVER} is missing)");
        return;
    }
    let started = Instant::now();
    let mut cluster = tokio::task::spawn_blocking(start_cluster)
        .await
        .expect("start the cluster");
    println!(
        "cluster of {} nodes up in {:.1?}",
        cluster.nodes.len(),
        started.elapsed()
    );
    let urls: Vec<String> = cluster
        .nodes
        .iter()
        .map(|n| format!("amqp://guest:guest@127.0.0.1:{}/%2f", n.port))
        .collect();
    let mut config = AmqpConfig::new(urls.join(","), unique_prefix("cluster"));
    config.timeout = Duration::from_secs(3);
    config.heartbeat = Duration::from_secs(2);
    let broker = Broker::connect(config).await.expect("the cluster answers");

    let job = JobId::new();
    let (mut tasks, consumer) = task_consumer(broker.clone(), "cluster-c".to_owned());
    let (mut events, subscriber) = event_consumer(broker.clone());

    // The load: one task every 20 ms, each retried until the broker confirms it.
    let publisher = {
        let broker = broker.clone();
        let job = job.clone();
        tokio::spawn(async move {
            let mut confirmed = BTreeMap::new();
            let start = Instant::now();
            let mut n = 0u32;
            while start.elapsed() < LOAD {
                let took = publish_until_ok(Duration::from_secs(5), || {
                    let broker = broker.clone();
                    let job = job.clone();
                    async move { publish_task(&broker, &job, n).await.map(drop) }
                })
                .await;
                match took {
                    Ok(_) => {
                        confirmed.insert(format!("{job}/{n}"), Instant::now());
                    }
                    Err(e) => println!("task {n} not confirmed within 5 s: {e}"),
                }
                n += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            confirmed
        })
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    let killed = Instant::now();
    let victim = &mut cluster.nodes[0];
    println!("killing {} (the node in use)", victim.name);
    kill_group(&mut victim.child);

    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut first_after_kill = None;
    let confirmed = loop {
        tokio::select! {
            Some(id) = tasks.recv() => {
                if first_after_kill.is_none() && killed.elapsed() > Duration::from_millis(100) {
                    first_after_kill = Some(killed.elapsed());
                }
                *seen.entry(id).or_default() += 1;
            }
            done = async { while !publisher.is_finished() { tokio::time::sleep(Duration::from_millis(50)).await } } => {
                let () = done;
                break publisher.await.expect("the publisher");
            }
        }
    };
    let first_publish_after_kill = confirmed
        .values()
        .filter(|t| **t > killed)
        .min()
        .map(|t| t.duration_since(killed));
    // Drain what is still queued.
    let want: HashSet<&String> = confirmed.keys().collect();
    let drain = Instant::now();
    while drain.elapsed() < Duration::from_secs(20) && !want.iter().all(|id| seen.contains_key(*id))
    {
        if let Ok(Some(id)) = tokio::time::timeout(Duration::from_millis(500), tasks.recv()).await {
            *seen.entry(id).or_default() += 1;
        }
    }
    let lost = want.iter().filter(|id| !seen.contains_key(**id)).count();
    let duplicated = seen.values().filter(|n| **n > 1).count();
    let mut event_seen = false;
    for _ in 0..40 {
        if publish_event(&broker, &job).await.is_ok()
            && receive(&mut events, Duration::from_millis(500), |e| e.job_id == job).await
        {
            event_seen = true;
            break;
        }
    }
    let recovery = match (first_publish_after_kill, first_after_kill) {
        (Some(p), Some(c)) => Some(p.max(c)),
        _ => None,
    };
    println!(
        "node killed mid-load: {} confirmed, {} consumed, {lost} lost, {duplicated} delivered twice; \
         first publish confirmed {first_publish_after_kill:.1?} after the kill, first delivery {first_after_kill:.1?}; recovery {recovery:.1?}; total {:.1?}",
        confirmed.len(),
        seen.len(),
        started.elapsed()
    );
    let survivor = cluster.nodes[1].name.clone();
    if let Ok(list) = ctl(&survivor, &["-q", "list_connections", "name", "channels"]) {
        println!("connections on the surviving nodes:\n{list}");
    }
    consumer.abort();
    subscriber.abort();
    let _ = broker.delete_topology().await;
    drop(cluster);

    assert_eq!(lost, 0, "every confirmed task is consumed");
    assert!(
        recovery.is_some(),
        "publishing and consuming resumed after the kill"
    );
    assert!(event_seen, "events flow again after the kill");
}

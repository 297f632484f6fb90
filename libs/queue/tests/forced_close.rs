//! The broker closes this process's connections four times (`rabbitmqctl close_connection`,
//! as an operator or a node restart would). After each close publishing and consuming work
//! again, and the process holds as many connections and channels as before the first: a
//! reconnect replaces a connection, it does not add one.
//!
//! The process reaches the broker through a proxy of the test's own, so its connections are
//! told apart from everyone else's on the shared broker by their ports.

mod support;

use std::time::Duration;

use luna_job::JobId;
use luna_queue::{AmqpConfig, Broker};
use support::*;

/// Forced closes; `LUNA_HEAL_ROUNDS` runs more, to watch memory over a longer stretch.
fn round_count() -> usize {
    std::env::var("LUNA_HEAL_ROUNDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(4)
}

/// Our connections and their channels, as the broker sees them.
fn ours(proxy: &Proxy) -> (usize, u64, Vec<BrokerConnection>) {
    let ports = proxy.ports();
    let conns: Vec<_> = list_connections(None)
        .into_iter()
        .filter(|c| ports.contains(&c.peer_port))
        .collect();
    let channels = conns.iter().map(|c| c.channels).sum();
    (conns.len(), channels, conns)
}

/// Waits until the broker's count of our connections and channels holds still for a moment
/// (recovery in the background settles), then returns it.
async fn settled(proxy: &Proxy) -> (usize, u64) {
    let mut last = None;
    let mut same = 0;
    for _ in 0..40 {
        let (n, ch, _) = ours(proxy);
        if last == Some((n, ch, proxy.live())) {
            same += 1;
            if same >= 3 {
                break;
            }
        } else {
            same = 0;
        }
        last = Some((n, ch, proxy.live()));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (n, ch, _) = last.expect("at least one look");
    (n, ch)
}

/// One task through the task queue and one event through the events exchange.
async fn work_flows(
    broker: &Broker,
    job: &JobId,
    n: u32,
    tasks: &mut tokio::sync::mpsc::UnboundedReceiver<String>,
    events: &mut tokio::sync::mpsc::UnboundedReceiver<luna_job::Event>,
) -> Duration {
    let start = tokio::time::Instant::now();
    publish_until_ok(Duration::from_secs(30), || {
        let broker = broker.clone();
        let job = job.clone();
        async move { publish_task(&broker, &job, n).await.map(drop) }
    })
    .await
    .expect("a task is published after the reconnect");
    let id = format!("{job}/{n}");
    assert!(
        receive(tasks, Duration::from_secs(30), |got| *got == id).await,
        "task {id} is consumed after the reconnect"
    );
    // The event queue is private to the subscription, so an event published before the
    // resubscription reaches nobody: publish until one arrives.
    let mut seen = false;
    for _ in 0..60 {
        if publish_event(broker, job).await.is_ok()
            && receive(events, Duration::from_millis(500), |e| e.job_id == *job).await
        {
            seen = true;
            break;
        }
    }
    assert!(seen, "events are received after the reconnect");
    start.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_forced_closes_neither_leak_nor_stop_consumers() {
    let url = amqp_url();
    let proxy = Proxy::start(authority(&url)).await;
    let prefix = unique_prefix("close");
    let mut config = AmqpConfig::new(via(&url, proxy.addr), &prefix);
    config.timeout = Duration::from_secs(3);
    let broker = Broker::connect(config)
        .await
        .expect("the broker answers through the proxy");

    let body = {
        let broker = broker.clone();
        async move {
            let job = JobId::new();
            let (mut tasks, consumer) = task_consumer(broker.clone(), format!("{prefix}-c"));
            let (mut events, subscriber) = event_consumer(broker.clone());
            work_flows(&broker, &job, 0, &mut tasks, &mut events).await;
            let (conns, channels) = settled(&proxy).await;
            let (rss, thr) = (rss_kib(), threads());
            println!(
                "before: {conns} connections, {channels} channels, {} through the proxy, RSS {rss:?} KiB, {thr:?} threads",
                proxy.live()
            );
            assert!(conns >= 1, "the broker lists our connections");

            let mut seen = Vec::new();
            for round in 1..=round_count() {
                let (_, _, listed) = ours(&proxy);
                for c in &listed {
                    close_connection(None, &c.pid);
                }
                let took = work_flows(&broker, &job, round as u32, &mut tasks, &mut events).await;
                let (n, ch) = settled(&proxy).await;
                println!(
                    "after close {round}: {n} connections, {ch} channels, {} through the proxy ({} opened so far), work resumed in {took:.1?}, RSS {:?} KiB, {:?} threads",
                    proxy.live(),
                    proxy.opened(),
                    rss_kib(),
                    threads()
                );
                seen.push((round, n, ch));
            }
            println!(
                "RSS before {rss:?} KiB, after {} closes {:?} KiB; threads before {thr:?}, after {:?}",
                round_count(),
                rss_kib(),
                threads()
            );
            consumer.abort();
            subscriber.abort();
            for (round, n, ch) in seen {
                assert_eq!(n, conns, "connections after close {round}");
                assert_eq!(ch, channels, "channels after close {round}");
            }
        }
    };
    let outcome = tokio::spawn(body).await;
    let _ = broker.delete_topology().await;
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}

//! Readiness follows the broker through a stall: with the broker black-holed (a proxy that
//! takes every byte and forwards none), `is_ready` turns false within a bound and a publish
//! fails instead of hanging; when traffic flows again readiness comes back and work resumes.

mod support;

use std::time::Duration;

use luna_job::JobId;
use luna_queue::{AmqpConfig, Broker};
use support::*;
use tokio::time::Instant;

/// Generous: readiness is expected to follow within a few seconds.
const BOUND: Duration = Duration::from_secs(30);

async fn wait_ready(broker: &Broker, want: bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < BOUND {
        if broker.is_ready().await == want {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_a_black_holed_broker() {
    let url = amqp_url();
    let proxy = Proxy::start(authority(&url)).await;
    let prefix = unique_prefix("ready");
    let mut config = AmqpConfig::new(via(&url, proxy.addr), &prefix);
    let timeout = Duration::from_secs(3);
    config.timeout = timeout;
    let broker = Broker::connect(config)
        .await
        .expect("the broker answers through the proxy");

    let body = {
        let broker = broker.clone();
        async move {
            let job = JobId::new();
            let (mut tasks, consumer) = task_consumer(broker.clone(), format!("{prefix}-c"));
            let id = publish_task(&broker, &job, 0)
                .await
                .expect("publish before the stall");
            assert!(receive(&mut tasks, BOUND, |got| *got == id).await);
            assert!(broker.is_ready().await, "ready before the stall");

            proxy.set_mode(Mode::BlackHole);
            let down = wait_ready(&broker, false).await;
            println!("black hole: readiness false after {down:.1?}");
            assert!(
                down.is_some(),
                "readiness turns false within {BOUND:?} of a stall"
            );

            let start = Instant::now();
            let published = tokio::time::timeout(BOUND, publish_task(&broker, &job, 1)).await;
            println!(
                "black hole: a publish gave up after {:.1?} (broker timeout {timeout:?})",
                start.elapsed()
            );
            assert!(
                matches!(published, Ok(Err(_))),
                "a publish into a stalled broker fails rather than hangs: {published:?}"
            );

            proxy.set_mode(Mode::Forward);
            let up = wait_ready(&broker, true).await;
            println!("healed: readiness true after {up:.1?}");
            assert!(
                up.is_some(),
                "readiness returns within {BOUND:?} of the broker"
            );
            let took = publish_until_ok(BOUND, || {
                let broker = broker.clone();
                let job = job.clone();
                async move { publish_task(&broker, &job, 2).await.map(drop) }
            })
            .await
            .expect("publishing works again");
            let id = format!("{job}/2");
            assert!(
                receive(&mut tasks, BOUND, |got| *got == id).await,
                "the consumer resumes after the stall"
            );
            println!("healed: publishing resumed after {took:.1?}");
            consumer.abort();
        }
    };
    let outcome = tokio::spawn(body).await;
    let _ = broker.delete_topology().await;
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}

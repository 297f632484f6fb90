//! Bounds against the real broker (`LUNA_AMQP_URL`, default RabbitMQ on localhost): a task
//! queue length limit turns into 503 with `Retry-After`, and the gateway's memory stays bounded
//! under 50 concurrent uploaders. Each test uses its own prefix and deletes its topology, even
//! when it fails.

use std::time::{Duration, Instant};

use axum::body::{Body, to_bytes};
use axum::http::{Request, StatusCode, header};
use luna_gateway::{AppState, Config, router};
use luna_job::codec::to_msgpack;
use luna_job::{ImageFormat, ImageInput, SaveRequest};
use luna_queue::{Broker, BrokerArgs};
use tower::ServiceExt as _;

fn amqp_url() -> String {
    std::env::var("LUNA_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

fn prefix() -> String {
    format!("tbounds{}", uuid::Uuid::now_v7().simple())
}

/// Deletes the topology of `prefix` when dropped, also when the test panicked.
struct Cleanup(BrokerArgs);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let config = self.0.config();
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                if let Ok(broker) = Broker::new(config) {
                    let deleted =
                        tokio::time::timeout(Duration::from_secs(10), broker.delete_topology())
                            .await;
                    if !matches!(deleted, Ok(Ok(()))) {
                        eprintln!("could not delete the test topology: {deleted:?}");
                    }
                }
            });
        })
        .join();
    }
}

fn job(width: u32, height: u32) -> Vec<u8> {
    let image = ImageInput {
        pixels: (0..width * height * 3)
            .map(|i| (i % 251) as u8)
            .collect::<Vec<u8>>()
            .into(),
        width,
        height,
        channels: 3,
        format: ImageFormat::Png,
        ..Default::default()
    };
    to_msgpack(&SaveRequest {
        images: vec![image],
        ..Default::default()
    })
    .expect("encode")
}

async fn post(state: &AppState, body: Vec<u8>) -> (StatusCode, Option<String>, String) {
    let request = Request::post("/v1/jobs")
        .header(header::CONTENT_TYPE, "application/msgpack")
        .body(Body::from(body))
        .expect("request");
    let response = router(state.clone())
        .oneshot(request)
        .await
        .expect("infallible");
    let status = response.status();
    let retry_after = response
        .headers()
        .get(header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = to_bytes(response.into_body(), 1 << 20).await.expect("body");
    (
        status,
        retry_after,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

#[tokio::test]
async fn a_task_queue_length_limit_is_a_503_with_retry_after() {
    let mut args = BrokerArgs::new(amqp_url(), prefix());
    args.max_queued_tasks = Some(2);
    let _cleanup = Cleanup(args.clone());
    let mut config = Config::defaults();
    config.token = None;
    config.broker = args.clone();
    let state = AppState::new(config).expect("state");
    state
        .broker
        .declare_topology()
        .await
        .expect("a new queue takes the limit");

    // No saver runs: the queue fills and the broker refuses what is beyond. A quorum queue
    // decides after appending, so it may hold one task over its limit before it refuses.
    for _ in 0..2 {
        let (status, _, body) = post(&state, job(8, 8)).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    }
    let mut refused = None;
    for _ in 0..3 {
        let (status, retry_after, body) = post(&state, job(8, 8)).await;
        if status != StatusCode::ACCEPTED {
            refused = Some((status, retry_after, body));
            break;
        }
    }
    let (status, retry_after, body) = refused.expect("the broker never refused a task");
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(retry_after.is_some(), "503 without Retry-After: {body}");
    let depth = state.broker.task_queue_depth().await.expect("depth");
    assert!(depth <= 3, "{depth} tasks queued under a limit of 2");

    // Why the limit is opt-in: a queue declared with other arguments refuses a declaration
    // (here, one without the limit), so existing deployments get theirs as a policy.
    let plain = Broker::new(BrokerArgs::new(amqp_url(), args.amqp_prefix.clone()).config())
        .expect("broker");
    assert!(
        plain.declare_topology().await.is_err(),
        "RabbitMQ took inequivalent queue arguments"
    );
}

/// Peak resident memory of a process, from /proc (Linux).
fn peak_rss_mib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

/// 50 clients upload 3 MB jobs to the `luna-gateway` binary at once, honouring Retry-After;
/// nothing consumes the task queue, whose limit (64 MiB) the broker enforces. Without the
/// gateway's body budget, every concurrent upload was held in full several times over.
#[tokio::test]
async fn gateway_memory_stays_bounded_under_50_concurrent_clients() {
    const CLIENTS: usize = 50;
    const POSTS_PER_CLIENT: usize = 2;
    const INFLIGHT: u64 = 32 * 1024 * 1024;
    let prefix = prefix();
    let mut args = BrokerArgs::new(amqp_url(), prefix.clone());
    args.max_queued_bytes = Some(64 * 1024 * 1024);
    let _cleanup = Cleanup(args.clone());

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let mut gateway = std::process::Command::new(env!("CARGO_BIN_EXE_luna-gateway"))
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--amqp-url", &amqp_url(), "--amqp-prefix", &prefix])
        .args(["--max-queued-bytes", &(64u64 * 1024 * 1024).to_string()])
        .args(["--max-inflight-bytes", &INFLIGHT.to_string()])
        .env("RUST_LOG", "error")
        .env_remove("LUNA_TOKEN")
        .spawn()
        .expect("luna-gateway starts");
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let pid = gateway.id();
    let url = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while client
        .get(format!("{url}/readyz"))
        .send()
        .await
        .map(|r| r.status().as_u16())
        .ok()
        != Some(200)
    {
        assert!(Instant::now() < deadline, "the gateway never became ready");
        assert!(
            gateway.try_wait().ok().flatten().is_none(),
            "the gateway exited"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let gateway = Kill(gateway);
    let idle = peak_rss_mib(pid).unwrap_or(0);

    let body = axum::body::Bytes::from(job(1024, 1024)); // 3 MiB of pixels
    let started = Instant::now();
    // Spawned all at once (collected), so the uploads really are concurrent.
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (client, url, body) = (client.clone(), url.clone(), body.clone());
            tokio::spawn(async move {
                let mut statuses = Vec::new();
                for _ in 0..POSTS_PER_CLIENT {
                    let response = client
                        .post(format!("{url}/v1/jobs"))
                        .header("content-type", "application/msgpack")
                        .body(body.clone())
                        .send()
                        .await
                        .expect("the gateway answers");
                    let status = response.status().as_u16();
                    let retry_after = response
                        .headers()
                        .get("retry-after")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<u64>().ok());
                    if matches!(status, 429 | 503) {
                        let seconds = retry_after.expect("every 429 and 503 says when to retry");
                        tokio::time::sleep(Duration::from_secs(seconds)).await;
                    }
                    statuses.push(status);
                }
                statuses
            })
        })
        .collect();
    let mut statuses = Vec::new();
    for client in clients {
        statuses.extend(client.await.expect("client"));
    }
    let peak = peak_rss_mib(pid).expect("peak RSS from /proc");
    drop(gateway);
    let count = |s: u16| statuses.iter().filter(|&&x| x == s).count();
    println!(
        "luna-gateway under {CLIENTS} clients x {POSTS_PER_CLIENT} POSTs of {} MiB \
         (--max-inflight-bytes {} MiB, task queue limit 64 MiB): peak RSS {peak} MiB \
         (idle {idle} MiB); 202: {}, 503: {}, other: {}; {:.1} s",
        body.len() >> 20,
        INFLIGHT >> 20,
        count(202),
        count(503),
        statuses.len() - count(202) - count(503),
        started.elapsed().as_secs_f64(),
    );
    assert!(count(503) > 0, "the bounds never said slow down");
    assert_eq!(
        count(202) + count(503),
        statuses.len(),
        "only 202 and 503 expected: {statuses:?}"
    );
    // Bodies held at once are bounded by the budget; each costs a few copies while it is
    // decoded and encoded. Unbounded, 50 uploads at once held 50 x 3 MiB several times over.
    let bound = idle + 4 * (INFLIGHT >> 20) + 64;
    assert!(
        peak <= bound,
        "peak RSS {peak} MiB above {bound} MiB for a {} MiB budget",
        INFLIGHT >> 20
    );
}

//! `luna up` says "slow down" instead of growing: its in-process queue is bounded, a full
//! queue is a 429 with `Retry-After`, and memory stays bounded under 50 concurrent clients.
//!
//! The save slot is kept from finishing anything: every job saves below a regular file
//! (`blocked/...`), which fails as a transient error, and `--retry-backoff 1h` keeps the one
//! slot waiting. Accepted tasks therefore stay in the queue, as behind a saver that is slower
//! than its clients.

use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use luna_job::codec::to_msgpack;
use luna_job::{ImageFormat, ImageInput, SaveRequest};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

struct Daemon {
    child: Child,
    gateway: String,
}

impl Daemon {
    fn start(output: &Path, bounds: &[&str]) -> Self {
        std::fs::write(output.join("blocked"), b"a file where a folder is needed")
            .expect("blocker");
        let (g, s) = (free_port(), free_port());
        let child = Command::new(env!("CARGO_BIN_EXE_luna"))
            .arg("up")
            .args(["--gateway-listen", &format!("127.0.0.1:{g}")])
            .args(["--status-listen", &format!("127.0.0.1:{s}")])
            .args(["--min-workers", "1", "--max-workers", "1"])
            .args(["--retry-backoff", "1h", "--shutdown-grace", "1s"])
            .args(bounds)
            .arg("--output-root")
            .arg(output)
            .env("RUST_LOG", "error")
            .env_remove("LUNA_TOKEN")
            .spawn()
            .expect("luna up starts");
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", g)).is_err() {
            assert!(Instant::now() < deadline, "luna up never listened");
            std::thread::sleep(Duration::from_millis(50));
        }
        Self {
            child,
            gateway: format!("http://127.0.0.1:{g}"),
        }
    }

    /// Peak resident memory so far, from /proc (Linux).
    fn peak_rss_mib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("/proc status");
        let line = status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .expect("VmHWM");
        let kib: u64 = line
            .split_whitespace()
            .nth(1)
            .and_then(|n| n.parse().ok())
            .expect("VmHWM in kB");
        kib / 1024
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A one-image job that saves below `blocked/`, `side` x `side` RGB.
fn job(side: u32) -> Vec<u8> {
    let image = ImageInput {
        pixels: (0..side * side * 3)
            .map(|i| (i % 251) as u8)
            .collect::<Vec<u8>>()
            .into(),
        width: side,
        height: side,
        channels: 3,
        format: ImageFormat::Png,
        ..Default::default()
    };
    to_msgpack(&SaveRequest {
        save_path: "blocked/out".into(),
        images: vec![image],
        ..Default::default()
    })
    .expect("encode")
}

async fn post(client: &reqwest::Client, gateway: &str, body: Vec<u8>) -> (u16, Option<u64>) {
    let response = client
        .post(format!("{gateway}/v1/jobs"))
        .header("content-type", "application/msgpack")
        .body(body)
        .send()
        .await
        .expect("luna up answers");
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    (response.status().as_u16(), retry_after)
}

#[tokio::test]
async fn a_full_in_process_queue_is_a_429_with_retry_after() {
    let output = tempfile::tempdir().expect("tempdir");
    let daemon = Daemon::start(output.path(), &["--max-queued-tasks", "2"]);
    let client = reqwest::Client::new();
    for _ in 0..2 {
        assert_eq!(post(&client, &daemon.gateway, job(8)).await.0, 202);
    }
    // Both tasks are held (one waiting, one with the stuck slot): the third does not fit.
    assert_eq!(
        post(&client, &daemon.gateway, job(8)).await,
        (429, Some(1)),
        "a full queue answers 429 with Retry-After"
    );
}

#[tokio::test]
async fn memory_stays_bounded_under_50_concurrent_clients() {
    const CLIENTS: usize = 50;
    const POSTS_PER_CLIENT: usize = 4;
    const QUEUED_MIB: u64 = 64;
    const INFLIGHT_MIB: u64 = 32;
    let output = tempfile::tempdir().expect("tempdir");
    let queued = (QUEUED_MIB << 20).to_string();
    let inflight = (INFLIGHT_MIB << 20).to_string();
    let daemon = Daemon::start(
        output.path(),
        &[
            "--max-queued-bytes",
            &queued,
            "--max-inflight-bytes",
            &inflight,
        ],
    );
    let idle = daemon.peak_rss_mib();
    let client = reqwest::Client::new();
    let body = std::sync::Arc::new(job(1024)); // 3 MiB of pixels per job
    let started = Instant::now();
    // Spawned all at once (collected), so the uploads really are concurrent.
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (client, gateway, body) = (client.clone(), daemon.gateway.clone(), body.clone());
            tokio::spawn(async move {
                let mut statuses = Vec::new();
                for _ in 0..POSTS_PER_CLIENT {
                    let (status, retry_after) = post(&client, &gateway, body.to_vec()).await;
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
    let peak = daemon.peak_rss_mib();
    let count = |s: u16| statuses.iter().filter(|&&x| x == s).count();
    println!(
        "luna up under {CLIENTS} clients x {POSTS_PER_CLIENT} POSTs of {} MiB, saver stalled \
         (--max-queued-bytes {QUEUED_MIB} MiB, --max-inflight-bytes {INFLIGHT_MIB} MiB): \
         peak RSS {peak} MiB (idle {idle} MiB); 202: {}, 429: {}, 503: {}; {:.1} s",
        body.len() >> 20,
        count(202),
        count(429),
        count(503),
        started.elapsed().as_secs_f64(),
    );
    assert!(count(429) > 0, "the full queue never said slow down");
    assert_eq!(
        count(202) + count(429) + count(503),
        statuses.len(),
        "{statuses:?}"
    );
    // The queue holds at most its bytes; the bodies being read, decoded and encoded at most
    // the budget, a few copies each. Unbounded, the backlog alone was all 600 MiB sent.
    let bound = idle + QUEUED_MIB + 4 * INFLIGHT_MIB + 64;
    assert!(peak <= bound, "peak RSS {peak} MiB above {bound} MiB");
}

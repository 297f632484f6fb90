//! What tracing costs: `luna up` with traces and metrics exported over OTLP/gRPC against the
//! same `luna up` exporting nothing, in one run, alternating so drift hits both alike.
//!
//! `cargo bench -p luna --bench overhead`. Each mode runs the release `luna` binary as a user
//! would, against a local OTLP receiver (`tests/support/otlp_receiver.rs`) that keeps what it
//! is sent. Figures per round:
//! - saver throughput: 48 images of 1024x1024 (PNG, level 4) in jobs of 4, first POST to the
//!   last job completed, in images/s;
//! - gateway latency: 100 sequential `POST /v1/jobs` of one such image, the saver busy
//!   alongside, median and p99.
//!
//! Uses `../shared/corpus/bythewater_1024x1024.png` when present, else a synthetic pattern.

#[path = "../tests/support/otlp_receiver.rs"]
mod otlp_receiver;

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use luna_job::codec::to_msgpack;
use luna_job::{ImageFormat, ImageInput, SaveRequest};

const ROUNDS: usize = 3;
const THROUGHPUT_JOBS: usize = 12;
const IMAGES_PER_JOB: usize = 4;
const LATENCY_POSTS: usize = 100;

fn photo() -> ImageInput {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../../shared/corpus/bythewater_1024x1024.png"
    );
    let (pixels, width, height) = match image::open(path) {
        Ok(img) => {
            let rgb = img.to_rgb8();
            let (w, h) = rgb.dimensions();
            (rgb.into_raw(), w, h)
        }
        Err(_) => {
            eprintln!("corpus photo not found; using a synthetic pattern");
            let (w, h) = (1024u32, 1024u32);
            let mut px = Vec::with_capacity((w * h * 3) as usize);
            for y in 0..h {
                for x in 0..w {
                    let t = ((x * 7 + y * 13) % 31) as u8;
                    px.extend_from_slice(&[
                        (x / 4) as u8 ^ t,
                        (y / 4) as u8,
                        ((x + y) % 256) as u8,
                    ]);
                }
            }
            (px, w, h)
        }
    };
    ImageInput {
        pixels: pixels.into(),
        width,
        height,
        format: ImageFormat::Png,
        ..Default::default()
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

struct Daemon {
    child: Child,
    gateway: String,
    status: String,
    _output: tempfile::TempDir,
}

impl Daemon {
    fn start(otlp_port: Option<u16>) -> Self {
        let output = tempfile::tempdir().expect("tempdir");
        let (g, s) = (free_port(), free_port());
        let mut command = Command::new(env!("CARGO_BIN_EXE_luna"));
        command
            .args(["up", "--gateway-listen", &format!("127.0.0.1:{g}")])
            .args(["--status-listen", &format!("127.0.0.1:{s}")])
            .arg("--output-root")
            .arg(output.path())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null());
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("OTEL_") {
                command.env_remove(key);
            }
        }
        if let Some(port) = otlp_port {
            command
                .env(
                    "OTEL_EXPORTER_OTLP_ENDPOINT",
                    format!("http://127.0.0.1:{port}"),
                )
                .env("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc");
        }
        let child = command.spawn().expect("luna up starts");
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", g)).is_err()
            || std::net::TcpStream::connect(("127.0.0.1", s)).is_err()
        {
            assert!(Instant::now() < deadline, "luna up never listened");
            std::thread::sleep(Duration::from_millis(50));
        }
        Self {
            child,
            gateway: format!("http://127.0.0.1:{g}"),
            status: format!("http://127.0.0.1:{s}"),
            _output: output,
        }
    }

    /// Ctrl-C (which flushes the exporters) and the exit.
    async fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.child.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = self.child.wait();
    }
}

async fn post(client: &reqwest::Client, gateway: &str, body: &[u8]) -> String {
    let response = client
        .post(format!("{gateway}/v1/jobs"))
        .header("content-type", "application/msgpack")
        .body(body.to_vec())
        .send()
        .await
        .expect("gateway answers");
    assert_eq!(response.status().as_u16(), 202);
    let json: serde_json::Value = response.json().await.expect("JSON");
    json["job_id"].as_str().expect("job_id").to_owned()
}

async fn wait_completed(client: &reqwest::Client, status: &str, jobs: &[String]) {
    for job in jobs {
        loop {
            let response = client
                .get(format!("{status}/v1/jobs/{job}"))
                .send()
                .await
                .expect("status answers");
            if response.status().is_success() {
                let view: serde_json::Value = response.json().await.expect("JSON");
                if view["state"] == "completed" {
                    assert_eq!(view["failed"], 0, "{view}");
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

struct Figures {
    images_per_s: f64,
    median_ms: f64,
    p99_ms: f64,
}

async fn measure(daemon: &Daemon, image: &ImageInput) -> Figures {
    let client = reqwest::Client::new();
    let request = |n: usize| {
        to_msgpack(&SaveRequest {
            save_path: "bench".into(),
            images: vec![image.clone(); n],
            ..Default::default()
        })
        .expect("encode")
    };

    // Warm-up: connections, allocator, the first PNG.
    let warm = post(&client, &daemon.gateway, &request(1)).await;
    wait_completed(&client, &daemon.status, &[warm]).await;

    let batch = request(IMAGES_PER_JOB);
    let started = Instant::now();
    let mut jobs = Vec::new();
    for _ in 0..THROUGHPUT_JOBS {
        jobs.push(post(&client, &daemon.gateway, &batch).await);
    }
    wait_completed(&client, &daemon.status, &jobs).await;
    let images = (THROUGHPUT_JOBS * IMAGES_PER_JOB) as f64;
    let images_per_s = images / started.elapsed().as_secs_f64();

    let single = request(1);
    let mut latencies = Vec::with_capacity(LATENCY_POSTS);
    let mut jobs = Vec::new();
    for _ in 0..LATENCY_POSTS {
        let t = Instant::now();
        jobs.push(post(&client, &daemon.gateway, &single).await);
        latencies.push(t.elapsed());
    }
    wait_completed(&client, &daemon.status, &jobs).await;
    latencies.sort();
    let at = |p: f64| {
        let i = ((latencies.len() as f64 - 1.0) * p).round() as usize;
        latencies[i].as_secs_f64() * 1e3
    };
    Figures {
        images_per_s,
        median_ms: at(0.5),
        p99_ms: at(0.99),
    }
}

#[tokio::main]
async fn main() {
    let image = photo();
    let (sink, port, stop_receiver) = otlp_receiver::start_receiver().await;
    println!(
        "luna up, {}x{} RGB, PNG level 4; throughput: {} images in jobs of {}; latency: {} POSTs of 1 image",
        image.width,
        image.height,
        THROUGHPUT_JOBS * IMAGES_PER_JOB,
        IMAGES_PER_JOB,
        LATENCY_POSTS
    );
    println!("| round | tracing | images/s | POST median ms | POST p99 ms |");
    println!("|---|---|---|---|---|");
    let modes = [("off", false), ("OTLP/gRPC export", true)];
    let mut totals = [[0.0f64; 3]; 2];
    for round in 1..=ROUNDS {
        for (mode, (label, exporting)) in modes.iter().enumerate() {
            let daemon = Daemon::start(exporting.then_some(port));
            let f = measure(&daemon, &image).await;
            daemon.stop().await;
            println!(
                "| {round} | {label} | {:.2} | {:.2} | {:.2} |",
                f.images_per_s, f.median_ms, f.p99_ms
            );
            for (total, value) in
                totals[mode]
                    .iter_mut()
                    .zip([f.images_per_s, f.median_ms, f.p99_ms])
            {
                *total += value;
            }
        }
    }
    let n = ROUNDS as f64;
    for (mode, (label, _)) in modes.iter().enumerate() {
        let [ips, median, p99] = totals[mode].map(|t| t / n);
        println!("| mean | {label} | {ips:.2} | {median:.2} | {p99:.2} |");
    }
    let spans: usize = sink
        .traces
        .lock()
        .map(|t| {
            t.iter()
                .flat_map(|r| &r.resource_spans)
                .flat_map(|r| &r.scope_spans)
                .map(|s| s.spans.len())
                .sum()
        })
        .unwrap_or(0);
    println!("spans received by the OTLP receiver: {spans}");
    let _ = stop_receiver.send(());
}

//! Pipeline figures on a real broker: gateway `POST` latency for one 1024x1024 RGB image beside
//! RabbitMQ's own floor for it (a bare lapin client publishing a message of the same size,
//! persistent, to a quorum queue, waiting for each confirm), and end-to-end images per second
//! (submit to `image_saved`) with one and with two savers.
//!
//! `cargo bench -p luna-e2e --bench pipeline`. Uses `../shared/corpus/bythewater_1024x1024.png`
//! when present (a photograph), else a synthetic pattern. All services run in this process
//! with the real broker, so on a small machine they share its cores.

use std::time::{Duration, Instant};

use luna_e2e::{Env, Service, Stack, count, submit, test_image};
use luna_job::{ImageFormat, ImageInput, JobId, SaveRequest};

fn photo() -> (ImageInput, &'static str) {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../../shared/corpus/bythewater_1024x1024.png"
    );
    match image::open(path) {
        Ok(img) => {
            let rgb = img.to_rgb8();
            let (width, height) = rgb.dimensions();
            (
                ImageInput {
                    pixels: rgb.into_raw().into(),
                    width,
                    height,
                    ..Default::default()
                },
                "bythewater photo",
            )
        }
        Err(_) => (
            test_image(1024, 1024, 3, ImageFormat::Png, ""),
            "synthetic pattern (corpus not found)",
        ),
    }
}

/// RabbitMQ's floor for the gateway's hand-over: `n` sequential persistent publishes of
/// `body_len` bytes to a fresh quorum queue through the default exchange, each waiting for its
/// confirm, on a connection of its own; the queue is deleted after.
async fn bare_lapin_floor(url: &str, body_len: usize, n: usize) -> Vec<Duration> {
    use lapin::options::{
        BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
    };
    use lapin::types::{AMQPValue, FieldTable};
    use lapin::{BasicProperties, Connection, ConnectionProperties};

    let conn = Connection::connect(url, ConnectionProperties::default())
        .await
        .expect("connect");
    let channel = conn.create_channel().await.expect("channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let queue = format!("luna-bench-floor-{}", uuid::Uuid::new_v4().simple());
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    let declare = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .queue_declare(queue.as_str().into(), declare, args)
        .await
        .expect("declare");
    let body = vec![0x5a_u8; body_len];
    let mut took = Vec::with_capacity(n);
    for i in 0..n + 5 {
        let started = Instant::now();
        let confirm = channel
            .basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                &body,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
        assert!(confirm.is_ack(), "the broker refused a publish");
        if i >= 5 {
            took.push(started.elapsed());
        }
    }
    channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await
        .expect("delete");
    let _ = conn.close(200, "done".into()).await;
    took
}

/// `luna up`: POST latency with the in-process queue, the saver working alongside.
async fn in_process_latency(image: &ImageInput) {
    let output = tempfile::tempdir().expect("tempdir");
    let stack = Stack::start(luna_queue::Broker::in_process(), output.path()).await;
    let req = SaveRequest {
        images: vec![image.clone()],
        ..Default::default()
    };
    for _ in 0..5 {
        submit(&stack.gateway.url(), &req).await;
    }
    let mut lat = Vec::new();
    for _ in 0..100 {
        let t = Instant::now();
        let (status, _) = submit(&stack.gateway.url(), &req).await;
        lat.push(t.elapsed());
        assert_eq!(status, 202);
    }
    lat.sort();
    println!(
        "luna up (in process) POST /v1/jobs, 1 image, n=100, saver busy alongside: median {:.2} ms, p99 {:.2} ms",
        percentile(&lat, 0.5).as_secs_f64() * 1e3,
        percentile(&lat, 0.99).as_secs_f64() * 1e3
    );
    stack.stop().await;
}

/// `<what>, n=<count>: median .. ms, p99 .. ms, max .. ms`.
fn print_latencies(what: &str, mut took: Vec<Duration>) {
    took.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "{what}, n={}: median {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        took.len(),
        ms(percentile(&took, 0.5)),
        ms(percentile(&took, 0.99)),
        ms(took[took.len() - 1])
    );
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

async fn throughput(
    env: &Env,
    gateway: &Service,
    savers: usize,
    image: &ImageInput,
    n: usize,
) -> f64 {
    let log = env.record_events().await;
    let mut running = Vec::new();
    for _ in 0..savers {
        running.push(env.start_saver(env.saver_config()).await);
    }
    let started = Instant::now();
    for j in 0..n / 4 {
        let req = SaveRequest {
            index: j as i64,
            filename: format!("s{savers}_%index%"),
            images: vec![image.clone(); 4],
            ..Default::default()
        };
        let (status, body) = submit(&gateway.url(), &req).await;
        assert_eq!(status, 202, "{body}");
    }
    log.wait_until(Duration::from_secs(600), |e| {
        count(e, "image_saved", None) >= n
    })
    .await;
    let elapsed = started.elapsed();
    for s in running {
        s.stop().await;
    }
    n as f64 / elapsed.as_secs_f64()
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let (image, source) = photo();
    in_process_latency(&image).await;
    let env = Env::new().await;
    println!("image: 1024x1024 RGB, {source}; broker: {}", env.url);
    let gateway = env.start_gateway(env.gateway_config()).await;

    // Latency: one image per request, sequential, no saver running (the queue absorbs them).
    let req = SaveRequest {
        images: vec![image.clone()],
        ..Default::default()
    };
    for _ in 0..5 {
        submit(&gateway.url(), &req).await;
    }
    let mut lat = Vec::new();
    for _ in 0..200 {
        let t = Instant::now();
        let (status, _) = submit(&gateway.url(), &req).await;
        lat.push(t.elapsed());
        assert_eq!(status, 202);
    }
    print_latencies("gateway POST /v1/jobs, 1 image (3 MiB msgpack)", lat);
    let task = req
        .clone()
        .into_tasks(&JobId::new(), chrono::Local::now().fixed_offset())
        .remove(0);
    let task_len = luna_job::codec::to_msgpack(&task).expect("encode").len();
    print_latencies(
        &format!(
            "RabbitMQ floor: bare lapin persistent publish + confirm, {task_len} bytes to a quorum queue"
        ),
        bare_lapin_floor(&env.url, task_len, 200).await,
    );
    // Drain what the latency run queued before measuring throughput.
    env.broker.delete_topology().await.expect("reset");
    env.broker.declare_topology().await.expect("reset");

    for savers in [1, 2] {
        let rate = throughput(&env, &gateway, savers, &image, 48).await;
        println!(
            "end to end, PNG level 4, 48 images, {savers} saver(s) x 2..4 slots: {rate:.1} images/s"
        );
    }
    gateway.stop().await;
    env.cleanup().await;
}

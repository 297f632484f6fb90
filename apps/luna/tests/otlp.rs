//! OTLP export leaves the process: `luna up` pointed at a real OTLP/gRPC receiver (built here on
//! the generated `opentelemetry-proto` services) exports one job's whole trace, continuing the
//! client's `traceparent`, and its metrics, flushed when Ctrl-C stops it.

use std::collections::{BTreeSet, HashMap};
use std::fmt::Write as _;
use std::fs::File;
use std::net::TcpListener as StdTcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValueKind;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::metric::Data;
use opentelemetry_proto::tonic::metrics::v1::number_data_point::Value as NumberValue;
use opentelemetry_proto::tonic::metrics::v1::{AggregationTemporality, Metric};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::Span;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use serde_json::{Value, json};

#[path = "support/otlp_receiver.rs"]
mod otlp_receiver;
use otlp_receiver::start_receiver;

/// The client's trace: `luna up` must continue it, not start its own.
const TRACE_ID: &str = "4c756e612d6f746c702d746573742d31";
const CLIENT_SPAN_ID: &str = "00f067aa0ba902b7";

fn free_port() -> u16 {
    StdTcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// `luna up`, killed if the test ends before it exited on its own.
struct Daemon {
    child: Option<Child>,
    log: PathBuf,
}

impl Daemon {
    fn pid(&self) -> u32 {
        self.child.as_ref().expect("daemon still owned").id()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Ctrl-C, then waits (bounded) for the exit.
    async fn interrupt(&mut self, within: Duration) -> ExitStatus {
        let sent = Command::new("kill")
            .args(["-INT", &self.pid().to_string()])
            .status()
            .expect("run kill -INT");
        assert!(sent.success(), "kill -INT {} failed", self.pid());
        let deadline = Instant::now() + within;
        loop {
            let child = self.child.as_mut().expect("daemon still owned");
            if let Some(status) = child.try_wait().expect("poll the daemon") {
                self.child = None;
                return status;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                self.child = None;
                panic!(
                    "luna up did not exit within {within:?} of SIGINT (killed it); log:\n{}",
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A 32x32 RGB frame with plenty of variation, so encoders and gates see a real picture.
fn pixels(seed: u32) -> String {
    let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    let mut bytes = Vec::with_capacity(32 * 32 * 3);
    for y in 0..32u32 {
        for x in 0..32u32 {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            let noise = (state & 0x3f) as u8;
            bytes.push((x * 8) as u8 ^ noise);
            bytes.push((y * 8) as u8 ^ noise);
            bytes.push(((x + y) * 4) as u8 ^ (seed as u8));
        }
    }
    BASE64.encode(bytes)
}

fn request_body() -> Value {
    json!({
        "save_path": "otlp/%model_name%",
        "filename": "trace_%index%",
        "model_name": "checkpoints/sdxl_base.safetensors",
        "index": 7,
        "metadata": {
            "positive": "an astronaut",
            "negative": "blurry",
            "steps": 25,
            "seed": 42,
            "cfg": 6.5,
            "sampler_name": "euler"
        },
        "images": [
            {
                "pixels": pixels(1),
                "width": 32,
                "height": 32,
                "channels": 3,
                "format": "png",
                "affix": "A"
            },
            {
                "pixels": pixels(2),
                "width": 32,
                "height": 32,
                "channels": 3,
                "format": "webp",
                "affix": "B"
            }
        ]
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn any_value(v: Option<&AnyValue>) -> String {
    match v.and_then(|v| v.value.as_ref()) {
        Some(AnyValueKind::StringValue(s)) => s.clone(),
        Some(AnyValueKind::IntValue(i)) => i.to_string(),
        Some(AnyValueKind::BoolValue(b)) => b.to_string(),
        Some(AnyValueKind::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn find_attr(attrs: &[KeyValue], key: &str) -> Option<String> {
    attrs
        .iter()
        .find(|kv| kv.key == key)
        .map(|kv| any_value(kv.value.as_ref()))
}

fn attr(span: &Span, key: &str) -> Option<String> {
    find_attr(&span.attributes, key)
}

fn kind(span: &Span) -> SpanKind {
    SpanKind::try_from(span.kind).unwrap_or(SpanKind::Unspecified)
}

/// Every span, one line each, for assertion messages.
fn dump(spans: &[&Span]) -> String {
    let mut out = String::new();
    for s in spans {
        let attrs: Vec<String> = s
            .attributes
            .iter()
            .map(|kv| format!("{}={}", kv.key, any_value(kv.value.as_ref())))
            .collect();
        let _ = writeln!(
            out,
            "  {:<14} {:<9} trace={} span={} parent={} [{}]",
            s.name,
            kind(s).as_str_name(),
            hex(&s.trace_id),
            hex(&s.span_id),
            if s.parent_span_id.is_empty() {
                "-".to_owned()
            } else {
                hex(&s.parent_span_id)
            },
            attrs.join(", ")
        );
    }
    out
}

/// Polls `GET /v1/jobs/{id}` until the job is completed; returns the last view.
async fn wait_completed(
    http: &reqwest::Client,
    status: &str,
    job_id: &str,
    within: Duration,
) -> Value {
    let deadline = Instant::now() + within;
    let mut last = Value::Null;
    loop {
        if let Ok(resp) = http.get(format!("{status}/v1/jobs/{job_id}")).send().await
            && resp.status().is_success()
            && let Ok(view) = resp.json::<Value>().await
        {
            if view["state"] == "completed" {
                return view;
            }
            last = view;
        }
        assert!(
            Instant::now() < deadline,
            "job {job_id} not completed within {within:?}; last view: {last:#}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn luna_up_exports_the_jobs_trace_and_metrics_over_otlp_grpc() {
    let started = Instant::now();
    let (sink, otlp_port, stop_receiver) = start_receiver().await;

    let tmp = tempfile::tempdir().expect("tempdir");
    let output = tmp.path().join("output");
    let log = tmp.path().join("luna.log");
    let (g, s) = (free_port(), free_port());
    let mut command = Command::new(env!("CARGO_BIN_EXE_luna"));
    command
        .args([
            "up",
            "--gateway-listen",
            &format!("127.0.0.1:{g}"),
            "--status-listen",
            &format!("127.0.0.1:{s}"),
        ])
        .args(["--max-attempts", "1", "--output-root"])
        .arg(&output);
    // Only our OTEL_* settings: nothing from the environment the tests run in.
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("OTEL_") {
            command.env_remove(key);
        }
    }
    command
        .env(
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            format!("http://127.0.0.1:{otlp_port}"),
        )
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
        .env("OTEL_METRIC_EXPORT_INTERVAL", "500")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(File::create(&log).expect("create the daemon log"));
    let mut daemon = Daemon {
        child: Some(command.spawn().expect("luna up starts")),
        log,
    };

    let gateway = format!("http://127.0.0.1:{g}");
    let status = format!("http://127.0.0.1:{s}");
    let deadline = Instant::now() + Duration::from_secs(10);
    for port in [g, s] {
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            if let Some(exit) = daemon
                .child
                .as_mut()
                .and_then(|c| c.try_wait().expect("poll the daemon"))
            {
                panic!("luna up exited early ({exit}); log:\n{}", daemon.log());
            }
            assert!(
                Instant::now() < deadline,
                "luna up never listened on {port}; log:\n{}",
                daemon.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    // Submit as a traced client would: our span is the parent of the gateway's server span.
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("http client");
    let resp = http
        .post(format!("{gateway}/v1/jobs"))
        .header("traceparent", format!("00-{TRACE_ID}-{CLIENT_SPAN_ID}-01"))
        .json(&request_body())
        .send()
        .await
        .expect("POST /v1/jobs");
    let code = resp.status();
    let accepted: Value = resp.json().await.expect("JSON answer to POST /v1/jobs");
    assert_eq!(code.as_u16(), 202, "POST /v1/jobs answered {accepted:#}");
    let job_id = accepted["job_id"]
        .as_str()
        .expect("job_id in the 202 answer")
        .to_owned();

    let view = wait_completed(&http, &status, &job_id, Duration::from_secs(15)).await;
    assert_eq!(view["saved"], 2, "both images saved: {view:#}");
    for image in view["images"].as_array().expect("images in the job view") {
        let path = image["path"].as_str().expect("a saved image has a path");
        let path = Path::new(path);
        let file = if path.is_absolute() {
            path.to_path_buf()
        } else {
            output.join(path)
        };
        assert!(file.is_file(), "{} was reported saved", file.display());
    }

    // Ctrl-C: the daemon drains, then flushes spans and metrics before it exits.
    let exit = daemon.interrupt(Duration::from_secs(20)).await;
    let log = daemon.log();
    assert!(exit.success(), "luna up exited with {exit}; log:\n{log}");
    let _ = stop_receiver.send(());

    let traces = sink.traces.lock().expect("trace sink lock").clone();
    let metrics = sink.metrics.lock().expect("metrics sink lock").clone();
    assert!(
        !traces.is_empty(),
        "the receiver got no trace export at all; luna log:\n{log}"
    );

    // Resource: service.name defaults to `luna`.
    let mut spans: Vec<&Span> = Vec::new();
    for rs in traces.iter().flat_map(|r| &r.resource_spans) {
        assert_service_name(rs.resource.as_ref(), "spans");
        spans.extend(rs.scope_spans.iter().flat_map(|ss| &ss.spans));
    }
    let all = dump(&spans);

    // Every span of the job is in the client's trace.
    let pipeline = [
        "POST /v1/jobs",
        "publish",
        "process",
        "quality_gate",
        "encode",
        "write",
        "relay",
    ];
    let outside: Vec<&Span> = spans
        .iter()
        .copied()
        .filter(|s| {
            (pipeline.contains(&s.name.as_str())
                || attr(s, "luna.job_id").as_deref() == Some(job_id.as_str()))
                && hex(&s.trace_id) != TRACE_ID
        })
        .collect();
    assert!(
        outside.is_empty(),
        "spans of job {job_id} outside the client's trace {TRACE_ID}:\n{}\nall spans:\n{all}",
        dump(&outside)
    );
    let trace: Vec<&Span> = spans
        .iter()
        .copied()
        .filter(|s| hex(&s.trace_id) == TRACE_ID)
        .collect();
    let names: BTreeSet<&str> = trace.iter().map(|s| s.name.as_str()).collect();
    for name in [
        "POST /v1/jobs",
        "publish",
        "process",
        "encode",
        "write",
        "relay",
    ] {
        assert!(
            names.contains(name),
            "no `{name}` span in the client's trace; spans:\n{all}"
        );
    }
    let by_id: HashMap<Vec<u8>, &Span> = trace.iter().map(|s| (s.span_id.clone(), *s)).collect();
    let parent = |s: &Span| by_id.get(&s.parent_span_id).copied();
    let children = |p: &Span, name: &str| -> Vec<&Span> {
        trace
            .iter()
            .copied()
            .filter(|s| s.name == name && s.parent_span_id == p.span_id)
            .collect()
    };
    let named =
        |name: &str| -> Vec<&Span> { trace.iter().copied().filter(|s| s.name == name).collect() };

    // The gateway's server span continues the client's span.
    let posts = named("POST /v1/jobs");
    assert_eq!(posts.len(), 1, "one server span; spans:\n{all}");
    let post = posts[0];
    assert_eq!(
        hex(&post.parent_span_id),
        CLIENT_SPAN_ID,
        "`POST /v1/jobs` must be a child of the client's span; spans:\n{all}"
    );
    assert_eq!(kind(post), SpanKind::Server, "`POST /v1/jobs` kind");
    assert_eq!(
        attr(post, "luna.job_id").as_deref(),
        Some(job_id.as_str()),
        "`POST /v1/jobs` carries luna.job_id; spans:\n{all}"
    );
    let gateway_publishes = children(post, "publish");
    assert_eq!(
        gateway_publishes.len(),
        3,
        "the gateway publishes save_job_queued and one task per image under its server span; \
         spans:\n{all}"
    );

    for p in named("publish") {
        assert_eq!(
            kind(p),
            SpanKind::Producer,
            "every `publish` is a producer; spans:\n{all}"
        );
        assert_eq!(
            attr(p, "messaging.system").as_deref(),
            Some("in_process"),
            "`publish` messaging.system; spans:\n{all}"
        );
        assert_eq!(
            attr(p, "messaging.operation.name").as_deref(),
            Some("publish"),
            "`publish` messaging.operation.name; spans:\n{all}"
        );
        assert!(
            attr(p, "messaging.destination.name").is_some_and(|d| !d.is_empty()),
            "`publish` has messaging.destination.name; spans:\n{all}"
        );
        assert!(
            attr(p, "messaging.message.id").is_some_and(|d| !d.is_empty()),
            "`publish` has messaging.message.id; spans:\n{all}"
        );
    }

    // Saver: one `process` per image, each the consumer of a task published by the gateway,
    // with `encode`, `write` and the `image_saved` publish under it, relayed by status.
    let processes = named("process");
    assert_eq!(processes.len(), 2, "one `process` per image; spans:\n{all}");
    let mut formats = BTreeSet::new();
    let mut indexes = BTreeSet::new();
    for p in &processes {
        assert_eq!(
            kind(p),
            SpanKind::Consumer,
            "`process` is a consumer; spans:\n{all}"
        );
        let task_publish = parent(p).unwrap_or_else(|| {
            panic!(
                "`process` {} has no exported parent; spans:\n{all}",
                hex(&p.span_id)
            )
        });
        assert_eq!(
            task_publish.name,
            "publish",
            "`process` {} is a child of a `publish`; spans:\n{all}",
            hex(&p.span_id)
        );
        assert_eq!(
            kind(task_publish),
            SpanKind::Producer,
            "`process`'s parent is a producer; spans:\n{all}"
        );
        assert_eq!(
            task_publish.parent_span_id, post.span_id,
            "the task's `publish` is under `POST /v1/jobs`; spans:\n{all}"
        );
        assert_eq!(
            attr(p, "messaging.system").as_deref(),
            Some("in_process"),
            "`process` messaging.system; spans:\n{all}"
        );
        assert_eq!(
            attr(p, "messaging.operation.name").as_deref(),
            Some("process"),
            "`process` messaging.operation.name; spans:\n{all}"
        );
        assert_eq!(
            attr(p, "luna.job_id").as_deref(),
            Some(job_id.as_str()),
            "`process` luna.job_id; spans:\n{all}"
        );
        formats.insert(attr(p, "luna.image.format").unwrap_or_default());
        indexes.insert(attr(p, "luna.image.index").unwrap_or_default());

        for step in ["encode", "write"] {
            assert_eq!(
                children(p, step).len(),
                1,
                "one `{step}` under `process` {}; spans:\n{all}",
                hex(&p.span_id)
            );
        }
        let events: Vec<&Span> = children(p, "publish")
            .into_iter()
            .filter(|e| attr(e, "luna.event").as_deref() == Some("image_saved"))
            .collect();
        assert_eq!(
            events.len(),
            1,
            "`process` {} publishes its image_saved event; spans:\n{all}",
            hex(&p.span_id)
        );
        let relays = children(events[0], "relay");
        assert_eq!(
            relays.len(),
            1,
            "status relays the image_saved event published under `process` {}; spans:\n{all}",
            hex(&p.span_id)
        );
        assert_eq!(
            kind(relays[0]),
            SpanKind::Consumer,
            "`relay` is a consumer; spans:\n{all}"
        );
    }
    assert_eq!(
        formats,
        BTreeSet::from(["png".to_owned(), "webp".to_owned()]),
        "luna.image.format on `process` spans; spans:\n{all}"
    );
    assert_eq!(
        indexes,
        BTreeSet::from(["0".to_owned(), "1".to_owned()]),
        "luna.image.index on `process` spans; spans:\n{all}"
    );
    for step in ["encode", "write"] {
        for s in named(step) {
            assert!(
                parent(s).is_some_and(|p| p.name == "process"),
                "every `{step}` is a child of a `process`; spans:\n{all}"
            );
        }
    }

    // Metrics: the last export holding luna.images.saved counts both images (cumulative).
    assert!(
        !metrics.is_empty(),
        "the receiver got no metrics export at all; luna log:\n{log}"
    );
    let mut saved: Option<&Metric> = None;
    let mut names = BTreeSet::new();
    for rm in metrics.iter().flat_map(|r| &r.resource_metrics) {
        assert_service_name(rm.resource.as_ref(), "metrics");
        for m in rm.scope_metrics.iter().flat_map(|sm| &sm.metrics) {
            names.insert(m.name.clone());
            if m.name == "luna.images.saved" {
                saved = Some(m);
            }
        }
    }
    for name in [
        "luna.images.saved",
        "luna.tasks.published",
        "luna.encode.duration",
    ] {
        assert!(
            names.contains(name),
            "metric {name} was not exported; got {names:?}"
        );
    }
    let saved = saved.expect("luna.images.saved exported");
    let Some(Data::Sum(sum)) = &saved.data else {
        panic!("luna.images.saved is not a sum: {saved:?}");
    };
    assert_eq!(
        sum.aggregation_temporality,
        AggregationTemporality::Cumulative as i32,
        "luna.images.saved is cumulative: {saved:?}"
    );
    assert!(
        sum.is_monotonic,
        "luna.images.saved is a counter: {saved:?}"
    );
    let total: f64 = sum
        .data_points
        .iter()
        .map(|p| match p.value {
            Some(NumberValue::AsInt(i)) => i as f64,
            Some(NumberValue::AsDouble(d)) => d,
            None => 0.0,
        })
        .sum();
    assert_eq!(
        total, 2.0,
        "luna.images.saved in the latest export sums to 2: {saved:?}"
    );
    let saved_formats: BTreeSet<String> = sum
        .data_points
        .iter()
        .filter_map(|p| find_attr(&p.attributes, "format"))
        .collect();
    assert_eq!(
        saved_formats,
        BTreeSet::from(["png".to_owned(), "webp".to_owned()]),
        "luna.images.saved by format: {saved:?}"
    );

    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(30),
        "the OTLP round trip took {took:?}"
    );
}

fn assert_service_name(resource: Option<&Resource>, signal: &str) {
    let name = resource.and_then(|r| find_attr(&r.attributes, "service.name"));
    assert_eq!(
        name.as_deref(),
        Some("luna"),
        "service.name on the exported {signal} resource: {resource:?}"
    );
}

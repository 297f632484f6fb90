//! Observability end to end: one job is one trace across gateway, broker, saver and status,
//! and `/metrics` counts exactly what happened.
//!
//! Spans go to the SDK's in-memory exporter, installed once for this test binary; each test
//! picks its own spans out by trace id, so the tests can run side by side.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use luna_e2e::{Env, Stack, test_image};
use luna_job::codec::to_msgpack;
use luna_job::{ImageFormat, QualityGate, SaveRequest};
use luna_queue::Broker;
use opentelemetry::trace::{SpanKind, Status};
use opentelemetry::{KeyValue, Value};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SpanData};
use prometheus_parse::Scrape;
use serde_json::Value as Json;

static SPANS: OnceLock<(InMemorySpanExporter, luna_telemetry::Telemetry)> = OnceLock::new();

fn exporter() -> &'static InMemorySpanExporter {
    &SPANS
        .get_or_init(|| {
            let exporter = InMemorySpanExporter::default();
            let telemetry = luna_telemetry::init_with_exporter("luna-e2e", exporter.clone());
            (exporter, telemetry)
        })
        .0
}

/// A client's own trace context, as the ComfyUI node and `luna submit` send it.
struct ClientTrace {
    trace_id: String,
    span_id: String,
}

impl ClientTrace {
    fn new() -> Self {
        // v7 ids: unique per call; the random tail makes the span id.
        let id = uuid::Uuid::now_v7().simple().to_string();
        let span = uuid::Uuid::now_v7().simple().to_string();
        Self {
            trace_id: id,
            span_id: span[16..].to_owned(),
        }
    }

    fn header(&self) -> String {
        format!("00-{}-{}-01", self.trace_id, self.span_id)
    }
}

async fn submit_traced(gateway: &str, request: &SaveRequest, trace: &ClientTrace) -> String {
    let response = reqwest::Client::new()
        .post(format!("{gateway}/v1/jobs"))
        .header("content-type", "application/msgpack")
        .header("traceparent", trace.header())
        .body(to_msgpack(request).expect("encode"))
        .send()
        .await
        .expect("gateway answers");
    assert_eq!(response.status().as_u16(), 202);
    let body: Json = response.json().await.expect("JSON answer");
    body["job_id"].as_str().expect("job_id").to_owned()
}

/// Waits until status reports the job complete.
async fn wait_completed(status: &str, job_id: &str) -> Json {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let response = reqwest::get(format!("{status}/v1/jobs/{job_id}"))
            .await
            .expect("status answers");
        if response.status().is_success() {
            let view: Json = response.json().await.expect("JSON");
            if view["state"] == "completed" {
                return view;
            }
        }
        assert!(
            Instant::now() < deadline,
            "job {job_id} did not complete in time"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The finished spans of one trace, once `ready` says they are all there.
async fn spans_of(trace_id: &str, ready: impl Fn(&[SpanData]) -> bool) -> Vec<SpanData> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let spans: Vec<SpanData> = exporter()
            .get_finished_spans()
            .expect("exporter")
            .into_iter()
            .filter(|s| s.span_context.trace_id().to_string() == trace_id)
            .collect();
        if ready(&spans) {
            return spans;
        }
        assert!(
            Instant::now() < deadline,
            "trace {trace_id} never completed; have: {:#?}",
            spans.iter().map(describe).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn describe(s: &SpanData) -> String {
    format!(
        "{} {:?} id={} parent={} {:?}",
        s.name,
        s.span_kind,
        s.span_context.span_id(),
        s.parent_span_id,
        s.attributes
            .iter()
            .map(|kv| format!("{}={}", kv.key, kv.value))
            .collect::<Vec<_>>()
    )
}

fn attr<'a>(span: &'a SpanData, key: &str) -> Option<&'a Value> {
    span.attributes
        .iter()
        .find(|kv: &&KeyValue| kv.key.as_str() == key)
        .map(|kv| &kv.value)
}

fn text(span: &SpanData, key: &str) -> String {
    attr(span, key).map_or_else(String::new, |v| v.as_str().into_owned())
}

fn named<'a>(spans: &'a [SpanData], name: &str) -> Vec<&'a SpanData> {
    spans.iter().filter(|s| s.name == name).collect()
}

fn by_id(spans: &[SpanData]) -> BTreeMap<String, &SpanData> {
    spans
        .iter()
        .map(|s| (s.span_context.span_id().to_string(), s))
        .collect()
}

fn parent<'a>(index: &BTreeMap<String, &'a SpanData>, span: &SpanData) -> &'a SpanData {
    index
        .get(&span.parent_span_id.to_string())
        .copied()
        .unwrap_or_else(|| panic!("the parent of {} is not in the trace", describe(span)))
}

fn two_image_job() -> SaveRequest {
    let mut request = SaveRequest {
        save_path: "traced".into(),
        filename: "%index%".into(),
        model_name: "sdxl.safetensors".into(),
        images: vec![
            test_image(64, 48, 3, ImageFormat::Png, "A"),
            test_image(64, 48, 3, ImageFormat::Webp, "B"),
        ],
        ..Default::default()
    };
    request.quality_gate = QualityGate::Variance;
    request.min_quality_threshold = 0.01;
    request
}

/// The checks of the issue: parent links, kinds and attributes, from client to relay.
async fn one_job_is_one_trace(stack: &Stack, system: &str, tasks_exchange: &str) {
    let client = ClientTrace::new();
    let job_id = submit_traced(&stack.gateway.url(), &two_image_job(), &client).await;
    wait_completed(&stack.status.url(), &job_id).await;
    let spans = spans_of(&client.trace_id, |s| {
        named(s, "relay").len() >= 3 && named(s, "process").len() == 2
    })
    .await;
    let index = by_id(&spans);

    // Every span of the job is in the client's trace (filtered by it above) and names the job.
    for span in &spans {
        if span.name != "quality_gate" && span.name != "encode" && span.name != "write" {
            assert_eq!(text(span, "luna.job_id"), job_id, "{}", describe(span));
        }
    }

    let request = named(&spans, "POST /v1/jobs");
    assert_eq!(request.len(), 1, "one request span");
    let request = request[0];
    assert_eq!(request.span_kind, SpanKind::Server);
    assert_eq!(request.parent_span_id.to_string(), client.span_id);
    assert!(text(request, "target").starts_with("luna_gateway"));
    assert_eq!(
        attr(request, "http.response.status_code").map(ToString::to_string),
        Some("202".into())
    );

    let publishes = named(&spans, "publish");
    let task_publishes: Vec<_> = publishes
        .iter()
        .filter(|s| text(s, "messaging.destination.name") == tasks_exchange)
        .collect();
    assert_eq!(task_publishes.len(), 2, "one task publish per image");
    for p in &task_publishes {
        assert_eq!(p.span_kind, SpanKind::Producer);
        assert_eq!(parent(&index, p).name, "POST /v1/jobs");
        assert_eq!(text(p, "messaging.system"), system);
        assert_eq!(text(p, "messaging.operation.type"), "send");
        assert_eq!(
            text(p, "messaging.rabbitmq.destination.routing_key"),
            "save"
        );
        let i = attr(p, "luna.image.index").expect("index").to_string();
        assert_eq!(
            text(p, "messaging.message.id"),
            format!("{job_id}/{i}"),
            "the message id names job and image"
        );
        assert!(text(p, "target").starts_with("luna_queue"));
    }

    let processes = named(&spans, "process");
    let mut formats = BTreeSet::new();
    for p in &processes {
        assert_eq!(p.span_kind, SpanKind::Consumer);
        let producer = parent(&index, p);
        assert_eq!(
            producer.name, "publish",
            "process continues the task's publish"
        );
        assert_eq!(producer.span_kind, SpanKind::Producer);
        assert_eq!(
            text(producer, "messaging.message.id"),
            text(p, "messaging.message.id")
        );
        assert_eq!(text(p, "messaging.system"), system);
        assert_eq!(text(p, "messaging.operation.type"), "process");
        assert_eq!(text(p, "luna.outcome"), "saved");
        assert!(text(p, "target").starts_with("luna_saver"));
        let bytes = attr(p, "luna.image.bytes").expect("bytes").to_string();
        assert!(bytes.parse::<u64>().expect("number") > 0);
        formats.insert(text(p, "luna.image.format"));
    }
    assert_eq!(formats, BTreeSet::from(["png".into(), "webp".into()]));

    for name in ["quality_gate", "encode", "write"] {
        let steps = named(&spans, name);
        assert_eq!(steps.len(), 2, "one {name} per image");
        for step in steps {
            assert_eq!(
                parent(&index, step).name,
                "process",
                "{name} is a step of process"
            );
            assert!(text(step, "target").starts_with("luna_store"));
        }
    }
    for write in named(&spans, "write") {
        let bytes = attr(write, "luna.image.bytes").expect("bytes").to_string();
        assert!(bytes.parse::<u64>().expect("number") > 0);
    }

    let relays = named(&spans, "relay");
    let saved_relays: Vec<_> = relays
        .iter()
        .filter(|r| text(r, "luna.event") == "image_saved")
        .collect();
    assert_eq!(
        saved_relays.len(),
        2,
        "status relayed both image_saved events"
    );
    for relay in saved_relays {
        assert_eq!(relay.span_kind, SpanKind::Consumer);
        assert!(text(relay, "target").starts_with("luna_status"));
        let publish = parent(&index, relay);
        assert_eq!(publish.name, "publish");
        assert_eq!(text(publish, "luna.event"), "image_saved");
        assert_eq!(parent(&index, publish).name, "process");
    }
    let queued = relays
        .iter()
        .find(|r| text(r, "luna.event") == "save_job_queued")
        .expect("the queued event is relayed in the same trace");
    assert_eq!(parent(&index, parent(&index, queued)).name, "POST /v1/jobs");
    for span in &spans {
        assert!(
            matches!(span.status, Status::Unset | Status::Ok),
            "nothing failed: {}",
            describe(span)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_job_is_one_trace_across_rabbitmq() {
    exporter();
    let env = Env::new().await;
    let stack = Stack::start(env.broker.clone(), env.output.path()).await;
    let tasks = format!("{}.tasks", env.broker.prefix());
    one_job_is_one_trace(&stack, "rabbitmq", &tasks).await;
    stack.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_job_is_one_trace_in_process() {
    exporter();
    let output = tempfile::tempdir().expect("tempdir");
    let stack = Stack::start(Broker::in_process(), output.path()).await;
    one_job_is_one_trace(&stack, "in_process", "tasks").await;
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_save_marks_its_process_span_failed() {
    exporter();
    let output = tempfile::tempdir().expect("tempdir");
    // A file where the job's folder should be: every attempt fails, the last one parks.
    std::fs::write(output.path().join("blocked"), b"not a folder").expect("blocker");
    let stack = Stack::start(Broker::in_process(), output.path()).await;
    let client = ClientTrace::new();
    let request = SaveRequest {
        save_path: "blocked/x".into(),
        filename: "%index%".into(),
        images: vec![test_image(16, 16, 3, ImageFormat::Png, "")],
        ..Default::default()
    };
    let job_id = submit_traced(&stack.gateway.url(), &request, &client).await;
    wait_completed(&stack.status.url(), &job_id).await;
    let spans = spans_of(&client.trace_id, |s| {
        named(s, "process")
            .iter()
            .any(|p| text(p, "luna.outcome") == "failed")
    })
    .await;
    let failed = named(&spans, "process")
        .into_iter()
        .find(|p| text(p, "luna.outcome") == "failed")
        .expect("failed process span");
    assert!(
        matches!(&failed.status, Status::Error { description } if description.contains("not a folder")),
        "{:?}",
        failed.status
    );
    assert_eq!(text(failed, "error.type"), "storage");
    stack.stop().await;
}

/// `/metrics` of one service, parsed by an independent Prometheus text parser.
async fn scrape(service: &luna_e2e::Service) -> Scrape {
    let response = reqwest::get(format!("{}/metrics", service.url()))
        .await
        .expect("metrics answer");
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    let text = response.text().await.expect("text");
    let lines = text.lines().map(|l| Ok(l.to_owned()));
    Scrape::parse(lines).expect("valid Prometheus text")
}

/// Sum of a counter's samples whose labels match `labels`.
fn counter(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum()
}

fn histogram_count(scrape: &Scrape, name: &str) -> u64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .map(|s| match &s.value {
            prometheus_parse::Value::Histogram(buckets) => {
                buckets.last().map_or(0, |b| b.count as u64)
            }
            _ => 0,
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_parse_and_count_exactly_what_was_saved() {
    let output = tempfile::tempdir().expect("tempdir");
    let stack = Stack::start(Broker::in_process(), output.path()).await;
    let before = (
        scrape(&stack.gateway).await,
        scrape(&stack.saver).await,
        scrape(&stack.status).await,
    );

    // Three saved (two png, one jpeg) and one rejected by its gate.
    let client = ClientTrace::new();
    let saved_job = SaveRequest {
        save_path: "counted".into(),
        filename: "%index%".into(),
        images: vec![
            test_image(40, 30, 3, ImageFormat::Png, "A"),
            test_image(40, 30, 3, ImageFormat::Png, "B"),
            test_image(40, 30, 3, ImageFormat::Jpeg, "C"),
        ],
        ..Default::default()
    };
    let saved_id = submit_traced(&stack.gateway.url(), &saved_job, &client).await;
    let mut flat = luna_job::ImageInput {
        pixels: vec![128u8; 32 * 32 * 3].into(),
        width: 32,
        height: 32,
        channels: 3,
        format: ImageFormat::Webp,
        ..Default::default()
    };
    flat.affix = "FLAT".into();
    let mut rejected_job = SaveRequest {
        save_path: "counted".into(),
        images: vec![flat],
        ..Default::default()
    };
    rejected_job.quality_gate = QualityGate::Variance;
    rejected_job.min_quality_threshold = 0.5;
    rejected_job.keep_rejected = false;
    let rejected_id = submit_traced(&stack.gateway.url(), &rejected_job, &client).await;
    // And one that fails for good: a file where its folder should be.
    std::fs::write(output.path().join("blocked"), b"not a folder").expect("blocker");
    let failing_job = SaveRequest {
        save_path: "blocked/x".into(),
        images: vec![test_image(16, 16, 3, ImageFormat::Png, "")],
        ..Default::default()
    };
    let failing_id = submit_traced(&stack.gateway.url(), &failing_job, &client).await;
    let saved_view = wait_completed(&stack.status.url(), &saved_id).await;
    wait_completed(&stack.status.url(), &rejected_id).await;
    wait_completed(&stack.status.url(), &failing_id).await;

    let after = (
        scrape(&stack.gateway).await,
        scrape(&stack.saver).await,
        scrape(&stack.status).await,
    );
    let moved = |before: &Scrape, after: &Scrape, name: &str, labels: &[(&str, &str)]| {
        counter(after, name, labels) - counter(before, name, labels)
    };
    let gateway = |name: &str, labels: &[(&str, &str)]| moved(&before.0, &after.0, name, labels);
    let saver = |name: &str, labels: &[(&str, &str)]| moved(&before.1, &after.1, name, labels);
    let status = |name: &str, labels: &[(&str, &str)]| moved(&before.2, &after.2, name, labels);

    assert_eq!(gateway("luna_jobs_accepted_total", &[]), 3.0);
    assert_eq!(gateway("luna_tasks_published_total", &[]), 5.0);
    assert_eq!(
        gateway("luna_tasks_published_total", &[("format", "png")]),
        3.0
    );
    assert_eq!(saver("luna_images_saved_total", &[]), 3.0);
    assert_eq!(saver("luna_images_saved_total", &[("format", "png")]), 2.0);
    assert_eq!(saver("luna_images_saved_total", &[("format", "jpeg")]), 1.0);
    assert_eq!(
        saver(
            "luna_images_rejected_total",
            &[("format", "webp"), ("gate", "variance")]
        ),
        1.0
    );
    assert_eq!(saver("luna_images_failed_total", &[]), 1.0);
    assert_eq!(
        saver(
            "luna_images_failed_total",
            &[("format", "png"), ("reason", "storage")]
        ),
        1.0
    );
    // Five attempts (the default --max-attempts): four retried, the fifth parks.
    assert_eq!(saver("luna_save_retries_total", &[("format", "png")]), 4.0);
    assert_eq!(
        saver("luna_tasks_parked_total", &[("reason", "storage")]),
        1.0
    );
    // A gauge the pool refreshes every --scale-interval.
    let deadline = Instant::now() + Duration::from_secs(10);
    while counter(&scrape(&stack.saver).await, "luna_queue_parked", &[]) != 1.0 {
        assert!(
            Instant::now() < deadline,
            "luna_queue_parked never showed the parked task"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let bytes: u64 = saved_view["events"]
        .as_array()
        .map(|events| {
            events
                .iter()
                .filter(|e| e["event"] == "image_saved")
                .filter_map(|e| e["bytes"].as_u64())
                .sum()
        })
        .unwrap_or(0);
    assert!(
        bytes > 0,
        "image_saved events carry their sizes: {saved_view}"
    );
    assert_eq!(
        saver("luna_bytes_written_total", &[]),
        bytes as f64,
        "bytes written match the saved files"
    );
    // Three saved, and five attempts of the failing image (each encodes, then fails to write);
    // the rejected image is never encoded.
    let histogram_moved =
        |name: &str| histogram_count(&after.1, name) - histogram_count(&before.1, name);
    assert_eq!(histogram_moved("luna_encode_duration_seconds"), 8);
    assert_eq!(histogram_moved("luna_write_duration_seconds"), 8);
    assert_eq!(
        counter(&after.1, "luna_save_slots_configured", &[("bound", "min")]),
        2.0
    );
    assert_eq!(
        counter(&after.1, "luna_save_slots_configured", &[("bound", "max")]),
        4.0
    );
    assert_eq!(
        status("luna_events_relayed_total", &[("type", "image_saved")]),
        3.0
    );
    assert_eq!(
        status("luna_events_relayed_total", &[("type", "image_rejected")]),
        1.0
    );
    assert!(counter(&after.2, "luna_status_jobs_tracked", &[]) >= 3.0);

    // Every metric the provisioned Grafana dashboard queries is one the services expose.
    let exposed: BTreeSet<&str> = [&after.0, &after.1, &after.2]
        .iter()
        .flat_map(|s| s.samples.iter().map(|x| x.metric.as_str()))
        .collect();
    for name in dashboard_metrics() {
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .filter(|base| exposed.contains(base))
            .unwrap_or(&name);
        assert!(
            exposed.contains(family),
            "the dashboard queries {name}, which no service exposes"
        );
    }
    stack.stop().await;
}

/// The `luna_*` metric names in the expressions of `ops/grafana/dashboards/luna-saver.json`.
fn dashboard_metrics() -> BTreeSet<String> {
    fn exprs(v: &Json, out: &mut Vec<String>) {
        match v {
            Json::Object(map) => {
                for (k, v) in map {
                    match (k.as_str(), v) {
                        ("expr", Json::String(e)) => out.push(e.clone()),
                        _ => exprs(v, out),
                    }
                }
            }
            Json::Array(items) => items.iter().for_each(|v| exprs(v, out)),
            _ => {}
        }
    }
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../ops/grafana/dashboards/luna-saver.json");
    let dashboard: Json =
        serde_json::from_slice(&std::fs::read(&path).expect("dashboard")).expect("dashboard JSON");
    let mut all = Vec::new();
    exprs(&dashboard, &mut all);
    assert!(!all.is_empty(), "no expressions in {}", path.display());
    all.iter()
        .flat_map(|e| {
            e.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
                .filter(|t| t.starts_with("luna_"))
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect()
}

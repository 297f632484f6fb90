//! The meter provider behind `/metrics`, and Prometheus text from it.
//!
//! Services record through OpenTelemetry instruments from [`Registry::meter`]. Every registry
//! has a pull reader that [`Registry::render`] turns into the Prometheus text format; the
//! process registry from [`crate::init`] also pushes to OTLP when configured. Names follow the
//! OpenTelemetry-to-Prometheus rules: dots become underscores, the unit is appended (`_seconds`
//! for `s`, `_bytes` for `By`) unless the name already says it, and monotonic sums end in
//! `_total`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use opentelemetry::metrics::{Histogram, Meter, MeterProvider as _};
use opentelemetry::{KeyValue, Value};
use opentelemetry_otlp::MetricExporter;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::metrics::data::{AggregatedMetrics, Metric, MetricData, ResourceMetrics};
use opentelemetry_sdk::metrics::reader::MetricReader;
use opentelemetry_sdk::metrics::{
    InstrumentKind, ManualReader, Pipeline, SdkMeterProvider, Temporality,
};

/// The instrumentation scope of every Luna instrument. One scope means two services in one
/// process (`luna up`) that create the same instrument share it, instead of exposing two
/// series with the same name.
pub const SCOPE: &str = "luna";

/// The `Content-Type` of [`Registry::render`]'s text.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Bucket bounds (seconds) for the duration histograms: 1 ms to 30 s.
pub const DURATION_BUCKETS: [f64; 15] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 30.0,
];

/// A meter provider with a Prometheus pull reader. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Registry {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    provider: SdkMeterProvider,
    reader: SharedReader,
}

static PROCESS: OnceLock<Registry> = OnceLock::new();

impl Default for Registry {
    fn default() -> Self {
        Self::build(Resource::builder_empty().build(), None)
    }
}

impl Registry {
    /// A private registry: only its own `/metrics` sees what is recorded into it.
    pub fn new() -> Self {
        Self::default()
    }

    /// The process registry installed by [`crate::init`], or a new private one when telemetry
    /// was not initialised (tests running several services in one process keep them apart).
    pub fn shared() -> Self {
        PROCESS.get().cloned().unwrap_or_default()
    }

    /// Installs the process registry (the first call wins).
    pub(crate) fn install(resource: Resource, otlp: Option<MetricExporter>) -> Self {
        PROCESS.get_or_init(|| Self::build(resource, otlp)).clone()
    }

    fn build(resource: Resource, otlp: Option<MetricExporter>) -> Self {
        let reader = SharedReader(Arc::new(ManualReader::builder().build()));
        let mut builder = SdkMeterProvider::builder()
            .with_resource(resource)
            .with_reader(reader.clone());
        if let Some(exporter) = otlp {
            builder = builder.with_periodic_exporter(exporter);
        }
        Self {
            inner: Arc::new(Inner {
                provider: builder.build(),
                reader,
            }),
        }
    }

    /// The meter every Luna instrument comes from.
    pub fn meter(&self) -> Meter {
        self.inner.provider.meter(SCOPE)
    }

    /// Everything recorded so far, in the Prometheus text format (version 0.0.4).
    pub fn render(&self) -> String {
        let mut rm = ResourceMetrics::default();
        if let Err(e) = self.inner.reader.collect(&mut rm) {
            tracing::warn!(error = %e, "collecting metrics failed");
            return String::new();
        }
        render(&rm)
    }

    /// The `GET /metrics` answer: the `Content-Type` header and [`Registry::render`]'s text
    /// (a tuple every HTTP framework's handlers can return, axum's included).
    pub fn exposition(&self) -> ([(&'static str, &'static str); 1], String) {
        ([("content-type", CONTENT_TYPE)], self.render())
    }

    /// Pushes the last OTLP export and stops the readers.
    pub fn shutdown(&self) {
        match self.inner.provider.shutdown() {
            // Shutting down twice is harmless.
            Ok(()) | Err(OTelSdkError::AlreadyShutdown) => {}
            Err(e) => eprintln!("telemetry: flushing metrics failed: {e}"),
        }
    }
}

/// The publish-to-confirm histogram, defined once so every service that publishes records into
/// the same instrument.
pub fn publish_duration(meter: &Meter) -> Histogram<f64> {
    meter
        .f64_histogram("luna.publish.duration")
        .with_description(
            "Time from publishing a message until the broker confirmed it, by kind (task, event).",
        )
        .with_unit("s")
        .with_boundaries(DURATION_BUCKETS.to_vec())
        .build()
}

/// Seconds as the `f64` histograms record.
pub fn seconds(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// The manual reader, shareable between the provider and [`Registry::render`].
#[derive(Debug, Clone)]
struct SharedReader(Arc<ManualReader>);

impl MetricReader for SharedReader {
    fn register_pipeline(&self, pipeline: std::sync::Weak<Pipeline>) {
        self.0.register_pipeline(pipeline);
    }

    fn collect(&self, rm: &mut ResourceMetrics) -> OTelSdkResult {
        self.0.collect(rm)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.0.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.0.shutdown_with_timeout(timeout)
    }

    fn temporality(&self, kind: InstrumentKind) -> Temporality {
        self.0.temporality(kind)
    }
}

/// One metric family: its header and sample lines, merged across scopes.
#[derive(Default)]
struct Family {
    help: String,
    kind: &'static str,
    samples: String,
}

fn render(rm: &ResourceMetrics) -> String {
    let mut families: BTreeMap<String, Family> = BTreeMap::new();
    for scope in rm.scope_metrics() {
        for metric in scope.metrics() {
            let (name, kind) = family_name(metric);
            let family = families.entry(name.clone()).or_default();
            family.kind = kind;
            if family.help.is_empty() {
                family.help = escape_help(metric.description());
            }
            match metric.data() {
                AggregatedMetrics::F64(data) => samples(&name, data, &mut family.samples),
                AggregatedMetrics::U64(data) => samples(&name, data, &mut family.samples),
                AggregatedMetrics::I64(data) => samples(&name, data, &mut family.samples),
            }
        }
    }
    let mut out = String::new();
    for (name, family) in families {
        if !family.help.is_empty() {
            let _ = writeln!(out, "# HELP {name} {}", family.help);
        }
        let _ = writeln!(out, "# TYPE {name} {}", family.kind);
        out.push_str(&family.samples);
    }
    out
}

/// The Prometheus name and type of `metric`.
fn family_name(metric: &Metric) -> (String, &'static str) {
    let mut name: String = metric
        .name()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    let suffix = match metric.unit() {
        "s" => "seconds",
        "By" => "bytes",
        _ => "",
    };
    if !suffix.is_empty() && !name.split('_').any(|part| part == suffix) {
        name.push('_');
        name.push_str(suffix);
    }
    let kind = match metric.data() {
        AggregatedMetrics::F64(d) => kind_of(d),
        AggregatedMetrics::U64(d) => kind_of(d),
        AggregatedMetrics::I64(d) => kind_of(d),
    };
    if kind == "counter" && !name.ends_with("_total") {
        name.push_str("_total");
    }
    (name, kind)
}

fn kind_of<T>(data: &MetricData<T>) -> &'static str {
    match data {
        MetricData::Sum(sum) if sum.is_monotonic() => "counter",
        MetricData::Sum(_) | MetricData::Gauge(_) => "gauge",
        MetricData::Histogram(_) => "histogram",
        MetricData::ExponentialHistogram(_) => "untyped",
    }
}

/// A sample value as Prometheus writes it.
trait Number: Copy {
    fn text(self) -> String;
}

impl Number for u64 {
    fn text(self) -> String {
        self.to_string()
    }
}

impl Number for i64 {
    fn text(self) -> String {
        self.to_string()
    }
}

impl Number for f64 {
    fn text(self) -> String {
        if self.is_nan() {
            "NaN".into()
        } else if self.is_infinite() {
            if self > 0.0 { "+Inf" } else { "-Inf" }.into()
        } else {
            self.to_string()
        }
    }
}

fn samples<T: Number>(name: &str, data: &MetricData<T>, out: &mut String) {
    match data {
        MetricData::Sum(sum) => {
            for p in sum.data_points() {
                line(out, name, &labels(p.attributes(), None), &p.value().text());
            }
        }
        MetricData::Gauge(gauge) => {
            for p in gauge.data_points() {
                line(out, name, &labels(p.attributes(), None), &p.value().text());
            }
        }
        MetricData::Histogram(hist) => {
            for p in hist.data_points() {
                let bucket = format!("{name}_bucket");
                let mut cumulative = 0u64;
                for (bound, count) in p.bounds().zip(p.bucket_counts()) {
                    cumulative += count;
                    let le = bound.text();
                    line(
                        out,
                        &bucket,
                        &labels(p.attributes(), Some(&le)),
                        &cumulative.to_string(),
                    );
                }
                line(
                    out,
                    &bucket,
                    &labels(p.attributes(), Some("+Inf")),
                    &p.count().to_string(),
                );
                let plain = labels(p.attributes(), None);
                line(out, &format!("{name}_sum"), &plain, &p.sum().text());
                line(
                    out,
                    &format!("{name}_count"),
                    &plain,
                    &p.count().to_string(),
                );
            }
        }
        MetricData::ExponentialHistogram(_) => {}
    }
}

fn line(out: &mut String, name: &str, labels: &str, value: &str) {
    let _ = writeln!(out, "{name}{labels} {value}");
}

/// `{a="x",le="0.5"}`, sorted by name, or nothing when there are no labels.
fn labels<'a>(attributes: impl Iterator<Item = &'a KeyValue>, le: Option<&str>) -> String {
    let mut pairs: Vec<(String, String)> = attributes
        .map(|kv| {
            let key: String = kv
                .key
                .as_str()
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                .collect();
            (key, escape_label(&value_text(&kv.value)))
        })
        .collect();
    pairs.sort();
    if let Some(le) = le {
        pairs.push(("le".into(), le.into()));
    }
    if pairs.is_empty() {
        return String::new();
    }
    let body: Vec<String> = pairs
        .into_iter()
        .map(|(k, v)| format!("{k}=\"{v}\""))
        .collect();
    format!("{{{}}}", body.join(","))
}

fn value_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.as_str().to_owned(),
        other => other.to_string(),
    }
}

fn escape_label(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn escape_help(s: &str) -> String {
    s.replace('\\', "\\\\").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_gauges_and_histograms_render_as_prometheus_text() {
        let registry = Registry::new();
        let meter = registry.meter();
        let saved = meter
            .u64_counter("luna.images.saved")
            .with_description("Images saved.")
            .build();
        saved.add(2, &[KeyValue::new("format", "png")]);
        saved.add(1, &[KeyValue::new("format", "we\"bp")]);
        let bytes = meter
            .u64_counter("luna.bytes.written")
            .with_unit("By")
            .build();
        bytes.add(10, &[]);
        let depth = meter.i64_up_down_counter("luna.queue.depth").build();
        depth.add(-3, &[]);
        let hist = publish_duration(&meter);
        hist.record(0.003, &[KeyValue::new("kind", "task")]);
        hist.record(0.2, &[KeyValue::new("kind", "task")]);

        let text = registry.render();
        assert!(text.contains("# HELP luna_images_saved_total Images saved.\n"));
        assert!(text.contains("# TYPE luna_images_saved_total counter\n"));
        assert!(text.contains("luna_images_saved_total{format=\"png\"} 2\n"));
        assert!(text.contains("luna_images_saved_total{format=\"we\\\"bp\"} 1\n"));
        assert!(text.contains("luna_bytes_written_total 10\n"), "{text}");
        assert!(text.contains("# TYPE luna_queue_depth gauge\nluna_queue_depth -3\n"));
        assert!(text.contains("# TYPE luna_publish_duration_seconds histogram\n"));
        assert!(
            text.contains("luna_publish_duration_seconds_bucket{kind=\"task\",le=\"0.0025\"} 0\n")
        );
        assert!(
            text.contains("luna_publish_duration_seconds_bucket{kind=\"task\",le=\"0.005\"} 1\n")
        );
        assert!(
            text.contains("luna_publish_duration_seconds_bucket{kind=\"task\",le=\"+Inf\"} 2\n")
        );
        assert!(text.contains("luna_publish_duration_seconds_count{kind=\"task\"} 2\n"));
    }

    #[test]
    fn the_same_instrument_from_two_services_is_one_series() {
        let registry = Registry::new();
        for _ in 0..2 {
            let c = registry.meter().u64_counter("luna.tasks.published").build();
            c.add(1, &[]);
        }
        let text = registry.render();
        assert_eq!(text.matches("# TYPE luna_tasks_published_total").count(), 1);
        assert!(text.contains("luna_tasks_published_total 2\n"), "{text}");
    }

    #[test]
    fn private_registries_do_not_share() {
        let (a, b) = (Registry::new(), Registry::new());
        a.meter().u64_counter("luna.x").build().add(1, &[]);
        assert!(!b.render().contains("luna_x"));
    }
}

//! Logs, traces, metrics and process plumbing shared by every Luna Saver binary.
//!
//! # Layout
//! - [`init`]: `tracing` with an `RUST_LOG`-style filter (default `info`), human or JSON lines,
//!   and OpenTelemetry export over OTLP when the standard `OTEL_EXPORTER_OTLP_*` variables say
//!   where to ([`otlp`]). Returns the [`Telemetry`] guard that flushes on shutdown.
//! - [`propagation`]: W3C `traceparent`/`tracestate` into and out of message headers.
//! - [`metrics`]: the meter provider behind every service's Prometheus `/metrics` (and OTLP).
//! - [`shutdown_signal`]: resolves on SIGINT or SIGTERM, for graceful draining.
//!
//! Libraries only create `tracing` spans and OpenTelemetry instruments; whether and where they
//! are exported is decided here, once per process.

mod logs;
pub mod metrics;
pub mod otlp;
pub mod propagation;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanExporter};
use tracing_subscriber::Layer as _;
use tracing_subscriber::filter::{EnvFilter, LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

pub use metrics::Registry;

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Readable lines for a terminal.
    #[default]
    Human,
    /// One JSON object per line, for log shippers.
    Json,
}

/// Telemetry could not be set up as configured.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("building the OTLP {signal} exporter: {source}")]
    Exporter {
        signal: &'static str,
        #[source]
        source: opentelemetry_otlp::ExporterBuildError,
    },
}

/// Keeps the providers alive; [`Telemetry::shutdown`] flushes what is still buffered.
#[derive(Debug)]
pub struct Telemetry {
    tracer: Option<SdkTracerProvider>,
    metrics: Registry,
}

impl Telemetry {
    /// Flushes spans and metrics and stops the exporters. Call it as the process ends.
    pub fn shutdown(self) {
        if let Some(tracer) = &self.tracer
            && let Err(e) = tracer.shutdown()
        {
            eprintln!("telemetry: flushing spans failed: {e}");
        }
        self.metrics.shutdown();
    }
}

/// Installs logging for `service` and, when `OTEL_EXPORTER_OTLP_ENDPOINT` (or a per-signal
/// endpoint) is set, OTLP export of spans and metrics. `OTEL_SERVICE_NAME` overrides `service`;
/// `OTEL_RESOURCE_ATTRIBUTES` adds resource attributes. Call it once, early, inside the Tokio
/// runtime (the gRPC exporter needs it). A second call in the same process only returns a guard
/// over the same registry.
///
/// # Errors
/// [`TelemetryError`] when an OTLP exporter is configured but cannot be built (a malformed
/// endpoint, an unsupported protocol).
pub fn init(service: &str, format: LogFormat) -> Result<Telemetry, TelemetryError> {
    let resource = resource(service);
    let exporters = otlp::Exporters::from_env()?;
    let tracer = exporters.spans.map(|exporter| {
        SdkTracerProvider::builder()
            .with_resource(resource.clone())
            .with_batch_exporter(exporter)
            .build()
    });
    let exporting_metrics = exporters.metrics.is_some();
    let metrics = Registry::install(resource, exporters.metrics);
    install(service, format, tracer.as_ref());
    if tracer.is_some() || exporting_metrics {
        tracing::info!(
            traces = tracer.is_some(),
            metrics = exporting_metrics,
            endpoint = %otlp::describe_endpoint(),
            "exporting over OTLP"
        );
    }
    Ok(Telemetry { tracer, metrics })
}

/// Like [`init`], but every span goes synchronously to `exporter` (tests use the SDK's
/// in-memory exporter) and nothing is read from the environment. Only the first call in a
/// process installs anything.
pub fn init_with_exporter<E: SpanExporter + 'static>(service: &str, exporter: E) -> Telemetry {
    let tracer = SdkTracerProvider::builder()
        .with_resource(resource(service))
        .with_simple_exporter(exporter)
        .build();
    install(service, LogFormat::Human, Some(&tracer));
    Telemetry {
        tracer: Some(tracer),
        metrics: Registry::shared(),
    }
}

fn resource(service: &str) -> Resource {
    let builder = Resource::builder().with_attributes([
        opentelemetry::KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
        // Tells replicas apart (two savers' gauges must not merge in a collector).
        opentelemetry::KeyValue::new("service.instance.id", instance_id()),
    ]);
    // The SDK's detectors read OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES; ours is only the
    // default name.
    if std::env::var_os("OTEL_SERVICE_NAME").is_some_and(|v| !v.is_empty()) {
        builder.build()
    } else {
        builder.with_service_name(service.to_owned()).build()
    }
}

/// `<host>-<pid>`: unique among running processes, readable in a trace view.
fn instance_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned());
    format!("{host}-{}", std::process::id())
}

/// Spans from our own crates, at `info` and above, are what gets exported; the log filter
/// (`RUST_LOG`) does not change what a trace contains, and the exporter's own HTTP/gRPC
/// spans never feed back into it.
fn span_filter() -> Targets {
    Targets::new().with_target("luna", LevelFilter::INFO)
}

fn install(service: &str, format: LogFormat, tracer: Option<&SdkTracerProvider>) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = match format {
        LogFormat::Human => tracing_subscriber::fmt::layer()
            .fmt_fields(logs::HumanFields)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .boxed(),
    }
    .with_filter(filter);
    let spans = tracer.map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("luna"))
            .with_threads(false)
            .with_location(false)
            .with_tracked_inactivity(false)
            .with_filter(span_filter())
    });
    let installed = tracing_subscriber::registry()
        .with(logs)
        .with(spans)
        .try_init()
        .is_ok();
    if installed {
        if let Some(provider) = tracer {
            opentelemetry::global::set_tracer_provider(provider.clone());
        }
        opentelemetry::global::set_text_map_propagator(
            opentelemetry_sdk::propagation::TraceContextPropagator::new(),
        );
        tracing::debug!(service, tracing = tracer.is_some(), "telemetry initialised");
    }
}

/// Resolves when the process is asked to stop (Ctrl-C or SIGTERM).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("interrupt received, shutting down"),
        () = term => tracing::info!("SIGTERM received, shutting down"),
    }
}

/// Marks `span` as failed: status `ERROR` with `message`, and `error.type` set to `kind` (a
/// short, low-cardinality class such as `timeout` or `storage`).
pub fn record_error(span: &tracing::Span, kind: &str, message: &dyn std::fmt::Display) {
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    span.set_status(opentelemetry::trace::Status::error(message.to_string()));
    span.set_attribute("error.type", kind.to_owned());
}

//! Which OTLP exporters the environment asks for.
//!
//! The standard variables decide, read by `opentelemetry-otlp` itself:
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` /
//! `OTEL_EXPORTER_OTLP_METRICS_ENDPOINT`) turns a signal on; `OTEL_EXPORTER_OTLP_PROTOCOL`
//! picks `grpc` or `http/protobuf` (the default); headers, timeout and compression follow their
//! usual variables. `OTEL_SDK_DISABLED=true`, or `OTEL_TRACES_EXPORTER` /
//! `OTEL_METRICS_EXPORTER` set to `none`, turn export off. With nothing set, nothing is
//! exported and no connection is attempted.

use opentelemetry_otlp::{MetricExporter, SpanExporter};

use crate::TelemetryError;

/// The exporters to install; `None` where a signal is off.
#[derive(Debug, Default)]
pub struct Exporters {
    pub spans: Option<SpanExporter>,
    pub metrics: Option<MetricExporter>,
}

impl Exporters {
    /// Reads the environment (see the module docs).
    ///
    /// # Errors
    /// [`TelemetryError::Exporter`] when a signal is on but its exporter cannot be built.
    pub fn from_env() -> Result<Self, TelemetryError> {
        Self::from_lookup(|key| std::env::var(key).ok())
    }

    fn from_lookup(var: impl Fn(&str) -> Option<String>) -> Result<Self, TelemetryError> {
        let plan = Plan::from_lookup(var);
        let spans = plan
            .traces
            .then(|| SpanExporter::builder().build())
            .transpose()
            .map_err(|source| TelemetryError::Exporter {
                signal: "trace",
                source,
            })?;
        let metrics = plan
            .metrics
            .then(|| MetricExporter::builder().build())
            .transpose()
            .map_err(|source| TelemetryError::Exporter {
                signal: "metrics",
                source,
            })?;
        Ok(Self { spans, metrics })
    }
}

/// Where exports go and how, for the start-up log line (never the headers: they hold keys).
pub fn describe_endpoint() -> String {
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
    let endpoint = var("OTEL_EXPORTER_OTLP_ENDPOINT")
        .or_else(|| var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
        .or_else(|| var("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"))
        .unwrap_or_default();
    let protocol = var("OTEL_EXPORTER_OTLP_PROTOCOL").unwrap_or_else(|| "http/protobuf".into());
    format!("{endpoint} ({protocol})")
}

/// Which signals are exported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Plan {
    traces: bool,
    metrics: bool,
}

impl Plan {
    fn from_lookup(var: impl Fn(&str) -> Option<String>) -> Self {
        let set = |key: &str| var(key).is_some_and(|v| !v.trim().is_empty());
        let is =
            |key: &str, value: &str| var(key).is_some_and(|v| v.trim().eq_ignore_ascii_case(value));
        if is("OTEL_SDK_DISABLED", "true") {
            return Self {
                traces: false,
                metrics: false,
            };
        }
        let any = set("OTEL_EXPORTER_OTLP_ENDPOINT");
        Self {
            traces: (any || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
                && !is("OTEL_TRACES_EXPORTER", "none"),
            metrics: (any || set("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"))
                && !is("OTEL_METRICS_EXPORTER", "none"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(vars: &[(&str, &str)]) -> Plan {
        Plan::from_lookup(|key| {
            vars.iter()
                .find(|(k, _)| *k == key)
                .map(|(_, v)| (*v).to_owned())
        })
    }

    #[test]
    fn nothing_set_exports_nothing() {
        let off = Plan {
            traces: false,
            metrics: false,
        };
        assert_eq!(plan(&[]), off);
        assert_eq!(plan(&[("OTEL_EXPORTER_OTLP_ENDPOINT", " ")]), off);
    }

    #[test]
    fn the_common_endpoint_turns_both_signals_on() {
        let p = plan(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318")]);
        assert!(p.traces && p.metrics);
    }

    #[test]
    fn per_signal_endpoints_and_opt_outs() {
        let p = plan(&[(
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "http://c:4318/v1/traces",
        )]);
        assert!(p.traces && !p.metrics);
        let p = plan(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
            ("OTEL_METRICS_EXPORTER", "none"),
        ]);
        assert!(p.traces && !p.metrics);
        let p = plan(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
            ("OTEL_SDK_DISABLED", "TRUE"),
        ]);
        assert!(!p.traces && !p.metrics);
    }
}

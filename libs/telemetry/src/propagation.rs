//! W3C trace context (`traceparent`, `tracestate`) in message headers.
//!
//! Producers call [`inject`] with their `publish` span, consumers call [`set_parent`] on their
//! `process` or `relay` span, so one trace runs from the client's request through the broker to
//! the saved file and the WebSocket relay. When spans are not recorded (no exporter configured),
//! [`inject`] leaves the headers it was given alone: a trace context that arrived with a request
//! still travels on unchanged.

use std::collections::BTreeMap;

use opentelemetry::Context;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator as _};
use opentelemetry::trace::TraceContextExt as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// The header names of W3C trace context.
pub const TRACE_HEADERS: [&str; 2] = ["traceparent", "tracestate"];

/// String headers, as carried on AMQP and in-process messages.
pub type Headers = BTreeMap<String, String>;

struct Carrier<'a>(&'a mut Headers);

impl Injector for Carrier<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_owned(), value);
    }
}

struct Reader<'a>(&'a Headers);

impl Extractor for Reader<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

/// Writes `span`'s context into `headers`, replacing any trace context there. Does nothing when
/// `span` is not recorded.
pub fn inject(span: &tracing::Span, headers: &mut Headers) {
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return;
    }
    for key in TRACE_HEADERS {
        headers.remove(key);
    }
    TraceContextPropagator::new().inject_context(&cx, &mut Carrier(headers));
}

/// The remote context in `headers` (empty when there is none or it does not parse).
pub fn extract(headers: &Headers) -> Context {
    TraceContextPropagator::new().extract(&Reader(headers))
}

/// Makes `span` a child of the context in `headers`, when there is one.
pub fn set_parent(span: &tracing::Span, headers: &Headers) {
    let cx = extract(headers);
    if cx.span().span_context().is_valid() {
        // Fails only when the span is already started elsewhere or not recorded.
        let _ = span.set_parent(cx);
    }
}

/// Only the trace-context entries of `headers`: what a producer passes on.
pub fn trace_headers<'a>(get: impl Fn(&str) -> Option<&'a str>) -> Headers {
    TRACE_HEADERS
        .iter()
        .filter_map(|&k| Some((k.to_owned(), get(k)?.to_owned())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extracts_a_w3c_parent() {
        let mut h = Headers::new();
        h.insert(
            "traceparent".into(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
        );
        let cx = extract(&h);
        let sc = cx.span().span_context().clone();
        assert!(sc.is_valid() && sc.is_remote());
        assert_eq!(
            sc.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(sc.span_id().to_string(), "00f067aa0ba902b7");
    }

    #[test]
    fn garbage_is_no_parent() {
        let mut h = Headers::new();
        h.insert("traceparent".into(), "00-zz-yy-01".into());
        assert!(!extract(&h).span().span_context().is_valid());
    }

    #[test]
    fn an_unrecorded_span_leaves_headers_alone() {
        let mut h = Headers::new();
        h.insert("traceparent".into(), "given".into());
        inject(&tracing::Span::none(), &mut h);
        assert_eq!(h["traceparent"], "given");
    }
}

//! Human log lines without the trace-only span attributes.
//!
//! Spans carry OpenTelemetry attributes (`otel.*`, `messaging.*`, `http.*`, `url.*`) for the
//! trace backend; repeated in front of every log line they would drown the message. The human
//! format keeps the span names and Luna's own fields (`luna.job_id`, ...) and drops those.

use std::fmt;

use tracing::field::{Field, Visit};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::FormatFields;
use tracing_subscriber::fmt::format::Writer;

/// Field prefixes that only make sense in a trace backend.
const TRACE_ONLY: [&str; 4] = ["otel.", "messaging.", "http.", "url."];

/// [`FormatFields`] for the human format: `message` first as is, then `name=value` pairs.
#[derive(Debug, Default, Clone, Copy)]
pub struct HumanFields;

impl<'w> FormatFields<'w> for HumanFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'w>, fields: R) -> fmt::Result {
        let mut visitor = Visitor {
            writer,
            first: true,
            result: Ok(()),
        };
        fields.record(&mut visitor);
        visitor.result
    }
}

struct Visitor<'w> {
    writer: Writer<'w>,
    first: bool,
    result: fmt::Result,
}

impl Visit for Visitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.record_debug(field, &format_args!("{value}"));
        } else {
            self.record_debug(field, &value);
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let name = field.name();
        if self.result.is_err() || TRACE_ONLY.iter().any(|p| name.starts_with(p)) {
            return;
        }
        let space = if self.first { "" } else { " " };
        self.first = false;
        self.result = if name == "message" {
            write!(self.writer, "{space}{value:?}")
        } else {
            write!(self.writer, "{space}{name}={value:?}")
        };
    }
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0
                .lock()
                .map_err(|_| io::ErrorKind::Other)?
                .extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn trace_only_fields_are_left_out_of_log_lines() {
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .fmt_fields(HumanFields)
            .with_ansi(false)
            .without_time()
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!(
                "process",
                otel.kind = "consumer",
                messaging.system = "rabbitmq",
                luna.job_id = "j1",
            );
            let _entered = span.enter();
            tracing::info!(attempt = 2, "saved {}", "a.png");
        });
        let text = String::from_utf8(buffer.0.lock().expect("lock").clone()).expect("utf-8");
        assert!(text.contains("process{luna.job_id=\"j1\"}:"), "{text}");
        assert!(text.contains("saved a.png attempt=2"), "{text}");
        assert!(
            !text.contains("otel.kind") && !text.contains("messaging."),
            "{text}"
        );
    }
}

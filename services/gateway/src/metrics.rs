//! The gateway's instruments (see the README's Monitoring section for the exposed names).

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram};

use luna_telemetry::Registry;
use luna_telemetry::metrics::{DURATION_BUCKETS, publish_duration, seconds};

#[derive(Debug)]
pub struct Metrics {
    request_duration: Histogram<f64>,
    jobs_accepted: Counter<u64>,
    tasks_published: Counter<u64>,
    publish_duration: Histogram<f64>,
}

impl Metrics {
    pub fn new(registry: &Registry) -> Self {
        let meter = registry.meter();
        Self {
            request_duration: meter
                .f64_histogram("luna.gateway.request.duration")
                .with_description("Time to answer POST /v1/jobs, by HTTP status.")
                .with_unit("s")
                .with_boundaries(DURATION_BUCKETS.to_vec())
                .build(),
            jobs_accepted: meter
                .u64_counter("luna.jobs.accepted")
                .with_description("Save jobs accepted (202).")
                .build(),
            tasks_published: meter
                .u64_counter("luna.tasks.published")
                .with_description("Save tasks published and confirmed by the broker, by format.")
                .build(),
            publish_duration: publish_duration(&meter),
        }
    }

    pub fn request(&self, status: u16, elapsed: std::time::Duration) {
        self.request_duration.record(
            seconds(elapsed),
            &[KeyValue::new("status", i64::from(status))],
        );
    }

    pub fn accepted(&self) {
        self.jobs_accepted.add(1, &[]);
    }

    pub fn published(&self, format: &'static str) {
        self.tasks_published
            .add(1, &[KeyValue::new("format", format)]);
    }

    pub fn publish_took(&self, kind: &'static str, elapsed: std::time::Duration) {
        self.publish_duration
            .record(seconds(elapsed), &[KeyValue::new("kind", kind)]);
    }
}

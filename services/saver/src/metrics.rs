//! The saver's instruments and live state (see the README's Monitoring section for the names).
//!
//! Counters and histograms are OpenTelemetry instruments; the gauges read [`Live`], the atomics
//! the pool updates as it scales, so `/readyz` and `/metrics` agree.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use luna_store::Timings;
use luna_telemetry::Registry;
use luna_telemetry::metrics::{DURATION_BUCKETS, publish_duration, seconds};
use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram, ObservableGauge};

/// What the pool and the slots update as they go.
#[derive(Debug, Default)]
pub struct Live {
    pub slots_active: AtomicU64,
    pub slots_busy: AtomicU64,
    /// Tasks waiting in the queue, as last seen.
    pub queue_depth: AtomicU64,
    /// Messages in the parked queue, as last seen.
    pub parked: AtomicU64,
    /// Slots with a live consumer on the task queue; the saver is ready while this is > 0.
    pub consumers: AtomicU64,
}

impl Live {
    pub fn set(a: &AtomicU64, value: u64) {
        a.store(value, Ordering::Relaxed);
    }

    pub fn get(a: &AtomicU64) -> u64 {
        a.load(Ordering::Relaxed)
    }
}

#[derive(Debug)]
pub struct Metrics {
    pub live: Arc<Live>,
    saved: Counter<u64>,
    rejected: Counter<u64>,
    failed: Counter<u64>,
    retries: Counter<u64>,
    parked: Counter<u64>,
    bytes_written: Counter<u64>,
    encode: Histogram<f64>,
    write: Histogram<f64>,
    quality_gate: Histogram<f64>,
    publish: Histogram<f64>,
    _gauges: Vec<ObservableGauge<u64>>,
}

impl Metrics {
    pub fn new(registry: &Registry, min_slots: usize, max_slots: usize) -> Self {
        let meter = registry.meter();
        let live = Arc::new(Live::default());
        let gauge = |name: &'static str, help: &'static str, read: fn(&Live) -> u64| {
            let live = live.clone();
            meter
                .u64_observable_gauge(name)
                .with_description(help)
                .with_callback(move |o| o.observe(read(&live), &[]))
                .build()
        };
        let gauges = vec![
            gauge("luna.save_slots.active", "Save slots running now.", |l| {
                Live::get(&l.slots_active)
            }),
            gauge(
                "luna.save_slots.busy",
                "Save slots working on a task now.",
                |l| Live::get(&l.slots_busy),
            ),
            gauge(
                "luna.queue.depth",
                "Tasks waiting in the task queue, as last seen by the saver.",
                |l| Live::get(&l.queue_depth),
            ),
            gauge(
                "luna.queue.parked",
                "Messages in the parked queue, as last seen by the saver.",
                |l| Live::get(&l.parked),
            ),
            gauge(
                "luna.saver.consumers",
                "Save slots consuming from the task queue.",
                |l| Live::get(&l.consumers),
            ),
            {
                let (min, max) = (min_slots as u64, max_slots as u64);
                meter
                    .u64_observable_gauge("luna.save_slots.configured")
                    .with_description(
                        "Configured bounds of the save-slot pool (--min-workers, --max-workers).",
                    )
                    .with_callback(move |o| {
                        o.observe(min, &[KeyValue::new("bound", "min")]);
                        o.observe(max, &[KeyValue::new("bound", "max")]);
                    })
                    .build()
            },
        ];
        let histogram = |name: &'static str, help: &'static str| {
            meter
                .f64_histogram(name)
                .with_description(help)
                .with_unit("s")
                .with_boundaries(DURATION_BUCKETS.to_vec())
                .build()
        };
        let counter = |name: &'static str, help: &'static str| {
            meter.u64_counter(name).with_description(help).build()
        };
        Self {
            saved: counter("luna.images.saved", "Images saved, by format."),
            rejected: counter(
                "luna.images.rejected",
                "Images rejected by a quality gate, by format and gate.",
            ),
            failed: counter(
                "luna.images.failed",
                "Images that failed for good (parked), by format and reason.",
            ),
            retries: counter(
                "luna.save.retries",
                "Transient failures retried, by format.",
            ),
            parked: counter(
                "luna.tasks.parked",
                "Tasks parked by this saver, by reason.",
            ),
            bytes_written: meter
                .u64_counter("luna.bytes.written")
                .with_description(
                    "Bytes of image files written, by format (redeliveries write nothing).",
                )
                .with_unit("By")
                .build(),
            encode: histogram(
                "luna.encode.duration",
                "Time to encode one image, by format.",
            ),
            write: histogram(
                "luna.write.duration",
                "Time to write one image file durably, by format.",
            ),
            quality_gate: histogram(
                "luna.quality_gate.duration",
                "Time to score one image against its quality gate, by gate.",
            ),
            publish: publish_duration(&meter),
            _gauges: gauges,
            live,
        }
    }

    pub fn saved(&self, format: &'static str, bytes_written: u64) {
        let attrs = [KeyValue::new("format", format)];
        self.saved.add(1, &attrs);
        self.bytes_written.add(bytes_written, &attrs);
    }

    /// A rejection; `bytes_written` is the size of the file kept under `_discarded/`, if any.
    pub fn rejected(&self, format: &'static str, gate: &'static str, bytes_written: u64) {
        self.rejected.add(
            1,
            &[KeyValue::new("format", format), KeyValue::new("gate", gate)],
        );
        if bytes_written > 0 {
            self.bytes_written
                .add(bytes_written, &[KeyValue::new("format", format)]);
        }
    }

    pub fn failed(&self, format: &'static str, reason: &'static str) {
        self.failed.add(
            1,
            &[
                KeyValue::new("format", format),
                KeyValue::new("reason", reason),
            ],
        );
    }

    pub fn retried(&self, format: &'static str) {
        self.retries.add(1, &[KeyValue::new("format", format)]);
    }

    pub fn parked(&self, reason: &'static str) {
        self.parked.add(1, &[KeyValue::new("reason", reason)]);
    }

    pub fn timings(&self, format: &'static str, gate: &'static str, t: &Timings) {
        let attrs = [KeyValue::new("format", format)];
        if let Some(d) = t.encode {
            self.encode.record(seconds(d), &attrs);
        }
        if let Some(d) = t.write {
            self.write.record(seconds(d), &attrs);
        }
        if let Some(d) = t.quality_gate {
            self.quality_gate
                .record(seconds(d), &[KeyValue::new("gate", gate)]);
        }
    }

    pub fn event_published(&self, elapsed: Duration) {
        self.publish
            .record(seconds(elapsed), &[KeyValue::new("kind", "event")]);
    }
}

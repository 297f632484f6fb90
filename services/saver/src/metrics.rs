//! Counters and gauges exposed as Prometheus text on `/metrics`.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

/// The saver's numbers. Atomics, so slots update them without locks.
#[derive(Debug, Default)]
pub struct Metrics {
    pub slots_min: u64,
    pub slots_max: u64,
    pub slots_active: AtomicU64,
    pub slots_busy: AtomicU64,
    pub saved: AtomicU64,
    pub rejected: AtomicU64,
    pub failed_final: AtomicU64,
    pub retries: AtomicU64,
    pub parked: AtomicU64,
    pub bytes_written: AtomicU64,
    pub queue_depth: AtomicU64,
    /// Slots with a live consumer on the task queue; the saver is ready while this is > 0.
    pub consumers: AtomicU64,
}

impl Metrics {
    pub fn new(min: usize, max: usize) -> Self {
        Self {
            slots_min: min as u64,
            slots_max: max as u64,
            ..Self::default()
        }
    }

    /// Prometheus text exposition format.
    pub fn render(&self) -> String {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let rows: [(&str, &str, &str, u64); 12] = [
            (
                "luna_saver_slots_min",
                "gauge",
                "Configured minimum save slots.",
                self.slots_min,
            ),
            (
                "luna_saver_slots_max",
                "gauge",
                "Configured maximum save slots.",
                self.slots_max,
            ),
            (
                "luna_saver_slots_active",
                "gauge",
                "Save slots running now.",
                get(&self.slots_active),
            ),
            (
                "luna_saver_slots_busy",
                "gauge",
                "Save slots working on a task now.",
                get(&self.slots_busy),
            ),
            (
                "luna_saver_images_saved_total",
                "counter",
                "Images saved.",
                get(&self.saved),
            ),
            (
                "luna_saver_images_rejected_total",
                "counter",
                "Images rejected by a quality gate.",
                get(&self.rejected),
            ),
            (
                "luna_saver_images_failed_total",
                "counter",
                "Images that failed for good.",
                get(&self.failed_final),
            ),
            (
                "luna_saver_retries_total",
                "counter",
                "Transient failures retried.",
                get(&self.retries),
            ),
            (
                "luna_saver_tasks_parked_total",
                "counter",
                "Tasks parked by this saver.",
                get(&self.parked),
            ),
            (
                "luna_saver_bytes_written_total",
                "counter",
                "Bytes of image files written.",
                get(&self.bytes_written),
            ),
            (
                "luna_saver_queue_depth",
                "gauge",
                "Tasks waiting in the queue, as last seen.",
                get(&self.queue_depth),
            ),
            (
                "luna_saver_consumers",
                "gauge",
                "Save slots consuming from the task queue.",
                get(&self.consumers),
            ),
        ];
        let mut out = String::new();
        for (name, kind, help, value) in rows {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        }
        out
    }
}

/// Adds one to a counter.
pub fn inc(a: &AtomicU64) {
    a.fetch_add(1, Ordering::Relaxed);
}

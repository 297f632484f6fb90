//! The status service's instruments: events relayed, WebSocket subscribers, jobs tracked.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use luna_telemetry::Registry;
use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, ObservableGauge};

#[derive(Debug)]
pub struct Metrics {
    relayed: Counter<u64>,
    subscribers: Arc<AtomicI64>,
    _gauges: Vec<ObservableGauge<i64>>,
}

impl Metrics {
    /// `jobs` reports how many jobs the table holds; it is read at each collection.
    pub fn new(registry: &Registry, jobs: impl Fn() -> usize + Send + Sync + 'static) -> Self {
        let meter = registry.meter();
        let subscribers = Arc::new(AtomicI64::new(0));
        let gauges = vec![
            {
                let subscribers = subscribers.clone();
                meter
                    .i64_observable_gauge("luna.ws.subscribers")
                    .with_description("WebSocket clients connected now.")
                    .with_callback(move |o| o.observe(subscribers.load(Ordering::Relaxed), &[]))
                    .build()
            },
            meter
                .i64_observable_gauge("luna.status.jobs.tracked")
                .with_description("Jobs the status service holds (until --job-ttl or --max-jobs).")
                .with_callback(move |o| o.observe(i64::try_from(jobs()).unwrap_or(i64::MAX), &[]))
                .build(),
        ];
        Self {
            relayed: meter
                .u64_counter("luna.events.relayed")
                .with_description("Events received from the broker and relayed, by type.")
                .build(),
            subscribers,
            _gauges: gauges,
        }
    }

    pub fn relayed(&self, event: &'static str) {
        self.relayed.add(1, &[KeyValue::new("type", event)]);
    }

    /// Counts a WebSocket client for as long as the guard lives.
    pub fn subscriber(&self) -> SubscriberGuard {
        self.subscribers.fetch_add(1, Ordering::Relaxed);
        SubscriberGuard(self.subscribers.clone())
    }
}

/// Decrements the subscriber gauge when the session ends.
#[derive(Debug)]
pub struct SubscriberGuard(Arc<AtomicI64>);

impl Drop for SubscriberGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

//! Fan-out of events to WebSocket subscribers, in front of the [`JobTable`].
//!
//! One lock covers both the table and the subscriber list. Recording an event and handing it
//! to subscribers happen under it, and so does taking a job's replay and registering a new
//! subscriber; a subscriber therefore sees every event of its job exactly once, either in the
//! replay or live, never in both and never in neither.
//!
//! Publishing never waits: each subscriber has a bounded queue, and one that is full is cut
//! off (its `too_slow` token fires) rather than slowing the broker consumer or anyone else.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use luna_job::codec::to_json;
use luna_job::{Event, JobId};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::table::{JobTable, JobView, Recorded};

/// One event as it goes out on the WebSocket: serialised once, shared by every subscriber.
pub type Frame = Arc<str>;

/// The job table plus everyone listening for events.
#[derive(Debug)]
pub struct Hub {
    inner: Mutex<Inner>,
    /// Frames a subscriber may have waiting before it is considered too slow.
    queue_capacity: usize,
}

#[derive(Debug)]
struct Inner {
    table: JobTable,
    subscribers: Vec<Slot>,
}

#[derive(Debug)]
struct Slot {
    /// Only this job's events, or all of them.
    job_id: Option<JobId>,
    tx: mpsc::Sender<Frame>,
    too_slow: CancellationToken,
}

/// A subscriber's end: the replay to send first, then the live queue.
#[derive(Debug)]
pub struct Subscription {
    /// The job's events so far, oldest first (empty without a job filter).
    pub replay: Vec<Frame>,
    pub live: mpsc::Receiver<Frame>,
    /// Fires when the subscriber's queue overflowed; the live queue then ends.
    pub too_slow: CancellationToken,
}

impl Hub {
    pub fn new(table: JobTable, queue_capacity: usize) -> Self {
        Self {
            inner: Mutex::new(Inner {
                table,
                subscribers: Vec::new(),
            }),
            queue_capacity: queue_capacity.max(1),
        }
    }

    /// A panic while holding the lock cannot leave the table half-updated in a way that
    /// matters more than losing the service, so a poisoned lock is simply taken over.
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records `event` and relays it (unless it is an exact duplicate), followed by the job's
    /// `save_job_completed` when this event completed it. Returns that completion, for logging.
    pub fn publish(&self, event: Event, now: Instant) -> Option<Event> {
        self.publish_aged(event, now, Duration::ZERO)
    }

    /// [`publish`](Self::publish) for an event that happened `age` ago (see
    /// [`JobTable::record_aged`]).
    pub fn publish_aged(&self, event: Event, now: Instant, age: Duration) -> Option<Event> {
        let mut inner = self.lock();
        let completed = match inner.table.record_aged(event.clone(), now, age) {
            Recorded::Duplicate => return None,
            Recorded::New { completed } => completed,
        };
        inner.fan_out(&event);
        if let Some(done) = &completed {
            inner.fan_out(done);
        }
        completed
    }

    /// Subscribes to one job (`Some`) or to every job. For one job, the returned replay holds
    /// its events so far and the live queue everything after them.
    pub fn subscribe(&self, job_id: Option<JobId>, now: Instant) -> Subscription {
        let (tx, live) = mpsc::channel(self.queue_capacity);
        let too_slow = CancellationToken::new();
        let replay: Vec<Event> = {
            let mut inner = self.lock();
            let replay = job_id
                .as_ref()
                .and_then(|id| inner.table.events(id, now))
                .map(<[Event]>::to_vec)
                .unwrap_or_default();
            inner.subscribers.push(Slot {
                job_id,
                tx,
                too_slow: too_slow.clone(),
            });
            replay
        };
        let replay = replay.iter().filter_map(frame).collect();
        Subscription {
            replay,
            live,
            too_slow,
        }
    }

    /// The job's state, or `None` when it is unknown or expired.
    pub fn job(&self, id: &JobId, now: Instant) -> Option<JobView> {
        self.lock().table.get(id, now)
    }

    /// Jobs the table holds.
    pub fn job_count(&self) -> usize {
        self.lock().table.len()
    }

    /// Subscribers currently registered (closed ones linger until the next event).
    pub fn subscriber_count(&self) -> usize {
        self.lock().subscribers.len()
    }
}

impl Inner {
    fn fan_out(&mut self, event: &Event) {
        // Rebuilding the table at start-up records many events nobody listens to yet.
        if self.subscribers.is_empty() {
            return;
        }
        let Some(frame) = frame(event) else { return };
        self.subscribers.retain(|slot| {
            if slot.tx.is_closed() {
                return false;
            }
            if slot.job_id.as_ref().is_some_and(|id| *id != event.job_id) {
                return true;
            }
            match slot.tx.try_send(Arc::clone(&frame)) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    slot.too_slow.cancel();
                    false
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            }
        });
    }
}

/// The event as one WebSocket text message.
fn frame(event: &Event) -> Option<Frame> {
    match to_json(event) {
        Ok(json) => Some(Arc::from(json)),
        Err(error) => {
            // Cannot happen for the contract's types (no non-string map keys); skip rather
            // than take the relay down.
            tracing::error!(job_id = %event.job_id, event = event.name(), %error, "cannot encode event as JSON");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use luna_job::EventKind;

    use super::*;

    fn hub(capacity: usize) -> Hub {
        Hub::new(JobTable::new(Duration::from_secs(3600), 100), capacity)
    }

    fn event(job: &str, kind: EventKind) -> Event {
        Event::now(JobId::parse(job).expect("valid id"), kind)
    }

    fn saved(job: &str, index: u32) -> Event {
        event(
            job,
            EventKind::ImageSaved {
                index,
                affix: String::new(),
                format: "png".into(),
                path: format!("{index}.png"),
                bytes: 1,
                width: 1,
                height: 1,
                quality_score: None,
                duration_ms: 1,
                worker: "w".into(),
            },
        )
    }

    fn name(frame: &str) -> String {
        let v: serde_json::Value = serde_json::from_str(frame).expect("json");
        v["event"].as_str().expect("event name").to_owned()
    }

    #[test]
    fn replay_then_live_without_gap_or_duplicate() {
        let hub = hub(16);
        let now = Instant::now();
        let job = JobId::parse("j").expect("valid id");
        hub.publish(event("j", EventKind::SaveJobQueued { num_images: 2 }), now);
        hub.publish(
            event("other", EventKind::SaveJobQueued { num_images: 1 }),
            now,
        );
        hub.publish(saved("j", 0), now);

        let mut sub = hub.subscribe(Some(job), now);
        let replayed: Vec<_> = sub.replay.iter().map(|f| name(f)).collect();
        assert_eq!(replayed, ["save_job_queued", "image_saved"]);

        hub.publish(saved("other", 0), now);
        let done = hub.publish(saved("j", 1), now).expect("completed");
        assert!(matches!(
            done.kind,
            EventKind::SaveJobCompleted { saved: 2, .. }
        ));
        let live: Vec<_> = std::iter::from_fn(|| sub.live.try_recv().ok())
            .map(|f| name(&f))
            .collect();
        assert_eq!(live, ["image_saved", "save_job_completed"]);
    }

    #[test]
    fn unfiltered_subscribers_get_every_live_event_and_no_replay() {
        let hub = hub(16);
        let now = Instant::now();
        hub.publish(event("a", EventKind::SaveJobQueued { num_images: 1 }), now);
        let mut sub = hub.subscribe(None, now);
        assert!(sub.replay.is_empty());
        hub.publish(event("b", EventKind::SaveJobQueued { num_images: 1 }), now);
        hub.publish(saved("a", 0), now);
        let live: Vec<_> = std::iter::from_fn(|| sub.live.try_recv().ok())
            .map(|f| name(&f))
            .collect();
        assert_eq!(
            live,
            ["save_job_queued", "image_saved", "save_job_completed"]
        );
    }

    #[test]
    fn duplicates_are_not_relayed() {
        let hub = hub(16);
        let now = Instant::now();
        let mut sub = hub.subscribe(None, now);
        let e = saved("a", 0);
        hub.publish(e.clone(), now);
        hub.publish(e, now);
        assert!(sub.live.try_recv().is_ok());
        assert!(sub.live.try_recv().is_err());
    }

    #[test]
    fn a_full_subscriber_is_cut_off_without_affecting_others() {
        let hub = hub(2);
        let now = Instant::now();
        let slow = hub.subscribe(None, now);
        let mut fast = hub.subscribe(None, now);
        for i in 0..5 {
            hub.publish(saved("a", i), now);
            assert!(fast.live.try_recv().is_ok(), "the fast subscriber keeps up");
        }
        assert!(slow.too_slow.is_cancelled());
        assert!(!fast.too_slow.is_cancelled());
        assert_eq!(hub.subscriber_count(), 1);
    }

    #[test]
    fn dropped_subscribers_are_removed() {
        let hub = hub(2);
        let now = Instant::now();
        drop(hub.subscribe(None, now));
        hub.publish(saved("a", 0), now);
        assert_eq!(hub.subscriber_count(), 0);
    }
}

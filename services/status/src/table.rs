//! The jobs this instance has heard about: their events (for replay) and what they add up to.
//!
//! Pure bookkeeping: no clock, no I/O. The caller passes `now` (for expiry) with every call, so
//! the tests can move time by hand.
//!
//! Events reach the status service from several publishers (the gateway queues a job, any number
//! of savers report its images), so they arrive in no guaranteed order and, after a redelivery,
//! more than once. The table therefore keeps one outcome per image index (the last *final*
//! outcome wins), counts indices rather than events, and only declares a job complete once it
//! knows how many images the job has, which only `save_job_queued` says.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use luna_job::{Event, EventKind, JobId};
use serde::Serialize;

/// Most events kept per job for replay. A job of 16 images, each retried to the broker's
/// delivery limit, produces under 200; the cap only stops a misbehaving producer from growing
/// one job without bound. Events past it are still relayed live and still counted.
pub const MAX_EVENTS_PER_JOB: usize = 4096;

/// Most distinct image indices tracked per job, for the same reason.
pub const MAX_IMAGES_PER_JOB: usize = 4096;

/// A bounded, expiring table of recent jobs.
///
/// A job expires `ttl` after its last event. When a new job would make the table larger than
/// `max_jobs`, expired jobs go first, then the least recently active ones.
#[derive(Debug)]
pub struct JobTable {
    ttl: Duration,
    max_jobs: usize,
    jobs: HashMap<JobId, Job>,
    /// Job ids by last activity, oldest first. Keyed by a counter rather than by `Instant` so
    /// that ties (several events within one clock tick) still have a definite order.
    by_activity: BTreeMap<u64, JobId>,
    next_seq: u64,
}

#[derive(Debug)]
struct Job {
    id: JobId,
    /// This job's key in `by_activity`.
    seq: u64,
    last_activity: Instant,
    /// From `save_job_queued`; until it arrives the job cannot be complete.
    num_images: Option<u32>,
    /// Timestamp of `save_job_queued`, where `duration_ms` starts.
    queued_at: Option<DateTime<Utc>>,
    /// Earliest timestamp of any event, the fallback start when no queued event was seen.
    first_timestamp: DateTime<Utc>,
    images: BTreeMap<u32, ImageRecord>,
    events: Vec<Event>,
    completion: Option<Completion>,
}

#[derive(Debug, Default)]
struct ImageRecord {
    /// The last final outcome (saved, rejected, or a final failure).
    outcome: Option<Event>,
    /// The last non-final failure, shown while the image is still pending.
    last_attempt: Option<Event>,
    /// Whether any event has been seen for this image (a job with one is "running").
    seen: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Completion {
    saved: u32,
    rejected: u32,
    failed: u32,
    duration_ms: u64,
}

/// What recording one event amounted to.
#[derive(Debug, Clone, PartialEq)]
pub enum Recorded {
    /// An exact copy of an event already recorded (a redelivery): nothing changed, relay nothing.
    Duplicate,
    /// A new event. `completed` is the job's `save_job_completed`, derived by this very event.
    New { completed: Option<Event> },
}

/// Where a job stands, as `GET /v1/jobs/{id}` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Known, but no image has reported yet.
    Queued,
    /// At least one image has reported, not all have a final outcome.
    Running,
    /// `save_job_completed` has been derived (or received).
    Completed,
}

/// A snapshot of one job.
#[derive(Debug, Clone, Serialize)]
pub struct JobView {
    pub job_id: JobId,
    pub state: JobState,
    /// Null until `save_job_queued` has been seen.
    pub num_images: Option<u32>,
    pub saved: u32,
    pub rejected: u32,
    pub failed: u32,
    /// From `save_job_completed`; null before.
    pub duration_ms: Option<u64>,
    /// One entry per image: `index`, `outcome` (`saved`, `rejected`, `failed` or `pending`),
    /// `path` (null unless a file was kept), and the fields of the image's latest event.
    pub images: Vec<serde_json::Value>,
    /// Every event in the order it arrived, including the derived `save_job_completed`.
    pub events: Vec<Event>,
}

impl JobTable {
    /// An empty table. `max_jobs` is at least 1.
    pub fn new(ttl: Duration, max_jobs: usize) -> Self {
        Self {
            ttl,
            max_jobs: max_jobs.max(1),
            jobs: HashMap::new(),
            by_activity: BTreeMap::new(),
            next_seq: 0,
        }
    }

    /// Jobs currently held (expired ones included until something evicts them).
    pub fn len(&self) -> usize {
        self.jobs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty()
    }

    /// Records `event` and says whether it was new and whether it completed its job.
    pub fn record(&mut self, event: Event, now: Instant) -> Recorded {
        self.record_aged(event, now, Duration::ZERO)
    }

    /// [`record`](Self::record) for an event that happened `age` ago: its job's activity is
    /// dated back by that much (never past the TTL). Rebuilding the table from the events
    /// stream after a restart thus forgets the jobs an instance that never stopped would have
    /// forgotten, rather than giving every replayed job a fresh TTL.
    pub fn record_aged(&mut self, event: Event, now: Instant, age: Duration) -> Recorded {
        self.evict_expired(now);
        let activity = now.checked_sub(age.min(self.ttl)).unwrap_or(now);
        let seq = self.next_seq;
        self.next_seq += 1;

        if let Some(job) = self.jobs.get(&event.job_id) {
            self.by_activity.remove(&job.seq);
        }
        let job = self
            .jobs
            .entry(event.job_id.clone())
            .or_insert_with(|| Job {
                id: event.job_id.clone(),
                seq,
                last_activity: activity,
                num_images: None,
                queued_at: None,
                first_timestamp: event.timestamp,
                images: BTreeMap::new(),
                events: Vec::new(),
                completion: None,
            });
        job.seq = seq;
        // Replayed events may come with activity older than the job's last; never go back.
        job.last_activity = job.last_activity.max(activity);
        self.by_activity.insert(seq, event.job_id.clone());

        let recorded = job.apply(event);
        self.evict_over_bound();
        recorded
    }

    /// The job's state, or `None` when it is unknown or expired.
    pub fn get(&self, id: &JobId, now: Instant) -> Option<JobView> {
        self.live(id, now).map(Job::view)
    }

    /// The job's events so far (for replay), or `None` when it is unknown or expired.
    pub fn events(&self, id: &JobId, now: Instant) -> Option<&[Event]> {
        self.live(id, now).map(|job| job.events.as_slice())
    }

    fn live(&self, id: &JobId, now: Instant) -> Option<&Job> {
        self.jobs.get(id).filter(|job| !self.is_expired(job, now))
    }

    fn is_expired(&self, job: &Job, now: Instant) -> bool {
        now.saturating_duration_since(job.last_activity) >= self.ttl
    }

    fn evict_expired(&mut self, now: Instant) {
        // Activity order is expiry order, so stop at the first job still alive.
        while let Some((&seq, id)) = self.by_activity.first_key_value() {
            let expired = self
                .jobs
                .get(id)
                .is_none_or(|job| self.is_expired(job, now));
            if !expired {
                break;
            }
            if let Some(id) = self.by_activity.remove(&seq) {
                self.jobs.remove(&id);
            }
        }
    }

    fn evict_over_bound(&mut self) {
        while self.jobs.len() > self.max_jobs {
            match self.by_activity.pop_first() {
                Some((_, id)) => {
                    self.jobs.remove(&id);
                }
                None => break,
            }
        }
    }
}

impl Job {
    fn apply(&mut self, event: Event) -> Recorded {
        if self.events.contains(&event) {
            return Recorded::Duplicate;
        }
        match &event.kind {
            EventKind::SaveJobQueued { num_images } => {
                // A redelivered queued event repeats the same count; the first one stands.
                if self.num_images.is_none() {
                    self.num_images = Some(*num_images);
                    self.queued_at = Some(event.timestamp);
                }
            }
            EventKind::SaveJobCompleted {
                saved,
                rejected,
                failed,
                duration_ms,
            } => {
                // Another publisher already reported completion. Accept the first report and
                // drop later ones, so subscribers see exactly one completion per job.
                if self.completion.is_some() {
                    return Recorded::Duplicate;
                }
                self.completion = Some(Completion {
                    saved: *saved,
                    rejected: *rejected,
                    failed: *failed,
                    duration_ms: *duration_ms,
                });
            }
            kind => {
                if let Some(index) = kind.image_index() {
                    self.apply_image(index, &event);
                }
            }
        }
        if event.timestamp < self.first_timestamp {
            self.first_timestamp = event.timestamp;
        }
        if self.events.len() < MAX_EVENTS_PER_JOB {
            self.events.push(event);
        }
        let completed = self.try_complete();
        Recorded::New { completed }
    }

    fn apply_image(&mut self, index: u32, event: &Event) {
        if !self.images.contains_key(&index) && self.images.len() >= MAX_IMAGES_PER_JOB {
            return;
        }
        let record = self.images.entry(index).or_default();
        record.seen = true;
        if event.kind.is_final_outcome() {
            record.outcome = Some(event.clone());
        } else {
            record.last_attempt = Some(event.clone());
        }
    }

    /// Counts final outcomes of the images that belong to the job (index below `num_images`).
    fn counts(&self) -> (u32, u32, u32) {
        let (mut saved, mut rejected, mut failed) = (0, 0, 0);
        let belongs = |index: u32| self.num_images.is_none_or(|n| index < n);
        for (_, record) in self.images.iter().filter(|(i, _)| belongs(**i)) {
            match record.outcome.as_ref().map(|e| &e.kind) {
                Some(EventKind::ImageSaved { .. }) => saved += 1,
                Some(EventKind::ImageRejected { .. }) => rejected += 1,
                Some(EventKind::ImageFailed { .. }) => failed += 1,
                _ => {}
            }
        }
        (saved, rejected, failed)
    }

    /// Derives `save_job_completed` the first time every image has a final outcome.
    fn try_complete(&mut self) -> Option<Event> {
        if self.completion.is_some() {
            return None;
        }
        let num_images = self.num_images?;
        let (saved, rejected, failed) = self.counts();
        if u64::from(saved) + u64::from(rejected) + u64::from(failed) < u64::from(num_images) {
            return None;
        }
        let start = self.queued_at.unwrap_or(self.first_timestamp);
        // The job finished when its last image did; that time is in the events themselves, so
        // the result does not depend on when this instance happened to receive them.
        let end = self
            .images
            .range(..num_images)
            .filter_map(|(_, r)| r.outcome.as_ref().map(|e| e.timestamp))
            .max()
            .unwrap_or(start)
            .max(start);
        let duration_ms = u64::try_from((end - start).num_milliseconds()).unwrap_or(0);
        let completion = Completion {
            saved,
            rejected,
            failed,
            duration_ms,
        };
        self.completion = Some(completion);
        let event = Event {
            job_id: self.id.clone(),
            timestamp: end,
            kind: EventKind::SaveJobCompleted {
                saved,
                rejected,
                failed,
                duration_ms,
            },
        };
        self.events.push(event.clone());
        Some(event)
    }

    fn view(&self) -> JobView {
        let (saved, rejected, failed) = self.counts();
        let any_image = self.images.values().any(|r| r.seen);
        let state = if self.completion.is_some() {
            JobState::Completed
        } else if any_image {
            JobState::Running
        } else {
            JobState::Queued
        };
        let listed = self.num_images.map_or(0, |n| {
            n.min(u32::try_from(MAX_IMAGES_PER_JOB).unwrap_or(u32::MAX))
        });
        let mut indices: Vec<u32> = (0..listed).chain(self.images.keys().copied()).collect();
        indices.sort_unstable();
        indices.dedup();
        let images = indices
            .into_iter()
            .map(|index| image_view(index, self.images.get(&index)))
            .collect();
        JobView {
            job_id: self.id.clone(),
            state,
            num_images: self.num_images,
            saved,
            rejected,
            failed,
            duration_ms: self.completion.map(|c| c.duration_ms),
            images,
            events: self.events.clone(),
        }
    }
}

/// One image as JSON: the fields of its latest relevant event, then `index`, `outcome` and
/// `path` on top (so they are always present and never duplicated).
fn image_view(index: u32, record: Option<&ImageRecord>) -> serde_json::Value {
    let latest = record.and_then(|r| r.outcome.as_ref().or(r.last_attempt.as_ref()));
    let mut fields = latest
        .and_then(|e| serde_json::to_value(e).ok())
        .and_then(|v| match v {
            serde_json::Value::Object(map) => Some(map),
            _ => None,
        })
        .unwrap_or_default();
    fields.remove("job_id");
    let (outcome, path) = match record.and_then(|r| r.outcome.as_ref()).map(|e| &e.kind) {
        Some(EventKind::ImageSaved { path, .. }) => ("saved", Some(path.clone())),
        Some(EventKind::ImageRejected { path, .. }) => ("rejected", path.clone()),
        Some(EventKind::ImageFailed { .. }) => ("failed", None),
        _ => ("pending", None),
    };
    fields.insert("index".into(), index.into());
    fields.insert("outcome".into(), outcome.into());
    fields.insert("path".into(), path.into());
    serde_json::Value::Object(fields)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> JobId {
        JobId::parse(s).expect("valid id")
    }

    fn at(ms: i64) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(1_750_000_000_000 + ms).expect("valid time")
    }

    fn ev(job: &str, ms: i64, kind: EventKind) -> Event {
        Event {
            job_id: id(job),
            timestamp: at(ms),
            kind,
        }
    }

    fn queued(job: &str, ms: i64, n: u32) -> Event {
        ev(job, ms, EventKind::SaveJobQueued { num_images: n })
    }

    fn saved(job: &str, ms: i64, index: u32) -> Event {
        ev(
            job,
            ms,
            EventKind::ImageSaved {
                index,
                affix: String::new(),
                format: "png".into(),
                path: format!("out/{index}.png"),
                bytes: 10,
                width: 1,
                height: 1,
                quality_score: None,
                duration_ms: 3,
                worker: "w1".into(),
            },
        )
    }

    fn rejected(job: &str, ms: i64, index: u32) -> Event {
        ev(
            job,
            ms,
            EventKind::ImageRejected {
                index,
                gate: "variance".into(),
                quality_score: 0.1,
                threshold: 0.3,
                path: None,
            },
        )
    }

    fn failed(job: &str, ms: i64, index: u32, attempt: u32, is_final: bool) -> Event {
        ev(
            job,
            ms,
            EventKind::ImageFailed {
                index,
                error: "disk full".into(),
                attempt,
                is_final,
            },
        )
    }

    fn completion(r: Recorded) -> Option<Event> {
        match r {
            Recorded::New { completed } => completed,
            Recorded::Duplicate => panic!("unexpected duplicate"),
        }
    }

    fn table() -> JobTable {
        JobTable::new(Duration::from_secs(3600), 100)
    }

    #[test]
    fn completes_once_when_every_image_has_a_final_outcome() {
        let mut t = table();
        let now = Instant::now();
        assert_eq!(completion(t.record(queued("j", 0, 3), now)), None);
        assert_eq!(completion(t.record(saved("j", 100, 0), now)), None);
        assert_eq!(
            completion(t.record(failed("j", 150, 1, 1, false), now)),
            None
        );
        assert_eq!(completion(t.record(rejected("j", 200, 2), now)), None);
        let view = t.get(&id("j"), now).expect("job");
        assert_eq!(view.state, JobState::Running);
        assert_eq!(view.images[1]["outcome"], "pending");
        assert_eq!(view.images[1]["attempt"], 1);

        let done = completion(t.record(failed("j", 400, 1, 2, true), now)).expect("completed");
        assert_eq!(
            done.kind,
            EventKind::SaveJobCompleted {
                saved: 1,
                rejected: 1,
                failed: 1,
                duration_ms: 400
            }
        );
        assert_eq!(done.timestamp, at(400));

        // A late event for a finished job is recorded but never completes it twice.
        assert_eq!(completion(t.record(saved("j", 500, 1), now)), None);

        let view = t.get(&id("j"), now).expect("job");
        assert_eq!(view.state, JobState::Completed);
        assert_eq!(view.duration_ms, Some(400));
        let names: Vec<_> = view.events.iter().map(Event::name).collect();
        assert_eq!(
            names,
            [
                "save_job_queued",
                "image_saved",
                "image_failed",
                "image_rejected",
                "image_failed",
                "save_job_completed",
                "image_saved"
            ]
        );
        let json = serde_json::to_value(&view).expect("json");
        assert_eq!(json["images"][0]["outcome"], "saved");
        assert_eq!(json["images"][0]["path"], "out/0.png");
        assert_eq!(json["images"][0]["worker"], "w1");
        assert_eq!(json["images"][2]["outcome"], "rejected");
        assert_eq!(json["images"][2]["path"], serde_json::Value::Null);
        assert!(json["images"][0].get("job_id").is_none());
    }

    #[test]
    fn outcomes_before_the_queued_event_wait_for_it() {
        let mut t = table();
        let now = Instant::now();
        assert_eq!(completion(t.record(saved("j", 50, 1), now)), None);
        assert_eq!(completion(t.record(saved("j", 60, 0), now)), None);
        let view = t.get(&id("j"), now).expect("job");
        assert_eq!(
            (view.state, view.num_images, view.saved),
            (JobState::Running, None, 2)
        );

        let done = completion(t.record(queued("j", 10, 2), now)).expect("completed");
        assert_eq!(
            done.kind,
            EventKind::SaveJobCompleted {
                saved: 2,
                rejected: 0,
                failed: 0,
                duration_ms: 50
            }
        );
    }

    #[test]
    fn duration_never_goes_negative_under_clock_skew() {
        let mut t = table();
        let now = Instant::now();
        t.record(saved("j", 0, 0), now);
        let done = completion(t.record(queued("j", 30, 1), now)).expect("completed");
        // The queued event is later than the image here (clock skew between publishers); the
        // duration is clamped to zero rather than going negative.
        assert!(matches!(
            done.kind,
            EventKind::SaveJobCompleted { duration_ms: 0, .. }
        ));
    }

    #[test]
    fn redeliveries_do_not_double_count() {
        let mut t = table();
        let now = Instant::now();
        t.record(queued("j", 0, 3), now);
        t.record(saved("j", 10, 0), now);
        assert_eq!(t.record(saved("j", 10, 0), now), Recorded::Duplicate);
        assert_eq!(t.record(queued("j", 0, 3), now), Recorded::Duplicate);
        // Same image reported again by a redelivered task (new timestamp): still one image.
        assert_eq!(completion(t.record(saved("j", 20, 0), now)), None);
        assert_eq!(completion(t.record(rejected("j", 30, 1), now)), None);
        let view = t.get(&id("j"), now).expect("job");
        assert_eq!((view.saved, view.rejected, view.failed), (1, 1, 0));
        // Last final outcome per index wins.
        assert_eq!(completion(t.record(failed("j", 40, 1, 3, true), now)), None);
        let view = t.get(&id("j"), now).expect("job");
        assert_eq!((view.saved, view.rejected, view.failed), (1, 0, 1));
        let done = completion(t.record(saved("j", 50, 2), now)).expect("completed");
        assert!(matches!(
            done.kind,
            EventKind::SaveJobCompleted {
                saved: 2,
                rejected: 0,
                failed: 1,
                ..
            }
        ));
    }

    #[test]
    fn a_non_final_failure_does_not_settle_or_unsettle_an_image() {
        let mut t = table();
        let now = Instant::now();
        t.record(queued("j", 0, 1), now);
        assert_eq!(completion(t.record(failed("j", 5, 0, 1, false), now)), None);
        assert!(completion(t.record(saved("j", 10, 0), now)).is_some());
        t.record(failed("j", 15, 0, 2, false), now);
        let view = t.get(&id("j"), now).expect("job");
        assert_eq!(view.images[0]["outcome"], "saved");
    }

    #[test]
    fn indices_beyond_num_images_are_not_counted() {
        let mut t = table();
        let now = Instant::now();
        t.record(queued("j", 0, 1), now);
        assert_eq!(completion(t.record(saved("j", 5, 7), now)), None);
        assert!(completion(t.record(saved("j", 6, 0), now)).is_some());
    }

    #[test]
    fn an_upstream_completion_is_relayed_once_and_stops_derivation() {
        let mut t = table();
        let now = Instant::now();
        t.record(queued("j", 0, 1), now);
        let upstream = ev(
            "j",
            9,
            EventKind::SaveJobCompleted {
                saved: 1,
                rejected: 0,
                failed: 0,
                duration_ms: 9,
            },
        );
        assert_eq!(completion(t.record(upstream.clone(), now)), None);
        assert_eq!(completion(t.record(saved("j", 5, 0), now)), None);
        let mut again = upstream;
        again.timestamp = at(10);
        assert_eq!(t.record(again, now), Recorded::Duplicate);
        assert_eq!(
            t.get(&id("j"), now).expect("job").state,
            JobState::Completed
        );
    }

    #[test]
    fn zero_images_complete_on_the_queued_event() {
        let mut t = table();
        let done = completion(t.record(queued("j", 0, 0), Instant::now())).expect("completed");
        assert!(matches!(
            done.kind,
            EventKind::SaveJobCompleted {
                saved: 0,
                rejected: 0,
                failed: 0,
                duration_ms: 0
            }
        ));
    }

    #[test]
    fn jobs_expire_after_their_last_activity() {
        let ttl = Duration::from_secs(60);
        let mut t = JobTable::new(ttl, 100);
        let t0 = Instant::now();
        t.record(queued("old", 0, 1), t0);
        t.record(queued("busy", 0, 2), t0);
        t.record(saved("busy", 1, 0), t0 + Duration::from_secs(50));

        let later = t0 + Duration::from_secs(61);
        assert!(
            t.get(&id("old"), later).is_none(),
            "expired jobs are hidden"
        );
        assert!(t.events(&id("old"), later).is_none());
        assert!(t.get(&id("busy"), later).is_some(), "activity renews a job");

        t.record(queued("new", 0, 1), later);
        assert_eq!(t.len(), 2, "recording evicts expired jobs");
        assert!(t.get(&id("busy"), t0 + Duration::from_secs(110)).is_none());
    }

    #[test]
    fn replayed_events_keep_their_age() {
        let ttl = Duration::from_secs(60);
        let mut t = JobTable::new(ttl, 100);
        let now = Instant::now();
        // Finished long ago: forgotten at once, as a running instance would have by now.
        t.record_aged(queued("old", 0, 1), now, Duration::from_secs(3600));
        t.record_aged(saved("old", 1, 0), now, Duration::from_secs(3600));
        assert!(t.get(&id("old"), now).is_none());
        // Last active 50 s ago: kept for the 10 s of TTL it has left.
        t.record_aged(queued("recent", 0, 1), now, Duration::from_secs(55));
        t.record_aged(saved("recent", 1, 0), now, Duration::from_secs(50));
        let view = t.get(&id("recent"), now).expect("still live");
        assert_eq!(view.state, JobState::Completed);
        assert!(t.get(&id("recent"), now + Duration::from_secs(9)).is_some());
        assert!(
            t.get(&id("recent"), now + Duration::from_secs(10))
                .is_none()
        );
        // An older event arriving late does not age a job that was active since.
        t.record_aged(saved("recent", 2, 0), now, Duration::from_secs(3600));
        assert!(t.get(&id("recent"), now + Duration::from_secs(9)).is_some());
    }

    #[test]
    fn the_least_recently_active_job_goes_when_over_the_bound() {
        let mut t = JobTable::new(Duration::from_secs(3600), 2);
        let now = Instant::now();
        t.record(queued("a", 0, 1), now);
        t.record(queued("b", 0, 1), now);
        t.record(queued("a", 1, 2), now); // a is now more recent than b
        t.record(queued("c", 0, 1), now);
        assert_eq!(t.len(), 2);
        assert!(t.get(&id("b"), now).is_none());
        assert!(t.get(&id("a"), now).is_some());
        assert!(t.get(&id("c"), now).is_some());
    }

    #[test]
    fn expired_jobs_are_evicted_before_live_ones() {
        let mut t = JobTable::new(Duration::from_secs(10), 2);
        let t0 = Instant::now();
        t.record(queued("a", 0, 1), t0);
        t.record(queued("b", 0, 1), t0 + Duration::from_secs(5));
        t.record(queued("c", 0, 1), t0 + Duration::from_secs(11));
        assert_eq!(t.len(), 2);
        assert!(t.get(&id("b"), t0 + Duration::from_secs(11)).is_some());
    }

    #[test]
    fn pending_images_are_listed_until_they_report() {
        let mut t = table();
        let now = Instant::now();
        t.record(queued("j", 0, 3), now);
        let view = t.get(&id("j"), now).expect("job");
        assert_eq!(view.state, JobState::Queued);
        let outcomes: Vec<_> = view.images.iter().map(|i| i["outcome"].clone()).collect();
        assert_eq!(outcomes, ["pending", "pending", "pending"]);
        assert_eq!(view.images[2]["index"], 2);
    }
}

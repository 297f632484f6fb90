//! What to do with a delivery, decided by pure functions the worker follows: [`admit`] before
//! any work, [`settle`] after each attempt.
//!
//! # Preemption and poison
//! A saver that dies (SIGKILL, a spot instance taken back, OOM) leaves its tasks unacknowledged
//! and RabbitMQ hands them out again with a higher `x-delivery-count`. That count says little:
//! one death can raise it by several (the task returns, is handed to another slot of the same
//! dying connection, returns again), and it cannot tell a task that *crashes* savers from a
//! healthy one whose savers kept being killed under it. So the broker's count never parks a
//! task here. Instead:
//! - a task the broker hands out again is published anew with our own count of started,
//!   unfinished attempts ([`DELIVERIES_HEADER`], one more than before) and the old copy is
//!   acknowledged once the new one is confirmed ([`Admission::Republish`]); RabbitMQ's count
//!   starts over, so its `x-delivery-limit` stays a safety net for tasks that kill savers
//!   before they are even decoded;
//! - a task with earlier unfinished attempts runs in a child process of its own
//!   ([`Admission::Isolated`]): if that child dies, the task itself killed it, and it is
//!   parked at once with the signal as its reason; if the saver around it is killed again, it
//!   simply comes back once more;
//! - only after [`Policy::max_deliveries`] unfinished attempts is it parked whatever the cause.

use std::time::Duration;

/// The limits settling follows (from the saver's flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Attempts at a transient failure (local retries plus earlier deliveries) before parking.
    pub max_attempts: u32,
    /// Earlier deliveries after which a task runs isolated in a child process.
    pub isolate_after: u32,
    /// Earlier deliveries after which a task is parked whatever the reason, below RabbitMQ's
    /// own `x-delivery-limit`, so a parked task always carries a reason of ours.
    pub max_deliveries: u32,
    /// Wait before the first local retry; doubles per attempt, capped at 30 s.
    pub retry_backoff: Duration,
}

impl Policy {
    /// Backoff before retry number `attempt` (1-based): base x 2^(attempt-1), capped at 30 s.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let factor = 1u32
            .checked_shl(attempt.saturating_sub(1).min(16))
            .unwrap_or(u32::MAX);
        self.retry_backoff
            .saturating_mul(factor)
            .min(Duration::from_secs(30))
    }
}

/// Header carrying how many attempts at a task started and never finished.
pub const DELIVERIES_HEADER: &str = "x-luna-deliveries";

/// `delay` with jitter: somewhere between all of it and one and a half times it, `unit` (in
/// `0..1`) choosing where, so savers that failed together do not all retry at the same instant,
/// and the retries of a task never span less time than the schedule promises.
pub fn jittered(delay: Duration, unit: f64) -> Duration {
    delay.mul_f64(1.0 + 0.5 * unit.clamp(0.0, 1.0))
}

/// A uniform value in `0..1` for [`jittered`].
pub fn random_unit() -> f64 {
    (uuid::Uuid::new_v4().as_u128() >> 75) as f64 / (1u64 << 53) as f64
}

/// How a delivery is run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Not here: publish it anew with `deliveries` in [`DELIVERIES_HEADER`], then acknowledge
    /// this copy (the broker redelivered it: a saver holding it stopped).
    Republish { deliveries: u32 },
    /// In this process: a first delivery.
    InProcess,
    /// In a child process: the task was handed out before and its saver never finished it.
    Isolated,
    /// Not at all: it was handed out too often without an outcome.
    GiveUp { reason: String },
}

/// Decides how to run a delivery with `previous` unfinished attempts before it (from
/// [`DELIVERIES_HEADER`]), which the broker `redelivered` or not.
pub fn admit(previous: u32, redelivered: bool, policy: &Policy) -> Admission {
    if redelivered {
        Admission::Republish {
            deliveries: previous.saturating_add(1),
        }
    } else if previous >= policy.max_deliveries {
        Admission::GiveUp {
            reason: format!(
                "gave up after {previous} deliveries without an outcome (each time the saver \
                 holding it stopped before finishing)"
            ),
        }
    } else if previous >= policy.isolate_after {
        Admission::Isolated
    } else {
        Admission::InProcess
    }
}

/// What one attempt at a delivery came to.
#[derive(Debug, Clone, PartialEq)]
pub enum Attempt<'a> {
    /// The body is not a task.
    Undecodable { reason: &'a str },
    /// The task fails validation.
    Invalid { reason: &'a str },
    /// Saved or rejected durably; `confirmed` when its event was confirmed by the broker.
    Done { confirmed: bool },
    /// Saving failed.
    Failed {
        transient: bool,
        kind: &'static str,
        reason: &'a str,
    },
    /// The code saving it died: a panic in this process, or the isolated child ended without
    /// an answer (`isolated`).
    Crashed { isolated: bool, detail: &'a str },
}

/// How a delivery is settled.
#[derive(Debug, Clone, PartialEq)]
pub enum Settle {
    /// Done: acknowledge.
    Ack,
    /// Try again here after the pause; the failure is reported as not final.
    RetryAfter(Duration),
    /// Give it back to the broker after a pause (nothing final is known: the file may be
    /// written, but its event is not confirmed, or this process caught a crash).
    Requeue,
    /// Move it to the parked queue with the reason; the failure is reported as final.
    Park { reason: String, kind: &'static str },
}

/// Decides what follows attempt number `attempt` (1-based, counting earlier deliveries).
pub fn settle(outcome: &Attempt<'_>, attempt: u32, policy: &Policy) -> Settle {
    let park = |reason: String, kind| Settle::Park { reason, kind };
    match *outcome {
        Attempt::Undecodable { reason } => {
            park(format!("undecodable task: {reason}"), "undecodable")
        }
        Attempt::Invalid { reason } => park(format!("invalid task: {reason}"), "invalid"),
        Attempt::Done { confirmed: true } => Settle::Ack,
        Attempt::Done { confirmed: false } => Settle::Requeue,
        Attempt::Failed {
            transient: true,
            reason: _,
            kind: _,
        } if attempt < policy.max_attempts => Settle::RetryAfter(policy.backoff(attempt)),
        Attempt::Failed { kind, reason, .. } => park(reason.to_owned(), kind),
        Attempt::Crashed {
            isolated: true,
            detail,
        } => park(
            format!("saving it crashed an isolated saver process ({detail})"),
            "crashed",
        ),
        Attempt::Crashed {
            isolated: false, ..
        } => Settle::Requeue,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: Policy = Policy {
        max_attempts: 5,
        isolate_after: 1,
        max_deliveries: 9,
        retry_backoff: Duration::from_secs(1),
    };

    #[test]
    fn first_deliveries_run_here_redeliveries_come_back_counted_and_isolated() {
        assert_eq!(admit(0, false, &POLICY), Admission::InProcess);
        assert_eq!(
            admit(0, true, &POLICY),
            Admission::Republish { deliveries: 1 }
        );
        for previous in 1..9 {
            assert_eq!(
                admit(previous, false, &POLICY),
                Admission::Isolated,
                "{previous}"
            );
        }
        assert!(
            matches!(admit(9, false, &POLICY), Admission::GiveUp { reason } if reason.contains("9 deliveries"))
        );
    }

    #[test]
    fn a_healthy_task_on_savers_that_keep_dying_is_never_parked_before_the_limit() {
        // Each preemption: the broker redelivers (however often it counts), the task is
        // republished with one more unfinished attempt, then run isolated on the fresh copy.
        let mut previous = 0;
        for kill in 1..=POLICY.max_deliveries {
            match admit(previous, true, &POLICY) {
                Admission::Republish { deliveries } => previous = deliveries,
                other => panic!("kill {kill}: {other:?}"),
            }
            assert_eq!(previous, kill);
            if kill < POLICY.max_deliveries {
                assert_eq!(admit(previous, false, &POLICY), Admission::Isolated);
            }
        }
        assert!(matches!(
            admit(previous, false, &POLICY),
            Admission::GiveUp { .. }
        ));
    }

    #[test]
    fn a_task_that_crashes_its_isolated_process_is_parked_with_the_reason() {
        let crash = Attempt::Crashed {
            isolated: true,
            detail: "killed by signal 11",
        };
        assert_eq!(
            settle(&crash, 2, &POLICY),
            Settle::Park {
                reason: "saving it crashed an isolated saver process (killed by signal 11)".into(),
                kind: "crashed"
            }
        );
        let here = Attempt::Crashed {
            isolated: false,
            detail: "panicked",
        };
        assert_eq!(settle(&here, 1, &POLICY), Settle::Requeue);
    }

    #[test]
    fn transient_failures_back_off_then_park_bad_tasks_park_at_once() {
        let disk_full = Attempt::Failed {
            transient: true,
            kind: "storage",
            reason: "no space left",
        };
        assert_eq!(
            settle(&disk_full, 1, &POLICY),
            Settle::RetryAfter(Duration::from_secs(1))
        );
        assert_eq!(
            settle(&disk_full, 3, &POLICY),
            Settle::RetryAfter(Duration::from_secs(4))
        );
        assert_eq!(
            settle(&disk_full, 5, &POLICY),
            Settle::Park {
                reason: "no space left".into(),
                kind: "storage"
            }
        );
        let symlink = Attempt::Failed {
            transient: false,
            kind: "storage",
            reason: "a/b is a symbolic link",
        };
        assert!(matches!(settle(&symlink, 1, &POLICY), Settle::Park { .. }));
        assert!(matches!(
            settle(&Attempt::Undecodable { reason: "x" }, 1, &POLICY),
            Settle::Park {
                kind: "undecodable",
                ..
            }
        ));
        assert!(matches!(
            settle(&Attempt::Invalid { reason: "x" }, 1, &POLICY),
            Settle::Park {
                kind: "invalid",
                ..
            }
        ));
    }

    #[test]
    fn only_a_confirmed_outcome_is_acknowledged() {
        assert_eq!(
            settle(&Attempt::Done { confirmed: true }, 1, &POLICY),
            Settle::Ack
        );
        assert_eq!(
            settle(&Attempt::Done { confirmed: false }, 1, &POLICY),
            Settle::Requeue
        );
    }

    #[test]
    fn jitter_keeps_between_all_and_one_and_a_half_times_the_delay() {
        let d = Duration::from_secs(8);
        assert_eq!(jittered(d, 0.0), d);
        assert_eq!(jittered(d, 1.0), Duration::from_secs(12));
        assert_eq!(jittered(d, 7.0), Duration::from_secs(12));
        for _ in 0..1000 {
            let u = random_unit();
            assert!((0.0..1.0).contains(&u), "{u}");
        }
    }

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(POLICY.backoff(1), Duration::from_secs(1));
        assert_eq!(POLICY.backoff(2), Duration::from_secs(2));
        assert_eq!(POLICY.backoff(40), Duration::from_secs(30));
    }
}

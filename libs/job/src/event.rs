//! What gateways and savers report about a job, relayed by the status service.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::id::JobId;

/// One status event: a job id, a time, and what happened.
///
/// On the wire it is a flat object (`{"event": "image_saved", "job_id": ..., "timestamp": ...,
/// "index": ...}`), in MessagePack on the broker and in JSON on the WebSocket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub job_id: JobId,
    /// RFC 3339, UTC.
    pub timestamp: DateTime<Utc>,
    #[serde(flatten)]
    pub kind: EventKind,
}

/// The event-specific fields; the tag is the event name and the broker routing key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum EventKind {
    SaveJobQueued {
        num_images: u32,
    },
    ImageSaved {
        index: u32,
        affix: String,
        format: String,
        /// Relative to the output root, `/`-separated.
        path: String,
        bytes: u64,
        width: u32,
        height: u32,
        /// Null when no gate ran.
        quality_score: Option<f64>,
        duration_ms: u64,
        /// Unique per saver process.
        worker: String,
    },
    ImageRejected {
        index: u32,
        gate: String,
        quality_score: f64,
        threshold: f64,
        /// Where the rejected image was kept; null when `keep_rejected` is false.
        path: Option<String>,
    },
    ImageFailed {
        index: u32,
        error: String,
        attempt: u32,
        /// True once the task will not be tried again.
        #[serde(rename = "final")]
        is_final: bool,
    },
    SaveJobCompleted {
        saved: u32,
        rejected: u32,
        failed: u32,
        duration_ms: u64,
    },
}

impl EventKind {
    /// The event's name: its `event` field and its routing key.
    pub fn name(&self) -> &'static str {
        match self {
            Self::SaveJobQueued { .. } => "save_job_queued",
            Self::ImageSaved { .. } => "image_saved",
            Self::ImageRejected { .. } => "image_rejected",
            Self::ImageFailed { .. } => "image_failed",
            Self::SaveJobCompleted { .. } => "save_job_completed",
        }
    }

    /// The image this event is about, if any.
    pub fn image_index(&self) -> Option<u32> {
        match self {
            Self::ImageSaved { index, .. }
            | Self::ImageRejected { index, .. }
            | Self::ImageFailed { index, .. } => Some(*index),
            Self::SaveJobQueued { .. } | Self::SaveJobCompleted { .. } => None,
        }
    }

    /// True when this event settles its image for good.
    pub fn is_final_outcome(&self) -> bool {
        match self {
            Self::ImageSaved { .. } | Self::ImageRejected { .. } => true,
            Self::ImageFailed { is_final, .. } => *is_final,
            Self::SaveJobQueued { .. } | Self::SaveJobCompleted { .. } => false,
        }
    }
}

impl Event {
    /// An event stamped now.
    pub fn now(job_id: JobId, kind: EventKind) -> Self {
        Self {
            job_id,
            timestamp: Utc::now(),
            kind,
        }
    }

    pub fn name(&self) -> &'static str {
        self.kind.name()
    }
}

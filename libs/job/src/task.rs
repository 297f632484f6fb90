//! One image of a job, as queued for a saver.

use chrono::{DateTime, FixedOffset};
use serde::{Deserialize, Serialize};

use crate::id::JobId;
use crate::request::{ImageInput, SaveOptions, SaveRequest};

/// The unit of work: one image plus everything needed to save it without asking anyone.
///
/// A task is self-contained so that any saver on any machine can take it, and deterministic so
/// that a redelivered task renders the same file name: the time used by `%time:...%` is the
/// job's submission time, carried here with the gateway's UTC offset, never the save time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SaveTask {
    /// [`crate::SCHEMA_VERSION`] of the producer.
    pub schema_version: u32,
    pub job_id: JobId,
    /// Position of this image in the job, from 0; the `index` of its events.
    pub image_index: u32,
    /// How many images the job has, so status can tell when a job is complete.
    pub num_images: u32,
    /// When the gateway accepted the job, with its UTC offset.
    pub submitted_at: DateTime<FixedOffset>,
    pub options: SaveOptions,
    pub image: ImageInput,
    /// True when the job came with an `Idempotency-Key`, so a retry may bring the same job id
    /// with a later `submitted_at`: savers then render names from the job's first submission
    /// time, which the store records when it first sees the job. Absent means false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub idempotent: bool,
}

/// Identifies a task across redeliveries: the same job and image always mean the same file.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TaskKey {
    pub job_id: JobId,
    pub image_index: u32,
}

impl std::fmt::Display for TaskKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.job_id, self.image_index)
    }
}

impl SaveTask {
    pub fn key(&self) -> TaskKey {
        TaskKey {
            job_id: self.job_id.clone(),
            image_index: self.image_index,
        }
    }
}

impl SaveRequest {
    /// Splits a validated request into one task per image.
    ///
    /// `custom_metadata` given as a JSON string is parsed here, once, so savers and other
    /// consumers always see an object. Call [`SaveRequest::validate`] first: a string that does
    /// not hold an object is dropped here rather than reported.
    pub fn into_tasks(self, job_id: &JobId, submitted_at: DateTime<FixedOffset>) -> Vec<SaveTask> {
        let (mut options, images) = self.into_parts();
        options.custom_metadata = options
            .custom_metadata_object()
            .ok()
            .flatten()
            .map(serde_json::Value::Object);
        let num_images = u32::try_from(images.len()).unwrap_or(u32::MAX);
        images
            .into_iter()
            .zip(0u32..)
            .map(|(image, image_index)| SaveTask {
                schema_version: crate::SCHEMA_VERSION,
                job_id: job_id.clone(),
                image_index,
                num_images,
                submitted_at,
                options: options.clone(),
                image,
                idempotent: false,
            })
            .collect()
    }
}

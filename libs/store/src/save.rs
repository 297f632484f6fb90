//! One task end to end: validate, place, gate, encode, store.
//!
//! Each step runs in its own `tracing` span (`quality_gate`, `encode`, `write`), children of
//! whatever span the caller is in, and its duration is reported in [`Timings`].

use std::time::{Duration, Instant};

use tracing::field::Empty;

use luna_imaging::gate::{self, Verdict};
use luna_imaging::{EncodeError, EncodeOptions, ImageView, Metadata, ShapeError};
use luna_job::{QualityGate, SaveTask, ValidationError};

use crate::blob::{BlobError, BlobStore};
use crate::placement::{Placement, PlacementError};
use crate::{Store, StoreError, Stored};

/// What became of a task.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The image passed its gate (or had none) and was stored.
    Saved {
        stored: Stored,
        quality_score: Option<f64>,
    },
    /// The gate rejected it; with `keep_rejected` it was stored under `_discarded/`.
    Rejected {
        gate: QualityGate,
        score: f64,
        threshold: f64,
        stored: Option<Stored>,
    },
}

/// Why a task was not saved.
#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    #[error("invalid task: {0}")]
    Invalid(#[from] ValidationError),
    #[error("invalid placement: {0}")]
    Placement(#[from] PlacementError),
    #[error("pixels do not match the declared shape")]
    Shape(#[from] ShapeError),
    #[error("encoding failed")]
    Encode(#[from] EncodeError),
    #[error("storing failed")]
    Store(#[from] StoreError),
    #[error("pixels are unavailable")]
    Blob(#[from] BlobError),
    #[error(
        "the task's pixels are in the blob store, but this saver has no blob store configured (--blob-dir)"
    )]
    NoBlobStore,
}

impl SaveError {
    /// A short, low-cardinality class: a metric label and the `error.type` of spans.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Invalid(_) => "invalid",
            Self::Placement(_) => "placement",
            Self::Shape(_) => "shape",
            Self::Encode(_) => "encode",
            Self::Store(_) => "storage",
            Self::Blob(_) => "blob",
            Self::NoBlobStore => "no_blob_store",
        }
    }

    /// True when the same task may succeed later (storage trouble); false when retrying cannot
    /// help (the task itself is bad), so it should be parked at once.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Store(e) => e.is_transient(),
            Self::Blob(e) => e.is_transient(),
            Self::Invalid(_)
            | Self::Placement(_)
            | Self::Shape(_)
            | Self::Encode(_)
            | Self::NoBlobStore => false,
        }
    }
}

/// How long each step took; `None` for a step that did not run.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Timings {
    pub quality_gate: Option<Duration>,
    pub encode: Option<Duration>,
    pub write: Option<Duration>,
}

/// Saves one task into `store`, reading claim-checked pixels from `blobs`. Pure CPU and
/// blocking I/O: run it on a blocking thread. The blob itself is left in place; remove it once
/// the outcome is final (see [`BlobStore::remove`]).
///
/// # Errors
/// [`SaveError`]; see [`SaveError::is_transient`] for what to do with it.
pub fn save_task(
    task: &SaveTask,
    store: &dyn Store,
    blobs: Option<&BlobStore>,
) -> Result<Outcome, SaveError> {
    save_task_timed(task, store, blobs, &mut Timings::default())
}

/// [`save_task`], recording each step's duration into `timings`.
///
/// # Errors
/// As [`save_task`].
pub fn save_task_timed(
    task: &SaveTask,
    store: &dyn Store,
    blobs: Option<&BlobStore>,
    timings: &mut Timings,
) -> Result<Outcome, SaveError> {
    task.validate()?;
    let placement = if task.idempotent {
        Placement::for_task_at(
            task,
            store.first_submission(&task.job_id, task.submitted_at)?,
        )?
    } else {
        Placement::for_task(task)?
    };
    let o = &task.options;
    let img = &task.image;
    let fetched;
    let pixels = match &img.blob {
        Some(blob) => {
            fetched = blobs.ok_or(SaveError::NoBlobStore)?.get(blob)?;
            fetched.as_slice()
        }
        None => img.pixels.as_slice(),
    };
    let channels = u8::try_from(img.channels).unwrap_or(0);
    // The view keeps the task's sample type: gates score any type, and `encode` converts to
    // the format's own type when a producer sent another (the gateway already narrows).
    let view = ImageView::with_sample(pixels, img.width, img.height, channels, img.sample)?;

    let verdict = if o.quality_gate == QualityGate::Disabled {
        None
    } else {
        let span = tracing::info_span!(
            "quality_gate",
            luna.gate = o.quality_gate.as_str(),
            luna.quality.threshold = o.min_quality_threshold,
            luna.quality.score = Empty,
            luna.quality.passed = Empty,
        )
        .entered();
        let started = Instant::now();
        let verdict = gate::evaluate(o.quality_gate, &view, o.min_quality_threshold);
        timings.quality_gate = Some(started.elapsed());
        if let Some(v) = &verdict {
            span.record("luna.quality.score", v.score);
            span.record("luna.quality.passed", v.passed);
        }
        verdict
    };
    let rejected = matches!(verdict, Some(Verdict { passed: false, .. }));
    if rejected && !o.keep_rejected {
        let score = verdict.map_or(0.0, |v| v.score);
        return Ok(Outcome::Rejected {
            gate: o.quality_gate,
            score,
            threshold: o.min_quality_threshold,
            stored: None,
        });
    }

    let options = EncodeOptions {
        format: img.format,
        // Validated ranges: 0..=9 and 70..=100.
        png_compression: u8::try_from(o.png_compression).unwrap_or(4),
        lossy_quality: u8::try_from(o.lossy_quality).unwrap_or(90),
        lossless_webp: o.lossless_webp,
        // Validated: 16 or 32.
        exr_precision: luna_imaging::exr::Precision::from_bits(o.exr_precision)
            .unwrap_or(luna_imaging::exr::Precision::Float),
    };
    let encoded = {
        let span = tracing::info_span!(
            "encode",
            luna.image.format = img.format.as_str(),
            luna.image.width = img.width,
            luna.image.height = img.height,
            luna.image.bytes = Empty,
        )
        .entered();
        let started = Instant::now();
        let encoded = luna_imaging::encode(&view, &options, &Metadata::from_task(task));
        timings.encode = Some(started.elapsed());
        let encoded = encoded?;
        span.record("luna.image.bytes", encoded.bytes.len());
        encoded
    };
    let target = if rejected {
        placement.discarded()
    } else {
        placement
    };
    let stored = {
        let span = tracing::info_span!(
            "write",
            luna.image.format = img.format.as_str(),
            luna.path = Empty,
            luna.image.bytes = Empty,
            luna.redelivery = Empty,
        )
        .entered();
        let started = Instant::now();
        let stored = store.put(&task.key(), &target, &encoded);
        timings.write = Some(started.elapsed());
        let stored = stored?;
        span.record("luna.path", stored.path.as_str());
        span.record("luna.image.bytes", stored.bytes);
        span.record("luna.redelivery", stored.already_stored);
        stored
    };
    Ok(match verdict {
        Some(v) if !v.passed => Outcome::Rejected {
            gate: o.quality_gate,
            score: v.score,
            threshold: o.min_quality_threshold,
            stored: Some(stored),
        },
        _ => Outcome::Saved {
            stored,
            quality_score: verdict.map(|v| v.score),
        },
    })
}

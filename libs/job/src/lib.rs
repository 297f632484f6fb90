//! The Luna Saver wire contract.
//!
//! Everything that crosses a process boundary is defined here, and nothing else: the
//! `POST /v1/jobs` body ([`SaveRequest`]), the one-message-per-image work item ([`SaveTask`]),
//! the status [`Event`]s, and their MessagePack (named fields, pixels as `bin`) and JSON
//! (pixels as base64) codecs. Services share this crate and nothing else, so it stays free of
//! async runtimes and broker clients.
//!
//! # Layout
//! - [`id`]: job ids, unique across gateways and restarts.
//! - [`request`]: the save request, its options and images, with the contract's defaults.
//! - [`task`]: one image of a job, as queued for a saver.
//! - [`event`]: what savers and gateways report about a job.
//! - [`validate`]: every problem with a request or task, in words a person understands.
//! - [`codec`]: MessagePack and JSON encoding and decoding that never panics on bad input.

pub mod codec;
pub mod event;
pub mod id;
pub mod pixels;
pub mod request;
pub mod task;
pub mod validate;

pub use codec::DecodeError;
pub use event::{Event, EventKind};
pub use id::JobId;
pub use pixels::Pixels;
pub use request::{
    BlobRef, HandoffRef, ImageFormat, ImageInput, QualityGate, SampleType, SaveOptions, SaveRequest,
};
pub use task::SaveTask;
pub use validate::{Limits, Problem, ValidationError};

/// Version of the task and event schema. Bumped on any change a consumer must know about;
/// consumers park tasks whose version they do not understand instead of guessing.
pub const SCHEMA_VERSION: u32 = 1;

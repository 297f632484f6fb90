//! The body of `POST /v1/jobs`: options shared by a job and up to `max_images` images.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::pixels::Pixels;

/// The `filename` template used when a request does not give one.
pub const DEFAULT_FILENAME: &str = "%time:YYYY_mm_dd.HH.MM.SS%_%model_name%";

/// EXR precision when a request does not give one: full float, so a tensor survives exactly.
pub const DEFAULT_EXR_PRECISION: i64 = 32;

/// Output format of one image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    #[default]
    Png,
    Webp,
    #[serde(alias = "jpg")]
    Jpeg,
    /// 16-bit PNG.
    Png16,
    /// OpenEXR, float samples (`exr_precision` 16 or 32 bits).
    Exr,
    Avif,
}

impl ImageFormat {
    /// File extension, without the dot.
    pub fn extension(self) -> &'static str {
        match self {
            Self::Png => "png",
            Self::Webp => "webp",
            Self::Jpeg => "jpg",
            Self::Png16 => "png",
            Self::Exr => "exr",
            Self::Avif => "avif",
        }
    }

    /// Every format, in the order help texts list them.
    pub const ALL: [Self; 6] = [
        Self::Png,
        Self::Webp,
        Self::Jpeg,
        Self::Png16,
        Self::Exr,
        Self::Avif,
    ];

    /// The sample type the encoder works in: what a task for this format carries, whatever
    /// the client sent.
    pub fn sample_type(self) -> SampleType {
        match self {
            Self::Png16 => SampleType::U16,
            Self::Exr => SampleType::F32,
            Self::Png | Self::Webp | Self::Jpeg | Self::Avif => SampleType::U8,
        }
    }

    /// Name as it appears on the wire and in events.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Png => "png",
            Self::Webp => "webp",
            Self::Jpeg => "jpeg",
            Self::Png16 => "png16",
            Self::Exr => "exr",
            Self::Avif => "avif",
        }
    }

    /// Largest width or height the format can store.
    pub fn max_side(self) -> u32 {
        match self {
            // PNG allows 2^31-1; a single side past 65535 is not an image anyone renders.
            Self::Png => 65_535,
            Self::Webp => 16_383,
            Self::Jpeg => 65_535,
            Self::Png16 => 65_535,
            Self::Exr => 65_535,
            // AV1 allows 65536; past 16384 a frame takes minutes to encode on a saver.
            Self::Avif => 16_384,
        }
    }
}

/// How one sample (one channel of one pixel) is stored in `pixels`.
///
/// Multi-byte samples are little-endian. `u8` spans 0..=255 and `u16` 0..=65535; `f32` is
/// nominally 0.0..=1.0, as a ComfyUI tensor holds it: integer formats clip it (NaN becomes 0),
/// EXR keeps it as it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SampleType {
    #[default]
    U8,
    U16,
    F32,
}

impl SampleType {
    /// Bytes per sample.
    pub fn bytes(self) -> u8 {
        match self {
            Self::U8 => 1,
            Self::U16 => 2,
            Self::F32 => 4,
        }
    }

    /// Name as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::U8 => "u8",
            Self::U16 => "u16",
            Self::F32 => "f32",
        }
    }
}

/// Which quality gate decides whether an image is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QualityGate {
    #[default]
    Disabled,
    Variance,
    EdgeDensity,
    Both,
}

impl QualityGate {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Disabled => "disabled",
            Self::Variance => "variance",
            Self::EdgeDensity => "edge_density",
            Self::Both => "both",
        }
    }
}

/// Everything about a job except its images: where files go, how they are encoded and what is
/// embedded in them. Travels inside every [`crate::SaveTask`] so a saver needs nothing else.
///
/// Integers are wide on purpose: an out-of-range value then reaches [`crate::validate`], which
/// names the allowed range, instead of failing inside the decoder with a type error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SaveOptions {
    /// Directory template, relative to the output root.
    pub save_path: String,
    /// File-stem template.
    pub filename: String,
    /// Model file or path; feeds `%model_name%`, `%model_path%` and `%model_dir%`.
    pub model_name: String,
    /// Value of `%index%`.
    pub index: i64,
    pub quality_gate: QualityGate,
    pub min_quality_threshold: f64,
    /// Write rejected images under `_discarded/` (true) or not at all (false).
    pub keep_rejected: bool,
    /// 0 = stored, 9 = smallest.
    pub png_compression: i64,
    /// JPEG and lossy WebP quality, 70..=100.
    pub lossy_quality: i64,
    pub lossless_webp: bool,
    /// Bits per EXR sample: 16 (half) or 32 (float).
    pub exr_precision: i64,
    /// Embed `prompt`, `extra_pnginfo`, `metadata` and `custom_metadata` in the files.
    pub embed_workflow: bool,
    /// ComfyUI API prompt.
    pub prompt: Option<Value>,
    /// ComfyUI extra info, normally `{"workflow": {...}}`.
    pub extra_pnginfo: Option<Value>,
    /// Generation parameters (seed, steps, cfg, sampler_name, positive, negative, ...).
    pub metadata: Option<Value>,
    /// Extra keys to embed: an object, or a string holding a JSON object.
    pub custom_metadata: Option<Value>,
}

impl Default for SaveOptions {
    fn default() -> Self {
        Self {
            save_path: String::new(),
            filename: DEFAULT_FILENAME.to_owned(),
            model_name: String::new(),
            index: 0,
            quality_gate: QualityGate::Disabled,
            min_quality_threshold: 0.3,
            keep_rejected: true,
            png_compression: 4,
            lossy_quality: 90,
            lossless_webp: false,
            exr_precision: DEFAULT_EXR_PRECISION,
            embed_workflow: true,
            prompt: None,
            extra_pnginfo: None,
            metadata: None,
            custom_metadata: None,
        }
    }
}

impl SaveOptions {
    /// `custom_metadata` as an object, whether it came as one or as a JSON string. An empty
    /// string counts as absent, which is what an untouched text box in ComfyUI sends.
    ///
    /// # Errors
    /// A message for a person when it is neither null, an object, nor a string holding one.
    pub fn custom_metadata_object(&self) -> Result<Option<Map<String, Value>>, String> {
        match &self.custom_metadata {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Object(map)) => Ok(Some(map.clone())),
            Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
            Some(Value::String(s)) => match serde_json::from_str::<Value>(s) {
                Ok(Value::Object(map)) => Ok(Some(map)),
                Ok(other) => Err(format!(
                    "is a string holding JSON {}, but it must hold a JSON object such as {{\"artist\": \"me\"}}",
                    json_kind(&other)
                )),
                Err(e) => Err(format!(
                    "is a string but not valid JSON ({e}); give an object such as {{\"artist\": \"me\"}}"
                )),
            },
            Some(other) => Err(format!(
                "must be an object or a string holding a JSON object, not {}",
                json_kind(other)
            )),
        }
    }
}

/// A JSON value's kind, in words.
pub(crate) fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// One image of a request, as received.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ImageInput {
    /// Row-major samples of type `sample`; `len == width * height * channels * sample bytes`.
    pub pixels: Pixels,
    pub width: u32,
    pub height: u32,
    /// 1 (gray), 3 (RGB) or 4 (RGBA).
    pub channels: u32,
    /// How each sample of `pixels` is stored; 8-bit unless given.
    pub sample: SampleType,
    /// Stem of the file the image came from, for `%source%` (`luna submit` fills it).
    pub source: String,
    /// Appended to the stem (`<stem>_<affix>`) and, with `subdir`, the name of a sub-folder.
    pub affix: String,
    pub format: ImageFormat,
    /// Put the image in a sub-folder named after its affix.
    pub subdir: bool,
    /// Position within a ComfyUI batch; appended to the stem when `batch_size > 1`.
    pub batch_index: Option<i64>,
    pub batch_size: Option<i64>,
    /// Set by the gateway instead of `pixels` when a frame is too large to travel inline: the
    /// pixels wait in the shared blob store (claim check). Clients never set it.
    pub blob: Option<BlobRef>,
    /// Instead of `pixels`: where a client on the gateway's machine left them in the gateway's
    /// hand-off directory (shared memory). The gateway reads them before it answers, so the
    /// client may reuse the segment afterwards; tasks never carry it.
    pub handoff: Option<HandoffRef>,
}

/// Pixels left by a local client in the gateway's hand-off directory (see `GET /v1/handoff`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandoffRef {
    /// File name inside the hand-off directory (no folders).
    pub name: String,
    /// Where this image's samples start in that file; its length follows from the shape.
    #[serde(default)]
    pub offset: u64,
}

/// Where a large frame's pixels wait: a file in the blob store shared by gateways and savers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobRef {
    /// File name inside the blob store (no folders).
    pub name: String,
    /// Hex SHA-256 of the pixel bytes, checked before use.
    pub sha256: String,
    /// Length of the pixel bytes.
    pub len: u64,
}

impl Default for ImageInput {
    fn default() -> Self {
        Self {
            pixels: Pixels::default(),
            width: 0,
            height: 0,
            channels: 3,
            sample: SampleType::U8,
            source: String::new(),
            affix: String::new(),
            format: ImageFormat::Png,
            subdir: true,
            batch_index: None,
            batch_size: None,
            blob: None,
            handoff: None,
        }
    }
}

impl ImageInput {
    /// `width * height * channels * bytes per sample`, without overflow.
    pub fn expected_len(&self) -> u64 {
        u64::from(self.width)
            * u64::from(self.height)
            * u64::from(self.channels)
            * u64::from(self.sample.bytes())
    }

    /// The batch suffix to append to the stem, when the image is one of a batch.
    pub fn batch_suffix(&self) -> Option<i64> {
        match (self.batch_index, self.batch_size) {
            (Some(i), Some(n)) if n > 1 => Some(i),
            _ => None,
        }
    }
}

/// The body of `POST /v1/jobs`.
///
/// Field names and defaults are those of the contract; unknown fields are ignored so newer
/// clients can talk to older gateways.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SaveRequest {
    pub save_path: String,
    pub filename: String,
    pub model_name: String,
    pub index: i64,
    pub quality_gate: QualityGate,
    pub min_quality_threshold: f64,
    pub keep_rejected: bool,
    pub png_compression: i64,
    pub lossy_quality: i64,
    pub lossless_webp: bool,
    pub exr_precision: i64,
    pub embed_workflow: bool,
    pub prompt: Option<Value>,
    pub extra_pnginfo: Option<Value>,
    pub metadata: Option<Value>,
    pub custom_metadata: Option<Value>,
    pub images: Vec<ImageInput>,
}

impl Default for SaveRequest {
    fn default() -> Self {
        Self::from_parts(SaveOptions::default(), Vec::new())
    }
}

impl SaveRequest {
    /// Builds a request from job options and images.
    pub fn from_parts(o: SaveOptions, images: Vec<ImageInput>) -> Self {
        Self {
            save_path: o.save_path,
            filename: o.filename,
            model_name: o.model_name,
            index: o.index,
            quality_gate: o.quality_gate,
            min_quality_threshold: o.min_quality_threshold,
            keep_rejected: o.keep_rejected,
            png_compression: o.png_compression,
            lossy_quality: o.lossy_quality,
            lossless_webp: o.lossless_webp,
            exr_precision: o.exr_precision,
            embed_workflow: o.embed_workflow,
            prompt: o.prompt,
            extra_pnginfo: o.extra_pnginfo,
            metadata: o.metadata,
            custom_metadata: o.custom_metadata,
            images,
        }
    }

    /// The job's options, copied out of the request.
    pub fn options(&self) -> SaveOptions {
        SaveOptions {
            save_path: self.save_path.clone(),
            filename: self.filename.clone(),
            model_name: self.model_name.clone(),
            index: self.index,
            quality_gate: self.quality_gate,
            min_quality_threshold: self.min_quality_threshold,
            keep_rejected: self.keep_rejected,
            png_compression: self.png_compression,
            lossy_quality: self.lossy_quality,
            lossless_webp: self.lossless_webp,
            exr_precision: self.exr_precision,
            embed_workflow: self.embed_workflow,
            prompt: self.prompt.clone(),
            extra_pnginfo: self.extra_pnginfo.clone(),
            metadata: self.metadata.clone(),
            custom_metadata: self.custom_metadata.clone(),
        }
    }

    /// Splits the request into the job's options and its images, without copying pixels.
    pub fn into_parts(mut self) -> (SaveOptions, Vec<ImageInput>) {
        let images = std::mem::take(&mut self.images);
        (self.options(), images)
    }
}

//! Every problem with a request or task, each naming the field, the value and what is allowed.
//!
//! Validation collects all problems instead of stopping at the first, so a client fixes its
//! request in one round trip. Template rendering (absolute paths, `..`) is checked where the
//! templates live, in `luna-imaging` and `luna-store`.

use std::fmt;

use serde_json::Value;

use crate::request::{ImageInput, SaveOptions, SaveRequest, json_kind};
use crate::task::SaveTask;

/// Keys that Luna Saver writes itself; user metadata may not reuse them.
pub const RESERVED_METADATA_KEYS: [&str; 3] = ["prompt", "parameters", "luna_job_id"];

/// Longest template accepted, in bytes.
pub const MAX_TEMPLATE_LEN: usize = 1024;

/// Longest model name accepted, in bytes. The model tokens copy it into the rendered path, once
/// per token, so without a bound a large name is multiplied by the template before any check
/// on the rendered path can refuse it.
pub const MAX_MODEL_NAME_LEN: usize = 1024;

/// Longest affix accepted, in bytes.
pub const MAX_AFFIX_LEN: usize = 128;

/// Longest `source` (a file stem) accepted, in bytes: one path component.
pub const MAX_SOURCE_LEN: usize = 255;

/// Deployment limits that are not part of the data model itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most images in one job.
    pub max_images: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_images: 16 }
    }
}

/// One thing wrong with a field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Path of the field, e.g. `images[2].channels`.
    pub field: String,
    /// What is wrong, with the value and what is allowed.
    pub message: String,
}

impl Problem {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.field, self.message)
    }
}

/// All problems found, in field order.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ValidationError(pub Vec<Problem>);

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

impl ValidationError {
    /// `Ok` when nothing was found.
    pub fn check(problems: Vec<Problem>) -> Result<(), Self> {
        if problems.is_empty() {
            Ok(())
        } else {
            Err(Self(problems))
        }
    }
}

impl SaveRequest {
    /// Checks every field against the contract.
    ///
    /// # Errors
    /// Every problem found, each naming its field.
    pub fn validate(&self, limits: &Limits) -> Result<(), ValidationError> {
        let mut out = Vec::new();
        options_problems(&self.options(), &mut out);
        let images = &self.images;
        if images.is_empty() {
            out.push(Problem::new(
                "images",
                "is empty; a job needs at least one image",
            ));
        } else if images.len() > limits.max_images {
            out.push(Problem::new(
                "images",
                format!(
                    "has {} images; at most {} are allowed per job",
                    images.len(),
                    limits.max_images
                ),
            ));
        }
        for (i, image) in images.iter().enumerate() {
            let field = format!("images[{i}]");
            if image.blob.is_some() {
                out.push(Problem::new(
                    format!("{field}.blob"),
                    "is set by the gateway only; send pixels",
                ));
            }
            image_problems(&field, image, &mut out);
        }
        ValidationError::check(out)
    }
}

impl SaveTask {
    /// Checks a task from any producer before a saver acts on it.
    ///
    /// # Errors
    /// Every problem found; a saver parks such a task with this text as its reason.
    pub fn validate(&self) -> Result<(), ValidationError> {
        let mut out = Vec::new();
        if self.schema_version != crate::SCHEMA_VERSION {
            out.push(Problem::new(
                "schema_version",
                format!(
                    "is {}; this build understands {}",
                    self.schema_version,
                    crate::SCHEMA_VERSION
                ),
            ));
        }
        if self.num_images == 0 || self.image_index >= self.num_images {
            out.push(Problem::new(
                "image_index",
                format!(
                    "is {} of num_images {}; it must be below num_images",
                    self.image_index, self.num_images
                ),
            ));
        }
        options_problems(&self.options, &mut out);
        if self.image.handoff.is_some() {
            out.push(Problem::new(
                "image.handoff",
                "is resolved by the gateway; a task carries pixels or a blob",
            ));
        }
        image_problems("image", &self.image, &mut out);
        ValidationError::check(out)
    }
}

fn options_problems(o: &SaveOptions, out: &mut Vec<Problem>) {
    for (field, value, max) in [
        ("save_path", &o.save_path, MAX_TEMPLATE_LEN),
        ("filename", &o.filename, MAX_TEMPLATE_LEN),
        ("model_name", &o.model_name, MAX_MODEL_NAME_LEN),
    ] {
        if value.len() > max {
            out.push(Problem::new(
                field,
                format!("is {} bytes long; at most {max}", value.len()),
            ));
        }
    }
    if o.filename.trim().is_empty() {
        out.push(Problem::new(
            "filename",
            "is empty; give a template such as \"%time:YYYY-mm-dd%_%model_name%\"",
        ));
    }
    if o.index < 0 {
        out.push(Problem::new(
            "index",
            format!("is {}; it must be 0 or more", o.index),
        ));
    }
    if !(0.0..=1.0).contains(&o.min_quality_threshold) {
        out.push(Problem::new(
            "min_quality_threshold",
            format!("is {}; allowed 0.0 to 1.0", o.min_quality_threshold),
        ));
    }
    if !(0..=9).contains(&o.png_compression) {
        out.push(Problem::new(
            "png_compression",
            format!("is {}; allowed 0 to 9", o.png_compression),
        ));
    }
    if !(70..=100).contains(&o.lossy_quality) {
        out.push(Problem::new(
            "lossy_quality",
            format!("is {}; allowed 70 to 100", o.lossy_quality),
        ));
    }
    if !matches!(o.exr_precision, 16 | 32) {
        out.push(Problem::new(
            "exr_precision",
            format!(
                "is {}; allowed 16 (half float) or 32 (float)",
                o.exr_precision
            ),
        ));
    }
    for (field, value) in [("prompt", &o.prompt), ("metadata", &o.metadata)] {
        object_or_null(field, value.as_ref(), out);
    }
    object_or_null("extra_pnginfo", o.extra_pnginfo.as_ref(), out);
    if let Some(Value::Object(map)) = &o.extra_pnginfo {
        metadata_key_problems("extra_pnginfo", map.keys(), &[], out);
    }
    match o.custom_metadata_object() {
        Ok(Some(map)) => {
            let taken: Vec<&str> = match &o.extra_pnginfo {
                Some(Value::Object(extra)) => extra.keys().map(String::as_str).collect(),
                _ => Vec::new(),
            };
            metadata_key_problems("custom_metadata", map.keys(), &taken, out);
        }
        Ok(None) => {}
        Err(message) => out.push(Problem::new("custom_metadata", message)),
    }
}

/// Records a problem unless `value` is absent, null or an object.
fn object_or_null(field: &str, value: Option<&Value>, out: &mut Vec<Problem>) {
    if let Some(other) = value.filter(|v| !matches!(v, Value::Null | Value::Object(_))) {
        let message = format!("must be an object or null, not {}", json_kind(other));
        out.push(Problem::new(field, message));
    }
}

fn metadata_key_problems<'a>(
    field: &str,
    keys: impl Iterator<Item = &'a String>,
    taken: &[&str],
    out: &mut Vec<Problem>,
) {
    for key in keys {
        if let Err(why) = check_png_keyword(key) {
            out.push(Problem::new(format!("{field}.{key:?}"), why));
        } else if RESERVED_METADATA_KEYS.contains(&key.as_str()) || taken.contains(&key.as_str()) {
            out.push(Problem::new(
                format!("{field}.{key:?}"),
                "is a key Luna Saver already writes; choose another name",
            ));
        }
    }
}

/// A name made of ASCII letters, digits, `.`, `_` and `-`, not starting with a dot, at most
/// 128 bytes: safe to open inside one directory, never a path.
pub fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        && !name.starts_with('.')
}

/// Checks a metadata key against the PNG text-chunk keyword rules (1 to 79 printable Latin-1
/// characters, no leading, trailing or repeated spaces), so every key can be embedded as is.
///
/// # Errors
/// Why the key cannot be a keyword.
pub fn check_png_keyword(key: &str) -> Result<(), String> {
    let chars: Vec<char> = key.chars().collect();
    if chars.is_empty() || chars.len() > 79 {
        return Err(format!(
            "is not a usable key: it must be 1 to 79 characters, not {}",
            chars.len()
        ));
    }
    let printable_latin1 = |c: char| matches!(u32::from(c), 0x20..=0x7e | 0xa1..=0xff);
    if !chars.iter().all(|&c| printable_latin1(c)) {
        return Err("is not a usable key: only printable Latin-1 characters are allowed".into());
    }
    if key.starts_with(' ') || key.ends_with(' ') || key.contains("  ") {
        return Err("is not a usable key: no leading, trailing or double spaces".into());
    }
    Ok(())
}

fn image_problems(field: &str, image: &ImageInput, out: &mut Vec<Problem>) {
    if !matches!(image.channels, 1 | 3 | 4) {
        out.push(Problem::new(
            format!("{field}.channels"),
            format!(
                "is {}; allowed 1 (gray), 3 (RGB) or 4 (RGBA)",
                image.channels
            ),
        ));
    }
    let max_side = image.format.max_side();
    for (name, value) in [("width", image.width), ("height", image.height)] {
        if value == 0 || value > max_side {
            out.push(Problem::new(
                format!("{field}.{name}"),
                format!(
                    "is {value}; allowed 1 to {max_side} for {}",
                    image.format.as_str()
                ),
            ));
        }
    }
    let expected = image.expected_len();
    let per_sample = match image.sample {
        crate::SampleType::U8 => String::new(),
        other => format!(" x {} bytes per {} sample", other.bytes(), other.as_str()),
    };
    let shape = format!(
        "width {} x height {} x channels {}{per_sample} needs {expected}",
        image.width, image.height, image.channels
    );
    if image.blob.is_some() && image.handoff.is_some() {
        out.push(Problem::new(
            format!("{field}.handoff"),
            "cannot be given with blob; give one source of pixels",
        ));
    }
    if let Some(blob) = &image.blob {
        if !is_plain_file_name(&blob.name) {
            out.push(Problem::new(
                format!("{field}.blob.name"),
                format!("{:?} is not a plain file name", blob.name),
            ));
        }
        if blob.len != expected || !image.pixels.is_empty() {
            out.push(Problem::new(
                format!("{field}.blob.len"),
                format!("is {}; {shape}, with no inline pixels", blob.len),
            ));
        }
    } else if let Some(handoff) = &image.handoff {
        if !is_plain_file_name(&handoff.name) {
            out.push(Problem::new(
                format!("{field}.handoff.name"),
                format!("{:?} is not a plain file name", handoff.name),
            ));
        }
        if !image.pixels.is_empty() {
            out.push(Problem::new(
                format!("{field}.pixels"),
                "must be empty when handoff is given",
            ));
        }
    } else if image.pixels.len() as u64 != expected {
        out.push(Problem::new(
            format!("{field}.pixels"),
            format!("has {} bytes; {shape}", image.pixels.len()),
        ));
    }
    if image.source.len() > MAX_SOURCE_LEN {
        out.push(Problem::new(
            format!("{field}.source"),
            format!(
                "is {} bytes long; at most {MAX_SOURCE_LEN}",
                image.source.len()
            ),
        ));
    }
    if image.affix.len() > MAX_AFFIX_LEN {
        out.push(Problem::new(
            format!("{field}.affix"),
            format!(
                "is {} bytes long; at most {MAX_AFFIX_LEN}",
                image.affix.len()
            ),
        ));
    }
    match (image.batch_index, image.batch_size) {
        (_, Some(size)) if size < 1 => {
            out.push(Problem::new(
                format!("{field}.batch_size"),
                format!("is {size}; it must be 1 or more"),
            ));
        }
        (Some(index), Some(size)) if !(0..size).contains(&index) => out.push(Problem::new(
            format!("{field}.batch_index"),
            format!(
                "is {index}; allowed 0 to {} for batch_size {size}",
                size - 1
            ),
        )),
        (Some(index), None) if index < 0 => {
            out.push(Problem::new(
                format!("{field}.batch_index"),
                format!("is {index}; it must be 0 or more"),
            ));
        }
        _ => {}
    }
}

//! Pure, synchronous image work for Luna Saver: no async, no I/O.
//!
//! Given a task's pixels and options, this crate decides the file name ([`template`]), whether
//! the image is kept ([`gate`]), and produces the exact bytes of the file ([`encode`]) with its
//! metadata embedded ([`metadata`]). Writing those bytes is `luna-store`'s job.
//!
//! # Layout
//! - [`template`]: `%model_name%`, `%index%`, `%time:FMT%` ... and path safety.
//! - [`gate`]: `variance`, `edge_density` and `both` scores.
//! - [`metadata`]: what is embedded (ComfyUI's keys, A1111 `parameters`, custom keys).
//! - [`png`] (8- and 16-bit), [`webp`], [`jpeg`]: the encoders; [`exif`] builds ComfyUI-style
//!   EXIF (with A1111's `UserComment`).
//! - [`samples`]: conversion between the contract's sample types (`u8`, `u16`, `f32`).

pub mod avif;
pub mod exif;
pub mod exr;
pub mod gate;
pub mod jpeg;
pub mod metadata;
pub mod png;
pub mod samples;
pub mod template;
pub mod webp;

/// Runs each job on a scoped thread of its own and returns their results in order; a panic
/// in a job is resumed on the caller. How the encoders that split a frame use every core.
pub(crate) fn on_threads<T: Send, I>(jobs: I) -> Vec<T>
where
    I: IntoIterator,
    I::Item: FnOnce() -> T + Send,
{
    std::thread::scope(|scope| {
        let handles: Vec<_> = jobs.into_iter().map(|job| scope.spawn(job)).collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect()
    })
}

use std::borrow::Cow;

use luna_job::{ImageFormat, SampleType};

pub use metadata::Metadata;

/// Borrowed pixels with their shape and sample type: row-major, channels interleaved, each
/// sample as the contract stores it (`u8`, or little-endian `u16` / `f32` bytes).
#[derive(Debug, Clone, Copy)]
pub struct ImageView<'a> {
    pixels: &'a [u8],
    width: u32,
    height: u32,
    channels: u8,
    sample: SampleType,
}

/// Pixels that do not match their declared shape.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{len} pixel bytes do not fit {width}x{height} with {channels} channels of {sample:?} samples"
)]
pub struct ShapeError {
    pub len: usize,
    pub width: u32,
    pub height: u32,
    pub channels: u8,
    pub sample: SampleType,
}

impl<'a> ImageView<'a> {
    /// A view of 8-bit samples.
    ///
    /// # Errors
    /// As [`ImageView::with_sample`].
    pub fn new(
        pixels: &'a [u8],
        width: u32,
        height: u32,
        channels: u8,
    ) -> Result<Self, ShapeError> {
        Self::with_sample(pixels, width, height, channels, SampleType::U8)
    }

    /// A view of samples of type `sample`.
    ///
    /// # Errors
    /// [`ShapeError`] unless `channels` is 1, 3 or 4, both sides are non-zero and
    /// `pixels.len() == width * height * channels * sample.bytes()`.
    pub fn with_sample(
        pixels: &'a [u8],
        width: u32,
        height: u32,
        channels: u8,
        sample: SampleType,
    ) -> Result<Self, ShapeError> {
        let expected =
            u64::from(width) * u64::from(height) * u64::from(channels) * u64::from(sample.bytes());
        if width == 0
            || height == 0
            || !matches!(channels, 1 | 3 | 4)
            || pixels.len() as u64 != expected
        {
            return Err(ShapeError {
                len: pixels.len(),
                width,
                height,
                channels,
                sample,
            });
        }
        Ok(Self {
            pixels,
            width,
            height,
            channels,
            sample,
        })
    }

    /// The samples' bytes (little-endian for `u16` and `f32`).
    pub fn pixels(&self) -> &'a [u8] {
        self.pixels
    }
    pub fn sample(&self) -> SampleType {
        self.sample
    }
    pub fn width(&self) -> u32 {
        self.width
    }
    pub fn height(&self) -> u32 {
        self.height
    }
    pub fn channels(&self) -> u8 {
        self.channels
    }

    /// Bytes per row.
    pub fn stride(&self) -> usize {
        self.width as usize * usize::from(self.channels) * usize::from(self.sample.bytes())
    }

    /// The same image with samples of type `to`: borrowed when it already has them, else
    /// converted with [`samples::convert`] (ComfyUI's rounding).
    ///
    /// # Errors
    /// [`samples::SampleLenError`] only if the view were ragged, which `with_sample` refuses.
    pub fn to_sample(&self, to: SampleType) -> Result<Cow<'a, [u8]>, samples::SampleLenError> {
        if self.sample == to {
            return Ok(Cow::Borrowed(self.pixels));
        }
        samples::convert(self.pixels, self.sample, to).map(Cow::Owned)
    }

    /// The rows, top to bottom.
    pub fn rows(&self) -> std::slice::ChunksExact<'a, u8> {
        self.pixels.chunks_exact(self.stride())
    }
}

/// How to encode, from the task's options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EncodeOptions {
    pub format: ImageFormat,
    /// PNG: 0 = stored .. 9 = smallest.
    pub png_compression: u8,
    /// JPEG, lossy WebP and AVIF, 70..=100.
    pub lossy_quality: u8,
    pub lossless_webp: bool,
    /// EXR: half or full float samples.
    pub exr_precision: exr::Precision,
}

/// The bytes of one output file, plus the JSON sidecar when metadata did not fit inside it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    pub bytes: Vec<u8>,
    /// Full metadata as JSON, to be written as `<file>.json` (JPEG's 64 KiB EXIF limit).
    pub sidecar: Option<Vec<u8>>,
}

/// An encoder failure. Inputs are validated before encoding, so these point at resource
/// exhaustion or a codec limit rather than at the request.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("image is {width}x{height}; {format} allows at most {max} pixels per side")]
    TooLarge {
        format: &'static str,
        width: u32,
        height: u32,
        max: u32,
    },
    #[error("deflate output did not fit its bound")]
    Deflate(#[source] libdeflater::CompressionError),
    #[error("libwebp failed to encode (error code {0})")]
    Webp(i32),
    #[error("JPEG encoder failed")]
    Jpeg(#[source] jpeg_encoder::EncodingError),
    #[error("JPEG strips encoded apart could not be joined")]
    JpegStrips,
    #[error("samples could not be converted")]
    Samples(#[from] samples::SampleLenError),
    #[error("metadata could not be serialised")]
    Metadata(#[source] serde_json::Error),
    #[error("OpenEXR encoding failed")]
    Exr(#[from] exr::ExrError),
    #[error("AVIF encoding failed")]
    Avif(#[from] avif::AvifError),
}

/// Encodes `image` in the requested format with `meta` embedded. Samples of another type than
/// the format's own ([`ImageFormat::sample_type`]) are converted first, so any producer's
/// frame can be saved in any format.
///
/// # Errors
/// [`EncodeError`] when a codec refuses the image (size limits, allocation failure).
pub fn encode(
    image: &ImageView<'_>,
    options: &EncodeOptions,
    meta: &Metadata,
) -> Result<Encoded, EncodeError> {
    let converted = image.to_sample(options.format.sample_type())?;
    let image = &ImageView::with_sample(
        &converted,
        image.width,
        image.height,
        image.channels,
        options.format.sample_type(),
    )
    .map_err(|_| samples::SampleLenError {
        len: converted.len(),
        sample: options.format.sample_type().as_str(),
    })?;
    let max = options.format.max_side();
    if image.width > max || image.height > max {
        return Err(EncodeError::TooLarge {
            format: options.format.as_str(),
            width: image.width,
            height: image.height,
            max,
        });
    }
    match options.format {
        ImageFormat::Png | ImageFormat::Png16 => {
            let bytes = png::encode(image, options.png_compression, &meta.png_text_chunks())?;
            Ok(Encoded {
                bytes,
                sidecar: None,
            })
        }
        ImageFormat::Webp => {
            let quality = if options.lossless_webp {
                webp::Quality::Lossless
            } else {
                webp::Quality::Lossy(options.lossy_quality)
            };
            let exif = (!meta.is_empty()).then(|| meta.exif());
            let bytes = webp::encode(image, quality, exif.as_deref())?;
            Ok(Encoded {
                bytes,
                sidecar: None,
            })
        }
        ImageFormat::Jpeg => jpeg::encode(image, options.lossy_quality, meta),
        ImageFormat::Exr => {
            // Little-endian f32 bytes to floats (the wire gives no alignment to cast in place).
            let samples: Vec<f32> = image
                .pixels()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            let attributes: Vec<(String, String)> = meta
                .png_text_chunks()
                .into_iter()
                .map(|t| (t.keyword, t.text))
                .collect();
            let bytes = exr::encode(
                &samples,
                image.width,
                image.height,
                image.channels,
                options.exr_precision,
                &attributes,
            )?;
            Ok(Encoded {
                bytes,
                sidecar: None,
            })
        }
        ImageFormat::Avif => {
            let exif = (!meta.is_empty()).then(|| meta.exif());
            let bytes = avif::encode(
                image.pixels(),
                image.width,
                image.height,
                image.channels,
                options.lossy_quality,
                exif.as_deref(),
            )?;
            Ok(Encoded {
                bytes,
                sidecar: None,
            })
        }
    }
}

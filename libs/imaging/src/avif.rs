//! AVIF encoder: rav1e (pure Rust, through `ravif`), with EXIF stored the way ComfyUI stores it.
//!
//! # Metadata
//! The TIFF data of [`crate::exif`] becomes an `Exif` item of the `meta` box, with the 4-byte
//! `exif_tiff_header_offset` of ISO/IEC 23008-12 set to 0 and the TIFF right after it, in one
//! `iloc` extent; the item refers to the image with `cdsc`. That is what ComfyUI's Save Image
//! (Advanced) writes for AVIF, and what the stock frontend reads (`ftyp` major brand `avif`,
//! `infe` version 2, `iloc` version 0 with 4-byte offsets and lengths and no base offset: the
//! frontend uses the first extent only, as an absolute file offset). Pillow reads it too.
//!
//! # Pixels
//! 8-bit RGB in, 4:4:4 YCbCr (BT.601, full range) at 8 bits in the file; gray is widened to
//! RGB; RGBA keeps its alpha as an AV1 auxiliary alpha item (dropped only when every pixel is
//! opaque, which loses nothing), with the colour under transparent pixels kept as given.
//!
//! # Settings, from measurements
//! On the corpus pictures (`cargo bench -p luna-imaging --bench encode` beside
//! `bench/pillow_exr_avif.py`, 2-core VM, figures in `bench/README.md`), quality 90, 4:4:4,
//! without the `avif-asm` feature: 777 ms for 1024x1024 and 4.7 s for 3840x2160, against
//! Pillow's libavif (aom) at its default speed 6 at 412 ms and 3.2 s. Our files are smaller at
//! about the same fidelity (the 4K render: 305 KB at 45.4 dB against Pillow's 695 KB at
//! 45.6 dB), and `avif-asm` (rav1e's assembly, needs nasm) makes rav1e 3-4x faster. AVIF is the
//! slowest format we write: for a render loop, PNG or WebP keep up; AVIF suits final frames.

use ravif::{AlphaColorMode, BitDepth, Encoder, Img, RGB8, RGBA8};

/// rav1e speed preset (ravif's tuning): 1 slowest .. 10 fastest. 9 is 3-4x faster than 8 at
/// the same size; 10 saves another 10-15% of time for 6-15% larger files.
pub const SPEED: u8 = 9;

/// Why an image cannot be written as AVIF.
#[derive(Debug, thiserror::Error)]
pub enum AvifError {
    #[error("{len} pixel bytes do not fit {width}x{height} with {channels} channels")]
    Shape {
        len: usize,
        width: u32,
        height: u32,
        channels: u8,
    },
    #[error("EXIF data must be TIFF data (starting with `II*\\0` or `MM\\0*`)")]
    ExifNotTiff,
    #[error("rav1e failed to encode")]
    Encoder(#[source] ravif::Error),
}

/// Encodes 8-bit gray, RGB or RGBA `pixels` at `quality` (70..=100 in the contract; anything
/// is clamped to 1..=100), with `exif` (TIFF data, as [`crate::exif::build`] makes it) as the
/// file's `Exif` item.
///
/// # Errors
/// [`AvifError::Shape`] unless `pixels.len() == width * height * channels` with `channels` 1,
/// 3 or 4 and both sides non-zero; [`AvifError::ExifNotTiff`] when `exif` is not TIFF data;
/// [`AvifError::Encoder`] when rav1e refuses the frame.
pub fn encode(
    pixels: &[u8],
    width: u32,
    height: u32,
    channels: u8,
    quality: u8,
    exif: Option<&[u8]>,
) -> Result<Vec<u8>, AvifError> {
    let expected = u64::from(width) * u64::from(height) * u64::from(channels);
    if width == 0
        || height == 0
        || !matches!(channels, 1 | 3 | 4)
        || pixels.len() as u64 != expected
    {
        return Err(AvifError::Shape {
            len: pixels.len(),
            width,
            height,
            channels,
        });
    }
    let quality = f32::from(quality.clamp(1, 100));
    let mut encoder = Encoder::new()
        .with_quality(quality)
        // cavif's default: alpha edges matter more than colour detail.
        .with_alpha_quality(quality.midpoint(100.0))
        .with_speed(SPEED)
        .with_bit_depth(BitDepth::Eight)
        .with_alpha_color_mode(AlphaColorMode::UnassociatedDirty)
        // The shared rayon pool, one for the process, sized to the machine.
        .with_num_threads(None);
    if let Some(tiff) = exif {
        encoder = encoder.with_exif(exif_item(tiff)?);
    }
    let (w, h) = (width as usize, height as usize);
    let encoded = if channels == 4 {
        let rgba: Vec<RGBA8> = pixels
            .chunks_exact(4)
            .map(|p| RGBA8::new(p[0], p[1], p[2], p[3]))
            .collect();
        encoder.encode_rgba(Img::new(&rgba[..], w, h))
    } else {
        let rgb: Vec<RGB8> = if channels == 3 {
            pixels
                .chunks_exact(3)
                .map(|p| RGB8::new(p[0], p[1], p[2]))
                .collect()
        } else {
            pixels.iter().map(|&v| RGB8::new(v, v, v)).collect()
        };
        encoder.encode_rgb(Img::new(&rgb[..], w, h))
    };
    encoded.map(|e| e.avif_file).map_err(AvifError::Encoder)
}

/// The `Exif` item payload: a zero TIFF header offset, then the TIFF data, as ComfyUI writes
/// it. `avif-serialize` stores an item that already carries its offset in a single extent.
fn exif_item(tiff: &[u8]) -> Result<Vec<u8>, AvifError> {
    if !(tiff.starts_with(b"II*\0") || tiff.starts_with(b"MM\0*")) {
        return Err(AvifError::ExifNotTiff);
    }
    let mut item = Vec::with_capacity(4 + tiff.len());
    item.extend_from_slice(&0u32.to_be_bytes());
    item.extend_from_slice(tiff);
    Ok(item)
}

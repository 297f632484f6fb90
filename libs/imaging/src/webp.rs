//! WebP encoder on libwebp, lossy or lossless, with EXIF in a VP8X container.

use std::ffi::c_void;

use libwebp_sys as sys;

use crate::{EncodeError, ImageView};

/// libwebp's lossless effort preset (0 fastest .. 9 smallest). 6 gives the files Pillow's
/// default lossless save gives (quality 80, method 4: within 30 bytes either way on the bench
/// pictures) 1.14-1.26x faster; 3 was 1.6-1.9x faster but 0.1-0.6% larger, 7 is smaller by
/// 0.1-0.15% but slower than Pillow (`bench/README.md`, "JPEG and WebP").
pub const LOSSLESS_PRESET: i32 = 6;

/// libwebp's lossy `method` (0 fast .. 6 slow, better); 4 is libwebp's own default.
pub const LOSSY_METHOD: i32 = 4;

/// Lossy at a quality (70..=100), or lossless with exact pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quality {
    Lossy(u8),
    Lossless,
}

/// Encodes `image`; with `exif` (TIFF data) the result is an extended (VP8X) file with an
/// `EXIF` chunk, which is where ComfyUI and Pillow look for it.
///
/// # Errors
/// [`EncodeError::Webp`] with libwebp's error code (allocation failure, size limits).
pub fn encode(
    image: &ImageView<'_>,
    quality: Quality,
    exif: Option<&[u8]>,
) -> Result<Vec<u8>, EncodeError> {
    let bitstream = encode_simple(image, quality)?;
    Ok(match exif {
        Some(exif) => with_exif(&bitstream, image, exif),
        None => bitstream,
    })
}

/// Frees libwebp allocations on every path out of [`encode_simple`].
struct Guard {
    picture: sys::WebPPicture,
    writer: sys::WebPMemoryWriter,
}

impl Drop for Guard {
    fn drop(&mut self) {
        // SAFETY: both were initialised by libwebp's init functions before the guard was made;
        // free and clear accept initialised structs whether or not they own memory.
        unsafe {
            sys::WebPPictureFree(&mut self.picture);
            sys::WebPMemoryWriterClear(&mut self.writer);
        }
    }
}

fn encode_simple(image: &ImageView<'_>, quality: Quality) -> Result<Vec<u8>, EncodeError> {
    let mut config = sys::WebPConfig::new().map_err(|()| EncodeError::Webp(-1))?;
    match quality {
        Quality::Lossless => {
            // SAFETY: `config` is a valid, initialised config.
            if unsafe { sys::WebPConfigLosslessPreset(&mut config, LOSSLESS_PRESET) } == 0 {
                return Err(EncodeError::Webp(-1));
            }
            // Keep RGB under fully transparent pixels: lossless means the pixels we were given.
            config.exact = 1;
        }
        Quality::Lossy(q) => {
            config.quality = f32::from(q);
            config.method = LOSSY_METHOD;
        }
    }
    // SAFETY: `config` is initialised.
    if unsafe { sys::WebPValidateConfig(&config) } == 0 {
        return Err(EncodeError::Webp(-1));
    }

    let mut picture = sys::WebPPicture::new().map_err(|()| EncodeError::Webp(-1))?;
    picture.use_argb = i32::from(quality == Quality::Lossless);
    picture.width = i32::try_from(image.width()).map_err(|_| EncodeError::Webp(-1))?;
    picture.height = i32::try_from(image.height()).map_err(|_| EncodeError::Webp(-1))?;
    // SAFETY: a zeroed writer is the state WebPMemoryWriterInit expects to overwrite.
    let mut writer: sys::WebPMemoryWriter = unsafe { std::mem::zeroed() };
    // SAFETY: `writer` is a valid, writable struct.
    unsafe { sys::WebPMemoryWriterInit(&mut writer) };
    let mut guard = Guard { picture, writer };

    // libwebp takes RGB or RGBA; gray is widened to RGB.
    let widened;
    let (data, channels) = if image.channels() == 1 {
        widened = image
            .pixels()
            .iter()
            .flat_map(|&v| [v, v, v])
            .collect::<Vec<u8>>();
        (widened.as_slice(), 3)
    } else {
        (image.pixels(), image.channels())
    };
    let stride = i32::try_from(image.width() as usize * usize::from(channels))
        .map_err(|_| EncodeError::Webp(-1))?;
    // SAFETY: `data` holds `height` rows of `stride` bytes and outlives the call; libwebp copies it.
    let imported = unsafe {
        if channels == 4 {
            sys::WebPPictureImportRGBA(&mut guard.picture, data.as_ptr(), stride)
        } else {
            sys::WebPPictureImportRGB(&mut guard.picture, data.as_ptr(), stride)
        }
    };
    if imported == 0 {
        return Err(EncodeError::Webp(guard.picture.error_code as i32));
    }
    guard.picture.writer = Some(sys::WebPMemoryWrite);
    guard.picture.custom_ptr = (&raw mut guard.writer).cast::<c_void>();
    // SAFETY: config and picture are valid; the writer callback appends to `guard.writer`,
    // which lives until after we copy its output.
    let ok = unsafe { sys::WebPEncode(&config, &mut guard.picture) };
    if ok == 0 {
        return Err(EncodeError::Webp(guard.picture.error_code as i32));
    }
    let out = if guard.writer.mem.is_null() || guard.writer.size == 0 {
        Vec::new()
    } else {
        // SAFETY: libwebp wrote `size` bytes at `mem`.
        unsafe { std::slice::from_raw_parts(guard.writer.mem, guard.writer.size) }.to_vec()
    };
    Ok(out)
}

const VP8X_EXIF: u8 = 0x08;
const VP8X_ALPHA: u8 = 0x10;

/// Rewrites a simple WebP (`RIFF..WEBP` + `VP8 `/`VP8L`, or libwebp's own `VP8X`+`ALPH`+`VP8 `)
/// as an extended one with the `EXIF` chunk directly after `VP8X`, before the image chunks.
///
/// The container spec suggests EXIF after the image data, but ComfyUI's frontends before the
/// RIFF padding fix (1.27.x, ComfyUI's pinned one) step from chunk to chunk by `8 + size`
/// without the pad byte, so any odd-length chunk before `EXIF` (an `ALPH`, `VP8 ` or `VP8L`
/// of odd size: about half of all files) makes them miss it. Right after `VP8X` (10 bytes,
/// even) nothing odd precedes it. libwebp's decoder and demuxer, Pillow and browsers read
/// metadata chunks in any position (tests/interop checks Pillow and libwebp).
fn with_exif(bitstream: &[u8], image: &ImageView<'_>, exif: &[u8]) -> Vec<u8> {
    let body = &bitstream[12..]; // after "RIFF" size "WEBP"
    let mut chunks = Vec::with_capacity(body.len() + exif.len() + 40);
    let image_chunks = if body.starts_with(b"VP8X") && body.len() >= VP8X_CHUNK_LEN {
        chunks.extend_from_slice(&body[..VP8X_CHUNK_LEN]);
        chunks[8] |= VP8X_EXIF;
        &body[VP8X_CHUNK_LEN..]
    } else {
        let mut flags = VP8X_EXIF;
        if image.channels() == 4 {
            flags |= VP8X_ALPHA;
        }
        let mut vp8x = [0u8; 10];
        vp8x[0] = flags;
        vp8x[4..7].copy_from_slice(&(image.width() - 1).to_le_bytes()[..3]);
        vp8x[7..10].copy_from_slice(&(image.height() - 1).to_le_bytes()[..3]);
        push_chunk(&mut chunks, b"VP8X", &vp8x);
        body
    };
    push_chunk(&mut chunks, b"EXIF", exif);
    chunks.extend_from_slice(image_chunks);
    let mut out = Vec::with_capacity(12 + chunks.len());
    out.extend_from_slice(b"RIFF");
    out.extend_from_slice(
        &u32::try_from(4 + chunks.len())
            .unwrap_or(u32::MAX)
            .to_le_bytes(),
    );
    out.extend_from_slice(b"WEBP");
    out.extend_from_slice(&chunks);
    out
}

/// `VP8X` fourcc, size and its 10 bytes of payload.
const VP8X_CHUNK_LEN: usize = 18;

fn push_chunk(out: &mut Vec<u8>, fourcc: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(fourcc);
    out.extend_from_slice(&u32::try_from(data.len()).unwrap_or(u32::MAX).to_le_bytes());
    out.extend_from_slice(data);
    if data.len() % 2 == 1 {
        out.push(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Chunks (fourcc, payload length) the way ComfyUI's frontend before the padding fix walks
    /// them: from byte 12, stepping `8 + size` with no pad byte, stopping at `EXIF`.
    fn old_frontend_finds_exif(file: &[u8]) -> bool {
        let mut offset = 12;
        while offset + 8 <= file.len() {
            let fourcc = &file[offset..offset + 4];
            let len = u32::from_le_bytes([
                file[offset + 4],
                file[offset + 5],
                file[offset + 6],
                file[offset + 7],
            ]) as usize;
            if fourcc == b"EXIF" {
                return offset + 8 + len <= file.len();
            }
            offset += 8 + len;
        }
        false
    }

    /// Every chunk with its pad byte, as the spec walks them.
    fn chunks(file: &[u8]) -> Vec<([u8; 4], usize)> {
        let mut out = Vec::new();
        let mut offset = 12;
        while offset + 8 <= file.len() {
            let mut fourcc = [0u8; 4];
            fourcc.copy_from_slice(&file[offset..offset + 4]);
            let len = u32::from_le_bytes([
                file[offset + 4],
                file[offset + 5],
                file[offset + 6],
                file[offset + 7],
            ]) as usize;
            out.push((fourcc, len));
            offset += 8 + len + len % 2;
        }
        assert_eq!(offset, file.len(), "chunks tile the file");
        out
    }

    #[test]
    fn exif_is_found_after_odd_and_even_image_chunks() {
        let exif = crate::exif::build(&[(0x010F, "workflow:{}".into())]);
        let (mut odd, mut even) = (0, 0);
        // Sizes and contents vary the image chunk's length; every case must keep EXIF visible.
        for side in 1..=12u32 {
            for channels in [3u8, 4] {
                for quality in [Quality::Lossless, Quality::Lossy(90)] {
                    let px: Vec<u8> = (0..side * side * u32::from(channels))
                        .map(|i| (i * 97 % 253) as u8)
                        .collect();
                    let view = ImageView::new(&px, side, side, channels).expect("view");
                    let plain = encode(&view, quality, None).expect("encode");
                    let image_len = chunks(&plain).last().expect("image chunk").1;
                    if image_len % 2 == 1 {
                        odd += 1;
                    } else {
                        even += 1;
                    }
                    let file = encode(&view, quality, Some(&exif)).expect("encode");
                    let list = chunks(&file);
                    assert_eq!(&list[0].0, b"VP8X");
                    assert_eq!(&list[1].0, b"EXIF");
                    assert!(
                        old_frontend_finds_exif(&file),
                        "{side}x{side}x{channels} {quality:?}: {list:?}"
                    );
                    assert_eq!(file[12 + 8] & VP8X_EXIF, VP8X_EXIF);
                }
            }
        }
        assert!(
            odd > 0 && even > 0,
            "both parities covered: {odd} odd, {even} even"
        );
    }

    #[test]
    fn the_old_walk_misses_exif_after_an_odd_chunk() {
        // What the placement avoids: EXIF after an odd-length image chunk.
        let mut file = b"RIFF\0\0\0\0WEBP".to_vec();
        push_chunk(&mut file, b"VP8L", &[1, 2, 3]);
        push_chunk(&mut file, b"EXIF", b"II*\0");
        assert!(!old_frontend_finds_exif(&file));
    }
}

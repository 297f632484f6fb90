//! PNG encoder: adaptive row filters and libdeflate.
//!
//! Written here rather than taken from the `png` crate because saving speed is the product:
//! libdeflate compresses a whole frame in one call several times faster than zlib at a similar
//! ratio, and filtering is done with the same per-row heuristic Pillow and libpng use (pick the
//! filter with the smallest sum of absolute signed bytes), so files stay as small as theirs.
//! Text chunks go before `IDAT`, as Pillow and ComfyUI write them.
//!
//! 8-bit views give 8-bit files; 16-bit views (`png16`) give 16-bit files with the same
//! filters, compression levels and text chunks, samples big-endian as PNG stores them.

use libdeflater::{CompressionLvl, Compressor};

use luna_job::SampleType;

use crate::metadata::TextChunk;
use crate::{EncodeError, ImageView};

/// libdeflate level for each `png_compression` 0..=9. 0 stores; 9 is libdeflate's strongest.
/// The middle levels are chosen so each step trades speed for size (see `benches/encode.rs`).
const DEFLATE_LEVEL: [i32; 10] = [0, 1, 2, 3, 4, 6, 7, 8, 10, 12];

const SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', b'\r', b'\n', 0x1a, b'\n'];

/// Encodes `image` as a gray, RGB or RGBA PNG with `texts` as text chunks: 16 bits per sample
/// when the view holds `u16` samples, else 8 (a float view is converted to 8-bit first).
///
/// # Errors
/// [`EncodeError::Deflate`] only if libdeflate's own size bound is wrong.
pub fn encode(
    image: &ImageView<'_>,
    level: u8,
    texts: &[TextChunk],
) -> Result<Vec<u8>, EncodeError> {
    let narrowed;
    let image = match image.sample() {
        SampleType::U8 | SampleType::U16 => image,
        SampleType::F32 => {
            narrowed = image.to_sample(SampleType::U8)?;
            &ImageView::new(&narrowed, image.width(), image.height(), image.channels()).map_err(
                |_| crate::samples::SampleLenError {
                    len: narrowed.len(),
                    sample: "u8",
                },
            )?
        }
    };
    let level = usize::from(level.min(9));
    let filtered = filter(image, level > 0);
    let mut compressor =
        Compressor::new(CompressionLvl::new(DEFLATE_LEVEL[level]).unwrap_or_default());
    let mut idat = vec![0u8; compressor.zlib_compress_bound(filtered.len())];
    let n = compressor
        .zlib_compress(&filtered, &mut idat)
        .map_err(EncodeError::Deflate)?;
    idat.truncate(n);
    drop(filtered);

    let text_len: usize = texts
        .iter()
        .map(|t| t.keyword.len() + t.text.len() + 32)
        .sum();
    let mut out = Vec::with_capacity(SIGNATURE.len() + 25 + text_len + idat.len() + 12 + 12);
    out.extend_from_slice(&SIGNATURE);
    let color_type = match image.channels() {
        1 => 0,
        3 => 2,
        _ => 6,
    };
    let mut ihdr = [0u8; 13];
    ihdr[..4].copy_from_slice(&image.width().to_be_bytes());
    ihdr[4..8].copy_from_slice(&image.height().to_be_bytes());
    ihdr[8] = if image.sample() == SampleType::U16 {
        16
    } else {
        8
    }; // bit depth
    ihdr[9] = color_type; // compression, filter method and interlace stay 0
    write_chunk(&mut out, b"IHDR", &ihdr);
    for t in texts {
        write_text_chunk(&mut out, t);
    }
    write_chunk(&mut out, b"IDAT", &idat);
    write_chunk(&mut out, b"IEND", &[]);
    Ok(out)
}

fn write_chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    // Chunks are at most 2^31-1 bytes; a 65535x65535 RGBA frame compresses far below that
    // only in theory, so callers bound image sizes (see `ImageFormat::max_side`).
    out.extend_from_slice(&u32::try_from(data.len()).unwrap_or(u32::MAX).to_be_bytes());
    let start = out.len();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let crc = crc32fast::hash(&out[start..]);
    out.extend_from_slice(&crc.to_be_bytes());
}

/// `tEXt` when the text is ASCII, else an uncompressed `iTXt` (UTF-8). The PNG spec reads
/// `tEXt` as Latin-1, but ComfyUI's frontend decodes it as UTF-8, so only ASCII means the same
/// to both; `iTXt` is UTF-8 by definition. ComfyUI's JSON (`prompt`, `workflow`) is always
/// ASCII-escaped and so always `tEXt`, which the frontends before 1.58 need (they read `iTXt`
/// as if it were `tEXt`). Keywords are Latin-1, validated upstream (`luna_job::validate`).
fn write_text_chunk(out: &mut Vec<u8>, t: &TextChunk) {
    let keyword = t
        .keyword
        .chars()
        .map(|c| u8::try_from(u32::from(c)).ok())
        .collect::<Option<Vec<u8>>>()
        .unwrap_or_else(|| t.keyword.bytes().filter(u8::is_ascii).collect());
    let mut data = keyword;
    data.push(0);
    if t.text.is_ascii() {
        data.extend_from_slice(t.text.as_bytes());
        write_chunk(out, b"tEXt", &data);
    } else {
        // compression flag, compression method, empty language tag, empty translated keyword
        data.extend_from_slice(&[0, 0, 0, 0]);
        data.extend_from_slice(t.text.as_bytes());
        write_chunk(out, b"iTXt", &data);
    }
}

/// Filters every row, prefixing each with its filter type. Without `adaptive` every row uses
/// filter 0 (level 0 stores the data, where filtering would only cost time). 16-bit rows are
/// byte-swapped to big-endian first; filters then work on bytes with a whole pixel (2 bytes
/// per sample) as the distance, as the PNG spec defines them for every depth.
fn filter(image: &ImageView<'_>, adaptive: bool) -> Vec<u8> {
    let stride = image.stride();
    let sixteen = image.sample() == SampleType::U16;
    let bpp = usize::from(image.channels()) * usize::from(image.sample().bytes());
    let mut out = Vec::with_capacity((stride + 1) * image.height() as usize);
    // For 16-bit frames, the current and the previous row in file byte order.
    let mut row_be = vec![0u8; if sixteen { stride } else { 0 }];
    let mut prior_be = row_be.clone();
    if !adaptive {
        for row in image.rows() {
            out.push(0);
            if sixteen {
                to_big_endian(row, &mut row_be);
                out.extend_from_slice(&row_be);
            } else {
                out.extend_from_slice(row);
            }
        }
        return out;
    }
    let zeros = vec![0u8; stride];
    let mut candidates = [
        vec![0u8; stride],
        vec![0u8; stride],
        vec![0u8; stride],
        vec![0u8; stride],
    ];
    let mut prior: &[u8] = &zeros;
    for (r, row) in image.rows().enumerate() {
        if sixteen {
            to_big_endian(row, &mut row_be);
            let prior = if r == 0 { &zeros[..] } else { &prior_be[..] };
            filter_row(&row_be, prior, bpp, &mut candidates, &mut out);
            std::mem::swap(&mut row_be, &mut prior_be);
        } else {
            filter_row(row, prior, bpp, &mut candidates, &mut out);
            prior = row;
        }
    }
    out
}

/// Little-endian 16-bit samples to PNG's big-endian order.
fn to_big_endian(row: &[u8], out: &mut [u8]) {
    for (o, s) in out.chunks_exact_mut(2).zip(row.chunks_exact(2)) {
        o[0] = s[1];
        o[1] = s[0];
    }
}

/// Appends `row` under the filter with the smallest [`cost`], prefixed by its type.
fn filter_row(
    row: &[u8],
    prior: &[u8],
    bpp: usize,
    candidates: &mut [Vec<u8>; 4],
    out: &mut Vec<u8>,
) {
    let [sub, up, avg, paeth] = candidates;
    filter_sub(row, bpp, sub);
    filter_up(row, prior, up);
    filter_avg(row, prior, bpp, avg);
    filter_paeth(row, prior, bpp, paeth);
    let mut best: (u64, u8, &[u8]) = (cost(row), 0, row);
    for (kind, candidate) in [(1u8, &*sub), (2, &*up), (3, &*avg), (4, &*paeth)] {
        let c = cost(candidate);
        if c < best.0 {
            best = (c, kind, candidate);
        }
    }
    out.push(best.1);
    out.extend_from_slice(best.2);
}

/// Sum of the bytes read as signed values' magnitudes: the usual "minimum sum of absolute
/// differences" heuristic.
fn cost(filtered: &[u8]) -> u64 {
    // Chunked so the inner sum stays in u32 and vectorises.
    filtered
        .chunks(1 << 16)
        .map(|c| {
            u64::from(
                c.iter()
                    .map(|&b| u32::from((b as i8).unsigned_abs()))
                    .sum::<u32>(),
            )
        })
        .sum()
}

fn filter_sub(row: &[u8], bpp: usize, out: &mut [u8]) {
    out[..bpp].copy_from_slice(&row[..bpp]);
    for ((o, &x), &a) in out[bpp..].iter_mut().zip(&row[bpp..]).zip(row) {
        *o = x.wrapping_sub(a);
    }
}

fn filter_up(row: &[u8], prior: &[u8], out: &mut [u8]) {
    for ((o, &x), &b) in out.iter_mut().zip(row).zip(prior) {
        *o = x.wrapping_sub(b);
    }
}

fn filter_avg(row: &[u8], prior: &[u8], bpp: usize, out: &mut [u8]) {
    for i in 0..bpp {
        out[i] = row[i].wrapping_sub(prior[i] >> 1);
    }
    for (((o, &x), &a), &b) in out[bpp..]
        .iter_mut()
        .zip(&row[bpp..])
        .zip(row)
        .zip(&prior[bpp..])
    {
        *o = x.wrapping_sub(((u16::from(a) + u16::from(b)) >> 1) as u8);
    }
}

fn filter_paeth(row: &[u8], prior: &[u8], bpp: usize, out: &mut [u8]) {
    for i in 0..bpp {
        out[i] = row[i].wrapping_sub(prior[i]);
    }
    let tail = out[bpp..]
        .iter_mut()
        .zip(&row[bpp..])
        .zip(row)
        .zip(&prior[bpp..])
        .zip(prior);
    for ((((o, &x), &a), &b), &c) in tail {
        *o = x.wrapping_sub(paeth(a, b, c));
    }
}

#[inline]
fn paeth(a: u8, b: u8, c: u8) -> u8 {
    let (a16, b16, c16) = (i16::from(a), i16::from(b), i16::from(c));
    let pa = (b16 - c16).abs();
    let pb = (a16 - c16).abs();
    let pc = (a16 + b16 - 2 * c16).abs();
    if pa <= pb && pa <= pc {
        a
    } else if pb <= pc {
        b
    } else {
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paeth_matches_the_spec_predictor() {
        for a in (0..=255u8).step_by(5) {
            for b in (0..=255u8).step_by(7) {
                for c in (0..=255u8).step_by(11) {
                    let p = i16::from(a) + i16::from(b) - i16::from(c);
                    let (pa, pb, pc) = (
                        (p - i16::from(a)).abs(),
                        (p - i16::from(b)).abs(),
                        (p - i16::from(c)).abs(),
                    );
                    let spec = if pa <= pb && pa <= pc {
                        a
                    } else if pb <= pc {
                        b
                    } else {
                        c
                    };
                    assert_eq!(paeth(a, b, c), spec);
                }
            }
        }
    }
}

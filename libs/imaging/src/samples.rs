//! Conversion between the contract's sample types (`u8`, `u16`, little-endian `f32`).
//!
//! A task reaches its encoder in the format's own sample type ([`ImageFormat::sample_type`]):
//! the gateway converts once before publishing, and a saver converts what another producer sent.
//! The rules are those of a ComfyUI tensor saved by ComfyUI itself:
//! - float to integer: `trunc(clamp(x * max + 0.5, 0, max))`, i.e. rounded half up and clipped;
//!   NaN becomes 0. For 8-bit this is exactly what the Luna node computed in numpy, so a float
//!   frame converted here gives the same PNG bytes as before;
//! - `u8` to `u16`: `x * 257` (0 to 0, 255 to 65535); `u16` to `u8`: `round(x / 257)`;
//! - integer to float: `x / max`.
//!
//! Large frames are split across the machine's cores; each worker owns a disjoint slice of the
//! output, so the result does not depend on the split.
//!
//! [`ImageFormat::sample_type`]: luna_job::ImageFormat::sample_type

use luna_job::SampleType;

/// Frames below this many samples convert on the calling thread: spawning costs more.
const PARALLEL_FROM: usize = 1 << 20;

/// Input that is not a whole number of samples.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{len} bytes are not a whole number of {sample} samples")]
pub struct SampleLenError {
    pub len: usize,
    pub sample: &'static str,
}

/// `src` (samples of type `from`) as samples of type `to`.
///
/// # Errors
/// [`SampleLenError`] when `src.len()` is not a multiple of `from`'s size.
pub fn convert(src: &[u8], from: SampleType, to: SampleType) -> Result<Vec<u8>, SampleLenError> {
    let in_size = usize::from(from.bytes());
    if !src.len().is_multiple_of(in_size) {
        return Err(SampleLenError {
            len: src.len(),
            sample: from.as_str(),
        });
    }
    if from == to {
        return Ok(src.to_vec());
    }
    let count = src.len() / in_size;
    let out_size = usize::from(to.bytes());
    let mut out = vec![0u8; count * out_size];
    let kernel = kernel(from, to);
    let threads = if count >= PARALLEL_FROM {
        std::thread::available_parallelism().map_or(1, usize::from)
    } else {
        1
    };
    if threads <= 1 {
        kernel(src, &mut out);
        return Ok(out);
    }
    let per = count.div_ceil(threads);
    std::thread::scope(|scope| {
        for (inp, outp) in src
            .chunks(per * in_size)
            .zip(out.chunks_mut(per * out_size))
        {
            scope.spawn(move || kernel(inp, outp));
        }
    });
    Ok(out)
}

/// Converts `src` (samples of type `from`) into `out` (samples of type `to`) on this thread.
///
/// # Errors
/// [`SampleLenError`] when `src` is not a whole number of samples or `out` does not hold
/// exactly as many.
pub fn convert_into(
    src: &[u8],
    from: SampleType,
    to: SampleType,
    out: &mut [u8],
) -> Result<(), SampleLenError> {
    let in_size = usize::from(from.bytes());
    let count = src.len() / in_size;
    if !src.len().is_multiple_of(in_size) || out.len() != count * usize::from(to.bytes()) {
        return Err(SampleLenError {
            len: src.len(),
            sample: from.as_str(),
        });
    }
    kernel(from, to)(src, out);
    Ok(())
}

type Kernel = fn(&[u8], &mut [u8]);

fn kernel(from: SampleType, to: SampleType) -> Kernel {
    match (from, to) {
        (SampleType::U8, SampleType::U16) => u8_to_u16,
        (SampleType::U8, SampleType::F32) => u8_to_f32,
        (SampleType::U16, SampleType::U8) => u16_to_u8,
        (SampleType::U16, SampleType::F32) => u16_to_f32,
        (SampleType::F32, SampleType::U8) => f32_to_u8,
        (SampleType::F32, SampleType::U16) => f32_to_u16,
        (SampleType::U8, SampleType::U8)
        | (SampleType::U16, SampleType::U16)
        | (SampleType::F32, SampleType::F32) => copy,
    }
}

fn copy(src: &[u8], out: &mut [u8]) {
    out.copy_from_slice(src);
}

/// The rule `trunc(clamp(x * max + 0.5, 0, max))`, NaN to 0, as comparisons (NaN compares
/// false, so it lands on 0), which map to vector min/max instructions, and a truncating cast
/// without the saturation checks a plain `as` adds: the value is already in `0..=max`.
#[inline(always)]
fn quantize_to_i32(x: f32, max: f32) -> i32 {
    let y = x * max + 0.5;
    let y = if y > 0.0 { y } else { 0.0 };
    let y = if y < max { y } else { max };
    // SAFETY: `y` is finite and in 0..=max (at most 65535), which an i32 holds.
    unsafe { y.to_int_unchecked::<i32>() }
}

/// A float kernel `$any`, compiled a second time for AVX2 and run that way where the CPU has
/// it: eight lanes per instruction instead of four brings the conversion to memory speed.
macro_rules! with_avx2 {
    ($name:ident, $any:ident) => {
        fn $name(src: &[u8], out: &mut [u8]) {
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx2") {
                #[target_feature(enable = "avx2")]
                fn avx2(src: &[u8], out: &mut [u8]) {
                    $any(src, out);
                }
                // SAFETY: the CPU has AVX2, checked just above.
                unsafe { avx2(src, out) };
                return;
            }
            $any(src, out);
        }
    };
}

with_avx2!(f32_to_u8, f32_to_u8_any);
with_avx2!(f32_to_u16, f32_to_u16_any);

#[inline(always)]
fn f32_to_u8_any(src: &[u8], out: &mut [u8]) {
    for (s, o) in src.chunks_exact(4).zip(out.iter_mut()) {
        *o = quantize_to_i32(f32::from_le_bytes([s[0], s[1], s[2], s[3]]), 255.0) as u8;
    }
}

#[inline(always)]
fn f32_to_u16_any(src: &[u8], out: &mut [u8]) {
    for (s, o) in src.chunks_exact(4).zip(out.chunks_exact_mut(2)) {
        let v = quantize_to_i32(f32::from_le_bytes([s[0], s[1], s[2], s[3]]), 65_535.0);
        o.copy_from_slice(&(v as u16).to_le_bytes());
    }
}

fn u8_to_u16(src: &[u8], out: &mut [u8]) {
    for (&s, o) in src.iter().zip(out.chunks_exact_mut(2)) {
        o.copy_from_slice(&(u16::from(s) * 257).to_le_bytes());
    }
}

fn u8_to_f32(src: &[u8], out: &mut [u8]) {
    for (&s, o) in src.iter().zip(out.chunks_exact_mut(4)) {
        o.copy_from_slice(&(f32::from(s) / 255.0).to_le_bytes());
    }
}

fn u16_to_u8(src: &[u8], out: &mut [u8]) {
    for (s, o) in src.chunks_exact(2).zip(out.iter_mut()) {
        let x = u32::from(u16::from_le_bytes([s[0], s[1]]));
        // round(x / 257) without floats: x / 257 rounds half up at (x + 128) / 257.
        *o = ((x + 128) / 257) as u8;
    }
}

fn u16_to_f32(src: &[u8], out: &mut [u8]) {
    for (s, o) in src.chunks_exact(2).zip(out.chunks_exact_mut(4)) {
        let x = f32::from(u16::from_le_bytes([s[0], s[1]]));
        o.copy_from_slice(&(x / 65_535.0).to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rule in its plainest form, the reference for the kernels:
    /// `trunc(clamp(x * max + 0.5, 0, max))` with NaN to 0: `f32::max` and `f32::min` drop NaN,
    /// and the cast saturates.
    fn quantize(x: f32, max: f32) -> f32 {
        (x * max + 0.5).max(0.0).min(max)
    }

    fn floats(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn float_to_u8_rounds_half_up_clips_and_zeroes_nan() {
        let src = floats(&[
            0.0,
            1.0,
            0.5,
            -3.0,
            7.0,
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            0.5 / 255.0,
        ]);
        let out = convert(&src, SampleType::F32, SampleType::U8).expect("whole samples");
        assert_eq!(out, [0, 255, 128, 0, 255, 0, 255, 0, 1]);
    }

    /// The vectorised kernels (AVX2 where the CPU has it) against the plain formula, on every
    /// float that lands near a rounding edge, the specials, and lengths off the vector width.
    #[test]
    fn vector_kernels_match_the_plain_formula() {
        let mut xs = vec![
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            -0.0,
            f32::MIN_POSITIVE,
        ];
        for k in 0..=65_536u32 {
            let edge = (k as f32 - 0.5) / 65_535.0;
            xs.extend([
                edge,
                edge.next_up(),
                edge.next_down(),
                k as f32 / 255.0 - 0.5 / 255.0,
            ]);
        }
        // Lengths off any vector width, and shorter than one vector.
        for len in [xs.len(), xs.len() - 7, 15, 1] {
            let src = floats(&xs[..len]);
            let u8s = convert(&src, SampleType::F32, SampleType::U8).expect("whole");
            let u16s = convert(&src, SampleType::F32, SampleType::U16).expect("whole");
            for (i, &x) in xs[..len].iter().enumerate() {
                assert_eq!(u8s[i], quantize(x, 255.0) as u8, "u8 of {x:e}");
                let got = u16::from_le_bytes([u16s[2 * i], u16s[2 * i + 1]]);
                assert_eq!(got, quantize(x, 65_535.0) as u16, "u16 of {x:e}");
            }
        }
    }

    #[test]
    fn float_to_u16_is_round_x_times_65535() {
        let xs = [0.0f32, 1.0, 0.25, 0.123_456, 2.0, -1.0];
        let out = convert(&floats(&xs), SampleType::F32, SampleType::U16).expect("whole");
        let got: Vec<u16> = out
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect();
        let want: Vec<u16> = xs
            .iter()
            .map(|&x| (f64::from(x) * 65_535.0).round().clamp(0.0, 65_535.0) as u16)
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn u8_survives_a_trip_through_every_type() {
        let src: Vec<u8> = (0..=255).collect();
        for via in [SampleType::U16, SampleType::F32] {
            let wide = convert(&src, SampleType::U8, via).expect("whole");
            let back = convert(&wide, via, SampleType::U8).expect("whole");
            assert_eq!(back, src, "via {via:?}");
        }
    }

    #[test]
    fn large_frames_split_across_threads_give_the_same_bytes() {
        let xs: Vec<f32> = (0..PARALLEL_FROM + 12_345)
            .map(|i| (i % 1000) as f32 / 999.0)
            .collect();
        let src = floats(&xs);
        let out = convert(&src, SampleType::F32, SampleType::U8).expect("whole");
        let mut serial = vec![0u8; xs.len()];
        f32_to_u8(&src, &mut serial);
        assert_eq!(out, serial);
    }

    #[test]
    fn ragged_input_is_an_error() {
        let err = convert(&[0, 0, 0], SampleType::F32, SampleType::U8).expect_err("3 bytes");
        assert_eq!(
            err.to_string(),
            "3 bytes are not a whole number of f32 samples"
        );
    }
}

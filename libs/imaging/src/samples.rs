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

/// `trunc(clamp(x * max + 0.5, 0, max))` with NaN to 0: `f32::max` and `f32::min` drop NaN,
/// and the cast saturates.
#[inline]
fn quantize(x: f32, max: f32) -> f32 {
    (x * max + 0.5).max(0.0).min(max)
}

fn f32_to_u8(src: &[u8], out: &mut [u8]) {
    for (s, o) in src.chunks_exact(4).zip(out.iter_mut()) {
        let x = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
        *o = quantize(x, 255.0) as u8;
    }
}

fn f32_to_u16(src: &[u8], out: &mut [u8]) {
    for (s, o) in src.chunks_exact(4).zip(out.chunks_exact_mut(2)) {
        let x = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
        o.copy_from_slice(&(quantize(x, 65_535.0) as u16).to_le_bytes());
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

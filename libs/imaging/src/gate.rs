//! Quality gates: scores in 0..=1 that say whether an image is worth keeping.
//!
//! Luminance is `Y = 0.299 R + 0.587 G + 0.114 B` on the 0..255 scale (a gray image's value is
//! its luminance; alpha is ignored). Every sample type is scored on that scale, from its own
//! samples without rounding to 8 bits: `u16` as `x / 257`, `f32` as `clamp(x, 0, 1) * 255`
//! (NaN as 0), so an 8-bit frame and the same frame widened to 16-bit or float score alike. Both scores are computed in one pass over the pixels with
//! two rows of luminance in memory, so a 4K frame costs no large buffers.
//!
//! - `variance`: `min(1, var(Y) / 3000)`, population variance.
//! - `edge_density`: with `Y` scaled to 0..1, the mean absolute difference to the next row
//!   (`gx`) and to the next column (`gy`); `min(1, ((mean(gx) + mean(gy)) / 2) / 0.05)`. An image
//!   one pixel tall or wide has no differences in that direction, whose mean counts as 0.
//! - `both`: each score must reach the threshold; the reported score is their mean.

use luna_job::{QualityGate, SampleType};

use crate::ImageView;

/// `var(Y)` that scores 1.
pub const VARIANCE_FULL_SCALE: f64 = 3000.0;
/// Mean gradient (0..1 scale) that scores 1.
pub const EDGE_FULL_SCALE: f64 = 0.05;

/// Both raw scores of an image.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scores {
    pub variance: f64,
    pub edge_density: f64,
}

/// What a gate decided.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Verdict {
    pub score: f64,
    pub passed: bool,
}

/// Applies `gate` with `threshold`; `None` when the gate is disabled.
pub fn evaluate(gate: QualityGate, image: &ImageView<'_>, threshold: f64) -> Option<Verdict> {
    if gate == QualityGate::Disabled {
        return None;
    }
    let s = scores(image);
    Some(match gate {
        QualityGate::Variance => Verdict {
            score: s.variance,
            passed: s.variance >= threshold,
        },
        QualityGate::EdgeDensity => Verdict {
            score: s.edge_density,
            passed: s.edge_density >= threshold,
        },
        QualityGate::Both | QualityGate::Disabled => Verdict {
            score: (s.variance + s.edge_density) / 2.0,
            passed: s.variance >= threshold && s.edge_density >= threshold,
        },
    })
}

/// Computes both scores.
pub fn scores(image: &ImageView<'_>) -> Scores {
    let (w, h) = (image.width as usize, image.height as usize);
    let mut prev = vec![0f64; w];
    let mut cur = vec![0f64; w];
    // Variance from sums of deviations from the first pixel's luminance: exact for flat
    // images and free of the cancellation that plain sums of squares suffer.
    let mut shift = None;
    let (mut sum, mut sum_sq) = (0f64, 0f64);
    let (mut sum_gx, mut sum_gy) = (0f64, 0f64);
    for (r, row) in image.rows().enumerate() {
        luminance_row(row, image.channels, image.sample, &mut cur);
        let k = *shift.get_or_insert(cur[0]);
        let (mut row_sum, mut row_sq, mut row_gy) = (0f64, 0f64, 0f64);
        for c in 0..w {
            let y = cur[c];
            row_sum += y - k;
            row_sq += (y - k) * (y - k);
            if c + 1 < w {
                row_gy += (cur[c + 1] - y).abs();
            }
        }
        if r > 0 {
            sum_gx += prev
                .iter()
                .zip(&cur)
                .map(|(a, b)| (b - a).abs())
                .sum::<f64>();
        }
        sum += row_sum;
        sum_sq += row_sq;
        sum_gy += row_gy;
        std::mem::swap(&mut prev, &mut cur);
    }
    let n = (w * h) as f64;
    let mean = sum / n;
    let variance = (sum_sq / n - mean * mean).max(0.0);
    let mean_of = |total: f64, count: usize| {
        if count == 0 {
            0.0
        } else {
            total / 255.0 / count as f64
        }
    };
    let gx = mean_of(sum_gx, (h - 1) * w);
    let gy = mean_of(sum_gy, h * (w - 1));
    Scores {
        variance: (variance / VARIANCE_FULL_SCALE).min(1.0),
        edge_density: (((gx + gy) / 2.0) / EDGE_FULL_SCALE).min(1.0),
    }
}

fn luminance_row(row: &[u8], channels: u8, sample: SampleType, out: &mut [f64]) {
    match sample {
        SampleType::U8 => luminance_of::<1>(row, channels, out, |b| f64::from(b[0])),
        SampleType::U16 => luminance_of::<2>(row, channels, out, |b| {
            f64::from(u16::from_le_bytes([b[0], b[1]])) / 257.0
        }),
        SampleType::F32 => luminance_of::<4>(row, channels, out, |b| {
            let x = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            // NaN counts as 0, as in the integer conversions.
            if x.is_nan() {
                0.0
            } else {
                f64::from(x.clamp(0.0, 1.0)) * 255.0
            }
        }),
    }
}

/// Luminance of each pixel of `row`, reading each sample of `SIZE` bytes with `value`.
#[inline]
fn luminance_of<const SIZE: usize>(
    row: &[u8],
    channels: u8,
    out: &mut [f64],
    value: impl Fn(&[u8]) -> f64,
) {
    let channels = usize::from(channels);
    let size = SIZE;
    if channels == 1 {
        for (o, b) in out.iter_mut().zip(row.chunks_exact(size)) {
            *o = value(b);
        }
    } else {
        for (o, px) in out.iter_mut().zip(row.chunks_exact(size * channels)) {
            *o = 0.299 * value(&px[..size])
                + 0.587 * value(&px[size..2 * size])
                + 0.114 * value(&px[2 * size..3 * size]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(pixels: &[u8], width: u32, height: u32, channels: u8) -> ImageView<'_> {
        ImageView::new(pixels, width, height, channels).expect("consistent view")
    }

    fn checkerboard(w: u32, h: u32, channels: u8) -> Vec<u8> {
        let mut out = Vec::new();
        for r in 0..h {
            for c in 0..w {
                let v = if (r + c) % 2 == 0 { 0 } else { 255 };
                out.extend(std::iter::repeat_n(v, usize::from(channels)));
                if channels == 4 {
                    *out.last_mut().expect("pushed") = 255;
                }
            }
        }
        out
    }

    #[test]
    fn flat_images_score_zero_in_every_layout() {
        for channels in [1u8, 3, 4] {
            let px = vec![128; 16 * 8 * usize::from(channels)];
            let s = scores(&view(&px, 16, 8, channels));
            assert_eq!(
                (s.variance, s.edge_density),
                (0.0, 0.0),
                "channels {channels}"
            );
        }
    }

    #[test]
    fn checkerboards_score_one_in_every_layout() {
        for channels in [1u8, 3, 4] {
            let px = checkerboard(8, 8, channels);
            let s = scores(&view(&px, 8, 8, channels));
            assert_eq!(
                (s.variance, s.edge_density),
                (1.0, 1.0),
                "channels {channels}"
            );
        }
    }

    #[test]
    fn hand_computed_small_case() {
        // 2x3 RGB: Y row 0 = [29.07, 149.685, 0], row 1 = [76.245, 255, 0]
        // (pure blue, pure green, black / pure red, white, black).
        #[rustfmt::skip]
        let px = [0, 0, 255,  0, 255, 0,  0, 0, 0,
                  255, 0, 0,  255, 255, 255,  0, 0, 0];
        let ys = [29.07, 149.685, 0.0, 76.245, 255.0, 0.0];
        let mean = ys.iter().sum::<f64>() / 6.0;
        let var = ys.iter().map(|y| (y - mean) * (y - mean)).sum::<f64>() / 6.0;
        let gx = ((76.245f64 - 29.07).abs() + (255.0f64 - 149.685).abs() + 0.0) / 255.0 / 3.0;
        let gy = ((149.685f64 - 29.07).abs() + 149.685 + (255.0f64 - 76.245).abs() + 255.0)
            / 255.0
            / 4.0;
        let s = scores(&view(&px, 3, 2, 3));
        assert!(
            (s.variance - (var / 3000.0).min(1.0)).abs() < 1e-6,
            "{} vs {}",
            s.variance,
            var / 3000.0
        );
        let edge = (((gx + gy) / 2.0) / 0.05).min(1.0);
        assert!((s.edge_density - edge).abs() < 1e-6);
        // Below saturation, checked with a dim copy: Y scales by 0.1, so var by 0.01.
        let dim: Vec<u8> = px.iter().map(|v| v / 10).collect();
        let s = scores(&view(&dim, 3, 2, 3));
        let ys: Vec<f64> = [
            (0, 0, 25),
            (0, 25, 0),
            (0, 0, 0),
            (25, 0, 0),
            (25, 25, 25),
            (0, 0, 0),
        ]
        .iter()
        .map(|&(r, g, b)| 0.299 * f64::from(r) + 0.587 * f64::from(g) + 0.114 * f64::from(b))
        .collect();
        let mean = ys.iter().sum::<f64>() / 6.0;
        let var = ys.iter().map(|y| (y - mean) * (y - mean)).sum::<f64>() / 6.0;
        assert!((s.variance - var / 3000.0).abs() < 1e-6);
        assert!(s.variance < 1.0);
        let gx =
            ((ys[3] - ys[0]).abs() + (ys[4] - ys[1]).abs() + (ys[5] - ys[2]).abs()) / 255.0 / 3.0;
        let gy = ((ys[1] - ys[0]).abs()
            + (ys[2] - ys[1]).abs()
            + (ys[4] - ys[3]).abs()
            + (ys[5] - ys[4]).abs())
            / 255.0
            / 4.0;
        assert!((s.edge_density - ((gx + gy) / 2.0) / 0.05).abs() < 1e-6);
        assert!(s.edge_density < 1.0);
    }

    #[test]
    fn alpha_is_ignored_and_gray_equals_its_rgb() {
        let gray = [10u8, 200, 30, 90];
        let rgb: Vec<u8> = gray.iter().flat_map(|&v| [v, v, v]).collect();
        let rgba: Vec<u8> = gray.iter().flat_map(|&v| [v, v, v, 7]).collect();
        let g = scores(&view(&gray, 2, 2, 1));
        let c = scores(&view(&rgb, 2, 2, 3));
        let a = scores(&view(&rgba, 2, 2, 4));
        assert!((g.variance - c.variance).abs() < 1e-9 && (c.variance - a.variance).abs() < 1e-9);
        assert!((g.edge_density - a.edge_density).abs() < 1e-9);
    }

    #[test]
    fn gates_compare_with_the_threshold() {
        // Horizontal stripes: strong row-to-row change, none along rows, high variance.
        let px: Vec<u8> = (0..8)
            .flat_map(|r| [if r % 2 == 0 { 0 } else { 255 }; 8])
            .collect();
        let img = view(&px, 8, 8, 1);
        let s = scores(&img);
        assert_eq!(s.variance, 1.0);
        assert!(
            (s.edge_density - 1.0).abs() < 1e-12,
            "mean gx 1, gy 0 -> 0.5 / 0.05 saturates"
        );
        assert!(evaluate(QualityGate::Disabled, &img, 0.5).is_none());
        let v = evaluate(QualityGate::Variance, &img, 1.0).expect("gate ran");
        assert!(
            v.passed && v.score == 1.0,
            "score equal to threshold passes"
        );
        let flat = [9u8; 64];
        let flat = view(&flat, 8, 8, 1);
        let both = evaluate(QualityGate::Both, &flat, 0.0).expect("gate ran");
        assert!(both.passed, "0 >= 0");
        let both = evaluate(QualityGate::Both, &flat, 0.01).expect("gate ran");
        assert!(!both.passed && both.score == 0.0);
    }

    #[test]
    fn both_requires_each_score_and_reports_the_mean() {
        // Two flat halves: variance saturates, edges are rare (one boundary row).
        let mut px = vec![0u8; 32 * 32];
        px[16 * 32..].fill(255);
        let img = view(&px, 32, 32, 1);
        let s = scores(&img);
        assert_eq!(s.variance, 1.0);
        assert!(s.edge_density < 0.7);
        let v = evaluate(QualityGate::Both, &img, 0.7).expect("gate ran");
        assert!(!v.passed, "variance alone is not enough");
        assert!((v.score - (1.0 + s.edge_density) / 2.0).abs() < 1e-12);
        assert!(
            v.score >= 0.5,
            "the mean may exceed the threshold while one score does not"
        );
    }

    #[test]
    fn every_sample_type_scores_on_the_same_scale() {
        let (w, h) = (13u32, 7u32);
        for channels in [1u8, 3, 4] {
            let px: Vec<u8> = (0..w * h * u32::from(channels))
                .map(|i| (i * 37 % 251) as u8)
                .collect();
            let base = scores(&view(&px, w, h, channels));
            for sample in [SampleType::U16, SampleType::F32] {
                let wide = crate::samples::convert(&px, SampleType::U8, sample).expect("convert");
                let v = ImageView::with_sample(&wide, w, h, channels, sample).expect("view");
                let s = scores(&v);
                // x / 255 in f32 carries a relative error of about 6e-8.
                let tolerance = if sample == SampleType::F32 {
                    1e-6
                } else {
                    1e-12
                };
                assert!(
                    (s.variance - base.variance).abs() < tolerance
                        && (s.edge_density - base.edge_density).abs() < tolerance,
                    "{sample:?} x{channels}: {s:?} vs {base:?}"
                );
            }
        }
        // Float beyond 0..1 and NaN clip as the integer conversions do.
        let floats: Vec<u8> = [f32::NAN, -1.0, 2.0, 1.0]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let clipped = [0u8, 0, 255, 255];
        let f = scores(&ImageView::with_sample(&floats, 2, 2, 1, SampleType::F32).expect("view"));
        assert_eq!(f, scores(&view(&clipped, 2, 2, 1)));
    }
}

//! 16-bit PNG encoding on real pictures: `cargo bench -p luna-imaging --bench png16 [-- --json]`.
//!
//! Frames: each 8-bit picture of the encode bench (`../shared/corpus/`, `LUNA_BENCH_IMAGES`, or
//! the test photo upscaled to 1024x1024) widened to 16 bits as `v * 257 ^ noise`, where
//! `noise = ((i * 2654435761 mod 2^64) >> 24) & 63` for sample index `i`: low bits that vary
//! like a render's, so the low bytes are not a copy of the high ones. Gray is the green channel.
//! `bench/pillow_png16.py` builds the same frames to time Pillow's 16-bit (`I;16`) PNG writer.
//! No metadata; single-threaded; median of >= 3 runs over ~1.5 s per case.

use std::error::Error;
use std::hint::black_box;
use std::path::Path;
use std::time::{Duration, Instant};

use luna_imaging::{EncodeOptions, ImageView, Metadata, encode};
use luna_job::{ImageFormat, SampleType};

const CORPUS: [&str; 2] = ["bythewater_1024x1024.png", "canopee_3840x2160.png"];
const FALLBACK: &str = "tests/data/astronaut_256.png";
const BUDGET: Duration = Duration::from_millis(1500);

/// The 16-bit samples of `src` (8-bit), little-endian.
fn widen(src: &[u8]) -> Vec<u8> {
    src.iter()
        .enumerate()
        .flat_map(|(i, &v)| {
            let noise = ((i as u64).wrapping_mul(2_654_435_761) >> 24) & 63;
            ((u16::from(v) * 257) ^ noise as u16).to_le_bytes()
        })
        .collect()
}

fn pictures(root: &Path) -> Result<Vec<(String, image::RgbImage)>, Box<dyn Error>> {
    let paths: Vec<std::path::PathBuf> = match std::env::var("LUNA_BENCH_IMAGES") {
        Ok(list) => list.split(',').map(Into::into).collect(),
        Err(_) => CORPUS
            .iter()
            .map(|n| root.join("../shared/corpus").join(n))
            .filter(|p| p.exists())
            .collect(),
    };
    if paths.is_empty() {
        let small = image::open(root.join(FALLBACK))?.to_rgb8();
        let big =
            image::imageops::resize(&small, 1024, 1024, image::imageops::FilterType::Triangle);
        return Ok(vec![("astronaut_256-upscaled".into(), big)]);
    }
    paths
        .iter()
        .map(|p| {
            let name = p
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            Ok((name, image::open(p)?.to_rgb8()))
        })
        .collect()
}

fn main() -> Result<(), Box<dyn Error>> {
    let as_json = std::env::args().skip(1).any(|a| a == "--json");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    for (name, rgb) in pictures(&root)? {
        let (w, h) = rgb.dimensions();
        let gray: Vec<u8> = rgb.as_raw().chunks_exact(3).map(|p| p[1]).collect();
        for (layout, channels, samples) in
            [("gray", 1u8, widen(&gray)), ("rgb", 3, widen(rgb.as_raw()))]
        {
            let view = ImageView::with_sample(&samples, w, h, channels, SampleType::U16)?;
            for level in [1u8, 4] {
                let options = EncodeOptions {
                    format: ImageFormat::Png16,
                    png_compression: level,
                    lossy_quality: 90,
                    lossless_webp: false,
                    exr_precision: luna_imaging::exr::Precision::Float,
                };
                let mut times = Vec::new();
                let mut bytes = 0;
                let started = Instant::now();
                while times.len() < 3 || started.elapsed() < BUDGET {
                    let t = Instant::now();
                    bytes = black_box(encode(&view, &options, &Metadata::default())?)
                        .bytes
                        .len();
                    times.push(t.elapsed());
                }
                times.sort();
                let ms = times[times.len() / 2].as_secs_f64() * 1e3;
                if as_json {
                    println!(
                        "{{\"image\":\"{name}\",\"width\":{w},\"height\":{h},\"layout\":\"{layout}\",\
                         \"case\":\"png16-{level}\",\"runs\":{},\"ms\":{ms:.3},\"bytes\":{bytes}}}",
                        times.len()
                    );
                } else {
                    println!(
                        "{name:<26} {w}x{h} {layout:<4} png16-{level} {:>3} runs {ms:>9.1} ms {bytes:>11} bytes",
                        times.len()
                    );
                }
            }
        }
    }
    Ok(())
}

//! Encoder throughput on real pictures: `cargo bench -p luna-imaging --bench encode [-- --json]`.
//!
//! Images: `../shared/corpus/{bythewater_1024x1024,canopee_3840x2160}.png` from the workspace
//! root, or the comma-separated paths in `LUNA_BENCH_IMAGES`; without either, the test photo
//! `tests/data/astronaut_256.png` upscaled to 1024x1024 (smooth, so not representative).
//!
//! Cases (only those named in `LUNA_BENCH_CASES=jpeg-q90,png-4` when it is set): PNG at
//! `png_compression` 1, 4 and 9; WebP lossy (quality 90) and lossless; JPEG
//! (quality 90); OpenEXR (ZIP) at float and at half precision; AVIF (quality 90). EXR is fed
//! `f32` samples, the 8-bit picture converted once with `samples::convert` before timing, so
//! the time is the encoder's, not the conversion's. 16-bit PNG has its own bench, `png16`.
//!
//! Every case embeds the metadata ComfyUI's SaveImage embeds: a `prompt` of about 2.5 KB and a
//! `workflow` of about 20 KB (PNG text chunks, EXIF for WebP, JPEG and AVIF, string attributes
//! for EXR). PNG and WebP encode single-threaded on this thread; JPEG encodes strips on all
//! cores (frames of 512x512 and more), EXR compresses its blocks on all cores (frames of 2^20
//! samples and more: both corpus pictures) and AVIF runs rav1e on the shared rayon pool, as
//! they do in the saver. Each case runs twice to warm up, then until
//! 1.5 s have passed and at least 3 runs; the median is reported. `bench/pillow_png.py` builds
//! the same metadata byte for byte to compare with Pillow, and `bench/pillow_exr_avif.py` to
//! compare with OpenEXR's and Pillow's EXR and AVIF writers.

use std::error::Error;
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use luna_imaging::exr::Precision;
use luna_imaging::metadata::{Entry, EntryValue};
use luna_imaging::samples;
use luna_imaging::{EncodeOptions, ImageView, Metadata, encode};
use luna_job::{ImageFormat, SampleType};
use serde_json::{Value, json};

const CORPUS: [&str; 2] = ["bythewater_1024x1024.png", "canopee_3840x2160.png"];
const FALLBACK: &str = "tests/data/astronaut_256.png";
const FALLBACK_SIDE: u32 = 1024;
const WARMUPS: usize = 2;
const MIN_RUNS: usize = 3;
const BUDGET: Duration = Duration::from_millis(1500);

/// One benchmarked encoding.
struct Case {
    name: &'static str,
    options: EncodeOptions,
    /// The samples handed to `encode`: the format's own, so no conversion is timed.
    sample: SampleType,
}

fn cases() -> Vec<Case> {
    let base = EncodeOptions {
        format: ImageFormat::Png,
        png_compression: 4,
        lossy_quality: 90,
        lossless_webp: false,
        exr_precision: Precision::Float,
    };
    let case = |name, options: EncodeOptions| Case {
        name,
        options,
        sample: options.format.sample_type(),
    };
    let png = |name, level| {
        case(
            name,
            EncodeOptions {
                png_compression: level,
                ..base
            },
        )
    };
    let other = |name, format, lossless_webp| {
        case(
            name,
            EncodeOptions {
                format,
                lossless_webp,
                ..base
            },
        )
    };
    let exr = |name, exr_precision| {
        case(
            name,
            EncodeOptions {
                format: ImageFormat::Exr,
                exr_precision,
                ..base
            },
        )
    };
    let all = vec![
        png("png-1", 1),
        png("png-4", 4),
        png("png-9", 9),
        other("webp-q90", ImageFormat::Webp, false),
        other("webp-lossless", ImageFormat::Webp, true),
        other("jpeg-q90", ImageFormat::Jpeg, false),
        exr("exr-float", Precision::Float),
        exr("exr-half", Precision::Half),
        other("avif-q90", ImageFormat::Avif, false),
    ];
    // `LUNA_BENCH_CASES=jpeg-q90,png-4`: only these.
    match std::env::var("LUNA_BENCH_CASES") {
        Ok(only) if !only.trim().is_empty() => all
            .into_iter()
            .filter(|c| only.split(',').any(|o| o.trim() == c.name))
            .collect(),
        _ => all,
    }
}

/// 8-bit RGB pixels to encode.
struct Picture {
    name: String,
    source: PathBuf,
    width: u32,
    height: u32,
    rgb: Vec<u8>,
}

fn load(path: &Path) -> Result<Picture, Box<dyn Error>> {
    let rgb = image::open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .to_rgb8();
    let (width, height) = rgb.dimensions();
    let name = path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    Ok(Picture {
        name,
        source: path.to_owned(),
        width,
        height,
        rgb: rgb.into_raw(),
    })
}

/// The pictures to encode, and a note on where they came from.
fn pictures(root: &Path) -> Result<(Vec<Picture>, String), Box<dyn Error>> {
    if let Ok(list) = std::env::var("LUNA_BENCH_IMAGES") {
        let paths: Vec<&str> = list
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .collect();
        if !paths.is_empty() {
            let pictures = paths
                .iter()
                .map(|p| load(Path::new(p)))
                .collect::<Result<Vec<_>, _>>()?;
            return Ok((pictures, "images from LUNA_BENCH_IMAGES".to_owned()));
        }
    }
    let corpus = root.join("../shared/corpus");
    if corpus.is_dir() {
        let pictures = CORPUS
            .iter()
            .map(|f| load(&corpus.join(f)))
            .collect::<Result<Vec<_>, _>>()?;
        let shown = corpus.canonicalize().unwrap_or_else(|_| corpus.clone());
        return Ok((pictures, format!("corpus: {}", shown.display())));
    }
    let small = load(&root.join(FALLBACK))?;
    let buffer = image::RgbImage::from_raw(small.width, small.height, small.rgb)
        .ok_or("fallback image shape")?;
    let big = image::imageops::resize(
        &buffer,
        FALLBACK_SIDE,
        FALLBACK_SIDE,
        image::imageops::FilterType::CatmullRom,
    );
    let picture = Picture {
        name: "astronaut_256-upscaled".to_owned(),
        source: small.source,
        width: FALLBACK_SIDE,
        height: FALLBACK_SIDE,
        rgb: big.into_raw(),
    };
    let note = format!(
        "corpus {} not found: FALLBACK to {FALLBACK} upscaled to {FALLBACK_SIDE}x{FALLBACK_SIDE} \
         (smooth pixels: figures are not representative of real pictures)",
        corpus.display()
    );
    Ok((vec![picture], note))
}

const NODE_TYPES: [&str; 8] = [
    "CheckpointLoaderSimple",
    "CLIPTextEncode",
    "CLIPTextEncode",
    "EmptyLatentImage",
    "KSampler",
    "VAEDecode",
    "LoraLoader",
    "SaveImage",
];

/// A deterministic ComfyUI-style workflow (the `extra_pnginfo` `workflow` entry) of just over
/// 20,000 bytes as compact JSON. `bench/pillow_png.py` builds the same text.
fn workflow() -> Value {
    let mut nodes = Vec::new();
    let mut links = Vec::new();
    for i in 1u64.. {
        let kind = NODE_TYPES[(i % 8) as usize];
        nodes.push(json!({
            "id": i,
            "type": kind,
            "pos": [100 + (i * 37) % 900, 80 + (i * 53) % 700],
            "size": [315, 98 + (i % 5) * 40],
            "flags": {},
            "order": i - 1,
            "mode": 0,
            "inputs": [{"name": "model", "type": "MODEL", "link": i}],
            "outputs": [{"name": "LATENT", "type": "LATENT", "links": [i + 1], "slot_index": 0}],
            "properties": {"Node name for S&R": kind},
            "widgets_values": [
                (i * 2_654_435_761) % 4_294_967_296, "fixed", 20 + i % 10, 7.5, "dpmpp_2m", "karras", 1.0,
                format!("a detailed photograph of a wooden pier at dusk, node {i}, soft light, 35mm"),
            ],
        }));
        links.push(json!([i, i, 0, i + 1, 0, "LATENT"]));
        let wf = json!({
            "last_node_id": i,
            "last_link_id": i,
            "nodes": nodes,
            "links": links,
            "groups": [],
            "config": {},
            "extra": {"ds": {"scale": 1.0, "offset": [0, 0]}},
            "version": 0.4,
        });
        if wf.to_string().len() >= 20_000 {
            return wf;
        }
    }
    unreachable!("the loop returns once the workflow is large enough")
}

/// A deterministic API-format `prompt` of about 2.5 KB.
fn prompt() -> Value {
    let mut map = serde_json::Map::new();
    for k in 1u64..=12 {
        map.insert(
            k.to_string(),
            json!({
                "class_type": NODE_TYPES[(k % 8) as usize],
                "inputs": {
                    "seed": (k * 2_654_435_761) % 4_294_967_296, "steps": 20, "cfg": 7.5,
                    "sampler_name": "dpmpp_2m", "scheduler": "karras", "denoise": 1.0,
                    "model": [(k - 1).to_string(), 0], "text": format!("a wooden pier at dusk, prompt node {k}"),
                },
            }),
        );
    }
    Value::Object(map)
}

/// What ComfyUI's SaveImage embeds: `prompt`, then `workflow`.
fn metadata() -> Metadata {
    let entry = |key: &str, value| Entry {
        key: key.to_owned(),
        value: EntryValue::Json(value),
    };
    Metadata {
        entries: vec![entry("prompt", prompt()), entry("workflow", workflow())],
    }
}

/// Timings of one case, in runs order.
fn measure(f: &mut dyn FnMut() -> usize) -> (Vec<Duration>, usize) {
    let mut bytes = 0;
    for _ in 0..WARMUPS {
        bytes = black_box(f());
    }
    let mut times = Vec::new();
    let start = Instant::now();
    while times.len() < MIN_RUNS || start.elapsed() < BUDGET {
        let t = Instant::now();
        bytes = black_box(f());
        times.push(t.elapsed());
    }
    (times, bytes)
}

fn median(times: &mut [Duration]) -> Duration {
    times.sort_unstable();
    let n = times.len();
    if n % 2 == 1 {
        times[n / 2]
    } else {
        (times[n / 2 - 1] + times[n / 2]) / 2
    }
}

fn main() -> Result<(), Box<dyn Error>> {
    // cargo passes `--bench`; anything but `--json` is ignored.
    let as_json = std::env::args().skip(1).any(|a| a == "--json");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let (pictures, note) = pictures(&root)?;
    let meta = metadata();
    let meta_bytes: usize = meta.png_text_chunks().iter().map(|c| c.text.len()).sum();
    let meta_crc = meta
        .png_text_chunks()
        .iter()
        .fold(crc32fast::Hasher::new(), |mut h, c| {
            h.update(c.text.as_bytes());
            h
        })
        .finalize();

    if as_json {
        eprintln!("{note}");
    } else {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        println!(
            "luna-imaging encode bench: median of >= {MIN_RUNS} runs (~{BUDGET:?} per case); \
             png/webp single-threaded, jpeg/exr/avif on {cores} cores"
        );
        println!("{note}");
        println!(
            "metadata: prompt + workflow text, {meta_bytes} bytes (crc32 {meta_crc:08x}) in every file"
        );
        println!(
            "MB/s = raw 8-bit RGB input (w*h*3 bytes, 1 MB = 10^6 bytes) / median time, for every case"
        );
        println!();
        println!(
            "{:<26} {:>9}  {:<14} {:>4} {:>10} {:>8} {:>11} {:>6}",
            "image", "size", "case", "runs", "median ms", "MB/s", "bytes", "bpp"
        );
    }

    for picture in &pictures {
        // Samples of every type a case takes, converted once, outside the timed loop.
        let mut converted: Vec<(SampleType, Vec<u8>)> = Vec::new();
        for case in cases() {
            if case.sample != SampleType::U8 && converted.iter().all(|(s, _)| *s != case.sample) {
                let samples = samples::convert(&picture.rgb, SampleType::U8, case.sample)?;
                converted.push((case.sample, samples));
            }
        }
        let raw = picture.rgb.len() as f64;
        for case in cases() {
            let pixels = converted
                .iter()
                .find(|(s, _)| *s == case.sample)
                .map_or(&picture.rgb[..], |(_, p)| &p[..]);
            let view =
                ImageView::with_sample(pixels, picture.width, picture.height, 3, case.sample)?;
            let mut error = None;
            let (mut times, bytes) = measure(&mut || match encode(&view, &case.options, &meta) {
                Ok(encoded) => encoded.bytes.len() + encoded.sidecar.map_or(0, |s| s.len()),
                Err(e) => {
                    error = Some(e.to_string());
                    0
                }
            });
            if let Some(e) = error {
                return Err(format!("{} {}: {e}", picture.name, case.name).into());
            }
            let runs = times.len();
            let ms = median(&mut times).as_secs_f64() * 1e3;
            let mb_s = raw / 1e6 / (ms / 1e3);
            let bpp = bytes as f64 * 8.0 / (f64::from(picture.width) * f64::from(picture.height));
            if as_json {
                println!(
                    "{{\"image\":{},\"source\":{},\"width\":{},\"height\":{},\"case\":\"{}\",\"runs\":{runs},\
                     \"ms\":{ms:.3},\"mb_s\":{mb_s:.2},\"bytes\":{bytes},\"meta_bytes\":{meta_bytes},\
                     \"meta_crc32\":\"{meta_crc:08x}\"}}",
                    Value::String(picture.name.clone()),
                    Value::String(picture.source.display().to_string()),
                    picture.width,
                    picture.height,
                    case.name,
                );
            } else {
                println!(
                    "{:<26} {:>9}  {:<14} {:>4} {:>10.1} {:>8.1} {:>11} {:>6.2}",
                    picture.name,
                    format!("{}x{}", picture.width, picture.height),
                    case.name,
                    runs,
                    ms,
                    mb_s,
                    bytes,
                    bpp
                );
            }
        }
    }
    Ok(())
}

//! Sample conversion throughput beside a plain copy of the same bytes:
//! `cargo bench -p luna-imaging --bench samples`.
//!
//! A 3840x2160 RGB float frame (what the ComfyUI node hands over) converted to every sample
//! type, on one thread and split across the cores as the gateway does. The copy row is the
//! floor: a conversion cannot be faster than reading its input once.

use std::hint::black_box;
use std::time::{Duration, Instant};

use luna_imaging::samples;
use luna_job::SampleType;

const SAMPLES: usize = 3840 * 2160 * 3;
const RUNS: usize = 15;

fn median(mut f: impl FnMut()) -> Duration {
    f();
    let mut times: Vec<Duration> = (0..RUNS)
        .map(|_| {
            let started = Instant::now();
            f();
            started.elapsed()
        })
        .collect();
    times.sort();
    times[RUNS / 2]
}

fn row(name: &str, bytes_in: usize, took: Duration) {
    let ms = took.as_secs_f64() * 1000.0;
    let gbs = bytes_in as f64 / took.as_secs_f64() / 1e9;
    println!("| {name} | {ms:.1} | {gbs:.1} |");
}

fn main() {
    let floats: Vec<u8> = (0..SAMPLES)
        .flat_map(|i| ((i % 1021) as f32 / 1020.0).to_le_bytes())
        .collect();
    println!("| 3840x2160x3 f32 | ms | GB/s in |\n|---|---|---|");
    let mut out = vec![0u8; floats.len()];
    row(
        "copy (floor)",
        floats.len(),
        median(|| out.copy_from_slice(black_box(&floats))),
    );
    for to in [SampleType::U8, SampleType::U16] {
        let mut out = vec![0u8; SAMPLES * usize::from(to.bytes())];
        let one = median(|| {
            samples::convert_into(black_box(&floats), SampleType::F32, to, &mut out)
                .expect("whole samples");
        });
        row(
            &format!("f32 -> {} one thread, into", to.as_str()),
            floats.len(),
            one,
        );
        let all = median(|| {
            black_box(samples::convert(black_box(&floats), SampleType::F32, to).expect("ok"));
        });
        row(
            &format!("f32 -> {} all cores, new buffer", to.as_str()),
            floats.len(),
            all,
        );
    }
}

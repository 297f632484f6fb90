//! OpenEXR files read back by an independent reader (the `exr` crate, as `exrs`): samples
//! bit-exact for float, IEEE half rounding for half, attributes intact, the spec's layout.

use exrs::image::{AnyChannels, FlatSamples, Image, Layer, Layers};
use exrs::meta::attribute::{AttributeValue, Text};
use exrs::prelude::{Blocks, Compression, LineOrder, ReadChannels, ReadLayers};
use luna_imaging::exr::{ExrError, Precision, encode};
use proptest::prelude::*;

type Read = Image<Layers<AnyChannels<FlatSamples>>>;

fn read(bytes: &[u8]) -> Read {
    exrs::image::read::read()
        .no_deep_data()
        .largest_resolution_level()
        .all_channels()
        .all_layers()
        .all_attributes()
        .pedantic()
        .from_buffered(std::io::Cursor::new(bytes))
        .expect("the exr crate reads the file")
}

fn only_layer(image: &Read) -> &Layer<AnyChannels<FlatSamples>> {
    assert_eq!(image.layer_data.len(), 1, "one part");
    &image.layer_data[0]
}

fn names(layer: &Layer<AnyChannels<FlatSamples>>) -> Vec<String> {
    layer
        .channel_data
        .list
        .iter()
        .map(|c| c.name.to_string())
        .collect()
}

/// The samples of channel `name` as raw bits (u16 for half, u32 for float).
fn channel_bits(layer: &Layer<AnyChannels<FlatSamples>>, name: &str) -> Vec<u32> {
    let channel = layer
        .channel_data
        .list
        .iter()
        .find(|c| c.name.to_string() == name)
        .unwrap_or_else(|| panic!("channel {name}"));
    match &channel.sample_data {
        FlatSamples::F16(v) => v.iter().map(|h| u32::from(h.to_bits())).collect(),
        FlatSamples::F32(v) => v.iter().map(|f| f.to_bits()).collect(),
        FlatSamples::U32(_) => panic!("unexpected u32 channel"),
    }
}

fn expected_names(channels: u8) -> Vec<&'static str> {
    match channels {
        1 => vec!["Y"],
        3 => vec!["B", "G", "R"],
        _ => vec!["A", "B", "G", "R"],
    }
}

/// Interleaved index of each named channel.
fn index_of(name: &str) -> usize {
    match name {
        "Y" | "R" => 0,
        "G" => 1,
        "B" => 2,
        _ => 3,
    }
}

/// Checks every sample of `bytes` against `samples`, stored as `precision` rounds them.
fn check_samples(
    bytes: &[u8],
    samples: &[f32],
    w: u32,
    h: u32,
    channels: u8,
    precision: Precision,
) {
    let image = read(bytes);
    let layer = only_layer(&image);
    assert_eq!(
        (layer.size.width(), layer.size.height()),
        (w as usize, h as usize)
    );
    assert_eq!(names(layer), expected_names(channels));
    assert_eq!(layer.encoding.compression, Compression::ZIP16);
    assert_eq!(layer.encoding.blocks, Blocks::ScanLines);
    assert_eq!(layer.encoding.line_order, LineOrder::Increasing);
    for name in expected_names(channels) {
        let got = channel_bits(layer, name);
        let want: Vec<u32> = samples
            .iter()
            .skip(index_of(name))
            .step_by(usize::from(channels))
            .map(|&x| match precision {
                Precision::Float => x.to_bits(),
                Precision::Half => u32::from(half::f16::from_f32(x).to_bits()),
            })
            .collect();
        assert_eq!(got.len(), want.len(), "channel {name}");
        if let Some(i) = got.iter().zip(&want).position(|(g, w)| g != w) {
            panic!(
                "channel {name} sample {i}: got bits {:#x}, want {:#x}",
                got[i], want[i]
            );
        }
    }
}

fn text(layer: &Layer<AnyChannels<FlatSamples>>, name: &str) -> Vec<u8> {
    match layer.attributes.other.get(&Text::from(name)) {
        Some(AttributeValue::Text(t)) => t.as_slice().to_vec(),
        other => panic!("attribute {name}: {other:?}"),
    }
}

/// A photograph as a float tensor, x / 255 as ComfyUI holds it.
fn photo_tensor(channels: u8) -> (Vec<f32>, u32, u32) {
    let img = image::load_from_memory(include_bytes!("../../../tests/data/astronaut_256.png"))
        .expect("test photo")
        .to_rgba8();
    let (w, h) = img.dimensions();
    let samples = img
        .pixels()
        .enumerate()
        .flat_map(|(i, p)| {
            let px = [p[0], p[1], p[2], (i % 256) as u8];
            match channels {
                1 => vec![f32::from(px[1]) / 255.0],
                3 => px[..3].iter().map(|&v| f32::from(v) / 255.0).collect(),
                _ => px.iter().map(|&v| f32::from(v) / 255.0).collect(),
            }
        })
        .collect();
    (samples, w, h)
}

#[test]
fn photo_round_trips_in_every_channel_count_and_precision() {
    for channels in [1, 3, 4] {
        let (samples, w, h) = photo_tensor(channels);
        for precision in [Precision::Half, Precision::Float] {
            let bytes = encode(&samples, w, h, channels, precision, &[]).expect("encodes");
            check_samples(&bytes, &samples, w, h, channels, precision);
            // ZIP does its work on a photograph.
            let raw = samples.len() * if precision == Precision::Half { 2 } else { 4 };
            assert!(bytes.len() < raw, "{} >= {raw}", bytes.len());
        }
    }
}

#[test]
fn values_outside_zero_one_nan_and_infinities_are_kept() {
    let specials = [
        -1.5,
        0.0,
        -0.0,
        1.0,
        7.25,
        65504.0,
        1e-30,
        f32::MAX,
        f32::MIN_POSITIVE,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        f32::from_bits(0x7fc0_1234), // a NaN with a payload
    ];
    let samples: Vec<f32> = specials.iter().copied().cycle().take(13 * 3 * 5).collect();
    for precision in [Precision::Half, Precision::Float] {
        let bytes = encode(&samples, 13, 5, 3, precision, &[]).expect("encodes");
        check_samples(&bytes, &samples, 13, 5, 3, precision);
    }
}

/// Half rounding checked against IEEE 754 binary16 values worked out by hand, independently
/// of the `half` crate the encoder uses.
#[test]
fn half_rounds_to_nearest_even() {
    let p = |e: i32| 2f32.powi(e);
    let cases: Vec<(f32, u16)> = vec![
        (1.0, 0x3c00),
        (-2.0, 0xc000),
        (1.0 / 3.0, 0x3555),
        (65504.0, 0x7bff),
        (65519.0, 0x7bff), // below the halfway point to 65536: the largest half
        (65520.0, 0x7c00), // halfway: to even, which is infinity
        (1.0 + p(-11), 0x3c00), // tie between 0x3c00 and 0x3c01: even
        (1.0 + 3.0 * p(-11), 0x3c02), // tie between 0x3c01 and 0x3c02: even
        (p(-24), 0x0001),  // the smallest subnormal
        (p(-25), 0x0000),  // tie between 0 and 0x0001: even
        (3.0 * p(-25), 0x0002), // tie between 0x0001 and 0x0002: even
        (p(-14), 0x0400),  // the smallest normal
    ];
    let samples: Vec<f32> = cases.iter().map(|c| c.0).collect();
    let bytes = encode(&samples, 12, 1, 1, Precision::Half, &[]).expect("encodes");
    let image = read(&bytes);
    let got = channel_bits(only_layer(&image), "Y");
    let want: Vec<u32> = cases.iter().map(|c| u32::from(c.1)).collect();
    assert_eq!(got, want);
}

#[test]
fn attributes_are_strings_with_their_bytes_intact() {
    let workflow = format!(
        "{{\"nodes\":[{}]}}",
        (0..12_000)
            .map(|i| format!("{{\"id\":{i}}}"))
            .collect::<Vec<_>>()
            .join(",")
    );
    assert!(workflow.len() > 100_000);
    let long_name = "a_custom_key_longer_than_thirty_one_bytes".to_owned();
    let attributes = vec![
        (
            "prompt".to_owned(),
            r#"{"3":{"inputs":{"text":"caf\u00e9"}}}"#.to_owned(),
        ),
        ("workflow".to_owned(), workflow.clone()),
        (
            "parameters".to_owned(),
            "a lighthouse, café ☕\nSteps: 20".to_owned(),
        ),
        ("luna_job_id".to_owned(), "job-42".to_owned()),
        (long_name.clone(), String::new()),
    ];
    let (samples, w, h) = photo_tensor(3);
    let bytes = encode(&samples, w, h, 3, Precision::Half, &attributes).expect("encodes");
    let image = read(&bytes);
    let layer = only_layer(&image);
    for (name, value) in &attributes {
        assert_eq!(text(layer, name), value.as_bytes(), "{name}");
    }
    check_samples(&bytes, &samples, w, h, 3, Precision::Half);
}

#[test]
fn a_large_frame_compressed_across_threads_reads_back() {
    // 1.5 M samples: past the threshold where blocks are spread over the cores.
    let (w, h) = (1024u32, 512u32);
    let samples: Vec<f32> = (0..w * h * 3)
        .map(|i| ((i % 3001) as f32 / 3001.0) * if i % 7 == 0 { -2.0 } else { 1.0 })
        .collect();
    for precision in [Precision::Half, Precision::Float] {
        let bytes = encode(&samples, w, h, 3, precision, &[]).expect("encodes");
        check_samples(&bytes, &samples, w, h, 3, precision);
    }
}

#[test]
fn errors_name_what_is_wrong() {
    let e = encode(&[0.0; 3], 2, 1, 1, Precision::Float, &[]).expect_err("shape");
    assert!(matches!(e, ExrError::Shape { len: 3, .. }), "{e}");
    let e = encode(
        &[0.0],
        1,
        1,
        1,
        Precision::Float,
        &[("compression".into(), "none".into())],
    )
    .expect_err("reserved");
    assert_eq!(
        e.to_string(),
        "attribute name \"compression\" is reserved by OpenEXR"
    );
}

fn sample() -> impl Strategy<Value = f32> {
    prop_oneof![
        4 => -2.0f32..2.0,
        1 => any::<u32>().prop_map(f32::from_bits),
        1 => Just(0.5f32),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn any_shape_round_trips(
        (w, h, channels, samples) in (1u32..=67, 1u32..=33, prop::sample::select(vec![1u8, 3, 4]))
            .prop_flat_map(|(w, h, c)| {
                let n = (w * h * u32::from(c)) as usize;
                (Just(w), Just(h), Just(c), prop::collection::vec(sample(), n))
            }),
        float in any::<bool>(),
    ) {
        let precision = if float { Precision::Float } else { Precision::Half };
        let bytes = encode(&samples, w, h, channels, precision, &[("k".into(), "v".into())])
            .expect("encodes");
        check_samples(&bytes, &samples, w, h, channels, precision);
    }
}

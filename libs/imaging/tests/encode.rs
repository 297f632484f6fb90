//! Encoded files decode to what the contract promises, checked with an independent decoder
//! (the `image` crate) and by reading the containers' metadata structures directly.

use chrono::DateTime;
use image::ImageDecoder;
use luna_imaging::metadata::Metadata;
use luna_imaging::{EncodeOptions, ImageView, encode};
use luna_job::{ImageFormat, ImageInput, JobId, SampleType, SaveRequest, SaveTask};
use serde_json::{Value, json};

/// A public-domain photograph (NASA), 256x256 RGB.
fn photo() -> (Vec<u8>, u32, u32) {
    let img = image::load_from_memory(include_bytes!("../../../tests/data/astronaut_256.png"))
        .expect("test photo");
    let rgb = img.to_rgb8();
    let (w, h) = rgb.dimensions();
    (rgb.into_raw(), w, h)
}

fn with_channels(rgb: &[u8], channels: u8) -> Vec<u8> {
    match channels {
        1 => rgb.chunks_exact(3).map(|p| p[1]).collect(),
        3 => rgb.to_vec(),
        _ => rgb
            .chunks_exact(3)
            .enumerate()
            .flat_map(|(i, p)| [p[0], p[1], p[2], (i % 256) as u8])
            .collect(),
    }
}

fn options(format: ImageFormat) -> EncodeOptions {
    EncodeOptions {
        format,
        png_compression: 4,
        lossy_quality: 90,
        lossless_webp: false,
        exr_precision: luna_imaging::exr::Precision::Float,
    }
}

fn task_with_metadata(width: u32, height: u32, workflow: Value) -> SaveTask {
    let req = SaveRequest {
        model_name: "sdxl.safetensors".into(),
        prompt: Some(
            json!({"3": {"class_type": "KSampler", "inputs": {"seed": 7, "text": "naïve café"}}}),
        ),
        extra_pnginfo: Some(json!({ "workflow": workflow })),
        metadata: Some(
            json!({"positive": "an astronaut", "negative": "blurry", "steps": 20, "seed": 7}),
        ),
        custom_metadata: Some(json!({"artist": "Luna", "rating": 5})),
        images: vec![ImageInput {
            width,
            height,
            ..Default::default()
        }],
        ..Default::default()
    };
    let at = DateTime::parse_from_rfc3339("2025-12-09T10:00:00+00:00").expect("time");
    req.into_tasks(&JobId::parse("job-42").expect("id"), at)
        .remove(0)
}

fn psnr(a: &[u8], b: &[u8]) -> f64 {
    let mse = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| (f64::from(x) - f64::from(y)).powi(2))
        .sum::<f64>()
        / a.len() as f64;
    10.0 * (255.0f64 * 255.0 / mse).log10()
}

/// PNG chunks as (type, data).
fn png_chunks(png: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut at = 8;
    while at + 8 <= png.len() {
        let len = u32::from_be_bytes(png[at..at + 4].try_into().expect("4 bytes")) as usize;
        let kind = String::from_utf8_lossy(&png[at + 4..at + 8]).into_owned();
        let data = png[at + 8..at + 8 + len].to_vec();
        let crc = u32::from_be_bytes(
            png[at + 8 + len..at + 12 + len]
                .try_into()
                .expect("4 bytes"),
        );
        assert_eq!(
            crc,
            crc32fast::hash(&png[at + 4..at + 8 + len]),
            "CRC of {kind}"
        );
        out.push((kind, data));
        at += 12 + len;
    }
    out
}

fn png_texts(png: &[u8]) -> Vec<(String, String)> {
    png_chunks(png)
        .into_iter()
        .filter_map(|(kind, data)| {
            let nul = data.iter().position(|&b| b == 0)?;
            let key = String::from_utf8_lossy(&data[..nul]).into_owned();
            match kind.as_str() {
                "tEXt" => Some((
                    key,
                    data[nul + 1..].iter().map(|&b| char::from(b)).collect(),
                )),
                "iTXt" => Some((
                    key,
                    String::from_utf8(data[nul + 5..].to_vec()).expect("utf8"),
                )),
                _ => None,
            }
        })
        .collect()
}

#[test]
fn png_is_lossless_for_gray_rgb_and_rgba_at_every_level() {
    let (rgb, w, h) = photo();
    for channels in [1u8, 3, 4] {
        let px = with_channels(&rgb, channels);
        let view = ImageView::new(&px, w, h, channels).expect("view");
        for level in 0..=9 {
            let opts = EncodeOptions {
                png_compression: level,
                ..options(ImageFormat::Png)
            };
            let out = encode(&view, &opts, &Metadata::default()).expect("encode");
            let decoded = image::load_from_memory_with_format(&out.bytes, image::ImageFormat::Png)
                .expect("decode");
            let (color, got) = match channels {
                1 => (image::ColorType::L8, decoded.to_luma8().into_raw()),
                3 => (image::ColorType::Rgb8, decoded.to_rgb8().into_raw()),
                _ => (image::ColorType::Rgba8, decoded.to_rgba8().into_raw()),
            };
            assert_eq!(
                decoded.color(),
                color,
                "channels {channels} keep their layout"
            );
            assert!(
                got == px,
                "pixels differ for channels {channels} level {level}"
            );
        }
    }
}

#[test]
fn png_compression_is_a_real_dial() {
    let (rgb, w, h) = photo();
    let view = ImageView::new(&rgb, w, h, 3).expect("view");
    let size = |level| {
        let opts = EncodeOptions {
            png_compression: level,
            ..options(ImageFormat::Png)
        };
        encode(&view, &opts, &Metadata::default())
            .expect("encode")
            .bytes
            .len()
    };
    let (stored, fast, default, best) = (size(0), size(1), size(4), size(9));
    assert!(stored > rgb.len(), "level 0 stores: {stored}");
    // On a photo this small, libdeflate's levels 1 and 4 land within a fraction of a percent
    // of each other (the 1024x1024 and 4K bench pictures show the full spread, with speed);
    // the ends of the dial must differ clearly.
    assert!(
        fast < stored && best < default && best < fast,
        "{stored} > {fast}, {default} > {best}"
    );
    assert!(
        (default as f64) < fast as f64 * 1.005,
        "level 4 ({default}) is no larger than level 1 ({fast})"
    );
    assert!(
        (best as f64) < fast as f64 * 0.99,
        "level 9 ({best}) is clearly smaller than level 1 ({fast})"
    );
}

#[test]
fn png_embeds_comfyui_text_chunks() {
    let (rgb, w, h) = photo();
    let workflow =
        json!({"nodes": [{"id": 1, "type": "SaveImage", "title": "Ünïcode ✓"}], "links": []});
    let task = task_with_metadata(w, h, workflow.clone());
    let meta = Metadata::from_task(&task);
    let out = encode(
        &ImageView::new(&rgb, w, h, 3).expect("view"),
        &options(ImageFormat::Png),
        &meta,
    )
    .expect("encode");
    let texts = png_texts(&out.bytes);
    let keys: Vec<&str> = texts.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        keys,
        [
            "prompt",
            "workflow",
            "parameters",
            "artist",
            "rating",
            "luna_job_id"
        ]
    );
    let get = |k: &str| {
        texts
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
            .expect("key present")
    };
    assert_eq!(
        serde_json::from_str::<Value>(&get("prompt")).expect("json"),
        task.options.prompt.clone().expect("set")
    );
    assert_eq!(
        serde_json::from_str::<Value>(&get("workflow")).expect("json"),
        workflow
    );
    assert_eq!(
        get("parameters"),
        "an astronaut\nNegative prompt: blurry\nSteps: 20, Seed: 7, Size: 256x256, Model: sdxl"
    );
    assert_eq!(
        (get("artist"), get("rating"), get("luna_job_id")),
        ("Luna".into(), "5".into(), "job-42".into())
    );
    let chunk_order: Vec<String> = png_chunks(&out.bytes).into_iter().map(|(k, _)| k).collect();
    assert_eq!(chunk_order.first().map(String::as_str), Some("IHDR"));
    let idat = chunk_order.iter().position(|k| k == "IDAT").expect("IDAT");
    assert!(
        chunk_order.iter().rposition(|k| k == "tEXt").expect("tEXt") < idat,
        "text before image data"
    );
}

#[test]
fn non_ascii_text_goes_into_itxt() {
    let px = [0u8; 3];
    let mut task = task_with_metadata(1, 1, json!({}));
    task.options.metadata = Some(json!({"positive": "月の光"}));
    // Latin-1 is not enough for tEXt: ComfyUI's frontend decodes tEXt as UTF-8.
    task.options.custom_metadata = Some(json!({"artist": "Zoë"}));
    let out = encode(
        &ImageView::new(&px, 1, 1, 3).expect("view"),
        &options(ImageFormat::Png),
        &Metadata::from_task(&task),
    )
    .expect("encode");
    let itxt: Vec<String> = png_chunks(&out.bytes)
        .into_iter()
        .filter(|(k, _)| k == "iTXt")
        .map(|(_, d)| {
            String::from_utf8_lossy(&d[..d.iter().position(|&b| b == 0).expect("nul")]).into_owned()
        })
        .collect();
    assert_eq!(
        itxt,
        ["parameters", "artist"],
        "only non-ASCII text needs iTXt; JSON is escaped to ASCII"
    );
    assert!(
        png_texts(&out.bytes)
            .iter()
            .any(|(k, v)| k == "artist" && v == "Zoë")
    );
    assert!(
        png_texts(&out.bytes)
            .iter()
            .any(|(k, v)| k == "parameters" && v.starts_with("月の光\n"))
    );
}

#[test]
fn embed_workflow_off_embeds_nothing() {
    let mut task = task_with_metadata(1, 1, json!({}));
    task.options.embed_workflow = false;
    assert!(Metadata::from_task(&task).is_empty());
}

/// RIFF chunks of a WebP file as (fourcc, data).
fn riff_chunks(webp: &[u8]) -> Vec<(String, Vec<u8>)> {
    assert_eq!(&webp[..4], b"RIFF");
    assert_eq!(&webp[8..12], b"WEBP");
    assert_eq!(
        u32::from_le_bytes(webp[4..8].try_into().expect("4")) as usize,
        webp.len() - 8,
        "RIFF size"
    );
    let mut out = Vec::new();
    let mut at = 12;
    while at + 8 <= webp.len() {
        let len = u32::from_le_bytes(webp[at + 4..at + 8].try_into().expect("4")) as usize;
        out.push((
            String::from_utf8_lossy(&webp[at..at + 4]).into_owned(),
            webp[at + 8..at + 8 + len].to_vec(),
        ));
        at += 8 + len + len % 2;
    }
    assert_eq!(at, webp.len(), "chunks fill the file");
    out
}

fn exif_ascii_tags(tiff: &[u8]) -> Vec<(u16, String)> {
    let u16_at = |o: usize| u16::from_le_bytes([tiff[o], tiff[o + 1]]);
    let u32_at = |o: usize| u32::from_le_bytes(tiff[o..o + 4].try_into().expect("4")) as usize;
    assert_eq!(&tiff[..4], b"II*\0");
    let ifd = u32_at(4);
    (0..usize::from(u16_at(ifd)))
        .map(|i| {
            let e = ifd + 2 + 12 * i;
            let len = u32_at(e + 4);
            let at = if len <= 4 { e + 8 } else { u32_at(e + 8) };
            (
                u16_at(e),
                String::from_utf8(tiff[at..at + len - 1].to_vec()).expect("utf8"),
            )
        })
        .collect()
}

#[test]
fn webp_lossless_is_exact_even_under_transparency() {
    let (rgb, w, h) = photo();
    for channels in [1u8, 3, 4] {
        let mut px = with_channels(&rgb, channels);
        if channels == 4 {
            px[3] = 0; // a fully transparent pixel whose colour must survive
        }
        let opts = EncodeOptions {
            lossless_webp: true,
            ..options(ImageFormat::Webp)
        };
        let out = encode(
            &ImageView::new(&px, w, h, channels).expect("view"),
            &opts,
            &Metadata::default(),
        )
        .expect("encode");
        let decoded = image::load_from_memory_with_format(&out.bytes, image::ImageFormat::WebP)
            .expect("decode");
        let expected: Vec<u8> = match channels {
            1 => px.iter().flat_map(|&v| [v, v, v]).collect(),
            _ => px.clone(),
        };
        let got = if channels == 4 {
            decoded.to_rgba8().into_raw()
        } else {
            decoded.to_rgb8().into_raw()
        };
        assert!(
            got == expected,
            "lossless WebP changed pixels for channels {channels}"
        );
    }
}

#[test]
fn webp_lossy_is_close_and_carries_comfyui_exif() {
    let (rgb, w, h) = photo();
    let workflow = json!({"nodes": [{"id": 1}], "links": []});
    let task = task_with_metadata(w, h, workflow.clone());
    let out = encode(
        &ImageView::new(&rgb, w, h, 3).expect("view"),
        &options(ImageFormat::Webp),
        &Metadata::from_task(&task),
    )
    .expect("encode");
    let decoded = image::load_from_memory_with_format(&out.bytes, image::ImageFormat::WebP)
        .expect("decode")
        .to_rgb8();
    let db = psnr(&rgb, decoded.as_raw());
    assert!(db >= 35.0, "lossy WebP at 90: {db:.2} dB");

    let chunks = riff_chunks(&out.bytes);
    let names: Vec<&str> = chunks.iter().map(|(k, _)| k.as_str()).collect();
    // EXIF right after VP8X, so no odd-length chunk precedes it (see webp.rs).
    assert_eq!(names, ["VP8X", "EXIF", "VP8 "]);
    assert_eq!(chunks[0].1[0] & 0x08, 0x08, "VP8X announces EXIF");
    let tags = exif_ascii_tags(&chunks[1].1);
    let tag = |t: u16| {
        tags.iter()
            .find(|(k, _)| *k == t)
            .map(|(_, v)| v.clone())
            .expect("tag")
    };
    let prompt = tag(0x0110);
    let (key, json_text) = prompt.split_once(':').expect("key:value");
    assert_eq!(key, "prompt");
    assert_eq!(
        serde_json::from_str::<Value>(json_text).expect("json"),
        task.options.prompt.clone().expect("set")
    );
    assert_eq!(tag(0x010F), format!("workflow:{workflow}"));
    assert!(tag(0x010E).starts_with("parameters:an astronaut\n"));
    assert_eq!(tag(0x010D), "artist:Luna");
    assert_eq!(tag(0x010C), "rating:5");
    assert_eq!(tag(0x010B), "luna_job_id:job-42");
}

#[test]
fn webp_with_alpha_keeps_alpha_and_exif() {
    let (rgb, w, h) = photo();
    let px = with_channels(&rgb, 4);
    let task = task_with_metadata(w, h, json!({}));
    let out = encode(
        &ImageView::new(&px, w, h, 4).expect("view"),
        &options(ImageFormat::Webp),
        &Metadata::from_task(&task),
    )
    .expect("encode");
    let names: Vec<String> = riff_chunks(&out.bytes)
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(names, ["VP8X", "EXIF", "ALPH", "VP8 "]);
    let decoded =
        image::load_from_memory_with_format(&out.bytes, image::ImageFormat::WebP).expect("decode");
    assert!(decoded.color().has_alpha());
}

#[test]
fn jpeg_quality_gray_and_rgba_flattening() {
    let (rgb, w, h) = photo();
    let view = ImageView::new(&rgb, w, h, 3).expect("view");
    let out = encode(&view, &options(ImageFormat::Jpeg), &Metadata::default()).expect("encode");
    let decoded =
        image::load_from_memory_with_format(&out.bytes, image::ImageFormat::Jpeg).expect("decode");
    let db = psnr(&rgb, decoded.to_rgb8().as_raw());
    assert!(db >= 35.0, "JPEG at 90: {db:.2} dB");
    assert!(out.sidecar.is_none());

    let gray = with_channels(&rgb, 1);
    let out = encode(
        &ImageView::new(&gray, w, h, 1).expect("view"),
        &options(ImageFormat::Jpeg),
        &Metadata::default(),
    )
    .expect("encode");
    let decoder =
        image::codecs::jpeg::JpegDecoder::new(std::io::Cursor::new(&out.bytes)).expect("decoder");
    assert_eq!(
        decoder.color_type(),
        image::ColorType::L8,
        "gray stays gray"
    );

    // Fully transparent red becomes white; opaque red stays red.
    let rgba = [255u8, 0, 0, 0]
        .repeat(64)
        .into_iter()
        .chain([255u8, 0, 0, 255].repeat(64))
        .collect::<Vec<u8>>();
    let out = encode(
        &ImageView::new(&rgba, 8, 16, 4).expect("view"),
        &options(ImageFormat::Jpeg),
        &Metadata::default(),
    )
    .expect("encode");
    let decoded = image::load_from_memory(&out.bytes)
        .expect("decode")
        .to_rgb8();
    let top = decoded.get_pixel(4, 2).0;
    let bottom = decoded.get_pixel(4, 13).0;
    assert!(
        top.iter().all(|&c| c > 240),
        "transparent flattens onto white: {top:?}"
    );
    assert!(
        bottom[0] > 230 && bottom[1] < 30 && bottom[2] < 30,
        "opaque stays red: {bottom:?}"
    );
}

fn jpeg_exif(jpeg: &[u8]) -> Option<Vec<u8>> {
    let mut at = 2;
    while at + 4 <= jpeg.len() && jpeg[at] == 0xFF {
        let marker = jpeg[at + 1];
        let len = usize::from(u16::from_be_bytes([jpeg[at + 2], jpeg[at + 3]]));
        if marker == 0xE1 && jpeg[at + 4..].starts_with(b"Exif\0\0") {
            return Some(jpeg[at + 10..at + 2 + len].to_vec());
        }
        if marker == 0xDA {
            break;
        }
        at += 2 + len;
    }
    None
}

#[test]
fn jpeg_carries_exif_and_spills_oversized_metadata_to_a_sidecar() {
    let (rgb, w, h) = photo();
    let view = ImageView::new(&rgb, w, h, 3).expect("view");
    let small = task_with_metadata(w, h, json!({"nodes": []}));
    let out = encode(
        &view,
        &options(ImageFormat::Jpeg),
        &Metadata::from_task(&small),
    )
    .expect("encode");
    assert!(out.sidecar.is_none());
    let tags = exif_ascii_tags(&jpeg_exif(&out.bytes).expect("APP1 Exif"));
    assert!(
        tags.iter()
            .any(|(t, v)| *t == 0x010F && v == "workflow:{\"nodes\":[]}")
    );

    // A 200 KB workflow cannot fit in one APP1 segment.
    let nodes: Vec<Value> = (0..2000)
        .map(|i| json!({"id": i, "type": "KSampler", "widgets": "x".repeat(80)}))
        .collect();
    let big_workflow = json!({ "nodes": nodes });
    let big = task_with_metadata(w, h, big_workflow.clone());
    let out = encode(
        &view,
        &options(ImageFormat::Jpeg),
        &Metadata::from_task(&big),
    )
    .expect("encode");
    image::load_from_memory_with_format(&out.bytes, image::ImageFormat::Jpeg)
        .expect("image stays valid");
    let sidecar: Value =
        serde_json::from_slice(&out.sidecar.expect("sidecar")).expect("sidecar is JSON");
    assert_eq!(sidecar["workflow"], big_workflow, "nothing dropped");
    assert_eq!(sidecar["prompt"], big.options.prompt.clone().expect("set"));
    assert_eq!(sidecar["luna_job_id"], "job-42");
    let tags = exif_ascii_tags(&jpeg_exif(&out.bytes).expect("APP1 Exif"));
    let values: Vec<&str> = tags.iter().map(|(_, v)| v.as_str()).collect();
    assert!(
        values.iter().any(|v| v.starts_with("luna_sidecar:")),
        "{values:?}"
    );
    assert!(values.contains(&"luna_job_id:job-42"));
    assert!(
        values.iter().any(|v| v.starts_with("prompt:")),
        "the small prompt still fits"
    );
    assert!(!values.iter().any(|v| v.starts_with("workflow:")));
}

/// Float samples with values that exercise rounding and clipping, as little-endian bytes.
fn float_frame(w: u32, h: u32, channels: u8) -> (Vec<f32>, Vec<u8>) {
    let n = (w * h * u32::from(channels)) as usize;
    let values: Vec<f32> = (0..n)
        .map(|i| match i % 11 {
            0 => -0.25,
            1 => 1.5,
            2 => 0.5 / 65535.0,
            _ => (i as f32 * 0.618_034).fract(),
        })
        .collect();
    let bytes = values.iter().flat_map(|x| x.to_le_bytes()).collect();
    (values, bytes)
}

/// The contract's rounding, in f32 as numpy computes it on a float32 tensor:
/// `trunc(clip(x * 65535 + 0.5, 0, 65535))`.
fn expected_u16(x: f32) -> u16 {
    (x * 65535.0 + 0.5).clamp(0.0, 65535.0) as u16
}

#[test]
fn png16_from_floats_is_round_x_times_65535_in_every_layout_and_level() {
    let (w, h) = (37u32, 23u32);
    for channels in [1u8, 3, 4] {
        let (values, bytes) = float_frame(w, h, channels);
        let view = ImageView::with_sample(&bytes, w, h, channels, SampleType::F32).expect("view");
        for level in [0u8, 1, 4, 9] {
            let opts = EncodeOptions {
                png_compression: level,
                ..options(ImageFormat::Png16)
            };
            let out = encode(&view, &opts, &Metadata::default()).expect("encode");
            let ihdr = &png_chunks(&out.bytes)[0].1;
            assert_eq!(ihdr[8], 16, "bit depth");
            let decoded = image::load_from_memory_with_format(&out.bytes, image::ImageFormat::Png)
                .expect("decode");
            let samples: Vec<u16> = match channels {
                1 => decoded.to_luma16().into_raw(),
                3 => decoded.to_rgb16().into_raw(),
                _ => decoded.to_rgba16().into_raw(),
            };
            let expected: Vec<u16> = values.iter().map(|&x| expected_u16(x)).collect();
            assert_eq!(samples, expected, "channels {channels} level {level}");
        }
    }
}

#[test]
fn png16_keeps_u16_samples_and_png_text_chunks() {
    let (rgb, w, h) = photo();
    // Spread the photo over the 16-bit range with low bits set, so byte order matters.
    let wide: Vec<u16> = rgb
        .iter()
        .enumerate()
        .map(|(i, &v)| u16::from(v) * 256 + (i % 251) as u16)
        .collect();
    let bytes: Vec<u8> = wide.iter().flat_map(|v| v.to_le_bytes()).collect();
    let task = task_with_metadata(w, h, json!({"nodes": [], "links": []}));
    let meta = Metadata::from_task(&task);
    let view = ImageView::with_sample(&bytes, w, h, 3, SampleType::U16).expect("view");
    let out = encode(&view, &options(ImageFormat::Png16), &meta).expect("encode");
    let decoded = image::load_from_memory(&out.bytes)
        .expect("decode")
        .to_rgb16();
    assert_eq!(decoded.into_raw(), wide);
    let eight = encode(
        &ImageView::new(&rgb, w, h, 3).expect("view"),
        &options(ImageFormat::Png),
        &meta,
    )
    .expect("encode");
    assert_eq!(png_texts(&out.bytes), png_texts(&eight.bytes));
    // 8-bit input widens by x * 257 (0 -> 0, 255 -> 65535).
    let widened = encode(
        &ImageView::new(&rgb, w, h, 3).expect("view"),
        &options(ImageFormat::Png16),
        &meta,
    )
    .expect("encode");
    let decoded = image::load_from_memory(&widened.bytes)
        .expect("decode")
        .to_rgb16();
    assert!(
        decoded
            .into_raw()
            .iter()
            .zip(&rgb)
            .all(|(&a, &b)| a == u16::from(b) * 257)
    );
}

#[test]
fn eight_bit_formats_narrow_float_and_u16_samples() {
    let (w, h) = (9u32, 5u32);
    let (values, bytes) = float_frame(w, h, 3);
    let narrowed: Vec<u8> = values
        .iter()
        .map(|&x| (x * 255.0 + 0.5).clamp(0.0, 255.0) as u8)
        .collect();
    let view = ImageView::with_sample(&bytes, w, h, 3, SampleType::F32).expect("view");
    let from_float = encode(&view, &options(ImageFormat::Png), &Metadata::default()).expect("png");
    let from_u8 = encode(
        &ImageView::new(&narrowed, w, h, 3).expect("view"),
        &options(ImageFormat::Png),
        &Metadata::default(),
    )
    .expect("png");
    assert_eq!(
        from_float.bytes, from_u8.bytes,
        "same file as the 8-bit frame"
    );
}

/// The Exif sub-IFD's UserComment, following IFD0's 0x8769 pointer.
fn user_comment(tiff: &[u8]) -> Option<Vec<u8>> {
    let u16_at = |o: usize| u16::from_le_bytes([tiff[o], tiff[o + 1]]);
    let u32_at = |o: usize| u32::from_le_bytes(tiff[o..o + 4].try_into().expect("4")) as usize;
    let ifd = u32_at(4);
    let pointer = (0..usize::from(u16_at(ifd)))
        .map(|i| ifd + 2 + 12 * i)
        .find(|&e| u16_at(e) == 0x8769)?;
    let sub = u32_at(pointer + 8);
    (0..usize::from(u16_at(sub)))
        .map(|i| sub + 2 + 12 * i)
        .find(|&e| u16_at(e) == 0x9286)
        .map(|e| {
            let len = u32_at(e + 4);
            tiff[u32_at(e + 8)..u32_at(e + 8) + len].to_vec()
        })
}

#[test]
fn a1111_parameters_also_go_into_user_comment_for_jpeg_and_webp() {
    let (rgb, w, h) = photo();
    for (positive, prefix) in [
        ("an astronaut", &b"ASCII\0\0\0"[..]),
        ("月の光", &b"UNICODE\0"[..]),
    ] {
        let mut task = task_with_metadata(w, h, json!({}));
        task.options.metadata = Some(json!({"positive": positive, "steps": 20}));
        let meta = Metadata::from_task(&task);
        let parameters = format!("{positive}\nSteps: 20, Size: 256x256, Model: sdxl");
        let view = ImageView::new(&rgb, w, h, 3).expect("view");
        let jpeg = encode(&view, &options(ImageFormat::Jpeg), &meta).expect("jpeg");
        let webp = encode(&view, &options(ImageFormat::Webp), &meta).expect("webp");
        let tiffs = [
            jpeg_exif(&jpeg.bytes).expect("jpeg exif"),
            riff_chunks(&webp.bytes)
                .into_iter()
                .find(|(k, _)| k == "EXIF")
                .expect("EXIF")
                .1,
        ];
        for tiff in tiffs {
            let comment = user_comment(&tiff).expect("UserComment");
            assert_eq!(&comment[..8], prefix);
            let text = if prefix == b"ASCII\0\0\0" {
                String::from_utf8(comment[8..].to_vec()).expect("ascii")
            } else {
                let units: Vec<u16> = comment[8..]
                    .chunks_exact(2)
                    .map(|b| u16::from_be_bytes([b[0], b[1]]))
                    .collect();
                String::from_utf16(&units).expect("utf-16")
            };
            assert_eq!(text, parameters);
            // ComfyUI's scheme in IFD0 is unchanged.
            assert!(
                exif_ascii_tags(&tiff)
                    .iter()
                    .any(|(_, v)| *v == format!("parameters:{parameters}"))
            );
        }
    }
}

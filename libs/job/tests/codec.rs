//! Round trips through both codecs, and decoders fed garbage.

use chrono::{DateTime, FixedOffset};
use luna_job::codec::{from_json, from_msgpack, to_json, to_msgpack};
use luna_job::{
    Event, EventKind, ImageFormat, ImageInput, JobId, Limits, QualityGate, SaveRequest, SaveTask,
};
use proptest::prelude::*;
use serde_json::json;

fn sample_request() -> SaveRequest {
    SaveRequest {
        save_path: "renders/%model_name%".into(),
        model_name: "checkpoints/sdxl_base.safetensors".into(),
        quality_gate: QualityGate::Both,
        prompt: Some(json!({"3": {"class_type": "KSampler", "inputs": {"seed": 42}}})),
        extra_pnginfo: Some(json!({"workflow": {"nodes": [], "links": []}})),
        metadata: Some(json!({"seed": 42, "steps": 30, "positive": "a lighthouse, ünïcødé"})),
        custom_metadata: Some(json!("{\"artist\": \"me\"}")),
        images: vec![
            ImageInput {
                pixels: vec![7; 2 * 3 * 3].into(),
                width: 2,
                height: 3,
                ..Default::default()
            },
            ImageInput {
                pixels: vec![9; 4 * 4 * 4].into(),
                width: 4,
                height: 4,
                channels: 4,
                affix: "FINAL".into(),
                format: ImageFormat::Webp,
                batch_index: Some(1),
                batch_size: Some(2),
                ..Default::default()
            },
        ],
        ..Default::default()
    }
}

fn submitted_at() -> DateTime<FixedOffset> {
    DateTime::parse_from_rfc3339("2025-12-09T14:30:05+01:00").expect("valid time")
}

#[test]
fn request_round_trips_through_msgpack_and_json() {
    let req = sample_request();
    let mp = to_msgpack(&req).expect("encode");
    assert_eq!(from_msgpack::<SaveRequest>(&mp).expect("decode"), req);
    let js = to_json(&req).expect("encode");
    assert_eq!(
        from_json::<SaveRequest>(js.as_bytes()).expect("decode"),
        req
    );
}

#[test]
fn msgpack_uses_named_fields_and_bin_pixels() {
    let mp = to_msgpack(&sample_request()).expect("encode");
    // A generic reader sees a map keyed by the contract's names, with pixels as bytes.
    let v: rmpv::Value = rmpv::decode::read_value(&mut mp.as_slice()).expect("generic decode");
    let images = v
        .as_map()
        .expect("a map")
        .iter()
        .find(|(k, _)| k.as_str() == Some("images"));
    let first = images.expect("images key").1.as_array().expect("array")[0].clone();
    let pixels = first
        .as_map()
        .expect("map")
        .iter()
        .find(|(k, _)| k.as_str() == Some("pixels"));
    assert!(matches!(
        pixels.expect("pixels key").1,
        rmpv::Value::Binary(_)
    ));
}

#[test]
fn defaults_follow_the_contract() {
    let req: SaveRequest =
        from_json(br#"{"images": [{"pixels": "AAAA", "width": 1, "height": 1}]}"#).expect("decode");
    assert_eq!(req.filename, "%time:YYYY_mm_dd.HH.MM.SS%_%model_name%");
    assert_eq!(req.save_path, "");
    assert_eq!(req.index, 0);
    assert_eq!(req.quality_gate, QualityGate::Disabled);
    assert!((req.min_quality_threshold - 0.3).abs() < f64::EPSILON);
    assert!(req.keep_rejected);
    assert_eq!(req.png_compression, 4);
    assert_eq!(req.lossy_quality, 90);
    assert!(!req.lossless_webp);
    assert!(req.embed_workflow);
    let image = &req.images[0];
    assert_eq!(
        (image.channels, image.format, image.subdir),
        (3, ImageFormat::Png, true)
    );
    assert_eq!(image.affix, "");
    req.validate(&Limits::default()).expect("valid");
}

#[test]
fn unknown_fields_are_ignored_and_wrong_types_name_the_field() {
    let ok: SaveRequest = from_json(
        br#"{"future_field": 1, "images": [{"pixels": "AAAA", "width": 1, "height": 1, "x": []}]}"#,
    )
    .expect("unknown fields ignored");
    assert_eq!(ok.images.len(), 1);
    let err =
        from_json::<SaveRequest>(br#"{"images": [{"width": "wide"}]}"#).expect_err("wrong type");
    assert!(err.to_string().contains("images[0].width"), "{err}");
    let err =
        from_json::<SaveRequest>(br#"{"images": [{"format": "gif"}]}"#).expect_err("bad format");
    assert!(
        err.to_string().contains("images[0].format") && err.to_string().contains("gif"),
        "{err}"
    );
}

#[test]
fn tasks_carry_the_job_and_round_trip() {
    let job = JobId::new();
    let tasks = sample_request().into_tasks(&job, submitted_at());
    assert_eq!(tasks.len(), 2);
    for (i, task) in tasks.iter().enumerate() {
        assert_eq!(task.image_index as usize, i);
        assert_eq!(task.num_images, 2);
        assert_eq!(task.job_id, job);
        assert_eq!(
            task.submitted_at.offset().local_minus_utc(),
            3600,
            "offset survives"
        );
        assert_eq!(
            task.options.custom_metadata,
            Some(json!({"artist": "me"})),
            "JSON string parsed once"
        );
        task.validate().expect("valid task");
        let back: SaveTask = from_msgpack(&to_msgpack(task).expect("encode")).expect("decode");
        assert_eq!(&back, task);
    }
}

#[test]
fn events_are_flat_objects_with_the_contract_names() {
    let job = JobId::parse("job-1").expect("id");
    let event = Event::now(
        job,
        EventKind::ImageFailed {
            index: 2,
            error: "disk full".into(),
            attempt: 3,
            is_final: true,
        },
    );
    let v: serde_json::Value =
        serde_json::from_str(&to_json(&event).expect("json")).expect("parse");
    assert_eq!(v["event"], "image_failed");
    assert_eq!(v["job_id"], "job-1");
    assert_eq!(v["final"], true);
    assert_eq!(v["index"], 2);
    assert!(
        v["timestamp"].as_str().expect("string").ends_with('Z'),
        "RFC 3339 UTC"
    );
    let back: Event = from_msgpack(&to_msgpack(&event).expect("encode")).expect("decode");
    assert_eq!(back, event);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = from_msgpack::<SaveRequest>(&bytes);
        let _ = from_msgpack::<SaveTask>(&bytes);
        let _ = from_msgpack::<Event>(&bytes);
        let _ = from_json::<SaveRequest>(&bytes);
        let _ = from_json::<Event>(&bytes);
    }

    #[test]
    fn truncated_and_corrupted_messages_never_panic(cut in 0usize..4096, flip in 0usize..4096, bit in 0u8..8) {
        let task = sample_request().into_tasks(&JobId::new(), submitted_at()).remove(1);
        let bytes = to_msgpack(&task).expect("encode");
        let mut corrupted = bytes.clone();
        corrupted[flip % bytes.len()] ^= 1 << bit;
        let _ = from_msgpack::<SaveTask>(&corrupted);
        prop_assert!(from_msgpack::<SaveTask>(&bytes[..cut % bytes.len()]).is_err());
    }
}

#[test]
fn deeply_nested_input_is_an_error_not_a_stack_overflow() {
    let mut mp = Vec::new();
    mp.extend_from_slice(&[0x81, 0xa6]);
    mp.extend_from_slice(b"prompt");
    mp.extend(std::iter::repeat_n(0x91u8, 200_000)); // fixarray of one, nested
    assert!(from_msgpack::<SaveRequest>(&mp).is_err());
    let json = format!("{{\"prompt\": {}}}", "[".repeat(200_000));
    assert!(from_json::<SaveRequest>(json.as_bytes()).is_err());
}

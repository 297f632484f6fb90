//! Validation names the field, the value and what is allowed, and reports every problem at once.

use luna_job::{ImageFormat, ImageInput, Limits, SaveRequest};
use serde_json::json;

fn image(width: u32, height: u32, channels: u32) -> ImageInput {
    let len = (width * height * channels) as usize;
    ImageInput {
        pixels: vec![0; len].into(),
        width,
        height,
        channels,
        ..Default::default()
    }
}

fn problems(req: &SaveRequest) -> Vec<String> {
    match req.validate(&Limits::default()) {
        Ok(()) => Vec::new(),
        Err(e) => e.0.iter().map(ToString::to_string).collect(),
    }
}

#[test]
fn a_good_request_passes() {
    let req = SaveRequest {
        images: vec![image(8, 8, 3), image(8, 8, 1), image(8, 8, 4)],
        ..Default::default()
    };
    assert!(problems(&req).is_empty());
}

#[test]
fn every_problem_is_reported_with_field_value_and_range() {
    let mut bad = image(4, 4, 3);
    bad.pixels = vec![0; 10].into();
    let req = SaveRequest {
        png_compression: 12,
        lossy_quality: 50,
        min_quality_threshold: 1.5,
        index: -1,
        images: vec![image(2, 2, 3), bad, image(2, 2, 2)],
        ..Default::default()
    };
    let found = problems(&req);
    let expect = [
        "png_compression is 12; allowed 0 to 9",
        "lossy_quality is 50; allowed 70 to 100",
        "min_quality_threshold is 1.5; allowed 0.0 to 1.0",
        "index is -1; it must be 0 or more",
        "images[1].pixels has 10 bytes; width 4 x height 4 x channels 3 needs 48",
        "images[2].channels is 2; allowed 1 (gray), 3 (RGB) or 4 (RGBA)",
    ];
    for e in expect {
        assert!(found.iter().any(|f| f == e), "missing {e:?} in {found:#?}");
    }
    assert_eq!(found.len(), expect.len(), "{found:#?}");
}

#[test]
fn image_count_is_limited() {
    let none = SaveRequest::default();
    assert_eq!(
        problems(&none),
        ["images is empty; a job needs at least one image"]
    );
    let many = SaveRequest {
        images: vec![image(1, 1, 3); 6],
        ..Default::default()
    };
    assert!(many.validate(&Limits { max_images: 5 }).is_err());
    assert!(many.validate(&Limits { max_images: 6 }).is_ok());
}

#[test]
fn sizes_are_checked_per_format() {
    let mut webp = image(1, 1, 3);
    webp.format = ImageFormat::Webp;
    webp.width = 16_384;
    webp.pixels = vec![0; 16_384 * 3].into();
    let found = problems(&SaveRequest {
        images: vec![webp, image(0, 5, 3)],
        ..Default::default()
    });
    assert!(
        found.contains(&"images[0].width is 16384; allowed 1 to 16383 for webp".to_owned()),
        "{found:?}"
    );
    assert!(
        found.contains(&"images[1].width is 0; allowed 1 to 65535 for png".to_owned()),
        "{found:?}"
    );
}

#[test]
fn metadata_must_be_objects_with_embeddable_keys() {
    let req = SaveRequest {
        prompt: Some(json!([1, 2])),
        extra_pnginfo: Some(json!({"workflow": {}, " bad": 1})),
        custom_metadata: Some(json!({"prompt": "x", "workflow": "y", "artist": "me"})),
        images: vec![image(1, 1, 3)],
        ..Default::default()
    };
    let found = problems(&req);
    assert!(
        found.contains(&"prompt must be an object or null, not an array".to_owned()),
        "{found:?}"
    );
    assert!(
        found
            .iter()
            .any(|f| f.starts_with("extra_pnginfo.\" bad\" is not a usable key")),
        "{found:?}"
    );
    assert!(found.iter().any(|f| f.starts_with("custom_metadata.\"prompt\" is a key Luna Saver already writes")));
    assert!(
        found
            .iter()
            .any(|f| f.starts_with("custom_metadata.\"workflow\" is a key")),
        "{found:?}"
    );
    assert_eq!(found.len(), 4, "{found:#?}");
}

#[test]
fn custom_metadata_may_be_a_json_string_but_not_free_text() {
    let with = |v| SaveRequest {
        custom_metadata: Some(v),
        images: vec![image(1, 1, 3)],
        ..Default::default()
    };
    assert!(problems(&with(json!("{\"artist\": \"me\"}"))).is_empty());
    assert!(
        problems(&with(json!(""))).is_empty(),
        "an empty text box means no metadata"
    );
    let found = problems(&with(json!("artist=me")));
    assert!(
        found[0].starts_with("custom_metadata is a string but not valid JSON"),
        "{found:?}"
    );
    let found = problems(&with(json!(42)));
    assert!(found[0].contains("not a number"), "{found:?}");
}

#[test]
fn batch_fields_are_consistent() {
    let mut img = image(1, 1, 3);
    img.batch_index = Some(3);
    img.batch_size = Some(2);
    let found = problems(&SaveRequest {
        images: vec![img],
        ..Default::default()
    });
    assert_eq!(
        found,
        ["images[0].batch_index is 3; allowed 0 to 1 for batch_size 2"]
    );
}

#[test]
fn model_name_is_bounded_because_templates_copy_it() {
    // Every `%model_path%` of a template copies the whole model name: unbounded, a 100 MB name
    // under a hundred such tokens renders gigabytes in the gateway before any path check.
    let limit = luna_job::validate::MAX_MODEL_NAME_LEN;
    let request = |len: usize| SaveRequest {
        model_name: "m".repeat(len),
        save_path: "%model_path%".repeat(80),
        images: vec![image(1, 1, 3)],
        ..Default::default()
    };
    assert!(problems(&request(limit)).is_empty());
    assert_eq!(
        problems(&request(limit + 1)),
        [format!(
            "model_name is {} bytes long; at most {limit}",
            limit + 1
        )]
    );
}

#[test]
fn deep_samples_count_their_bytes_and_exr_precision_is_16_or_32() {
    let mut deep = image(2, 2, 3);
    deep.sample = luna_job::SampleType::F32;
    let req = SaveRequest {
        exr_precision: 24,
        images: vec![deep],
        ..Default::default()
    };
    let found = problems(&req);
    assert!(
        found.contains(&"exr_precision is 24; allowed 16 (half float) or 32 (float)".to_owned()),
        "{found:#?}"
    );
    assert!(
        found.contains(&"images[0].pixels has 12 bytes; width 2 x height 2 x channels 3 x 4 bytes per f32 sample needs 48".to_owned()),
        "{found:#?}"
    );
}

#[test]
fn a_handoff_is_a_plain_name_and_never_in_a_task() {
    let mut img = image(2, 2, 3);
    img.pixels = Vec::new().into();
    img.handoff = Some(luna_job::HandoffRef {
        name: "../etc/passwd".into(),
        offset: 0,
    });
    let req = SaveRequest {
        images: vec![img],
        ..Default::default()
    };
    let found = problems(&req);
    assert_eq!(
        found,
        ["images[0].handoff.name \"../etc/passwd\" is not a plain file name"],
        "{found:#?}"
    );
}

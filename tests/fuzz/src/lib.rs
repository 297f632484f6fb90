//! Fuzz targets: what the services do with bytes from the network, in one place.
//!
//! The coverage-guided fuzzer in `fuzz/` (cargo-fuzz, libFuzzer) and the corpus replay test in
//! `tests/replay.rs` (run by `cargo test --workspace`, so by `tests/run` and CI) both call
//! [`Target::run`], so the code they exercise cannot drift apart. A target returns normally
//! for any input, valid or not; a panic (including a failed invariant below) is a finding.
//!
//! # Layout
//! - [`Target`]: the targets, by the name of their corpus folder.
//! - [`request_json`], [`request_msgpack`]: `POST /v1/jobs` as the gateway handles it.
//! - [`task_msgpack`]: a queued task as a saver handles it.
//! - [`template`]: the template renderer on any template, model name, index and time.
//! - [`seeds`]: valid inputs the corpus started from.

use chrono::{DateTime, FixedOffset};
use luna_imaging::template::{self as tpl, PathError, TemplateContext};
use luna_job::codec::{from_json, from_msgpack, to_json, to_msgpack};
use luna_job::{ImageFormat, ImageInput, JobId, Limits, SaveRequest, SaveTask};
use luna_store::Placement;
use luna_store::placement::{DISCARDED_DIR, MAX_COMPONENT_LEN, MAX_PATH_LEN, MAX_STEM_LEN};

/// One fuzz target; its name is the folder of its corpus under `fuzz/corpus/` and the name
/// of its binary under `fuzz/fuzz_targets/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    RequestJson,
    RequestMsgpack,
    TaskMsgpack,
    Template,
}

impl Target {
    pub const ALL: [Target; 4] = [
        Self::RequestJson,
        Self::RequestMsgpack,
        Self::TaskMsgpack,
        Self::Template,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::RequestJson => "request_json",
            Self::RequestMsgpack => "request_msgpack",
            Self::TaskMsgpack => "task_msgpack",
            Self::Template => "template",
        }
    }

    /// Feeds `data` to the target and tells how far it got.
    ///
    /// # Panics
    /// When the code under test panics or breaks one of the invariants checked here.
    pub fn run(self, data: &[u8]) -> Reach {
        match self {
            Self::RequestJson => request_json(data),
            Self::RequestMsgpack => request_msgpack(data),
            Self::TaskMsgpack => task_msgpack(data),
            Self::Template => template(data),
        }
    }
}

/// How far an input got: the replay test counts these to show the corpus reaches every stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reach {
    /// The decoder refused it.
    Undecodable,
    /// Decoded, then refused by validation.
    Invalid,
    /// Valid, but a template rendered to an unusable path.
    Unplaceable,
    /// Every stage accepted it.
    Placed,
}

/// A JSON `POST /v1/jobs` body through the gateway's path: decode, validate, split into
/// tasks, render every placement, encode; then each task through a saver's path.
pub fn request_json(data: &[u8]) -> Reach {
    match from_json::<SaveRequest>(data) {
        Ok(request) => accept(request, submission_time(data)),
        Err(e) => {
            let _ = e.to_string();
            Reach::Undecodable
        }
    }
}

/// A MessagePack `POST /v1/jobs` body, as [`request_json`].
pub fn request_msgpack(data: &[u8]) -> Reach {
    match from_msgpack::<SaveRequest>(data) {
        Ok(request) => accept(request, submission_time(data)),
        Err(e) => {
            let _ = e.to_string();
            Reach::Undecodable
        }
    }
}

/// A task from the queue through a saver's path: decode, validate, render its placement.
pub fn task_msgpack(data: &[u8]) -> Reach {
    let task = match from_msgpack::<SaveTask>(data) {
        Ok(task) => task,
        Err(e) => {
            let _ = e.to_string();
            return Reach::Undecodable;
        }
    };
    let _ = task.key().to_string();
    if let Err(e) = task.validate() {
        let _ = e.to_string();
        return Reach::Invalid;
    }
    match Placement::for_task(&task) {
        Ok(placement) => {
            check_placement(&placement);
            Reach::Placed
        }
        Err(e) => {
            let _ = e.to_problem("image").to_string();
            Reach::Unplaceable
        }
    }
}

/// The template renderer. Input layout: bytes 0..8 the time (Unix seconds, little endian),
/// 8..12 its UTC offset in seconds, 12..20 `%index%`, then UTF-8 (lossy) text: the template,
/// and after the first NUL the model name, which doubles as `%source%`. Missing bytes count as
/// zero.
pub fn template(data: &[u8]) -> Reach {
    let mut head = [0u8; 20];
    let n = data.len().min(head.len());
    head[..n].copy_from_slice(&data[..n]);
    let text = String::from_utf8_lossy(&data[n..]);
    let (template, model) = text.split_once('\0').unwrap_or((&text, ""));
    let [
        s0,
        s1,
        s2,
        s3,
        s4,
        s5,
        s6,
        s7,
        o0,
        o1,
        o2,
        o3,
        i0,
        i1,
        i2,
        i3,
        i4,
        i5,
        i6,
        i7,
    ] = head;
    let ctx = TemplateContext {
        model_name: model,
        index: i64::from_le_bytes([i0, i1, i2, i3, i4, i5, i6, i7]),
        source: model,
        time: time_from(
            i64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]),
            i32::from_le_bytes([o0, o1, o2, o3]),
        ),
    };

    let rendered = tpl::render(template, &ctx);
    assert_eq!(
        tpl::sanitize(&rendered),
        rendered,
        "render output is sanitized"
    );
    let reach = match tpl::render_relative(template, &ctx) {
        Ok(parts) => {
            assert!(!rendered.starts_with('/'), "{rendered:?} is absolute");
            for part in &parts {
                check_component(part);
            }
            Reach::Placed
        }
        Err(PathError::Absolute(p)) => {
            assert!(p.starts_with('/'), "{p:?} is not absolute");
            Reach::Unplaceable
        }
        Err(PathError::ParentDir(p)) => {
            assert!(p.split('/').any(|c| c == ".."), "{p:?} has no `..`");
            Reach::Unplaceable
        }
    };

    let name = tpl::model_name(model);
    assert!(
        !name.is_empty() && !name.contains('/'),
        "model_name {name:?}"
    );
    for value in [tpl::model_path(model), tpl::model_dir(model)] {
        assert!(!value.is_empty() && !value.starts_with('/'), "{value:?}");
    }
    let _ = tpl::format_time(template, &ctx.time);
    reach
}

/// A time from arbitrary numbers: seconds folded into chrono's range, offset into a day.
fn time_from(secs: i64, offset: i32) -> DateTime<FixedOffset> {
    // chrono represents about +-262,000 years; 8.2e12 s is just inside on both sides.
    let utc = DateTime::from_timestamp(secs % 8_200_000_000_000, 0).unwrap_or_default();
    match FixedOffset::east_opt(offset % 86_400) {
        Some(offset) => utc.with_timezone(&offset),
        None => utc.fixed_offset(),
    }
}

/// The gateway's `submitted_at` is its clock; the fuzzer varies it among a few real ones.
fn submission_time(data: &[u8]) -> DateTime<FixedOffset> {
    const TIMES: [(i64, i32); 4] = [
        (1_765_287_005, 3_600),
        (0, 0),
        (253_402_300_799, 14 * 3_600),
        (-62_135_596_800, -12 * 3_600),
    ];
    let (secs, offset) = TIMES[data.len() % TIMES.len()];
    time_from(secs, offset)
}

fn accept(request: SaveRequest, submitted_at: DateTime<FixedOffset>) -> Reach {
    if let Err(e) = request.validate(&Limits::default()) {
        let _ = e.to_string();
        return Reach::Invalid;
    }
    let tasks = request.into_tasks(&JobId::new(), submitted_at);
    let mut placements = Vec::with_capacity(tasks.len());
    for task in &tasks {
        match Placement::for_task(task) {
            Ok(p) => placements.push(p),
            Err(e) => {
                // The gateway answers 400 with this text.
                let _ = e.to_problem("images[0]").to_string();
                return Reach::Unplaceable;
            }
        }
    }
    for (task, placement) in tasks.iter().zip(&placements) {
        check_placement(placement);
        // What the gateway accepted, a saver must take as is: same task, valid, same place.
        let body = to_msgpack(task).unwrap_or_else(|e| panic!("an accepted task must encode: {e}"));
        let queued: SaveTask = from_msgpack(&body)
            .unwrap_or_else(|e| panic!("a saver cannot decode an accepted task: {e}"));
        assert_eq!(
            &queued, task,
            "the task changed on the way through the queue"
        );
        if let Err(e) = queued.validate() {
            panic!("a saver would park an accepted task: {e}");
        }
        assert_eq!(
            Placement::for_task(&queued).as_ref(),
            Ok(placement),
            "a saver would place the task elsewhere"
        );
    }
    Reach::Placed
}

fn check_placement(p: &Placement) {
    for dir in &p.dirs {
        check_component(dir);
    }
    check_component(&p.stem);
    assert!(
        p.stem.len() <= MAX_STEM_LEN,
        "stem {:?} is too long",
        p.stem
    );
    let path = p.relative_path(0);
    assert!(
        path.split('/').all(|c| !matches!(c, "" | "." | "..")),
        "relative path {path:?}"
    );
    // Every name the file system will be asked for fits it, the longest suffix included.
    assert!(path.len() < MAX_PATH_LEN, "path of {} bytes", path.len());
    assert!(
        p.file_name(99_999).len() <= MAX_COMPONENT_LEN,
        "file name {:?}",
        p.file_name(99_999)
    );
    assert_eq!(
        p.discarded().dirs.last().map(String::as_str),
        Some(DISCARDED_DIR)
    );
}

/// One path component: a plain name that stays where it is put.
fn check_component(c: &str) {
    assert!(!matches!(c, "" | "." | ".."), "component {c:?}");
    assert!(!c.contains('/'), "component {c:?} has a separator");
    assert!(
        c.len() <= MAX_COMPONENT_LEN,
        "component of {} bytes",
        c.len()
    );
    assert_eq!(tpl::sanitize(c), c, "component {c:?} has unsafe characters");
}

/// Valid inputs for every target, from which the corpus was grown; the replay test runs them
/// too, so each target is reached past its decoder even without a corpus on disk.
pub fn seeds() -> Vec<(Target, Vec<u8>)> {
    let mut out = Vec::new();
    for request in sample_requests() {
        if let Ok(json) = to_json(&request) {
            out.push((Target::RequestJson, json.into_bytes()));
        }
        if let Ok(mp) = to_msgpack(&request) {
            out.push((Target::RequestMsgpack, mp));
        }
        let at = submission_time(&[]);
        for task in request.into_tasks(&JobId::new(), at) {
            if let Ok(mp) = to_msgpack(&task) {
                out.push((Target::TaskMsgpack, mp));
            }
        }
    }
    for (template, model) in [
        (
            luna_job::request::DEFAULT_FILENAME,
            "C:\\models\\SDXL\\juggernaut_v9.safetensors",
        ),
        (
            "%time:YYYY-mm-dd_%index%/%model_dir%/x",
            "checkpoints/sdxl/dream.ckpt",
        ),
        ("a<b>c:d\"e|f?g*h\\i\tj/../k/%model_path%", "/abs/m.pt"),
        ("%time:HH.MM.SS%%index%%model_name%%foo%100%", ""),
    ] {
        let mut data = Vec::new();
        data.extend_from_slice(&1_765_287_005i64.to_le_bytes());
        data.extend_from_slice(&32_400i32.to_le_bytes());
        data.extend_from_slice(&7i64.to_le_bytes());
        data.extend_from_slice(template.as_bytes());
        data.push(0);
        data.extend_from_slice(model.as_bytes());
        out.push((Target::Template, data));
    }
    out
}

fn sample_requests() -> Vec<SaveRequest> {
    let image = |width: u32, height: u32, channels: u32| ImageInput {
        pixels: vec![128; (width * height * channels) as usize].into(),
        width,
        height,
        channels,
        ..Default::default()
    };
    vec![
        SaveRequest {
            images: vec![image(1, 1, 3)],
            ..Default::default()
        },
        SaveRequest {
            save_path: "renders/%model_name%/%time:YYYY-mm-dd%".into(),
            filename: "%time:HH.MM.SS%_%index%".into(),
            model_name: "checkpoints/sdxl_base.safetensors".into(),
            index: 3,
            prompt: Some(
                serde_json::json!({"3": {"class_type": "KSampler", "inputs": {"seed": 42}}}),
            ),
            extra_pnginfo: Some(serde_json::json!({"workflow": {"nodes": [], "links": []}})),
            metadata: Some(serde_json::json!({"seed": 42, "steps": 30, "positive": "ünïcødé"})),
            custom_metadata: Some(serde_json::json!("{\"artist\": \"me\"}")),
            images: vec![
                image(2, 2, 4),
                ImageInput {
                    affix: "FINAL".into(),
                    format: ImageFormat::Webp,
                    batch_index: Some(1),
                    batch_size: Some(2),
                    ..image(2, 1, 1)
                },
                ImageInput {
                    affix: "x".into(),
                    subdir: false,
                    format: ImageFormat::Jpeg,
                    ..image(1, 2, 3)
                },
            ],
            ..Default::default()
        },
    ]
}

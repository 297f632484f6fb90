//! The local hand-off (`GET /v1/handoff`, `images[].handoff`), through the router: pixels read
//! from the hand-off directory equal inline ones, and nothing but a regular file directly in
//! that directory is ever read.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::time::Duration;

use axum::body::{Body, to_bytes};
use axum::http::{Request, StatusCode, header};
use luna_gateway::{AppState, Config, HandoffDir, router};
use luna_job::codec::to_msgpack;
use luna_job::{HandoffRef, ImageFormat, ImageInput, SampleType, SaveRequest, SaveTask};
use luna_queue::{Broker, MemoryBroker};
use tower::ServiceExt as _;

/// Longest wait for an answer that must come whatever is at the name (a FIFO must not block).
const ANSWER_WITHIN: Duration = Duration::from_secs(10);

fn state_with(dir: HandoffDir, max_inflight_bytes: u64) -> (AppState, Broker) {
    let mut config = Config::defaults();
    config.token = None;
    config.handoff.handoff_dir = Some(dir);
    config.max_inflight_bytes = max_inflight_bytes;
    let broker = Broker::Memory(MemoryBroker::new(10));
    (AppState::with_broker(config, broker.clone()), broker)
}

fn state(dir: &Path) -> (AppState, Broker) {
    state_with(HandoffDir::At(dir.to_owned()), 1 << 30)
}

/// A private hand-off directory inside a fresh temp folder.
fn handoff_dir() -> (tempfile::TempDir, std::path::PathBuf) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("handoff");
    (tmp, dir)
}

async fn call(state: &AppState, request: Request<Body>) -> (StatusCode, serde_json::Value) {
    let response = tokio::time::timeout(ANSWER_WITHIN, router(state.clone()).oneshot(request))
        .await
        .expect("an answer in time")
        .expect("infallible");
    let status = response.status();
    let body = to_bytes(response.into_body(), 1 << 20).await.expect("body");
    (status, serde_json::from_slice(&body).unwrap_or_default())
}

async fn post(state: &AppState, images: Vec<ImageInput>) -> (StatusCode, serde_json::Value) {
    let body = to_msgpack(&SaveRequest {
        images,
        ..Default::default()
    })
    .expect("encode");
    let request = Request::post("/v1/jobs")
        .header(header::CONTENT_TYPE, "application/msgpack")
        .body(Body::from(body))
        .expect("request");
    call(state, request).await
}

async fn tasks(broker: &Broker) -> Vec<SaveTask> {
    let mut stream = broker.consume_tasks("test").await.expect("consume");
    let mut out = Vec::new();
    while let Ok(Some(Ok(delivery))) =
        tokio::time::timeout(Duration::from_millis(200), stream.next()).await
    {
        out.push(luna_job::SaveTask::clone(&delivery.task().expect("task")));
        delivery.ack().await.expect("ack");
    }
    out.sort_by_key(|t| t.image_index);
    out
}

/// Float samples in 0..1 (with a few outside, and a NaN) as little-endian bytes.
fn float_frame(w: u32, h: u32, c: u32) -> (Vec<f32>, Vec<u8>) {
    let n = (w * h * c) as usize;
    let mut xs: Vec<f32> = (0..n).map(|i| ((i * 37) % 1001) as f32 / 1000.0).collect();
    xs[0] = -0.25;
    xs[1] = 1.5;
    xs[2] = f32::NAN;
    xs[3] = 0.5;
    let bytes = xs.iter().flat_map(|x| x.to_le_bytes()).collect();
    (xs, bytes)
}

fn shaped(w: u32, h: u32, c: u32, format: ImageFormat) -> ImageInput {
    ImageInput {
        width: w,
        height: h,
        channels: c,
        format,
        ..Default::default()
    }
}

fn handoff_image(name: &str, offset: u64, w: u32, h: u32, format: ImageFormat) -> ImageInput {
    ImageInput {
        sample: SampleType::F32,
        handoff: Some(HandoffRef {
            name: name.to_owned(),
            offset,
        }),
        ..shaped(w, h, 3, format)
    }
}

#[tokio::test]
async fn get_handoff_names_a_private_directory() {
    let (_tmp, dir) = handoff_dir();
    let (state, _) = state(&dir);
    let (status, body) = call(
        &state,
        Request::get("/v1/handoff")
            .body(Body::empty())
            .expect("request"),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["dir"], dir.to_str().expect("utf-8"));
    assert_eq!(
        body["sample_types"],
        serde_json::json!(["u8", "u16", "f32"])
    );
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|s| s.trim().to_owned());
    assert_eq!(body["boot_id"].as_str().map(str::to_owned), boot_id);
    let mode = std::fs::metadata(&dir)
        .expect("created")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o700);

    // Removed under the gateway's feet: asked again, it is there again.
    std::fs::remove_dir(&dir).expect("remove");
    let request = Request::get("/v1/handoff")
        .body(Body::empty())
        .expect("request");
    assert_eq!(call(&state, request).await.0, StatusCode::OK);
    assert!(dir.is_dir());
}

#[tokio::test]
async fn get_handoff_needs_the_token() {
    let (_tmp, dir) = handoff_dir();
    let mut config = Config::defaults();
    config.token = Some("s3cret".into());
    config.handoff.handoff_dir = Some(HandoffDir::At(dir));
    let state = AppState::with_broker(config, Broker::Memory(MemoryBroker::new(10)));
    let plain = Request::get("/v1/handoff")
        .body(Body::empty())
        .expect("request");
    assert_eq!(call(&state, plain).await.0, StatusCode::UNAUTHORIZED);
    let with_token = Request::get("/v1/handoff")
        .header(header::AUTHORIZATION, "Bearer s3cret")
        .body(Body::empty())
        .expect("request");
    assert_eq!(call(&state, with_token).await.0, StatusCode::OK);
}

#[tokio::test]
async fn handed_off_pixels_equal_inline_ones_in_every_sample_type() {
    let (_tmp, dir) = handoff_dir();
    let (state, broker) = state(&dir);
    let (w, h) = (33, 17);
    let (_, floats) = float_frame(w, h, 3);
    // Two frames in one file, the second at an offset, as a batch is written.
    let mut file = floats.clone();
    file.extend_from_slice(&floats);
    std::fs::write(dir.join("seg-1"), &file).expect("write");
    let second = floats.len() as u64;

    let formats = [ImageFormat::Png, ImageFormat::Png16, ImageFormat::Exr];
    let mut images: Vec<ImageInput> = formats
        .iter()
        .map(|&f| handoff_image("seg-1", second, w, h, f))
        .collect();
    images.extend(formats.iter().map(|&f| ImageInput {
        pixels: floats.clone().into(),
        sample: SampleType::F32,
        ..shaped(w, h, 3, f)
    }));
    let (status, body) = post(&state, images).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");

    let tasks = tasks(&broker).await;
    assert_eq!(tasks.len(), 6);
    for (i, &format) in formats.iter().enumerate() {
        let (via_handoff, inline) = (&tasks[i].image, &tasks[i + 3].image);
        assert_eq!(via_handoff.format, format);
        assert_eq!(via_handoff.sample, format.sample_type(), "{format:?}");
        assert_eq!(inline.sample, format.sample_type(), "{format:?}");
        assert!(via_handoff.handoff.is_none());
        let want = luna_imaging::samples::convert(&floats, SampleType::F32, format.sample_type())
            .expect("convert");
        assert!(
            via_handoff.pixels.as_slice() == want.as_slice(),
            "{format:?}"
        );
        assert!(inline.pixels.as_slice() == want.as_slice(), "{format:?}");
    }
    // 8-bit: exactly the node's old rounding, trunc(clamp(x * 255 + 0.5)) with NaN to 0.
    assert_eq!(&tasks[0].image.pixels.as_slice()[..4], &[0, 255, 0, 128]);
    assert_eq!(state.inflight_bytes(), 0, "the hand-off's share came back");
}

#[tokio::test]
async fn inline_samples_are_narrowed_to_the_format() {
    let (_tmp, dir) = handoff_dir();
    let (state, broker) = state(&dir);
    let wide: Vec<u8> = [0u16, 257, 65_535, 32_896, 1, 65_534]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let image = ImageInput {
        pixels: wide.into(),
        sample: SampleType::U16,
        ..shaped(2, 1, 3, ImageFormat::Webp)
    };
    assert_eq!(post(&state, vec![image]).await.0, StatusCode::ACCEPTED);
    let task = tasks(&broker).await.remove(0);
    assert_eq!(task.image.sample, SampleType::U8);
    assert_eq!(task.image.pixels.as_slice(), &[0, 1, 255, 128, 0, 255]);
}

#[tokio::test]
async fn a_symlink_is_refused_and_its_target_never_read() {
    let (tmp, dir) = handoff_dir();
    let (state, broker) = state(&dir);
    let target = tmp.path().join("secret");
    std::fs::write(&target, vec![0u8; 4 * 4 * 3 * 4]).expect("write");
    std::os::unix::fs::symlink(&target, dir.join("planted")).expect("symlink");
    let (status, body) = post(
        &state,
        vec![handoff_image("planted", 0, 4, 4, ImageFormat::Png)],
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let error = body["error"].as_str().expect("error");
    assert!(error.contains("symbolic link"), "{error}");
    assert!(
        body.get("code").is_none(),
        "not a reason to fall back: {body}"
    );
    assert!(tasks(&broker).await.is_empty());
}

#[tokio::test]
async fn a_symlinked_directory_is_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let real = tmp.path().join("real");
    std::fs::create_dir(&real).expect("mkdir");
    std::fs::write(real.join("seg"), vec![0u8; 4 * 4 * 3 * 4]).expect("write");
    let link = tmp.path().join("link");
    std::os::unix::fs::symlink(&real, &link).expect("symlink");
    let (state, _) = state(&link);
    let (status, body) = post(
        &state,
        vec![handoff_image("seg", 0, 4, 4, ImageFormat::Png)],
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        body["error"].as_str().expect("error").contains("0700"),
        "{body}"
    );
}

#[tokio::test]
async fn a_fifo_is_refused_without_waiting_for_a_writer() {
    let (_tmp, dir) = handoff_dir();
    let (state, _) = state(&dir);
    let fifo = dir.join("fifo");
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &fifo,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .expect("mkfifo");
    // `call` fails the test if no answer comes within ANSWER_WITHIN.
    let (status, body) = post(
        &state,
        vec![handoff_image("fifo", 0, 4, 4, ImageFormat::Png)],
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        body["error"].as_str().expect("error").contains("FIFO"),
        "{body}"
    );
}

#[tokio::test]
async fn a_short_file_is_a_400_that_says_how_short() {
    let (_tmp, dir) = handoff_dir();
    let (state, _) = state(&dir);
    let need = 4 * 4 * 3 * 4;
    std::fs::write(dir.join("short"), vec![0u8; need]).expect("write");
    // Whole at offset 0; one byte short at offset 1.
    let (status, _) = post(
        &state,
        vec![handoff_image("short", 0, 4, 4, ImageFormat::Png)],
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let (status, body) = post(
        &state,
        vec![handoff_image("short", 1, 4, 4, ImageFormat::Png)],
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let error = body["error"].as_str().expect("error");
    assert!(error.contains(&format!("has {need} bytes")), "{error}");
    // An offset that would overflow is just as short.
    let (status, _) = post(
        &state,
        vec![handoff_image("short", u64::MAX, 4, 4, ImageFormat::Png)],
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn names_that_leave_the_directory_are_a_400() {
    let (tmp, dir) = handoff_dir();
    let (state, _) = state(&dir);
    std::fs::write(tmp.path().join("outside"), vec![0u8; 4 * 4 * 3 * 4]).expect("write");
    for name in ["../outside", "/etc/passwd", "a/b", ".hidden", ""] {
        let (status, body) =
            post(&state, vec![handoff_image(name, 0, 4, 4, ImageFormat::Png)]).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{name}: {body}");
        assert!(
            body["error"]
                .as_str()
                .expect("error")
                .contains("handoff.name"),
            "{name}: {body}"
        );
    }
}

#[tokio::test]
async fn a_missing_file_is_422_handoff_unavailable() {
    let (_tmp, dir) = handoff_dir();
    let (state, _) = state(&dir);
    let (status, body) = post(
        &state,
        vec![handoff_image("gone", 0, 4, 4, ImageFormat::Png)],
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["code"], "handoff_unavailable");
    assert!(
        body["error"].as_str().expect("error").contains("inline"),
        "{body}"
    );
}

#[tokio::test]
async fn a_disabled_handoff_is_422_and_get_is_404() {
    let (state, _) = state_with(HandoffDir::Off, 1 << 30);
    let (status, body) = post(
        &state,
        vec![handoff_image("seg", 0, 4, 4, ImageFormat::Png)],
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["code"], "handoff_unavailable");
    let request = Request::get("/v1/handoff")
        .body(Body::empty())
        .expect("request");
    let (status, body) = call(&state, request).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(body["code"], "handoff_unavailable");
}

#[tokio::test]
async fn handed_off_bytes_count_against_the_budget() {
    let (_tmp, dir) = handoff_dir();
    // Room for the request body and one 64x64 float frame (49,152 bytes), not for two.
    let (state, broker) = state_with(HandoffDir::At(dir.clone()), 80_000);
    let (_, floats) = float_frame(64, 64, 3);
    std::fs::write(dir.join("seg"), &floats).expect("write");
    let one = || handoff_image("seg", 0, 64, 64, ImageFormat::Png);
    let (status, body) = post(&state, vec![one()]).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let (status, body) = post(&state, vec![one(), one()]).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(
        body["error"]
            .as_str()
            .expect("error")
            .contains("--max-inflight-bytes"),
        "{body}"
    );
    assert_eq!(state.inflight_bytes(), 0);
    assert_eq!(tasks(&broker).await.len(), 1);
}

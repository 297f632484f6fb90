//! A job seen the way a client sees it: submit to the gateway, watch on the status WebSocket.

use std::time::Duration;

use futures_util::StreamExt;
use std::path::Path;

use luna_e2e::{Env, Stack, submit, test_image};
use luna_job::{ImageFormat, SaveRequest};
use luna_queue::Broker;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_contract_holds_in_process_as_in_luna_up() {
    let output = tempfile::tempdir().expect("tempdir");
    let stack = Stack::start(Broker::in_process(), output.path()).await;
    three_formats_land_where_the_contract_says_and_subscribers_see_every_step(
        &stack,
        output.path(),
    )
    .await;
    bad_input_is_refused_and_rejections_are_reported(&stack, output.path()).await;
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_contract_holds_over_rabbitmq() {
    let env = Env::new().await;
    let stack = Stack::start(env.broker.clone(), env.output.path()).await;
    three_formats_land_where_the_contract_says_and_subscribers_see_every_step(
        &stack,
        env.output.path(),
    )
    .await;
    bad_input_is_refused_and_rejections_are_reported(&stack, env.output.path()).await;
    stack.stop().await;
    env.cleanup().await;
}

async fn three_formats_land_where_the_contract_says_and_subscribers_see_every_step(
    stack: &Stack,
    output: &Path,
) {
    let (gateway, status) = (&stack.gateway, &stack.status);

    let workflow = json!({"nodes": [{"id": 9, "type": "LunaDaemonImageSaver"}], "links": []});
    let prompt = json!({"3": {"class_type": "KSampler", "inputs": {"seed": 5}}});
    let request = SaveRequest {
        save_path: "renders/%model_name%".into(),
        filename: "%time:YYYY-mm-dd%_%index%".into(),
        model_name: "checkpoints/sdxl_base.safetensors".into(),
        index: 4,
        prompt: Some(prompt.clone()),
        extra_pnginfo: Some(json!({ "workflow": workflow })),
        images: vec![
            test_image(128, 96, 3, ImageFormat::Png, "RAW"),
            test_image(128, 96, 3, ImageFormat::Webp, "FINAL"),
            test_image(128, 96, 4, ImageFormat::Jpeg, "PREVIEW"),
        ],
        ..Default::default()
    };
    let (code, body) = submit(&gateway.url(), &request).await;
    assert_eq!(code, 202, "{body}");
    let job = body["job_id"].as_str().expect("job id").to_owned();
    assert_eq!(body["num_images"], 3);
    assert_eq!(
        body["message"],
        format!("[Luna Daemon Image Saver] Submitted 3 images to daemon. Job ID: {job}")
    );

    // Subscribing after submitting misses nothing: the job's events are replayed first.
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{}/ws?job_id={job}", status.addr))
            .await
            .expect("websocket");
    let mut names = Vec::new();
    let mut saved = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while names.last().map(String::as_str) != Some("save_job_completed") {
        let msg = tokio::time::timeout_at(deadline, ws.next())
            .await
            .expect("events in time")
            .expect("open")
            .expect("frame");
        let Message::Text(text) = msg else { continue };
        let event: Value = serde_json::from_str(&text).expect("JSON event");
        assert_eq!(event["job_id"], job.as_str());
        if event["event"] == "image_saved" {
            saved.push(event.clone());
        }
        names.push(event["event"].as_str().expect("name").to_owned());
    }
    assert_eq!(
        names,
        [
            "save_job_queued",
            "image_saved",
            "image_saved",
            "image_saved",
            "save_job_completed"
        ]
    );

    let date = chrono::Local::now().format("%Y-%m-%d").to_string();
    saved.sort_by_key(|e| e["index"].as_u64());
    let expected = [
        format!("renders/sdxl_base/RAW/{date}_4_RAW.png"),
        format!("renders/sdxl_base/FINAL/{date}_4_FINAL.webp"),
        format!("renders/sdxl_base/PREVIEW/{date}_4_PREVIEW.jpg"),
    ];
    for (event, path) in saved.iter().zip(&expected) {
        assert_eq!(event["path"], path.as_str());
        let file = output.join(path);
        let img = image::open(&file).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!((img.width(), img.height()), (128, 96));
        assert_eq!(
            event["bytes"],
            std::fs::metadata(&file).expect("stat").len()
        );
        assert!(event["worker"].as_str().is_some_and(|w| !w.is_empty()));
    }
    let png = std::fs::read(output.join(&expected[0])).expect("png");
    let needle = format!("workflow\0{}", workflow);
    assert!(
        png.windows(needle.len()).any(|w| w == needle.as_bytes()),
        "workflow chunk embedded"
    );

    let state: Value = reqwest::get(format!("{}/v1/jobs/{job}", status.url()))
        .await
        .expect("GET")
        .json()
        .await
        .expect("JSON");
    assert_eq!(
        (state["state"].as_str(), state["saved"].as_u64()),
        (Some("completed"), Some(3))
    );
    let missing = reqwest::get(format!("{}/v1/jobs/nope", status.url()))
        .await
        .expect("GET");
    assert_eq!(missing.status().as_u16(), 404);

    drop(ws);
}

async fn bad_input_is_refused_and_rejections_are_reported(stack: &Stack, output: &Path) {
    let gateway = stack.gateway.url();
    let bad = SaveRequest {
        png_compression: 12,
        ..SaveRequest::default()
    };
    let (code, body) = submit(&gateway, &bad).await;
    assert_eq!(code, 400, "{body}");
    let error = body["error"].as_str().expect("error");
    assert!(
        error.contains("png_compression is 12; allowed 0 to 9")
            && error.contains("images is empty"),
        "{error}"
    );
    let escaping = SaveRequest {
        save_path: "../outside".into(),
        images: vec![test_image(8, 8, 3, ImageFormat::Png, "")],
        ..SaveRequest::default()
    };
    let (code, body) = submit(&gateway, &escaping).await;
    assert_eq!(code, 400, "{body}");
    let plain = reqwest::Client::new()
        .post(format!("{gateway}/v1/jobs"))
        .header("content-type", "text/plain")
        .body("hello")
        .send()
        .await
        .expect("answer");
    assert_eq!(plain.status().as_u16(), 415);

    let flat = luna_job::ImageInput {
        pixels: vec![90; 32 * 32 * 3].into(),
        width: 32,
        height: 32,
        ..Default::default()
    };
    let gated = SaveRequest {
        save_path: "gated".into(),
        filename: "g".into(),
        quality_gate: luna_job::QualityGate::EdgeDensity,
        min_quality_threshold: 0.5,
        images: vec![flat],
        ..SaveRequest::default()
    };
    let (code, body) = submit(&gateway, &gated).await;
    assert_eq!(code, 202, "{body}");
    let job = body["job_id"].as_str().expect("id").to_owned();
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{}/ws?job_id={job}", stack.status.addr))
            .await
            .expect("websocket");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut events = Vec::new();
    while events
        .last()
        .map(|e: &Value| e["event"] == "save_job_completed")
        != Some(true)
    {
        let msg = tokio::time::timeout_at(deadline, ws.next())
            .await
            .expect("in time")
            .expect("open")
            .expect("frame");
        if let Message::Text(text) = msg {
            events.push(serde_json::from_str(&text).expect("JSON"));
        }
    }
    let rejected = events
        .iter()
        .find(|e| e["event"] == "image_rejected")
        .expect("rejected event");
    assert_eq!(
        (
            rejected["gate"].as_str(),
            rejected["quality_score"].as_f64()
        ),
        (Some("edge_density"), Some(0.0))
    );
    assert_eq!(rejected["path"], "gated/_discarded/g.png");
    assert!(output.join("gated/_discarded/g.png").is_file());
    let done = events.last().expect("completed");
    assert_eq!(
        (
            done["saved"].as_u64(),
            done["rejected"].as_u64(),
            done["failed"].as_u64()
        ),
        (Some(0), Some(1), Some(0))
    );
}

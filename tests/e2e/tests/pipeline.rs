//! The distributed pipeline against a real RabbitMQ: gateway -> broker -> savers -> events.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use luna_e2e::{Env, count, files, saver_binary, spawn_saver, submit, test_image};
use luna_job::{EventKind, ImageFormat, QualityGate, SaveRequest};

const LONG: Duration = Duration::from_secs(120);

fn request(images: Vec<luna_job::ImageInput>) -> SaveRequest {
    SaveRequest {
        filename: "img_%index%".into(),
        images,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_savers_share_the_work_and_save_each_image_once() {
    let env = Env::new().await;
    let log = env.record_events().await;
    let gateway = env.start_gateway(env.gateway_config()).await;
    let mut cfg = env.saver_config();
    cfg.max_workers = 2;
    let (a, b) = (
        env.start_saver(cfg.clone()).await,
        env.start_saver(cfg).await,
    );

    let mut jobs = Vec::new();
    for j in 0..8 {
        let images = (0..5)
            .map(|i| test_image(96, 96, 3, ImageFormat::Png, &format!("i{i}")))
            .collect();
        let req = SaveRequest {
            index: j,
            ..request(images)
        };
        let (status, body) = submit(&gateway.url(), &req).await;
        assert_eq!(status, 202, "{body}");
        jobs.push(body["job_id"].as_str().expect("job id").to_owned());
    }
    let events = log
        .wait_until(LONG, |e| count(e, "image_saved", None) >= 40)
        .await;
    let mut seen = BTreeSet::new();
    let mut workers = BTreeSet::new();
    for e in &events {
        if let EventKind::ImageSaved {
            index,
            path,
            worker,
            ..
        } = &e.kind
        {
            assert!(
                seen.insert((e.job_id.to_string(), *index)),
                "image saved twice: {e:?}"
            );
            assert!(env.output.path().join(path).is_file());
            workers.insert(worker.clone());
        }
    }
    assert_eq!(seen.len(), 40);
    assert_eq!(workers.len(), 2, "both savers did work: {workers:?}");
    assert_eq!(files(env.output.path()).len(), 40, "one file per image");
    for job in &jobs {
        assert_eq!(count(&events, "save_job_queued", Some(job)), 1);
    }
    for s in [a, b, gateway] {
        s.stop().await;
    }
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rejected_images_are_kept_under_discarded_or_not_written() {
    let env = Env::new().await;
    let log = env.record_events().await;
    let gateway = env.start_gateway(env.gateway_config()).await;
    let saver = env.start_saver(env.saver_config()).await;
    let flat = luna_job::ImageInput {
        pixels: vec![128; 64 * 64 * 3].into(),
        width: 64,
        height: 64,
        ..Default::default()
    };
    let mut ids = Vec::new();
    for keep in [true, false] {
        let req = SaveRequest {
            save_path: format!("keep_{keep}"),
            quality_gate: QualityGate::Variance,
            min_quality_threshold: 0.2,
            keep_rejected: keep,
            images: vec![flat.clone(), test_image(64, 64, 3, ImageFormat::Png, "")],
            ..request(vec![])
        };
        let (status, body) = submit(&gateway.url(), &req).await;
        assert_eq!(status, 202, "{body}");
        ids.push(body["job_id"].as_str().expect("id").to_owned());
    }
    let events = log
        .wait_until(LONG, |e| {
            count(e, "image_rejected", None) == 2 && count(e, "image_saved", None) == 2
        })
        .await;
    for (job, keep) in ids.iter().zip([true, false]) {
        let rejected = events
            .iter()
            .find_map(|e| match &e.kind {
                EventKind::ImageRejected {
                    path,
                    quality_score,
                    threshold,
                    gate,
                    ..
                } if e.job_id.as_str() == job => {
                    Some((path.clone(), *quality_score, *threshold, gate.clone()))
                }
                _ => None,
            })
            .expect("rejection event");
        assert_eq!(
            (rejected.1, rejected.2, rejected.3.as_str()),
            (0.0, 0.2, "variance")
        );
        assert_eq!(rejected.0.is_some(), keep);
        if let Some(path) = rejected.0 {
            assert!(
                path.starts_with(&format!("keep_{keep}/_discarded/")),
                "{path}"
            );
            assert!(env.output.path().join(&path).is_file());
        }
    }
    assert_eq!(
        files(&env.output.path().join("keep_false")).len(),
        1,
        "only the passing image"
    );
    saver.stop().await;
    gateway.stop().await;
    env.cleanup().await;
}

/// Reads the parked queue's messages and their park reasons.
/// The reasons of the first `n` parked messages. A saver parks a task just after publishing its
/// final `image_failed`, so a test that saw the event waits for the parked copy too.
async fn parked_reasons(env: &Env, n: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut reasons = take_parked_reasons(env).await;
    while reasons.len() < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        reasons.extend(take_parked_reasons(env).await);
    }
    reasons
}

/// Takes (and acknowledges) every message in the parked queue; returns their reasons.
async fn take_parked_reasons(env: &Env) -> Vec<String> {
    use lapin::options::{BasicAckOptions, BasicGetOptions};
    let conn = lapin::Connection::connect(&env.url, lapin::ConnectionProperties::default())
        .await
        .expect("connect");
    let ch = conn.create_channel().await.expect("channel");
    let mut reasons = Vec::new();
    while let Some(msg) = ch
        .basic_get(
            format!("{}.parked", env.prefix).into(),
            BasicGetOptions::default(),
        )
        .await
        .expect("get")
    {
        let headers = msg
            .delivery
            .properties
            .headers()
            .clone()
            .unwrap_or_default();
        let reason = headers
            .inner()
            .get(luna_queue::PARK_REASON_HEADER)
            .map(|v| match v {
                lapin::types::AMQPValue::LongString(s) => {
                    String::from_utf8_lossy(s.as_bytes()).into_owned()
                }
                other => format!("{other:?}"),
            });
        reasons.push(reason.unwrap_or_default());
        msg.delivery
            .acker
            .ack(BasicAckOptions::default())
            .await
            .expect("ack");
    }
    let _ = conn.close(200, "done".into()).await;
    reasons
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn malformed_tasks_are_parked_with_a_reason_and_the_saver_keeps_serving() {
    let env = Env::new().await;
    let log = env.record_events().await;
    let gateway = env.start_gateway(env.gateway_config()).await;
    let saver = env.start_saver(env.saver_config()).await;
    let headers = luna_queue::Headers::new();
    let label = luna_queue::TaskLabel {
        job_id: luna_job::JobId::new(),
        image_index: 0,
        format: ImageFormat::Png,
    };
    env.broker
        .publish_task_bytes(b"\xc1 definitely not msgpack", &label, &headers)
        .await
        .expect("publish");
    // Decodes, but breaks the contract: a schema from the future and an impossible image.
    let mut bad = luna_job::SaveRequest {
        images: vec![test_image(8, 8, 3, ImageFormat::Png, "")],
        ..request(vec![])
    }
    .into_tasks(&luna_job::JobId::new(), chrono_now())
    .remove(0);
    bad.schema_version = 99;
    bad.image.channels = 2;
    env.broker
        .publish_task(bad.clone(), &headers)
        .await
        .expect("publish");

    let deadline = Instant::now() + LONG;
    while env.broker.parked_count().await.expect("count") < 2 {
        assert!(Instant::now() < deadline, "tasks were not parked");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, body) = submit(
        &gateway.url(),
        &request(vec![test_image(32, 32, 3, ImageFormat::Png, "")]),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let job = body["job_id"].as_str().expect("id").to_owned();
    let events = log
        .wait_until(LONG, |e| count(e, "image_saved", Some(&job)) == 1)
        .await;
    let failed = events
        .iter()
        .find(|e| e.job_id == bad.job_id)
        .expect("image_failed for the invalid task");
    assert!(
        matches!(&failed.kind, EventKind::ImageFailed { is_final: true, error, .. } if error.contains("schema_version is 99"))
    );

    let reasons = parked_reasons(&env, 2).await;
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert!(
        reasons.iter().any(|r| r.starts_with("undecodable task")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("channels is 2")),
        "{reasons:?}"
    );
    saver.stop().await;
    gateway.stop().await;
    env.cleanup().await;
}

fn chrono_now() -> chrono::DateTime<chrono::FixedOffset> {
    chrono::Local::now().fixed_offset()
}

async fn metric(saver: &luna_e2e::Service, name: &str) -> u64 {
    let text = reqwest::get(format!("{}/metrics", saver.url()))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} missing in {text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_pool_grows_to_max_under_backlog_and_shrinks_when_idle() {
    let env = Env::new().await;
    let log = env.record_events().await;
    let gateway = env.start_gateway(env.gateway_config()).await;
    let mut cfg = env.saver_config();
    cfg.idle_timeout = Duration::from_secs(1);
    let saver = env.start_saver(cfg).await;
    assert_eq!(metric(&saver, "luna_save_slots_active").await, 2);

    // A backlog of slow saves: large frames at the strongest PNG level.
    let mut total = 0;
    for _ in 0..4 {
        let images = (0..8)
            .map(|i| test_image(640, 640, 3, ImageFormat::Png, &format!("i{i}")))
            .collect();
        let req = SaveRequest {
            png_compression: 9,
            ..request(images)
        };
        let (status, body) = submit(&gateway.url(), &req).await;
        assert_eq!(status, 202, "{body}");
        total += 8;
    }
    let deadline = Instant::now() + LONG;
    let mut peak = 0;
    while peak < 4 {
        peak = peak.max(metric(&saver, "luna_save_slots_active").await);
        assert!(
            Instant::now() < deadline,
            "pool never grew to 4 (peak {peak})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    log.wait_until(LONG, |e| count(e, "image_saved", None) == total)
        .await;
    let deadline = Instant::now() + LONG;
    while metric(&saver, "luna_save_slots_active").await > 2 {
        assert!(Instant::now() < deadline, "pool never shrank back to 2");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    saver.stop().await;
    gateway.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_4k_frame_travels_by_claim_check_and_needs_a_blob_store() {
    let env = Env::new().await;
    let log = env.record_events().await;
    let blobs = tempfile::tempdir().expect("tempdir");
    let frame = || request(vec![test_image(3840, 2160, 3, ImageFormat::Png, "4k")]);

    let plain = env.start_gateway(env.gateway_config()).await;
    let (status, body) = submit(
        &plain.url(),
        &SaveRequest {
            png_compression: 1,
            ..frame()
        },
    )
    .await;
    assert_eq!(status, 413, "{body}");
    assert!(
        body["error"]
            .as_str()
            .expect("error")
            .contains("--blob-dir"),
        "{body}"
    );
    plain.stop().await;

    let mut gcfg = env.gateway_config();
    gcfg.blob_dir = Some(blobs.path().to_owned());
    let gateway = env.start_gateway(gcfg).await;
    let mut scfg = env.saver_config();
    scfg.blob_dir = Some(blobs.path().to_owned());
    let saver = env.start_saver(scfg).await;
    let (status, body) = submit(
        &gateway.url(),
        &SaveRequest {
            png_compression: 1,
            ..frame()
        },
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let job = body["job_id"].as_str().expect("id").to_owned();
    let events = log
        .wait_until(LONG, |e| count(e, "image_saved", Some(&job)) == 1)
        .await;
    let path = events
        .iter()
        .find_map(|e| match &e.kind {
            EventKind::ImageSaved { path, .. } => Some(path.clone()),
            _ => None,
        })
        .expect("saved");
    let img = image::open(env.output.path().join(path)).expect("decodes");
    assert_eq!((img.width(), img.height()), (3840, 2160));
    let expected = test_image(3840, 2160, 3, ImageFormat::Png, "");
    assert!(
        img.to_rgb8().as_raw() == expected.pixels.as_slice(),
        "pixels survive the claim check"
    );
    assert!(
        files(blobs.path()).is_empty(),
        "the blob is removed once saved"
    );
    saver.stop().await;
    gateway.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_a_broker_the_gateway_answers_503_quickly() {
    let env = Env::new().await;
    let mut cfg = env.gateway_config();
    cfg.broker.amqp_url = "amqp://guest:guest@127.0.0.1:1/%2f".into();
    cfg.broker.broker_timeout = Duration::from_secs(2);
    let gateway = env.start_gateway(cfg).await;
    let started = Instant::now();
    let (status, body) = submit(
        &gateway.url(),
        &request(vec![test_image(8, 8, 3, ImageFormat::Png, "")]),
    )
    .await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body["error"].as_str().expect("error").contains("broker"),
        "{body}"
    );
    // Bounded by the broker timeout, not a hang; generous for slow machines.
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "took {:?}",
        started.elapsed()
    );
    let ready = reqwest::get(format!("{}/readyz", gateway.url()))
        .await
        .expect("readyz");
    assert_eq!(ready.status().as_u16(), 503);
    gateway.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_saver_killed_mid_batch_loses_nothing_and_writes_nothing_twice() {
    let bin = tokio::task::spawn_blocking(saver_binary)
        .await
        .expect("build");
    let env = Env::new().await;
    let log = env.record_events().await;
    let gateway = env.start_gateway(env.gateway_config()).await;
    let mut jobs = Vec::new();
    for job in 0..3 {
        let images = (0..10)
            .map(|i| test_image(512, 512, 3, ImageFormat::Png, &format!("i{i}")))
            .collect();
        let req = SaveRequest {
            png_compression: 9,
            index: job,
            ..request(images)
        };
        let (status, body) = submit(&gateway.url(), &req).await;
        assert_eq!(status, 202, "{body}");
        jobs.push(body["job_id"].as_str().expect("id").to_owned());
    }
    let mut child = spawn_saver(&bin, &env);
    log.wait_until(LONG, |e| count(e, "image_saved", None) >= 4)
        .await;
    child.kill().expect("SIGKILL"); // Child::kill sends SIGKILL on Unix
    child.wait().expect("reaped");
    let at_kill = count(&log.snapshot(), "image_saved", None);
    assert!(
        at_kill < 30,
        "the kill must land mid-batch ({at_kill} saved)"
    );

    let mut child = spawn_saver(&bin, &env);
    let events = log
        .wait_until(LONG, |e| {
            let distinct: BTreeSet<_> = e
                .iter()
                .filter_map(|e| match e.kind {
                    EventKind::ImageSaved { index, .. } => Some((e.job_id.to_string(), index)),
                    _ => None,
                })
                .collect();
            distinct.len() == 30
        })
        .await;
    child.kill().expect("stop");
    child.wait().expect("reaped");

    // Exactly one file per image, no collision suffix from a second write, all complete.
    let mut paths: HashMap<(String, u32), BTreeSet<String>> = HashMap::new();
    for e in &events {
        if let EventKind::ImageSaved { index, path, .. } = &e.kind {
            paths
                .entry((e.job_id.to_string(), *index))
                .or_default()
                .insert(path.clone());
        }
    }
    assert!(
        paths.values().all(|p| p.len() == 1),
        "a redelivery resolved to another file: {paths:?}"
    );
    let visible: Vec<String> = files(env.output.path())
        .into_iter()
        .filter(|f| !f.rsplit('/').next().unwrap_or("").starts_with('.'))
        .collect();
    assert_eq!(visible.len(), 30, "{visible:#?}");
    for f in &visible {
        let img = image::open(env.output.path().join(f))
            .unwrap_or_else(|e| panic!("{f} is not a complete PNG: {e}"));
        assert_eq!(img.width(), 512);
    }
    gateway.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_write_is_retried_with_backoff_then_parked() {
    let env = Env::new().await;
    let log = env.record_events().await;
    let gateway = env.start_gateway(env.gateway_config()).await;
    let mut cfg = env.saver_config();
    cfg.max_attempts = 3;
    let saver = env.start_saver(cfg).await;
    // A file where the save folder should be: creating the folder fails on every attempt.
    std::fs::write(env.output.path().join("blocked"), b"not a folder").expect("write");
    let req = SaveRequest {
        save_path: "blocked/deeper".into(),
        ..request(vec![test_image(16, 16, 3, ImageFormat::Png, "")])
    };
    let (status, body) = submit(&gateway.url(), &req).await;
    assert_eq!(status, 202, "{body}");
    let job = body["job_id"].as_str().expect("id").to_owned();
    let events = log
        .wait_until(LONG, |e| {
            e.iter().any(|e| {
                matches!(e.kind, EventKind::ImageFailed { is_final: true, .. })
                    && e.job_id.as_str() == job
            })
        })
        .await;
    let failures: Vec<(u32, bool, String)> = events
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::ImageFailed {
                attempt,
                is_final,
                error,
                ..
            } => Some((*attempt, *is_final, error.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(
        failures.iter().map(|f| (f.0, f.1)).collect::<Vec<_>>(),
        [(1, false), (2, false), (3, true)]
    );
    assert!(failures[2].2.contains("create folder"), "{failures:?}");
    assert_eq!(count(&events, "image_saved", None), 0);
    let reasons = parked_reasons(&env, 1).await;
    assert_eq!(reasons.len(), 1, "{reasons:?}");
    assert!(reasons[0].contains("create folder"), "{reasons:?}");
    saver.stop().await;
    gateway.stop().await;
    env.cleanup().await;
}

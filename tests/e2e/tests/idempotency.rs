//! `Idempotency-Key` over RabbitMQ: a retry names the same job and saves nothing twice, even
//! when the first attempt died half way through publishing (a gateway killed mid-job).

use std::time::Duration;

use luna_e2e::{Env, count, files, submit_with_key, test_image};
use luna_job::{EventKind, ImageFormat, JobId, SaveRequest};

const LONG: Duration = Duration::from_secs(120);

fn request() -> SaveRequest {
    SaveRequest {
        // Names that change every second: a retry rendering its own time would write new files.
        save_path: "idem/%time:HH.MM.SS%".into(),
        filename: "img_%time:HH.MM.SS%".into(),
        images: (0..6)
            .map(|i| test_image(48, 48, 3, ImageFormat::Png, &format!("i{i}")))
            .collect(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retry_after_a_partial_publish_completes_the_job_without_duplicates() {
    let env = Env::new().await;
    let log = env.record_events().await;
    let key = format!("submission-{}", uuid::Uuid::new_v4());
    let job = JobId::for_idempotency_key(&key).expect("key");

    // What a gateway killed mid-publish leaves: two of six tasks queued, no answer sent.
    let earlier = chrono::Local::now().fixed_offset() - chrono::Duration::seconds(3);
    let mut tasks = request().into_tasks(&job, earlier);
    for task in &mut tasks {
        task.idempotent = true;
    }
    for task in &tasks[..2] {
        env.broker
            .publish_task(task.clone(), &Default::default())
            .await
            .expect("publish");
    }
    let saver = env.start_saver(env.saver_config()).await;
    log.wait_until(LONG, |e| count(e, "image_saved", Some(job.as_str())) >= 2)
        .await;

    // The client retries with its key, through a gateway, twice (the first answer was lost).
    let gateway = env.start_gateway(env.gateway_config()).await;
    for _ in 0..2 {
        let (status, body) = submit_with_key(&gateway.url(), &request(), Some(&key)).await;
        assert_eq!(status, 202, "{body}");
        assert_eq!(body["job_id"], job.as_str());
    }
    let events = log
        .wait_until(LONG, |e| {
            count(e, "image_saved", Some(job.as_str())) >= 2 + 6 + 6
        })
        .await;

    let saved = files(env.output.path());
    assert_eq!(saved.len(), 6, "one file per image: {saved:?}");
    let folder = format!("idem/{}", earlier.format("%H.%M.%S"));
    assert!(
        saved.iter().all(|p| p.starts_with(&folder)),
        "every image named by the first attempt's time ({folder}): {saved:?}"
    );
    let mut paths = std::collections::BTreeMap::new();
    for e in &events {
        if let EventKind::ImageSaved { index, path, .. } = &e.kind {
            let first = paths.entry(*index).or_insert_with(|| path.clone());
            assert_eq!(first, path, "image {index} reported under two names");
        }
    }
    assert_eq!(paths.len(), 6);
    saver.stop().await;
    gateway.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_bad_idempotency_key_is_a_400() {
    let env = Env::new().await;
    let gateway = env.start_gateway(env.gateway_config()).await;
    let long = "k".repeat(300);
    let (status, body) = submit_with_key(&gateway.url(), &request(), Some(&long)).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap_or("")
            .contains("Idempotency-Key")
    );
    gateway.stop().await;
    env.cleanup().await;
}

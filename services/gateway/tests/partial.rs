//! The gateway router (`oneshot`) when a job is only partly published: the answer says what may
//! be queued, and a retry with the same `Idempotency-Key` names the same job.

use axum::body::{Body, to_bytes};
use axum::http::{Request, StatusCode, header};
use luna_gateway::{AppState, Config, router};
use luna_job::codec::to_msgpack;
use luna_job::{ImageFormat, ImageInput, JobId, SaveRequest};
use luna_queue::{Broker, MemoryBounds, MemoryBroker};
use tower::ServiceExt as _;

fn job(images: usize) -> Vec<u8> {
    let image = ImageInput {
        pixels: vec![7u8; 4 * 4 * 3].into(),
        width: 4,
        height: 4,
        format: ImageFormat::Png,
        ..Default::default()
    };
    to_msgpack(&SaveRequest {
        images: vec![image; images],
        ..Default::default()
    })
    .expect("encode")
}

async fn post(
    state: &AppState,
    key: Option<&str>,
    body: Vec<u8>,
) -> (StatusCode, serde_json::Value) {
    let mut request = Request::post("/v1/jobs").header(header::CONTENT_TYPE, "application/msgpack");
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    let response = router(state.clone())
        .oneshot(request.body(Body::from(body)).expect("request"))
        .await
        .expect("infallible");
    let status = response.status();
    let body = to_bytes(response.into_body(), 1 << 20).await.expect("body");
    (status, serde_json::from_slice(&body).unwrap_or_default())
}

/// Takes every queued task off `broker` (as savers would), answering their (job, index).
async fn drain(broker: &Broker, keyed: bool) -> Vec<(String, u32)> {
    let mut stream = broker.consume_tasks("drain").await.expect("consume");
    let mut out = Vec::new();
    while let Ok(Some(Ok(delivery))) =
        tokio::time::timeout(std::time::Duration::from_millis(200), stream.next()).await
    {
        let task = delivery.task().expect("task");
        assert_eq!(
            task.idempotent, keyed,
            "only a keyed job's tasks are marked idempotent"
        );
        out.push((task.job_id.to_string(), task.image_index));
        delivery.ack().await.expect("ack");
    }
    out
}

#[tokio::test]
async fn a_partly_published_job_is_finished_by_a_retry_with_its_key() {
    let broker = Broker::Memory(MemoryBroker::bounded(
        10,
        MemoryBounds {
            max_tasks: 2,
            max_bytes: u64::MAX,
        },
    ));
    let state = AppState::with_broker(Config::defaults(), broker.clone());
    let key = "submission-7d1c";
    let expected = JobId::for_idempotency_key(key).expect("key");

    // Two of six tasks fit: the answer says some may be queued, names the job, and how to retry.
    let (status, body) = post(&state, Some(key), job(6)).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    let error = body["error"].as_str().expect("error");
    assert!(error.contains(expected.as_str()), "{error}");
    assert!(error.contains("may already be queued"), "{error}");
    assert!(error.contains("same Idempotency-Key"), "{error}");
    let first = drain(&broker, true).await;
    assert_eq!(first.len(), 2, "{first:?}");

    // Room again: the retry is the same job, and queues all six (savers find the two).
    let roomy = Broker::Memory(MemoryBroker::bounded(10, MemoryBounds::UNBOUNDED));
    let state = AppState::with_broker(Config::defaults(), roomy);
    let (status, body) = post(&state, Some(key), job(6)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["job_id"], expected.as_str());
    let again = drain(&state.broker, true).await;
    assert_eq!(again.len(), 6);
    assert!(
        first.iter().all(|t| again.contains(t)),
        "{first:?} {again:?}"
    );
}

#[tokio::test]
async fn without_a_key_a_partial_publish_is_not_called_nothing() {
    let broker = Broker::Memory(MemoryBroker::bounded(
        10,
        MemoryBounds {
            max_tasks: 1,
            max_bytes: u64::MAX,
        },
    ));
    let state = AppState::with_broker(Config::defaults(), broker.clone());
    let (status, body) = post(&state, None, job(3)).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    let error = body["error"].as_str().expect("error");
    assert!(!error.contains("nothing"), "one task is queued: {error}");
    assert!(error.contains("Idempotency-Key"), "{error}");
    assert_eq!(drain(&broker, false).await.len(), 1);

    // A job of which nothing fits says so.
    let (status, _) = post(&state, None, job(1)).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let (status, body) = post(&state, None, job(1)).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    let error = body["error"].as_str().expect("error");
    assert!(error.contains("nothing was queued"), "{error}");
}

#[tokio::test]
async fn a_malformed_key_is_a_400() {
    let state = AppState::with_broker(Config::defaults(), Broker::in_process());
    for key in ["has space", &"k".repeat(256)] {
        let (status, body) = post(&state, Some(key), job(1)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{key}: {body}");
    }
}

//! The gateway's bounds, from outside: the token before the body, the byte budget of bodies
//! held at once, a full in-process queue, and `Retry-After` on every 503.
//!
//! Raw TCP clients send headers and then only part of a body (or none), as a slow or hostile
//! uploader does: the answers that must come before the body is read then arrive, or the test
//! times out waiting for them.

use std::time::Duration;

use axum::body::{Body, to_bytes};
use axum::http::{Request, StatusCode, header};
use luna_gateway::{AppState, Config, router};
use luna_job::codec::to_msgpack;
use luna_job::{ImageFormat, ImageInput, SaveRequest};
use luna_queue::{AmqpConfig, Broker, MemoryBounds, MemoryBroker};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tower::ServiceExt as _;

/// Longest wait for an answer that must not depend on the body.
const ANSWER_WITHIN: Duration = Duration::from_secs(10);

fn config() -> Config {
    let mut config = Config::defaults();
    config.token = None;
    config.metrics_token = None;
    config
}

fn in_process(config: Config, bounds: MemoryBounds) -> AppState {
    AppState::with_broker(config, Broker::Memory(MemoryBroker::bounded(10, bounds)))
}

/// A gateway on a free port, until the returned sender is dropped.
async fn serve(state: AppState) -> (std::net::SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(luna_gateway::serve(state, listener, async move {
        let _ = stopped.await;
    }));
    (addr, stop)
}

fn job(images: usize) -> Vec<u8> {
    let image = ImageInput {
        pixels: vec![128u8; 8 * 8 * 3].into(),
        width: 8,
        height: 8,
        channels: 3,
        format: ImageFormat::Png,
        ..Default::default()
    };
    to_msgpack(&SaveRequest {
        images: vec![image; images],
        ..Default::default()
    })
    .expect("encode")
}

/// An answer as read off the wire.
#[derive(Debug)]
struct Answer {
    status: u16,
    head: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|line| {
            let (k, v) = line.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// Reads one answer's status line and headers; fails the test if none comes in time.
async fn read_answer(stream: &mut TcpStream) -> Answer {
    let mut head = Vec::new();
    let read = async {
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if stream.read(&mut byte).await.expect("read") == 0 {
                break;
            }
            head.push(byte[0]);
        }
    };
    tokio::time::timeout(ANSWER_WITHIN, read)
        .await
        .expect("the gateway answers without waiting for the body");
    let head = String::from_utf8_lossy(&head).into_owned();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {head:?}"));
    Answer { status, head }
}

/// Connects and sends a `POST /v1/jobs` head, plus `body` (possibly only part of the body).
async fn post_head(addr: std::net::SocketAddr, extra_headers: &str, body: &[u8]) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let head = format!(
        "POST /v1/jobs HTTP/1.1\r\nhost: gateway\r\ncontent-type: application/msgpack\r\n{extra_headers}\r\n"
    );
    stream.write_all(head.as_bytes()).await.expect("send head");
    stream.write_all(body).await.expect("send body");
    stream
}

async fn wait_for_inflight(state: &AppState, bytes: u64) {
    tokio::time::timeout(ANSWER_WITHIN, async {
        while state.inflight_bytes() != bytes {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "the gateway holds {} body bytes, expected {bytes}",
            state.inflight_bytes()
        )
    });
}

#[tokio::test]
async fn a_request_without_the_token_is_refused_before_its_body_is_read() {
    let mut config = config();
    config.token = Some("s3cret".into());
    let (addr, _stop) = serve(in_process(config, MemoryBounds::default())).await;
    // 128 MiB announced, not a byte of it sent: the 401 must come from the headers alone.
    for auth in ["", "authorization: Bearer wrong\r\n"] {
        let mut stream = post_head(
            addr,
            &format!("{auth}content-length: {}\r\n", 128 * 1024 * 1024),
            b"",
        )
        .await;
        let answer = read_answer(&mut stream).await;
        assert_eq!(answer.status, 401, "{}", answer.head);
        assert_eq!(answer.header("www-authenticate"), Some("Bearer"));
    }
}

#[tokio::test]
async fn bodies_held_at_once_are_bounded_and_the_rest_answered_503_with_retry_after() {
    let mut config = config();
    config.max_inflight_bytes = 1024 * 1024;
    let state = in_process(config, MemoryBounds::default());
    let (addr, _stop) = serve(state.clone()).await;

    // A slow upload: 700 KiB announced, 100 KiB sent so far. It holds its whole length.
    let declared = 700 * 1024;
    let mut slow = post_head(
        addr,
        &format!("content-length: {declared}\r\n"),
        &vec![0u8; 100 * 1024],
    )
    .await;
    wait_for_inflight(&state, declared).await;

    // A second one announcing as much does not fit. Waiting for `100 Continue`, it is
    // refused before it sends its body.
    let mut second = post_head(
        addr,
        &format!("content-length: {declared}\r\nexpect: 100-continue\r\n"),
        b"",
    )
    .await;
    let answer = read_answer(&mut second).await;
    assert_eq!(answer.status, 503, "{}", answer.head);
    assert_eq!(answer.header("retry-after"), Some("1"), "{}", answer.head);
    // Sending its body at once, it gets the same answer (the body is read and thrown away,
    // so the connection is not reset under it).
    let mut eager = post_head(
        addr,
        &format!("content-length: {declared}\r\n"),
        &vec![0u8; declared as usize],
    )
    .await;
    let answer = read_answer(&mut eager).await;
    assert_eq!(answer.status, 503, "{}", answer.head);
    assert_eq!(answer.header("retry-after"), Some("1"), "{}", answer.head);

    // One without a length is counted as it arrives, and refused once it no longer fits.
    let chunk = vec![0u8; 400 * 1024];
    let mut chunked = post_head(
        addr,
        "transfer-encoding: chunked\r\n",
        &[
            format!("{:x}\r\n", chunk.len()).as_bytes(),
            &chunk,
            b"\r\n0\r\n\r\n",
        ]
        .concat(),
    )
    .await;
    let answer = read_answer(&mut chunked).await;
    assert_eq!(answer.status, 503, "{}", answer.head);
    assert!(answer.header("retry-after").is_some(), "{}", answer.head);
    assert_eq!(
        state.inflight_bytes(),
        declared,
        "the refused one holds nothing"
    );

    // The slow upload gives up: its share comes back, and a job fits again.
    slow.shutdown().await.expect("close");
    drop(slow);
    wait_for_inflight(&state, 0).await;
    let body = job(1);
    let mut next = post_head(addr, &format!("content-length: {}\r\n", body.len()), &body).await;
    let answer = read_answer(&mut next).await;
    assert_eq!(answer.status, 202, "{}", answer.head);
    wait_for_inflight(&state, 0).await;
}

async fn call(
    state: &AppState,
    method: &str,
    uri: &str,
    auth: Option<&str>,
    body: Vec<u8>,
) -> (StatusCode, Option<String>, serde_json::Value) {
    let mut request = Request::builder()
        .method(method)
        .uri(uri)
        .header(header::CONTENT_TYPE, "application/msgpack");
    if let Some(auth) = auth {
        request = request.header(header::AUTHORIZATION, auth);
    }
    let response = router(state.clone())
        .oneshot(request.body(Body::from(body)).expect("request"))
        .await
        .expect("infallible");
    let status = response.status();
    let retry_after = response
        .headers()
        .get(header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = to_bytes(response.into_body(), 1 << 20).await.expect("body");
    let json = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    (status, retry_after, json)
}

#[tokio::test]
async fn the_token_scheme_is_case_insensitive_and_the_comparison_exact() {
    let mut config = config();
    config.token = Some("s3cret".into());
    config.metrics_token = Some("scrape".into());
    let state = in_process(config, MemoryBounds::default());
    for auth in ["Bearer s3cret", "bearer s3cret", "BEARER  s3cret"] {
        let (status, _, body) = call(&state, "POST", "/v1/jobs", Some(auth), job(1)).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{auth}: {body}");
    }
    for auth in [
        None,
        Some("Bearer s3cre"),
        Some("Bearer s3cret2"),
        Some("Basic s3cret"),
    ] {
        let (status, _, body) = call(&state, "POST", "/v1/jobs", auth, job(1)).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{auth:?}: {body}");
    }
    // `/metrics` takes its own token; the probes none.
    let (status, _, _) = call(&state, "GET", "/metrics", Some("Bearer s3cret"), vec![]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _, _) = call(&state, "GET", "/metrics", Some("bearer scrape"), vec![]).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _, _) = call(&state, "GET", "/healthz", None, vec![]).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn a_full_in_process_queue_is_a_429_with_retry_after() {
    let bounds = MemoryBounds {
        max_tasks: 2,
        max_bytes: u64::MAX,
    };
    // Nothing consumes: the queue fills.
    let state = in_process(config(), bounds);
    for _ in 0..2 {
        let (status, _, body) = call(&state, "POST", "/v1/jobs", None, job(1)).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    }
    let (status, retry_after, body) = call(&state, "POST", "/v1/jobs", None, job(1)).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert_eq!(retry_after.as_deref(), Some("1"));
    assert!(
        body["error"].as_str().is_some_and(|e| e.contains("full")),
        "{body}"
    );
}

#[tokio::test]
async fn every_503_carries_retry_after() {
    // A broker nobody answers on.
    let mut config = config();
    config.broker.broker_timeout = Duration::from_millis(200);
    let mut amqp = AmqpConfig::new("amqp://127.0.0.1:1/%2f", "bounds-test");
    amqp.timeout = Duration::from_millis(200);
    let broker = Broker::new(amqp).expect("lazy broker");
    let state = AppState::with_broker(config, broker);
    let (status, retry_after, body) = call(&state, "POST", "/v1/jobs", None, job(1)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(retry_after.is_some(), "POST: {body}");
    let (status, retry_after, _) = call(&state, "GET", "/readyz", None, vec![]).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(retry_after.is_some(), "readyz");
}

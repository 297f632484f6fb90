//! The status service against a real RabbitMQ (`LUNA_AMQP_URL`, default
//! `amqp://guest:guest@127.0.0.1:5672/%2f`).
//!
//! Each test uses its own prefix (`test-<uuid>`), so tests never see each other's events, and
//! deletes its exchanges and queues at the end; the status instances' own event queues are
//! exclusive and disappear with their connections. Without a broker these tests fail, on
//! purpose: a skipped test would pass CI while testing nothing.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use futures_util::StreamExt;
use luna_job::{Event, EventKind, JobId};
use luna_queue::{AmqpConfig, Broker, Headers};
use luna_status::{Config, Error};
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode, header};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

const WAIT: Duration = Duration::from_secs(15);

fn amqp_url() -> String {
    std::env::var("LUNA_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

fn unique_prefix() -> String {
    format!("test-{}", uuid::Uuid::now_v7().simple())
}

async fn connect_broker(prefix: &str) -> Broker {
    let url = amqp_url();
    Broker::connect(AmqpConfig::new(url.clone(), prefix))
        .await
        .unwrap_or_else(|e| {
            panic!(
                "these tests need RabbitMQ, but none answered at {url} ({e}). Start one with \
                 `docker run -d -p 5672:5672 rabbitmq:3-management`, or point LUNA_AMQP_URL at one."
            )
        })
}

/// Runs `body` with a broker on a fresh prefix, then deletes that prefix's topology whether
/// `body` passed or panicked.
async fn with_broker<F, Fut>(body: F)
where
    F: FnOnce(String, Broker) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let prefix = unique_prefix();
    let broker = connect_broker(&prefix).await;
    let outcome = tokio::spawn(body(prefix, broker.clone())).await;
    broker
        .delete_topology()
        .await
        .expect("delete the test topology");
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("http client")
}

/// One running status service.
struct Instance {
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), Error>>,
}

impl Instance {
    /// Starts on a free port and waits until it is subscribed to events (`/readyz`), so that
    /// nothing published afterwards can miss it.
    async fn start(prefix: &str, token: Option<&str>) -> Self {
        let mut cfg = Config::new(amqp_url(), prefix);
        cfg.token = token.map(str::to_owned);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(luna_status::run(cfg, listener, async move {
            let _ = stopped.await;
        }));
        let instance = Self { addr, stop, task };
        let ready = tokio::time::timeout(WAIT, async {
            loop {
                let response = http().get(instance.url("/readyz")).send().await;
                if response.is_ok_and(|r| r.status() == reqwest::StatusCode::OK) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        assert!(
            ready.is_ok(),
            "status never became ready on {}; is RabbitMQ at {} healthy?",
            instance.addr,
            amqp_url()
        );
        instance
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn ws_url(&self, path: &str) -> String {
        format!("ws://{}{path}", self.addr)
    }

    async fn job(&self, job: &JobId) -> (reqwest::StatusCode, Value) {
        let response = http()
            .get(self.url(&format!("/v1/jobs/{job}")))
            .send()
            .await
            .expect("GET job");
        let status = response.status();
        (status, response.json().await.expect("JSON body"))
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        let result = tokio::time::timeout(WAIT, self.task)
            .await
            .expect("status stops promptly")
            .expect("status task did not panic");
        result.expect("status ran without error");
    }
}

async fn ws_connect(url: &str) -> Ws {
    let (ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("websocket handshake");
    ws
}

/// The next event on `ws`, skipping pings.
async fn next_event(ws: &mut Ws) -> Value {
    loop {
        let message = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("an event within the timeout")
            .expect("the websocket stays open")
            .expect("a websocket message");
        match message {
            Message::Text(text) => return serde_json::from_str(text.as_str()).expect("JSON event"),
            Message::Ping(_) | Message::Pong(_) => {}
            other => panic!("unexpected websocket message {other:?}"),
        }
    }
}

/// Asserts that no event arrives for a short while (no duplicates after the end).
async fn assert_quiet(ws: &mut Ws) {
    if let Ok(Some(Ok(Message::Text(text)))) =
        tokio::time::timeout(Duration::from_millis(500), ws.next()).await
    {
        panic!("unexpected extra event {text}");
    }
}

fn summary(event: &Value) -> (String, Option<u64>) {
    (
        event["event"].as_str().expect("event name").to_owned(),
        event["index"].as_u64(),
    )
}

async fn publish(broker: &Broker, job: &JobId, kind: EventKind) {
    broker
        .publish_event(&Event::now(job.clone(), kind), &Headers::new())
        .await
        .expect("publish event");
}

fn saved(index: u32) -> EventKind {
    EventKind::ImageSaved {
        index,
        affix: String::new(),
        format: "png".into(),
        path: format!("out/img_{index}.png"),
        bytes: 1234,
        width: 8,
        height: 8,
        quality_score: None,
        duration_ms: 5,
        worker: "test-worker".into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_replays_then_streams_live_and_every_instance_sees_every_event() {
    with_broker(|prefix, broker| async move {
        let a = Instance::start(&prefix, None).await;
        let b = Instance::start(&prefix, None).await;
        let mut everything_on_b = ws_connect(&b.ws_url("/ws")).await;

        let job = JobId::new();
        publish(&broker, &job, EventKind::SaveJobQueued { num_images: 3 }).await;
        publish(&broker, &job, saved(0)).await;

        // Connect only once instance A has recorded both, so they must come from the replay.
        tokio::time::timeout(WAIT, async {
            while a.job(&job).await.1["events"].as_array().map(Vec::len) != Some(2) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("instance A records the first two events");
        let mut one_job = ws_connect(&a.ws_url(&format!("/ws?job_id={job}"))).await;
        let replay = [
            next_event(&mut one_job).await,
            next_event(&mut one_job).await,
        ];
        assert_eq!(summary(&replay[0]), ("save_job_queued".into(), None));
        assert_eq!(summary(&replay[1]), ("image_saved".into(), Some(0)));
        assert_eq!(replay[0]["job_id"], job.as_str());
        assert_eq!(replay[0]["num_images"], 3);

        publish(&broker, &job, saved(1)).await;
        publish(&broker, &job, saved(2)).await;
        let live = [
            next_event(&mut one_job).await,
            next_event(&mut one_job).await,
            next_event(&mut one_job).await,
        ];
        assert_eq!(summary(&live[0]), ("image_saved".into(), Some(1)));
        assert_eq!(summary(&live[1]), ("image_saved".into(), Some(2)));
        let done = &live[2];
        assert_eq!(done["event"], "save_job_completed");
        assert_eq!(done["job_id"], job.as_str());
        assert_eq!(
            (&done["saved"], &done["rejected"], &done["failed"]),
            (&3.into(), &0.into(), &0.into())
        );
        assert!(done["duration_ms"].is_u64(), "{done}");
        assert!(done["timestamp"].is_string(), "{done}");
        assert_quiet(&mut one_job).await;

        let (status, state) = a.job(&job).await;
        assert_eq!(status, reqwest::StatusCode::OK);
        assert_eq!(state["state"], "completed");
        assert_eq!(
            (&state["num_images"], &state["saved"]),
            (&3.into(), &3.into())
        );
        let outcomes: Vec<_> = state["images"]
            .as_array()
            .expect("images")
            .iter()
            .map(|i| {
                (
                    i["index"].as_u64(),
                    i["outcome"].as_str(),
                    i["path"].as_str(),
                )
            })
            .collect();
        assert_eq!(
            outcomes,
            [
                (Some(0), Some("saved"), Some("out/img_0.png")),
                (Some(1), Some("saved"), Some("out/img_1.png")),
                (Some(2), Some("saved"), Some("out/img_2.png")),
            ]
        );
        assert_eq!(state["events"].as_array().map(Vec::len), Some(5));

        // Instance B has its own queue: it saw every event, live and in order.
        let mut seen = Vec::new();
        for _ in 0..5 {
            seen.push(summary(&next_event(&mut everything_on_b).await));
        }
        assert_eq!(
            seen,
            [
                ("save_job_queued".into(), None),
                ("image_saved".into(), Some(0)),
                ("image_saved".into(), Some(1)),
                ("image_saved".into(), Some(2)),
                ("save_job_completed".into(), None),
            ]
        );
        assert_eq!(b.job(&job).await.1["state"], "completed");

        let (status, body) = a.job(&JobId::new()).await;
        assert_eq!(status, reqwest::StatusCode::NOT_FOUND);
        assert!(body["error"].is_string());

        let _ = one_job.close(None).await;
        let _ = everything_on_b.close(None).await;
        a.stop().await;
        b.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_guards_http_and_websocket_but_not_probes() {
    with_broker(|prefix, _broker| async move {
        let status = Instance::start(&prefix, Some("s3cret")).await;
        let job_url = status.url("/v1/jobs/some-job");

        let r = http().get(&job_url).send().await.expect("GET");
        assert_eq!(r.status(), reqwest::StatusCode::UNAUTHORIZED);
        let body: Value = r.json().await.expect("JSON error");
        assert!(
            body["error"].as_str().is_some_and(|e| e.contains("token")),
            "{body}"
        );
        let r = http()
            .get(&job_url)
            .bearer_auth("s3cret")
            .send()
            .await
            .expect("GET");
        assert_eq!(r.status(), reqwest::StatusCode::NOT_FOUND);
        let r = http()
            .get(status.url("/healthz"))
            .send()
            .await
            .expect("GET");
        assert_eq!(r.status(), reqwest::StatusCode::OK);

        match tokio_tungstenite::connect_async(status.ws_url("/ws")).await {
            Err(tungstenite::Error::Http(response)) => {
                assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
            }
            other => panic!("expected 401 without a token, got {other:?}"),
        }
        let mut ws = ws_connect(&status.ws_url("/?token=s3cret")).await;
        let _ = ws.close(None).await;
        let mut request = status.ws_url("/ws").into_client_request().expect("request");
        request.headers_mut().insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer s3cret"),
        );
        let (mut ws, _) = tokio_tungstenite::connect_async(request)
            .await
            .expect("handshake with a bearer header");
        let _ = ws.close(None).await;

        status.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_open_websockets_as_going_away() {
    with_broker(|prefix, _broker| async move {
        let status = Instance::start(&prefix, None).await;
        let mut ws = ws_connect(&status.ws_url("/ws")).await;
        status.stop().await;
        let message = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a close frame within the timeout");
        match message {
            Some(Ok(Message::Close(Some(frame)))) => {
                assert_eq!(u16::from(frame.code), 1001, "{frame:?}");
            }
            other => panic!("expected a close frame, got {other:?}"),
        }
    })
    .await;
}

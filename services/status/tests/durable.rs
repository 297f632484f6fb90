//! Job tracking that survives restarts and reconnects, against a real RabbitMQ
//! (`LUNA_AMQP_URL`, default `amqp://guest:guest@127.0.0.1:5672/%2f`).
//!
//! Each test has its own prefix and deletes its topology, events stream included, even when it
//! fails. Broker connections are cut through a TCP proxy the test owns, so nothing else on the
//! shared broker is touched.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use luna_job::{Event, EventKind, JobId};
use luna_queue::{AmqpConfig, Broker, Headers};
use luna_status::{Config, Error};
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(30);

/// Images per job in these tests.
const IMAGES: u32 = 3;

fn amqp_url() -> String {
    std::env::var("LUNA_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// `host:port` of the broker in `url`, and `url` with that part replaced by `addr`.
fn split_url(url: &str) -> (String, impl Fn(SocketAddr) -> String + use<>) {
    let (scheme, rest) = url.split_once("://").expect("URL with a scheme");
    let (user, rest) = rest.rsplit_once('@').map_or(("", rest), |(u, r)| (u, r));
    let (host, path) = rest.split_once('/').map_or((rest, ""), |(h, p)| (h, p));
    let host = if host.contains(':') {
        host.to_owned()
    } else {
        format!("{host}:5672")
    };
    let (scheme, user, path) = (scheme.to_owned(), user.to_owned(), path.to_owned());
    let at = if user.is_empty() { "" } else { "@" };
    (host, move |addr| {
        format!("{scheme}://{user}{at}{addr}/{path}")
    })
}

/// Runs `body` with a broker on a fresh prefix, then deletes that prefix's topology (the events
/// stream with it) whether `body` passed or panicked.
async fn with_broker<F, Fut>(body: F)
where
    F: FnOnce(String, Broker) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let prefix = format!("test-{}", uuid::Uuid::now_v7().simple());
    let url = amqp_url();
    let broker = Broker::connect(AmqpConfig::new(url.clone(), &prefix))
        .await
        .unwrap_or_else(|e| panic!("these tests need RabbitMQ at {url} ({e})"));
    let outcome = tokio::spawn(body(prefix, broker.clone())).await;
    broker
        .delete_topology()
        .await
        .expect("delete the test topology");
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}

/// A TCP proxy in front of the broker whose connections the test can cut at will.
struct Proxy {
    addr: SocketAddr,
    generation: Arc<Mutex<CancellationToken>>,
    task: JoinHandle<()>,
}

impl Proxy {
    async fn start(upstream: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let generation = Arc::new(Mutex::new(CancellationToken::new()));
        let current = generation.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let cut = current.lock().expect("lock").clone();
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    tokio::select! {
                        () = cut.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                    }
                });
            }
        });
        Self {
            addr,
            generation,
            task,
        }
    }

    /// Drops every connection open through the proxy; new ones are accepted as before.
    fn cut(&self) {
        let mut generation = self.generation.lock().expect("lock");
        generation.cancel();
        *generation = CancellationToken::new();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.task.abort();
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
    async fn start(url: &str, prefix: &str) -> Self {
        Self::start_with(Config::new(url, prefix)).await
    }

    async fn start_with(cfg: Config) -> Self {
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
        assert!(ready.is_ok(), "status never became ready on {addr}");
        instance
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
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

    /// Waits until every job is `completed` with every image saved; on timeout, fails naming
    /// the jobs that are not.
    async fn await_completed(&self, jobs: &[JobId], what: &str) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let mut behind = Vec::new();
            for job in jobs {
                let (status, view) = self.job(job).await;
                let done = status == reqwest::StatusCode::OK
                    && view["state"] == "completed"
                    && view["saved"] == IMAGES;
                if !done {
                    behind.push(format!("{job}: {status} {}", view["state"]));
                }
            }
            if behind.is_empty() {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what}: {} of {} jobs are not completed: {behind:?}",
                behind.len(),
                jobs.len()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
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

/// Publishes a whole job: `save_job_queued`, then one `image_saved` per image.
async fn publish_job(broker: &Broker) -> JobId {
    let job = JobId::new();
    publish(
        broker,
        &job,
        EventKind::SaveJobQueued { num_images: IMAGES },
    )
    .await;
    for index in 0..IMAGES {
        publish(broker, &job, saved(index)).await;
    }
    job
}

/// The names of the events a `?job_id=` WebSocket subscriber gets first (its replay), read
/// until `save_job_completed` or until nothing more comes.
async fn replay_names(instance: &Instance, job: &JobId) -> Vec<String> {
    let url = format!("ws://{}/ws?job_id={job}", instance.addr);
    let (mut ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("websocket handshake");
    let mut names = Vec::new();
    while let Ok(Some(Ok(message))) = tokio::time::timeout(Duration::from_secs(2), ws.next()).await
    {
        if let Message::Text(text) = message {
            let event: Value = serde_json::from_str(text.as_str()).expect("JSON event");
            let name = event["event"].as_str().expect("event name").to_owned();
            let done = name == "save_job_completed";
            names.push(name);
            if done {
                break;
            }
        }
    }
    let _ = ws.close(None).await;
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_instance_rebuilds_every_job_and_replays_it() {
    with_broker(|prefix, broker| async move {
        let first = Instance::start(&amqp_url(), &prefix).await;
        let mut jobs = Vec::new();
        for _ in 0..30 {
            jobs.push(publish_job(&broker).await);
        }
        // Redeliveries: a second queued event and a repeated image must not count twice.
        publish(
            &broker,
            &jobs[0],
            EventKind::SaveJobQueued { num_images: IMAGES },
        )
        .await;
        publish(&broker, &jobs[0], saved(1)).await;
        first.await_completed(&jobs, "before the restart").await;
        first.stop().await;

        // Events published while no status instance runs are kept too.
        for _ in 0..10 {
            jobs.push(publish_job(&broker).await);
        }

        let second = Instance::start(&amqp_url(), &prefix).await;
        second.await_completed(&jobs, "after the restart").await;
        let (_, view) = second.job(&jobs[0]).await;
        assert_eq!(
            (&view["num_images"], &view["saved"]),
            (&IMAGES.into(), &IMAGES.into()),
            "{view}"
        );

        for job in [&jobs[1], &jobs[35]] {
            let names = replay_names(&second, job).await;
            assert_eq!(
                names,
                [
                    "save_job_queued",
                    "image_saved",
                    "image_saved",
                    "image_saved",
                    "save_job_completed"
                ],
                "replay of {job} after the restart"
            );
        }
        second.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_event_is_lost_when_the_broker_connection_is_cut() {
    with_broker(|prefix, broker| async move {
        let (upstream, via) = split_url(&amqp_url());
        let proxy = Proxy::start(upstream).await;
        let status = Instance::start(&via(proxy.addr), &prefix).await;

        let mut jobs = Vec::new();
        for n in 0..50 {
            if n % 10 == 5 {
                proxy.cut();
            }
            jobs.push(publish_job(&broker).await);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        status.await_completed(&jobs, "after 5 cuts").await;
        status.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_instance_sees_every_event_even_one_started_late_with_other_flags() {
    with_broker(|prefix, broker| async move {
        let early = Instance::start(&amqp_url(), &prefix).await;
        let mut jobs = Vec::new();
        for _ in 0..10 {
            jobs.push(publish_job(&broker).await);
        }
        // Configured with another retention than the stream was declared with: it reads the
        // stream as it is rather than refusing to start.
        let mut cfg = Config::new(amqp_url(), &prefix);
        cfg.events_max_age = Duration::from_secs(48 * 3600);
        let late = Instance::start_with(cfg).await;
        for _ in 0..10 {
            jobs.push(publish_job(&broker).await);
        }
        for instance in [&early, &late] {
            instance.await_completed(&jobs, "on both instances").await;
            for job in &jobs {
                let (_, view) = instance.job(job).await;
                // queued, three saved, the derived completion: each exactly once.
                assert_eq!(
                    view["events"].as_array().map(Vec::len),
                    Some(5),
                    "{job}: {view}"
                );
            }
        }
        early.stop().await;
        late.stop().await;
    })
    .await;
}

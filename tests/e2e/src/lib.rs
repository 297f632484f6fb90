//! Harness for end-to-end tests: a unique broker namespace per test, services started in
//! process on ephemeral ports, an event recorder, and request builders.
//!
//! Every test gets its own prefix (`t<uuid>`), so its exchanges and queues are its own, and
//! deletes them at the end. The broker is the one at `LUNA_AMQP_URL` (default: RabbitMQ on
//! localhost); without one the tests fail and say how to get one.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use luna_job::codec::to_msgpack;
use luna_job::{Event, ImageFormat, ImageInput, SaveRequest};
use luna_queue::{AmqpConfig, Broker};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// A broker started for this test process, kept for its whole life.
static CONTAINER_URL: std::sync::OnceLock<String> = std::sync::OnceLock::new();

async fn answers(url: &str) -> bool {
    match Broker::new(AmqpConfig::new(url, "probe")) {
        Ok(broker) => broker.is_ready().await,
        Err(_) => false,
    }
}

/// The broker URL for tests: `LUNA_AMQP_URL` when set; else RabbitMQ on localhost; else, where
/// Docker runs, a RabbitMQ container started with testcontainers. Fails the test with
/// instructions when none of these works.
pub async fn require_broker() -> String {
    if let Ok(url) = std::env::var("LUNA_AMQP_URL") {
        assert!(
            answers(&url).await,
            "no RabbitMQ broker answers at LUNA_AMQP_URL={url}"
        );
        return url;
    }
    if answers(DEFAULT_AMQP_URL).await {
        return DEFAULT_AMQP_URL.to_owned();
    }
    if let Some(url) = CONTAINER_URL.get() {
        return url.clone();
    }
    match start_container().await {
        Ok(url) => CONTAINER_URL.get_or_init(|| url).clone(),
        Err(docker) => panic!(
            "no RabbitMQ broker answers at {DEFAULT_AMQP_URL}, and none could be started with Docker ({docker}). \
             These tests need one: `apt-get install rabbitmq-server` (then `rabbitmq-server -detached`), \
             or `docker run -d -p 5672:5672 rabbitmq:3-management`, or set LUNA_AMQP_URL."
        ),
    }
}

async fn start_container() -> Result<String, String> {
    use testcontainers::core::{IntoContainerPort, WaitFor};
    use testcontainers::runners::AsyncRunner;
    let container = testcontainers::GenericImage::new("rabbitmq", "3-management")
        .with_exposed_port(5672.tcp())
        .with_wait_for(WaitFor::message_on_stdout("Server startup complete"))
        .start()
        .await
        .map_err(|e| e.to_string())?;
    let port = container
        .get_host_port_ipv4(5672)
        .await
        .map_err(|e| e.to_string())?;
    // Leak the handle: the container serves every test of this process, and testcontainers'
    // reaper removes it when the process ends.
    std::mem::forget(container);
    Ok(format!("amqp://guest:guest@127.0.0.1:{port}/%2f"))
}

/// A running service and the means to stop it.
#[derive(Debug)]
pub struct Service {
    pub addr: SocketAddr,
    stop: CancellationToken,
    handle: JoinHandle<anyhow::Result<()>>,
}

impl Service {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Asks the service to stop and waits for it.
    pub async fn stop(self) {
        self.stop.cancel();
        match tokio::time::timeout(Duration::from_secs(30), self.handle).await {
            Ok(Ok(Ok(()))) => {}
            other => panic!("service did not stop cleanly: {other:?}"),
        }
    }
}

async fn spawn<F, Fut>(run: F) -> Service
where
    F: FnOnce(TcpListener, CancellationToken) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let stop = CancellationToken::new();
    let handle = tokio::spawn(run(listener, stop.clone()));
    Service { addr, stop, handle }
}

/// One test's broker namespace and output folder.
#[derive(Debug)]
pub struct Env {
    pub prefix: String,
    pub url: String,
    pub broker: Broker,
    pub output: tempfile::TempDir,
    /// Set by [`Env::cleanup`]; otherwise dropping the env (a failed test) deletes the topology.
    cleaned: bool,
}

impl Env {
    pub async fn new() -> Self {
        let url = require_broker().await;
        let prefix = format!("t{}", uuid::Uuid::now_v7().simple());
        let broker = Broker::connect(AmqpConfig::new(&url, &prefix))
            .await
            .expect("declare topology");
        Self {
            prefix,
            url,
            broker,
            output: tempfile::tempdir().expect("tempdir"),
            cleaned: false,
        }
    }

    /// Deletes the test's exchanges and queues.
    pub async fn cleanup(mut self) {
        self.broker
            .delete_topology()
            .await
            .expect("delete topology");
        self.cleaned = true;
    }

    pub fn gateway_config(&self) -> luna_gateway::Config {
        let mut c = luna_gateway::Config::defaults();
        c.broker = luna_queue::BrokerArgs::new(&self.url, &self.prefix);
        c
    }

    pub fn saver_config(&self) -> luna_saver::Config {
        let mut c = luna_saver::Config::defaults();
        c.broker = luna_queue::BrokerArgs::new(&self.url, &self.prefix);
        c.output_root = self.output.path().to_owned();
        c.retry_backoff = Duration::from_millis(100);
        c.scale_interval = Duration::from_millis(200);
        c
    }

    pub fn status_config(&self) -> luna_status::Config {
        luna_status::Config::new(&self.url, &self.prefix)
    }

    pub async fn start_gateway(&self, config: luna_gateway::Config) -> Service {
        spawn(|l, stop| luna_gateway::run(config, l, stop.cancelled_owned())).await
    }

    pub async fn start_saver(&self, config: luna_saver::Config) -> Service {
        let s = spawn(|l, stop| luna_saver::run(config, l, stop.cancelled_owned())).await;
        wait_ready(&s).await;
        s
    }

    pub async fn start_status(&self, config: luna_status::Config) -> Service {
        let s = spawn(|l, stop| async move {
            Ok(luna_status::run(config, l, stop.cancelled_owned()).await?)
        })
        .await;
        wait_ready(&s).await;
        s
    }

    /// Records every event of this namespace from now on.
    pub async fn record_events(&self) -> EventLog {
        let mut stream = self.broker.subscribe_events(None).await.expect("subscribe");
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink = events.clone();
        tokio::spawn(async move {
            while let Some(Ok((Ok(event), _))) = stream.next().await {
                sink.lock().expect("lock").push(event);
            }
        });
        EventLog { events }
    }
}

/// A test that failed (panicked) before [`Env::cleanup`] still removes its `t<uuid>.*`
/// exchanges and queues: on a thread of its own, with a fresh connection, since the test's
/// runtime may be unwinding.
impl Drop for Env {
    fn drop(&mut self) {
        if self.cleaned {
            return;
        }
        let (url, prefix) = (self.url.clone(), self.prefix.clone());
        let cleanup = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                if let Ok(broker) = Broker::new(AmqpConfig::new(&url, &prefix)) {
                    let deleted =
                        tokio::time::timeout(Duration::from_secs(10), broker.delete_topology())
                            .await;
                    if !matches!(deleted, Ok(Ok(()))) {
                        eprintln!("could not delete the topology {prefix}.*: {deleted:?}");
                    }
                }
            });
        });
        let _ = cleanup.join();
    }
}

async fn wait_ready(s: &Service) {
    let url = format!("{}/readyz", s.url());
    for _ in 0..100 {
        if reqwest::get(&url)
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{url} never became ready");
}

/// Events seen so far.
#[derive(Debug, Clone)]
pub struct EventLog {
    events: Arc<Mutex<Vec<Event>>>,
}

impl EventLog {
    pub fn snapshot(&self) -> Vec<Event> {
        self.events.lock().expect("lock").clone()
    }

    /// Waits until `done` holds for the events so far, or panics after `limit`.
    pub async fn wait_until(&self, limit: Duration, done: impl Fn(&[Event]) -> bool) -> Vec<Event> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let events = self.snapshot();
            if done(&events) {
                return events;
            }
            if tokio::time::Instant::now() > deadline {
                panic!("timed out after {limit:?}; events so far: {events:#?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Counts events named `name`, optionally for one job.
pub fn count(events: &[Event], name: &str, job: Option<&str>) -> usize {
    events
        .iter()
        .filter(|e| e.name() == name && job.is_none_or(|j| e.job_id.as_str() == j))
        .count()
}

/// A photograph-like test image: smooth gradients with texture, so gates and lossy codecs
/// behave as on real content.
pub fn test_image(
    width: u32,
    height: u32,
    channels: u32,
    format: ImageFormat,
    affix: &str,
) -> ImageInput {
    let mut pixels = Vec::with_capacity((width * height * channels) as usize);
    for y in 0..height {
        for x in 0..width {
            let t = ((x * 7 + y * 13) % 31) as u8;
            let rgb = [
                (x * 255 / width.max(1)) as u8 ^ t,
                (y * 255 / height.max(1)) as u8,
                ((x + y) % 256) as u8,
            ];
            pixels.extend_from_slice(&rgb[..channels.min(3) as usize]);
            if channels == 4 {
                pixels.push(255);
            }
        }
    }
    ImageInput {
        pixels: pixels.into(),
        width,
        height,
        channels,
        format,
        affix: affix.into(),
        ..Default::default()
    }
}

/// Posts `request` as MessagePack; returns status and JSON body.
pub async fn submit(gateway: &str, request: &SaveRequest) -> (u16, serde_json::Value) {
    submit_with_key(gateway, request, None).await
}

/// Posts `request` as MessagePack with an optional `Idempotency-Key`.
pub async fn submit_with_key(
    gateway: &str,
    request: &SaveRequest,
    key: Option<&str>,
) -> (u16, serde_json::Value) {
    let body = to_msgpack(request).expect("encode");
    let mut post = reqwest::Client::new()
        .post(format!("{gateway}/v1/jobs"))
        .header("content-type", "application/msgpack");
    if let Some(key) = key {
        post = post.header("idempotency-key", key);
    }
    let response = post.body(body).send().await.expect("gateway answers");
    let status = response.status().as_u16();
    (status, response.json().await.expect("JSON answer"))
}

/// Every file under `dir`, as relative paths, sorted; the store's own state folder (`.luna`,
/// the submission ledger) is left out.
pub fn files(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if d == dir && e.file_name() == ".luna" {
                continue;
            }
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(
                    p.strip_prefix(dir)
                        .expect("inside")
                        .to_string_lossy()
                        .into_owned(),
                );
            }
        }
    }
    out.sort();
    out
}

/// Gateway, saver and status on one broker handle, as `luna up` runs them (in process) or as a
/// farm runs them (RabbitMQ): the same contract tests drive both.
#[derive(Debug)]
pub struct Stack {
    pub gateway: Service,
    pub saver: Service,
    pub status: Service,
}

impl Stack {
    pub async fn start(broker: Broker, output_root: &std::path::Path) -> Self {
        // Over RabbitMQ, status reads the events stream on a connection of its own, opened from
        // its configured URL.
        let url = match &broker {
            Broker::Amqp(_) => require_broker().await,
            Broker::Memory(_) => String::new(),
        };
        let mut status_cfg = luna_status::Config::new(url, broker.prefix());
        status_cfg.job_ttl = Duration::from_secs(600);
        let status = {
            let b = broker.clone();
            spawn(|l, stop| async move {
                Ok(luna_status::run_with_broker(status_cfg, b, l, stop.cancelled_owned()).await?)
            })
            .await
        };
        wait_ready(&status).await;
        let mut saver_cfg = luna_saver::Config::defaults();
        saver_cfg.output_root = output_root.to_owned();
        saver_cfg.retry_backoff = Duration::from_millis(100);
        let saver = {
            let ctx = luna_saver::Context::with_broker(saver_cfg, broker.clone());
            spawn(|l, stop| luna_saver::serve(ctx, l, stop.cancelled_owned())).await
        };
        wait_ready(&saver).await;
        let gateway = {
            let state =
                luna_gateway::AppState::with_broker(luna_gateway::Config::defaults(), broker);
            spawn(|l, stop| luna_gateway::serve(state, l, stop.cancelled_owned())).await
        };
        Self {
            gateway,
            saver,
            status,
        }
    }

    pub async fn stop(self) {
        self.gateway.stop().await;
        self.saver.stop().await;
        self.status.stop().await;
    }
}

/// Builds the saver binary (cargo reuses what `cargo test` built) and returns its path.
pub fn saver_binary() -> std::path::PathBuf {
    let status = std::process::Command::new(env!("CARGO"))
        .args([
            "build",
            "--quiet",
            "-p",
            "luna-saver",
            "--bin",
            "luna-saver",
        ])
        .status()
        .expect("cargo build");
    assert!(status.success(), "building luna-saver failed");
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/pipeline-<hash> -> target/<profile>/luna-saver
    exe.parent()
        .and_then(|d| d.parent())
        .expect("target dir")
        .join("luna-saver")
}

/// Starts the saver binary on the env's broker namespace and output root, two slots.
pub fn spawn_saver(bin: &std::path::Path, env: &Env) -> std::process::Child {
    std::process::Command::new(bin)
        .env("LUNA_AMQP_URL", &env.url)
        .env("LUNA_AMQP_PREFIX", &env.prefix)
        .env("LUNA_OUTPUT_ROOT", env.output.path())
        .env("LUNA_LISTEN", "127.0.0.1:0")
        .env("LUNA_MIN_WORKERS", "2")
        .env("LUNA_MAX_WORKERS", "2")
        .env(
            "RUST_LOG",
            std::env::var("LUNA_TEST_SAVER_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .spawn()
        .expect("start luna-saver")
}

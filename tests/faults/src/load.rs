//! The load: N clients, each submitting jobs one after another, as a careful client would.
//!
//! Every submission gets a number (`sub`, unique within a scenario) and an `Idempotency-Key`
//! of its own, kept across its retries. Its request renders file names that carry the number
//! and the image's position (`save_path` = the scenario, `filename` = `%index%` with
//! `index` = `sub`, affix `i<k>`, no subfolder), so the audit can tell every image's files
//! apart without trusting anything the services say: `<root>/<scenario>/<sub>_i<k>.png`. The
//! pixels carry the same two numbers in their first bytes.
//!
//! A client retries on no answer (connection refused or reset, timeout), 503 and 429, after
//! `Retry-After` when given, until a 202 or until it gives up on that submission. Any other
//! answer (400, 413, ...) is final. Requests alternate between JSON and MessagePack.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::json;

/// What the clients send.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// `save_path` of every job: files land under `<root>/<scenario>/`.
    pub scenario: String,
    pub clients: usize,
    pub jobs_per_client: usize,
    pub images_per_job: usize,
    pub width: u32,
    pub height: u32,
    /// Pause between one client's submissions.
    pub pause: Duration,
    /// No new submission starts after this long (None: only `jobs_per_client` bounds it).
    pub run_for: Option<Duration>,
    /// An attempt without an answer this long counts as no answer.
    pub answer_timeout: Duration,
    /// A submission is abandoned this long after its first attempt.
    pub give_up: Duration,
    pub png_compression: u8,
}

impl LoadSpec {
    /// Small jobs (64x64 PNG) for `scenario`: `clients` x `jobs_per_client` jobs of
    /// `images_per_job` images.
    pub fn small(
        scenario: &str,
        clients: usize,
        jobs_per_client: usize,
        images_per_job: usize,
    ) -> Self {
        Self {
            scenario: scenario.to_owned(),
            clients,
            jobs_per_client,
            images_per_job,
            width: 64,
            height: 64,
            pause: Duration::from_millis(50),
            run_for: None,
            answer_timeout: Duration::from_secs(30),
            give_up: Duration::from_secs(90),
            png_compression: 1,
        }
    }
}

/// One answer (or its absence) to one attempt.
#[derive(Debug, Clone)]
pub struct Attempt {
    /// None: no answer (refused, reset, timed out).
    pub status: Option<u16>,
    /// From sending until the answer's status line (or the failure).
    pub elapsed: Duration,
    /// When the attempt started.
    pub at: Instant,
}

/// How a submission ended for its client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Still being tried.
    Pending,
    /// 202 with this job id.
    Accepted(String),
    /// A final answer other than 202.
    Refused(u16),
    /// No 202 before the client gave up.
    Abandoned,
}

/// One submission as its client saw it.
#[derive(Debug, Clone)]
pub struct Submission {
    pub sub: u64,
    pub images: usize,
    pub key: String,
    pub attempts: Vec<Attempt>,
    /// Every job id answered with a 202 for this submission (more than one: the gateway
    /// minted a new job for a retry).
    pub job_ids: Vec<String>,
    pub outcome: Outcome,
}

impl Submission {
    pub fn accepted(&self) -> Option<&str> {
        match &self.outcome {
            Outcome::Accepted(id) => Some(id),
            _ => None,
        }
    }
}

/// A running load.
#[derive(Debug)]
pub struct Load {
    subs: Arc<Mutex<Vec<Submission>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    /// Starts `spec.clients` clients against `gateway` (`http://host:port`). `counter` numbers
    /// the submissions, shared by every load of a scenario.
    pub fn start(gateway: &str, spec: &LoadSpec, counter: &Arc<AtomicU64>) -> Self {
        let subs = Arc::new(Mutex::new(Vec::new()));
        let started = Instant::now();
        let tasks = (0..spec.clients)
            .map(|_| {
                let (gateway, spec, counter, subs) = (
                    gateway.to_owned(),
                    spec.clone(),
                    counter.clone(),
                    subs.clone(),
                );
                tokio::spawn(async move {
                    client(&gateway, &spec, &counter, &subs, started).await;
                })
            })
            .collect();
        Self { subs, tasks }
    }

    /// The submissions so far (the ones in flight as `Pending`).
    pub fn snapshot(&self) -> Vec<Submission> {
        lock(&self.subs).clone()
    }

    /// Waits for every client to finish.
    pub async fn wait(self) -> Vec<Submission> {
        for t in self.tasks {
            let _ = t.await;
        }
        lock(&self.subs).clone()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

async fn client(
    gateway: &str,
    spec: &LoadSpec,
    counter: &AtomicU64,
    subs: &Mutex<Vec<Submission>>,
    started: Instant,
) {
    let Ok(http) = reqwest::Client::builder()
        .timeout(spec.answer_timeout)
        .build()
    else {
        return;
    };
    let url = format!("{gateway}/v1/jobs");
    let base = gradient(spec.width, spec.height);
    for _ in 0..spec.jobs_per_client {
        if spec.run_for.is_some_and(|d| started.elapsed() > d) {
            break;
        }
        let sub = counter.fetch_add(1, Ordering::Relaxed);
        let (content_type, body) = request_body(spec, &base, sub);
        let key = uuid::Uuid::new_v4().to_string();
        let slot = {
            let mut all = lock(subs);
            all.push(Submission {
                sub,
                images: spec.images_per_job,
                key: key.clone(),
                attempts: Vec::new(),
                job_ids: Vec::new(),
                outcome: Outcome::Pending,
            });
            all.len() - 1
        };
        let first = Instant::now();
        let outcome = loop {
            let at = Instant::now();
            let answer = http
                .post(&url)
                .header("content-type", content_type)
                .header("idempotency-key", &key)
                .body(body.clone())
                .send()
                .await;
            let elapsed = at.elapsed();
            let (status, retry_after, job_id) = match answer {
                Ok(r) => {
                    let status = r.status().as_u16();
                    let retry_after = r
                        .headers()
                        .get("retry-after")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.trim().parse::<f64>().ok())
                        .map(|s| Duration::from_secs_f64(s.clamp(0.0, 5.0)));
                    let job_id = if status == 202 {
                        r.json::<serde_json::Value>()
                            .await
                            .ok()
                            .and_then(|v| v["job_id"].as_str().map(str::to_owned))
                    } else {
                        None
                    };
                    (Some(status), retry_after, job_id)
                }
                Err(_) => (None, None, None),
            };
            {
                let mut all = lock(subs);
                let s = &mut all[slot];
                s.attempts.push(Attempt {
                    status,
                    elapsed,
                    at,
                });
                if let Some(id) = &job_id {
                    s.job_ids.push(id.clone());
                }
            }
            match status {
                Some(202) => break Outcome::Accepted(job_id.unwrap_or_default()),
                Some(429 | 503) | None => {
                    if first.elapsed() > spec.give_up {
                        break Outcome::Abandoned;
                    }
                    tokio::time::sleep(retry_after.unwrap_or(Duration::from_millis(250))).await;
                }
                Some(other) => break Outcome::Refused(other),
            }
        };
        lock(subs)[slot].outcome = outcome;
        tokio::time::sleep(spec.pause).await;
    }
}

/// A gradient of `width` x `height` RGB pixels, computed once per client.
fn gradient(width: u32, height: u32) -> Vec<u8> {
    let (w, h) = (width as usize, height as usize);
    let mut px = Vec::with_capacity(w * h * 3);
    for y in 0..h {
        for x in 0..w {
            px.extend_from_slice(&[
                (x * 255 / w) as u8,
                (y * 255 / h) as u8,
                ((x ^ y) & 0xff) as u8,
            ]);
        }
    }
    px
}

/// The pixels of image `k` of submission `sub`: the gradient with `sub` (8 bytes, little
/// endian) and `k` (4 bytes) in its first 12 bytes, so every image is unique and names itself.
pub fn pixels(base: &[u8], sub: u64, k: u32) -> Vec<u8> {
    let mut px = base.to_vec();
    px[..8].copy_from_slice(&sub.to_le_bytes());
    px[8..12].copy_from_slice(&k.to_le_bytes());
    px
}

/// The request for submission `sub`: JSON for even numbers, MessagePack for odd ones.
pub fn request_body(spec: &LoadSpec, base: &[u8], sub: u64) -> (&'static str, Vec<u8>) {
    let images: Vec<(u32, Vec<u8>)> = (0..spec.images_per_job as u32)
        .map(|k| (k, pixels(base, sub, k)))
        .collect();
    if sub.is_multiple_of(2) {
        let b64 = base64::engine::general_purpose::STANDARD;
        let images: Vec<serde_json::Value> = images
            .iter()
            .map(|(k, px)| {
                json!({
                    "pixels": b64.encode(px),
                    "width": spec.width,
                    "height": spec.height,
                    "channels": 3,
                    "format": "png",
                    "affix": format!("i{k}"),
                    "subdir": false,
                })
            })
            .collect();
        let body = json!({
            "save_path": spec.scenario,
            "filename": "%index%",
            "index": sub,
            "png_compression": spec.png_compression,
            "images": images,
        });
        ("application/json", body.to_string().into_bytes())
    } else {
        use rmpv::Value;
        let s = |v: &str| Value::from(v);
        let images = images
            .into_iter()
            .map(|(k, px)| {
                Value::Map(vec![
                    (s("pixels"), Value::Binary(px)),
                    (s("width"), Value::from(spec.width)),
                    (s("height"), Value::from(spec.height)),
                    (s("channels"), Value::from(3)),
                    (s("format"), s("png")),
                    (s("affix"), Value::from(format!("i{k}"))),
                    (s("subdir"), Value::from(false)),
                ])
            })
            .collect();
        let body = Value::Map(vec![
            (s("save_path"), Value::from(spec.scenario.as_str())),
            (s("filename"), s("%index%")),
            (s("index"), Value::from(sub)),
            (s("png_compression"), Value::from(spec.png_compression)),
            (s("images"), Value::Array(images)),
        ]);
        let mut out = Vec::new();
        // Writing into a Vec cannot fail.
        let _ = rmpv::encode::write_value(&mut out, &body);
        ("application/msgpack", out)
    }
}

/// The longest wait for any answer (or failure) over every attempt.
pub fn max_answer(subs: &[Submission]) -> Duration {
    subs.iter()
        .flat_map(|s| s.attempts.iter().map(|a| a.elapsed))
        .max()
        .unwrap_or_default()
}

/// Attempts by answer: `202: 120, 503: 7, none: 3`.
pub fn answers_summary(subs: &[Submission]) -> String {
    let mut counts = std::collections::BTreeMap::<String, usize>::new();
    for a in subs.iter().flat_map(|s| &s.attempts) {
        let key = a
            .status
            .map_or_else(|| "none".to_owned(), |s| s.to_string());
        *counts.entry(key).or_default() += 1;
    }
    counts
        .iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

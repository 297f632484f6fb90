//! `luna submit`: send local image files to a running Luna Saver, optionally waiting until
//! every image is saved.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use futures_util::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use luna_job::codec::to_msgpack;
use luna_job::{ImageFormat, ImageInput, QualityGate, SampleType, SaveRequest};
use tokio_tungstenite::tungstenite::Message;

/// Most images per request, the gateway's default limit.
const IMAGES_PER_JOB: usize = 16;

/// `luna submit` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct SubmitArgs {
    /// Image files (PNG, JPEG, WebP; 8- or 16-bit), or folders with --recursive.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// Gateway URL.
    #[arg(
        long,
        env = "LUNA_GATEWAY_URL",
        default_value = "http://127.0.0.1:19283"
    )]
    pub gateway: String,
    /// Status URL (for --wait).
    #[arg(
        long,
        env = "LUNA_STATUS_URL",
        default_value = "http://127.0.0.1:19284"
    )]
    pub status: String,
    /// Wait until every image is saved; exit non-zero if any failed.
    #[arg(long)]
    pub wait: bool,
    /// Take image files from folders, recursively.
    #[arg(long, short)]
    pub recursive: bool,
    /// Bearer token for gateway and status.
    #[arg(long, env = "LUNA_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Output format of every image.
    #[arg(long, value_enum, default_value = "png")]
    pub format: FormatArg,
    /// Directory template, relative to the output root.
    #[arg(long, default_value = "")]
    pub save_path: String,
    /// File-stem template. The default keeps each file's own stem (`%source%`): photo.png is
    /// saved as photo.<ext>.
    #[arg(long, default_value = "%source%")]
    pub filename: String,
    /// Model file or path, for the model tokens.
    #[arg(long, default_value = "")]
    pub model_name: String,
    /// Value of %index%.
    #[arg(long, default_value_t = 0)]
    pub index: i64,
    /// Affix appended to every stem (and folder name, unless --no-subdir).
    #[arg(long, default_value = "")]
    pub affix: String,
    /// Do not put affixed images in a folder named after the affix.
    #[arg(long)]
    pub no_subdir: bool,
    /// Quality gate.
    #[arg(long, value_enum, default_value = "disabled")]
    pub quality_gate: GateArg,
    /// Score an image must reach, 0..1.
    #[arg(long, default_value_t = 0.3)]
    pub min_quality_threshold: f64,
    /// PNG compression 0..9.
    #[arg(long, default_value_t = 4)]
    pub png_compression: i64,
    /// JPEG and lossy WebP quality 70..100.
    #[arg(long, default_value_t = 90)]
    pub lossy_quality: i64,
    /// Lossless WebP.
    #[arg(long)]
    pub lossless_webp: bool,
    /// Bits per EXR sample: 16 (half float) or 32 (float).
    #[arg(long, default_value_t = luna_job::request::DEFAULT_EXR_PRECISION)]
    pub exr_precision: i64,
    /// Extra metadata to embed, as a JSON object.
    #[arg(long)]
    pub custom_metadata: Option<String>,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum FormatArg {
    Png,
    Webp,
    #[value(alias = "jpg")]
    Jpeg,
    /// 16-bit PNG.
    Png16,
    /// OpenEXR (float).
    Exr,
    Avif,
}

impl FormatArg {
    fn format(self) -> ImageFormat {
        match self {
            Self::Png => ImageFormat::Png,
            Self::Webp => ImageFormat::Webp,
            Self::Jpeg => ImageFormat::Jpeg,
            Self::Png16 => ImageFormat::Png16,
            Self::Exr => ImageFormat::Exr,
            Self::Avif => ImageFormat::Avif,
        }
    }
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum GateArg {
    Disabled,
    Variance,
    EdgeDensity,
    Both,
}

/// What became of the submitted images.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    pub submitted: usize,
    pub saved: usize,
    pub rejected: usize,
    pub failed: usize,
}

/// Submits the files; with `--wait`, follows them to their outcome.
///
/// # Errors
/// Unreadable files, an unreachable or refusing gateway (with what to do about it).
pub async fn submit(args: &SubmitArgs) -> anyhow::Result<Summary> {
    let files = collect(&args.files, args.recursive)?;
    if files.is_empty() {
        bail!("no PNG, JPEG or WebP files found");
    }
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .build()?;
    let total_bytes: u64 = files
        .iter()
        .filter_map(|f| std::fs::metadata(f).ok())
        .map(|m| m.len())
        .sum();
    let upload = ProgressBar::new(total_bytes).with_style(
        ProgressStyle::with_template("uploading {bar:30} {bytes}/{total_bytes} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    // One trace for the whole submission: every job's spans join it.
    let trace = Trace::new();
    let mut jobs = Vec::new();
    for chunk in files.chunks(IMAGES_PER_JOB) {
        let mut images = Vec::with_capacity(chunk.len());
        for path in chunk {
            images.push(load(path, args)?);
            upload.inc(std::fs::metadata(path).map_or(0, |m| m.len()));
        }
        let n = images.len();
        let job = post(&client, args, request(args, images), &trace).await?;
        upload.set_message(format!("job {job}"));
        jobs.push((job, n));
    }
    upload.finish_and_clear();
    let mut summary = Summary {
        submitted: files.len(),
        ..Summary::default()
    };
    for (job, n) in &jobs {
        println!("[Luna Daemon Image Saver] Submitted {n} images to daemon. Job ID: {job}");
    }
    println!(
        "Trace ID: {} (when the daemon exports traces)",
        trace.trace_id
    );
    if args.wait {
        let progress = ProgressBar::new(files.len() as u64).with_style(
            ProgressStyle::with_template("saving    {bar:30} {pos}/{len} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        for (job, _) in &jobs {
            follow(args, job, &progress, &mut summary).await?;
        }
        progress.finish_and_clear();
        println!(
            "saved {}, rejected {}, failed {} of {} images",
            summary.saved, summary.rejected, summary.failed, summary.submitted
        );
    }
    Ok(summary)
}

fn collect(paths: &[PathBuf], recursive: bool) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for path in paths {
        if path.is_dir() {
            if !recursive {
                bail!(
                    "{} is a folder; add --recursive to submit the images in it",
                    path.display()
                );
            }
            let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
                .with_context(|| format!("reading {}", path.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .collect();
            entries.sort();
            let (dirs, files): (Vec<PathBuf>, Vec<PathBuf>) =
                entries.into_iter().partition(|p| p.is_dir());
            out.extend(files.into_iter().filter(|p| is_image(p)));
            out.extend(collect(&dirs, true)?);
        } else if path.exists() {
            out.push(path.clone());
        } else {
            bail!("{} does not exist", path.display());
        }
    }
    Ok(out)
}

fn is_image(p: &Path) -> bool {
    let ext = p
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    matches!(ext.as_deref(), Some("png" | "jpg" | "jpeg" | "webp"))
}

fn load(path: &Path, args: &SubmitArgs) -> anyhow::Result<ImageInput> {
    let img = image::open(path).with_context(|| format!("decoding {}", path.display()))?;
    let format = args.format.format();
    let (pixels, width, height, channels, sample) = samples_for(img, format);
    Ok(ImageInput {
        pixels: pixels.into(),
        width,
        height,
        channels,
        sample,
        source: source_stem(path),
        affix: args.affix.clone(),
        format,
        subdir: !args.no_subdir,
        ..Default::default()
    })
}

/// The image's samples for `format`: 16-bit sources keep their 16 bits (little-endian `u16`)
/// when the format holds more than 8 (`png16`, `exr`); everything else travels as 8-bit.
fn samples_for(
    img: image::DynamicImage,
    format: ImageFormat,
) -> (Vec<u8>, u32, u32, u32, SampleType) {
    let (width, height) = (img.width(), img.height());
    let color = img.color();
    let alpha = color.has_alpha();
    let gray = color.channel_count() <= 2 && !alpha;
    let channels = if gray {
        1
    } else if alpha {
        4
    } else {
        3
    };
    let wide = color.bytes_per_pixel() / color.channel_count() >= 2
        && format.sample_type() != SampleType::U8;
    if wide {
        let samples: Vec<u16> = match channels {
            1 => img.into_luma16().into_raw(),
            4 => img.into_rgba16().into_raw(),
            _ => img.into_rgb16().into_raw(),
        };
        let bytes = samples.iter().flat_map(|v| v.to_le_bytes()).collect();
        return (bytes, width, height, channels, SampleType::U16);
    }
    let bytes = match channels {
        1 => img.into_luma8().into_raw(),
        4 => img.into_rgba8().into_raw(),
        _ => img.into_rgb8().into_raw(),
    };
    (bytes, width, height, channels, SampleType::U8)
}

/// The file's stem, for `%source%`: lossy UTF-8, cut to the contract's 255 bytes on a
/// character boundary.
fn source_stem(path: &Path) -> String {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut end = stem.len().min(luna_job::validate::MAX_SOURCE_LEN);
    while !stem.is_char_boundary(end) {
        end -= 1;
    }
    stem[..end].to_owned()
}

fn request(args: &SubmitArgs, images: Vec<ImageInput>) -> SaveRequest {
    SaveRequest {
        save_path: args.save_path.clone(),
        filename: args.filename.clone(),
        model_name: args.model_name.clone(),
        index: args.index,
        quality_gate: match args.quality_gate {
            GateArg::Disabled => QualityGate::Disabled,
            GateArg::Variance => QualityGate::Variance,
            GateArg::EdgeDensity => QualityGate::EdgeDensity,
            GateArg::Both => QualityGate::Both,
        },
        min_quality_threshold: args.min_quality_threshold,
        png_compression: args.png_compression,
        lossy_quality: args.lossy_quality,
        lossless_webp: args.lossless_webp,
        exr_precision: args.exr_precision,
        custom_metadata: args.custom_metadata.clone().map(serde_json::Value::String),
        images,
        ..SaveRequest::default()
    }
}

/// The W3C trace context `luna submit` sends, so the daemon's spans join one trace per run.
struct Trace {
    trace_id: String,
}

impl Trace {
    fn new() -> Self {
        Self {
            trace_id: uuid::Uuid::new_v4().simple().to_string(),
        }
    }

    /// A `traceparent` for one request: this trace, a fresh parent span id, sampled.
    fn traceparent(&self) -> String {
        let span = uuid::Uuid::new_v4().simple().to_string();
        format!("00-{}-{}-01", self.trace_id, &span[..16])
    }
}

/// How long `luna submit` keeps retrying one submission (no answer, 503 or 429).
const RETRY_FOR: Duration = Duration::from_secs(120);

/// Longest wait between two attempts, whatever `Retry-After` asks for.
const MAX_RETRY_WAIT: Duration = Duration::from_secs(30);

/// Bound on one attempt, upload included: a gateway that stops answering is retried.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(120);

/// Posts one job, retrying with the same `Idempotency-Key` when the gateway gives no answer,
/// 503 or 429 (honouring `Retry-After`), so a retry never saves an image twice.
async fn post(
    client: &reqwest::Client,
    args: &SubmitArgs,
    req: SaveRequest,
    trace: &Trace,
) -> anyhow::Result<String> {
    let body = to_msgpack(&req).context("encoding the request")?;
    let key = uuid::Uuid::new_v4().to_string();
    let started = std::time::Instant::now();
    let mut backoff = Duration::from_millis(500);
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let mut call = client
            .post(format!("{}/v1/jobs", args.gateway.trim_end_matches('/')))
            .header("content-type", "application/msgpack")
            .header("idempotency-key", &key)
            .header("traceparent", trace.traceparent())
            .timeout(ATTEMPT_TIMEOUT)
            .body(body.clone());
        if let Some(token) = &args.token {
            call = call.bearer_auth(token);
        }
        let wait = match call.send().await {
            Err(e) if e.is_connect() && attempt == 1 => bail!(
                "Connection refused at {}. Is the daemon running? Start it with `luna up`.",
                args.gateway
            ),
            Err(e) => {
                let wait = backoff;
                backoff = (backoff * 2).min(MAX_RETRY_WAIT);
                (format!("no answer ({e})"), wait)
            }
            Ok(response) => {
                let status = response.status();
                let retry_after = response
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok())
                    .map(Duration::from_secs);
                let json: serde_json::Value = response.json().await.unwrap_or_default();
                let reason = json["error"].as_str().unwrap_or("no reason given");
                if status.is_success() {
                    return json["job_id"]
                        .as_str()
                        .map(str::to_owned)
                        .context("the gateway answered without a job id");
                }
                if !matches!(status.as_u16(), 429 | 503) {
                    bail!("the gateway refused the images ({status}): {reason}");
                }
                let wait = retry_after.unwrap_or(backoff).min(MAX_RETRY_WAIT);
                backoff = (backoff * 2).min(MAX_RETRY_WAIT);
                (format!("{status}: {reason}"), wait)
            }
        };
        let (why, wait) = wait;
        if started.elapsed() + wait > RETRY_FOR {
            bail!(
                "the gateway at {} did not take the images within {}s ({why}); \
                 nothing more is sent",
                args.gateway,
                RETRY_FOR.as_secs()
            );
        }
        eprintln!(
            "luna submit: attempt {attempt}: {why}; retrying in {:.1}s with the same Idempotency-Key",
            wait.as_secs_f64()
        );
        tokio::time::sleep(wait).await;
    }
}

/// Follows one job on the status WebSocket until it completes.
async fn follow(
    args: &SubmitArgs,
    job: &str,
    progress: &ProgressBar,
    summary: &mut Summary,
) -> anyhow::Result<()> {
    let base = args.status.trim_end_matches('/').replacen("http", "ws", 1);
    let mut url = format!("{base}/ws?job_id={job}");
    if let Some(token) = &args.token {
        url.push_str(&format!("&token={token}"));
    }
    let (mut ws, _) = tokio_tungstenite::connect_async(&url).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot follow job {job} at {}: {e}. Is the status service running?",
            args.status
        )
    })?;
    while let Some(frame) = ws.next().await {
        let Message::Text(text) = frame.with_context(|| format!("following job {job}"))? else {
            continue;
        };
        let event: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        match event["event"].as_str() {
            Some("image_saved") => {
                summary.saved += 1;
                progress.inc(1);
                progress.set_message(event["path"].as_str().unwrap_or_default().to_owned());
            }
            Some("image_rejected") => {
                summary.rejected += 1;
                progress.inc(1);
            }
            Some("image_failed") if event["final"] == true => {
                summary.failed += 1;
                progress.inc(1);
                progress.println(format!(
                    "image {} failed: {}",
                    event["index"],
                    event["error"].as_str().unwrap_or("?")
                ));
            }
            Some("save_job_completed") => return Ok(()),
            _ => {}
        }
    }
    bail!("the status service closed the connection before job {job} completed")
}

//! `luna up` and `luna submit` as a user runs them: real processes, real ports, no broker.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

struct Daemon {
    child: Child,
    gateway: String,
    status: String,
}

impl Daemon {
    fn start(output: &Path) -> Self {
        let (g, s) = (free_port(), free_port());
        let child = Command::new(env!("CARGO_BIN_EXE_luna"))
            .args([
                "up",
                "--gateway-listen",
                &format!("127.0.0.1:{g}"),
                "--status-listen",
                &format!("127.0.0.1:{s}"),
            ])
            .args(["--max-attempts", "1", "--output-root"])
            .arg(output)
            .env("RUST_LOG", "warn")
            .spawn()
            .expect("luna up starts");
        let gateway = format!("http://127.0.0.1:{g}");
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", g)).is_err() {
            assert!(Instant::now() < deadline, "luna up never listened");
            std::thread::sleep(Duration::from_millis(50));
        }
        Self {
            child,
            gateway,
            status: format!("http://127.0.0.1:{s}"),
        }
    }

    fn submit(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_luna"))
            .arg("submit")
            .args(["--gateway", &self.gateway, "--status", &self.status])
            .args(args)
            .output()
            .expect("luna submit runs")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // Ctrl-C, as a user would: the daemon drains and exits.
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
    }
}

fn write_png(path: &Path, seed: u8) {
    let img = image::RgbImage::from_fn(40, 30, |x, y| image::Rgb([x as u8 * 6, y as u8 * 8, seed]));
    img.save(path).expect("write png");
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn submit_waits_for_the_saves_and_reports_failures_in_its_exit_code() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let output = tmp.path().join("output");
    let inputs = tmp.path().join("in");
    std::fs::create_dir_all(inputs.join("nested")).expect("mkdir");
    write_png(&inputs.join("a.png"), 1);
    write_png(&inputs.join("nested/b.png"), 2);
    let daemon = Daemon::start(&output);

    let dir = inputs.to_string_lossy().into_owned();
    let one = inputs.join("a.png").to_string_lossy().into_owned();
    let ok = daemon.submit(&[
        &dir,
        "--wait",
        "--recursive",
        "--format",
        "webp",
        "--save-path",
        "cli",
        "--filename",
        "img_%index%",
        "--affix",
        "X",
    ]);
    let ok_text = text(&ok);
    assert!(ok.status.success(), "{ok_text}");
    assert!(
        ok_text.contains("Submitted 2 images to daemon. Job ID: "),
        "{ok_text}"
    );
    assert!(
        ok_text.contains("saved 2, rejected 0, failed 0 of 2 images"),
        "{ok_text}"
    );
    let trace_id = ok_text
        .lines()
        .find_map(|l| l.strip_prefix("Trace ID: "))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_default();
    assert!(
        trace_id.len() == 32 && trace_id.chars().all(|c| c.is_ascii_hexdigit()),
        "luna submit names the trace it sent: {ok_text}"
    );
    let saved = std::fs::read_dir(output.join("cli/X"))
        .expect("folder")
        .count();
    assert_eq!(saved, 2, "img_0_X.webp and img_0_X_1.webp");

    // A file where the save folder should be: the save fails for good (one attempt).
    std::fs::write(output.join("blocked"), b"not a folder").expect("write");
    let failed = daemon.submit(&[&one, "--wait", "--save-path", "blocked/x"]);
    let failed_text = text(&failed);
    assert_eq!(failed.status.code(), Some(1), "{failed_text}");
    assert!(failed_text.contains("failed 1 of 1"), "{failed_text}");
    drop(daemon);
}

#[test]
fn submit_says_what_to_do_when_something_is_off() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let png = tmp.path().join("a.png");
    write_png(&png, 3);
    let closed = format!("http://127.0.0.1:{}", free_port());
    let down = Command::new(env!("CARGO_BIN_EXE_luna"))
        .args(["submit", "--gateway", &closed])
        .arg(&png)
        .output()
        .expect("runs");
    assert!(!down.status.success());
    assert!(
        text(&down).contains("Is the daemon running? Start it with `luna up`."),
        "{}",
        text(&down)
    );

    let folder = Command::new(env!("CARGO_BIN_EXE_luna"))
        .args(["submit"])
        .arg(tmp.path())
        .output()
        .expect("runs");
    assert!(!folder.status.success());
    assert!(
        text(&folder).contains("add --recursive"),
        "{}",
        text(&folder)
    );
}

#[test]
fn submit_keeps_each_source_stem_and_16_bit_samples() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let output = tmp.path().join("output");
    let photo = tmp.path().join("photo.png");
    let render = tmp.path().join("render.jpg");
    let deep = tmp.path().join("deep.png");
    write_png(&photo, 4);
    image::RgbImage::from_fn(24, 16, |x, y| image::Rgb([x as u8 * 9, y as u8 * 11, 60]))
        .save(&render)
        .expect("write jpeg");
    // Low bits set, so a trip through 8 bits would show.
    let deep_img = image::ImageBuffer::<image::Rgb<u16>, Vec<u16>>::from_fn(20, 10, |x, y| {
        image::Rgb([x as u16 * 3001 + 7, y as u16 * 6007 + 1, 65535])
    });
    deep_img.save(&deep).expect("write 16-bit png");
    let daemon = Daemon::start(&output);

    let args: Vec<String> = [&photo, &render]
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let both = daemon.submit(&[&args[0], &args[1], "--wait", "--save-path", "mixed"]);
    assert!(both.status.success(), "{}", text(&both));
    let mut names: Vec<String> = std::fs::read_dir(output.join("mixed"))
        .expect("folder")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["photo.png", "render.png"],
        "each file keeps its stem"
    );

    let deep_arg = deep.to_string_lossy().into_owned();
    let sixteen = daemon.submit(&[
        &deep_arg,
        "--wait",
        "--format",
        "png16",
        "--save-path",
        "deep",
    ]);
    assert!(sixteen.status.success(), "{}", text(&sixteen));
    let saved = image::open(output.join("deep/deep.png")).expect("decode");
    assert_eq!(saved.color(), image::ColorType::Rgb16);
    assert_eq!(saved.into_rgb16().into_raw(), deep_img.into_raw());
    drop(daemon);
}

/// POSTs `body` (JSON) to the daemon's gateway over plain HTTP/1.1; the status code.
fn post_json(gateway: &str, body: &str) -> u16 {
    use std::io::{Read, Write};
    let addr = gateway.trim_start_matches("http://");
    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    write!(
        stream,
        "POST /v1/jobs HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("send");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).expect("answer");
    answer
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

#[test]
fn float_samples_posted_to_luna_up_save_as_png16_exr_and_avif() {
    use base64::Engine as _;
    let tmp = tempfile::tempdir().expect("tempdir");
    let output = tmp.path().join("output");
    let daemon = Daemon::start(&output);
    let (w, h) = (32u32, 24u32);
    let floats: Vec<f32> = (0..w * h * 3)
        .map(|i| ((i * 7919) % 1000) as f32 / 999.0)
        .collect();
    let bytes: Vec<u8> = floats.iter().flat_map(|x| x.to_le_bytes()).collect();
    let pixels = base64::engine::general_purpose::STANDARD.encode(&bytes);
    let images: Vec<String> = ["png16", "exr", "avif"]
        .iter()
        .map(|fmt| {
            format!(
                r#"{{"pixels":"{pixels}","sample":"f32","width":{w},"height":{h},"channels":3,"format":"{fmt}","source":"from_{fmt}"}}"#
            )
        })
        .collect();
    let body = format!(
        r#"{{"save_path":"floats","filename":"%source%","extra_pnginfo":{{"workflow":{{"nodes":[]}}}},"images":[{}]}}"#,
        images.join(",")
    );
    assert_eq!(post_json(&daemon.gateway, &body), 202);

    let dir = output.join("floats");
    let deadline = Instant::now() + Duration::from_secs(60);
    let names = ["from_avif.avif", "from_exr.exr", "from_png16.png"];
    while !names.iter().all(|n| dir.join(n).exists()) {
        assert!(
            Instant::now() < deadline,
            "not all saved: {:?}",
            std::fs::read_dir(&dir).map(|d| d.count())
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // png16: round(x * 65535), decoded by an independent reader.
    let png = image::open(dir.join("from_png16.png")).expect("decode png16");
    assert_eq!(png.color(), image::ColorType::Rgb16);
    let expected: Vec<u16> = floats
        .iter()
        .map(|&x| (x * 65535.0 + 0.5).clamp(0.0, 65535.0) as u16)
        .collect();
    assert_eq!(png.into_rgb16().into_raw(), expected);
    // EXR and AVIF: their containers (decoded in full by tests/interop).
    let exr = std::fs::read(dir.join("from_exr.exr")).expect("read exr");
    assert_eq!(&exr[..4], &[0x76, 0x2f, 0x31, 0x01], "OpenEXR magic");
    assert!(
        exr.windows(8).any(|w| w == b"workflow"),
        "workflow attribute"
    );
    let avif = std::fs::read(dir.join("from_avif.avif")).expect("read avif");
    assert_eq!(&avif[4..12], b"ftypavif", "AVIF major brand");
    assert!(
        avif.windows(4).any(|w| w == b"II*\0"),
        "EXIF (TIFF) payload"
    );
    drop(daemon);
}

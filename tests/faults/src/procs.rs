//! One service process: started with its own flags, killed with SIGKILL, restarted with the
//! same flags (so on the same port), its resident memory read from `/proc`.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

/// A free TCP port on loopback (bound and released; the service binds it right after).
pub fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("binding a free port")?;
    Ok(listener.local_addr()?.port())
}

/// A service process and how to start it again.
#[derive(Debug)]
pub struct Proc {
    /// `gateway`, `saver-2`, `status`, `luna-up`, ...: names its log files.
    pub role: String,
    bin: PathBuf,
    args: Vec<String>,
    log_dir: PathBuf,
    /// Where `/readyz` (or `/healthz`) answers.
    pub base_url: String,
    child: Option<Child>,
    /// How many times it was started.
    pub starts: u32,
}

impl Proc {
    /// Starts `bin` with `args`; logs go to `<log_dir>/<role>.<n>.log`. `port` is the HTTP port
    /// it listens on (for readiness and `/metrics`).
    ///
    /// # Errors
    /// When the process cannot be started.
    pub fn spawn(
        role: &str,
        bin: &Path,
        args: Vec<String>,
        log_dir: &Path,
        port: u16,
    ) -> anyhow::Result<Self> {
        let mut p = Self {
            role: role.to_owned(),
            bin: bin.to_owned(),
            args,
            log_dir: log_dir.to_owned(),
            base_url: format!("http://127.0.0.1:{port}"),
            child: None,
            starts: 0,
        };
        p.start()?;
        Ok(p)
    }

    fn start(&mut self) -> anyhow::Result<()> {
        self.starts += 1;
        let log_path = self
            .log_dir
            .join(format!("{}.{}.log", self.role, self.starts));
        let log = File::create(&log_path).with_context(|| format!("creating {log_path:?}"))?;
        let err = log.try_clone()?;
        let child = Command::new(&self.bin)
            .args(&self.args)
            // Nothing is exported, whatever the environment says.
            .env("OTEL_SDK_DISABLED", "true")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {:?} {:?}", self.bin, self.args))?;
        self.child = Some(child);
        Ok(())
    }

    /// SIGKILL, then reaps the process.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again with the same flags.
    ///
    /// # Errors
    /// When the process cannot be started.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.start()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// True while the process runs.
    pub fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Resident memory in KiB (`VmRSS`), or 0 when the process is gone.
    pub fn rss_kib(&self) -> u64 {
        self.pid().map_or(0, rss_kib)
    }

    /// Waits until `<base_url><path>` answers 200.
    ///
    /// # Errors
    /// When it does not within `limit`, or the process exits; the error has the log's tail.
    pub async fn wait_ok(&mut self, path: &str, limit: Duration) -> anyhow::Result<()> {
        let url = format!("{}{path}", self.base_url);
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()?;
        let deadline = Instant::now() + limit;
        loop {
            if client
                .get(&url)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                return Ok(());
            }
            if !self.alive() {
                bail!(
                    "{} exited before {url} answered:\n{}",
                    self.role,
                    self.log_tail()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "{url} did not answer 200 within {limit:?}:\n{}",
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The last lines of the current log.
    pub fn log_tail(&self) -> String {
        let path = self
            .log_dir
            .join(format!("{}.{}.log", self.role, self.starts));
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `VmRSS` of `pid` in KiB; 0 when unknown.
pub fn rss_kib(pid: u32) -> u64 {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return 0;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Sum of the RSS of `procs`, in MiB.
pub fn rss_mib(procs: &[&Proc]) -> f64 {
    procs.iter().map(|p| p.rss_kib()).sum::<u64>() as f64 / 1024.0
}

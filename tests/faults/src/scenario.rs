//! One scenario's world: a broker namespace (`f<uuid>`), a folder under
//! `target/faults/<scenario>/` (the output root and every process's log), mounts, and the
//! helpers that start the services and audit the result.
//!
//! Dropping the scenario (also when the test failed) unmounts what it mounted, removes the
//! output root (the logs stay, to read after a failure) and deletes every queue and exchange
//! under its prefix. Processes are [`Proc`] values owned by the test; they are killed when
//! they drop, which happens before the scenario drops when they are declared after it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::audit::{self, Audit};
use crate::broker;
use crate::load::{self, Submission};
use crate::procs::{Proc, free_port};
use crate::proxy::Proxy;
use crate::report::Row;

/// Which promises [`Scenario::audit_into`] checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checks {
    All,
    /// All but "every submission accepted in the end" (a 400 is a right answer here).
    AllowRefusals,
    /// Measure only; the scenario checks what applies itself.
    None,
}

/// `--broker-timeout` given to every service: the bound a POST must be answered within.
pub const BROKER_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug)]
pub struct Scenario {
    pub name: String,
    pub prefix: String,
    /// The broker, reached directly.
    pub url: String,
    pub broker: SocketAddr,
    /// `target/faults/<name>/`.
    pub dir: PathBuf,
    /// The output root of every saver: `<dir>/output`.
    pub root: PathBuf,
    pub logs: PathBuf,
    /// Numbers the submissions of every load of this scenario.
    pub counter: Arc<AtomicU64>,
    mounts: Mutex<Vec<PathBuf>>,
    pub started: Instant,
    /// `--amqp-url` for every process instead of the proxy's (a cluster's node list).
    amqp_urls: Option<String>,
}

impl Scenario {
    /// Prepares the folders and checks that the broker answers.
    ///
    /// # Errors
    /// When the broker does not answer or the folders cannot be made.
    pub async fn new(name: &str) -> anyhow::Result<Self> {
        let url = broker::amqp_url();
        let addr = broker::broker_addr(&url)?;
        // Fails early, with instructions, when there is no broker.
        broker::parked_count(&url, "fault-probe").await?;
        let dir = crate::bins::target_dir()?.join("faults").join(name);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("clearing {dir:?}"))?;
        }
        let root = dir.join("output");
        let logs = dir.join("logs");
        std::fs::create_dir_all(&root)?;
        std::fs::create_dir_all(&logs)?;
        let prefix = format!("f{}", uuid::Uuid::new_v4().simple());
        eprintln!(
            "scenario {name}: prefix {prefix}, logs in {}",
            logs.display()
        );
        Ok(Self {
            name: name.to_owned(),
            prefix,
            url,
            broker: addr,
            dir,
            root,
            logs,
            counter: Arc::new(AtomicU64::new(0)),
            mounts: Mutex::new(Vec::new()),
            started: Instant::now(),
            amqp_urls: None,
        })
    }

    /// A proxy to the broker, for some of this scenario's processes.
    ///
    /// # Errors
    /// When it cannot listen.
    pub async fn proxy(&self) -> anyhow::Result<Proxy> {
        Proxy::start(self.broker).await
    }

    /// Sends every process to `urls` (comma-separated `--amqp-url`) and audits `audit_url`:
    /// for a broker of the scenario's own, such as a cluster.
    pub fn use_broker(&mut self, urls: String, audit_url: String) {
        self.amqp_urls = Some(urls);
        self.url = audit_url;
    }

    fn broker_flags(&self, proxy: &Proxy) -> Vec<String> {
        vec![
            "--amqp-url".into(),
            self.amqp_urls
                .clone()
                .unwrap_or_else(|| broker::url_via(&self.url, proxy.addr())),
            "--amqp-prefix".into(),
            self.prefix.clone(),
            "--broker-timeout".into(),
            format!("{}s", BROKER_TIMEOUT.as_secs()),
        ]
    }

    fn spawn(
        &self,
        role: &str,
        bin: &str,
        mut args: Vec<String>,
        extra: &[&str],
    ) -> anyhow::Result<Proc> {
        let port = free_port()?;
        let mut full = vec!["--listen".to_owned(), format!("127.0.0.1:{port}")];
        full.append(&mut args);
        full.extend(extra.iter().map(|s| (*s).to_owned()));
        Proc::spawn(role, &crate::bins::binary(bin)?, full, &self.logs, port)
    }

    /// Starts `luna-gateway` through `proxy` and waits until it is ready.
    ///
    /// # Errors
    /// When it does not become ready.
    pub async fn gateway(&self, proxy: &Proxy, extra: &[&str]) -> anyhow::Result<Proc> {
        let mut p = self.spawn("gateway", "luna-gateway", self.broker_flags(proxy), extra)?;
        p.wait_ok("/readyz", Duration::from_secs(30)).await?;
        Ok(p)
    }

    /// Starts saver number `n` through `proxy`, writing to the output root, with short
    /// retries so a scenario's faults play out in seconds.
    ///
    /// # Errors
    /// When it does not become ready.
    pub async fn saver(&self, proxy: &Proxy, n: usize, extra: &[&str]) -> anyhow::Result<Proc> {
        let mut p = self.saver_unready(proxy, n, extra)?;
        p.wait_ok("/readyz", Duration::from_secs(30)).await?;
        Ok(p)
    }

    /// Starts saver `n` without waiting for it.
    ///
    /// # Errors
    /// When it cannot be started.
    pub fn saver_unready(&self, proxy: &Proxy, n: usize, extra: &[&str]) -> anyhow::Result<Proc> {
        let mut args = self.broker_flags(proxy);
        args.extend(
            [
                "--output-root",
                &self.root.to_string_lossy(),
                "--retry-backoff",
                "300ms",
                "--scale-interval",
                "200ms",
                "--shutdown-grace",
                "2s",
            ]
            .map(str::to_owned),
        );
        self.spawn(&format!("saver-{n}"), "luna-saver", args, extra)
    }

    /// Starts `luna-status` through `proxy` and waits until it is ready.
    ///
    /// # Errors
    /// When it does not become ready.
    pub async fn status(&self, proxy: &Proxy, extra: &[&str]) -> anyhow::Result<Proc> {
        let mut p = self.spawn("status", "luna-status", self.broker_flags(proxy), extra)?;
        p.wait_ok("/readyz", Duration::from_secs(30)).await?;
        Ok(p)
    }

    /// Starts `luna up` (in-process queue, no broker). Returns it with the gateway's and the
    /// status service's URLs.
    ///
    /// # Errors
    /// When it does not become ready.
    pub async fn luna_up(&self, extra: &[&str]) -> anyhow::Result<(Proc, String, String)> {
        let (g, s) = (free_port()?, free_port()?);
        let mut args: Vec<String> = [
            "up",
            "--gateway-listen",
            &format!("127.0.0.1:{g}"),
            "--status-listen",
            &format!("127.0.0.1:{s}"),
            "--saver-listen",
            "127.0.0.1:0",
            "--output-root",
            &self.root.to_string_lossy(),
            "--retry-backoff",
            "300ms",
            "--shutdown-grace",
            "2s",
        ]
        .map(str::to_owned)
        .to_vec();
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        let mut p = Proc::spawn(
            "luna-up",
            &crate::bins::binary("luna")?,
            args,
            &self.logs,
            g,
        )?;
        p.wait_ok("/readyz", Duration::from_secs(30)).await?;
        Ok((
            p,
            format!("http://127.0.0.1:{g}"),
            format!("http://127.0.0.1:{s}"),
        ))
    }

    /// Mounts a tmpfs of `size` (`2m`) at `dir` (created), unmounted when the scenario drops.
    ///
    /// # Errors
    /// When `mount` fails (the suite runs as root in CI).
    pub fn mount_tmpfs(&self, dir: &Path, size: &str) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir)?;
        run_cmd(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
                .arg(dir),
        )?;
        self.mounts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(dir.to_owned());
        Ok(())
    }

    /// Remounts `dir` read-only (`ro`) or read-write.
    ///
    /// # Errors
    /// When `mount` fails.
    pub fn remount(&self, dir: &Path, ro: bool) -> anyhow::Result<()> {
        let opts = if ro { "remount,ro" } else { "remount,rw" };
        run_cmd(Command::new("mount").args(["-o", opts]).arg(dir))
    }

    /// Waits until every image of every accepted submission is on disk; returns how long that
    /// took, or None after `limit`.
    pub async fn wait_saved(&self, subs: &[Submission], limit: Duration) -> Option<Duration> {
        let start = Instant::now();
        loop {
            if audit::all_saved(&audit::scan(&self.root), subs) {
                return Some(start.elapsed());
            }
            if start.elapsed() > limit {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Fills `row` from the load and the audit, and checks the promises every scenario makes:
    /// nothing lost, nothing twice, nothing partial, no half job, no temp file or symlink left,
    /// nothing parked, every submission accepted in the end (unless [`Checks::AllowRefusals`]),
    /// every accepted job `completed` on `status` (when given). [`Checks::None`] only measures.
    ///
    /// # Errors
    /// When the broker cannot be audited.
    pub async fn audit_into(
        &self,
        row: &mut Row,
        subs: &[Submission],
        status: Option<&str>,
        checks: Checks,
    ) -> anyhow::Result<Audit> {
        let audit = audit::scan(&self.root);
        let t = audit::tally(&audit, subs);
        row.submissions = subs.len();
        row.accepted = t.accepted;
        row.accepted_images = t.accepted_images;
        row.saved = t.saved;
        row.lost = t.lost;
        row.duplicated = t.duplicated;
        row.partial = t.partial;
        row.half_jobs = t.half_jobs;
        row.orphans = t.orphans;
        row.temp_left = audit.temps.len();
        row.symlinks = audit.symlinks.len();
        row.parked = broker::parked_count(&self.url, &self.prefix).await?;
        row.max_post_ms = load::max_answer(subs).as_millis() as u64;
        row.note(format!("answers: {}", load::answers_summary(subs)));
        if let Some(status) = status {
            row.not_completed = not_completed(status, subs, Duration::from_secs(10)).await;
        }
        if !audit.foreign.is_empty() {
            row.note(format!("files the load did not name: {:?}", audit.foreign));
        }
        if checks == Checks::None {
            return Ok(audit);
        }
        row.check(t.accepted > 0, "no submission was accepted at all");
        row.check(t.lost == 0, format!("{} images lost", t.lost));
        row.check(
            t.duplicated == 0,
            format!("{} duplicate files", t.duplicated),
        );
        row.check(
            t.partial == 0,
            format!("{} partial or wrong files: {:?}", t.partial, audit.partial),
        );
        row.check(
            t.half_jobs == 0,
            format!("{} jobs saved in part", t.half_jobs),
        );
        row.check(
            t.orphans == 0,
            format!("{} unaccepted jobs saved anyway", t.orphans),
        );
        row.check(
            audit.temps.is_empty(),
            format!("temp files left: {:?}", audit.temps),
        );
        row.check(
            audit.symlinks.is_empty(),
            format!("symlinks in the root: {:?}", audit.symlinks),
        );
        row.check(row.parked == 0, format!("{} tasks parked", row.parked));
        if checks != Checks::AllowRefusals {
            row.check(
                t.unanswered == 0,
                format!("{} submissions never accepted", t.unanswered),
            );
        }
        if status.is_some() {
            row.check(
                row.not_completed == 0,
                format!(
                    "{} accepted jobs not completed on status",
                    row.not_completed
                ),
            );
        }
        Ok(audit)
    }
}

/// Accepted jobs that `GET <status>/v1/jobs/<id>` does not report `completed`, polling until
/// all are or `limit` passes.
pub async fn not_completed(status: &str, subs: &[Submission], limit: Duration) -> usize {
    let Ok(http) = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
    else {
        return subs.len();
    };
    let mut pending: Vec<&str> = subs.iter().filter_map(Submission::accepted).collect();
    let deadline = Instant::now() + limit;
    loop {
        let mut still = Vec::new();
        for id in pending {
            let done = match http.get(format!("{status}/v1/jobs/{id}")).send().await {
                Ok(r) if r.status().is_success() => r
                    .json::<serde_json::Value>()
                    .await
                    .is_ok_and(|v| v["state"] == "completed"),
                _ => false,
            };
            if !done {
                still.push(id);
            }
        }
        pending = still;
        if pending.is_empty() || Instant::now() > deadline {
            return pending.len();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn run_cmd(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl Drop for Scenario {
    fn drop(&mut self) {
        let mounts = std::mem::take(&mut *self.mounts.lock().unwrap_or_else(|p| p.into_inner()));
        for m in mounts.iter().rev() {
            // Make it writable first, so nothing keeps it busy on a read-only error path.
            let _ = Command::new("umount").arg("-l").arg(m).status();
        }
        let _ = std::fs::remove_dir_all(&self.root);
        let (url, prefix) = (self.url.clone(), self.prefix.clone());
        // A thread and a runtime of its own: this may run while the test's runtime unwinds.
        let cleanup = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            if let Err(e) = rt.block_on(broker::delete_prefix(&url, &prefix)) {
                eprintln!("could not delete the topology {prefix}.*: {e:#}");
            }
        });
        let _ = cleanup.join();
    }
}

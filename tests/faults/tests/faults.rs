//! The fault suite: each test is one scenario (a known load, a fault, an audit) and prints one
//! table row; see the crate docs and README's "Fault suite". Scenarios never overlap (the
//! harness serialises them), so `cargo test -p luna-faults` runs them one by one, and
//! `cargo test -p luna-faults --test faults saver_sigkill` runs one.

use std::time::{Duration, Instant};

use luna_faults::load::{Load, LoadSpec, Outcome, Submission};
use luna_faults::procs::{Proc, rss_mib};
use luna_faults::proxy::{Mode, Proxy};
use luna_faults::scenario::{BROKER_TIMEOUT, Checks};
use luna_faults::{Row, Scenario, audit, broker, cluster, run};

/// The 50-client scenarios run with these budgets (MiB): bodies held at once by the gateway,
/// and tasks held by `luna up`'s in-process queue.
const INFLIGHT_MIB: u64 = 64;
const QUEUED_MIB: u64 = 128;

/// Most resident memory a service may reach under the 50-client load, MiB: what the README
/// promises for the budgets above (the queue, about four times the body budget while bodies
/// are decoded and encoded, and a base for the process itself), or `LUNA_FAULTS_MAX_RSS_MIB`.
fn max_rss_mib(queued_mib: u64) -> f64 {
    std::env::var("LUNA_FAULTS_MAX_RSS_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or((queued_mib + 4 * INFLIGHT_MIB + 128) as f64)
}

fn mib(n: u64) -> String {
    (n * 1024 * 1024).to_string()
}

/// How long the audit waits for accepted work to land after the last fault.
const DRAIN: Duration = Duration::from_secs(45);

/// A small pseudo-random sequence (which saver to kill), seeded per run.
struct Dice(u64);

impl Dice {
    fn new() -> Self {
        Self(uuid::Uuid::new_v4().as_u64_pair().0 | 1)
    }
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

/// Gateway, savers and status, each reaching the broker through a proxy: savers through
/// `back`, gateway and status through `front` (so a stall can hit one side only).
struct Pipeline {
    front: Proxy,
    back: Proxy,
    gateway: Proc,
    savers: Vec<Proc>,
    status: Proc,
}

impl Pipeline {
    async fn start(sc: &Scenario, savers: usize) -> anyhow::Result<Self> {
        Self::start_with(sc, savers, &[]).await
    }

    /// [`Pipeline::start`] with extra gateway flags.
    async fn start_with(
        sc: &Scenario,
        savers: usize,
        gateway_flags: &[&str],
    ) -> anyhow::Result<Self> {
        let front = sc.proxy().await?;
        let back = sc.proxy().await?;
        // Status first: it must see each job's first event.
        let status = sc.status(&front, &[]).await?;
        let gateway = sc.gateway(&front, gateway_flags).await?;
        let mut started = Vec::new();
        for n in 0..savers {
            started.push(sc.saver(&back, n, &[]).await?);
        }
        Ok(Self {
            front,
            back,
            gateway,
            savers: started,
            status,
        })
    }

    fn procs(&self) -> Vec<&Proc> {
        let mut all = vec![&self.gateway, &self.status];
        all.extend(self.savers.iter());
        all
    }

    fn conns(&self) -> usize {
        self.front.live() + self.back.live()
    }

    fn gateway_url(&self) -> String {
        self.gateway.base_url.clone()
    }

    fn status_url(&self) -> String {
        self.status.base_url.clone()
    }
}

/// Recovery time: from the end of the fault until every submission begun before it has been
/// answered 202 and saved (the backlog the fault left behind). None after `DRAIN`.
async fn recover(sc: &Scenario, load: &Load, fault_end: Instant) -> Option<u64> {
    loop {
        let begun: Vec<Submission> = load
            .snapshot()
            .into_iter()
            .filter(|s| s.attempts.first().is_some_and(|a| a.at < fault_end))
            .filter(|s| !matches!(s.outcome, Outcome::Refused(_) | Outcome::Abandoned))
            .collect();
        let answered = begun.iter().all(|s| s.accepted().is_some());
        if answered && audit::all_saved(&audit::scan(&sc.root), &begun) {
            return Some(fault_end.elapsed().as_millis() as u64);
        }
        if fault_end.elapsed() > DRAIN {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A few jobs before the fault, so pools, channels and allocators are warm when the "before"
/// figures are taken.
async fn warm_up(sc: &Scenario, p: &Pipeline) -> anyhow::Result<Vec<Submission>> {
    let load = Load::start(
        &p.gateway_url(),
        &LoadSpec::small(&sc.name, 2, 3, 2),
        &sc.counter,
    );
    let subs = load.wait().await;
    if sc
        .wait_saved(&subs, Duration::from_secs(30))
        .await
        .is_none()
    {
        anyhow::bail!("the warm-up jobs were not saved: the pipeline does not work at all");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok(subs)
}

/// Connections and RSS after the pipeline has had `settle` to heal.
async fn after(row: &mut Row, p: &Pipeline, settle: Duration) {
    tokio::time::sleep(settle).await;
    row.conns_after = p.conns();
    row.rss_after_mib = rss_mib(&p.procs());
}

/// The reconnect promises: as many connections as before, memory flat.
fn flat(row: &mut Row) {
    row.check(
        row.conns_after <= row.conns_before,
        format!(
            "connections grew from {} to {}",
            row.conns_before, row.conns_after
        ),
    );
    row.check(
        row.rss_after_mib <= row.rss_before_mib * 1.25 + 16.0,
        format!(
            "RSS grew from {:.0} to {:.0} MiB",
            row.rss_before_mib, row.rss_after_mib
        ),
    );
}

#[test]
fn saver_sigkill_x15() {
    run("saver_sigkill_x15", |sc| async move {
        let mut row = Row::new(
            &sc.name,
            "15 x SIGKILL of a random saver (3), each restarted",
        );
        let mut p = Pipeline::start(&sc, 3).await?;
        let mut subs = warm_up(&sc, &p).await?;
        row.conns_before = p.conns();
        row.rss_before_mib = rss_mib(&p.procs());
        let mut spec = LoadSpec::small(&sc.name, 4, 12, 4);
        spec.pause = Duration::from_millis(1500);
        let load = Load::start(&p.gateway_url(), &spec, &sc.counter);
        let mut dice = Dice::new();
        for _ in 0..15 {
            tokio::time::sleep(Duration::from_millis(1200)).await;
            let victim = dice.below(p.savers.len());
            p.savers[victim].restart()?;
        }
        let fault_end = Instant::now();
        row.recovery_ms = recover(&sc, &load, fault_end).await;
        subs.extend(load.wait().await);
        let _ = sc.wait_saved(&subs, DRAIN).await;
        after(&mut row, &p, Duration::from_secs(2)).await;
        sc.audit_into(&mut row, &subs, Some(&p.status_url()), Checks::All)
            .await?;
        row.note("finding 7: preemption must never park a healthy image");
        Ok(row)
    });
}

#[test]
fn broker_closes_connections_x4() {
    run("broker_closes_connections_x4", |sc| async move {
        let mut row = Row::new(
            &sc.name,
            "4 x every connection closed (broker-side close_connection, then proxy cut, alternating)",
        );
        let p = Pipeline::start(&sc, 2).await?;
        let mut subs = warm_up(&sc, &p).await?;
        row.conns_before = p.conns();
        row.rss_before_mib = rss_mib(&p.procs());
        let mut spec = LoadSpec::small(&sc.name, 4, 10, 4);
        spec.pause = Duration::from_millis(1500);
        let load = Load::start(&p.gateway_url(), &spec, &sc.counter);
        let mut broker_closed = Vec::new();
        for round in 0..4 {
            tokio::time::sleep(Duration::from_secs(3)).await;
            if round % 2 == 0 {
                let mut ports = p.front.upstream_ports();
                ports.extend(p.back.upstream_ports());
                let closed = tokio::task::spawn_blocking(move || broker::close_connections(&ports))
                    .await??;
                broker_closed.push(closed);
            } else {
                p.front.cut_all();
                p.back.cut_all();
            }
        }
        let fault_end = Instant::now();
        row.recovery_ms = recover(&sc, &load, fault_end).await;
        subs.extend(load.wait().await);
        let _ = sc.wait_saved(&subs, DRAIN).await;
        after(&mut row, &p, Duration::from_secs(5)).await;
        row.note(format!(
            "broker-side closes per round: {broker_closed:?}; connections opened through the proxies: {}",
            p.front.accepted() + p.back.accepted()
        ));
        sc.audit_into(&mut row, &subs, Some(&p.status_url()), Checks::All)
            .await?;
        flat(&mut row);
        row.note("findings 4 (connections and memory flat) and 5 (status misses no event)");
        Ok(row)
    });
}

/// Black-holes `side` (the savers' proxy or the gateway's) for 25 s under load.
async fn blackhole(sc: Scenario, savers_side: bool) -> anyhow::Result<Row> {
    let what = if savers_side { "savers" } else { "gateway" };
    let mut row = Row::new(
        &sc.name,
        &format!("broker black-holed for the {what} for 25 s"),
    );
    let front = sc.proxy().await?;
    let gw_proxy = sc.proxy().await?;
    let back = sc.proxy().await?;
    let status = sc.status(&front, &[]).await?;
    let gateway = sc.gateway(&gw_proxy, &[]).await?;
    let savers = [
        sc.saver(&back, 0, &[]).await?,
        sc.saver(&back, 1, &[]).await?,
    ];
    let procs = || {
        let mut all = vec![&gateway, &status];
        all.extend(savers.iter());
        all
    };
    let conns = || front.live() + gw_proxy.live() + back.live();
    let gateway_url = gateway.base_url.clone();
    let load = Load::start(
        &gateway_url,
        &LoadSpec::small(&sc.name, 2, 3, 2),
        &sc.counter,
    );
    let mut subs = load.wait().await;
    if sc
        .wait_saved(&subs, Duration::from_secs(30))
        .await
        .is_none()
    {
        anyhow::bail!("the warm-up jobs were not saved");
    }
    row.conns_before = conns();
    row.rss_before_mib = rss_mib(&procs());
    let mut spec = LoadSpec::small(&sc.name, 4, 14, 2);
    spec.pause = Duration::from_millis(2000);
    let load = Load::start(&gateway_url, &spec, &sc.counter);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let target = if savers_side { &back } else { &gw_proxy };
    let stall_start = Instant::now();
    target.set_mode(Mode::BlackHole);
    tokio::time::sleep(Duration::from_secs(25)).await;
    target.set_mode(Mode::Pass);
    let fault_end = Instant::now();
    // Answers to POSTs sent during the stall: the bound the gateway promises.
    let snapshot = load.snapshot();
    let during = snapshot
        .iter()
        .flat_map(|s| &s.attempts)
        .filter(|a| a.at >= stall_start && a.at < fault_end)
        .map(|a| a.elapsed)
        .max()
        .unwrap_or_default();
    row.recovery_ms = recover(&sc, &load, fault_end).await;
    subs.extend(load.wait().await);
    let _ = sc.wait_saved(&subs, DRAIN).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    row.conns_after = conns();
    row.rss_after_mib = rss_mib(&procs());
    sc.audit_into(&mut row, &subs, Some(&status.base_url), Checks::All)
        .await?;
    row.note(format!(
        "longest POST answer during the stall: {} ms",
        during.as_millis()
    ));
    row.check(
        row.max_post_ms <= (BROKER_TIMEOUT + Duration::from_secs(1)).as_millis() as u64,
        format!(
            "a POST waited {} ms for its answer (--broker-timeout {}s)",
            row.max_post_ms,
            BROKER_TIMEOUT.as_secs()
        ),
    );
    flat(&mut row);
    row.note("findings 3 (truthful 503s) and 6 (one deadline per POST)");
    Ok(row)
}

#[test]
fn blackhole_savers_25s() {
    run("blackhole_savers_25s", |sc| blackhole(sc, true));
}

#[test]
fn blackhole_gateway_25s() {
    run("blackhole_gateway_25s", |sc| blackhole(sc, false));
}

#[test]
fn gateway_sigkill_x10() {
    run("gateway_sigkill_x10", |sc| async move {
        let mut row = Row::new(
            &sc.name,
            "10 x SIGKILL of the gateway under load, clients retrying with Idempotency-Key",
        );
        let mut p = Pipeline::start(&sc, 2).await?;
        let mut subs = warm_up(&sc, &p).await?;
        row.conns_before = p.conns();
        row.rss_before_mib = rss_mib(&p.procs());
        // Continuous load for the whole fault window, so kills land mid-request and
        // mid-publish.
        let mut spec = LoadSpec::small(&sc.name, 4, 1000, 8);
        spec.pause = Duration::from_millis(250);
        spec.run_for = Some(Duration::from_secs(16));
        let load = Load::start(&p.gateway_url(), &spec, &sc.counter);
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            p.gateway.restart()?;
            p.gateway
                .wait_ok("/healthz", Duration::from_secs(20))
                .await?;
        }
        let fault_end = Instant::now();
        row.recovery_ms = recover(&sc, &load, fault_end).await;
        subs.extend(load.wait().await);
        let _ = sc.wait_saved(&subs, DRAIN).await;
        after(&mut row, &p, Duration::from_secs(2)).await;
        sc.audit_into(&mut row, &subs, Some(&p.status_url()), Checks::All)
            .await?;
        let retried_ids = subs.iter().filter(|s| s.job_ids.len() > 1).count();
        row.note(format!(
            "{retried_ids} submissions got more than one job id for one Idempotency-Key"
        ));
        row.check(
            retried_ids == 0,
            format!("{retried_ids} submissions got two job ids for one key"),
        );
        row.note("finding 2: no half jobs or duplicates with Idempotency-Key retries");
        Ok(row)
    });
}

#[test]
fn status_sigkill_x4() {
    run("status_sigkill_x4", |sc| async move {
        let mut row = Row::new(&sc.name, "4 x SIGKILL of status under load, each restarted");
        let mut p = Pipeline::start(&sc, 2).await?;
        let mut subs = warm_up(&sc, &p).await?;
        row.conns_before = p.conns();
        row.rss_before_mib = rss_mib(&p.procs());
        let mut spec = LoadSpec::small(&sc.name, 4, 10, 4);
        spec.pause = Duration::from_millis(1200);
        let load = Load::start(&p.gateway_url(), &spec, &sc.counter);
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_secs(3)).await;
            p.status.restart()?;
            p.status.wait_ok("/readyz", Duration::from_secs(20)).await?;
        }
        let fault_end = Instant::now();
        row.recovery_ms = recover(&sc, &load, fault_end).await;
        subs.extend(load.wait().await);
        let _ = sc.wait_saved(&subs, DRAIN).await;
        after(&mut row, &p, Duration::from_secs(2)).await;
        sc.audit_into(&mut row, &subs, Some(&p.status_url()), Checks::All)
            .await?;
        row.note("finding 5: a restarted status rebuilds every job");
        Ok(row)
    });
}

#[test]
fn output_full_then_read_only() {
    run("output_full_then_read_only", |sc| async move {
        let mut row = Row::new(
            &sc.name,
            "output root on a 2 MiB tmpfs: full for 2 s, then read-only for 2 s",
        );
        sc.mount_tmpfs(&sc.root, "2m")?;
        let p = Pipeline::start(&sc, 2).await?;
        let mut subs = warm_up(&sc, &p).await?;
        row.conns_before = p.conns();
        row.rss_before_mib = rss_mib(&p.procs());
        // Full: a filler takes every free byte.
        let filler = sc.root.join("filler.bin");
        {
            use std::io::Write as _;
            let mut f = std::fs::File::create(&filler)?;
            let chunk = vec![0u8; 16 * 1024];
            while f.write_all(&chunk).is_ok() {}
            let _ = f.sync_all();
        }
        let load = Load::start(
            &p.gateway_url(),
            &LoadSpec::small(&sc.name, 2, 5, 2),
            &sc.counter,
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
        std::fs::remove_file(&filler)?;
        subs.extend(load.wait().await);
        // Read-only.
        sc.remount(&sc.root, true)?;
        let load = Load::start(
            &p.gateway_url(),
            &LoadSpec::small(&sc.name, 2, 5, 2),
            &sc.counter,
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
        sc.remount(&sc.root, false)?;
        let fault_end = Instant::now();
        row.recovery_ms = recover(&sc, &load, fault_end).await;
        subs.extend(load.wait().await);
        let _ = sc.wait_saved(&subs, DRAIN).await;
        after(&mut row, &p, Duration::from_secs(1)).await;
        sc.audit_into(&mut row, &subs, Some(&p.status_url()), Checks::All)
            .await?;
        Ok(row)
    });
}

#[test]
fn symlinks_in_output_root() {
    run("symlinks_in_output_root", |sc| async move {
        let mut row = Row::new(
            &sc.name,
            "symlinks in the root: a folder pointing outside, links planted at temp-file names",
        );
        let outside = sc.dir.join("outside");
        std::fs::create_dir_all(&outside)?;
        let victim = outside.join("victim.txt");
        let victim_text = "must stay as it is\n";
        std::fs::write(&victim, victim_text)?;
        std::os::unix::fs::symlink(&outside, sc.root.join("evil"))?;
        std::fs::create_dir_all(sc.root.join("planted"))?;

        let front = sc.proxy().await?;
        let back = sc.proxy().await?;
        let status = sc.status(&front, &[]).await?;
        let gateway = sc.gateway(&front, &[]).await?;
        // A folder symlink: save_path "evil" leads outside.
        let mut spec = LoadSpec::small("evil", 1, 2, 2);
        spec.give_up = Duration::from_secs(20);
        let evil = Load::start(&gateway.base_url, &spec, &sc.counter);
        // Temp-file names: the job is queued while no saver runs, so its temp names
        // (`.luna-<job>-<k>.tmp`) can be planted before any saver looks.
        let mut spec = LoadSpec::small("planted", 1, 1, 3);
        spec.give_up = Duration::from_secs(20);
        let planted_subs = Load::start(&gateway.base_url, &spec, &sc.counter)
            .wait()
            .await;
        let mut planted = 0;
        for s in &planted_subs {
            if let Some(job) = s.accepted() {
                for k in 0..s.images {
                    let link = sc.root.join("planted").join(format!(".luna-{job}-{k}.tmp"));
                    std::os::unix::fs::symlink(&victim, link)?;
                    planted += 1;
                }
            }
        }
        let saver = sc.saver(&back, 0, &[]).await?;
        let mut subs = evil.wait().await;
        subs.extend(planted_subs);
        // Let the saver do what it will with every queued task.
        let _ = sc.wait_saved(&subs, Duration::from_secs(20)).await;
        let audit = sc
            .audit_into(&mut row, &subs, Some(&status.base_url), Checks::None)
            .await?;
        let outside_files: Vec<_> = audit::walk(&outside)
            .into_iter()
            .filter(|(p, _)| p != &victim)
            .map(|(p, _)| p)
            .collect();
        row.outside = outside_files.len();
        let victim_now = std::fs::read_to_string(&victim).unwrap_or_default();
        // Symlinks other than the ones planted (a published final name that is a link).
        let published_links: Vec<_> = audit
            .symlinks
            .iter()
            .filter(|p| {
                !p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(".luna-"))
                    && !p.ends_with("evil")
            })
            .collect();
        row.note(format!(
            "planted {planted} temp-name links; outcomes: {:?}",
            subs.iter()
                .map(|s| format!("{}: {:?}", s.sub, s.outcome))
                .collect::<Vec<_>>()
        ));
        row.check(
            row.outside == 0,
            format!("files written outside the root: {outside_files:?}"),
        );
        row.check(
            victim_now == victim_text,
            "the target of a planted temp-name link was overwritten",
        );
        row.check(
            published_links.is_empty(),
            format!("symlinks published as final files: {published_links:?}"),
        );
        row.check(
            row.duplicated == 0,
            format!("{} duplicates", row.duplicated),
        );
        row.check(row.partial == 0, format!("{} partial files", row.partial));
        row.conns_before = front.live() + back.live();
        row.conns_after = row.conns_before;
        row.rss_after_mib = rss_mib(&[&gateway, &status, &saver]);
        row.rss_before_mib = row.rss_after_mib;
        row.note("finding 1: no symlink below the root is followed");
        Ok(row)
    });
}

/// Samples the RSS of `proc` every 100 ms until `stop`, returns the peak in MiB.
fn watch_peak(
    pid: Option<u32>,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<f64>,
) {
    let (tx, mut rx) = tokio::sync::oneshot::channel::<()>();
    let handle = tokio::spawn(async move {
        let mut peak = 0u64;
        loop {
            if let Some(pid) = pid {
                peak = peak.max(luna_faults::procs::rss_kib(pid));
            }
            tokio::select! {
                _ = &mut rx => break,
                () = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
        peak as f64 / 1024.0
    });
    (tx, handle)
}

/// 50 clients posting 3 MB frames (1024x1024 RGB) as fast as they are answered, for 12 s.
fn fifty_clients(scenario: &str) -> LoadSpec {
    let mut spec = LoadSpec::small(scenario, 50, 40, 1);
    spec.width = 1024;
    spec.height = 1024;
    spec.pause = Duration::ZERO;
    spec.run_for = Some(Duration::from_secs(12));
    spec.give_up = Duration::from_secs(60);
    spec
}

#[test]
fn luna_up_50_clients() {
    run("luna_up_50_clients", |sc| async move {
        let mut row = Row::new(
            &sc.name,
            "luna up (in-process queue), 50 clients posting 3 MB frames for 12 s",
        );
        let (inflight, queued) = (mib(INFLIGHT_MIB), mib(QUEUED_MIB));
        let flags = [
            "--max-inflight-bytes",
            &inflight,
            "--max-queued-bytes",
            &queued,
        ];
        let (up, gateway, status) = sc.luna_up(&flags).await?;
        row.rss_before_mib = rss_mib(&[&up]);
        let (stop, peak) = watch_peak(up.pid());
        let load = Load::start(&gateway, &fifty_clients(&sc.name), &sc.counter);
        let subs = load.wait().await;
        let load_end = Instant::now();
        row.recovery_ms = sc
            .wait_saved(&subs, Duration::from_secs(120))
            .await
            .map(|_| load_end.elapsed().as_millis() as u64);
        let _ = stop.send(());
        let peak = peak.await.unwrap_or_default();
        row.rss_peak_mib = Some(peak);
        row.rss_after_mib = rss_mib(&[&up]);
        sc.audit_into(&mut row, &subs, Some(&status), Checks::All)
            .await?;
        let bound = max_rss_mib(QUEUED_MIB);
        row.check(
            peak <= bound,
            format!("luna up peaked at {peak:.0} MiB (bound {bound:.0})"),
        );
        row.note(format!("peak {peak:.0} MiB, bound {bound:.0} MiB"));
        Ok(row)
    });
}

#[test]
fn gateway_50_clients() {
    run("gateway_50_clients", |sc| async move {
        let mut row = Row::new(
            &sc.name,
            "luna-gateway, 50 clients posting 3 MB frames for 12 s",
        );
        let inflight = mib(INFLIGHT_MIB);
        let p = Pipeline::start_with(&sc, 2, &["--max-inflight-bytes", &inflight]).await?;
        row.conns_before = p.conns();
        row.rss_before_mib = rss_mib(&p.procs());
        let (stop, peak) = watch_peak(p.gateway.pid());
        let load = Load::start(&p.gateway_url(), &fifty_clients(&sc.name), &sc.counter);
        let subs = load.wait().await;
        let load_end = Instant::now();
        let _ = stop.send(());
        let peak = peak.await.unwrap_or_default();
        row.recovery_ms = sc
            .wait_saved(&subs, Duration::from_secs(120))
            .await
            .map(|_| load_end.elapsed().as_millis() as u64);
        row.rss_peak_mib = Some(peak);
        after(&mut row, &p, Duration::from_secs(1)).await;
        sc.audit_into(&mut row, &subs, Some(&p.status_url()), Checks::All)
            .await?;
        let bound = max_rss_mib(0);
        row.check(
            peak <= bound,
            format!("the gateway peaked at {peak:.0} MiB (bound {bound:.0})"),
        );
        row.note(format!("peak {peak:.0} MiB, bound {bound:.0} MiB"));
        Ok(row)
    });
}

#[test]
fn cluster_node_killed() {
    run("cluster_node_killed", |mut sc| async move {
        let mut row = Row::new(
            &sc.name,
            "3-node RabbitMQ cluster of the suite's own, node 1 SIGKILLed under load",
        );
        let mut nodes = cluster::Cluster::start(3).await?;
        // One proxy per node, so connections are counted; every process is given all three.
        let mut proxies = Vec::new();
        for node in &nodes.nodes {
            proxies.push(Proxy::start(broker::broker_addr(&node.url())?).await?);
        }
        let urls: Vec<String> = nodes
            .nodes
            .iter()
            .zip(&proxies)
            .map(|(n, p)| broker::url_via(&n.url(), p.addr()))
            .collect();
        // Audited through node 2, which stays up.
        sc.use_broker(urls.join(","), nodes.nodes[1].url());
        let started = async {
            let status = sc.status(&proxies[0], &[]).await?;
            let gateway = sc.gateway(&proxies[0], &[]).await?;
            let savers = [
                sc.saver(&proxies[0], 0, &[]).await?,
                sc.saver(&proxies[0], 1, &[]).await?,
            ];
            anyhow::Ok((status, gateway, savers))
        };
        let (status, gateway, savers) = match started.await {
            Ok(started) => started,
            Err(e) => {
                let why = format!("{e:#}");
                let why: String = why.chars().take(400).collect();
                row.check(
                    false,
                    format!("the services do not run on the cluster: {why}"),
                );
                return Ok(row);
            }
        };
        let conns = || proxies.iter().map(Proxy::live).sum::<usize>();
        row.conns_before = conns();
        let mut all = vec![&gateway, &status];
        all.extend(savers.iter());
        row.rss_before_mib = rss_mib(&all);
        let mut spec = LoadSpec::small(&sc.name, 4, 10, 4);
        spec.pause = Duration::from_millis(1000);
        let load = Load::start(&gateway.base_url, &spec, &sc.counter);
        tokio::time::sleep(Duration::from_secs(4)).await;
        nodes.nodes[0].kill();
        let fault_end = Instant::now();
        row.recovery_ms = recover(&sc, &load, fault_end).await;
        let subs = load.wait().await;
        let _ = sc.wait_saved(&subs, DRAIN).await;
        row.conns_after = conns();
        row.rss_after_mib = rss_mib(&all);
        sc.audit_into(&mut row, &subs, Some(&status.base_url), Checks::All)
            .await?;
        row.check(
            row.recovery_ms.is_some_and(|ms| ms < 10_000),
            format!(
                "recovery took {:?} ms (promise: under 10 s)",
                row.recovery_ms
            ),
        );
        row.note("needs comma-separated --amqp-url (not supported on today's code)");
        Ok(row)
    });
}

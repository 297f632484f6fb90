//! One table row per scenario, printed as markdown and merged into
//! `target/faults-report.json` (rows of other scenarios are kept, so one run of the whole suite
//! leaves the whole table).

use serde::{Deserialize, Serialize};

/// What one scenario measured, and which promises it broke.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Row {
    pub scenario: String,
    /// The fault, in a few words.
    pub fault: String,
    /// Submissions answered 202 / submissions made.
    pub accepted: usize,
    pub submissions: usize,
    /// Distinct images on disk / images accepted.
    pub saved: usize,
    pub accepted_images: usize,
    pub lost: usize,
    pub duplicated: usize,
    /// Undecodable or wrong files.
    pub partial: usize,
    /// Submissions partly on disk.
    pub half_jobs: usize,
    /// Unaccepted submissions on disk anyway.
    pub orphans: usize,
    /// Temp files left, symlinks found in the root, files outside the root.
    pub temp_left: usize,
    pub symlinks: usize,
    pub outside: usize,
    /// Messages in `<prefix>.parked`.
    pub parked: u32,
    /// Accepted jobs that status does not report `completed`.
    pub not_completed: usize,
    /// Longest wait for an answer to one POST, ms.
    pub max_post_ms: u64,
    /// From the end of the last fault until every accepted image was on disk (None: never).
    pub recovery_ms: Option<u64>,
    /// Connections through the scenario's proxies.
    pub conns_before: usize,
    pub conns_after: usize,
    /// Sum of the services' RSS, MiB.
    pub rss_before_mib: f64,
    pub rss_after_mib: f64,
    /// Highest RSS sampled during the load, MiB (scenarios that watch it).
    pub rss_peak_mib: Option<f64>,
    /// Answers seen, known findings, anything worth a line.
    pub notes: String,
    /// Broken promises (the test fails when not empty).
    pub failed: Vec<String>,
}

impl Row {
    pub fn new(scenario: &str, fault: &str) -> Self {
        Self {
            scenario: scenario.to_owned(),
            fault: fault.to_owned(),
            ..Self::default()
        }
    }

    /// Records a promise: when `ok` is false the scenario fails with `what`.
    pub fn check(&mut self, ok: bool, what: impl Into<String>) {
        if !ok {
            self.failed.push(what.into());
        }
    }

    pub fn note(&mut self, text: impl AsRef<str>) {
        if !self.notes.is_empty() {
            self.notes.push_str("; ");
        }
        self.notes.push_str(text.as_ref());
    }
}

const HEADER: &str = "| scenario | fault | accepted | saved | lost | dup | partial | half jobs | orphans | temp | outside | parked | not completed | max POST | recovery | conns before/after | RSS MiB before/after (peak) | verdict |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n";

fn line(r: &Row) -> String {
    let recovery = r.recovery_ms.map_or_else(
        || "never".to_owned(),
        |ms| format!("{:.1} s", ms as f64 / 1000.0),
    );
    let peak = r
        .rss_peak_mib
        .map_or_else(String::new, |p| format!(" ({p:.0})"));
    let verdict = if r.failed.is_empty() {
        "ok".to_owned()
    } else {
        // The full texts are in the JSON report and the test's panic message.
        let short: Vec<String> = r
            .failed
            .iter()
            .map(|f| match f.char_indices().nth(60) {
                Some((i, _)) => format!("{}...", &f[..i]),
                None => f.clone(),
            })
            .collect();
        format!("FAIL: {}", short.join("; "))
    };
    format!(
        "| {} | {} | {}/{} | {}/{} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} ms | {} | {}/{} | {:.0}/{:.0}{} | {} |\n",
        r.scenario,
        r.fault,
        r.accepted,
        r.submissions,
        r.saved,
        r.accepted_images,
        r.lost,
        r.duplicated,
        r.partial,
        r.half_jobs,
        r.orphans,
        r.temp_left + r.symlinks,
        r.outside,
        r.parked,
        r.not_completed,
        r.max_post_ms,
        recovery,
        r.conns_before,
        r.conns_after,
        r.rss_before_mib,
        r.rss_after_mib,
        peak,
        verdict,
    )
}

/// The rows as a markdown table.
pub fn markdown(rows: &[Row]) -> String {
    let mut out = HEADER.to_owned();
    for r in rows {
        out.push_str(&line(r));
    }
    out
}

/// Prints `row` and the suite's table so far, and merges `row` into the JSON report.
pub fn record(row: &Row) {
    println!("\n{}", markdown(std::slice::from_ref(row)));
    if !row.notes.is_empty() {
        println!("notes: {}\n", row.notes);
    }
    let Ok(target) = crate::bins::target_dir() else {
        return;
    };
    let path = target.join("faults-report.json");
    let mut rows: Vec<Row> = std::fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    rows.retain(|r| r.scenario != row.scenario);
    rows.push(row.clone());
    rows.sort_by(|a, b| a.scenario.cmp(&b.scenario));
    match serde_json::to_vec_pretty(&rows) {
        Ok(json) => {
            if let Err(e) = std::fs::write(&path, json) {
                eprintln!("could not write {}: {e}", path.display());
            }
        }
        Err(e) => eprintln!("could not encode the report: {e}"),
    }
    println!(
        "fault suite so far ({}):\n{}",
        path.display(),
        markdown(&rows)
    );
}

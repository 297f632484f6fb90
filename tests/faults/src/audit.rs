//! What is actually on disk, judged from names and bytes alone.
//!
//! The walk never follows a symlink: a symlink is itself a finding. Each file named
//! `<sub>_i<k>[_<n>].png` (see [`crate::load`]) is decoded with the `image` crate; a file that
//! does not decode, or whose first pixels do not name the same `(sub, k)`, is partial. A second
//! file for one `(sub, k)` is a duplicate.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::load::Submission;

/// The output root, file by file.
#[derive(Debug, Default, Clone)]
pub struct Audit {
    /// Good files per `(sub, k)`.
    pub images: BTreeMap<(u64, u32), u32>,
    /// Files that did not decode or hold other pixels than their name says.
    pub partial: Vec<PathBuf>,
    /// `.luna-*.tmp` and other dot files left behind.
    pub temps: Vec<PathBuf>,
    /// Symlinks found (not followed).
    pub symlinks: Vec<PathBuf>,
    /// Regular files whose names the load does not produce.
    pub foreign: Vec<PathBuf>,
}

/// Walks `dir` (no symlink followed) and returns every entry that is not a directory.
pub fn walk(dir: &Path) -> Vec<(PathBuf, std::fs::Metadata)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            let Ok(meta) = std::fs::symlink_metadata(&p) else {
                continue;
            };
            if meta.is_dir() {
                stack.push(p);
            } else {
                out.push((p, meta));
            }
        }
    }
    out
}

/// Parses `<sub>_i<k>[_<n>].png`.
fn parse_name(name: &str) -> Option<(u64, u32)> {
    let stem = name.strip_suffix(".png")?;
    let (sub, rest) = stem.split_once("_i")?;
    let k = rest.split('_').next()?;
    Some((sub.parse().ok()?, k.parse().ok()?))
}

/// Decodes `path` and checks that its pixels are those of `(sub, k)`.
fn intact(path: &Path, sub: u64, k: u32) -> bool {
    let Ok(bytes) = std::fs::read(path) else {
        return false;
    };
    let Ok(img) = image::load_from_memory_with_format(&bytes, image::ImageFormat::Png) else {
        return false;
    };
    let rgb = img.to_rgb8();
    let raw = rgb.as_raw();
    raw.len() >= 12 && raw[..8] == sub.to_le_bytes() && raw[8..12] == k.to_le_bytes()
}

/// Audits every file under `root` (the whole output root, so stray files anywhere count),
/// except the store's own state folder `.luna` (the submission ledger of keyed jobs).
pub fn scan(root: &Path) -> Audit {
    let mut audit = Audit::default();
    let state = root.join(".luna");
    for (path, meta) in walk(root) {
        if path.starts_with(&state) && !meta.file_type().is_symlink() {
            continue;
        }
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if meta.file_type().is_symlink() {
            audit.symlinks.push(path);
            continue;
        }
        if name.starts_with('.') {
            audit.temps.push(path);
            continue;
        }
        match parse_name(&name) {
            Some((sub, k)) if intact(&path, sub, k) => {
                *audit.images.entry((sub, k)).or_default() += 1;
            }
            Some(_) => audit.partial.push(path),
            None => audit.foreign.push(path),
        }
    }
    audit
}

/// The audit held against what the clients were told.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Tally {
    /// Submissions answered 202.
    pub accepted: usize,
    /// Images of those.
    pub accepted_images: usize,
    /// Distinct images on disk (any submission).
    pub saved: usize,
    /// Images of accepted submissions with no file.
    pub lost: usize,
    /// Files beyond the first for one image.
    pub duplicated: usize,
    /// Files that do not decode or hold the wrong pixels.
    pub partial: usize,
    /// Submissions with some but not all of their images on disk.
    pub half_jobs: usize,
    /// Submissions never accepted whose images are on disk anyway (the client cannot know).
    pub orphans: usize,
    /// Submissions with no 202 in the end.
    pub unanswered: usize,
}

pub fn tally(audit: &Audit, subs: &[Submission]) -> Tally {
    let mut t = Tally {
        saved: audit.images.len(),
        duplicated: audit.images.values().map(|n| (n - 1) as usize).sum(),
        partial: audit.partial.len(),
        ..Tally::default()
    };
    for s in subs {
        let present = (0..s.images as u32)
            .filter(|k| audit.images.contains_key(&(s.sub, *k)))
            .count();
        if s.accepted().is_some() {
            t.accepted += 1;
            t.accepted_images += s.images;
            t.lost += s.images - present;
        } else {
            t.unanswered += 1;
            if present > 0 {
                t.orphans += 1;
            }
        }
        if present > 0 && present < s.images {
            t.half_jobs += 1;
        }
    }
    t
}

/// True when every image of every accepted submission has a file.
pub fn all_saved(audit: &Audit, subs: &[Submission]) -> bool {
    subs.iter()
        .filter(|s| s.accepted().is_some())
        .all(|s| (0..s.images as u32).all(|k| audit.images.contains_key(&(s.sub, k))))
}

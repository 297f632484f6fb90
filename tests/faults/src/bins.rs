//! The service binaries under test: the ones next to this test executable.
//!
//! `cargo test --workspace` builds them into the same target directory. When one is missing (a
//! run of this crate alone), or `LUNA_FAULTS_BUILD=1` asks for it (to be sure they are fresh),
//! they are built once with `cargo build`, in the profile of the test executable.
//! `LUNA_FAULTS_BIN_DIR` points at another folder holding them instead (to audit binaries
//! kept aside, when several checkouts share one target directory).

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{Context as _, bail};

/// The binaries the suite starts, with the package that builds each.
const BINARIES: [(&str, &str); 4] = [
    ("luna-gateway", "luna-gateway"),
    ("luna-saver", "luna-saver"),
    ("luna-status", "luna-status"),
    ("luna", "luna"),
];

/// `target/<profile>`: the test executable lives in its `deps/`.
pub fn profile_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the test executable")?;
    let deps = exe.parent().context("test executable has no folder")?;
    let profile = deps.parent().context("deps folder has no parent")?;
    Ok(profile.to_owned())
}

/// The target directory (`target/`), where the JSON report goes too.
pub fn target_dir() -> anyhow::Result<PathBuf> {
    let profile = profile_dir()?;
    Ok(profile
        .parent()
        .context("profile folder has no parent")?
        .to_owned())
}

static BUILT: OnceLock<Result<(), String>> = OnceLock::new();

/// Path of binary `name` (one of gateway, saver, status, luna), building them when needed.
///
/// # Errors
/// When the binaries are missing and `cargo build` fails.
pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("LUNA_FAULTS_BIN_DIR") {
        let path = PathBuf::from(dir).join(name);
        if !path.exists() {
            bail!("LUNA_FAULTS_BIN_DIR has no {name}: {}", path.display());
        }
        return Ok(path);
    }
    let dir = profile_dir()?;
    let missing = BINARIES.iter().any(|(bin, _)| !dir.join(bin).exists());
    let forced = std::env::var_os("LUNA_FAULTS_BUILD").is_some_and(|v| v == "1");
    if missing || forced {
        BUILT
            .get_or_init(|| build(&dir).map_err(|e| format!("{e:#}")))
            .clone()
            .map_err(anyhow::Error::msg)?;
    }
    let path = dir.join(name);
    if !path.exists() {
        bail!("{} does not exist after building", path.display());
    }
    Ok(path)
}

fn build(profile: &std::path::Path) -> anyhow::Result<()> {
    let target = profile.parent().context("profile folder has no parent")?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["build", "--bins", "--target-dir"])
        .arg(target);
    for (_, package) in BINARIES {
        cmd.args(["-p", package]);
    }
    if profile.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    eprintln!("building the service binaries: {cmd:?}");
    let status = cmd.status().context("running cargo build")?;
    if !status.success() {
        bail!("cargo build of the service binaries failed: {status}");
    }
    Ok(())
}

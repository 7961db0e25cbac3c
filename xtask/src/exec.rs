//! Running commands with errors that name the command that failed.
use std::{
    ffi::OsStr,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

/// The workspace root (xtask lives one level below it). Read at run time (`cargo run` sets
/// CARGO_MANIFEST_DIR), so one xtask binary in a shared target directory serves the checkout it
/// was started from; the compile-time value is the fallback.
pub fn workspace_root() -> PathBuf {
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    manifest_dir.parent().map(Path::to_path_buf).unwrap_or(manifest_dir)
}

/// The cargo target directory.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// Runs a command with inherited stdio; fails with its command line if it fails.
pub fn run_status<S: AsRef<OsStr>>(program: impl AsRef<OsStr>, args: &[S]) -> Result<()> {
    let program = program.as_ref();
    let line = command_line(program, args);
    let status = Command::new(program)
        .args(args)
        .current_dir(workspace_root())
        .status()
        .with_context(|| format!("starting `{line}`"))?;
    if !status.success() {
        bail!("`{line}` failed ({status})");
    }
    Ok(())
}

/// Runs a lab tool (demo, lab) that tears its namespaces down on Ctrl-C: the terminal sends
/// SIGINT to both, so xtask ignores it and waits until the tool has cleaned up and exited.
pub fn run_lab_tool<S: AsRef<OsStr>>(program: impl AsRef<OsStr>, args: &[S]) -> Result<()> {
    ctrlc::set_handler(|| {}).context("installing the Ctrl-C handler")?;
    run_status(program, args)
}

/// Runs a command and returns its stdout; `None` if it could not start or failed.
pub fn output(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `cargo <args>` in the workspace root.
pub fn cargo(args: &[&str]) -> Result<()> {
    run_status(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()), args)
}

fn command_line<S: AsRef<OsStr>>(program: &OsStr, args: &[S]) -> String {
    std::iter::once(program)
        .chain(args.iter().map(AsRef::as_ref))
        .map(|s| s.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

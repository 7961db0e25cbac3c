//! `cargo xtask setup`: installs what is missing, and nothing else (idempotent).
use anyhow::{bail, Context as _, Result};

use crate::{
    exec::{output, run_status},
    preflight::{self, EBPF_TOOLCHAIN, PACKAGES},
};

const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

pub fn run() -> Result<()> {
    if !preflight::is_root() {
        bail!("setup installs Debian packages and mounts bpffs: run it as root (`sudo -E cargo xtask setup`)");
    }
    step("Debian packages", packages)?;
    step("nightly rust-src (eBPF build-std)", rust_src)?;
    step("bpf-linker (LLVM 22)", bpf_linker)?;
    step("bpffs at /sys/fs/bpf", bpffs)?;
    println!("xtask setup: done");
    Ok(())
}

fn step(name: &str, f: impl FnOnce() -> Result<bool>) -> Result<()> {
    match f().with_context(|| format!("setup step: {name}"))? {
        true => println!("xtask setup: {name}: installed"),
        false => println!("xtask setup: {name}: already present"),
    }
    Ok(())
}

fn packages() -> Result<bool> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            !output("dpkg-query", &["-W", "-f=${Status}", p])
                .is_some_and(|s| s.contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        return Ok(false);
    }
    println!("xtask setup: installing {}", missing.join(" "));
    run_status("apt-get", &["update", "-q"])?;
    let mut args = vec!["install", "-y", "-q", "--no-install-recommends"];
    args.extend(&missing);
    std::env::set_var("DEBIAN_FRONTEND", "noninteractive");
    run_status("apt-get", &args)?;
    Ok(true)
}

fn rust_src() -> Result<bool> {
    if preflight::rust_src_ok() {
        return Ok(false);
    }
    let has_nightly = output("rustup", &["toolchain", "list"])
        .is_some_and(|l| l.lines().any(|t| t.starts_with(EBPF_TOOLCHAIN)));
    if !has_nightly {
        run_status("rustup", &["toolchain", "install", EBPF_TOOLCHAIN, "--profile", "minimal"])?;
    }
    run_status("rustup", &["component", "add", "rust-src", "--toolchain", EBPF_TOOLCHAIN])?;
    Ok(true)
}

fn bpf_linker() -> Result<bool> {
    if preflight::bpf_linker_ok() {
        return Ok(false);
    }
    println!("xtask setup: building bpf-linker against LLVM 22 (1-3 minutes)");
    // Without the prefix llvm-sys finds /usr and fails with `unable to find library -lLLVM`.
    std::env::set_var("LLVM_SYS_221_PREFIX", LLVM_PREFIX);
    let path = std::env::var("PATH").unwrap_or_default();
    std::env::set_var("PATH", format!("{LLVM_PREFIX}/bin:{path}"));
    run_status(
        "cargo",
        &["install", "--force", "bpf-linker", "--no-default-features", "--features", "llvm-22"],
    )?;
    if !preflight::bpf_linker_ok() {
        bail!("bpf-linker was installed but is not on PATH or not linked against LLVM 22 (check ~/.cargo/bin)");
    }
    Ok(true)
}

fn bpffs() -> Result<bool> {
    if preflight::bpffs_ok() {
        return Ok(false);
    }
    run_status("mount", &["-t", "bpf", "bpf", "/sys/fs/bpf"])?;
    Ok(true)
}

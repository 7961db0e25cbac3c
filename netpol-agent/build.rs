//! Builds netpol-ebpf for bpfel-unknown-none with aya-build and leaves the object in OUT_DIR,
//! where `dataplane::object` embeds it.
use std::{env, fs, path::PathBuf};

use anyhow::{anyhow, Context as _};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let out = PathBuf::from(env::var_os("OUT_DIR").ok_or_else(|| anyhow!("OUT_DIR not set"))?);
    let object = out.join("netpol");
    if env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true")) {
        // For unprivileged work on the compiler only: the agent then refuses to load programs
        // and says why (dataplane::object).
        if !object.exists() {
            fs::write(&object, b"").context("writing the empty placeholder object")?;
        }
        println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
        return Ok(());
    }
    let metadata =
        cargo_metadata::MetadataCommand::new().no_deps().exec().context("cargo metadata")?;
    let ebpf = metadata
        .packages
        .into_iter()
        .find(|p| p.name.as_str() == "netpol-ebpf")
        .ok_or_else(|| anyhow!("netpol-ebpf package not found in the workspace"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("netpol-ebpf manifest has no parent directory"))?;
    aya_build::build_ebpf(
        [Package { name: "netpol-ebpf", root_dir: root_dir.as_str(), ..Default::default() }],
        Toolchain::default(),
    )
    .context(
        "building the eBPF programs failed; run `cargo xtask setup` (needs bpf-linker built \
         against LLVM 22 and the nightly rust-src component)",
    )
}

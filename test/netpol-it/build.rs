//! Builds the upgrade test's "changed program object": netpol-ebpf with its `upgrade-variant`
//! feature (same datapath, different code, one extra map), left in OUT_DIR where
//! `netpol_it::UPGRADE_VARIANT_OBJECT` points. The agent's own build embeds the normal object.
use std::{env, path::PathBuf};

use anyhow::{anyhow, Context as _};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let here = PathBuf::from(
        env::var_os("CARGO_MANIFEST_DIR").ok_or_else(|| anyhow!("no CARGO_MANIFEST_DIR"))?,
    );
    let root = here.join("../../netpol-ebpf").canonicalize().context("locating netpol-ebpf")?;
    let root = root.to_str().ok_or_else(|| anyhow!("non-UTF-8 path {}", root.display()))?;
    // With AYA_BUILD_SKIP=1 aya-build builds nothing; the upgrade test then fails and says so.
    aya_build::build_ebpf(
        [Package {
            name: "netpol-ebpf",
            root_dir: root,
            features: &["upgrade-variant"],
            ..Default::default()
        }],
        Toolchain::default(),
    )
    .context("building the upgrade-variant eBPF object failed; run `cargo xtask setup`")
}

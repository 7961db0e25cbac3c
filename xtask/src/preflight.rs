//! What the build and the tests need, checked without changing anything.
use anyhow::{bail, Result};

use crate::exec::output;

/// Debian packages the build, the tests, the lab and the benchmarks use.
pub const PACKAGES: &[&str] = &[
    // bpf-linker links against LLVM 22 (and what LLVM's CMake config references).
    "llvm-22-dev",
    "libpolly-22-dev",
    "zlib1g-dev",
    "libzstd-dev",
    // Operators' and tests' tools.
    "bpftool",
    "iproute2",
    "iperf3",
    "iptables",
    "ipset",
    "socat",
    "tcpdump",
];

/// The nightly toolchain aya-build uses to build the eBPF crate with `-Z build-std=core`.
pub const EBPF_TOOLCHAIN: &str = "nightly";

/// Which checks to run.
#[derive(Clone, Copy)]
pub struct Needs {
    /// Building the eBPF programs.
    pub build: bool,
    /// Running privileged tests, the lab and the demo.
    pub privileged: bool,
}

impl Needs {
    /// Everything.
    pub const ALL: Needs = Needs { build: true, privileged: true };
}

/// One missing prerequisite and how to get it.
pub struct Missing {
    pub what: String,
    pub fix: String,
}

fn missing_packages() -> Vec<&'static str> {
    PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            !output("dpkg-query", &["-W", "-f=${Status}", p])
                .is_some_and(|s| s.contains("install ok installed"))
        })
        .collect()
}

/// `true` if bpf-linker is installed and linked against LLVM 22.
pub fn bpf_linker_ok() -> bool {
    let Some(path) = output("sh", &["-c", "command -v bpf-linker"]) else {
        return false;
    };
    output("ldd", &[path.trim()]).is_some_and(|l| l.contains("LLVM") && l.contains("22"))
}

/// `true` if the eBPF toolchain has the rust-src component.
pub fn rust_src_ok() -> bool {
    output("rustup", &["component", "list", "--installed", "--toolchain", EBPF_TOOLCHAIN])
        .is_some_and(|l| l.lines().any(|c| c.starts_with("rust-src")))
}

/// `true` if a bpf filesystem is mounted at /sys/fs/bpf.
pub fn bpffs_ok() -> bool {
    std::fs::read_to_string("/proc/mounts").is_ok_and(|m| {
        m.lines().any(|l| {
            let f: Vec<_> = l.split_whitespace().collect();
            f.len() > 2 && f[1] == "/sys/fs/bpf" && f[2] == "bpf"
        })
    })
}

/// `true` if kubectl with a built-in kustomize that knows `patches` (kubectl >= 1.21) is on
/// PATH: netpol-agent/tests/deploy_manifests.rs compares its rendering of deploy/ with it.
pub fn kubectl_ok() -> bool {
    output("kubectl", &["version", "--client", "-o", "json"]).is_some_and(|v| {
        let minor = v.split("\"minor\":").nth(1).and_then(|m| {
            m.trim()
                .trim_start_matches('"')
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse::<u32>()
                .ok()
        });
        minor.is_some_and(|m| m >= 21)
    })
}

/// `true` if running as root.
pub fn is_root() -> bool {
    output("id", &["-u"]).is_some_and(|u| u.trim() == "0")
}

/// Everything missing for `needs`.
pub fn missing(needs: Needs) -> Vec<Missing> {
    let mut m = Vec::new();
    let setup = "run `cargo xtask setup` as root".to_string();
    if needs.build {
        let pkgs = missing_packages();
        if !pkgs.is_empty() {
            m.push(Missing {
                what: format!("Debian packages: {}", pkgs.join(" ")),
                fix: setup.clone(),
            });
        }
        if !bpf_linker_ok() {
            m.push(Missing { what: "bpf-linker built against LLVM 22".into(), fix: setup.clone() });
        }
        if !rust_src_ok() {
            m.push(Missing {
                what: format!("rust-src for the {EBPF_TOOLCHAIN} toolchain"),
                fix: format!("rustup component add rust-src --toolchain {EBPF_TOOLCHAIN}"),
            });
        }
    }
    if needs.privileged {
        if !is_root() {
            m.push(Missing {
                what: "root (bpf(), network namespaces, TC attachments)".into(),
                fix: "run as root, e.g. `sudo -E cargo xtask ...`".into(),
            });
        }
        if !bpffs_ok() {
            m.push(Missing { what: "bpffs mounted at /sys/fs/bpf".into(), fix: setup });
        }
    }
    m
}

/// Prints what is missing and fails.
pub fn report(missing: &[Missing]) -> Result<()> {
    eprintln!("xtask: missing prerequisites:");
    for m in missing {
        eprintln!("  - {}: {}", m.what, m.fix);
    }
    bail!("{} prerequisite(s) missing", missing.len())
}

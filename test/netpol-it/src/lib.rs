//! Harness for netpol's privileged tests: "pods" are network namespaces connected to the host by
//! veth pairs, in the routed topology Calico and Azure CNI use (a /32 host route per pod veth,
//! proxy ARP). The host namespace only forwards between these veths; a blackhole route for the
//! lab's range guarantees nothing addressed to it leaves the machine.
//!
//! Everything a [`Lab`] creates has a name unique to the process and is removed on drop, also
//! when a test panics; namespaces left by a killed run are removed by the next one.

pub mod agent;
pub mod cmd;
pub mod cpu;
pub mod fake_api;
pub mod fixture;
pub mod interrupt;
pub mod lab;
pub mod manifests;
pub mod netns;
pub mod packet;
pub mod probe;
pub mod scenario;
pub mod services;
pub mod synth;

/// The upgrade test's changed program object: netpol-ebpf built with `upgrade-variant`
/// (build.rs). Absent when the crate was built with `AYA_BUILD_SKIP=1`.
pub const UPGRADE_VARIANT_OBJECT: &str = concat!(env!("OUT_DIR"), "/netpol");

/// Panics unless running as root with bpffs available: privileged tests must fail loudly, never
/// skip silently.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "privileged datapath tests need root (bpf(), network namespaces); run `sudo -E cargo xtask test`"
    );
}

//! `cargo xtask test`: every test, privileged ones included. Fails if they cannot run.
use anyhow::Result;

use crate::{exec::cargo, preflight};

#[derive(clap::Args)]
pub struct TestArgs {
    /// Only the unprivileged unit and property tests.
    #[arg(long)]
    pub unit_only: bool,
}

pub fn run(args: &TestArgs) -> Result<()> {
    let needs = preflight::Needs { build: true, privileged: !args.unit_only };
    let missing = preflight::missing(needs);
    if !missing.is_empty() {
        // Privileged tests that cannot run are a failure, never a silent skip.
        return preflight::report(&missing);
    }
    println!("xtask test: unit and property tests");
    cargo(&["test", "--workspace", "--exclude", "netpol-ebpf", "--exclude", "netpol-it"])?;
    if args.unit_only {
        return Ok(());
    }
    println!("xtask test: privileged datapath and end-to-end tests (real packets between namespaces)");
    // One at a time: they attach programs and create namespaces and routes on this host.
    cargo(&["test", "-p", "netpol-it", "--", "--test-threads=1"])
}

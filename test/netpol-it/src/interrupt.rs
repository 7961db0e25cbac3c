//! Ctrl-C for the lab command: the first SIGINT/SIGTERM sets a flag that long-running lab work
//! checks between steps and probes, so it returns an error and the normal drop order tears the
//! lab down (agent, servers, manifests, namespaces, veths, routes, pins). A second signal exits at
//! once; whatever that leaves behind is removed by the next lab (`lab::reap_stale`).
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{bail, Result};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Installs the handler (once per process).
pub fn install() -> Result<()> {
    ctrlc::set_handler(|| {
        if INTERRUPTED.swap(true, Ordering::SeqCst) {
            eprintln!("\nlab: second interrupt, exiting without cleanup (the next lab reaps it)");
            std::process::exit(130);
        }
        eprintln!("\nlab: interrupted, tearing down (press Ctrl-C again to exit at once)");
    })?;
    Ok(())
}

/// Whether an interrupt arrived.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Fails once an interrupt arrived, so that `?` unwinds to the owners of the lab's resources.
pub fn check() -> Result<()> {
    if interrupted() {
        bail!("interrupted");
    }
    Ok(())
}

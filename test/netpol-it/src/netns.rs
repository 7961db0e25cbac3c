//! Running code inside a network namespace: a thread that joins the namespace with setns(2).
//! Sockets created there stay in that namespace and can be used from any thread afterwards.
use std::{fs::File, os::fd::AsRawFd};

use anyhow::{Context as _, Result};

/// Runs `f` on a fresh thread inside the named namespace (`/run/netns/<name>`).
pub fn in_netns<T: Send>(name: &str, f: impl FnOnce() -> T + Send) -> Result<T> {
    let path = format!("/run/netns/{name}");
    let ns = File::open(&path).with_context(|| format!("opening {path}"))?;
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: `ns` is an open namespace fd; setns affects only this thread, which ends
            // when `f` returns.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            if rc != 0 {
                return Err(std::io::Error::last_os_error()).context(format!("setns into {name}"));
            }
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread in netns {name} panicked"))?
    })
}

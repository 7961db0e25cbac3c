//! CPU placement of the calling thread. Where a packet is processed follows where it was sent
//! (a veth hands it to the backlog of the sending CPU), and per-CPU kernel state (the LRU
//! conntrack map's local lists, IPI costs in a VM) makes that placement matter to tests and
//! benchmarks.
use anyhow::Result;

/// Pins the calling thread to `cpu`.
pub fn pin_to_cpu(cpu: usize) -> Result<()> {
    // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET and sched_setaffinity only touch
    // the set we pass, for the calling thread (pid 0).
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    anyhow::ensure!(rc == 0, "pinning to CPU {cpu}: {}", std::io::Error::last_os_error());
    Ok(())
}

/// The CPUs the calling thread may run on.
pub fn allowed_cpus() -> Result<Vec<usize>> {
    // SAFETY: as above; sched_getaffinity writes only into `set`.
    let (rc, set) = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        let rc = libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set);
        (rc, set)
    };
    anyhow::ensure!(rc == 0, "reading the CPU affinity: {}", std::io::Error::last_os_error());
    // SAFETY: CPU_ISSET only reads the set.
    let cpus: Vec<usize> =
        (0..libc::CPU_SETSIZE as usize).filter(|&c| unsafe { libc::CPU_ISSET(c, &set) }).collect();
    anyhow::ensure!(!cpus.is_empty(), "the CPU affinity allows no CPU");
    Ok(cpus)
}

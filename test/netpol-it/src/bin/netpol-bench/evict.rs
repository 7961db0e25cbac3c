//! Evicting the conntrack table from the CPU caches before a stream of new flows.
//!
//! A batch of new flows writes the conntrack ways of the same 50,000 flows every time the
//! benchmark visits a row (a test run bumps one source port). Left alone, the lines an earlier
//! batch wrote may still be cached when the next one starts, or may not, as the host's other
//! tenants and the caches' fill policy decide. With the programs unchanged, such a stream
//! measured 123–250 ns from run to run; a steady loop of batches (`netpol-bench spin-allowed`)
//! 103 ns, and, in a throwaway build that wrote other memory between its batches, 210 ns after
//! 64 MiB and 241 ns after 700 MiB. Flushing every line of the table (ways and tags) before a batch makes its figure that
//! of flows whose conntrack lines come from memory, as a new flow's do on a node whose table the
//! caches do not hold: 229–256 ns in every row of every run since, as the host's speed moved.
use anyhow::Result;
use netpol_agent::dataplane::conntrack::Table;

use crate::LINE;

/// Flushes every cache line of `table`'s ways and tags from every cache of the machine.
pub fn evict(table: &Table) -> Result<()> {
    for (base, bytes) in table.regions() {
        for offset in (0..bytes).step_by(LINE) {
            // SAFETY: an address inside the table's mapping, which `table` keeps alive; a cache
            // flush neither reads nor writes the data.
            unsafe { flush_line(base.add(offset))? };
        }
    }
    fence()
}

#[cfg(target_arch = "x86_64")]
unsafe fn flush_line(p: *const u8) -> Result<()> {
    // SAFETY: CLFLUSH (SSE2, part of x86_64) on a mapped address.
    unsafe { core::arch::x86_64::_mm_clflush(p) };
    Ok(())
}

#[cfg(target_arch = "x86_64")]
fn fence() -> Result<()> {
    // SAFETY: MFENCE orders the flushes before the test run that follows.
    unsafe { core::arch::x86_64::_mm_mfence() };
    Ok(())
}

#[cfg(target_arch = "aarch64")]
unsafe fn flush_line(p: *const u8) -> Result<()> {
    // SAFETY: clean and invalidate to the point of coherence, which Linux lets user space do on
    // a mapped address.
    unsafe { core::arch::asm!("dc civac, {0}", in(reg) p, options(nostack, preserves_flags)) };
    Ok(())
}

#[cfg(target_arch = "aarch64")]
fn fence() -> Result<()> {
    // SAFETY: a full-system barrier after the flushes.
    unsafe { core::arch::asm!("dsb sy", options(nostack, preserves_flags)) };
    Ok(())
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
unsafe fn flush_line(_: *const u8) -> Result<()> {
    anyhow::bail!(
        "evicting the conntrack table from the caches is written for x86_64 and aarch64 only"
    )
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
fn fence() -> Result<()> {
    Ok(())
}

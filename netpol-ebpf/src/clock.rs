//! Conntrack's clock. `last_seen_ns` is `CLOCK_MONOTONIC_COARSE`, the clock the agent's garbage
//! collection compares with (see `datapath::decide_flow`), but reading it is a helper call of
//! ~14 ns here, a tenth of the established path. That clock only moves at a timer tick, when
//! `jiffies` moves too, and `bpf_jiffies64` is a plain load (the verifier inlines it on 64-bit
//! JITs). So each entry keeps the low 16 bits of `jiffies` of its last refresh in `tick`, and
//! the fast path reads the clock only when they changed: at most once per tick and flow.
//!
//! What this gives up: `last_seen_ns` may lag by one tick, as the coarse clock itself does; and
//! a packet arriving exactly a multiple of 65,536 ticks (≥ 65 s) after the last refresh keeps
//! the old time until the flow's next packet, so an idle flow could be collected that much
//! early. Never a wrong verdict: a collected flow is decided afresh by the general path.
use aya_ebpf::helpers::{bpf_jiffies64, bpf_ktime_get_coarse_ns};
use netpol_common::ct::CtValue;

/// `jiffies`: the timer tick count.
#[inline(always)]
pub fn jiffies() -> u64 {
    // SAFETY: a helper without arguments.
    unsafe { bpf_jiffies64() }
}

/// The low 16 bits of `jiffies`.
#[inline(always)]
pub fn tick() -> u16 {
    jiffies() as u16
}

/// `CLOCK_MONOTONIC_COARSE` in nanoseconds.
#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: a helper without arguments.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// Marks `ct` as seen now, reading the clock only if a tick passed since its last refresh.
#[inline(always)]
pub fn refresh(ct: &mut CtValue) {
    refresh_at(ct, jiffies());
}

/// [`refresh`] with `jiffies` already read.
#[inline(always)]
pub fn refresh_at(ct: &mut CtValue, jiffies: u64) {
    let tick = jiffies as u16;
    if ct.tick != tick {
        ct.tick = tick;
        ct.last_seen_ns = now_ns();
    }
}

//! Deny and audit events through the ring buffer, behind a per-CPU token bucket so a flood of
//! denied packets cannot cost a core in user space.
use aya_ebpf::helpers::bpf_ktime_get_ns;
use netpol_common::{
    counters::{Reason, STAT_EVENTS_LOST, STAT_EVENTS_RATE_LIMITED, STAT_EVENTS_SENT},
    event::DenyEvent,
};

use crate::{
    counters::stat,
    maps::{CONFIG_MAP, EVENTS_MAP, EVENT_RATE_MAP, SCRATCH_MAP},
    parse::Flow,
};

const NS_PER_SEC: u64 = 1_000_000_000;
const MAX_EVENTS_PER_SEC: u64 = 1_000_000;

#[inline(always)]
fn take_token() -> bool {
    let Some(cfg) = CONFIG_MAP.get(0) else {
        return false;
    };
    if cfg.events_per_sec == 0 {
        return false;
    }
    let (Some(state), Some(scratch)) = (EVENT_RATE_MAP.get_ptr_mut(0), SCRATCH_MAP.get_ptr_mut(0))
    else {
        return false;
    };
    // SAFETY: this CPU's entries, used by this invocation alone. Only the tick field of the
    // scratch entry is borrowed: the caller's `Flow` lives in the same entry.
    let (state, rate_tick) = unsafe { (&mut *state, &mut (*scratch).rate_tick) };
    // The bucket refills from the coarse clock (one tick of resolution: the timekeeper's last
    // update, no clock-source read). That clock moves only when `jiffies` does, so within the
    // tick of the last refill there is nothing to add and the clock (a helper call) is not
    // read: in a flood, most denied packets only find the bucket empty. A stale tick in this
    // object's scratch (another object refilled the shared bucket) only delays a refill to the
    // next tick; the time is not lost, `last_ns` still marks the last refill.
    let tick = crate::clock::tick();
    if *rate_tick != tick {
        *rate_tick = tick;
        let now = crate::clock::now_ns();
        // Tokens are counted in token-nanoseconds: refilling is a multiplication, no division.
        let cap = cfg.events_burst.max(1) as u64 * NS_PER_SEC;
        // Clamping both factors keeps the product far below u64::MAX without a 128-bit
        // multiply (which BPF lacks): 1e10 ns × 1e6 events/s = 1e16.
        let elapsed = now.saturating_sub(state.last_ns).min(10 * NS_PER_SEC);
        let rate = (cfg.events_per_sec as u64).min(MAX_EVENTS_PER_SEC);
        state.tokens = (state.tokens + elapsed * rate).min(cap);
        state.last_ns = now;
    }
    if state.tokens < NS_PER_SEC {
        return false;
    }
    state.tokens -= NS_PER_SEC;
    true
}

#[inline(always)]
pub fn emit(ifindex: u32, dir: u8, generation: u32, rule_id: u32, reason: Reason, flow: &Flow) {
    if !take_token() {
        stat(STAT_EVENTS_RATE_LIMITED);
        return;
    }
    // Written in place in the ring buffer: a DenyEvent on the stack would not fit beside the
    // parser's and conntrack's state in BPF's 512-byte stack.
    let Some(mut entry) = EVENTS_MAP.reserve_untyped::<DenyEvent>(0) else {
        stat(STAT_EVENTS_LOST);
        return;
    };
    entry.write(DenyEvent {
        timestamp_ns: unsafe { bpf_ktime_get_ns() },
        ifindex,
        generation,
        rule_id,
        src_port: flow.sport,
        dst_port: flow.dport,
        src_addr: crate::addr::bytes(&flow.src),
        dst_addr: crate::addr::bytes(&flow.dst),
        proto: flow.proto,
        direction: dir,
        reason: reason as u8,
        _pad: [0; 5],
    });
    entry.submit(0);
    stat(STAT_EVENTS_SENT);
}

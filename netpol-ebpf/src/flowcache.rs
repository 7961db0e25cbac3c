//! A per-CPU cache of established flows' verdicts, in front of conntrack for the fast path.
//!
//! Written when a conntrack lookup was a call into the kernel's LRU hash (hashing, bucket walk,
//! key compare, each returning through this machine's return thunk): most of the established
//! path's cost then, and in real traffic its cache misses on the bucket and element. This cache
//! is a direct-mapped array in one per-CPU map value: the verifier inlines its lookup, the hash
//! is a few instructions here, and a hit reads one entry. Conntrack's own table (`crate::ct`)
//! is now inlined too, and in `bench datapath`, where every line is cached, a hit here (26 ns)
//! no longer beats a conntrack lookup (25 ns); in real traffic a hit still reads one line of a
//! small per-CPU array where conntrack reads a line of each of two large shared ones. Not
//! re-measured there: kept.
//!
//! An entry is valid only within the timer tick (`jiffies`) it was written in, for its key, and
//! while its endpoint's slot still holds that interface at the recorded generation (the same
//! check as for conntrack hits). So:
//! - the conntrack entry is still looked up, refreshed and its TCP state advanced by a flow's
//!   first packet in each tick on each CPU, as before, and the garbage collector sees it as
//!   active;
//! - a policy change (a new generation) reaches cached flows at once;
//! - what does not reach a cached flow before the tick ends (at most 4 ms at `HZ=250`) is a
//!   conntrack entry that disappears meanwhile: evicted under pressure, or deleted by an
//!   operator. Its packets pass for the rest of the tick, as they did a moment before, and the
//!   next tick's packet finds conntrack without it and goes through the general path.
//!
//! Only allowed (or audited) flows in a state no packet of the fast path changes are cached:
//! TCP `ESTABLISHED` (packets with FIN or RST bypass the cache) and the stateless protocols. A
//! tombstone is never cached. Per CPU, and TC programs run with bottom halves disabled, which
//! serializes them on a CPU (on PREEMPT_RT too, where that is a per-CPU lock), so no entry is
//! read or written by two runs at once.
use netpol_common::{
    counters::Reason,
    ct::{CtValue, CT_ACTIVE, CT_TCP_ESTABLISHED, CT_VERDICT_ALLOW, CT_VERDICT_AUDIT},
};

use crate::maps::FLOW_CACHE_MAP;

/// Entries per CPU: a power of two, and [`FlowCache`] must fit the kernel's per-CPU value
/// limit (32 KiB).
pub const ENTRIES: usize = 512;

pub use crate::ct::KeyWords;

#[derive(Clone, Copy)]
#[repr(C)]
pub struct Entry {
    /// `jiffies` when written; 0: never written (`jiffies` starts far from 0 and 64 bits do
    /// not wrap).
    jiffies: u64,
    key: KeyWords,
    /// Endpoint generation the flow's conntrack entry was decided under.
    generation: u32,
    /// The endpoint's slot.
    slot: u16,
    /// `Reason` of the flow's packets: `AllowConntrack` or `Audit`.
    reason: u8,
    _pad: u8,
}

#[derive(Clone, Copy)]
#[repr(C)]
pub struct FlowCache {
    entries: [Entry; ENTRIES],
}
const _: () = assert!(core::mem::size_of::<FlowCache>() <= 32 * 1024);

/// A cached flow's counting slot, generation and reason, to be validated by the caller.
pub struct Hit {
    pub slot: u32,
    pub generation: u32,
    pub reason: Reason,
}

/// This CPU's entry for `key`: fetched once per packet, and passed to [`lookup`] and, on a miss,
/// to [`store`] (computing it twice cost a hash and a map lookup on a flow's first packet in
/// each tick).
#[inline(always)]
pub fn entry(key: &KeyWords) -> Option<&'static mut Entry> {
    // Fold the words that differ between flows into one, then multiplicative hashing: the
    // top bits of the product depend on every bit folded in.
    let folded = key[0] ^ key[1].rotate_left(16) ^ key[2] ^ key[3] ^ key[4] ^ key[5] ^ key[6];
    let idx = ((folded as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 55) as usize & (ENTRIES - 1);
    let cache = FLOW_CACHE_MAP.get_ptr_mut(0)?;
    // SAFETY: this CPU's value, used by one program run at a time (see the module doc).
    Some(unsafe { &mut (*cache).entries[idx] })
}

/// The cached verdict of `key` in tick `now` in its entry `e`, if any.
#[inline(always)]
pub fn lookup(e: &Entry, key: &KeyWords, now: u64) -> Option<Hit> {
    if e.jiffies != now {
        return None;
    }
    if !crate::ct::same_key(&e.key, key) {
        return None;
    }
    let reason =
        if e.reason == Reason::Audit as u8 { Reason::Audit } else { Reason::AllowConntrack };
    Some(Hit { slot: e.slot as u32, generation: e.generation, reason })
}

/// Caches in `e`, the entry of `key`, the verdict of the flow `ct` after its packet in tick
/// `now` (validated against its slot by the caller), if its state allows.
#[inline(always)]
pub fn store(e: &mut Entry, key: &KeyWords, now: u64, ct: &CtValue) {
    let reason = match ct.verdict {
        CT_VERDICT_ALLOW => Reason::AllowConntrack,
        CT_VERDICT_AUDIT => Reason::Audit,
        _ => return,
    };
    if ct.state != CT_TCP_ESTABLISHED && ct.state != CT_ACTIVE {
        return;
    }
    e.jiffies = now;
    e.key = *key;
    e.generation = ct.generation;
    e.slot = ct.slot;
    e.reason = reason as u8;
}

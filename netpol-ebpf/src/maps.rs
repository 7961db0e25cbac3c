//! Every map of the programs. BTF-typed (`#[btf_map]`) so `bpftool map dump` prints field names;
//! names and sizes come from `netpol_common::maps`, which documents who writes and reads each.
use crate::{flowcache::FlowCache, parse::Flow};
use aya_ebpf::{
    btf_maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf},
    macros::btf_map,
};
use netpol_common::{
    counters::{
        CounterKey, CounterValue, RuleCounterKey, COUNTERS_PER_SLOT, COUNTER_SLOTS, STAT_SLOTS,
    },
    ct::{CtKey, CtSet, CtTags, CtValue, FragKey, FragValue, CT_WAYS},
    ep::{Endpoint, EndpointKey, SlotOwner},
    event::{Config, RateState},
    maps::*,
    policy::{PeerData, PeerValue, PortData, PortValue},
};

/// Map flag of the hashes allocated per entry (a replaced element is freed after an RCU grace
/// period, and no memory is held for entries never written).
const NO_PREALLOC: usize = aya_ebpf::bindings::BPF_F_NO_PREALLOC as usize;

/// Allocated per entry: the agent replaces an endpoint whole, and the kernel frees the old
/// element only after an RCU grace period, so a program that found it reads one version to the
/// end. A preallocated hash puts the old element back on its free list at once, where the next
/// update may overwrite it while a program still reads it: a packet could be decided by a mix of
/// two versions (say, new rule sets stamped with the old generation). (Copying the entry in the
/// program does not help: the compiler drops the copy, and it would only narrow the window.)
#[btf_map(name = "np_ep")]
pub static EP_MAP: HashMap<EndpointKey, Endpoint, EP_MAX, NO_PREALLOC> = HashMap::new();

#[btf_map(name = "np_slot")]
pub static SLOT_MAP: Array<SlotOwner, { COUNTER_SLOTS as usize }> = Array::new();

#[btf_map(name = "np_peer")]
pub static PEER_MAP: LpmTrie<PeerData, PeerValue, PEER_MAX> = LpmTrie::new();

#[btf_map(name = "np_ports")]
pub static PORTS_MAP: LpmTrie<PortData, PortValue, PORTS_MAX> = LpmTrie::new();

/// The exact-match hashes are allocated per entry, like the tries: sized for the worst case,
/// they hold what a node's policies need.
#[btf_map(name = "np_peer_exact")]
pub static PEER_EXACT_MAP: HashMap<PeerData, PeerValue, PEER_EXACT_MAX, NO_PREALLOC> =
    HashMap::new();

#[btf_map(name = "np_port_exact")]
pub static PORT_EXACT_MAP: HashMap<PortData, PortValue, PORT_EXACT_MAX, NO_PREALLOC> =
    HashMap::new();

/// Mmapable: the kernel then aligns the values to a page, so each way is one cache line, and the
/// agent scans and expires the table through a mapping instead of a syscall per set.
const MMAPABLE: usize = aya_ebpf::bindings::BPF_F_MMAPABLE as usize;

/// The conntrack table (`crate::ct`): sized by the agent at load time.
#[btf_map(name = "np_ct")]
pub static CT_MAP: Array<CtSet, { CT_MAX / CT_WAYS }, MMAPABLE> = Array::new();

/// The conntrack table's tags, one `CtTags` per set of `np_ct`.
#[btf_map(name = "np_ct_tags")]
pub static CT_TAGS_MAP: Array<CtTags, { CT_MAX / CT_WAYS }, MMAPABLE> = Array::new();

#[btf_map(name = "np_frag")]
pub static FRAG_MAP: LruHashMap<FragKey, FragValue, FRAG_MAX> = LruHashMap::new();

#[btf_map(name = "np_cnt")]
pub static COUNTER_MAP: PerCpuHashMap<CounterKey, CounterValue, COUNTERS_MAX> =
    PerCpuHashMap::new();

#[btf_map(name = "np_cnt_slot")]
pub static SLOT_COUNTER_MAP: PerCpuArray<
    CounterValue,
    { (COUNTER_SLOTS * COUNTERS_PER_SLOT) as usize },
> = PerCpuArray::new();

#[btf_map(name = "np_rule_cnt")]
pub static RULE_COUNTER_MAP: PerCpuHashMap<RuleCounterKey, CounterValue, RULE_COUNTERS_MAX> =
    PerCpuHashMap::new();

#[btf_map(name = "np_stats")]
pub static STATS_MAP: PerCpuArray<u64, { STAT_SLOTS as usize }> = PerCpuArray::new();

#[btf_map(name = "np_events")]
pub static EVENTS_MAP: RingBuf<u8, EVENTS_BYTES> = RingBuf::new();

#[btf_map(name = "np_ev_rate")]
pub static EVENT_RATE_MAP: PerCpuArray<RateState, 1> = PerCpuArray::new();

/// Per-CPU working state of this object's programs. One entry per CPU: a TC program runs to
/// completion on its CPU without another program of ours nested in it. Not pinned: every
/// loaded object has its own, and nothing outside the programs reads it.
#[btf_map(name = "np_scratch")]
pub static SCRATCH_MAP: PerCpuArray<Scratch, 1> = PerCpuArray::new();

#[derive(Clone, Copy)]
pub struct Scratch {
    /// The general path's [`Flow`], here rather than on the stack: BPF has 512 bytes of stack
    /// for the deepest chain of calls, and a frame freed of it lets the fast path and the
    /// general path be inlined into the programs (calls and returns saved on every packet;
    /// see `crate::datapath::decide`).
    pub flow: Flow,
    /// The general path's conntrack key and a new flow's conntrack entry, for the same reason.
    pub ct_key: CtKey,
    pub ct_value: CtValue,
    /// The low 16 bits of `jiffies` when this CPU last refilled its event token bucket
    /// (`crate::events`).
    pub rate_tick: u16,
}

/// The established-flow cache of the fast path ([`crate::flowcache`]): per CPU, one value
/// holding every entry, so a lookup is the array's inlined lookup of index 0 plus an offset
/// (one entry per index would add a load of the entry's per-CPU pointer). Not pinned, like
/// `np_scratch`: an entry is valid for one tick, so a new object starts with an empty one.
#[btf_map(name = "np_flow_cache")]
pub static FLOW_CACHE_MAP: PerCpuArray<FlowCache, 1> = PerCpuArray::new();

#[btf_map(name = "np_cfg")]
pub static CONFIG_MAP: Array<Config, 1> = Array::new();

/// Only in the upgrade test's variant object: packets its programs saw, so the test can tell
/// that the changed code, not only its attachment, is what handles the traffic.
#[cfg(feature = "upgrade-variant")]
#[btf_map(name = "np_variant")]
pub static VARIANT_MAP: PerCpuArray<u64, 1> = PerCpuArray::new();

//! Per-CPU counters: per (endpoint, direction, reason), per rule, and global statistics.
use netpol_common::counters::{
    slot_counter_index, CounterKey, CounterValue, Reason, RuleCounterKey, NO_COUNTER_SLOT,
};

use crate::maps::{COUNTER_MAP, RULE_COUNTER_MAP, SLOT_COUNTER_MAP, STATS_MAP};

/// Counts a packet of the endpoint on `ifindex` whose counters are in `slot`: an indexed load
/// in the per-CPU array (the verifier inlines it), or, for an endpoint without a slot, a lookup
/// in the per-CPU hash map.
#[inline(always)]
pub fn count(slot: u32, ifindex: u32, dir: u8, reason: Reason, bytes: u32) {
    if slot != NO_COUNTER_SLOT {
        if let Some(v) = SLOT_COUNTER_MAP.get_ptr_mut(slot_counter_index(slot, dir, reason)) {
            // SAFETY: this CPU's copy; no other CPU writes it.
            unsafe {
                (*v).packets += 1;
                (*v).bytes += bytes as u64;
            }
            return;
        }
    }
    let key = CounterKey { ifindex, direction: dir, reason: reason as u8, _pad: [0; 2] };
    add(&COUNTER_MAP, &key, bytes);
}

#[inline(always)]
pub fn count_rule(rule_id: u32, bytes: u32) {
    if rule_id != 0 {
        add(&RULE_COUNTER_MAP, &RuleCounterKey { rule_id }, bytes);
    }
}

#[inline(always)]
fn add<K, const N: usize>(
    map: &aya_ebpf::btf_maps::PerCpuHashMap<K, CounterValue, N>,
    key: &K,
    bytes: u32,
) {
    // Per-CPU values: no other CPU writes this slot, plain increments are race-free.
    if let Some(v) = map.get_ptr_mut(key) {
        unsafe {
            (*v).packets += 1;
            (*v).bytes += bytes as u64;
        }
    } else {
        let _ = map.insert(key, CounterValue { packets: 1, bytes: bytes as u64 }, 0);
    }
}

#[inline(always)]
pub fn stat(slot: u32) {
    if let Some(v) = STATS_MAP.get_ptr_mut(slot) {
        unsafe { *v += 1 };
    }
}

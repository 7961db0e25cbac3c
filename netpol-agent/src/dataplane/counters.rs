//! Reading the per-CPU counters back: each CPU has its own slot, user space sums them.
use std::collections::BTreeMap;

use aya::maps::{Map, MapData, PerCpuArray, PerCpuHashMap};
use netpol_common::{
    counters::{slot_counter_index, CounterKey, CounterValue, Reason, RuleCounterKey},
    maps, DIR_EGRESS, DIR_INGRESS,
};

use super::{map_err, DataplaneError};

/// Global statistics from `np_stats`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Events written to the ring buffer.
    pub events_sent: u64,
    /// Events lost because the ring buffer was full.
    pub events_lost: u64,
    /// Events suppressed by the rate limit.
    pub events_rate_limited: u64,
    /// Packets on an attached interface without an endpoint entry.
    pub no_endpoint: u64,
    /// Conntrack entries taken over by a new flow because their set was full.
    pub ct_evicted: u64,
}

/// All counters, summed over CPUs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CounterSnapshot {
    /// Per (ifindex, direction, reason).
    pub by_reason: BTreeMap<CounterKey, CounterValue>,
    /// Per rule id.
    pub by_rule: BTreeMap<u32, CounterValue>,
    /// Global statistics.
    pub stats: Stats,
}

impl CounterSnapshot {
    /// Packets counted for one interface, direction and reason.
    pub fn packets(
        &self,
        ifindex: u32,
        direction: u8,
        reason: netpol_common::counters::Reason,
    ) -> u64 {
        let key = CounterKey { ifindex, direction, reason: reason as u8, _pad: [0; 2] };
        self.by_reason.get(&key).map_or(0, |v| v.packets)
    }
}

fn sum<'a>(values: impl Iterator<Item = &'a CounterValue>) -> CounterValue {
    values.fold(CounterValue::default(), |acc, v| CounterValue {
        packets: acc.packets + v.packets,
        bytes: acc.bytes + v.bytes,
    })
}

/// The non-zero counters of one endpoint's block in `np_cnt_slot`, summed over CPUs, keyed as
/// in `np_cnt` (by `ifindex`).
pub(super) fn read_slot(
    array: &PerCpuArray<&MapData, CounterValue>,
    ifindex: u32,
    slot: u32,
) -> Result<Vec<(CounterKey, CounterValue)>, DataplaneError> {
    let mut out = Vec::new();
    for direction in [DIR_INGRESS, DIR_EGRESS] {
        for reason in Reason::ALL {
            let index = slot_counter_index(slot, direction, reason);
            let values = array.get(&index, 0).map_err(map_err(maps::SLOT_COUNTERS, "get"))?;
            let v = sum(values.iter());
            if v != CounterValue::default() {
                out.push((
                    CounterKey { ifindex, direction, reason: reason as u8, _pad: [0; 2] },
                    v,
                ));
            }
        }
    }
    Ok(out)
}

/// Sums every counter: the per-CPU hash `np_cnt`, plus the block in `np_cnt_slot` of each
/// (ifindex, counter slot) in `slots`.
pub(super) fn read(
    counters: &Map,
    slot_counters: &Map,
    slots: impl IntoIterator<Item = (u32, u32)>,
    rules: &Map,
    stats: &Map,
) -> Result<CounterSnapshot, DataplaneError> {
    let mut snap = CounterSnapshot::default();
    let m: PerCpuHashMap<&MapData, CounterKey, CounterValue> =
        counters.try_into().map_err(map_err(maps::COUNTERS, "open"))?;
    for item in m.iter() {
        let (k, v) = item.map_err(map_err(maps::COUNTERS, "iterate"))?;
        snap.by_reason.insert(k, sum(v.iter()));
    }
    let a: PerCpuArray<&MapData, CounterValue> =
        slot_counters.try_into().map_err(map_err(maps::SLOT_COUNTERS, "open"))?;
    for (ifindex, slot) in slots {
        for (k, v) in read_slot(&a, ifindex, slot)? {
            let e = snap.by_reason.entry(k).or_default();
            e.packets += v.packets;
            e.bytes += v.bytes;
        }
    }
    let m: PerCpuHashMap<&MapData, RuleCounterKey, CounterValue> =
        rules.try_into().map_err(map_err(maps::RULE_COUNTERS, "open"))?;
    for item in m.iter() {
        let (k, v) = item.map_err(map_err(maps::RULE_COUNTERS, "iterate"))?;
        snap.by_rule.insert(k.rule_id, sum(v.iter()));
    }
    let a: PerCpuArray<&MapData, u64> = stats.try_into().map_err(map_err(maps::STATS, "open"))?;
    let slot = |i: u32| -> Result<u64, DataplaneError> {
        Ok(a.get(&i, 0).map_err(map_err(maps::STATS, "get"))?.iter().sum())
    };
    snap.stats = Stats {
        events_sent: slot(netpol_common::counters::STAT_EVENTS_SENT)?,
        events_lost: slot(netpol_common::counters::STAT_EVENTS_LOST)?,
        events_rate_limited: slot(netpol_common::counters::STAT_EVENTS_RATE_LIMITED)?,
        no_endpoint: slot(netpol_common::counters::STAT_NO_ENDPOINT)?,
        ct_evicted: slot(netpol_common::counters::STAT_CT_EVICTED)?,
    };
    Ok(snap)
}

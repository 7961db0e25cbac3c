//! Conntrack dump and garbage collection. The programs create and refresh entries; the agent
//! expires them. Deleting races with the datapath refreshing the same entry, so GC is two-phase:
//! [`scan`] records the `last_seen_ns` of every expired entry, [`sweep`] re-reads each one and
//! deletes it only if that time did not move (a packet in between keeps the flow).
use std::collections::BTreeSet;

use aya::maps::{HashMap, Map, MapData, MapError};
use netpol_common::{
    ct::{CtKey, CtValue, Timeouts},
    maps,
};

use super::{map_err, DataplaneError};

/// An entry found expired by [`scan`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Expired {
    /// The flow.
    pub key: CtKey,
    /// Its last-seen time when scanned.
    pub last_seen_ns: u64,
}

/// What one GC pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GcStats {
    /// Entries present at the scan.
    pub scanned: u64,
    /// Entries deleted.
    pub deleted: u64,
    /// Expired entries kept because a packet refreshed them between scan and sweep.
    pub refreshed: u64,
}

/// The current `CLOCK_MONOTONIC` time in nanoseconds: the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: ts is a valid timespec to write into.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

type Ct<'a> = HashMap<&'a MapData, CtKey, CtValue>;

fn open(map: &Map) -> Result<Ct<'_>, DataplaneError> {
    map.try_into().map_err(map_err(maps::CT, "open"))
}

/// Every entry of the conntrack map.
pub fn dump(map: &Map) -> Result<Vec<(CtKey, CtValue)>, DataplaneError> {
    let ct = open(map)?;
    let mut out = Vec::new();
    for item in ct.iter() {
        match item {
            Ok(kv) => out.push(kv),
            // An entry evicted or deleted while iterating.
            Err(MapError::KeyNotFound) => continue,
            Err(e) => return Err(map_err(maps::CT, "iterate")(e)),
        }
    }
    Ok(out)
}

/// Phase one: entries idle for longer than their timeout at `now_ns`, and, when `enforced` is
/// given, every entry of an interface not in it (released: its pod is gone, and a later pod on
/// a reused ifindex must not find its flows).
pub fn scan(
    map: &Map,
    now_ns: u64,
    timeouts: &Timeouts,
    enforced: Option<&BTreeSet<u32>>,
) -> Result<(u64, Vec<Expired>), DataplaneError> {
    let entries = dump(map)?;
    let expired = entries
        .iter()
        .filter(|(k, v)| {
            let idle = now_ns.saturating_sub(v.last_seen_ns);
            idle > timeouts.for_value(k.proto, v).saturating_mul(1_000_000_000)
                || enforced.is_some_and(|e| !e.contains(&k.ifindex))
        })
        .map(|(k, v)| Expired { key: *k, last_seen_ns: v.last_seen_ns })
        .collect();
    Ok((entries.len() as u64, expired))
}

/// Phase two: deletes the scanned entries whose last-seen time is unchanged.
pub fn sweep(map: &mut Map, expired: &[Expired]) -> Result<GcStats, DataplaneError> {
    let mut ct: HashMap<&mut MapData, CtKey, CtValue> =
        map.try_into().map_err(map_err(maps::CT, "open"))?;
    let mut stats = GcStats::default();
    for e in expired {
        match ct.get(&e.key, 0) {
            Ok(v) if v.last_seen_ns == e.last_seen_ns => match ct.remove(&e.key) {
                Ok(()) => stats.deleted += 1,
                // Evicted by the LRU in the meantime: gone either way.
                Err(err) if super::is_not_found(&err) => {}
                Err(err) => return Err(map_err(maps::CT, "remove")(err)),
            },
            Ok(_) => stats.refreshed += 1,
            Err(err) if super::is_not_found(&err) => {}
            Err(err) => return Err(map_err(maps::CT, "get")(err)),
        }
    }
    Ok(stats)
}

/// Deletes every entry (tests; `uninstall`).
pub fn clear(map: &mut Map) -> Result<u64, DataplaneError> {
    let keys: Vec<CtKey> = dump(map)?.into_iter().map(|(k, _)| k).collect();
    let mut ct: HashMap<&mut MapData, CtKey, CtValue> =
        map.try_into().map_err(map_err(maps::CT, "open"))?;
    let mut n = 0;
    for k in keys {
        if ct.remove(&k).is_ok() {
            n += 1;
        }
    }
    Ok(n)
}

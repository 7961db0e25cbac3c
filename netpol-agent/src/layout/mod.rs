//! The desired contents of the kernel's policy maps, with kernel ids, and the user-space copy of
//! the kernel's lookup.
//!
//! [`Layout`] turns a [`Compiled`] (content hashes) into [`KernelMaps`] (u32 ids, map keys and
//! values exactly as written to the kernel). [`KernelMaps::diff`] gives the dataplane what to
//! write. [`lookup`] and [`evaluate`] do the kernel's two-stage longest-prefix lookup over
//! [`KernelMaps`], so `explain` and the tests see what the kernel would decide.

mod ids;
mod lookup;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use netpol_common::ep::{Endpoint, EP_FLAG_AUDIT};
use netpol_common::policy::{
    skips, PeerData, PeerValue, PortData, PortValue, PEER_FULL_BITS, PEER_SET_BITS, PORT_FULL_BITS,
};

pub use ids::IdAllocator;
pub use lookup::{evaluate, lookup};

use crate::compile::{Compiled, RuleOrigin};
use crate::model::PodRef;

/// Errors of [`Layout::update`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    /// All 2^32 - 1 ids of one kind are in use.
    #[error("no free {what} id left")]
    IdsExhausted {
        /// `"peer set"` or `"port set"`.
        what: &'static str,
    },
}

/// A local pod's entry: addresses (to find its interface) and the endpoint map value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointEntry {
    /// The pod's addresses.
    pub ips: Vec<IpAddr>,
    /// The value for the endpoint map; `generation` is 0 here, the dataplane sets it.
    pub value: Endpoint,
}

/// The complete desired contents of the policy maps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelMaps {
    /// Stage 1: (prefix length, key data) → value. The dataplane writes full-length entries to
    /// the `PEER_EXACT` hash and the others to the `PEER` trie.
    pub peers: BTreeMap<(u32, PeerData), PeerValue>,
    /// Stage 2: (prefix length, key data) → value. The dataplane writes full-length entries to
    /// the `PORT_EXACT` hash and the others to the `PORTS` trie.
    pub ports: BTreeMap<(u32, PortData), PortValue>,
    /// Endpoint values by pod.
    pub endpoints: BTreeMap<PodRef, EndpointEntry>,
    /// Rule id → origin.
    pub rules: BTreeMap<u32, RuleOrigin>,
}

/// Changes to one map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapDelta<K, V> {
    /// Keys to insert or overwrite.
    pub upserts: Vec<(K, V)>,
    /// Keys to delete.
    pub deletes: Vec<K>,
}

impl<K, V> Default for MapDelta<K, V> {
    fn default() -> Self {
        MapDelta { upserts: Vec::new(), deletes: Vec::new() }
    }
}

impl<K, V> MapDelta<K, V> {
    /// Whether nothing changes.
    pub fn is_empty(&self) -> bool {
        self.upserts.is_empty() && self.deletes.is_empty()
    }
}

fn delta<K: Ord + Clone, V: PartialEq + Clone>(
    old: &BTreeMap<K, V>,
    new: &BTreeMap<K, V>,
) -> MapDelta<K, V> {
    MapDelta {
        upserts: new
            .iter()
            .filter(|(k, v)| old.get(*k) != Some(*v))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        deletes: old.keys().filter(|k| !new.contains_key(*k)).cloned().collect(),
    }
}

/// What to write to go from one [`KernelMaps`] to another. Apply in this order so no packet
/// sees a half-written set: upsert `ports`, upsert `peers`, upsert/delete `endpoints`, then
/// delete `peers` and `ports`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapDiff {
    /// `PEER` changes.
    pub peers: MapDelta<(u32, PeerData), PeerValue>,
    /// `PORTS` changes.
    pub ports: MapDelta<(u32, PortData), PortValue>,
    /// Endpoint changes.
    pub endpoints: MapDelta<PodRef, EndpointEntry>,
    /// Rule-origin changes (user-space only).
    pub rules: MapDelta<u32, RuleOrigin>,
}

impl MapDiff {
    /// Whether nothing changes.
    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
            && self.ports.is_empty()
            && self.endpoints.is_empty()
            && self.rules.is_empty()
    }
}

impl KernelMaps {
    /// The writes that turn `old` into `new`.
    pub fn diff(old: &KernelMaps, new: &KernelMaps) -> MapDiff {
        MapDiff {
            peers: delta(&old.peers, &new.peers),
            ports: delta(&old.ports, &new.ports),
            endpoints: delta(&old.endpoints, &new.endpoints),
            rules: delta(&old.rules, &new.rules),
        }
    }
}

/// Kernel id allocation across updates.
#[derive(Clone, Debug, Default)]
pub struct Layout {
    peer_ids: IdAllocator,
    port_ids: IdAllocator,
}

impl Layout {
    /// A layout with no ids allocated.
    pub fn new() -> Self {
        Layout::default()
    }

    /// The kernel id of a peer set, if allocated.
    pub fn peer_set_id(&self, hash: u64) -> Option<u32> {
        self.peer_ids.get(hash)
    }

    /// The kernel id of a port set, if allocated.
    pub fn port_set_id(&self, hash: u64) -> Option<u32> {
        self.port_ids.get(hash)
    }

    /// Allocates ids for `compiled` (keeping ids of unchanged sets) and lays out the maps.
    pub fn update(&mut self, compiled: &Compiled) -> Result<KernelMaps, LayoutError> {
        self.peer_ids
            .update(&compiled.peer_sets.keys().copied().collect::<BTreeSet<_>>(), "peer set")?;
        self.port_ids
            .update(&compiled.port_sets.keys().copied().collect::<BTreeSet<_>>(), "port set")?;
        let mut maps = KernelMaps { rules: compiled.rules.clone(), ..KernelMaps::default() };
        let mut port_skips = HashMap::new();
        for (hash, set) in &compiled.port_sets {
            let Some(portset_id) = self.port_ids.get(*hash) else {
                continue;
            };
            port_skips.insert(*hash, skips(set.entries.keys().map(|k| k.bits), PORT_FULL_BITS));
            for (k, r) in &set.entries {
                let data =
                    PortData { portset_id, proto: k.proto, port: k.port.to_be_bytes(), _pad: 0 };
                let value = PortValue { rule_id: r.rule_id, action: r.action, _pad: [0; 3] };
                maps.ports.insert((k.bits, data), value);
            }
        }
        // Once per set, not per endpoint that uses it: many endpoints share a set.
        let mut peer_skips = HashMap::new();
        for (hash, set) in &compiled.peer_sets {
            let Some(set_id) = self.peer_ids.get(*hash) else {
                continue;
            };
            // Entries are keyed by address bits; the skips, like the maps, count the full
            // address as full length.
            let lens = set.entries.keys().map(|(_, bits)| PEER_SET_BITS + *bits);
            peer_skips.insert(*hash, skips(lens, PEER_FULL_BITS));
            for ((base, bits), ps) in &set.entries {
                let Some(portset_id) = self.port_ids.get(*ps) else {
                    continue;
                };
                let data = PeerData { set_id, addr: base.to_be_bytes() };
                let flags = port_skips.get(ps).copied().unwrap_or(0);
                maps.peers.insert((PEER_SET_BITS + bits, data), PeerValue { portset_id, flags });
            }
        }
        for (pod, ep) in &compiled.endpoints {
            let mut value =
                Endpoint { flags: if ep.audit { EP_FLAG_AUDIT } else { 0 }, ..Endpoint::default() };
            for ((dir, tier), hash) in &ep.sets {
                if let Some(id) = self.peer_ids.get(*hash) {
                    value.set_tier(dir.as_u8(), *tier, id);
                    let skips = peer_skips.get(hash).copied().unwrap_or(0);
                    value.set_peer_skips(dir.as_u8(), *tier, skips);
                }
            }
            maps.endpoints.insert(pod.clone(), EndpointEntry { ips: ep.ips.clone(), value });
        }
        Ok(maps)
    }
}

#[cfg(test)]
mod tests;

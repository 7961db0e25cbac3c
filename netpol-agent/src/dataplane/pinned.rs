//! The pinned maps opened from bpffs by the CLI, without loading any program: endpoints,
//! counters, conntrack, fill levels, and the kernel's policy lookup against the live maps.
use std::path::{Path, PathBuf};

use aya::maps::{lpm_trie::Key, HashMap, LpmTrie, Map, MapData, MapError, PerCpuHashMap};
use netpol_common::{
    counters::{CounterKey, CounterValue, RuleCounterKey},
    ct::{CtKey, CtValue, FragKey, FragValue},
    ep::{Endpoint, EndpointKey, SET_NONE},
    maps,
    policy::{
        decide, Decision, PeerData, PeerValue, PortData, PortValue, TierLookup, PEER_FULL_BITS,
        PORT_FULL_BITS, SKIP_EXACT, SKIP_TRIE,
    },
};

use super::CounterSnapshot;

/// Errors of reading the pinned maps.
#[derive(Debug, thiserror::Error)]
pub enum PinnedError {
    /// The pin directory does not exist.
    #[error("no netpol maps pinned at {path}; is the agent running?")]
    NotPinned {
        /// The directory.
        path: PathBuf,
    },
    /// Opening a pinned map failed (EPERM without root).
    #[error("opening pinned map {path} (are you root?)")]
    Open {
        /// The pin.
        path: PathBuf,
        /// Cause.
        #[source]
        source: Box<MapError>,
    },
    /// A map operation failed.
    #[error("map {name}: {op}")]
    Map {
        /// Map name.
        name: &'static str,
        /// What was attempted.
        op: &'static str,
        /// Cause.
        #[source]
        source: Box<MapError>,
    },
    /// Reading counters failed.
    #[error("reading counters")]
    Counters(#[source] Box<super::DataplaneError>),
    /// Reading the conntrack table failed.
    #[error("reading the conntrack table")]
    Conntrack(#[source] Box<super::DataplaneError>),
}

type Result<T, E = PinnedError> = std::result::Result<T, E>;

fn map_err(name: &'static str, op: &'static str) -> impl FnOnce(MapError) -> PinnedError {
    move |e| PinnedError::Map { name, op, source: Box::new(e) }
}

/// Fill level of one map.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct MapFill {
    /// Map name.
    pub name: &'static str,
    /// Entries now (`None`: not countable, e.g. arrays and the ring buffer).
    pub entries: Option<u64>,
    /// Capacity from the kernel's map info.
    pub max_entries: u32,
}

/// The pinned maps of one layout version.
pub struct PinnedMaps {
    dir: PathBuf,
}

impl PinnedMaps {
    /// Checks that `dir` holds pinned maps (the endpoint map at least).
    pub fn open(dir: &Path) -> Result<PinnedMaps> {
        if !dir.join(maps::EP).exists() {
            return Err(PinnedError::NotPinned { path: dir.to_owned() });
        }
        Ok(PinnedMaps { dir: dir.to_owned() })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn data(&self, name: &'static str) -> Result<MapData> {
        let path = self.dir.join(name);
        MapData::from_pin(&path).map_err(|e| PinnedError::Open { path, source: Box::new(e) })
    }

    fn map(&self, name: &'static str) -> Result<Map> {
        Map::from_map_data(self.data(name)?).map_err(map_err(name, "open"))
    }

    /// Every endpoint entry, by ifindex.
    pub fn endpoints(&self) -> Result<Vec<(u32, Endpoint)>> {
        let m: HashMap<MapData, EndpointKey, Endpoint> =
            self.map(maps::EP)?.try_into().map_err(map_err(maps::EP, "open"))?;
        let mut out = Vec::new();
        for item in m.iter() {
            match item {
                Ok((k, v)) => out.push((k.ifindex, v)),
                Err(MapError::KeyNotFound) => continue,
                Err(e) => return Err(map_err(maps::EP, "iterate")(e)),
            }
        }
        out.sort_by_key(|(i, _)| *i);
        Ok(out)
    }

    /// Per-CPU counters, summed: the counter slots of the endpoints in `np_ep`, and `np_cnt`.
    pub fn counters(&self) -> Result<CounterSnapshot> {
        let slots = self.endpoints()?.into_iter().map(|(i, ep)| (i, ep.counter_slot));
        super::counters::read(
            &self.map(maps::COUNTERS)?,
            &self.map(maps::SLOT_COUNTERS)?,
            slots.filter(|(_, s)| *s != netpol_common::counters::NO_COUNTER_SLOT),
            &self.map(maps::RULE_COUNTERS)?,
            &self.map(maps::STATS)?,
        )
        .map_err(|e| PinnedError::Counters(Box::new(e)))
    }

    /// Every conntrack entry.
    pub fn conntrack(&self) -> Result<Vec<(CtKey, CtValue)>> {
        let table = super::conntrack::Table::open(&self.map(maps::CT)?, &self.map(maps::CT_TAGS)?)
            .map_err(|e| PinnedError::Conntrack(Box::new(e)))?;
        Ok(super::conntrack::dump(&table))
    }

    /// Entries and capacity of every pinned map.
    pub fn fill(&self) -> Result<Vec<MapFill>> {
        let mut out = Vec::new();
        for name in maps::ALL {
            if !self.dir.join(name).exists() {
                continue;
            }
            let data = self.data(name)?;
            let mut max_entries = data.info().map_err(map_err(name, "info"))?.max_entries();
            if name == maps::CT {
                // Sets of ways: the capacity in flows.
                max_entries = max_entries.saturating_mul(netpol_common::ct::CT_WAYS as u32);
            }
            let map = Map::from_map_data(data).map_err(map_err(name, "open"))?;
            let entries = match name {
                maps::EP => Some(count_hash::<EndpointKey, Endpoint>(map, name)?),
                maps::CT => Some(self.conntrack()?.len() as u64),
                maps::FRAG => Some(count_hash::<FragKey, FragValue>(map, name)?),
                maps::PEER => Some(count_lpm::<PeerData, PeerValue>(map, name)?),
                maps::PEER_EXACT => Some(count_hash::<PeerData, PeerValue>(map, name)?),
                maps::PORTS => Some(count_lpm::<PortData, PortValue>(map, name)?),
                maps::PORT_EXACT => Some(count_hash::<PortData, PortValue>(map, name)?),
                maps::COUNTERS => Some(count_percpu::<CounterKey>(map, name)?),
                maps::RULE_COUNTERS => Some(count_percpu::<RuleCounterKey>(map, name)?),
                _ => None,
            };
            out.push(MapFill { name, entries, max_entries });
        }
        Ok(out)
    }

    /// Decides one direction for the endpoint value `ep` against the live policy maps, exactly
    /// as the programs do: per tier the peer and then the port, each in its exact-match hash
    /// and on a miss its trie (`np_peer_exact`/`np_peer`, `np_port_exact`/`np_ports`), as the
    /// sets' skip bits call for, combined with [`decide`]. `remote` is IPv4-mapped for IPv4.
    pub fn evaluate(
        &self,
        ep: &Endpoint,
        dir: u8,
        remote: [u8; 16],
        proto: u8,
        port: u16,
    ) -> Result<Decision> {
        let peers = Stage::<PeerData, PeerValue>::open(self, maps::PEER_EXACT, maps::PEER)?;
        let ports = Stage::<PortData, PortValue>::open(self, maps::PORT_EXACT, maps::PORTS)?;
        let mut tiers = [TierLookup::NoSet; 3];
        for ((slot, set_id), skips) in tiers.iter_mut().zip(ep.sets(dir)).zip(ep.peer_skips(dir)) {
            if set_id == SET_NONE {
                continue;
            }
            let data = PeerData { set_id, addr: remote };
            *slot = match peers.get(data, PEER_FULL_BITS, skips)? {
                None => TierLookup::Miss,
                Some(peer) => {
                    let data = PortData {
                        portset_id: peer.portset_id,
                        proto,
                        port: port.to_be_bytes(),
                        _pad: 0,
                    };
                    ports
                        .get(data, PORT_FULL_BITS, peer.flags)?
                        .map_or(TierLookup::Miss, TierLookup::Hit)
                }
            };
        }
        Ok(decide(tiers[0], tiers[1], tiers[2]))
    }

    /// The endpoint entry of `ifindex`.
    pub fn endpoint(&self, ifindex: u32) -> Result<Option<Endpoint>> {
        let m: HashMap<MapData, EndpointKey, Endpoint> =
            self.map(maps::EP)?.try_into().map_err(map_err(maps::EP, "open"))?;
        match m.get(&EndpointKey { ifindex }, 0) {
            Ok(v) => Ok(Some(v)),
            Err(e) if super::is_not_found(&e) => Ok(None),
            Err(e) => Err(map_err(maps::EP, "get")(e)),
        }
    }
}

/// One stage of the policy lookup: its exact-match hash and its trie.
struct Stage<K, V> {
    exact: (&'static str, HashMap<MapData, K, V>),
    trie: (&'static str, LpmTrie<MapData, K, V>),
}

impl<K: aya::Pod, V: aya::Pod> Stage<K, V> {
    fn open(maps: &PinnedMaps, exact: &'static str, trie: &'static str) -> Result<Self> {
        Ok(Stage {
            exact: (exact, maps.map(exact)?.try_into().map_err(map_err(exact, "open"))?),
            trie: (trie, maps.map(trie)?.try_into().map_err(map_err(trie, "open"))?),
        })
    }

    /// The kernel's lookup of a full-length key: the hash, then on a miss the trie, each only
    /// if the set's skip bits allow it.
    fn get(&self, data: K, full_bits: u32, skips: u32) -> Result<Option<V>> {
        let found = |r: std::result::Result<V, MapError>, name| match r {
            Ok(v) => Ok(Some(v)),
            Err(e) if super::is_not_found(&e) => Ok(None),
            Err(e) => Err(map_err(name, "lookup")(e)),
        };
        if skips & SKIP_EXACT == 0 {
            if let Some(v) = found(self.exact.1.get(&data, 0), self.exact.0)? {
                return Ok(Some(v));
            }
        }
        if skips & SKIP_TRIE == 0 {
            return found(self.trie.1.get(&Key::new(full_bits, data), 0), self.trie.0);
        }
        Ok(None)
    }
}

fn count_hash<K: aya::Pod, V: aya::Pod>(map: Map, name: &'static str) -> Result<u64> {
    let m: HashMap<MapData, K, V> = map.try_into().map_err(map_err(name, "open"))?;
    Ok(m.keys().filter(|k| k.is_ok()).count() as u64)
}

fn count_lpm<K: aya::Pod, V: aya::Pod>(map: Map, name: &'static str) -> Result<u64> {
    let m: LpmTrie<MapData, K, V> = map.try_into().map_err(map_err(name, "open"))?;
    Ok(m.keys().filter(|k| k.is_ok()).count() as u64)
}

fn count_percpu<K: aya::Pod>(map: Map, name: &'static str) -> Result<u64> {
    let m: PerCpuHashMap<MapData, K, CounterValue> =
        map.try_into().map_err(map_err(name, "open"))?;
    Ok(m.keys().filter(|k| k.is_ok()).count() as u64)
}

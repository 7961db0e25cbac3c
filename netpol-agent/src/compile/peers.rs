//! Stage-1 content: turning "these address ranges allow these ports" into LPM entries.
//!
//! An LPM trie returns only the longest matching prefix, so the value stored at a prefix K must
//! be correct for exactly the addresses whose longest match is K. Keys are every range and every
//! hole (`except`) of every item; value(K) = union of the ports of all items that contain K and
//! have no hole containing K. A hole that no other item covers still gets its key, pointing at
//! an empty port set, so that it does not fall through to the surrounding block.

use std::collections::{BTreeMap, HashMap};

use super::ports::{PortKey, PortSet};
use crate::model::mask;

/// A prefix in the 128-bit key space (IPv4 as IPv4-mapped): `(base, bits)`.
pub type Prefix = (u128, u32);

/// A peer set (rule set): the stage-1 entries of one endpoint, direction and tier.
/// Content-addressed: pods selected by the same policies share one.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct PeerSet {
    /// Address prefix (`(base, bits)`, bits 0..=128 of the address only) → port-set hash.
    pub entries: BTreeMap<Prefix, u64>,
}

impl PeerSet {
    /// Content hash (stable across runs and machines).
    pub fn content_hash(&self) -> u64 {
        let mut buf = Vec::with_capacity(self.entries.len() * 28);
        for ((base, bits), ps) in &self.entries {
            buf.extend_from_slice(&base.to_le_bytes());
            buf.extend_from_slice(&bits.to_le_bytes());
            buf.extend_from_slice(&ps.to_le_bytes());
        }
        xxhash_rust::xxh3::xxh3_64(&buf)
    }
}

/// "Addresses in `range` minus `holes` allow the port entries `entries`".
#[derive(Clone, Debug)]
pub struct Item {
    /// The covered range.
    pub range: Prefix,
    /// Excluded sub-ranges.
    pub holes: Vec<Prefix>,
    /// Index into the entry lists passed to [`build`].
    pub entries: usize,
}

/// Whether prefix `outer` contains prefix `inner`.
fn contains(outer: Prefix, inner: Prefix) -> bool {
    outer.1 <= inner.1 && mask(inner.0, outer.1) == outer.0
}

/// Builds the peer set of `items` (port entries in `entries`), adding every port set it needs to
/// `port_sets`. Cost: O(keys × distinct range lengths × log items), not O(keys × items), so
/// thousands of peer pod addresses stay cheap.
pub fn build(
    items: &[Item],
    entries: &[Vec<(PortKey, u32)>],
    port_sets: &mut BTreeMap<u64, PortSet>,
) -> PeerSet {
    build_with(items, entries, port_sets, |found| {
        let mut ports = PortSet::default();
        for &(k, rule) in found {
            ports.insert(k, rule);
        }
        ports
    })
}

/// [`build`] with entries of any kind: `finish` turns the entries of every item that covers a
/// key into that key's port set (the Admin and Baseline tiers resolve priorities there).
pub fn build_with<E: Copy>(
    items: &[Item],
    entries: &[Vec<(PortKey, E)>],
    port_sets: &mut BTreeMap<u64, PortSet>,
    finish: impl Fn(&[(PortKey, E)]) -> PortSet,
) -> PeerSet {
    // Sorted vectors rather than ordered sets and hash maps: built once, then only searched.
    // `ranges` is ordered by prefix, then item, so candidates come in item order.
    let mut ranges: Vec<(Prefix, usize)> =
        items.iter().enumerate().map(|(i, item)| (item.range, i)).collect();
    ranges.sort_unstable();
    let mut keys: Vec<Prefix> = ranges
        .iter()
        .map(|&(range, _)| range)
        .chain(items.iter().flat_map(|item| item.holes.iter().copied()))
        .collect();
    keys.sort_unstable();
    keys.dedup();
    let mut lengths: Vec<u32> = items.iter().map(|item| item.range.1).collect();
    lengths.sort_unstable();
    lengths.dedup();

    // Most keys (the pod addresses of one rule) are covered by the same entry lists: build and
    // hash each distinct combination's port set once. `finish` sees the entries in the same
    // order either way, so the result is the same.
    let mut memo: HashMap<Vec<usize>, u64> = HashMap::new();
    let mut last: Option<(Vec<usize>, u64)> = None;
    let mut covering: Vec<usize> = Vec::new();
    let mut out: Vec<(Prefix, u64)> = Vec::with_capacity(keys.len());
    for &key in &keys {
        covering.clear();
        for &len in lengths.iter().take_while(|&&len| len <= key.1) {
            let want = (mask(key.0, len), len);
            let start = ranges.partition_point(|&(range, _)| range < want);
            for &(_, i) in ranges[start..].iter().take_while(|&&(range, _)| range == want) {
                let item = &items[i];
                if !item.holes.iter().any(|&h| contains(h, key)) {
                    covering.push(item.entries);
                }
            }
        }
        let hash = match &last {
            Some((c, hash)) if *c == covering => *hash,
            _ => {
                let hash = match memo.get(&covering) {
                    Some(&hash) => hash,
                    None => {
                        let found: Vec<(PortKey, E)> = covering
                            .iter()
                            .flat_map(|&e| entries.get(e).map(Vec::as_slice).unwrap_or_default())
                            .copied()
                            .collect();
                        let ports = finish(&found);
                        let hash = ports.content_hash();
                        port_sets.entry(hash).or_insert(ports);
                        memo.insert(covering.clone(), hash);
                        hash
                    }
                };
                last = Some((covering.clone(), hash));
                hash
            }
        };
        out.push((key, hash));
    }
    // Already sorted: the map is built in bulk.
    PeerSet { entries: out.into_iter().collect() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Cidr;

    fn p(s: &str) -> Prefix {
        s.parse::<Cidr>().unwrap().key()
    }

    /// Longest-prefix lookup over the built set, as the kernel does it.
    fn lookup<'a>(
        set: &PeerSet,
        sets: &'a BTreeMap<u64, PortSet>,
        ip: &str,
    ) -> Option<&'a PortSet> {
        let key = crate::model::key_of(ip.parse().unwrap());
        (0..=128u32)
            .rev()
            .find_map(|bits| set.entries.get(&(mask(key, bits), bits)))
            .map(|h| &sets[h])
    }

    #[test]
    fn except_hole_falls_back_to_other_items() {
        let e80 = vec![(PortKey::new(56, 6, 80), 1)];
        let e443 = vec![(PortKey::new(56, 6, 443), 2)];
        let items = [
            Item { range: p("10.0.0.0/16"), holes: vec![p("10.0.1.0/24")], entries: 0 },
            Item { range: p("10.0.0.0/8"), holes: vec![], entries: 1 },
            Item { range: p("192.168.0.0/16"), holes: vec![p("192.168.5.0/24")], entries: 0 },
        ];
        let mut sets = BTreeMap::new();
        let set = build(&items, &[e80, e443], &mut sets);
        let ports = |ip| {
            lookup(&set, &sets, ip).map(|s| s.entries.keys().map(|k| k.port).collect::<Vec<_>>())
        };
        assert_eq!(ports("10.0.2.1"), Some(vec![80, 443]));
        assert_eq!(ports("10.0.1.1"), Some(vec![443]), "except still allowed by the /8 rule");
        assert_eq!(ports("10.9.1.1"), Some(vec![443]));
        assert_eq!(ports("192.168.5.1"), Some(vec![]), "hole with nothing else: empty port set");
        assert_eq!(ports("192.168.6.1"), Some(vec![80]));
        assert_eq!(ports("11.0.0.1"), None);
    }

    #[test]
    fn single_addresses_inside_blocks_get_the_union() {
        let items = [
            Item { range: p("10.0.0.0/8"), holes: vec![p("10.0.0.0/24")], entries: 0 },
            Item { range: p("10.0.0.5/32"), holes: vec![], entries: 1 },
        ];
        let mut sets = BTreeMap::new();
        let set = build(
            &items,
            &[vec![(PortKey::new(56, 6, 80), 1)], vec![(PortKey::ANY, 2)]],
            &mut sets,
        );
        let s = lookup(&set, &sets, "10.0.0.5").unwrap();
        assert_eq!(s.entries.len(), 1, "pod inside the except gets only its own rule");
        let s = lookup(&set, &sets, "10.0.0.6").unwrap();
        assert!(s.entries.is_empty());
    }
}

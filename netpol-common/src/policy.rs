//! The policy maps: a two-stage longest-prefix-match lookup that decides any packet with a fixed
//! number of lookups, however many policies, rules, peers or ports exist.
//!
//! Stage 1: (set id, remote address) → port-set id, by longest prefix. The value at an address is
//! the union of the ports of every rule whose peers contain that address, precomputed by the
//! compiler (a longest-prefix match returns only the longest match, so shorter prefixes cannot
//! "fall through"; `except` holes get their own entries).
//!
//! Stage 2: (port-set id, protocol, port) → action and rule id, by longest prefix. Any-port and
//! any-protocol entries are short prefixes, `endPort` ranges are decomposed into port prefixes.
//!
//! Each stage keeps its full-length entries (a pod's address; one protocol and port: most of
//! them) in an exact-match hash ([`crate::maps::PEER_EXACT`], [`crate::maps::PORT_EXACT`]) and
//! the shorter ones in an LPM trie ([`crate::maps::PEER`], [`crate::maps::PORTS`]). A full
//! match is the longest there is, so a hit in the hash is the answer; only on a miss is the trie
//! consulted, and each map only if the set has entries there ([`SKIP_EXACT`], [`SKIP_TRIE`]). A
//! hash lookup costs the same however many entries the map holds, where a trie walk visits a
//! node per branching bit on the way, more as the trie grows (and each a cache miss for a new
//! flow): in the datapath benchmark the hashes made a new allowed flow about 12 % cheaper.

/// Traffic is allowed; no lower tier is consulted.
pub const ACTION_ALLOW: u8 = 1;
/// Traffic is denied; no lower tier is consulted.
pub const ACTION_DENY: u8 = 2;
/// Skip the lower rules of this tier and let the next tier decide: after the Admin tier the
/// NetworkPolicy tier (then Baseline), after the Baseline tier the default allow. Lower rules are
/// skipped by the compiler's priority resolution, so in the kernel Pass is a decided non-match.
pub const ACTION_PASS: u8 = 3;

/// Rule id used when no rule decided (default allow or default deny).
pub const RULE_NONE: u32 = 0;

/// Key data of stage 1, [`crate::maps::PEER`] (trie) and [`crate::maps::PEER_EXACT`] (hash, full
/// length). A trie prefix always covers all of `set_id` (32 bits) plus the significant bits of
/// `addr` (IPv4 as IPv4-mapped IPv6, see [`crate::v4_mapped`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerData {
    /// Rule-set id, as referenced by [`crate::ep::Endpoint`].
    pub set_id: u32,
    /// Remote address: source for ingress, destination for egress.
    pub addr: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<PeerData>() == 20);

/// Bits of a [`PeerData`] prefix taken by the set id.
pub const PEER_SET_BITS: u32 = 32;
/// Prefix length of a full-length peer lookup key.
pub const PEER_FULL_BITS: u32 = PEER_SET_BITS + 128;

/// Lookup skip bit of a set: it has no full-length entries, so its exact-match hash is not
/// consulted. Port sets carry their skip bits in [`PeerValue::flags`], peer sets in
/// [`crate::ep::Endpoint::flags`] (see [`crate::ep::Endpoint::peer_skips`]).
pub const SKIP_EXACT: u32 = 1;
/// Lookup skip bit of a set: it has no entries shorter than a full key, so its trie is not
/// consulted.
pub const SKIP_TRIE: u32 = 2;

/// The skip bits of a set whose entries have the prefix lengths `prefix_lens`, `full` being the
/// full length. No bit (the default of every value) consults both maps, which is always right,
/// only slower: a set's bits can only be wrong by saying it lacks entries it has.
pub fn skips(prefix_lens: impl IntoIterator<Item = u32>, full: u32) -> u32 {
    let (mut exact, mut shorter) = (false, false);
    for bits in prefix_lens {
        if bits == full {
            exact = true;
        } else {
            shorter = true;
        }
    }
    (if exact { 0 } else { SKIP_EXACT }) | (if shorter { 0 } else { SKIP_TRIE })
}

/// Value of [`crate::maps::PEER`] and [`crate::maps::PEER_EXACT`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PeerValue {
    /// Port-set id to look up in stage 2.
    pub portset_id: u32,
    /// The port set's skip bits ([`SKIP_EXACT`], [`SKIP_TRIE`]). Port sets never change under
    /// their id (a changed set gets a new one), so neither do these.
    pub flags: u32,
}

/// Key data of stage 2, [`crate::maps::PORTS`] (trie, with a prefix length) and
/// [`crate::maps::PORT_EXACT`] (hash, full length): port-set id, IP protocol number, port
/// (big-endian bytes so that prefix bits run from the most significant bit of the port).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortData {
    /// Port-set id from [`PeerValue`].
    pub portset_id: u32,
    /// IP protocol number (6 TCP, 17 UDP, 132 SCTP, ...).
    pub proto: u8,
    /// Destination port of the connection, big-endian.
    pub port: [u8; 2],
    /// Always zero, never part of a prefix.
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<PortData>() == 8);

/// Prefix length of a port entry that matches every protocol and port.
pub const PORT_ANY_PROTO_BITS: u32 = 32;
/// Prefix length of a port entry that matches every port of one protocol.
pub const PORT_ANY_PORT_BITS: u32 = 40;
/// Prefix length of a full-length port lookup key.
pub const PORT_FULL_BITS: u32 = 56;

/// Value of [`crate::maps::PORTS`] and [`crate::maps::PORT_EXACT`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PortValue {
    /// Rule that decided (maps back to policy, direction and rule index in the agent).
    pub rule_id: u32,
    /// `ACTION_*`.
    pub action: u8,
    /// Always zero.
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<PortValue>() == 8);

/// The result of looking one tier's set up for a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TierLookup {
    /// The endpoint has no set for this tier and direction.
    NoSet,
    /// A set exists but neither stage matched.
    Miss,
    /// Both stages matched.
    Hit(PortValue),
}

/// Final verdict of the policy tiers for one direction of one connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    /// `true` if the connection may be opened.
    pub allow: bool,
    /// The deciding rule, or [`RULE_NONE`] for a default.
    pub rule_id: u32,
    /// `true` if some policy applied (`false`: nothing selects this endpoint and direction).
    pub policed: bool,
}

/// Combines the three tier lookups the way both the kernel and `netpol-agent explain` do:
/// Admin (Allow/Deny decide; Pass and no match go on) → NetworkPolicy (isolated: a hit allows, a
/// miss denies) → Baseline (Allow/Deny decide; Pass and no match go on) → allow.
///
/// ClusterNetworkPolicy: "Pass ... passes evaluation to the next tier. For example, if an Admin
/// tier CNP uses Pass action, NetworkPolicy evaluation will happen next."
#[inline(always)]
pub fn decide(admin: TierLookup, np: TierLookup, baseline: TierLookup) -> Decision {
    let mut policed = false;
    match admin {
        TierLookup::Hit(v) if v.action == ACTION_ALLOW || v.action == ACTION_DENY => {
            return Decision { allow: v.action == ACTION_ALLOW, rule_id: v.rule_id, policed: true }
        }
        TierLookup::Hit(_) | TierLookup::Miss => policed = true,
        TierLookup::NoSet => {}
    }
    match np {
        TierLookup::Hit(v) => {
            return Decision { allow: v.action != ACTION_DENY, rule_id: v.rule_id, policed: true }
        }
        TierLookup::Miss => return Decision { allow: false, rule_id: RULE_NONE, policed: true },
        TierLookup::NoSet => {}
    }
    match baseline {
        TierLookup::Hit(v) if v.action == ACTION_DENY => {
            Decision { allow: false, rule_id: v.rule_id, policed: true }
        }
        TierLookup::Hit(v) => Decision { allow: true, rule_id: v.rule_id, policed: true },
        TierLookup::Miss => Decision { allow: true, rule_id: RULE_NONE, policed: true },
        TierLookup::NoSet => Decision { allow: true, rule_id: RULE_NONE, policed },
    }
}

/// Calls `f(first_port, prefix_bits)` for the minimal set of port prefixes (`prefix_bits` of the
/// 16 port bits fixed) that exactly cover `lo..=hi`. At most 30 prefixes for any range.
pub fn for_each_port_prefix(lo: u16, hi: u16, mut f: impl FnMut(u16, u32)) {
    if lo > hi {
        return;
    }
    let mut start = lo as u32;
    let end = hi as u32;
    while start <= end {
        // Largest aligned block starting at `start` that does not pass `end`.
        let mut size_bits = if start == 0 { 16 } else { start.trailing_zeros().min(16) };
        while start + (1 << size_bits) - 1 > end {
            size_bits -= 1;
        }
        f(start as u16, 16 - size_bits);
        start += 1 << size_bits;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    extern crate std;
    use std::vec::Vec;

    fn prefixes(lo: u16, hi: u16) -> Vec<(u16, u32)> {
        let mut v = Vec::new();
        for_each_port_prefix(lo, hi, |p, b| v.push((p, b)));
        v
    }

    fn covered(p: &[(u16, u32)], port: u16) -> bool {
        p.iter().any(|&(start, bits)| {
            let mask: u16 = if bits == 0 { 0 } else { u16::MAX << (16 - bits) };
            port & mask == start & mask
        })
    }

    #[test]
    fn port_prefixes_cover_exactly_the_range() {
        for &(lo, hi) in &[(1, 65535), (80, 80), (0, 65535), (1000, 2000), (32768, 65535), (5, 6)] {
            let p = prefixes(lo, hi);
            assert!(p.len() <= 30, "{lo}-{hi}: {} prefixes", p.len());
            for port in 0..=u16::MAX {
                assert_eq!(covered(&p, port), (lo..=hi).contains(&port), "{lo}-{hi} port {port}");
            }
        }
        assert_eq!(prefixes(0, 65535), [(0, 0)]);
        assert_eq!(prefixes(80, 80), [(80, 16)]);
        assert!(prefixes(2, 1).is_empty());
    }

    fn hit(action: u8, rule_id: u32) -> TierLookup {
        TierLookup::Hit(PortValue { rule_id, action, _pad: [0; 3] })
    }

    #[test]
    fn tier_precedence() {
        use TierLookup::*;
        let cases = [
            // (admin, np, baseline) -> (allow, rule, policed)
            ((NoSet, NoSet, NoSet), (true, 0, false)),
            ((NoSet, Miss, NoSet), (false, 0, true)),
            ((NoSet, hit(ACTION_ALLOW, 7), NoSet), (true, 7, true)),
            ((hit(ACTION_DENY, 1), hit(ACTION_ALLOW, 7), NoSet), (false, 1, true)),
            ((hit(ACTION_ALLOW, 1), Miss, NoSet), (true, 1, true)),
            // Admin Pass defers to the NetworkPolicy tier: isolated and no match denies.
            ((hit(ACTION_PASS, 1), Miss, NoSet), (false, 0, true)),
            ((hit(ACTION_PASS, 1), hit(ACTION_ALLOW, 7), hit(ACTION_DENY, 9)), (true, 7, true)),
            // ... and without NetworkPolicy isolation to the Baseline tier.
            ((hit(ACTION_PASS, 1), NoSet, hit(ACTION_DENY, 9)), (false, 9, true)),
            ((hit(ACTION_PASS, 1), NoSet, NoSet), (true, 0, true)),
            ((NoSet, NoSet, hit(ACTION_PASS, 9)), (true, 9, true)),
            ((Miss, NoSet, hit(ACTION_DENY, 9)), (false, 9, true)),
            ((Miss, hit(ACTION_ALLOW, 7), hit(ACTION_DENY, 9)), (true, 7, true)),
            ((NoSet, Miss, hit(ACTION_ALLOW, 9)), (false, 0, true)),
            ((NoSet, NoSet, Miss), (true, 0, true)),
        ];
        for ((a, n, b), (allow, rule_id, policed)) in cases {
            assert_eq!(decide(a, n, b), Decision { allow, rule_id, policed }, "{a:?} {n:?} {b:?}");
        }
    }
}

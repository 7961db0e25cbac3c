//! The kernel's two-stage lookup, in user space over [`KernelMaps`].

use std::net::IpAddr;

use netpol_common::ep::Endpoint;
use netpol_common::policy::{
    decide, Decision, PeerData, PortData, TierLookup, PEER_FULL_BITS, PEER_SET_BITS,
    PORT_ANY_PROTO_BITS, PORT_FULL_BITS, SKIP_EXACT, SKIP_TRIE,
};

use super::KernelMaps;
use crate::compile::PortKey;
use crate::model::{key_of, mask, Direction};

/// Whether the kernel consults the map holding entries of prefix length `bits` (`full`: the
/// full length) of a set with lookup skip bits `skips`.
fn consulted(skips: u32, bits: u32, full: u32) -> bool {
    skips & if bits == full { SKIP_EXACT } else { SKIP_TRIE } == 0
}

/// Looks up one tier's set the way the kernel does: stage 1 longest-prefix match on
/// `(set_id, remote)`, then stage 2 longest-prefix match on `(portset_id, proto, port)`, each
/// over the exact-match hash (full length) and then the trie (shorter prefixes), consulting
/// only the maps the skip bits allow (`skips` for the peer set, the peer entry's for the port
/// set). So wrong skip bits show here as a wrong verdict, as they would in the kernel.
/// `port` is the connection's destination port (0 for ICMP).
pub fn lookup(
    maps: &KernelMaps,
    set_id: u32,
    skips: u32,
    remote: IpAddr,
    proto: u8,
    port: u16,
) -> TierLookup {
    if set_id == netpol_common::ep::SET_NONE {
        return TierLookup::NoSet;
    }
    let addr = key_of(remote);
    let peer = (PEER_SET_BITS..=PEER_FULL_BITS).rev().find_map(|bits| {
        if !consulted(skips, bits, PEER_FULL_BITS) {
            return None;
        }
        let data = PeerData { set_id, addr: mask(addr, bits - PEER_SET_BITS).to_be_bytes() };
        maps.peers.get(&(bits, data))
    });
    let Some(peer) = peer else {
        return TierLookup::Miss;
    };
    let hit = (PORT_ANY_PROTO_BITS..=PORT_FULL_BITS).rev().find_map(|bits| {
        if !consulted(peer.flags, bits, PORT_FULL_BITS) {
            return None;
        }
        let k = PortKey::new(bits, proto, port);
        let data = PortData {
            portset_id: peer.portset_id,
            proto: k.proto,
            port: k.port.to_be_bytes(),
            _pad: 0,
        };
        maps.ports.get(&(bits, data))
    });
    match hit {
        Some(v) => TierLookup::Hit(*v),
        None => TierLookup::Miss,
    }
}

/// Decides one direction of a connection for an endpoint: the three tier lookups combined with
/// [`decide`], exactly as the kernel programs do.
pub fn evaluate(
    maps: &KernelMaps,
    endpoint: &Endpoint,
    dir: Direction,
    remote: IpAddr,
    proto: u8,
    port: u16,
) -> Decision {
    let [admin, np, baseline] = endpoint.sets(dir.as_u8());
    let [admin_skips, np_skips, baseline_skips] = endpoint.peer_skips(dir.as_u8());
    decide(
        lookup(maps, admin, admin_skips, remote, proto, port),
        lookup(maps, np, np_skips, remote, proto, port),
        lookup(maps, baseline, baseline_skips, remote, proto, port),
    )
}

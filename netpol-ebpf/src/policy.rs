//! Policy lookup: per tier, one LPM lookup for the peer and one for the port, combined by
//! `netpol_common::policy::decide` (the same function `netpol-agent explain` uses).
use aya_ebpf::maps::lpm_trie::Key;
use netpol_common::{
    ep::{Endpoint, SET_NONE},
    policy::{
        decide, Decision, PeerData, PortData, PortValue, TierLookup, PEER_FULL_BITS, PORT_FULL_BITS,
    },
};

use crate::maps::{PEER_MAP, PORTS_MAP};

const LOOKUP_NO_SET: u64 = 0;
const LOOKUP_MISS: u64 = 1;
const LOOKUP_HIT: u64 = 2;

/// One tier's two-stage lookup. A BPF subprogram (not inlined) so its keys occupy stack once,
/// not once per call site; the result is packed into a u64 because BPF functions return one
/// register: kind in bits 0..8, action in 8..16, rule id in 32..64.
#[inline(never)]
fn lookup_tier(set_id: u32, remote: &[u8; 16], proto: u8, port: u16) -> u64 {
    if set_id == SET_NONE {
        return LOOKUP_NO_SET;
    }
    let peer = Key { prefix_len: PEER_FULL_BITS, data: PeerData { set_id, addr: *remote } };
    let Some(pv) = PEER_MAP.get(&peer) else {
        return LOOKUP_MISS;
    };
    let key = Key {
        prefix_len: PORT_FULL_BITS,
        data: PortData { portset_id: pv.portset_id, proto, port: port.to_be_bytes(), _pad: 0 },
    };
    match PORTS_MAP.get(&key) {
        Some(v) => LOOKUP_HIT | (v.action as u64) << 8 | (v.rule_id as u64) << 32,
        None => LOOKUP_MISS,
    }
}

#[inline(always)]
fn unpack(v: u64) -> TierLookup {
    match v & 0xff {
        LOOKUP_NO_SET => TierLookup::NoSet,
        LOOKUP_HIT => TierLookup::Hit(PortValue {
            rule_id: (v >> 32) as u32,
            action: (v >> 8) as u8,
            _pad: [0; 3],
        }),
        _ => TierLookup::Miss,
    }
}

/// Decides whether a connection opened in direction `dir` with `remote` and destination `port`
/// is allowed for endpoint `ep`.
#[inline(always)]
pub fn evaluate(ep: &Endpoint, dir: u8, remote: &[u8; 16], proto: u8, port: u16) -> Decision {
    let [admin, np, baseline] = ep.sets(dir);
    decide(
        unpack(lookup_tier(admin, remote, proto, port)),
        unpack(lookup_tier(np, remote, proto, port)),
        unpack(lookup_tier(baseline, remote, proto, port)),
    )
}

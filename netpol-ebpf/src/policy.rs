//! Policy lookup: per tier, the peer, then the port, each in its exact-match hash and (on a miss,
//! for sets with shorter entries) its trie, combined by `netpol_common::policy::decide` (the
//! same function `netpol-agent explain` uses).
use core::{mem::MaybeUninit, ptr::addr_of_mut};

use aya_ebpf::maps::lpm_trie::Key;
use netpol_common::{
    ep::{Endpoint, SET_NONE},
    policy::{
        decide, Decision, PeerData, PeerValue, PortData, PortValue, TierLookup, PEER_FULL_BITS,
        PORT_FULL_BITS, SKIP_EXACT, SKIP_TRIE,
    },
};

use crate::{
    addr::{self, Addr},
    maps::{PEER_EXACT_MAP, PEER_MAP, PORTS_MAP, PORT_EXACT_MAP},
};

const LOOKUP_NO_SET: u64 = 0;
const LOOKUP_MISS: u64 = 1;
const LOOKUP_HIT: u64 = 2;

/// One tier's two-stage lookup, for a tier that has a set ([`tier`] checks). Inlined into the
/// programs' packet path, where a call and return cost more than the lookup's own code (see
/// `datapath::decide`); a BPF subprogram ([`lookup_tier_call`]) for ICMP errors. The result is
/// packed into a u64, the one register a BPF function returns: kind in bits 0..8, action in
/// 8..16, rule id in 32..64.
///
/// Each stage tries its exact-match hash first: a full-length entry is the longest match there
/// is, so a hit decides. `skips` are the peer set's skip bits, the peer entry carries the port
/// set's. The hashes' values are replaced whole by the kernel (RCU) when the agent writes them,
/// never modified in place, so reading them through a reference is sound.
#[inline(always)]
fn lookup_tier(set_id: u32, skips: u32, remote: &Addr, proto: u8, port: u16) -> u64 {
    // Field by field, the address as words (see `crate::addr`).
    let mut peer = MaybeUninit::<PeerData>::uninit();
    let p = peer.as_mut_ptr();
    // SAFETY: both fields, which are the whole key (no padding), are written.
    let peer = unsafe {
        addr_of_mut!((*p).set_id).write(set_id);
        addr::write(addr_of_mut!((*p).addr), remote);
        peer.assume_init()
    };
    let mut pv: Option<&PeerValue> = None;
    if skips & SKIP_EXACT == 0 {
        // SAFETY: see above.
        pv = unsafe { PEER_EXACT_MAP.get(&peer) };
    }
    if pv.is_none() && skips & SKIP_TRIE == 0 {
        pv = PEER_MAP.get(&Key { prefix_len: PEER_FULL_BITS, data: peer });
    }
    let Some(pv) = pv else {
        return LOOKUP_MISS;
    };
    let data = PortData { portset_id: pv.portset_id, proto, port: port.to_be_bytes(), _pad: 0 };
    if pv.flags & SKIP_EXACT == 0 {
        // SAFETY: see above.
        if let Some(v) = unsafe { PORT_EXACT_MAP.get(&data) } {
            return hit(v);
        }
    }
    if pv.flags & SKIP_TRIE == 0 {
        if let Some(v) = PORTS_MAP.get(&Key { prefix_len: PORT_FULL_BITS, data }) {
            return hit(v);
        }
    }
    LOOKUP_MISS
}

/// A tier without a set is answered here, without a map lookup (`lookup_tier` would look the
/// address up under the id `SET_NONE`): most endpoints have no cluster-tier policy. `INLINE`
/// picks the inlined lookup of the programs' packet path or the subprogram for ICMP errors.
#[inline(always)]
fn tier<const INLINE: bool>(set_id: u32, skips: u32, remote: &Addr, proto: u8, port: u16) -> u64 {
    if set_id == SET_NONE {
        LOOKUP_NO_SET
    } else if INLINE {
        lookup_tier(set_id, skips, remote, proto, port)
    } else {
        lookup_tier_call(set_id, skips, remote, proto, port)
    }
}

/// [`lookup_tier`] as a BPF subprogram: its keys take stack once, in its own frame, not in the
/// frame of its caller, `datapath::decide_icmp_error`, which sits under the programs' frame.
#[inline(never)]
fn lookup_tier_call(set_id: u32, skips: u32, remote: &Addr, proto: u8, port: u16) -> u64 {
    lookup_tier(set_id, skips, remote, proto, port)
}

#[inline(always)]
fn hit(v: &PortValue) -> u64 {
    LOOKUP_HIT | (v.action as u64) << 8 | (v.rule_id as u64) << 32
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
pub fn evaluate(ep: &Endpoint, dir: u8, remote: &Addr, proto: u8, port: u16) -> Decision {
    evaluate_in::<true>(ep, dir, remote, proto, port)
}

/// [`evaluate`] with each tier's lookup in a BPF subprogram.
#[inline(always)]
pub fn evaluate_outlined(ep: &Endpoint, dir: u8, remote: &Addr, proto: u8, port: u16) -> Decision {
    evaluate_in::<false>(ep, dir, remote, proto, port)
}

#[inline(always)]
fn evaluate_in<const INLINE: bool>(
    ep: &Endpoint,
    dir: u8,
    remote: &Addr,
    proto: u8,
    port: u16,
) -> Decision {
    let [admin, np, baseline] = ep.sets(dir);
    let [admin_skips, np_skips, baseline_skips] = ep.peer_skips(dir);
    decide(
        unpack(tier::<INLINE>(admin, admin_skips, remote, proto, port)),
        unpack(tier::<INLINE>(np, np_skips, remote, proto, port)),
        unpack(tier::<INLINE>(baseline, baseline_skips, remote, proto, port)),
    )
}

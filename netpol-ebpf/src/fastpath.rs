//! The established-flow fast path: most packets belong to a tracked, allowed TCP or UDP flow in
//! an untagged frame without IPv4 options or IPv6 extension headers. Those are decided and
//! counted here from a few header fields, one conntrack lookup and the endpoint's slot in
//! `np_slot` (an array load the verifier inlines): no endpoint lookup, no `Flow` to fill, no
//! general parser, no policy lookup.
//!
//! Anything else — another shape, a conntrack miss, a flow decided under an older endpoint
//! generation or for an interface that no longer holds the slot, a deny tombstone, a TCP SYN —
//! returns `None` and goes through the general path ([`crate::parse`], [`crate::datapath`]),
//! which decides every packet on its own; the fast path only ever agrees with it sooner. The
//! fuzzer (`test/netpol-it/tests/fuzz_packets.rs`) checks both paths against one reference
//! evaluator.
use aya_ebpf::{bindings::__sk_buff, programs::TcContext};
use netpol_common::{
    counters::{Reason, NO_COUNTER_SLOT},
    ct::{tcp_flags, tcp_next_state, CT_VERDICT_ALLOW, CT_VERDICT_AUDIT},
    DIR_EGRESS,
};

use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
    udp::UdpHdr,
};

use crate::{
    addr::{v4_mapped, Addr},
    clock,
    counters::count,
    ct,
    flowcache::{self, KeyWords},
    maps::SLOT_MAP,
    parse::{at, bounds, ETH_P_IP, ETH_P_IPV6, PROTO_TCP, PROTO_UDP},
};

const ETH_LEN: usize = EthHdr::LEN;
const IPV4_LEN: usize = Ipv4Hdr::LEN;
const IPV6_LEN: usize = Ipv6Hdr::LEN;
const TCP_LEN: usize = TcpHdr::LEN;
const UDP_LEN: usize = UdpHdr::LEN;

/// The conntrack key as the words of its `repr(C)` layout (ifindex; local and remote port;
/// remote address; protocol and padding), so it costs seven stores: built field by field, LLVM
/// calls `memset` for the zero padding and copies the address byte by byte.
#[inline(always)]
fn key_words(ifindex: u32, ports: [u16; 2], remote: Addr, proto: u8) -> KeyWords {
    let [p0, p1] = ports[0].to_ne_bytes();
    let [p2, p3] = ports[1].to_ne_bytes();
    [
        ifindex,
        u32::from_ne_bytes([p0, p1, p2, p3]),
        remote[0],
        remote[1],
        remote[2],
        remote[3],
        u32::from_ne_bytes([proto, 0, 0, 0]),
    ]
}

/// Whether `slot` is held by the endpoint on `ifindex` at `generation`: the agent writes the
/// slot's owner with every endpoint entry and clears it when the endpoint goes.
#[inline(always)]
fn owns(slot: u32, ifindex: u32, generation: u32) -> bool {
    if slot == NO_COUNTER_SLOT {
        return false;
    }
    match SLOT_MAP.get(slot) {
        Some(owner) => owner.ifindex == ifindex && owner.generation == generation,
        None => false,
    }
}

/// The verdict of a packet of an established flow, counted, or `None` for the general path,
/// for packets in direction `DIR` (one copy per program, so orienting the key costs no
/// branches). Inlined into the programs, like the general path: a BPF-to-BPF call and return
/// cost several nanoseconds behind the kernel's return-thunk mitigation, a tenth of this path.
/// Its key and spilled registers share the programs' one frame with the general path, which
/// fits BPF's 512 bytes because the general path keeps its `Flow` and conntrack key in a
/// per-CPU scratch map (`crate::maps::SCRATCH_MAP`) instead of on the stack.
#[inline(always)]
pub fn established<const DIR: u8>(skb: *mut __sk_buff, ifindex: u32) -> Option<Reason> {
    let ctx = TcContext::new(skb);
    let (start, end) = bounds(&ctx);
    if start + ETH_LEN + IPV4_LEN > end {
        return None;
    }
    let len = ctx.len() as usize;
    // SAFETY (every `at` below): each read lies below a bound checked against `end` before it.
    let ethertype = u16::from_be(unsafe { at(start + 12) });
    let ip = start + ETH_LEN;
    let (proto, src, dst, l4) = if ethertype == ETH_P_IP {
        // Version 4 with a 20-byte header, a total length the general parser accepts, and
        // neither a fragment offset nor more fragments (DF and the reserved bit may be set).
        let vihl: u8 = unsafe { at(ip) };
        let tot_len = u16::from_be(unsafe { at(ip + 2) }) as usize;
        let frags = u16::from_be(unsafe { at(ip + 6) });
        if vihl != 0x45 || tot_len < IPV4_LEN || ETH_LEN + tot_len > len || frags & 0x3fff != 0 {
            return None;
        }
        let proto: u8 = unsafe { at(ip + 9) };
        let (src, dst) = (v4_mapped(unsafe { at(ip + 12) }), v4_mapped(unsafe { at(ip + 16) }));
        (proto, src, dst, ip + IPV4_LEN)
    } else if ethertype == ETH_P_IPV6 {
        if ip + IPV6_LEN > end {
            return None;
        }
        let version: u8 = unsafe { at(ip) };
        let payload = u16::from_be(unsafe { at(ip + 4) }) as usize;
        if version >> 4 != 6 || ETH_LEN + IPV6_LEN + payload > len {
            return None;
        }
        // The next header must be the transport header itself: no extension headers.
        let proto: u8 = unsafe { at(ip + 6) };
        let src: Addr = unsafe { at(ip + 8) };
        let dst: Addr = unsafe { at(ip + 24) };
        (proto, src, dst, ip + IPV6_LEN)
    } else {
        return None;
    };

    let mut flags = 0u8;
    let ports: [u16; 2] = match proto {
        PROTO_TCP => {
            if l4 + TCP_LEN > end {
                return None;
            }
            let off_flags: [u8; 2] = unsafe { at(l4 + 12) };
            flags = off_flags[1];
            // A SYN may open a new connection on a finished flow's ports: the general path
            // decides it. A header shorter than 20 bytes is malformed.
            if off_flags[0] >> 4 < 5 || flags & tcp_flags::SYN != 0 {
                return None;
            }
            unsafe { at(l4) }
        }
        PROTO_UDP => {
            if l4 + UDP_LEN > end {
                return None;
            }
            unsafe { at(l4) }
        }
        _ => return None,
    };
    let (sport, dport) = (u16::from_be(ports[0]), u16::from_be(ports[1]));
    let words = if DIR == DIR_EGRESS {
        key_words(ifindex, [sport, dport], dst, proto)
    } else {
        key_words(ifindex, [dport, sport], src, proto)
    };

    // A flow seen on this CPU in this tick: no conntrack lookup (see `flowcache`). FIN and RST
    // change the TCP state, which only conntrack holds.
    let now = clock::jiffies();
    let state_change = flags & (tcp_flags::FIN | tcp_flags::RST) != 0;
    let mut cached = None;
    if !state_change {
        cached = flowcache::entry(&words);
        if let Some(hit) = cached.as_deref().and_then(|e| flowcache::lookup(e, &words, now)) {
            if owns(hit.slot, ifindex, hit.generation) {
                count(hit.slot, ifindex, DIR, hit.reason, len as u32);
                return Some(hit.reason);
            }
        }
    }

    let ct = ct::lookup(&words)?;
    // SAFETY: a conntrack value; concurrent writers on other CPUs only race on fields whose
    // torn values are harmless (a timestamp, a TCP state), as in the general path.
    let ct = unsafe { &mut *ct };
    let reason = match ct.verdict {
        CT_VERDICT_ALLOW => Reason::AllowConntrack,
        CT_VERDICT_AUDIT => Reason::Audit,
        _ => return None,
    };
    // The entry counts only if it was decided under the current generation of the endpoint
    // that holds its slot now, and that endpoint is this interface's.
    let slot = ct.slot as u32;
    if !owns(slot, ifindex, ct.generation) {
        return None;
    }
    clock::refresh_at(ct, now);
    if proto == PROTO_TCP {
        ct.state = tcp_next_state(ct.state, flags, ct.origin != DIR);
    }
    if let Some(e) = cached {
        flowcache::store(e, &words, now, ct);
    }
    count(slot, ifindex, DIR, reason, len as u32);
    Some(reason)
}

//! Conntrack: one entry per flow and endpoint, written by the programs, expired by the agent.
//!
//! The table ([`crate::maps::CT`]) is a set-associative cache in an array map, not a kernel
//! hash: a flow's key hashes ([`set_of`]) to one set of [`CT_WAYS`] entries, which the programs
//! search and fill themselves. A new flow takes a free way of its set or, when all are taken,
//! the way seen least recently (an LRU per set). Inserting into the kernel's LRU hash cost a
//! new allowed flow ~230 of its ~320 ns (two locked regions: the bucket and the LRU's free
//! list); writing a way of an array costs a cache and TLB miss, ~100 ns. What a set gives up
//! against one LRU over the whole table: a flow can be evicted while other sets still have
//! room, when [`CT_WAYS`] + 1 live flows hash to one set (see `docs/ARCHITECTURE.md`,
//! "Conntrack table").

/// Key of [`crate::maps::CT`]. Oriented from the pod's side, so both hooks of one interface
/// find the same entry: `local_port` is the pod's, `remote_*` its peer's. The pod's own address
/// is not part of it: the interface identifies the pod, and no policy depends on which of its
/// addresses a packet uses (a dual-stack pod's two families differ in `remote_addr` anyway).
/// Leaving it out makes the key 28 bytes instead of 44: the kernel hashes fewer words on every
/// lookup, and each of the map's preallocated entries is 16 bytes smaller. For ICMP echo both
/// ports hold the echo identifier.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CtKey {
    /// Host-side interface of the pod.
    pub ifindex: u32,
    /// Pod's port (host byte order).
    pub local_port: u16,
    /// Peer's port (host byte order).
    pub remote_port: u16,
    /// Peer's address (IPv4-mapped for IPv4).
    pub remote_addr: [u8; 16],
    /// IP protocol number.
    pub proto: u8,
    /// Always zero.
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<CtKey>() == 28);

impl CtKey {
    /// The key as the seven words of its `repr(C)` layout, as the programs hash and compare it.
    pub fn words(&self) -> [u32; 7] {
        let [p0, p1] = self.local_port.to_ne_bytes();
        let [p2, p3] = self.remote_port.to_ne_bytes();
        let a = &self.remote_addr;
        let w = |i: usize| u32::from_ne_bytes([a[i], a[i + 1], a[i + 2], a[i + 3]]);
        [
            self.ifindex,
            u32::from_ne_bytes([p0, p1, p2, p3]),
            w(0),
            w(4),
            w(8),
            w(12),
            u32::from_ne_bytes([self.proto, self._pad[0], self._pad[1], self._pad[2]]),
        ]
    }
}

/// Ways per set of the conntrack table.
pub const CT_WAYS: usize = 4;

/// One way of a conntrack set: a flow's key and entry. Whether it holds a flow is its tag's
/// business ([`CtTags`]); the agent frees a way by zeroing the tag, one aligned store.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtWay {
    /// The flow's state (first: it is 8-byte aligned, the key 4).
    pub value: CtValue,
    /// The flow.
    pub key: CtKey,
    /// Always zero: a way is one 64-byte cache line.
    pub _pad: [u32; 3],
}
const _: () = assert!(core::mem::size_of::<CtWay>() == 64);

/// Value of [`crate::maps::CT`] at a set index: [`CT_WAYS`] ways, 256 bytes, four cache lines of
/// a page-aligned array (the map is mmapable, whose values the kernel aligns to a page).
/// Which ways hold a flow: [`CtTags`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtSet {
    /// The ways.
    pub ways: [CtWay; CT_WAYS],
}
const _: () = assert!(core::mem::size_of::<CtSet>() == 64 * CT_WAYS);

/// Value of [`crate::maps::CT_TAGS`] at a set index: a tag of each way's key, 0 for a free way.
/// The programs search a set through its tags, 8 bytes in a 1 MiB array at the default size,
/// and read a way only when its tag matches: a new flow's insert touches no way but the one it
/// writes, unless its set is full. The ways' array (32 MiB) has too many pages for the TLB, and
/// a miss there costs a page walk (a nested one in a VM) on top of the cache miss.
///
/// 16-bit tags, not 32: the array is half as large, so more of it stays cached, and a stream of
/// new flows cost ~11 ns less each with the table evicted from the caches (`bench datapath`).
/// An array map strides its values by 8 bytes, so 8-bit tags would not shrink it further. A tag
/// shared by two flows of one set (1 in 32,768 per other way) costs a read of the way: the key
/// decides.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtTags {
    /// Tag of each way ([`tag_of`]), 0: free.
    pub tags: [u16; CT_WAYS],
}
const _: () = assert!(core::mem::size_of::<CtTags>() == 8);

/// Sets for a table of `entries` flows: `entries / CT_WAYS`, rounded down to a power of two (a
/// set is chosen by masking the hash), at least one.
pub const fn sets_for(entries: u32) -> u32 {
    let sets = entries / CT_WAYS as u32;
    if sets <= 1 {
        1
    } else {
        1 << (31 - sets.leading_zeros())
    }
}

/// Set of the flow with key words `w` in a table whose set count is a power of two, `mask` =
/// sets − 1. Each half of the key is folded into 64 bits with its own rotation, so that fields
/// which vary together (an interface index and the low bits of an address) do not cancel out,
/// then multiplied by a 64-bit odd constant (Fibonacci hashing), whose top bits depend on every
/// bit folded in.
#[inline(always)]
pub fn set_of(w: &[u32; 7], mask: u32) -> u32 {
    set_and_tag(w, mask).0
}

/// [`set_of`] and [`tag_of`] from one fold of the key: the programs need both, and computed
/// apart the fold was done twice (the map lookups between them are helper calls, across which
/// the compiler reloads the key and folds it again).
#[inline(always)]
pub fn set_and_tag(w: &[u32; 7], mask: u32) -> (u32, u16) {
    let f = fold(w);
    let set = (f.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32) as u32 & mask;
    let tag = ((f.wrapping_mul(0xc2b2_ae3d_27d4_eb4f) >> 48) as u16) | 1;
    (set, tag)
}

#[inline(always)]
fn fold(w: &[u32; 7]) -> u64 {
    let word = |hi: u32, lo: u32| ((hi as u64) << 32) | lo as u64;
    word(w[0], w[1])
        ^ word(w[2], w[3]).rotate_left(17)
        ^ word(w[4], w[5]).rotate_left(41)
        ^ (w[6] as u64).rotate_left(29)
}

/// Tag of the flow with key words `w`: never 0 (a free way's), from other bits of the hash than
/// [`set_of`] uses, so flows of one set rarely share a tag (and a shared tag only costs a read
/// of the way: the key decides).
#[inline(always)]
pub fn tag_of(w: &[u32; 7]) -> u16 {
    set_and_tag(w, 0).1
}

/// TCP: SYN seen, no reply yet.
pub const CT_TCP_SYN_SENT: u8 = 1;
/// TCP: a reply was seen.
pub const CT_TCP_ESTABLISHED: u8 = 2;
/// TCP: a FIN was seen.
pub const CT_TCP_CLOSING: u8 = 3;
/// TCP: a RST was seen.
pub const CT_TCP_CLOSED: u8 = 4;
/// Any other protocol: the flow was seen.
pub const CT_ACTIVE: u8 = 5;

/// The flow was allowed.
pub const CT_VERDICT_ALLOW: u8 = 1;
/// The flow would have been denied but the endpoint is in audit mode.
pub const CT_VERDICT_AUDIT: u8 = 2;
/// Tombstone of a flow that a policy change cut: its packets are dropped, and it is never
/// "picked up" again as an untracked mid-flow connection (its retransmissions would be).
pub const CT_VERDICT_DENY: u8 = 3;

/// Value of [`crate::maps::CT`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtValue {
    /// `CLOCK_MONOTONIC_COARSE` time of the last packet (either orientation), refreshed at
    /// most once per timer tick (see [`CtValue::tick`]).
    pub last_seen_ns: u64,
    /// Endpoint generation the flow was last decided under.
    pub generation: u32,
    /// Rule that allowed the flow.
    pub rule_id: u32,
    /// Direction of the packet that opened the flow (`DIR_INGRESS`: the peer opened it).
    pub origin: u8,
    /// `CT_TCP_*` or [`CT_ACTIVE`].
    pub state: u8,
    /// `CT_VERDICT_*`.
    pub verdict: u8,
    /// Always zero.
    pub _pad0: u8,
    /// The endpoint's slot ([`crate::ep::Endpoint::counter_slot`]) when the flow was last
    /// decided: the established-flow fast path checks `generation` against
    /// [`crate::maps::SLOT`] at this index instead of looking the endpoint up by ifindex.
    /// [`crate::counters::NO_COUNTER_SLOT`] (also in entries written before this field existed):
    /// the general path decides.
    pub slot: u16,
    /// Low 16 bits of the kernel's `jiffies` when `last_seen_ns` was written: the programs
    /// read the clock again only once this changed (at most once per timer tick and flow).
    pub tick: u16,
}
const _: () = assert!(core::mem::size_of::<CtValue>() == 24);

/// Key of [`crate::maps::FRAG`]: identifies the fragments of one IP datagram on one endpoint, so
/// non-first fragments (which carry no ports) follow the verdict of their first fragment.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FragKey {
    /// Host-side interface of the pod.
    pub ifindex: u32,
    /// IPv4 identification or IPv6 fragment-header identification.
    pub id: u32,
    /// Source address (IPv4-mapped for IPv4).
    pub src_addr: [u8; 16],
    /// Destination address.
    pub dst_addr: [u8; 16],
    /// IPv4 protocol, or the Next Header of the IPv6 fragment header (the same in every
    /// fragment of the datagram).
    pub proto: u8,
    /// Always zero.
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<FragKey>() == 44);

/// Value of [`crate::maps::FRAG`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragValue {
    /// `bpf_ktime_get_ns()` of the first fragment.
    pub first_seen_ns: u64,
}

/// TCP flag bits as in the header's flags byte.
pub mod tcp_flags {
    /// FIN.
    pub const FIN: u8 = 0x01;
    /// SYN.
    pub const SYN: u8 = 0x02;
    /// RST.
    pub const RST: u8 = 0x04;
    /// ACK.
    pub const ACK: u8 = 0x10;
}

/// Next TCP state after a packet with `flags`, `reply` telling whether it travels against the
/// flow's origin.
#[inline(always)]
pub const fn tcp_next_state(state: u8, flags: u8, reply: bool) -> u8 {
    if flags & tcp_flags::RST != 0 {
        CT_TCP_CLOSED
    } else if flags & tcp_flags::FIN != 0 {
        if state == CT_TCP_CLOSED {
            CT_TCP_CLOSED
        } else {
            CT_TCP_CLOSING
        }
    } else if state == CT_TCP_SYN_SENT && reply {
        CT_TCP_ESTABLISHED
    } else {
        state
    }
}

/// Idle timeouts applied by the agent's garbage collector, in seconds (close to Linux
/// nf_conntrack and Calico's eBPF defaults).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP after a SYN without reply.
    pub tcp_syn_sent: u64,
    /// TCP once a reply was seen.
    pub tcp_established: u64,
    /// TCP after a FIN.
    pub tcp_closing: u64,
    /// TCP after a RST.
    pub tcp_closed: u64,
    /// UDP.
    pub udp: u64,
    /// SCTP.
    pub sctp: u64,
    /// ICMP and ICMPv6.
    pub icmp: u64,
    /// Every other protocol.
    pub other: u64,
    /// Tombstones of flows cut by a policy change ([`CT_VERDICT_DENY`]), refreshed by every
    /// dropped packet.
    pub denied: u64,
}

impl Timeouts {
    /// Defaults.
    pub const DEFAULT: Timeouts = Timeouts {
        tcp_syn_sent: 30,
        tcp_established: 3600,
        tcp_closing: 30,
        tcp_closed: 10,
        udp: 60,
        sctp: 600,
        icmp: 30,
        other: 600,
        denied: 60,
    };

    /// Idle timeout of a conntrack entry.
    pub const fn for_value(&self, proto: u8, value: &CtValue) -> u64 {
        if value.verdict == CT_VERDICT_DENY {
            self.denied
        } else {
            self.for_entry(proto, value.state)
        }
    }

    /// Idle timeout of an entry with protocol `proto` in state `state`.
    pub const fn for_entry(&self, proto: u8, state: u8) -> u64 {
        match (proto, state) {
            (6, CT_TCP_SYN_SENT) => self.tcp_syn_sent,
            (6, CT_TCP_CLOSING) => self.tcp_closing,
            (6, CT_TCP_CLOSED) => self.tcp_closed,
            (6, _) => self.tcp_established,
            (17, _) => self.udp,
            (132, _) => self.sctp,
            (1 | 58, _) => self.icmp,
            _ => self.other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{tcp_flags::*, *};

    #[test]
    fn key_words_follow_the_layout() {
        let key = CtKey {
            ifindex: 7,
            local_port: 0x1234,
            remote_port: 80,
            remote_addr: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16],
            proto: 6,
            _pad: [0; 3],
        };
        // SAFETY: CtKey is repr(C), 28 bytes without padding, as aligned as u32.
        let raw: [u32; 7] = unsafe { core::mem::transmute(key) };
        assert_eq!(key.words(), raw);
    }

    #[test]
    fn sets_are_powers_of_two() {
        assert_eq!(sets_for(0), 1);
        assert_eq!(sets_for(4), 1);
        assert_eq!(sets_for(256), 64);
        assert_eq!(sets_for(300), 64);
        assert_eq!(sets_for(1 << 19), 1 << 17);
        assert_eq!(sets_for(u32::MAX), 1 << 29);
    }

    #[test]
    fn flows_spread_over_the_sets() {
        // One pod's connections to one peer port from consecutive local ports, and pods on
        // consecutive interfaces talking to consecutive addresses: no set gets more than a few
        // times its share.
        let mask = (1u32 << 10) - 1;
        let mut load = [0u32; 1 << 10];
        for i in 0..8_192u32 {
            let key = CtKey {
                ifindex: 3 + i % 64,
                local_port: 32_768 + (i / 64) as u16,
                remote_port: 443,
                remote_addr: [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 0, (i % 64) as u8],
                proto: 6,
                _pad: [0; 3],
            };
            load[set_of(&key.words(), mask) as usize] += 1;
        }
        let max = *load.iter().max().unwrap();
        assert!(max <= 24, "largest set holds {max} of an average of 8");
    }

    #[test]
    fn tcp_states() {
        assert_eq!(tcp_next_state(CT_TCP_SYN_SENT, SYN | ACK, true), CT_TCP_ESTABLISHED);
        assert_eq!(tcp_next_state(CT_TCP_SYN_SENT, SYN, false), CT_TCP_SYN_SENT);
        assert_eq!(tcp_next_state(CT_TCP_ESTABLISHED, ACK, false), CT_TCP_ESTABLISHED);
        assert_eq!(tcp_next_state(CT_TCP_ESTABLISHED, FIN | ACK, true), CT_TCP_CLOSING);
        assert_eq!(tcp_next_state(CT_TCP_CLOSING, RST, false), CT_TCP_CLOSED);
        assert_eq!(tcp_next_state(CT_TCP_CLOSED, FIN, false), CT_TCP_CLOSED);
    }

    #[test]
    fn timeouts_by_protocol_and_state() {
        let t = Timeouts::DEFAULT;
        assert_eq!(t.for_entry(6, CT_TCP_SYN_SENT), 30);
        assert_eq!(t.for_entry(6, CT_TCP_ESTABLISHED), 3600);
        assert_eq!(t.for_entry(17, CT_ACTIVE), 60);
        assert_eq!(t.for_entry(58, CT_ACTIVE), 30);
        assert_eq!(t.for_entry(47, CT_ACTIVE), 600);
    }
}

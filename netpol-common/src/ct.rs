//! Conntrack: one entry per flow and endpoint, written by the programs, expired by the agent.

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

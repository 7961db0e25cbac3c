//! Bounds-checked header parsing into a [`Flow`]. Headers are read with direct packet access
//! (no helper call per header, which costs tens of nanoseconds each); every read is checked
//! against the end of the packet, so a truncated header is reported as malformed and never
//! mis-parsed. Headers beyond the linear part of the skb are pulled in first.
use aya_ebpf::{bindings::__sk_buff, programs::TcContext};
use netpol_common::v4_mapped;
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
    udp::UdpHdr,
    vlan::VlanHdr,
};

pub(crate) const ETH_P_IP: u16 = 0x0800;
pub(crate) const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_SCTP: u8 = 132;
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_ICMPV6: u8 = 58;

/// IPv6 extension headers walked before giving up (bounded loop for the verifier).
const MAX_IPV6_EXT: usize = 6;

/// Kinds of [`Flow`].
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum FlowKind {
    /// A packet with a transport header (or a protocol without ports).
    Normal,
    /// A non-first IP fragment: no transport header, only `frag_id`.
    Fragment,
    /// An ICMP error: `inner` holds the tuple of the embedded (offending) packet.
    IcmpError,
}

/// Addresses, ports and protocol of a packet embedded in an ICMP error.
#[derive(Clone, Copy)]
pub struct Tuple {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
}

impl Tuple {
    const EMPTY: Tuple = Tuple { src: [0; 16], dst: [0; 16], sport: 0, dport: 0, proto: 0 };
}

/// The parts of a packet the policy and conntrack look at.
#[derive(Clone, Copy)]
pub struct Flow {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub tcp_flags: u8,
    pub kind: FlowKind,
    /// The packet can open a new flow (TCP SYN without ACK, SCTP INIT, ICMP echo request, UDP).
    pub initiates: bool,
    /// The packet is the first fragment of a fragmented datagram.
    pub first_fragment: bool,
    pub frag_id: u32,
    /// What every fragment of the datagram carries alike, to find its first fragment: IPv4's
    /// protocol, or the Next Header of IPv6's fragment header (which names an extension header
    /// when one follows it, unlike `proto`, the transport protocol of the first fragment).
    pub frag_proto: u8,
    /// Only for [`FlowKind::IcmpError`].
    pub inner: Tuple,
}

impl Flow {
    pub const EMPTY: Flow = Flow {
        src: [0; 16],
        dst: [0; 16],
        sport: 0,
        dport: 0,
        proto: 0,
        tcp_flags: 0,
        kind: FlowKind::Normal,
        initiates: true,
        first_fragment: false,
        frag_id: 0,
        frag_proto: 0,
        inner: Tuple::EMPTY,
    };
}

/// What [`parse`] found.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Packet {
    /// ARP, LLDP, IPv6 neighbour discovery and other link-local control traffic.
    Control = 0,
    /// An IP packet, described by the `Flow` that [`parse`] filled in.
    Ip = 1,
    /// Truncated or inconsistent headers.
    Malformed = 2,
}

/// The packet is truncated or its headers are inconsistent.
pub struct Malformed;

/// The packet's linear data as (start, end). Read with volatile loads at each use: if LLVM is
/// free to cache `skb->data` it spills it and later zero-extends the reloaded pointer with a
/// shift, which the verifier rejects ("pointer arithmetic with <<= operator prohibited").
#[inline(always)]
pub(crate) fn bounds(ctx: &TcContext) -> (usize, usize) {
    let skb = ctx.skb.skb;
    // SAFETY: `skb` is the program's context pointer, valid for the whole run.
    unsafe {
        (
            core::ptr::read_volatile(&(*skb).data) as usize,
            core::ptr::read_volatile(&(*skb).data_end) as usize,
        )
    }
}

/// Reads a `T` at the constant offset `OFF` with direct packet access (no helper call). Only
/// for constant offsets: with a variable offset LLVM re-derives the pointer after the bounds
/// check and the verifier can no longer tie the access to the check.
#[inline(always)]
fn head<T: Copy, const OFF: usize>(ctx: &TcContext) -> Result<T, Malformed> {
    let (start, end) = bounds(ctx);
    if start + OFF + core::mem::size_of::<T>() > end {
        // Truncated, or the header lies in paged data: the helper tells which.
        return load(ctx, OFF);
    }
    // SAFETY: [OFF, OFF + size_of::<T>()) lies inside the linear packet data (checked above).
    Ok(unsafe { core::ptr::read_unaligned((start + OFF) as *const T) })
}

/// Reads a `T` at a variable offset with bpf_skb_load_bytes, which fails instead of reading
/// past the packet and also reaches paged data.
#[inline(always)]
fn load<T>(ctx: &TcContext, off: usize) -> Result<T, Malformed> {
    ctx.load::<T>(off).map_err(|_| Malformed)
}

/// Where the transport header starts: at a constant offset for the common untagged frames
/// without IPv4 options or IPv6 extension headers (read directly), elsewhere at a variable one.
#[derive(Clone, Copy)]
enum L4At {
    /// Untagged IPv4 without options: 14 + 20.
    V4,
    /// Untagged IPv6 without extension headers: 14 + 40.
    V6,
    /// Any other offset.
    Var(usize),
}

impl L4At {
    #[inline(always)]
    fn read<T: Copy, const REL: usize>(self, ctx: &TcContext) -> Result<T, Malformed> {
        match self {
            L4At::V4 => head_rel::<T, 34, REL>(ctx),
            L4At::V6 => head_rel::<T, 54, REL>(ctx),
            L4At::Var(off) => load(ctx, off + REL),
        }
    }

    #[inline(always)]
    fn offset(self) -> usize {
        match self {
            L4At::V4 => 34,
            L4At::V6 => 54,
            L4At::Var(off) => off,
        }
    }
}

#[inline(always)]
fn head_rel<T: Copy, const BASE: usize, const REL: usize>(ctx: &TcContext) -> Result<T, Malformed> {
    match BASE {
        34 => head_at::<T, 34, REL>(ctx),
        _ => head_at::<T, 54, REL>(ctx),
    }
}

#[inline(always)]
fn head_at<T: Copy, const BASE: usize, const REL: usize>(ctx: &TcContext) -> Result<T, Malformed> {
    let (start, end) = bounds(ctx);
    if start + BASE + REL + core::mem::size_of::<T>() > end {
        return load(ctx, BASE + REL);
    }
    // SAFETY: the range lies inside the linear packet data (checked above).
    Ok(unsafe { core::ptr::read_unaligned((start + BASE + REL) as *const T) })
}

/// Parses the packet into `flow`. A BPF subprogram: its header buffers live in its own stack
/// frame, which is released before the policy code runs (BPF has 512 bytes of stack in all).
#[inline(never)]
pub fn parse(skb: *mut __sk_buff, flow: &mut Flow) -> Packet {
    let ctx = TcContext::new(skb);
    match parse_frame(&ctx, flow) {
        Ok(p) => p,
        Err(Malformed) => Packet::Malformed,
    }
}

#[inline(always)]
fn parse_frame(ctx: &TcContext, flow: &mut Flow) -> Result<Packet, Malformed> {
    let eth: EthHdr = head::<EthHdr, 0>(ctx)?;
    let mut proto = u16::from_be(eth.ether_type);
    let mut l3 = EthHdr::LEN;
    // 802.1Q / 802.1ad, up to two tags (QinQ).
    for _ in 0..2 {
        if proto == ETH_P_8021Q || proto == ETH_P_8021AD {
            let vlan: VlanHdr = load(ctx, l3)?;
            proto = u16::from_be(vlan.ether_type);
            l3 += VlanHdr::LEN;
        }
    }
    // A deeper tag stack than we walk hides what it carries: refuse it rather than pass it as
    // non-IP (a pod with VLAN sub-interfaces could otherwise send IP past the policy).
    if proto == ETH_P_8021Q || proto == ETH_P_8021AD {
        return Err(Malformed);
    }
    match proto {
        ETH_P_IP => parse_ipv4(ctx, l3, flow).map(|()| Packet::Ip),
        ETH_P_IPV6 => parse_ipv6(ctx, l3, flow),
        _ => Ok(Packet::Control),
    }
}

#[inline(always)]
fn parse_ipv4(ctx: &TcContext, l3: usize, flow: &mut Flow) -> Result<(), Malformed> {
    let ip: Ipv4Hdr = if l3 == EthHdr::LEN { head::<Ipv4Hdr, 14>(ctx)? } else { load(ctx, l3)? };
    let ihl = ((ip.vihl & 0x0f) as usize) * 4;
    let tot_len = u16::from_be_bytes(ip.tot_len) as usize;
    if ip.vihl >> 4 != 4 || ihl < Ipv4Hdr::LEN || tot_len < ihl || l3 + tot_len > ctx.len() as usize
    {
        return Err(Malformed);
    }
    let frags = u16::from_be_bytes(ip.frags);
    let offset = frags & 0x1fff;
    let more = frags & 0x2000 != 0;
    flow.src = v4_mapped(ip.src_addr);
    flow.dst = v4_mapped(ip.dst_addr);
    flow.proto = ip.proto;
    flow.frag_proto = ip.proto;
    flow.first_fragment = more && offset == 0;
    flow.frag_id = u16::from_be_bytes(ip.id) as u32;
    if offset != 0 {
        flow.kind = FlowKind::Fragment;
        return Ok(());
    }
    let at = if l3 == EthHdr::LEN && ihl == Ipv4Hdr::LEN { L4At::V4 } else { L4At::Var(l3 + ihl) };
    parse_l4(ctx, at, flow)
}

#[inline(always)]
fn parse_ipv6(ctx: &TcContext, l3: usize, flow: &mut Flow) -> Result<Packet, Malformed> {
    let ip: Ipv6Hdr = if l3 == EthHdr::LEN { head::<Ipv6Hdr, 14>(ctx)? } else { load(ctx, l3)? };
    let payload = u16::from_be_bytes(ip.payload_len) as usize;
    if ip.vcf[0] >> 4 != 6 || l3 + Ipv6Hdr::LEN + payload > ctx.len() as usize {
        return Err(Malformed);
    }
    flow.src = ip.src_addr;
    flow.dst = ip.dst_addr;
    flow.proto = ip.next_hdr;
    let mut off = l3 + Ipv6Hdr::LEN;
    let mut done = false;
    for _ in 0..MAX_IPV6_EXT {
        match flow.proto {
            // Hop-by-hop, routing, destination options: length in 8-octet units, not counting
            // the first 8.
            0 | 43 | 60 => {
                let h: [u8; 2] = load(ctx, off)?;
                flow.proto = h[0];
                off += (h[1] as usize + 1) * 8;
            }
            // Fragment header: fixed 8 octets.
            44 => {
                let h: [u8; 8] = load(ctx, off)?;
                flow.proto = h[0];
                flow.frag_proto = h[0];
                off += 8;
                let frag = u16::from_be_bytes([h[2], h[3]]);
                flow.frag_id = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
                if frag >> 3 != 0 {
                    flow.kind = FlowKind::Fragment;
                    return Ok(Packet::Ip);
                }
                flow.first_fragment = frag & 1 != 0;
            }
            // Authentication header: length in 4-octet units, not counting the first 2.
            51 => {
                let h: [u8; 2] = load(ctx, off)?;
                flow.proto = h[0];
                off += (h[1] as usize + 2) * 4;
            }
            _ => {
                done = true;
                break;
            }
        }
    }
    if !done {
        // A longer chain than we walk: refuse rather than guess where the transport header is.
        return Err(Malformed);
    }
    if flow.proto == PROTO_ICMPV6 {
        let t: u8 = load(ctx, off)?;
        // Router/neighbour solicitation and advertisement, redirect, MLD: link-local control.
        if matches!(t, 130..=137 | 143) {
            return Ok(Packet::Control);
        }
    }
    let at = if off == EthHdr::LEN + Ipv6Hdr::LEN { L4At::V6 } else { L4At::Var(off) };
    parse_l4(ctx, at, flow)?;
    Ok(Packet::Ip)
}

#[inline(always)]
fn parse_l4(ctx: &TcContext, at: L4At, flow: &mut Flow) -> Result<(), Malformed> {
    match flow.proto {
        PROTO_TCP => {
            // The fixed header as bytes: ports, data offset (byte 12) and flags (byte 13).
            let tcp: [u8; TcpHdr::LEN] = at.read::<_, 0>(ctx)?;
            if tcp[12] >> 4 < 5 {
                return Err(Malformed);
            }
            flow.sport = u16::from_be_bytes([tcp[0], tcp[1]]);
            flow.dport = u16::from_be_bytes([tcp[2], tcp[3]]);
            flow.tcp_flags = tcp[13];
            flow.initiates = flow.tcp_flags & 0x12 == 0x02;
        }
        PROTO_UDP => {
            let udp: UdpHdr = at.read::<_, 0>(ctx)?;
            flow.sport = udp.src_port();
            flow.dport = udp.dst_port();
        }
        PROTO_SCTP => {
            // Common header (12 octets) and the first chunk's type: INIT (1) opens an association.
            let h: [u8; 13] = at.read::<_, 0>(ctx)?;
            flow.sport = u16::from_be_bytes([h[0], h[1]]);
            flow.dport = u16::from_be_bytes([h[2], h[3]]);
            flow.initiates = h[12] == 1;
        }
        PROTO_ICMP | PROTO_ICMPV6 => {
            let h: [u8; 8] = at.read::<_, 0>(ctx)?;
            let v6 = flow.proto == PROTO_ICMPV6;
            let (echo_req, echo_reply) = if v6 { (128, 129) } else { (8, 0) };
            let error = if v6 { h[0] <= 4 && h[0] >= 1 } else { matches!(h[0], 3 | 11 | 12) };
            if h[0] == echo_req || h[0] == echo_reply {
                // The identifier plays the role of both ports, so replies find the request.
                let id = u16::from_be_bytes([h[4], h[5]]);
                flow.sport = id;
                flow.dport = id;
                flow.initiates = h[0] == echo_req;
            } else if error {
                return parse_icmp_error(ctx, at.offset() + 8, v6, flow);
            }
        }
        _ => {}
    }
    Ok(())
}

/// Fills `flow.inner` with the tuple of the packet embedded in an ICMP error, so the error can be
/// matched to the flow it is about.
#[inline(always)]
fn parse_icmp_error(
    ctx: &TcContext,
    inner: usize,
    v6: bool,
    flow: &mut Flow,
) -> Result<(), Malformed> {
    let t = &mut flow.inner;
    let l4 = if v6 {
        let ip: Ipv6Hdr = load(ctx, inner)?;
        t.src = ip.src_addr;
        t.dst = ip.dst_addr;
        t.proto = ip.next_hdr;
        inner + Ipv6Hdr::LEN
    } else {
        let ip: Ipv4Hdr = load(ctx, inner)?;
        let ihl = ((ip.vihl & 0x0f) as usize) * 4;
        if ihl < Ipv4Hdr::LEN {
            return Err(Malformed);
        }
        t.src = v4_mapped(ip.src_addr);
        t.dst = v4_mapped(ip.dst_addr);
        t.proto = ip.proto;
        inner + ihl
    };
    match t.proto {
        PROTO_TCP | PROTO_UDP | PROTO_SCTP => {
            // RFC 792/4443 guarantee at least the first 8 octets of the transport header.
            let p: [u8; 4] = load(ctx, l4)?;
            t.sport = u16::from_be_bytes([p[0], p[1]]);
            t.dport = u16::from_be_bytes([p[2], p[3]]);
        }
        PROTO_ICMP | PROTO_ICMPV6 => {
            let h: [u8; 8] = load(ctx, l4)?;
            let id = u16::from_be_bytes([h[4], h[5]]);
            t.sport = id;
            t.dport = id;
        }
        _ => {}
    }
    flow.kind = FlowKind::IcmpError;
    flow.initiates = false;
    Ok(())
}

//! Bounds-checked header parsing into a [`Flow`]. Headers are read with direct packet access
//! (no helper call per header, which costs tens of nanoseconds each); every read is checked
//! against the end of the packet, so a truncated header is reported as malformed and never
//! mis-parsed. Headers beyond the linear part of the skb, or at offsets known only at run time
//! (VLAN tags, IPv4 options, IPv6 extension headers), are read with `bpf_skb_load_bytes`.
//!
//! Direct reads load each field with its own width (see [`at`]) into [`Flow`]'s words: read as
//! the byte arrays of `network-types`' headers, every field was assembled from byte loads, and
//! the addresses were copied byte by byte, which made up a third of this parser.
use aya_ebpf::{bindings::__sk_buff, programs::TcContext};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    vlan::VlanHdr,
};

use crate::addr::{v4_mapped, Addr};

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
    pub src: Addr,
    pub dst: Addr,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
}

impl Tuple {
    const EMPTY: Tuple = Tuple { src: [0; 4], dst: [0; 4], sport: 0, dport: 0, proto: 0 };
}

/// The parts of a packet the policy and conntrack look at.
#[derive(Clone, Copy)]
pub struct Flow {
    pub src: Addr,
    pub dst: Addr,
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
        src: [0; 4],
        dst: [0; 4],
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

/// Reads a `T` at `addr` inside the linear packet data with loads of the widths of `T`'s fields.
///
/// # Safety
/// `addr .. addr + size_of::<T>()` must lie inside the packet data (checked against `data_end`
/// by the caller, which is also what the verifier requires), and `addr` must be aligned for
/// `T` in the verifier's model of packet data, which assumes `data` sits 2 bytes past a 4-byte
/// boundary (`NET_IP_ALIGN`) so that the IP header behind a 14-byte Ethernet header is
/// aligned. Every read here is a field at its natural offset in such a frame.
///
/// The real address may be misaligned (x86-64 does not align `data`), as in every C program
/// that reads `iph->saddr`: the verifier allows misaligned packet loads on architectures with
/// efficient unaligned access, and checks the `NET_IP_ALIGN` model on the others. An
/// unaligned read (`read_unaligned`) costs more: LLVM's BPF target assembles it from byte
/// loads, which made the fast path three times longer, and it was the path's largest cost.
#[inline(always)]
pub(crate) unsafe fn at<T: Copy>(addr: usize) -> T {
    unsafe { core::ptr::read(addr as *const T) }
}

/// Reads a `T` at the constant offset `OFF` with direct packet access (no helper call), `OFF`
/// aligned for `T` as [`at`] requires. Only for constant offsets: with a variable offset LLVM
/// re-derives the pointer after the bounds check and the verifier can no longer tie the access
/// to the check.
#[inline(always)]
fn head<T: Copy, const OFF: usize>(ctx: &TcContext) -> Result<T, Malformed> {
    let (start, end) = bounds(ctx);
    if start + OFF + core::mem::size_of::<T>() > end {
        // Truncated, or the header lies in paged data: the helper tells which.
        return load(ctx, OFF);
    }
    // SAFETY: [OFF, OFF + size_of::<T>()) lies inside the linear packet data (checked above),
    // and the caller passes an aligned offset.
    Ok(unsafe { at(start + OFF) })
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
    // SAFETY: the range lies inside the linear packet data (checked above); both bases are
    // 4-byte aligned in the verifier's model, and the callers read types of at most that
    // alignment at aligned `REL`.
    Ok(unsafe { at(start + BASE + REL) })
}

/// Parses the packet into `flow`. Inlined into the programs (see `datapath::decide`).
#[inline(always)]
pub fn parse(skb: *mut __sk_buff, flow: &mut Flow) -> Packet {
    let ctx = TcContext::new(skb);
    match parse_frame(&ctx, flow) {
        Ok(p) => p,
        Err(Malformed) => Packet::Malformed,
    }
}

#[inline(always)]
fn parse_frame(ctx: &TcContext, flow: &mut Flow) -> Result<Packet, Malformed> {
    let mut proto = u16::from_be(head::<u16, 12>(ctx)?);
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

/// The fields of an IPv4 header the parser reads (16-bit fields in host order, addresses as
/// read).
struct Ipv4Fields {
    vihl: u8,
    tot_len: u16,
    id: u16,
    frags: u16,
    proto: u8,
    src: u32,
    dst: u32,
}

/// Where the `LEN`-byte IP header at `l3` starts in the linear packet data, if it is behind an
/// untagged Ethernet header (4-byte aligned in the verifier's model, see [`at`]) and all of it
/// is there: then its fields are read directly, else with `bpf_skb_load_bytes`.
#[inline(always)]
fn direct_ip_header<const LEN: usize>(ctx: &TcContext, l3: usize) -> Option<usize> {
    if l3 != EthHdr::LEN {
        return None;
    }
    let (start, end) = bounds(ctx);
    if start + EthHdr::LEN + LEN > end {
        return None;
    }
    Some(start + EthHdr::LEN)
}

#[inline(always)]
fn ipv4_header(ctx: &TcContext, l3: usize) -> Result<Ipv4Fields, Malformed> {
    if let Some(ip) = direct_ip_header::<{ Ipv4Hdr::LEN }>(ctx, l3) {
        // SAFETY: fields at their natural offsets inside the header checked for.
        return Ok(unsafe {
            Ipv4Fields {
                vihl: at(ip),
                tot_len: u16::from_be(at(ip + 2)),
                id: u16::from_be(at(ip + 4)),
                frags: u16::from_be(at(ip + 6)),
                proto: at(ip + 9),
                src: at(ip + 12),
                dst: at(ip + 16),
            }
        });
    }
    let ip: Ipv4Hdr = load(ctx, l3)?;
    Ok(Ipv4Fields {
        vihl: ip.vihl,
        tot_len: u16::from_be_bytes(ip.tot_len),
        id: u16::from_be_bytes(ip.id),
        frags: u16::from_be_bytes(ip.frags),
        proto: ip.proto,
        src: u32::from_ne_bytes(ip.src_addr),
        dst: u32::from_ne_bytes(ip.dst_addr),
    })
}

#[inline(always)]
fn parse_ipv4(ctx: &TcContext, l3: usize, flow: &mut Flow) -> Result<(), Malformed> {
    let ip = ipv4_header(ctx, l3)?;
    let ihl = ((ip.vihl & 0x0f) as usize) * 4;
    let tot_len = ip.tot_len as usize;
    if ip.vihl >> 4 != 4 || ihl < Ipv4Hdr::LEN || tot_len < ihl || l3 + tot_len > ctx.len() as usize
    {
        return Err(Malformed);
    }
    let offset = ip.frags & 0x1fff;
    let more = ip.frags & 0x2000 != 0;
    flow.src = v4_mapped(ip.src);
    flow.dst = v4_mapped(ip.dst);
    flow.proto = ip.proto;
    flow.frag_proto = ip.proto;
    flow.first_fragment = more && offset == 0;
    flow.frag_id = ip.id as u32;
    if offset != 0 {
        flow.kind = FlowKind::Fragment;
        return Ok(());
    }
    let at = if l3 == EthHdr::LEN && ihl == Ipv4Hdr::LEN { L4At::V4 } else { L4At::Var(l3 + ihl) };
    parse_l4(ctx, at, flow)
}

/// The fields of an IPv6 header the parser reads.
struct Ipv6Fields {
    /// Version and the high bits of the traffic class.
    vtc: u8,
    payload_len: u16,
    next_hdr: u8,
    src: Addr,
    dst: Addr,
}

#[inline(always)]
fn ipv6_header(ctx: &TcContext, l3: usize) -> Result<Ipv6Fields, Malformed> {
    if let Some(ip) = direct_ip_header::<{ Ipv6Hdr::LEN }>(ctx, l3) {
        // SAFETY: fields at their natural offsets inside the header checked for.
        return Ok(unsafe {
            Ipv6Fields {
                vtc: at(ip),
                payload_len: u16::from_be(at(ip + 4)),
                next_hdr: at(ip + 6),
                src: at(ip + 8),
                dst: at(ip + 24),
            }
        });
    }
    let ip: Ipv6Hdr = load(ctx, l3)?;
    Ok(Ipv6Fields {
        vtc: ip.vcf[0],
        payload_len: u16::from_be_bytes(ip.payload_len),
        next_hdr: ip.next_hdr,
        src: words(ip.src_addr),
        dst: words(ip.dst_addr),
    })
}

/// The words of a 16-byte address read into a byte array.
#[inline(always)]
fn words(bytes: [u8; 16]) -> Addr {
    // SAFETY: arrays of plain integers of the same size; every bit pattern is valid.
    unsafe { core::mem::transmute::<[u8; 16], Addr>(bytes) }
}

#[inline(always)]
fn parse_ipv6(ctx: &TcContext, l3: usize, flow: &mut Flow) -> Result<Packet, Malformed> {
    let ip = ipv6_header(ctx, l3)?;
    let payload = ip.payload_len as usize;
    if ip.vtc >> 4 != 6 || l3 + Ipv6Hdr::LEN + payload > ctx.len() as usize {
        return Err(Malformed);
    }
    flow.src = ip.src;
    flow.dst = ip.dst;
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

/// The fixed TCP header (20 octets) as the fields the parser reads, with their widths.
#[derive(Clone, Copy)]
#[repr(C)]
struct TcpHead {
    /// Source and destination port, network order.
    ports: [u16; 2],
    seq: u32,
    ack: u32,
    /// Data offset (high 4 bits of the first byte) and flags.
    off_flags: [u8; 2],
    window: u16,
    check: u16,
    urgent: u16,
}
const _: () = assert!(core::mem::size_of::<TcpHead>() == 20);

/// The UDP header.
#[derive(Clone, Copy)]
#[repr(C)]
struct UdpHead {
    ports: [u16; 2],
    len: u16,
    check: u16,
}

/// ICMP's and ICMPv6's first 8 octets.
#[derive(Clone, Copy)]
#[repr(C)]
struct IcmpHead {
    kind: u8,
    code: u8,
    check: u16,
    /// Echo identifier, network order.
    id: u16,
    seq: u16,
}

#[inline(always)]
fn parse_l4(ctx: &TcContext, at: L4At, flow: &mut Flow) -> Result<(), Malformed> {
    match flow.proto {
        PROTO_TCP => {
            let tcp: TcpHead = at.read::<_, 0>(ctx)?;
            if tcp.off_flags[0] >> 4 < 5 {
                return Err(Malformed);
            }
            flow.sport = u16::from_be(tcp.ports[0]);
            flow.dport = u16::from_be(tcp.ports[1]);
            flow.tcp_flags = tcp.off_flags[1];
            flow.initiates = flow.tcp_flags & 0x12 == 0x02;
        }
        PROTO_UDP => {
            let udp: UdpHead = at.read::<_, 0>(ctx)?;
            flow.sport = u16::from_be(udp.ports[0]);
            flow.dport = u16::from_be(udp.ports[1]);
        }
        PROTO_SCTP => {
            // Common header (12 octets) and the first chunk's type: INIT (1) opens an association.
            // As bytes, which a struct of 13 bytes with 16-bit ports could not be: rare enough.
            let h: [u8; 13] = at.read::<_, 0>(ctx)?;
            flow.sport = u16::from_be_bytes([h[0], h[1]]);
            flow.dport = u16::from_be_bytes([h[2], h[3]]);
            flow.initiates = h[12] == 1;
        }
        PROTO_ICMP | PROTO_ICMPV6 => {
            let h: IcmpHead = at.read::<_, 0>(ctx)?;
            let v6 = flow.proto == PROTO_ICMPV6;
            let (echo_req, echo_reply) = if v6 { (128, 129) } else { (8, 0) };
            let t = h.kind;
            let error = if v6 { (1..=4).contains(&t) } else { matches!(t, 3 | 11 | 12) };
            if t == echo_req || t == echo_reply {
                // The identifier plays the role of both ports, so replies find the request.
                let id = u16::from_be(h.id);
                flow.sport = id;
                flow.dport = id;
                flow.initiates = t == echo_req;
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
        t.src = words(ip.src_addr);
        t.dst = words(ip.dst_addr);
        t.proto = ip.next_hdr;
        inner + Ipv6Hdr::LEN
    } else {
        let ip: Ipv4Hdr = load(ctx, inner)?;
        let ihl = ((ip.vihl & 0x0f) as usize) * 4;
        if ihl < Ipv4Hdr::LEN {
            return Err(Malformed);
        }
        t.src = v4_mapped(u32::from_ne_bytes(ip.src_addr));
        t.dst = v4_mapped(u32::from_ne_bytes(ip.dst_addr));
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

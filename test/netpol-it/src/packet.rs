//! Crafted frames for BPF_PROG_TEST_RUN and raw-socket injection: Ethernet (+802.1Q), IPv4 or
//! IPv6 (with optional extension headers), and TCP, UDP, SCTP or ICMP. Checksums are computed
//! where a receiving kernel checks them (IPv4 header, SCTP CRC32c); the programs never check them.
use std::net::IpAddr;

/// TCP flags.
pub mod tcp {
    /// FIN.
    pub const FIN: u8 = 0x01;
    /// SYN.
    pub const SYN: u8 = 0x02;
    /// RST.
    pub const RST: u8 = 0x04;
    /// ACK.
    pub const ACK: u8 = 0x10;
}

/// What follows the IP header.
#[derive(Clone, Debug)]
pub enum L4 {
    /// TCP with flags.
    Tcp { sport: u16, dport: u16, flags: u8 },
    /// UDP.
    Udp { sport: u16, dport: u16 },
    /// SCTP with one chunk of the given type (1 = INIT).
    Sctp { sport: u16, dport: u16, chunk: u8 },
    /// ICMP or ICMPv6 with type, code, and 4 bytes of rest-of-header, then `payload`.
    Icmp { kind: u8, code: u8, rest: [u8; 4], payload: Vec<u8> },
    /// Raw bytes with an explicit protocol number.
    Raw { proto: u8, bytes: Vec<u8> },
}

impl L4 {
    fn proto(&self, v6: bool) -> u8 {
        match self {
            L4::Tcp { .. } => 6,
            L4::Udp { .. } => 17,
            L4::Sctp { .. } => 132,
            L4::Icmp { .. } => {
                if v6 {
                    58
                } else {
                    1
                }
            }
            L4::Raw { proto, .. } => *proto,
        }
    }

    /// The transport header and payload bytes.
    pub fn bytes(&self) -> Vec<u8> {
        match self {
            L4::Tcp { sport, dport, flags } => {
                let mut b = vec![0u8; 20];
                b[0..2].copy_from_slice(&sport.to_be_bytes());
                b[2..4].copy_from_slice(&dport.to_be_bytes());
                b[4..8].copy_from_slice(&1u32.to_be_bytes());
                b[12] = 5 << 4;
                b[13] = *flags;
                b[14..16].copy_from_slice(&64240u16.to_be_bytes());
                b
            }
            L4::Udp { sport, dport } => {
                let mut b = vec![0u8; 8];
                b[0..2].copy_from_slice(&sport.to_be_bytes());
                b[2..4].copy_from_slice(&dport.to_be_bytes());
                b[4..6].copy_from_slice(&8u16.to_be_bytes());
                b
            }
            L4::Sctp { sport, dport, chunk } => {
                let mut b = vec![0u8; 12];
                b[0..2].copy_from_slice(&sport.to_be_bytes());
                b[2..4].copy_from_slice(&dport.to_be_bytes());
                // INIT: type, flags, length 20, initiate tag, a_rwnd, streams, initial TSN.
                let mut c = vec![*chunk, 0, 0, 20];
                c.extend_from_slice(&0x1234_5678u32.to_be_bytes());
                c.extend_from_slice(&65535u32.to_be_bytes());
                c.extend_from_slice(&[0, 10, 0, 10]);
                c.extend_from_slice(&1u32.to_be_bytes());
                b.extend_from_slice(&c);
                let crc = crc32c(&b);
                b[8..12].copy_from_slice(&crc.to_le_bytes());
                b
            }
            L4::Icmp { kind, code, rest, payload } => {
                let mut b = vec![*kind, *code, 0, 0];
                b.extend_from_slice(rest);
                b.extend_from_slice(payload);
                b
            }
            L4::Raw { bytes, .. } => bytes.clone(),
        }
    }
}

/// A frame under construction.
#[derive(Clone, Debug)]
pub struct Frame {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub l4: L4,
    /// 802.1Q tag.
    pub vlan: Option<u16>,
    /// IPv6 extension headers to insert: (next-header number of the extension, its bytes
    /// without the next-header byte).
    pub ext: Vec<(u8, Vec<u8>)>,
    /// IPv4 fragment field (flags and offset in 8-byte units), and identification.
    pub frag: (u16, u16),
}

impl Frame {
    /// A frame from `src` to `dst` carrying `l4`.
    pub fn new(src: impl Into<IpAddr>, dst: impl Into<IpAddr>, l4: L4) -> Frame {
        Frame { src: src.into(), dst: dst.into(), l4, vlan: None, ext: Vec::new(), frag: (0, 0) }
    }

    /// Sets an IPv4 fragment: `more` fragments follow, `offset` in bytes (multiple of 8).
    pub fn fragment(mut self, id: u16, more: bool, offset: u16) -> Frame {
        self.frag = (if more { 0x2000 } else { 0 } | (offset / 8), id);
        self
    }

    /// Adds an IPv6 fragment header (after the extension headers added so far): `more`
    /// fragments follow, `offset` in bytes (multiple of 8). Its Next Header is that of the
    /// header added next (or the transport's); for a non-first fragment (offset > 0) the
    /// transport header is left out, as for IPv4.
    pub fn fragment6(mut self, id: u32, more: bool, offset: u16) -> Frame {
        let field = (offset / 8) << 3 | u16::from(more);
        let mut body = vec![0u8];
        body.extend_from_slice(&field.to_be_bytes());
        body.extend_from_slice(&id.to_be_bytes());
        self.ext.push((44, body));
        self.frag.0 = offset / 8;
        self
    }

    /// Adds an 802.1Q tag.
    pub fn vlan(mut self, id: u16) -> Frame {
        self.vlan = Some(id);
        self
    }

    /// Adds an IPv6 extension header (hop-by-hop 0, routing 43, destination options 60) of
    /// 8 bytes.
    pub fn ext(mut self, kind: u8) -> Frame {
        self.ext.push((kind, vec![0; 7]));
        self
    }

    /// The IP packet (no Ethernet header). For a non-first fragment (offset > 0) the transport
    /// header is omitted and 8 bytes of payload are sent instead.
    pub fn ip_packet(&self) -> Vec<u8> {
        let payload = if self.frag.0 & 0x1fff != 0 { vec![0xab; 8] } else { self.l4.bytes() };
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let mut h = vec![0u8; 20];
                h[0] = 0x45;
                h[2..4].copy_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
                h[4..6].copy_from_slice(&self.frag.1.to_be_bytes());
                h[6..8].copy_from_slice(&self.frag.0.to_be_bytes());
                h[8] = 64;
                h[9] = self.l4.proto(false);
                h[12..16].copy_from_slice(&s.octets());
                h[16..20].copy_from_slice(&d.octets());
                let c = ip_checksum(&h);
                h[10..12].copy_from_slice(&c.to_be_bytes());
                h.extend_from_slice(&payload);
                h
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                let mut exts = Vec::new();
                let kinds: Vec<u8> = self.ext.iter().map(|e| e.0).collect();
                for (i, (_, body)) in self.ext.iter().enumerate() {
                    let next = kinds.get(i + 1).copied().unwrap_or(self.l4.proto(true));
                    exts.push(next);
                    exts.extend_from_slice(body);
                }
                let mut h = vec![0u8; 40];
                h[0] = 0x60;
                h[4..6].copy_from_slice(&((exts.len() + payload.len()) as u16).to_be_bytes());
                h[6] = kinds.first().copied().unwrap_or(self.l4.proto(true));
                h[7] = 64;
                h[8..24].copy_from_slice(&s.octets());
                h[24..40].copy_from_slice(&d.octets());
                h.extend_from_slice(&exts);
                h.extend_from_slice(&payload);
                h
            }
            _ => panic!("mixed address families in a frame"),
        }
    }

    /// The Ethernet frame.
    pub fn bytes(&self) -> Vec<u8> {
        let mut f = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
        if let Some(id) = self.vlan {
            f.extend_from_slice(&0x8100u16.to_be_bytes());
            f.extend_from_slice(&id.to_be_bytes());
        }
        let ethertype: u16 = if self.src.is_ipv4() { 0x0800 } else { 0x86dd };
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(&self.ip_packet());
        f
    }
}

/// An ARP request frame.
pub fn arp() -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 2, 0x08, 0x06]);
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 2, 10, 0, 0, 1, 0, 0, 0, 0, 0, 0, 10, 0, 0, 9]);
    f
}

fn ip_checksum(h: &[u8]) -> u16 {
    let mut sum: u32 = h.chunks(2).map(|c| u16::from_be_bytes([c[0], c[1]]) as u32).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// CRC32c (Castagnoli), as SCTP requires (RFC 4960 appendix B).
pub fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0x82f6_3b78 } else { crc >> 1 };
        }
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_rfc_3720_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
    }

    #[test]
    fn ipv4_header_checksum_verifies() {
        let p =
            Frame::new([10, 0, 0, 1], [10, 0, 0, 2], L4::Udp { sport: 1, dport: 2 }).ip_packet();
        assert_eq!(ip_checksum(&p[..20]), 0);
    }
}

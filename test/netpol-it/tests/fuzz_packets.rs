//! Hostile packets: random and mutated frames through BPF_PROG_TEST_RUN of the real `from_pod`
//! and `to_pod` programs, each verdict checked against a reference evaluator written here from
//! the datapath's specification (parse → malformed drop / control pass / conntrack / policy),
//! and the counted reasons of every chunk checked against the reference's tally.
//!
//! `NETPOL_FUZZ_FRAMES` (default 100,000; `cargo xtask soak` runs 1,000,000) and
//! `NETPOL_FUZZ_SEED` (default fixed, printed) make a run reproducible.
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::{Ipv4Addr, Ipv6Addr},
};

use netpol_common::{
    counters::Reason,
    ep::{Endpoint, Tier, EP_FLAG_AUDIT},
    maps::{PROG_FROM_POD, PROG_TO_POD},
    policy::{skips, PORT_FULL_BITS},
    DIR_EGRESS, DIR_INGRESS,
};
use netpol_it::fixture::{for_each_port_key, Fixture, DROP, PASS, TEST_IFINDEX};

// ---------------------------------------------------------------------------------------------
// Deterministic random numbers (SplitMix64: tiny, and the sequence never changes with a crate
// upgrade, so a printed seed stays reproducible).

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
    fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len())]
    }
    fn byte(&mut self) -> u8 {
        self.next() as u8
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.byte()).collect()
    }
}

// ---------------------------------------------------------------------------------------------
// The policy, once for the kernel's maps and once as the reference's table.

const INGRESS_SET: u32 = 1;
const EGRESS_SET: u32 = 2;

/// (set, CIDR, port set, [(proto, lo, hi)]; proto 0 = every protocol and port).
type Rule = (u32, &'static str, u32, &'static [(u8, u16, u16)]);
const POLICY: &[Rule] = &[
    (INGRESS_SET, "10.0.0.1/32", 10, &[(6, 80, 80), (17, 53, 53), (132, 5000, 5000)]),
    (INGRESS_SET, "fd00:1::1/128", 10, &[(6, 80, 80), (17, 53, 53), (132, 5000, 5000)]),
    (INGRESS_SET, "10.0.0.2/32", 11, &[(0, 0, 0)]),
    // A covering prefix: 10.0.0.1 matches its /32 above (longest prefix), others this one.
    (INGRESS_SET, "10.0.0.0/24", 14, &[(6, 443, 443), (1, 0, u16::MAX)]),
    (INGRESS_SET, "10.1.0.0/16", 12, &[(6, 8000, 8099)]),
    (EGRESS_SET, "10.0.0.1/32", 13, &[(17, 53, 53)]),
    (EGRESS_SET, "fd00:1::/64", 15, &[(0, 0, 0)]),
];

const POD4: [u8; 4] = [10, 0, 0, 9];
const POD6: &str = "fd00:9::9";
const PEERS4: &[[u8; 4]] = &[
    [10, 0, 0, 1],
    [10, 0, 0, 2],
    [10, 0, 0, 3],
    [10, 0, 0, 200],
    [10, 1, 2, 3],
    [10, 1, 255, 1],
    [10, 2, 0, 1],
    [192, 168, 1, 1],
];
const PEERS6: &[&str] = &["fd00:1::1", "fd00:1::2", "fd00:3::3", "fe80::1"];
const PORTS: &[u16] = &[80, 81, 53, 54, 443, 5000, 5001, 7999, 8000, 8050, 8099, 8100, 0, 65535];

fn mapped(cidr: &str) -> ([u8; 16], u32) {
    let (addr, len) = cidr.split_once('/').unwrap();
    let len: u32 = len.parse().unwrap();
    match addr.parse::<Ipv4Addr>() {
        Ok(a) => (a.to_ipv6_mapped().octets(), 96 + len),
        Err(_) => (addr.parse::<Ipv6Addr>().unwrap().octets(), len),
    }
}

fn prefix_matches(addr: &[u8; 16], prefix: &[u8; 16], bits: u32) -> bool {
    (0..bits as usize).all(|i| (addr[i / 8] ^ prefix[i / 8]) & (0x80 >> (i % 8)) == 0)
}

/// The skip bits of a port set, as the agent's layout computes them, so the kernel's lookups
/// leave out the map the set has no entries in, and the reference checks that they may.
fn port_skips(portset: u32) -> u32 {
    let mut lens = Vec::new();
    for &(_, _, _, ports) in POLICY.iter().filter(|r| r.2 == portset) {
        for &(proto, lo, hi) in ports {
            for_each_port_key(proto, lo, hi, |bits, _, _| lens.push(bits));
        }
    }
    skips(lens, PORT_FULL_BITS)
}

/// The skip bits of a peer set (address bits; 128 is a full address).
fn peer_skips(set: u32) -> u32 {
    skips(POLICY.iter().filter(|r| r.0 == set).map(|r| mapped(r.1).1), 128)
}

fn load_policy(f: &mut Fixture) {
    for &(set, cidr, portset, ports) in POLICY {
        f.peer_with_skips(set, cidr, portset, port_skips(portset));
        for &(proto, lo, hi) in ports {
            f.ports(portset, proto, lo, hi, portset);
        }
    }
}

/// What the endpoint looks like in one phase of the run.
#[derive(Clone, Copy, Debug)]
struct EpConf {
    generation: u32,
    audit: bool,
    ingress: bool,
    egress: bool,
}

impl EpConf {
    fn endpoint(&self) -> Endpoint {
        let mut ep = Endpoint {
            generation: self.generation,
            flags: if self.audit { EP_FLAG_AUDIT } else { 0 },
            ingress_np: if self.ingress { INGRESS_SET } else { 0 },
            egress_np: if self.egress { EGRESS_SET } else { 0 },
            ..Default::default()
        };
        ep.set_peer_skips(DIR_INGRESS, Tier::NetworkPolicy, peer_skips(INGRESS_SET));
        ep.set_peer_skips(DIR_EGRESS, Tier::NetworkPolicy, peer_skips(EGRESS_SET));
        ep
    }
}

/// [`POLICY`] with its prefixes parsed: (set, address, prefix bits, ports).
type ParsedRule = (u32, [u8; 16], u32, &'static [(u8, u16, u16)]);

fn parsed_policy() -> &'static [ParsedRule] {
    static P: std::sync::OnceLock<Vec<ParsedRule>> = std::sync::OnceLock::new();
    P.get_or_init(|| {
        POLICY
            .iter()
            .map(|&(set, cidr, _, ports)| {
                let (addr, bits) = mapped(cidr);
                (set, addr, bits, ports)
            })
            .collect()
    })
}

/// NetworkPolicy semantics as the maps encode them: the most specific peer prefix of the
/// direction's set decides which ports are open; no set means the direction is unpoliced.
/// Returns (allowed, policed).
fn reference_policy(ep: &EpConf, dir: u8, remote: &[u8; 16], proto: u8, port: u16) -> (bool, bool) {
    let (on, set) =
        if dir == DIR_INGRESS { (ep.ingress, INGRESS_SET) } else { (ep.egress, EGRESS_SET) };
    if !on {
        return (true, false);
    }
    let best = parsed_policy()
        .iter()
        .filter(|r| r.0 == set && prefix_matches(remote, &r.1, r.2))
        .max_by_key(|r| r.2);
    let allowed = best.is_some_and(|r| {
        r.3.iter().any(|&(p, lo, hi)| p == 0 || (p == proto && (lo..=hi).contains(&port)))
    });
    (allowed, true)
}

// ---------------------------------------------------------------------------------------------
// The reference parser: what the datapath must extract from a frame.

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Tuple {
    src: [u8; 16],
    dst: [u8; 16],
    sport: u16,
    dport: u16,
    proto: u8,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Normal,
    /// A non-first fragment.
    Fragment,
    /// An ICMP error about the embedded tuple.
    IcmpError(Tuple),
}

#[derive(Clone, Copy, Debug)]
struct Parsed {
    t: Tuple,
    flags: u8,
    kind: Kind,
    initiates: bool,
    first_fragment: bool,
    frag_id: u32,
    /// IPv4's protocol or the Next Header of IPv6's fragment header: alike in every fragment.
    frag_proto: u8,
}

#[derive(Debug)]
enum Class {
    Control,
    Malformed,
    Ip(Parsed),
}

/// `n` bytes at `off`, if the frame has them.
fn at(b: &[u8], off: usize, n: usize) -> Option<&[u8]> {
    b.get(off..off.checked_add(n)?)
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

fn v4map(b: &[u8]) -> [u8; 16] {
    Ipv4Addr::new(b[0], b[1], b[2], b[3]).to_ipv6_mapped().octets()
}

/// IPv6 extension headers walked before the transport header; a longer chain is malformed.
const MAX_V6_EXT: usize = 5;

fn classify(b: &[u8]) -> Class {
    reference_parse(b).unwrap_or(Class::Malformed)
}

fn reference_parse(b: &[u8]) -> Option<Class> {
    let mut et = be16(at(b, 12, 2)?);
    let mut l3 = 14;
    // At most two tags (802.1Q, 802.1ad / QinQ); a deeper stack is refused, not passed unseen.
    for depth in 0..3 {
        if et != 0x8100 && et != 0x88a8 {
            break;
        }
        if depth == 2 {
            return None;
        }
        et = be16(at(b, l3 + 2, 2)?);
        l3 += 4;
    }
    let mut p = Parsed {
        t: Tuple { src: [0; 16], dst: [0; 16], sport: 0, dport: 0, proto: 0 },
        flags: 0,
        kind: Kind::Normal,
        initiates: true,
        first_fragment: false,
        frag_id: 0,
        frag_proto: 0,
    };
    let l4 = match et {
        0x0800 => {
            let ip = at(b, l3, 20)?;
            let ihl = (ip[0] & 0xf) as usize * 4;
            let total = be16(&ip[2..]) as usize;
            if ip[0] >> 4 != 4 || ihl < 20 || total < ihl || l3 + total > b.len() {
                return None;
            }
            p.t.src = v4map(&ip[12..16]);
            p.t.dst = v4map(&ip[16..20]);
            p.t.proto = ip[9];
            p.frag_proto = ip[9];
            let frag = be16(&ip[6..]);
            p.first_fragment = frag & 0x2000 != 0 && frag & 0x1fff == 0;
            p.frag_id = be16(&ip[4..]) as u32;
            if frag & 0x1fff != 0 {
                p.kind = Kind::Fragment;
                return Some(Class::Ip(p));
            }
            l3 + ihl
        }
        0x86dd => {
            let ip = at(b, l3, 40)?;
            if ip[0] >> 4 != 6 || l3 + 40 + be16(&ip[4..]) as usize > b.len() {
                return None;
            }
            p.t.src = ip[8..24].try_into().unwrap();
            p.t.dst = ip[24..40].try_into().unwrap();
            p.t.proto = ip[6];
            let mut off = l3 + 40;
            let mut walked = 0;
            loop {
                match p.t.proto {
                    0 | 43 | 60 => {
                        let h = at(b, off, 2)?;
                        p.t.proto = h[0];
                        off += (h[1] as usize + 1) * 8;
                    }
                    44 => {
                        let h = at(b, off, 8)?;
                        p.t.proto = h[0];
                        p.frag_proto = h[0];
                        off += 8;
                        let frag = be16(&h[2..]);
                        p.frag_id = u32::from_be_bytes(h[4..8].try_into().unwrap());
                        if frag >> 3 != 0 {
                            p.kind = Kind::Fragment;
                            return Some(Class::Ip(p));
                        }
                        p.first_fragment = frag & 1 != 0;
                    }
                    51 => {
                        let h = at(b, off, 2)?;
                        p.t.proto = h[0];
                        off += (h[1] as usize + 2) * 4;
                    }
                    _ => break,
                }
                walked += 1;
                if walked > MAX_V6_EXT {
                    return None;
                }
            }
            // Neighbour discovery, router messages and MLD are link-local control traffic.
            if p.t.proto == 58 && matches!(at(b, off, 1)?[0], 130..=137 | 143) {
                return Some(Class::Control);
            }
            off
        }
        _ => return Some(Class::Control),
    };
    match p.t.proto {
        6 => {
            let h = at(b, l4, 20)?;
            if h[12] >> 4 < 5 {
                return None;
            }
            p.t.sport = be16(h);
            p.t.dport = be16(&h[2..]);
            p.flags = h[13];
            p.initiates = h[13] & 0x12 == 0x02;
        }
        17 => {
            let h = at(b, l4, 8)?;
            p.t.sport = be16(h);
            p.t.dport = be16(&h[2..]);
        }
        132 => {
            let h = at(b, l4, 13)?;
            p.t.sport = be16(h);
            p.t.dport = be16(&h[2..]);
            p.initiates = h[12] == 1;
        }
        1 | 58 => {
            let h = at(b, l4, 8)?;
            let v6 = p.t.proto == 58;
            let (req, reply) = if v6 { (128, 129) } else { (8, 0) };
            let error = if v6 { (1..=4).contains(&h[0]) } else { matches!(h[0], 3 | 11 | 12) };
            if h[0] == req || h[0] == reply {
                p.t.sport = be16(&h[4..]);
                p.t.dport = p.t.sport;
                p.initiates = h[0] == req;
            } else if error {
                p.kind = Kind::IcmpError(inner_tuple(b, l4 + 8, v6)?);
                p.initiates = false;
            }
        }
        _ => {}
    }
    Some(Class::Ip(p))
}

/// The tuple of the packet an ICMP error quotes.
fn inner_tuple(b: &[u8], off: usize, v6: bool) -> Option<Tuple> {
    let mut t = Tuple { src: [0; 16], dst: [0; 16], sport: 0, dport: 0, proto: 0 };
    let l4 = if v6 {
        let ip = at(b, off, 40)?;
        t.src = ip[8..24].try_into().unwrap();
        t.dst = ip[24..40].try_into().unwrap();
        t.proto = ip[6];
        off + 40
    } else {
        let ip = at(b, off, 20)?;
        let ihl = (ip[0] & 0xf) as usize * 4;
        if ihl < 20 {
            return None;
        }
        t.src = v4map(&ip[12..16]);
        t.dst = v4map(&ip[16..20]);
        t.proto = ip[9];
        off + ihl
    };
    match t.proto {
        6 | 17 | 132 => {
            let h = at(b, l4, 4)?;
            t.sport = be16(h);
            t.dport = be16(&h[2..]);
        }
        1 | 58 => {
            let h = at(b, l4, 8)?;
            t.sport = be16(&h[4..]);
            t.dport = t.sport;
        }
        _ => {}
    }
    Some(t)
}

// ---------------------------------------------------------------------------------------------
// The reference decision, with its own conntrack and fragment tables.

/// Conntrack key from the pod's side: (pod addr, pod port, peer addr, peer port, proto). The
/// pod's address is always zero: like `CtKey`, the key leaves it out (the interface identifies
/// the pod), so packets of one pod that differ only in its own address share an entry.
type Key = ([u8; 16], u16, [u8; 16], u16, u8);

#[derive(Clone, Copy, PartialEq)]
enum Verdict {
    Allow,
    Audit,
    Deny,
}

struct Entry {
    generation: u32,
    origin: u8,
    /// TCP: a SYN was seen and nothing else yet (no reply, FIN or RST).
    syn_sent: bool,
    verdict: Verdict,
}

#[derive(Default)]
struct Reference {
    ct: HashMap<Key, Entry>,
    frags: HashSet<([u8; 16], [u8; 16], u32, u8)>,
}

fn key(dir: u8, t: &Tuple) -> Key {
    if dir == DIR_EGRESS {
        ([0; 16], t.sport, t.dst, t.dport, t.proto)
    } else {
        ([0; 16], t.dport, t.src, t.sport, t.proto)
    }
}

impl Reference {
    fn decide(&mut self, ep: &EpConf, dir: u8, frame: &[u8]) -> Reason {
        match classify(frame) {
            Class::Malformed => Reason::DenyMalformed,
            Class::Control => Reason::AllowNonIp,
            Class::Ip(p) => match p.kind {
                Kind::Normal => self.flow(ep, dir, &p),
                Kind::Fragment => {
                    if self.frags.contains(&(p.t.src, p.t.dst, p.frag_id, p.frag_proto)) {
                        Reason::AllowConntrack
                    } else {
                        Reason::DenyFragment
                    }
                }
                Kind::IcmpError(inner) => self.icmp_error(ep, dir, &p, &inner),
            },
        }
    }

    fn flow(&mut self, ep: &EpConf, dir: u8, p: &Parsed) -> Reason {
        let k = key(dir, &p.t);
        let remote = k.2;
        // A TCP SYN the policy denies is dropped without consulting conntrack, even if its
        // flow is tracked (a retransmission, or the peer's SYN of a simultaneous open).
        if p.t.proto == 6
            && p.initiates
            && !ep.audit
            && !reference_policy(ep, dir, &remote, k.4, p.t.dport).0
        {
            return Reason::DenyPolicy;
        }
        if let Some(e) = self.ct.get_mut(&k) {
            // A fresh SYN on a flow past its handshake is a new connection reusing the ports.
            let reused = p.t.proto == 6 && p.initiates && !e.syn_sent;
            if !reused {
                if e.generation != ep.generation {
                    let port = if e.origin == DIR_EGRESS { k.3 } else { k.1 };
                    let (allow, _) = reference_policy(ep, e.origin, &remote, k.4, port);
                    e.verdict = match (allow, ep.audit) {
                        (true, _) => Verdict::Allow,
                        (false, true) => Verdict::Audit,
                        (false, false) => Verdict::Deny,
                    };
                    e.generation = ep.generation;
                }
                if e.verdict == Verdict::Deny {
                    return Reason::DenyPolicyChanged;
                }
                // TCP leaves SYN_SENT with a reply, a FIN or a RST.
                if p.t.proto == 6 && (p.flags & 0x05 != 0 || e.origin != dir) {
                    e.syn_sent = false;
                }
                if p.first_fragment {
                    self.frags.insert((p.t.src, p.t.dst, p.frag_id, p.frag_proto));
                }
                return if e.verdict == Verdict::Audit {
                    Reason::Audit
                } else {
                    Reason::AllowConntrack
                };
            }
        }
        let (allow, policed) = reference_policy(ep, dir, &remote, k.4, p.t.dport);
        let (origin, verdict, reason) = if allow {
            let r = if policed { Reason::AllowPolicy } else { Reason::AllowUnpoliced };
            (dir, Verdict::Allow, r)
        } else {
            // Mid-flow pickup: the reverse orientation, for packets that cannot open a flow
            // and for UDP when a policy explicitly allows the reverse.
            let rev = dir ^ 1;
            let back = (!p.initiates || p.t.proto == 17) && {
                let (a, pol) = reference_policy(ep, rev, &remote, k.4, p.t.sport);
                a && (p.t.proto != 17 || pol)
            };
            if back {
                (rev, Verdict::Allow, Reason::AllowConntrack)
            } else if ep.audit {
                (dir, Verdict::Audit, Reason::Audit)
            } else {
                return Reason::DenyPolicy;
            }
        };
        let syn_sent = p.t.proto == 6 && p.initiates;
        self.ct.insert(k, Entry { generation: ep.generation, origin, syn_sent, verdict });
        if p.first_fragment {
            self.frags.insert((p.t.src, p.t.dst, p.frag_id, p.frag_proto));
        }
        reason
    }

    fn icmp_error(&mut self, ep: &EpConf, dir: u8, p: &Parsed, inner: &Tuple) -> Reason {
        // The quoted packet travelled the other way.
        if self.ct.get(&key(dir ^ 1, inner)).is_some_and(|e| e.verdict != Verdict::Deny) {
            return Reason::AllowConntrack;
        }
        let remote = if dir == DIR_EGRESS { p.t.dst } else { p.t.src };
        match reference_policy(ep, dir, &remote, p.t.proto, 0) {
            (true, true) => Reason::AllowPolicy,
            (true, false) => Reason::AllowUnpoliced,
            _ if ep.audit => Reason::Audit,
            _ => Reason::DenyPolicy,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Frame generation: mostly well-formed frames of plausible flows (so the policy and conntrack
// paths are reached), then mutated.

/// A flow as (src, dst, sport, dport, proto), addresses of 4 or 16 bytes.
type FlowSpec = (Vec<u8>, Vec<u8>, u16, u16, u8);

struct Gen {
    rng: Rng,
    /// Recent flows, for replies, reuse and ICMP errors.
    recent: Vec<FlowSpec>,
}

fn addr4(a: [u8; 4]) -> Vec<u8> {
    a.to_vec()
}
fn addr6(s: &str) -> Vec<u8> {
    s.parse::<Ipv6Addr>().unwrap().octets().to_vec()
}

impl Gen {
    /// One frame and the program it goes through (`true`: from the pod).
    fn frame(&mut self) -> (bool, Vec<u8>) {
        let r = &mut self.rng;
        if r.chance(3) {
            // Pure noise, half of it under an IP ethertype.
            let n = 14 + r.below(120);
            let mut b = r.bytes(n);
            if r.chance(50) {
                let et: u16 = r.pick(&[0x0800, 0x86dd, 0x8100, 0x88a8]);
                b[12..14].copy_from_slice(&et.to_be_bytes());
            }
            return (r.chance(50), b);
        }
        let from_pod = r.chance(50);
        let (mut src, mut dst, mut sport, mut dport, mut proto);
        if !self.recent.is_empty() && r.chance(40) {
            // A packet of a recent flow, in either orientation.
            let f = self.recent[r.below(self.recent.len())].clone();
            (src, dst, sport, dport, proto) = f;
            if r.chance(50) {
                std::mem::swap(&mut src, &mut dst);
                std::mem::swap(&mut sport, &mut dport);
            }
        } else {
            let v6 = r.chance(30);
            let (pod, peer) = if v6 {
                (addr6(POD6), addr6(r.pick(PEERS6)))
            } else {
                (addr4(POD4), addr4(r.pick(PEERS4)))
            };
            (src, dst) = if from_pod { (pod, peer) } else { (peer, pod) };
            proto = r.pick(&[6, 6, 6, 17, 17, 132, 1, 58, 47, 0]);
            if proto == 0 {
                proto = r.byte();
            }
            if v6 && proto == 1 {
                proto = 58;
            }
            if !v6 && proto == 58 {
                proto = 1;
            }
            sport = if r.chance(50) { r.pick(PORTS) } else { 30000 + r.below(64) as u16 };
            dport = if r.chance(80) { r.pick(PORTS) } else { r.next() as u16 };
            if self.recent.len() < 512 {
                self.recent.push((src.clone(), dst.clone(), sport, dport, proto));
            } else {
                let i = r.below(512);
                self.recent[i] = (src.clone(), dst.clone(), sport, dport, proto);
            }
        }
        let v6 = src.len() == 16;
        let l4 = self.l4(proto, sport, dport, v6);
        let r = &mut self.rng;
        let mut ip =
            if v6 { ipv6(r, &src, &dst, proto, l4) } else { ipv4(r, &src, &dst, proto, l4) };
        if r.chance(2) {
            let n = r.below(60);
            ip = r.bytes(n);
        }
        let mut frame = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
        let tags = match r.below(100) {
            0..=84 => 0,
            85..=93 => 1,
            94..=98 => 2,
            _ => 3,
        };
        for _ in 0..tags {
            let tpid: u16 = r.pick(&[0x8100, 0x88a8]);
            frame.extend_from_slice(&tpid.to_be_bytes());
            frame.extend_from_slice(&(r.next() as u16 & 0x0fff).to_be_bytes());
        }
        frame.extend_from_slice(&if v6 { 0x86ddu16 } else { 0x0800 }.to_be_bytes());
        let l3 = frame.len();
        frame.extend_from_slice(&ip);
        if r.chance(10) {
            // Trailing bytes past the IP datagram (Ethernet padding, or junk).
            let n = r.below(40);
            frame.extend(r.bytes(n));
        }
        if r.chance(30) {
            mutate(r, &mut frame, l3, v6);
        }
        // BPF_PROG_TEST_RUN needs at least an Ethernet header.
        if frame.len() < 14 {
            frame.resize(14, 0);
        }
        (from_pod, frame)
    }

    /// A transport header and payload.
    fn l4(&mut self, proto: u8, sport: u16, dport: u16, v6: bool) -> Vec<u8> {
        let r = &mut self.rng;
        let payload = r.below(24);
        let mut b = match proto {
            6 => {
                let mut h = vec![0u8; 20];
                h[..2].copy_from_slice(&sport.to_be_bytes());
                h[2..4].copy_from_slice(&dport.to_be_bytes());
                h[12] = 5 << 4;
                h[13] = r.pick(&[0x02, 0x02, 0x12, 0x10, 0x10, 0x18, 0x11, 0x04, 0x14, 0x03]);
                if r.chance(3) {
                    h[13] = r.byte();
                }
                if r.chance(10) {
                    // TCP options.
                    let words = 1 + r.below(10);
                    h[12] = ((5 + words) as u8) << 4;
                    h.extend(r.bytes(words * 4));
                }
                h
            }
            17 => {
                let mut h = vec![0u8; 8];
                h[..2].copy_from_slice(&sport.to_be_bytes());
                h[2..4].copy_from_slice(&dport.to_be_bytes());
                h[4..6].copy_from_slice(&((8 + payload) as u16).to_be_bytes());
                h
            }
            132 => {
                let mut h = vec![0u8; 12];
                h[..2].copy_from_slice(&sport.to_be_bytes());
                h[2..4].copy_from_slice(&dport.to_be_bytes());
                h.extend_from_slice(&[r.pick(&[1, 1, 2, 3, 0, 10]), 0, 0, 20]);
                h.extend(r.bytes(16));
                h
            }
            1 | 58 => {
                let (req, reply) = if v6 { (128u8, 129u8) } else { (8, 0) };
                let kinds: &[u8] = if v6 {
                    &[128, 129, 1, 2, 3, 4, 135, 136, 133, 143, 200]
                } else {
                    &[8, 0, 3, 11, 12, 5, 13]
                };
                let kind = r.pick(kinds);
                let mut h = vec![kind, r.byte(), 0, 0];
                if kind == req || kind == reply {
                    h.extend_from_slice(&sport.to_be_bytes());
                    h.extend_from_slice(&[0, 1]);
                } else {
                    h.extend_from_slice(&[0; 4]);
                }
                let error = if v6 { (1..=4).contains(&kind) } else { matches!(kind, 3 | 11 | 12) };
                if error {
                    h.extend(self.quoted(v6));
                }
                h
            }
            _ => Vec::new(),
        };
        let r = &mut self.rng;
        b.extend(r.bytes(payload));
        b
    }

    /// The start of a quoted packet for an ICMP error: usually a recent flow's.
    fn quoted(&mut self, v6: bool) -> Vec<u8> {
        let pick = self.recent.iter().filter(|f| (f.0.len() == 16) == v6).count();
        let r = &mut self.rng;
        let (src, dst, sport, dport, proto) = if pick > 0 && r.chance(70) {
            let n = r.below(pick);
            let f = self.recent.iter().filter(|f| (f.0.len() == 16) == v6).nth(n).unwrap();
            let f = f.clone();
            if r.chance(50) {
                (f.1, f.0, f.3, f.2, f.4)
            } else {
                f
            }
        } else if v6 {
            (addr6(r.pick(PEERS6)), addr6(POD6), r.pick(PORTS), r.pick(PORTS), 17)
        } else {
            (addr4(r.pick(PEERS4)), addr4(POD4), r.pick(PORTS), r.pick(PORTS), 6)
        };
        let mut l4 = sport.to_be_bytes().to_vec();
        l4.extend_from_slice(&dport.to_be_bytes());
        l4.extend_from_slice(&[0, 0, 0, 0]);
        let mut q =
            if v6 { ipv6(r, &src, &dst, proto, l4) } else { ipv4(r, &src, &dst, proto, l4) };
        if r.chance(10) {
            let n = r.below(q.len());
            q.truncate(n);
        }
        q
    }
}

/// An IPv4 packet, sometimes with options or as a fragment.
fn ipv4(r: &mut Rng, src: &[u8], dst: &[u8], proto: u8, l4: Vec<u8>) -> Vec<u8> {
    let opt_words = if r.chance(10) { 1 + r.below(10) } else { 0 };
    let ihl = 20 + opt_words * 4;
    let mut payload = l4;
    let mut frag = 0u16;
    if r.chance(10) {
        let offset = if r.chance(50) { 0 } else { 1 + r.below(200) as u16 };
        let more = offset == 0 || r.chance(50);
        frag = offset | if more { 0x2000 } else { 0 };
        if offset != 0 {
            let n = 8 + r.below(16);
            payload = r.bytes(n);
        }
    }
    let mut h = vec![0u8; ihl];
    h[0] = 0x40 | (ihl / 4) as u8;
    h[2..4].copy_from_slice(&((ihl + payload.len()) as u16).to_be_bytes());
    h[4..6].copy_from_slice(&(r.pick(&[7u16, 8, 9, 1000]) ^ (r.chance(10) as u16)).to_be_bytes());
    h[6..8].copy_from_slice(&frag.to_be_bytes());
    h[8] = 64;
    h[9] = proto;
    h[12..16].copy_from_slice(src);
    h[16..20].copy_from_slice(dst);
    for b in &mut h[20..] {
        let any = r.byte();
        *b = r.pick(&[1, 0, 7, 0x44, 0x94, any]);
    }
    h.extend(payload);
    h
}

/// An IPv6 packet, sometimes with an extension-header chain, a fragment header among them.
fn ipv6(r: &mut Rng, src: &[u8], dst: &[u8], proto: u8, l4: Vec<u8>) -> Vec<u8> {
    let n = if r.chance(25) { 1 + r.below(8) } else { 0 };
    let kinds: Vec<u8> = (0..n).map(|_| r.pick(&[0, 43, 60, 44, 51])).collect();
    let mut exts = Vec::new();
    let mut payload = l4;
    for (i, &k) in kinds.iter().enumerate() {
        let next = kinds.get(i + 1).copied().unwrap_or(proto);
        match k {
            44 => {
                let offset: u16 = if r.chance(50) { 0 } else { 1 + r.below(100) as u16 };
                let more = offset == 0 || r.chance(50);
                let field = offset << 3 | more as u16;
                exts.push(next);
                exts.push(0);
                exts.extend_from_slice(&field.to_be_bytes());
                exts.extend_from_slice(&r.pick(&[7u32, 8, 9, 0xdead]).to_be_bytes());
                if offset != 0 {
                    let n = 8 + r.below(16);
                    payload = r.bytes(n);
                    break;
                }
            }
            51 => {
                // AH: length in 4-octet units minus 2; 12 octets minimum.
                let units = 1 + r.below(3);
                exts.push(next);
                exts.push(units as u8);
                exts.extend(r.bytes((units + 2) * 4 - 2));
            }
            _ => {
                let units = r.below(3);
                exts.push(next);
                exts.push(units as u8);
                exts.extend(r.bytes((units + 1) * 8 - 2));
            }
        }
    }
    let mut h = vec![0u8; 40];
    h[0] = 0x60;
    h[4..6].copy_from_slice(&((exts.len() + payload.len()) as u16).to_be_bytes());
    h[6] = kinds.first().copied().unwrap_or(proto);
    h[7] = 64;
    h[8..24].copy_from_slice(src);
    h[24..40].copy_from_slice(dst);
    h.extend(exts);
    h.extend(payload);
    h
}

/// One to three targeted corruptions: truncation, header length fields, single bytes.
fn mutate(r: &mut Rng, f: &mut Vec<u8>, l3: usize, v6: bool) {
    for _ in 0..1 + r.below(3) {
        if f.len() <= l3 {
            return;
        }
        match r.below(8) {
            0 => {
                let n = r.below(f.len());
                f.truncate(n.max(14));
            }
            1 if !v6 => f[l3] = (f[l3] & 0xf0) | r.byte() & 0x0f,
            2 if !v6 && f.len() >= l3 + 4 => {
                let v = be16(&f[l3 + 2..]).wrapping_add(r.pick(&[1u16, 2, 4, 0xfff0, 0xffff]));
                let v = if r.chance(30) { r.next() as u16 } else { v };
                f[l3 + 2..l3 + 4].copy_from_slice(&v.to_be_bytes());
            }
            2 if v6 && f.len() >= l3 + 6 => {
                let v = be16(&f[l3 + 4..]).wrapping_add(r.pick(&[1u16, 8, 0xfff8, 0xffff]));
                f[l3 + 4..l3 + 6].copy_from_slice(&v.to_be_bytes());
            }
            3 => {
                // The TCP data offset (or whatever byte sits there).
                let at = l3 + if v6 { 40 } else { 20 } + 12;
                if let Some(b) = f.get_mut(at) {
                    *b = (r.below(16) as u8) << 4;
                }
            }
            4 => f[l3] = r.byte(),
            _ => {
                let i = l3 + r.below(f.len() - l3);
                f[i] = r.byte();
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v.parse().unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
        Err(_) => default,
    }
}

/// Frames per chunk: after each, the counted reasons are compared and the phase may change.
const CHUNK: usize = 5_000;

#[test]
fn random_and_mutated_frames_match_the_reference() {
    let frames = env_u64("NETPOL_FUZZ_FRAMES", 100_000) as usize;
    let seed = env_u64("NETPOL_FUZZ_SEED", 0x6e70_6f6c);
    println!("fuzz: {frames} frames, NETPOL_FUZZ_SEED={seed}");
    let mut f = Fixture::new("fuzz");
    load_policy(&mut f);
    let mut gen = Gen { rng: Rng(seed), recent: Vec::new() };
    let mut reference = Reference::default();
    let mut ep = EpConf { generation: 1, audit: false, ingress: true, egress: true };
    f.dp.set_endpoint(TEST_IFINDEX, ep.endpoint()).unwrap();

    let mut tally: BTreeMap<(u8, Reason), u64> = BTreeMap::new();
    let mut refused = 0u64;
    let mut sent = 0usize;
    let mut chunk = 0;
    while sent < frames {
        let before = f.dp.counters().unwrap();
        let mut expected: BTreeMap<(u8, Reason), u64> = BTreeMap::new();
        for _ in 0..CHUNK.min(frames - sent) {
            sent += 1;
            let (from_pod, frame) = gen.frame();
            let (prog, dir) =
                if from_pod { (PROG_FROM_POD, DIR_EGRESS) } else { (PROG_TO_POD, DIR_INGRESS) };
            let got = match f.dp.test_run(prog, &frame, 1) {
                Ok((ret, _)) => ret,
                Err(e) => {
                    // The kernel refuses frames whose IP header it cannot pull; such a frame
                    // never reaches a program on a real interface either.
                    assert!(
                        kernel_refuses(&frame),
                        "frame {sent} refused by the kernel unexpectedly: {e:?}\n{frame:02x?}"
                    );
                    refused += 1;
                    continue;
                }
            };
            let want = reference.decide(&ep, dir, &frame);
            let want_ret = if want.is_drop() { DROP } else { PASS };
            assert_eq!(
                got,
                want_ret,
                "frame {sent} (seed {seed}) through {prog}: reference says {want:?} under {ep:?}\n\
                 parsed: {:?}\nframe: {frame:02x?}",
                classify(&frame)
            );
            *expected.entry((dir, want)).or_default() += 1;
        }
        let after = f.dp.counters().unwrap();
        let mut counted: BTreeMap<(u8, Reason), u64> = BTreeMap::new();
        for (k, v) in &after.by_reason {
            let d = v.packets - before.by_reason.get(k).map_or(0, |b| b.packets);
            if d > 0 {
                counted.insert((k.direction, Reason::from_u8(k.reason).unwrap()), d);
            }
        }
        assert_eq!(counted, expected, "chunk {chunk} (seed {seed}): counted reasons differ");
        for (k, v) in expected {
            *tally.entry(k).or_default() += v;
        }
        chunk += 1;
        // Next phase: a policy change (generation bump) re-checks tracked flows; sometimes
        // audit mode or an unpoliced direction; sometimes conntrack starts empty (restart).
        let r = &mut gen.rng;
        ep = EpConf {
            generation: ep.generation + 1,
            audit: r.chance(20),
            ingress: r.chance(85),
            egress: r.chance(70),
        };
        f.dp.set_endpoint(TEST_IFINDEX, ep.endpoint()).unwrap();
        if r.chance(30) || reference.ct.len() > 100_000 {
            f.dp.clear_conntrack().unwrap();
            reference.ct.clear();
        }
        if reference.frags.len() > 4_000 {
            clear_fragments(&mut f);
            reference.frags.clear();
        }
    }
    println!("fuzz: {sent} frames, {refused} refused by BPF_PROG_TEST_RUN, verdicts by reason:");
    for ((dir, reason), n) in &tally {
        let dir = if *dir == DIR_EGRESS { "egress" } else { "ingress" };
        println!("  {dir:7} {:15} {n}", reason.name());
    }
    // The run reached every path it is meant to check.
    for r in [
        Reason::AllowPolicy,
        Reason::AllowConntrack,
        Reason::AllowUnpoliced,
        Reason::AllowNonIp,
        Reason::Audit,
        Reason::DenyPolicy,
        Reason::DenyPolicyChanged,
        Reason::DenyMalformed,
        Reason::DenyFragment,
    ] {
        assert!(tally.keys().any(|k| k.1 == r), "no frame ended in {r:?}");
    }
}

/// BPF_PROG_TEST_RUN refuses an IPv4 or IPv6 frame (by its Ethernet type) whose IP header is
/// shorter than the fixed header.
fn kernel_refuses(frame: &[u8]) -> bool {
    match be16(&frame[12..]) {
        0x0800 => frame.len() < 14 + 20,
        0x86dd => frame.len() < 14 + 40,
        _ => false,
    }
}

fn clear_fragments(f: &mut Fixture) {
    use netpol_common::ct::{FragKey, FragValue};
    let map = f.dp.raw_map_mut(netpol_common::maps::FRAG).unwrap();
    let mut frags = aya::maps::HashMap::<_, FragKey, FragValue>::try_from(map).unwrap();
    let keys: Vec<FragKey> = frags.keys().filter_map(Result::ok).collect();
    for k in keys {
        frags.remove(&k).unwrap();
    }
}
